"""The sampler's per-step rules (threshold, factor, top-k, orderings, shifted schedule), the canvas layout,
early stop and guidance, checked against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_rl.data.collate import encode_prompt, left_pad
from dlm_rl.models import tiny_model
from dlm_rl.sampling.canvas import Canvas
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.decoding import (
    commit_factor,
    commit_threshold,
    commit_top_k,
    ordering_scores,
    ranks,
    tokens_per_step,
)
from dlm_rl.sampling.sampler import generate
from dlm_rl.sampling.trajectory import Trajectory

T, F = True, False


# --- commit rules -------------------------------------------------------------------------------------------------


def test_threshold_commits_confident_masked_positions_and_at_least_one():
    confidence = torch.tensor([[0.95, 0.5, 0.99, 0.2], [0.3, 0.6, 0.1, 0.99]], dtype=torch.float64)
    masked = torch.tensor([[T, T, F, T], [T, T, T, F]])
    commit = commit_threshold(confidence, confidence, masked, 0.9)
    # row 0: 0.95 qualifies (0.99 is already committed); row 1: nothing qualifies, the best masked one (0.6) goes
    assert commit.tolist() == [[T, F, F, F], [F, T, F, F]]


def test_factor_rule_hand_computed():
    """Sorted c = 0.99, 0.9, 0.8, 0.3; (i+1)(1-c_i) = 0.02, 0.3, 0.8, 3.5 -> factor 1 commits the first 3."""
    confidence = torch.tensor([[0.8, 0.99, 0.3, 0.9, 1.0]], dtype=torch.float64)
    masked = torch.tensor([[T, T, T, T, F]])  # the unmasked 1.0 must never count
    assert commit_factor(confidence, confidence, masked, 1.0).tolist() == [[T, T, F, T, F]]
    assert commit_factor(confidence, confidence, masked, 0.25).tolist() == [[F, T, F, F, F]]  # only the first
    assert commit_factor(confidence, confidence, masked, 4.0).tolist() == [[T, T, T, T, F]]  # all
    # the first one is committed even when it fails the rule itself
    low = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    assert commit_factor(low, low, torch.tensor([[T, T]]), 0.5).tolist() == [[F, T]]


def test_top_k_per_row_ignores_unmasked_and_breaks_ties_by_position():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    masked = torch.tensor([[T, F, T, T], [T, T, T, T]])
    assert ranks(scores, masked)[0].tolist() == [0, 3, 1, 2]
    commit = commit_top_k(scores, masked, torch.tensor([2, 3]))
    assert commit.tolist() == [[T, F, T, F], [T, T, T, F]]


def test_ordering_scores_hand_computed():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]], dtype=torch.float64)
    log_probs = torch.tensor([math.log(0.2)], dtype=torch.float64)  # the candidate drawn was token 1
    assert ordering_scores(logits, log_probs, "low_confidence").item() == pytest.approx(0.2)
    assert ordering_scores(logits, log_probs, "margin").item() == pytest.approx(0.5)
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert ordering_scores(logits, log_probs, "entropy").item() == pytest.approx(-entropy)


# --- schedule ------------------------------------------------------------------------------------------------------


def test_shifted_schedule_hand_computed():
    """alpha 3, 10 tokens, 4 steps: t = .75, .5, .25 -> t' = .9, .75, .5 -> 9, 7, 5, 0 remaining -> 1, 2, 2, 5."""
    assert tokens_per_step(10, 4, 3.0) == [1, 2, 2, 5]
    assert tokens_per_step(10, 4, 1 / 3) == [5, 3, 1, 1]  # t' = .5, .25, .1 -> 5, 2, 1, 0 remaining


@pytest.mark.parametrize("count, steps", [(32, 8), (37, 9), (8, 8), (5, 2), (100, 7)])
@pytest.mark.parametrize("shift", [0.3, 2.0, 5.0])
def test_shifted_schedule_commits_everything_at_least_one_per_step(count, steps, shift):
    counts = tokens_per_step(count, steps, shift)
    even = tokens_per_step(count, steps)
    assert len(counts) == steps and sum(counts) == count and min(counts) >= 1
    if shift > 1:  # back-loaded
        assert counts[0] <= even[0] and counts[-1] >= even[-1]
    else:
        assert counts[0] >= even[0] and counts[-1] <= even[-1]


# --- canvas ---------------------------------------------------------------------------------------------------------


def _prompts(lengths):
    tokenizer = tiny_model(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32).tokenizer
    return left_pad([encode_prompt(tokenizer, "7" * n) for n in lengths], tokenizer.pad_token_id)


def test_canvas_response_alignment():
    ids, mask = _prompts([5, 2, 3])
    canvas = Canvas.build(ids, mask, 8, 4, 2, align_positions=False)
    assert canvas.ids.shape == (3, 13) and canvas.first_col == 5 and canvas.num_blocks == 2
    assert canvas.block_offset.tolist() == [0, 0, 0]
    assert torch.equal(canvas.response_cols, torch.arange(5, 13).expand(3, -1))
    assert torch.equal(canvas.prompt[:, :5], mask.bool()) and torch.equal(canvas.ids[canvas.prompt], ids[mask.bool()])
    assert (canvas.ids[:, 5:] == 2).all() and canvas.response[:, 5:].all() and not canvas.response[:, :5].any()


def test_canvas_position_alignment():
    """Block models: columns agree with positions modulo the block, so blocks are shared column ranges."""
    lengths = [7, 2, 4, 9]
    ids, mask = _prompts(lengths)
    canvas = Canvas.build(ids, mask, 8, 4, 2, align_positions=True)
    width = canvas.ids.shape[1]
    assert width % 4 == 0 and canvas.first_col % 4 == 0
    for row, n in enumerate(lengths):
        pad = int((~canvas.valid[row]).long().cumprod(0).sum())  # leading padding
        assert pad % 4 == 0
        cols = canvas.response_cols[row]
        assert canvas.positions[row, cols].tolist() == list(range(n, n + 8))
        assert canvas.ids[row, pad : pad + n].tolist() == ids[row, -n:].tolist()
        assert canvas.prompt[row].sum() == n and canvas.response[row].sum() == 8
        assert (cols % 4 == canvas.positions[row, cols] % 4).all()
    assert canvas.block_offset.tolist() == [n % 4 for n in lengths]
    assert canvas.first_col + 4 * canvas.num_blocks == width


def test_steps_per_block_counts_only_blocks_decoded():
    trajectory = Trajectory(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long),
        prompt_mask=torch.ones(2, 1, dtype=torch.long),
        response_ids=torch.zeros(2, 8, dtype=torch.long),
        step_map=torch.zeros(2, 8, dtype=torch.long),
        log_probs=torch.zeros(2, 8),
        sampled=torch.tensor([[T] * 8, [T, T, T, F, F, F, F, F]]),
        nfe=torch.tensor([6, 3]),
        block_length=4,
        block_offset=torch.tensor([0, 2]),
        finish_reason=["length", "eos"],
    )
    # row 0: blocks 0-1 -> 6 / 2; row 1: tokens 0-2 at offsets 2-4 span blocks 0-1 -> 3 / 2
    assert trajectory.steps_per_block.tolist() == [3.0, 1.5]


# --- early stop and guidance --------------------------------------------------------------------------------------


def _eos_leaning_model():
    model = tiny_model(seed=0).eval()
    eos = model.tokenizer.eos_token_id

    def favour_eos(module, inputs, output):
        output.logits[..., eos] += 4.0
        return output

    model.model.register_forward_hook(favour_eos)
    return model


@pytest.mark.parametrize("decoding", [dict(), dict(threshold=0.5), dict(block_length=4, steps=8)])
def test_early_stop_never_changes_the_text_and_marks_fills(decoding):
    model = _eos_leaning_model()
    eos = model.tokenizer.eos_token_id
    ids, mask = left_pad([encode_prompt(model.tokenizer, p) for p in ["1+2=", "33+4=", "9", "12+57+33="]], 0)
    stopped = generate(model, ids, mask, SamplerConfig(gen_length=16, **decoding))
    full = generate(model, ids, mask, SamplerConfig(gen_length=16, early_stop=False, **decoding))
    filled = ~stopped.sampled
    assert filled.any(), "no row stopped early; the test would be vacuous"
    for a, b in zip(stopped.response_ids.tolist(), full.response_ids.tolist()):
        assert a[: a.index(eos)] == b[: b.index(eos)]
    assert (stopped.nfe <= full.nfe).all() and (stopped.nfe < full.nfe).any()
    assert (stopped.response_ids[filled] == eos).all() and stopped.log_probs[filled].isnan().all()
    last_step = (stopped.nfe - 1)[:, None].expand_as(filled)
    assert torch.equal(stopped.step_map[filled], last_step[filled])
    assert stopped.finish_reason == ["eos"] * 4


def test_guidance_records_the_unguided_policy_log_probs():
    model = tiny_model(seed=0).eval()
    ids, mask = left_pad([encode_prompt(model.tokenizer, p) for p in ["1+2=", "33+4="]], 0)
    config = dict(gen_length=8, early_stop=False)
    plain = generate(model, ids, mask, SamplerConfig(**config))
    assert torch.equal(generate(model, ids, mask, SamplerConfig(cfg_scale=0.0, **config)).response_ids,
                       plain.response_ids)
    guided = generate(model, ids, mask, SamplerConfig(cfg_scale=2.0, **config))
    first = guided.step_map == 0  # state: prompt + all masks
    state = torch.cat([ids, torch.full((2, 8), model.mask_token_id)], dim=1)
    attention = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        log_probs = model(state, attention).logits[:, -8:].double().log_softmax(-1)
    expected = log_probs.gather(-1, guided.response_ids[..., None]).squeeze(-1).float()
    torch.testing.assert_close(guided.log_probs[first], expected[first], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(factor=0.0), "factor must be positive"),
        (dict(threshold=0.9, factor=1.0), "set threshold or factor, not both"),
        (dict(threshold=0.9, remasking="random"), "cannot use remasking='random'"),
        (dict(cache="full"), "cache must be one of"),
        (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
        (dict(cfg_scale=1.0, cache="dual"), "classifier-free guidance is implemented without KV caches"),
        (dict(schedule_shift=0.0), "schedule_shift must be positive"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(gen_length=8, **kwargs)


def test_nan_logits_fail_loudly_instead_of_sampling_garbage():
    model = tiny_model(seed=0).eval()

    def poison(module, inputs, output):
        output.logits[1] = float("nan")
        return output

    model.model.register_forward_hook(poison)
    ids, mask = left_pad([encode_prompt(model.tokenizer, p) for p in ["1+2=", "33+4="]], 0)
    with pytest.raises(RuntimeError, match=r"NaN logits for rows \[1\]"):
        generate(model, ids, mask, SamplerConfig(gen_length=8))
