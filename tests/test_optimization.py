"""The learning-rate schedule and gradient checkpointing of the custom-loop trainers
(`dlm_rl.trainers.optimization`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlm_rl.models import tiny_model
from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.trainers.optimization import enable_gradient_checkpointing
from dlm_rl.trainers.tracerl import TraceRLConfig, run

SETTINGS = dict(model="tiny", gen_length=4, num_generations=2, prompts_per_step=2, eval_size=2, eval_steps=100,
                report_to="none", learning_rate=1e-2)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [1e-2] * 4),
    ("constant", 2, [0.0, 5e-3, 1e-2, 1e-2]),  # a warmup makes it constant_with_warmup
    ("linear", 0, [1e-2, 7.5e-3, 5e-3, 2.5e-3]),
    ("cosine", 1, [0.0, 1e-2, 1e-2 * (1 + math.cos(math.pi / 3)) / 2, 1e-2 * (1 + math.cos(2 * math.pi / 3)) / 2]),
])
def test_the_learning_rate_follows_its_schedule_step_by_step(tmp_path, schedule, warmup, expected):
    run(TraceRLConfig(output_dir=str(tmp_path), max_steps=4, lr_scheduler_type=schedule, warmup_steps=warmup,
                      **SETTINGS))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    assert [line["learning_rate"] for line in lines] == pytest.approx(expected)


@pytest.mark.parametrize("keys, message", [
    (dict(lr_scheduler_type="exponential"), "lr_scheduler_type must be one of"),
    (dict(warmup_ratio=1.5), "warmup_ratio must be in"),
    (dict(warmup_ratio=float("nan")), "warmup_ratio must be in"),
    (dict(warmup_steps=-1), "warmup_steps must be a whole number"),
])
def test_bad_schedule_settings_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        TraceRLConfig(**keys)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = tiny_model(seed=0)
        add_lora(model, LoraArguments(use_lora=True, lora_r=4))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        ids = torch.randint(0, 90, (2, 24))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids, torch.ones_like(ids)).logits.float().logsumexp(-1).mean()
        loss.backward()
        trained = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return trained, sum(saved)

    plain, plain_saved = gradients(False)
    checkpointed, checkpointed_saved = gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    assert checkpointed_saved < plain_saved / 2
