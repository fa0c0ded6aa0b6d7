"""Training rows beyond plain trace rows: the packed `[prompt ; clean ; noisy]` layout of block-attention models
(hand-made traces, its attention mask, and exact replay of a sampled block-model trajectory), the baselines'
random masks, and the value model's GAE on rows."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_rl.models.tiny import tiny_model
from dlm_rl.rl.losses import sequence_elbo
from dlm_rl.rl.masking import (
    MASK_HIGH,
    MASK_LOW,
    block_mask_rows,
    diffu_grpo_rows,
    elbo_draw_rows,
    quadrature_rows,
    random_mask_rows,
    spread_mask_rows,
)
from dlm_rl.diffusion.packed import packed_block_bias
from dlm_rl.rl.rows import response_log_probs
from dlm_rl.rl.trace import model_trace_rows, packed_trace_rows, trace_rows
from dlm_rl.rl.value import ValueModel, trace_gae
from dlm_rl.rollout import LocalEngine
from dlm_rl.sampling import SamplerConfig
from dlm_rl.sampling.trajectory import Trajectory

M, PAD, EOS, BLOCK = 99, 0, 2, 4


def block_trajectory() -> Trajectory:
    """Block size 4, response length 6. Sample 0: prompt of 3, so response tokens sit in blocks 0 | 1 1 1 1 | 2;
    steps 0 | 1 1 2 3 | 4. Sample 1: prompt of 2 (one pad), blocks 0 0 | 1 1 1 1; steps 1 0 | 2 2 3 3, where
    token 4 is a drawn EOS and token 5 an early-stop fill."""
    return Trajectory(
        prompt_ids=torch.tensor([[11, 12, 13], [PAD, 21, 22]]),
        prompt_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
        response_ids=torch.tensor([[30, 31, 32, 33, 34, 35], [40, 41, 42, 43, EOS, EOS]]),
        step_map=torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 2, 3, 3]]),
        log_probs=torch.zeros(2, 6),
        sampled=torch.tensor([[True] * 6, [True] * 5 + [False]]),
        nfe=torch.tensor([5, 4]),
        block_length=BLOCK,
        block_offset=torch.tensor([3, 2]),
        finish_reason=["length", "eos"],
    )


def test_packed_rows_hold_one_state_of_every_block():
    rows = packed_trace_rows(block_trajectory(), M, BLOCK, s=1)
    assert rows.sample.tolist() == [0, 0, 0, 1, 1]  # the busiest block of sample 0 has 3 steps, of sample 1, 2
    copies = rows.input_ids[:, -6:].tolist()
    assert copies == [
        [M, M, M, M, M, M],  # every block at its first step
        [30, 31, 32, M, M, 35],  # block 1 at its second step; blocks 0 and 2 are done (no targets)
        [30, 31, 32, 33, M, 35],
        [M, M, M, M, M, M],
        [M, 41, 42, 43, M, M],  # block 0 second step; block 1 at step 3 masks the drawn EOS and the fill
    ]
    assert rows.targets.int().tolist() == [
        [1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0],
        [0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 1, 0],  # the fill is never a target
    ]
    # prompt, clean response, then the copy: one pad, the prompt tail sharing block 0, the noisy response
    assert rows.input_ids[3, :12].tolist() == [PAD, 21, 22, 40, 41, 42, 43, EOS, EOS, PAD, 21, 22]
    assert rows.position_ids[3].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert rows.noisy[3].int().tolist() == [0] * 9 + [1] * 9
    assert rows.attention_mask[3].tolist() == [0] + [1] * 8 + [0] + [1] * 8
    assert rows.input_ids[0, 9:12].tolist() == [11, 12, 13]  # sample 0: the whole prompt shares block 0


def test_packed_rows_shrink_within_each_block():
    rows = packed_trace_rows(block_trajectory(), M, BLOCK, s=2)
    assert rows.sample.tolist() == [0, 0, 1]  # block 1 of sample 0: steps {1, 2} then {3}
    assert rows.input_ids[0, -6:].tolist() == [M] * 6
    assert rows.targets[0].int().tolist() == [1, 1, 1, 1, 0, 1]
    assert rows.input_ids[1, -6:].tolist() == [30, 31, 32, 33, M, 35]
    assert rows.targets[1].int().tolist() == [0] * 4 + [1, 0]
    assert rows.targets[2].int().tolist() == [1, 1, 1, 1, 1, 0]  # sample 1: each block's two steps merge


def test_packed_attention_mask():
    rows = packed_trace_rows(block_trajectory(), M, BLOCK, s=1)
    bias = packed_block_bias(rows.position_ids, rows.attention_mask, rows.noisy, BLOCK, torch.float32)
    seen = (bias[0, 0] == 0).int()  # sample 0: columns 0-2 prompt, 3-8 clean response, 9-11 prompt copy, 12-17
    # noisy token 0 (column 12, position 3) shares block 0 with the prompt: it sees the prompt's copy, not the
    # clean prompt (whose states saw the clean token 0)
    assert seen[12].tolist() == [0] * 9 + [1, 1, 1, 1, 0, 0, 0, 0, 0]
    # noisy token 1 (column 13, position 4, block 1) sees the clean block 0 (positions 0-3) and its noisy block
    assert seen[13].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0] + [0, 0, 0, 0, 1, 1, 1, 1, 0]
    # clean token 1 (column 4) sees clean blocks 0 and 1, never the copy
    assert seen[4].tolist() == [1] * 8 + [0] + [0] * 9
    # noisy token 5 (column 17, block 2) sees clean blocks 0-1 and only itself among the copy
    assert seen[17].tolist() == [1] * 8 + [0] + [0] * 8 + [1]
    padded = (bias[3, 0] == 0).int()
    assert padded[5, 0] == 0 and padded[5, 9] == 0 and padded[0].all()  # pads are never keys; pad queries see all


def test_packed_rows_need_the_samplers_blocks():
    with pytest.raises(ValueError, match="training blocks must be the sampler's"):
        packed_trace_rows(block_trajectory(), M, 8)


@pytest.mark.parametrize("s", [1, 2])
def test_packed_rows_of_a_sampled_block_model_trajectory_replay_its_log_probs(s):
    """A block-attention model: every drawn token is a target once; with s = 1 the packed rows reproduce the
    sampler's log-probs and equal the plain rows' (one row per step); a sample needs at most block/s rows."""
    model = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, attention="block", block_size=4,
                       seed=1).eval()
    config = SamplerConfig(gen_length=12, temperature=1.0, threshold=0.3)
    (trajectory,) = LocalEngine(model, rows_per_chunk=8).generate(["1+2=", "33+4=", "5="], 2, config)
    packed = model_trace_rows(trajectory, model, s)
    assert packed.noisy is not None
    assert packed.targets.sum() == trajectory.trainable.sum()
    assert torch.bincount(packed.sample).max() <= math.ceil(4 / s)
    if s > 1:
        return
    plain = trace_rows(trajectory, model.mask_token_id, s=1)
    with torch.no_grad():
        packed_logp, plain_logp = response_log_probs(model, packed), response_log_probs(model, plain)
    recorded = trajectory.log_probs
    assert (packed_logp - recorded[packed.sample])[packed.targets].abs().max() <= 1e-5
    assert (plain_logp - recorded[plain.sample])[plain.targets].abs().max() <= 1e-5
    assert len(packed) < len(plain)


def test_diffu_grpo_rows_mask_the_whole_response_and_some_prompt_tokens():
    trajectory = block_trajectory()
    trajectory.prompt_ids = trajectory.prompt_ids.repeat(1, 200)
    trajectory.prompt_mask = trajectory.prompt_mask.repeat(1, 200)
    rows = diffu_grpo_rows(trajectory, M, torch.Generator().manual_seed(0))
    prompt = rows.input_ids[:, :600]
    assert rows.input_ids[:, 600:].eq(M).all() and torch.equal(rows.targets, trajectory.sampled)
    masked = prompt.eq(M) & trajectory.prompt_mask.bool()
    assert 0.10 < masked.sum() / trajectory.prompt_mask.sum() < 0.20
    assert not (prompt.eq(M) & ~trajectory.prompt_mask.bool()).any()  # padding is never masked
    again = diffu_grpo_rows(trajectory, M, torch.Generator().manual_seed(0))
    assert torch.equal(again.input_ids, rows.input_ids)


@pytest.mark.parametrize("coupled", [False, True])
def test_random_mask_rows(coupled):
    trajectory = block_trajectory()
    rows = random_mask_rows(trajectory, M, torch.Generator().manual_seed(3), coupled=coupled)
    assert len(rows) == (4 if coupled else 2)
    states = rows.input_ids[:, 3:]
    assert torch.equal(rows.targets, states.eq(M) & trajectory.sampled[rows.sample])
    t = 1 / rows.weight[:2]
    assert ((t >= MASK_LOW) & (t <= MASK_HIGH)).all()
    if coupled:  # the complement: every drawn token is scored exactly once, with weight 1/(1 - t)
        assert torch.equal(rows.targets[:2] | rows.targets[2:], trajectory.sampled)
        assert not (rows.targets[:2] & rows.targets[2:]).any()
        assert torch.allclose(rows.weight[2:], 1 / (1 - t))


def test_espo_rows_mask_spread_counts_and_their_complements():
    trajectory = block_trajectory()
    many = Trajectory(**{**vars(trajectory), **{name: getattr(trajectory, name).repeat(7, 1) for name in (
        "prompt_ids", "prompt_mask", "response_ids", "step_map", "log_probs", "sampled")},
        "nfe": trajectory.nfe.repeat(7), "block_offset": trajectory.block_offset.repeat(7),
        "finish_reason": trajectory.finish_reason * 7})
    length, n = 6, 14
    rows = spread_mask_rows(many, M, torch.Generator().manual_seed(5))
    assert len(rows) == 2 * n and rows.sample.tolist() == list(range(n)) * 2
    masked, complement = rows.input_ids[:n, 3:].eq(M), rows.input_ids[n:, 3:].eq(M)
    assert torch.equal(masked, ~complement)  # every token is masked in exactly one of a response's two rows
    counts = masked.sum(1)
    start = int(counts[0])  # x_i = round(k + i (L + 1) / n) mod (L + 1): the batch's counts spread over 0..L
    expected = [round(start + i * (length + 1) / n) % (length + 1) for i in range(n)]
    assert counts.tolist() == expected and len(set(expected)) == length + 1
    assert torch.equal(rows.targets, torch.cat([masked, complement]) & many.sampled[rows.sample])
    x = counts.float()
    assert torch.allclose(rows.weight[:n][x > 0], (length + 1) / (2 * x[x > 0]))
    assert torch.allclose(rows.weight[n:][x < length], (length + 1) / (2 * (length - x[x < length])))


def test_gdpo_rows_take_the_elbos_integral_at_three_gauss_legendre_nodes():
    trajectory = block_trajectory()
    rows = quadrature_rows(trajectory, M, torch.Generator().manual_seed(0))
    assert len(rows) == 6 and rows.sample.tolist() == [0, 1] * 3
    nodes = [0.5 - math.sqrt(15) / 10, 0.5, 0.5 + math.sqrt(15) / 10]  # on [0, 1], weights 5/18, 8/18, 5/18
    weights = [5 / 18, 8 / 18, 5 / 18]
    assert rows.weight.tolist() == pytest.approx([w / t for w, t in zip(weights, nodes) for _ in range(2)])
    assert torch.equal(rows.targets, rows.input_ids[:, 3:].eq(M) & trajectory.sampled[rows.sample])
    # with every log-prob equal to c, the estimate's mean is Σ_k w_k/t_k · t_k · (drawn tokens) · c = drawn · c
    generator, c = torch.Generator().manual_seed(1), -0.7
    estimates = torch.stack([
        sequence_elbo(torch.full(r.targets.shape, c), r.targets, r.weight, r.sample, 2)
        for r in (quadrature_rows(trajectory, M, generator) for _ in range(4000))])
    assert estimates.mean(0).tolist() == pytest.approx((trajectory.sampled.sum(1) * c).tolist(), rel=0.02)


def test_spg_rows_keep_earlier_blocks_clean_mask_part_of_one_block_and_all_later_ones():
    trajectory = block_trajectory()  # blocks of 4: sample 0 (offset 3) 0 | 1 1 1 1 | 2; sample 1 0 0 | 1 1 1 1
    trajectory.prompt_ids = trajectory.prompt_ids.repeat(1, 100)
    trajectory.prompt_mask = trajectory.prompt_mask.repeat(1, 100)
    generator = torch.Generator().manual_seed(0)
    block = (trajectory.block_offset[:, None] + torch.arange(6)) // BLOCK
    span = torch.tensor([6, 5])  # sample 1's last trainable token is its EOS at position 4
    picked, prompt_masked = set(), []
    for _ in range(50):
        rows = block_mask_rows(trajectory, M, generator, draws=2)
        assert len(rows) == 4 and rows.sample.tolist() == [0, 1, 0, 1]
        assert rows.weight.tolist() == span.float().repeat(2).tolist()
        masked = rows.input_ids[:, -6:].eq(M)
        assert torch.equal(rows.targets, masked & trajectory.trainable[rows.sample])
        for row in range(4):
            i = int(rows.sample[row])
            chosen = int(block[i][masked[row] & (torch.arange(6) < span[i])].min())  # the first block with a mask
            picked.add((i, chosen))
            inside = (block[i] == chosen) & (torch.arange(6) < span[i])
            assert not masked[row][block[i] < chosen].any()  # earlier blocks clean
            assert 1 <= int(masked[row][inside].sum()) <= int(inside.sum())
            assert masked[row][(block[i] > chosen) | (torch.arange(6) >= span[i])].all()  # later blocks, after the span
        prompt = rows.input_ids[:, :-6]
        prompt_masked.append(float(prompt.eq(M).sum() / trajectory.prompt_mask.sum() / 2))
    assert picked == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}  # every block of each span gets picked
    assert 0.12 < sum(prompt_masked) / len(prompt_masked) < 0.18


def test_bgpo_rows_are_draws_of_the_elbos_tokens_form_estimator():
    trajectory = block_trajectory()
    rows = elbo_draw_rows(trajectory, M, torch.Generator().manual_seed(0), draws=5)
    assert len(rows) == 10 and rows.sample.tolist() == [0, 1] * 5
    masked = rows.input_ids[:, -6:].eq(M)
    count = masked.sum(1)
    assert (count >= 1).all() and (count <= 6).all()  # ℓ ~ U{1..L} of the L = 6 canvas tokens
    assert torch.allclose(rows.weight, 6 / count.float())  # weight L/ℓ
    assert torch.equal(rows.targets, masked & trajectory.trainable[rows.sample])


def test_value_model_starts_at_zero_and_gae_gives_reward_minus_value():
    model = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)
    value = ValueModel.from_policy(model)
    rows = trace_rows(block_trajectory(), model.mask_token_id, s=1)
    with torch.no_grad():
        assert value(rows).abs().max() == 0
    values = torch.randn(rows.targets.shape)
    rewards = torch.tensor([1.0, -0.5])
    advantages = trace_gae(rows, values, rewards, gamma=1.0, lam=1.0)
    expected = (rewards[rows.sample][:, None] - values) * rows.targets
    assert torch.allclose(advantages, expected, atol=1e-6)
