"""Exact resume: a run killed (SIGKILL, in a forked child) after a checkpoint at step k, with step k+1 already logged,
and then resumed from that checkpoint logs the same metrics at steps k+1..k+3 as the run that was never interrupted.
Bad resumes fail clearly; a save cut short leaves the earlier checkpoints as they were."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal

import pytest
import torch

K = 2  # the checkpoint the run resumes from; the kill comes right after step K + 1 is logged


@pytest.fixture
def reward(tmp_path) -> str:
    """A reward that differs within most groups, so that steps train."""
    path = tmp_path / "reward.py"
    path.write_text("def by_characters(prompts, completions, **columns):\n"
                    "    return [float(sum(map(ord, c)) % 7) for c in completions]\n")
    return f"{path}:by_characters"


def _metrics(directory) -> list[dict]:
    lines = [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def _killed(run, config) -> None:
    """The run, in a forked child, killed (SIGKILL) as soon as step K + 1 is logged, before anything else."""
    from dlm_rl.run_log import RunLog

    log = RunLog.log

    def log_then_die(self, line):
        log(self, line)
        if line["step"] == K + 1:
            os.kill(os.getpid(), signal.SIGKILL)

    RunLog.log = log_then_die  # the child's own copy of the class
    run(config)


def _kill_resume_and_compare(tmp_path, run, config_class, **settings):
    """Run K + 3 steps three ways: uninterrupted; killed after step K + 1 with checkpoints every K steps; resumed
    from checkpoint-K. The resumed run's log must equal the uninterrupted one, step for step."""
    settings = dict(max_steps=K + 3, eval_steps=100, report_to="none", seed=3, **settings)
    child = multiprocessing.get_context("fork").Process(
        target=_killed, args=(run, config_class(output_dir=str(tmp_path / "run"), save_steps=K, **settings)))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL, f"the run was not killed (exit code {child.exitcode})"
    assert [m["step"] for m in _metrics(tmp_path / "run")] == list(range(K + 2))  # step K + 1 logged, not saved
    assert sorted(os.listdir(tmp_path / "run" / f"checkpoint-{K}")) == ["config.json", "manifest.json", "state.pt"]

    run(config_class(output_dir=str(tmp_path / "run"), save_steps=K, resume="latest", **settings))
    run(config_class(output_dir=str(tmp_path / "uninterrupted"), **settings))
    resumed, uninterrupted = _metrics(tmp_path / "run"), _metrics(tmp_path / "uninterrupted")
    assert [m["step"] for m in resumed] == list(range(K + 4))  # the killed run's step K + 1 was replaced
    assert resumed == uninterrupted
    return resumed


def test_tracerl_with_a_value_model_resumes_exactly(tmp_path, reward):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    # LoRA dropout draws from the global torch RNG, so that state matters too; both schedules' positions too.
    metrics = _kill_resume_and_compare(tmp_path, run, TraceRLConfig, model="tiny", dataset_name="addition3",
                                       train_size=6, eval_size=2, num_generations=2, prompts_per_step=2, lora_r=4,
                                       lora_dropout=0.1, learning_rate=1e-2, value_model=True, gen_length=4,
                                       reward_funcs=[reward], lr_scheduler_type="cosine", warmup_steps=1)
    assert all("value_loss" in m for m in metrics[1:])
    assert len({m["loss"] for m in metrics[1:]}) > 1
    assert [m["learning_rate"] for m in metrics[1:3]] == [0.0, 1e-2] and metrics[-1]["learning_rate"] < 1e-2


def test_vrpo_on_policy_resumes_exactly(tmp_path, reward):
    from dlm_rl.trainers.vrpo import VRPOConfig, run

    metrics = _kill_resume_and_compare(tmp_path, run, VRPOConfig, model="tiny", dataset_name="addition3", train_size=6,
                                       eval_size=2, num_generations=4, prompts_per_step=2, lora_r=4,
                                       learning_rate=1e-2, n_t=2, gen_length=4, reward_funcs=[reward])
    assert all(m["pairs"] > 0 for m in metrics[1:])


def test_didi_with_its_ema_resumes_exactly(tmp_path):
    from dlm_rl.trainers.didi import DiDiConfig, run

    metrics = _kill_resume_and_compare(tmp_path, run, DiDiConfig, teacher="tiny", dataset_name="addition3", train_size=8,
                                       prompts_per_step=2, group_size=2, discriminator_warmup_steps=1, eval_samples=4,
                                       eval_nfe=4, learning_rate=1e-3)
    assert all("loss" in m for m in metrics[2:]) and "eval/validity" in metrics[-1]


@pytest.mark.parametrize("use_lora", [False, True])
def test_mdm_sft_resumes_from_the_trainers_checkpoint_exactly(tmp_path, use_lora):
    """MDM SFT runs on the transformers Trainer and resumes from its checkpoints: a run resumed from checkpoint-2 of
    a 4-step run logs the same losses and ends with the same weights (or adapter) as the run that went on."""
    from safetensors.torch import load_file

    from dlm_rl.trainers.mdm import MDMConfig, run

    def config(name, **resume):
        return MDMConfig(output_dir=str(tmp_path / name), dataset_name="addition3", train_size=32, tiny_hidden_size=32,
                         tiny_num_layers=2, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, use_lora=use_lora, lora_r=4, use_cpu=True, seed=3,
                         **resume)

    def losses(name) -> list[float]:
        state = json.loads((tmp_path / name / "checkpoint-4" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    def weights(directory) -> dict:
        (file,) = [name for name in os.listdir(directory) if name.endswith(".safetensors")]
        return load_file(os.path.join(directory, file))

    run(config("whole"))
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(config("resumed", resume="latest"))
    assert len(losses("whole")) == 4 and losses("resumed") == losses("whole")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    halfway = weights(tmp_path / "whole" / "checkpoint-2")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert any(not torch.equal(whole[name], halfway[name]) for name in whole)  # steps 3 and 4 changed them

    with pytest.raises(ValueError, match="holds checkpoints of an earlier run.*--resume latest"):
        run(config("whole"))
    with pytest.raises(FileNotFoundError, match="no checkpoint-STEP directory in output_dir"):
        run(config("empty", resume=True))
    if use_lora:  # another adapter structure would load in part (PEFT skips what does not match): refused
        with pytest.raises(ValueError, match="saved with another LoRA adapter"):
            run(dataclasses.replace(config("resumed", resume="latest"), lora_target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("use_lora", [False, True])
def test_mdm_saves_a_state_dict_the_trainer_gathered_under_the_wrapped_models_names(tmp_path, use_lora):
    """Under FSDP or ZeRO-3 the Trainer gathers the full state dict of the DiffusionLM wrapper and hands it to
    `_save`: what is written must be those tensors, under the names `load` (or the adapter file) expects."""
    from datasets import Dataset
    from safetensors.torch import load_file

    from dlm_rl.models.lora import add_lora
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.testbed import TASKS
    from dlm_rl.trainers.mdm import MDMConfig, MDMTrainer

    model = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)
    config = MDMConfig(output_dir=str(tmp_path / "run"), dataset_name="addition3", use_lora=use_lora, lora_r=4, use_cpu=True)
    if use_lora:
        add_lora(model, config)
    rows = Dataset.from_list(list(TASKS["addition3"].dataset("train", 4, seed=0)))
    trainer = MDMTrainer(model, config, rows, TASKS["addition3"].response_length)
    gathered = {name: tensor + 1.0 for name, tensor in model.state_dict().items()}  # not the model's own values
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    (file,) = [name for name in os.listdir(tmp_path / "saved") if name.endswith(".safetensors")]
    saved = load_file(str(tmp_path / "saved" / file))
    if use_lora:  # the adapter file drops PEFT's wrapper prefix and the adapter name
        expected = {name: gathered["model." + name.replace(".weight", ".default.weight")] for name in saved}
        assert len(saved) == sum("lora_" in name for name in gathered)
    else:
        from dlm_rl.models import load

        expected = {name: gathered["model." + name] for name in saved}
        assert torch.equal(load(str(tmp_path / "saved")).model.model.embed_tokens.weight,
                           gathered["model.model.embed_tokens.weight"])
    assert saved and all(torch.equal(saved[name], expected[name]) for name in saved)


def test_resume_errors_are_clear_and_changed_settings_are_named(tmp_path, reward, caplog):
    from dlm_rl.recipe import parse_recipe
    from dlm_rl.trainers.tracerl import TraceRLConfig, run
    from dlm_rl.trainers.vrpo import VRPOConfig
    from dlm_rl.trainers.vrpo import run as run_vrpo

    settings = dict(model="tiny", dataset_name="addition3", train_size=4, eval_size=1, num_generations=2, prompts_per_step=2,
                    lora_r=4, gen_length=2, max_steps=1, report_to="none", reward_funcs=[reward])
    out = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoint-STEP directory in output_dir"):
        run(TraceRLConfig(output_dir=out, resume="latest", **settings))
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*missing does not exist"):
        run(TraceRLConfig(output_dir=out, resume=str(tmp_path / "missing"), **settings))
    run(TraceRLConfig(output_dir=out, save_steps=1, **settings))
    with pytest.raises(ValueError, match="holds an earlier run .*checkpoint-1.*--resume latest"):
        run(TraceRLConfig(output_dir=out, **settings))
    with pytest.raises(ValueError, match="saved by a TraceRLConfig run, not a VRPOConfig run"):
        run_vrpo(VRPOConfig(output_dir=out, resume="latest", **settings))
    with pytest.raises(ValueError, match=r"other settings \(lora_r: 4 -> 8\)"):
        run(TraceRLConfig(output_dir=out, resume="latest", **{**settings, "lora_r": 8}))
    run(TraceRLConfig(output_dir=out, resume="latest", **{**settings, "learning_rate": 0.5}))  # nothing left to do
    assert "changed settings (learning_rate: 0.0001 -> 0.5)" in caplog.text
    with pytest.raises(ValueError, match="must be at least 1"):
        TraceRLConfig(save_total_limit=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer: tracerl\nresume: true\n")
    assert parse_recipe(str(recipe))[1].resume == "latest"
    assert parse_recipe(str(recipe), ["--resume", "false"])[1].resume is None
    assert parse_recipe(str(recipe), ["--resume", "--max_steps", "3"])[1].resume == "latest"  # a bare --resume


def test_a_save_cut_short_keeps_the_earlier_checkpoints_and_only_the_newest_are_kept(tmp_path, monkeypatch):
    from dlm_rl.checkpoint import checkpoints, load_checkpoint, save_checkpoint
    from dlm_rl.trainers.online import PromptStream
    from dlm_rl.trainers.vrpo import VRPOConfig

    config = VRPOConfig(output_dir=str(tmp_path), save_total_limit=2)
    model, stream = torch.nn.Linear(2, 2), PromptStream([{"prompt": str(i)} for i in range(5)], 2, seed=0)
    for step in (1, 2, 3):
        stream.next()
        save_checkpoint(config, step, {"model": model, "prompts": stream})
    assert [os.path.basename(p) for p in checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]

    def cut(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops inside torch.save
    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(config, 4, {"model": model, "prompts": stream})
    monkeypatch.undo()
    assert [os.path.basename(p) for p in checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    expected = stream.next()
    config.resume = "latest"
    fresh, other = PromptStream([{"prompt": str(i)} for i in range(5)], 2, seed=0), torch.nn.Linear(2, 2)
    assert load_checkpoint(config, {"model": other, "prompts": fresh}) == 3
    assert fresh.next() == expected and torch.equal(other.weight, model.weight)
    save_checkpoint(config, 4, {"model": model, "prompts": stream})  # clears what the cut save left
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
