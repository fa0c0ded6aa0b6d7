"""The TRL-shaped classes of the other jobs: `DiDiTrainer`, `MDMTrainer`, `VRPOTrainer`'s argument checks, and
`RLTrainer`'s mapping of TRL arguments onto the config."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

from dlm_rl import DiDiConfig, DiDiTrainer, MDMConfig, MDMTrainer, TraceRLConfig, TraceRLTrainer

ROWS = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(12)]


def test_didi_trainer_distils_from_a_list_of_rows_and_takes_no_rewards(tmp_path):
    args = DiDiConfig(gen_length=4, max_steps=1, prompts_per_step=2, group_size=2, eval_steps=1, eval_samples=2,
                      eval_nfe=2, output_dir=str(tmp_path / "run"), report_to="none")
    line = DiDiTrainer(model="tiny", args=args, train_dataset=ROWS).train()
    assert line["step"] == 1 and "eval/validity" not in line  # validity is a testbed task's
    assert (tmp_path / "run" / "final").is_dir()
    with pytest.raises(ValueError, match="DiDiTrainer takes no reward_funcs"):
        DiDiTrainer(model="tiny", args=args, train_dataset=ROWS, reward_funcs=[lambda p, c, **k: [0.0] * len(c)])


def test_mdm_trainer_takes_a_model_name_rows_and_a_peft_config(tmp_path):
    args = MDMConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                     report_to="none")
    trainer = MDMTrainer(model="tiny", args=args, train_dataset=ROWS, response_length=4,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.save_model()
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="needs response_length"):
        MDMTrainer(model="tiny", args=args, train_dataset=ROWS)


def test_mdm_without_any_data_is_refused_before_the_model_loads(tmp_path):
    from dlm_rl.trainers.mdm import run

    with pytest.raises(ValueError, match="set exactly one of dataset_name"):
        run(MDMConfig(output_dir=str(tmp_path / "run"), use_cpu=True, model="no-such-model"))


def test_trl_arguments_replace_the_configs_keys():
    peft = LoraConfig(r=2, lora_alpha=3, lora_dropout=0.05, target_modules={"v_proj", "q_proj"})
    trainer = TraceRLTrainer(model="testbed:chain-base", args=TraceRLConfig(use_lora=False), peft_config=peft,
                             reward_funcs="rewards.format:boxed")
    args = trainer.args
    assert (args.model, args.use_lora, args.lora_r, args.lora_alpha, args.lora_dropout) == (
        "testbed:chain-base", True, 2, 3, 0.05)
    assert args.lora_target_modules == ["q_proj", "v_proj"] and args.reward_funcs == ["rewards.format:boxed"]
    with pytest.raises(TypeError, match="takes args=TraceRLConfig"):
        TraceRLTrainer(args=DiDiConfig())
