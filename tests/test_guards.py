"""Each guard of `dlm_rl.guards` (and the LoRA target check) triggered on the tiny testbed: LoRA targets that match
nothing or more than intended, completions mostly truncated, a reward stuck at one value, and NaN losses in every
trainer (the update skipped and counted, the weights unchanged, the run stopped at `max_nonfinite_steps`)."""

from __future__ import annotations

import json
import logging
import types

import pytest
import torch
from torch import nn

from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.models.tiny import tiny_model

SMALL = {"model": "tiny", "task": "addition3", "train_size": 16, "eval_size": 2, "num_generations": 2,
         "prompts_per_step": 2, "lora_r": 4, "report_to": "none"}


def tiny():
    return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)


def _nan_loss(function):
    """`function` with its loss (the first output, or the only one) turned NaN; the graph stays."""
    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")
    return wrapped


def _reward_file(directory, body: str):
    path = directory / "my_rewards.py"
    path.write_text(f"def reward(prompts, completions, **columns):\n    return {body}\n")
    return f"{path}:reward"


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lora_b_is_zero(final_dir) -> bool:
    """LoRA's B starts at zero: it is still zero exactly when no optimiser step was taken (a NaN step makes it NaN)."""
    from safetensors.torch import load_file

    weights = load_file(str(final_dir / "adapter_model.safetensors"))
    b = [w for name, w in weights.items() if "lora_B" in name]
    return bool(b) and all(torch.equal(w, torch.zeros_like(w)) for w in b)


# --- LoRA target modules ---------------------------------------------------------------------------------------


def test_a_lora_target_that_matches_nothing_is_an_error_even_when_another_matches():
    # PEFT 0.21 skips 'nonexistent' silently here, since q_proj matches
    with pytest.raises(ValueError, match=r"\['nonexistent'\] match no module of LlamaForCausalLM, whose linear "
                                         r"layers are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head'"):
        add_lora(tiny(), LoraArguments(lora_r=2, lora_target_modules=["q_proj", "nonexistent"]))


def test_a_lora_target_naming_a_block_not_a_linear_layer_is_an_error():
    with pytest.raises(ValueError, match=r"'mlp' names model.layers.0.mlp \(LlamaMLP\), which LoRA cannot adapt"):
        add_lora(tiny(), LoraArguments(lora_r=2, lora_target_modules=["q_proj", "mlp"]))


def test_a_dotted_lora_target_is_matched_as_peft_matches_it():
    model = add_lora(tiny(), LoraArguments(lora_r=2, lora_target_modules=["self_attn.q_proj"]))
    assert model.model.targeted_module_names == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


class _LLaDALike(nn.Module):
    """LLaDA's naming: each block's last projection and the LM head are both called `ff_out`."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.blocks = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(4, 4),
                                                                      "ff_out": nn.Linear(4, 4)}) for _ in range(2)])
        self.model.transformer.ff_out = nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.model.transformer.ff_out


def test_a_lora_target_that_also_matches_the_lm_head_leaves_the_head_out_loudly(caplog):
    wrapped = add_lora(types.SimpleNamespace(model=_LLaDALike()),
                       LoraArguments(lora_r=2, lora_target_modules=["q_proj", "ff_out"]))
    assert "model.transformer.ff_out" not in wrapped.model.targeted_module_names
    assert "model.transformer.blocks.1.ff_out" in wrapped.model.targeted_module_names
    assert "['ff_out'] also match the output layer model.transformer.ff_out (the LM head); it is left" in caplog.text
    named = add_lora(types.SimpleNamespace(model=_LLaDALike()),
                     LoraArguments(lora_r=2, lora_target_modules=["ff_out", "transformer.ff_out"]))
    assert "model.transformer.ff_out" in named.model.targeted_module_names  # named on its own: intended


# --- rollouts: truncation and constant rewards -------------------------------------------------------------------


def test_mostly_truncated_completions_warn_with_the_step_and_gen_length(tmp_path, caplog):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    config = TraceRLConfig(**SMALL, max_steps=2, eval_steps=2, gen_length=2, constant_reward_patience=0,
                           reward_funcs=[_reward_file(tmp_path, "[1.0] * len(completions)")],
                           output_dir=str(tmp_path / "run"))
    caplog.set_level(logging.WARNING, logger="dlm_rl.guards")
    run(config)  # `\boxed{…}` needs more than 2 tokens: every completion is cut off
    lines = _metrics(tmp_path / "run")[1:]
    assert [m["guard/truncated_steps"] for m in lines] == [1, 2]
    assert all(m["truncated_fraction"] > 0.5 for m in lines)
    assert "step 2: 4 of 4 completions (100%) hit the length limit without EOS" in caplog.text
    assert "Raise gen_length (now 2)" in caplog.text


def test_a_constant_reward_warns_after_patience_steps_naming_the_reward(tmp_path, caplog):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    config = TraceRLConfig(**SMALL, max_steps=3, eval_steps=3, constant_reward_patience=2,
                           reward_funcs=[_reward_file(tmp_path, "[0.0] * len(completions)")],
                           output_dir=str(tmp_path / "run"))
    caplog.set_level(logging.WARNING, logger="dlm_rl.guards")
    run(config)
    assert [m["guard/constant_rewards"] for m in _metrics(tmp_path / "run")[1:]] == [0, 1, 1]
    assert "step 2: reward 'reward' gave every completion the same score 0.0 for 2 steps in a row" in caplog.text
    assert "step 1: reward" not in caplog.text and "step 3: reward" not in caplog.text  # once per `patience` steps


def test_a_constant_reward_stops_the_run_when_configured(tmp_path):
    from dlm_rl.trainers.vrpo import VRPOConfig, run

    config = VRPOConfig(**SMALL, max_steps=3, eval_steps=3, constant_reward_patience=2, constant_reward_error=True,
                        reward_funcs=[_reward_file(tmp_path, "[1.0] * len(completions)")],
                        output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"step 2: reward 'reward' gave every completion the same score 1.0 .*"
                                         r"stopping \(constant_reward_error is set\)"):
        run(config)


def test_constant_reward_streaks_reset_and_skip_rewards_that_apply_to_nothing():
    from dlm_rl.guards import RolloutGuards

    def step(**rewards):
        return [types.SimpleNamespace(finish_reason=["eos"] * 2, rewards={**rewards, "total": [0, 0], "errors": []})]

    guards = RolloutGuards(gen_length=8, patience=2)
    counts = [guards(i, step(a=a, b=[None, None]))["guard/constant_rewards"]
              for i, a in enumerate([[1, 1], [1, 0], [1, 1], [1, 1], [0.5, 0.5]])]
    assert counts == [0, 0, 0, 1, 1]  # a's streak restarts after the step that varied; b never counts
    assert guards.streaks == {"a": 3, "b": 0}


# --- NaN / inf losses ----------------------------------------------------------------------------------------------


def test_tracerl_skips_nan_updates_counts_them_and_stops_at_the_limit(tmp_path, monkeypatch, caplog):
    from dlm_rl.trainers import tracerl

    caplog.set_level(logging.WARNING, logger="dlm_rl.guards")
    monkeypatch.setattr(tracerl, "ppo_trace_loss", _nan_loss(tracerl.ppo_trace_loss))
    config = tracerl.TraceRLConfig(**SMALL, max_steps=5, max_nonfinite_steps=3, ppo_minibatches=1,  # 1 update a step
                                   reward_funcs=[_reward_file(tmp_path, "[float(i) for i in range(len(completions))]")],
                                   output_dir=str(tmp_path / "run"))
    with pytest.raises(FloatingPointError, match=r"TraceRL: loss nan.* 3 non-finite updates \(max_nonfinite_steps=3"):
        tracerl.run(config)
    lines = _metrics(tmp_path / "run")[1:]
    assert [m["guard/nonfinite_steps"] for m in lines] == [1, 2]  # step 3 raised before its line
    assert "update skipped (gradients dropped, no optimiser step), 2 of max_nonfinite_steps=3" in caplog.text
    assert _lora_b_is_zero(tmp_path / "run" / "final")


def test_vrpo_skips_nan_updates_counts_them_and_stops_at_the_limit(tmp_path, monkeypatch, caplog):
    from dlm_rl.trainers import vrpo

    caplog.set_level(logging.WARNING, logger="dlm_rl.guards")
    monkeypatch.setattr(vrpo, "vrpo_loss", _nan_loss(vrpo.vrpo_loss))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": "0"})
                               for i in range(4)))
    config = vrpo.VRPOConfig(**SMALL, dataset=str(pairs), max_steps=5, n_t=2, gen_length=4, max_nonfinite_steps=3,
                             output_dir=str(tmp_path / "run"))
    with pytest.raises(FloatingPointError, match=r"VRPO: loss nan, grad_norm nan; that is 3 non-finite updates"):
        vrpo.run(config)
    assert [m["guard/nonfinite_steps"] for m in _metrics(tmp_path / "run")[1:]] == [1, 2]
    assert "VRPO: loss nan, grad_norm nan; update skipped" in caplog.text
    assert _lora_b_is_zero(tmp_path / "run" / "final")


def test_didi_skips_nan_student_updates_counts_them_and_stops_at_the_limit(tmp_path, monkeypatch, caplog):
    from dlm_rl.trainers import didi

    caplog.set_level(logging.WARNING, logger="dlm_rl.guards")
    monkeypatch.setattr(didi, "time_weight", _nan_loss(didi.time_weight))  # ω(t) = NaN: the student's loss is NaN
    config = didi.DiDiConfig(teacher="tiny", dataset_name="addition3", train_size=16, prompts_per_step=2, group_size=2,
                             max_steps=5, discriminator_warmup_steps=0, eval_steps=5, eval_samples=2, eval_nfe=2,
                             use_lora=True, lora_r=4, ema=0.0, max_nonfinite_steps=3, report_to="none",
                             output_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"DiDi: loss nan.* 3 non-finite updates"):
        didi.run(config)
    lines = _metrics(tmp_path)[1:]
    assert [m["guard/nonfinite_steps"] for m in lines] == [1, 2]
    assert all(m["discriminator_loss"] == m["discriminator_loss"] for m in lines)  # the discriminator still trains
    assert _lora_b_is_zero(tmp_path / "final")


def test_mdm_skips_nan_steps_counts_them_and_stops_at_the_limit(tmp_path, monkeypatch, caplog):
    from dlm_rl.data.sources import completion_rows
    from dlm_rl.trainers import mdm

    caplog.set_level(logging.WARNING, logger="dlm_rl.guards")
    monkeypatch.setattr(mdm, "mdm_loss", _nan_loss(mdm.mdm_loss))
    config = mdm.MDMConfig(dataset_name="addition3", train_size=64, max_steps=5, per_device_train_batch_size=4,
                           logging_steps=1, use_cpu=True, report_to="none", save_strategy="no", use_lora=True,
                           lora_r=4, max_nonfinite_steps=3, output_dir=str(tmp_path))
    model = add_lora(tiny(), config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows, length = completion_rows("addition3", None, 64, 0, None)
    trainer = mdm.MDMTrainer(model, config, rows, length)
    with pytest.raises(FloatingPointError, match=r"MDM: grad_norm nan; that is 3 non-finite updates"):
        trainer.train()
    assert [line["guard/nonfinite_steps"] for line in trainer.state.log_history] == [1, 2]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
