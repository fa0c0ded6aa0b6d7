"""Float32 master weights for a bfloat16 checkpoint: a learning rate of 5e-7 (LLaDA 1.5's) moves the weights, where
training the bfloat16 weights themselves (the control) rounds the update away; forwards still compute in bfloat16."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dlm_rl.models.precision import float32_masters
from dlm_rl.models.tiny import tiny_model
from dlm_rl.rl.didi import Discriminator


def bf16_tiny():
    return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0).to(torch.bfloat16)


def test_masters_are_float32_and_the_forward_computes_in_bfloat16():
    model = bf16_tiny()
    full = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)  # the float32 original
    assert float32_masters(model) == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.randint(0, 90, (2, 12))
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16  # computed under autocast
    reference = full(ids).logits
    finite = reference.isfinite()
    # within bfloat16's rounding of the float32 model's, and not equal to it (the compute is in 16 bits)
    error = (logits.float() - reference)[finite].abs().max().item()
    assert 0 < error < 0.05
    assert float32_masters(tiny_model(hidden_size=32, num_layers=2, intermediate_size=64)) is None  # float32 model


def test_frozen_weights_stay_bfloat16_and_float16_is_refused():
    teacher = bf16_tiny().requires_grad_(False)
    discriminator = Discriminator(teacher, trainable_blocks=1)
    float32_masters(discriminator)
    dtypes = {p.dtype for p in discriminator.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert {p.dtype for p in discriminator.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 90, (2, 12))
    logits = discriminator(ids, time=torch.tensor([0.3, 0.7]))
    logits.sum().backward()
    assert logits.dtype == torch.float32 and logits.isfinite().all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in discriminator.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="float16 checkpoint would need loss scaling"):
        float32_masters(tiny_model(hidden_size=32, num_layers=2, intermediate_size=64).to(torch.float16))


@pytest.mark.parametrize("master_weights", ["float32", "model"])
def test_an_update_of_5e_7_survives_bfloat16_full_fine_tuning(tmp_path, master_weights):
    from dlm_rl.trainers.vrpo import VRPOConfig, run

    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in pairs))
    model = bf16_tiny()
    before = copy.deepcopy(model)
    config = VRPOConfig(model="tiny", dataset_path=str(data), eval_size=2, prompts_per_step=6, max_steps=1,
                        eval_steps=1, use_lora=False, learning_rate=5e-7, n_t=2, gen_length=4, report_to="none",
                        master_weights=master_weights, output_dir=str(tmp_path / "run"))
    run(config, model=model)
    moved = total = 0
    steps = []
    for (name, old), new in zip(before.named_parameters(), model.parameters(), strict=True):
        change = (new.detach().float() - old.detach().float()).abs()
        moved += (change > 0).sum().item()
        total += change.numel()
        steps.append(change[change > 0])
    if master_weights == "float32":
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        # AdamW's first step moves every weight with a gradient by the learning rate itself
        assert moved / total > 0.9
        assert torch.cat(steps).median().item() == pytest.approx(5e-7, rel=0.01)
    else:  # the control: bfloat16 weights of ~0.02 are multiples of ~1e-4, so 5e-7 rounds away
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert moved / total < 0.02
