"""TraceRL's building blocks: trace → rows on hand-made and sampled trajectories, the PPO-clip loss against a
hand computation, group advantages with the zero-variance filter, and step-level GAE."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_rl.models.tiny import tiny_model
from dlm_rl.rl.advantages import (
    centred_advantages,
    group_advantages,
    leave_one_out_advantages,
    step_gae,
    wd1_weights,
)
from dlm_rl.rl.losses import (
    bounded_ratio_loss,
    k3_kl,
    ppo_trace_loss,
    sandwiched_log_likelihood,
    sequence_elbo,
    sequence_ppo_loss,
    weighted_likelihood_loss,
)
from dlm_rl.rl.rows import response_log_probs
from dlm_rl.rl.trace import shrink_steps, trace_rows
from dlm_rl.rollout import LocalEngine
from dlm_rl.sampling import SamplerConfig
from dlm_rl.sampling.trajectory import Trajectory

M, PAD, EOS = 99, 0, 2


def hand_trajectory() -> Trajectory:
    """Two samples, response length 5. Sample 0: steps 0,0,1,2,3 (token 4 is EOS drawn at step 3). Sample 1 has a
    padded prompt and stopped early: EOS drawn at step 1, tokens 3-4 filled with EOS (not drawn) at step 1."""
    return Trajectory(
        prompt_ids=torch.tensor([[11, 12, 13], [PAD, 21, 22]]),
        prompt_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
        response_ids=torch.tensor([[31, 32, 33, 34, EOS], [41, 42, EOS, EOS, EOS]]),
        step_map=torch.tensor([[0, 0, 1, 2, 3], [1, 0, 1, 1, 1]]),
        log_probs=torch.tensor([[-0.1, -0.2, -0.3, -0.4, -0.5], [-0.6, -0.7, -0.8, math.nan, math.nan]]),
        sampled=torch.tensor([[True] * 5, [True, True, True, False, False]]),
        nfe=torch.tensor([4, 2]),
        block_length=5,
        block_offset=torch.tensor([0, 0]),
        finish_reason=["eos", "eos"],
    )


def test_shrink_merges_every_s_distinct_steps_into_the_last_one():
    steps = torch.tensor([[0, 0, 1, 2, 3, 3, 4], [5, 5, 5, 7, 9, 9, 9]])
    assert torch.equal(shrink_steps(steps, 1), steps)
    assert shrink_steps(steps, 2).tolist() == [[1, 1, 1, 3, 3, 3, 4], [7, 7, 7, 7, 9, 9, 9]]
    assert shrink_steps(steps, 3).tolist() == [[2, 2, 2, 2, 4, 4, 4], [9, 9, 9, 9, 9, 9, 9]]
    with pytest.raises(ValueError, match="at least 1"):
        shrink_steps(steps, 0)


def test_trace_rows_s1_rebuild_each_visited_state():
    rows = trace_rows(hand_trajectory(), M, s=1)
    assert rows.sample.tolist() == [0, 0, 0, 0, 1, 1] and rows.step.tolist() == [0, 1, 2, 3, 0, 1]
    assert rows.input_ids.tolist() == [
        [11, 12, 13, M, M, M, M, M],
        [11, 12, 13, 31, 32, M, M, M],
        [11, 12, 13, 31, 32, 33, M, M],
        [11, 12, 13, 31, 32, 33, 34, M],
        [PAD, 21, 22, M, M, M, M, M],
        [PAD, 21, 22, M, 42, M, M, M],  # the fills (step 1) are masked in the state before them
    ]
    assert rows.targets.int().tolist() == [
        [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1],  # the drawn EOS is a target
        [0, 1, 0, 0, 0], [1, 0, 1, 0, 0],  # fills are never targets
    ]
    assert rows.attention_mask[4].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert torch.equal(rows.response_ids[5], hand_trajectory().response_ids[1])


def test_trace_rows_s2_merge_steps():
    rows = trace_rows(hand_trajectory(), M, s=2)
    assert rows.sample.tolist() == [0, 0, 1] and rows.step.tolist() == [1, 3, 1]
    assert rows.input_ids[0, 3:].tolist() == [M] * 5 and rows.targets[0].int().tolist() == [1, 1, 1, 0, 0]
    assert rows.input_ids[1, 3:].tolist() == [31, 32, 33, M, M] and rows.targets[1].int().tolist() == [0, 0, 0, 1, 1]
    assert rows.input_ids[2, 3:].tolist() == [M] * 5 and rows.targets[2].int().tolist() == [1, 1, 1, 0, 0]


def test_rows_of_a_sampled_trajectory_replay_its_log_probs():
    """s = 1 rows are exactly the sampler's states: recomputed log-probs equal the recorded ones."""
    model = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0).eval()
    config = SamplerConfig(gen_length=16, block_length=16, temperature=1.0, threshold=0.5)
    (trajectory,) = LocalEngine(model, rows_per_chunk=8).generate(["1+2=", "33+4=", "5="], 2, config)
    rows = trace_rows(trajectory, model.mask_token_id, s=1)
    with torch.no_grad():
        logp = response_log_probs(model, rows).double()
    recorded = trajectory.log_probs[rows.sample].double()
    assert rows.targets.sum() == trajectory.trainable.sum()  # every drawn token up to EOS is trained exactly once
    assert (logp - recorded)[rows.targets].abs().max() <= 1e-5


def test_ppo_loss_matches_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -1.9, 0.0], [-0.1, 0.0, 0.0]])
    targets = torch.tensor([[True, True, False], [True, False, False]])
    advantages = torch.tensor([[1.0], [-2.0]])
    loss, stats = ppo_trace_loss(logp, old, advantages, targets, epsilon=0.2, beta=0.1)
    r = [math.exp(0.5), math.exp(-0.1), math.exp(-0.4)]
    row0 = (min(r[0] * 1, 1.2 * 1) + min(r[1] * 1, r[1] * 1)) / 2
    row1 = min(r[2] * -2, 0.8 * -2) / 1
    k3 = [math.exp(-d) + d - 1 for d in (0.5, -0.1, -0.4)]  # log(π_old/π) = -(logp - old)
    kl = ((k3[0] + k3[1]) / 2 + k3[2]) / 2
    assert loss.item() == pytest.approx(-(row0 + row1) / 2 + 0.1 * kl, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    constant, _ = ppo_trace_loss(logp, old, advantages, targets, epsilon=0.2, beta=0.1, normaliser=4)
    expected = -(row0 * 2 / 4 + row1 / 4) / 2 + 0.1 * ((k3[0] + k3[1]) / 4 + k3[2] / 4) / 2
    assert constant.item() == pytest.approx(expected)


def test_before_the_first_update_ratio_is_one_and_kl_zero():
    logp = torch.randn(4, 6, requires_grad=True)
    targets = torch.rand(4, 6) > 0.3
    loss, stats = ppo_trace_loss(logp, logp.detach(), torch.randn(4, 1), targets, beta=0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["kl"] == 0.0 and stats["clip_fraction"] == 0.0
    loss.backward()  # gradients flow through the current log-probs only
    assert logp.grad is not None and logp.grad[~targets].abs().max() == 0
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0


def test_group_advantages_z_score_and_drop_groups_without_variance():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    advantages, keep = group_advantages(rewards, groups)
    assert keep.tolist() == [True] * 4 + [False] * 4
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std(correction=0).item()  # population std: 0.5
    assert advantages[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, 0.5 / std, -0.5 / std], rel=1e-5)
    assert advantages[4:].tolist() == [0.0] * 4
    _, none_kept = group_advantages(torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert not none_kept.any()  # an all-filtered batch: the trainer skips it


def test_wd1_weights_are_the_group_softmax_of_centred_rewards_minus_that_of_their_negation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    weights, keep = wd1_weights(rewards, groups)
    centred = [2 / 3, -1 / 3, -1 / 3]  # group 0: mean 1/3
    plus = [math.exp(a) / sum(math.exp(b) for b in centred) for a in centred]
    minus = [math.exp(-a) / sum(math.exp(-b) for b in centred) for a in centred]
    assert weights[:3].tolist() == pytest.approx([3 * (p - m) for p, m in zip(plus, minus)])
    assert weights[0] > 0 > weights[1] and abs(float(weights[:3].sum())) < 1e-12  # the group's weights sum to 0
    assert keep.tolist() == [True] * 3 + [False] * 4 and weights[3:].abs().max() == 0  # no variance: no signal


def test_wd1_loss_weighs_each_rows_summed_log_likelihood():
    logp = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    targets = torch.tensor([[True, True, False], [True, False, False]])  # up to the first EOS
    weights = torch.tensor([0.8, -0.4])
    loss, stats = weighted_likelihood_loss(logp, weights[:, None], targets)
    assert loss.item() == pytest.approx(-(0.8 * -3.0 + -0.4 * -0.5) / 2)
    assert stats["log_likelihood"] == pytest.approx((-3.0 - 0.5) / 2)
    loss.backward()  # no length normaliser: every trained token of a row gets the row's weight / N
    assert logp.grad.flatten().tolist() == pytest.approx([-0.4, -0.4, 0.0, 0.2, 0.0, 0.0])


def test_espo_and_gdpo_advantages_are_differences_of_rewards_without_a_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    advantages, keep = leave_one_out_advantages(rewards, groups)
    assert advantages.tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0, 0])  # no std
    assert keep.tolist() == [True] * 4 + [False] * 2
    centred, kept = centred_advantages(rewards, groups)  # GDPO: minus the group's own mean, no std
    assert centred.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0]) and torch.equal(kept, keep)


def test_sequence_elbo_sums_each_samples_weighted_rows():
    logp = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.25, -8.0], [-3.0, -1.0, -1.0]])
    targets = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    elbo = sequence_elbo(logp, targets, torch.tensor([2.0, 4.0, 0.5]), torch.tensor([1, 1, 0]), 2)
    assert elbo.tolist() == pytest.approx([0.5 * -5.0, 2.0 * -5.0 + 4.0 * -0.25])


def test_sequence_ppo_loss_matches_a_hand_computation():
    elbo = torch.tensor([-10.0, -20.0, -6.0], requires_grad=True)
    old, reference = torch.tensor([-12.0, -19.0, -6.0]), torch.tensor([-11.0, -20.0, -7.0])
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, stats = sequence_ppo_loss(elbo, old, advantages, 4, epsilon=0.2, beta=0.1, elbo_ref=reference)
    ratios = [math.exp(2 / 4), math.exp(-1 / 4), 1.0]  # per token of the canvas: exp((ℓ − ℓ_old) / L)
    surrogate = [min(ratios[0] * 1.0, 1.2 * 1.0), min(ratios[1] * -0.5, 0.8 * -0.5), 2.0]
    kl = [1 ** 2 / 8, 0.0, 1 ** 2 / 8]  # k2: (ℓ − ℓ_ref)² / (2L)
    assert loss.item() == pytest.approx(-sum(surrogate) / 3 + 0.1 * sum(kl) / 3)
    assert stats["clip_fraction"] == pytest.approx(2 / 3) and stats["kl"] == pytest.approx(sum(kl) / 3)
    loss.backward()  # the clipped ratios give no gradient; the unclipped one gives A ρ / L, and the KL its share
    assert elbo.grad.tolist() == pytest.approx([-0 / 3 + 0.1 * (1 / 4) / 3, 0.0, -2.0 / 4 / 3 + 0.1 * (1 / 4) / 3])


def test_spg_bounds_match_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5], [-0.2, -0.4, -9.0]])
    targets = torch.tensor([[True, True, False], [False, True, True], [True, False, False]])
    sample, lengths = torch.tensor([0, 0, 1]), torch.tensor([3.0, 2.0])
    beta, mix = 1.5, 0.5
    elbo = [((-1 - 2) / 2 + (-1.5 - 2.5) / 2) / 2, -0.2]  # the mean over rows of each row's mean log p
    t = 2 / 3  # both of sample 0's rows mask 2 of its 3 tokens
    averages = [math.exp(-beta) / t / 2, (math.exp(-2 * beta) + math.exp(-1.5 * beta)) / t / 2,
                math.exp(-2.5 * beta) / t / 2]  # per token, the mean over the 2 rows of 1{target} p^β / t
    eubo = sum(math.log(a) for a in averages) / 3 / beta
    both = sandwiched_log_likelihood(logp, targets, sample, lengths, torch.tensor([False, True]), beta=beta, mix=mix)
    assert both.tolist() == pytest.approx([mix * eubo + (1 - mix) * elbo[0], elbo[1]])  # negative: the mix
    upper = sandwiched_log_likelihood(logp, targets, sample, lengths, torch.tensor([False, False]), beta=beta, mix=1.0)
    assert upper.tolist() == pytest.approx([eubo, -0.2 + math.log(2) / beta])  # one row masking 1 of 2: t = 1/2


def test_bgpo_bound_matches_a_hand_computation_and_the_ratio_objective_on_policy():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0], [-1.5, -1.0]])
    old = torch.tensor([[-1.2, -2.0], [-0.5, -2.0], [-1.0, -9.0]])
    targets = torch.tensor([[True, True], [True, True], [True, False]])
    weights = torch.tensor([2.0, 1.0, 4.0])
    advantages = torch.tensor([1.5, -0.5, -2.0])
    loss, stats = bounded_ratio_loss(logp, old, advantages, targets, weights)
    x = [2.0 * 0.2, 1.0 * -1.0, 4.0 * -0.5]  # each row: x = w · Σ_targets (log p − log p_old)
    bounds = [1.5 * (1 + x[0]), -0.5 * math.exp(x[1]), -2.0 * math.exp(x[2])]  # A ≥ 0: A(1 + x); A < 0: A e^x
    assert loss.item() == pytest.approx(-sum(bounds) / 3)
    assert stats["ratio_mean"] == pytest.approx(sum(math.exp(v) for v in x) / 3)
    # On policy, value and gradient equal those of −A · exp(mean over a response's draws of x), for either sign of A
    for sign in (1.0, -1.0):
        logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0], [-1.5, -1.0]], requires_grad=True)
        bound, _ = bounded_ratio_loss(logp, logp.detach(), torch.full((3,), sign), targets, weights)
        bound.backward()
        gradient, logp.grad = logp.grad, None
        x = (weights * torch.where(targets, logp - logp.detach(), torch.zeros_like(logp)).sum(1))
        ratio = -(sign * torch.exp(x.mean()))  # the three rows are three draws of one response
        ratio.backward()
        assert bound.item() == pytest.approx(ratio.item()) and torch.allclose(gradient, logp.grad)


def test_gae_with_gamma_lambda_one_reduces_to_reward_minus_value():
    token_step = torch.tensor([0, 0, 1, 2, 2, 3])
    token_values = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.9, 0.4], dtype=torch.float64)
    step_values = torch.tensor([0.05, 0.5, 0.5, 0.4], dtype=torch.float64)
    step_rewards = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # the reward R = 1 at the last step
    advantages = step_gae(step_rewards, step_values, token_values, token_step, gamma=1.0, lam=1.0)
    assert advantages.tolist() == pytest.approx((1.0 - token_values).tolist())
    discounted = step_gae(step_rewards, step_values, token_values, token_step, gamma=0.9, lam=0.5)
    # by hand for the last token: A = (1 - 0.4) + 0 ; for token 2 (step 1): δ2 = 0 - .5 + .9*.4, δ3 = 1 - .4
    assert discounted[5].item() == pytest.approx(0.6)
    a3 = 0.6
    a2 = (0 - 0.5 + 0.9 * 0.4) + 0.45 * a3
    assert discounted[2].item() == pytest.approx((0 - 0.5) + 0.9 * 0.5 + 0.45 * a2)
