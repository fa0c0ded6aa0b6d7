"""Advantages: GRPO-style group z-scores of rewards, centred rewards (GDPO), ESPO's leave-one-out differences, wd1's
group softmax weights, and step-level GAE for a diffusion value model."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, keep): each reward's z-score within its group (same prompt), with the group's population std (as
    TraceRL's reference code); `keep` is False for groups whose rewards are all equal (no signal: the dynamic filter
    drops them)."""
    return _per_group(rewards, groups, lambda values: (values - values.mean()) / (values.std(correction=0) + eps))


def centred_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, keep): each reward minus its group's mean, not divided by the spread (GDPO); `keep` as
    `group_advantages`."""
    return _per_group(rewards, groups, lambda values: values - values.mean())


def leave_one_out_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, keep) as ESPO's reference code computes them: each reward minus the mean of the other rewards of
    its group, not divided by any spread; `keep` as `group_advantages`."""
    return _per_group(rewards, groups, lambda values: values - (values.sum() - values) / (len(values) - 1))


def wd1_weights(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep) for wd1's weighted likelihood (arXiv 2507.08838): with A the reward minus its group's mean,
    softmax(A) − softmax(−A) over the group, times the group's size, so that a mean over the rows of several groups
    is the mean over groups of wd1's per-group sum. `keep` as `group_advantages` (a group whose rewards are all equal
    has weights that cancel exactly: no gradient)."""

    def weights(values: torch.Tensor) -> torch.Tensor:
        centred = values - values.mean()
        return len(values) * (torch.softmax(centred, 0) - torch.softmax(-centred, 0))

    return _per_group(rewards, groups, weights)


def _per_group(rewards: torch.Tensor, groups: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn of each group's rewards, in float64, at its members; keep): 0 and False for groups whose rewards are all
    equal."""
    rewards = rewards.double()
    out = torch.zeros_like(rewards)
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    for group in torch.unique(groups):
        members = groups == group
        values = rewards[members]
        if len(values) < 2 or values.max() == values.min():
            continue
        out[members] = fn(values)
        keep[members] = True
    return out, keep


def step_gae(
    step_rewards: torch.Tensor,
    step_values: torch.Tensor,
    token_values: torch.Tensor,
    token_step: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> torch.Tensor:
    """Per-token advantages of one sample from step-level GAE (TraceRL):
    δ*_t = r*_t − V*_t + γV*_{t+1},  A*_t = δ*_t + γλA*_{t+1},  A_j = (r*_{t(j)} − V_j) + γV*_{t+1} + γλA*_{t+1},
    with t(j) = `token_step[j]` ∈ 0..T−1 (the shrunk step index of token j), V*_T = A*_T = 0.
    With γ = λ = 1 and the reward at the last step, A_j = R − V_j."""
    steps = len(step_rewards)
    next_value = torch.cat([step_values[1:], step_values.new_zeros(1)])
    step_advantages = torch.zeros(steps + 1, dtype=step_values.dtype, device=step_values.device)
    for t in reversed(range(steps)):
        delta = step_rewards[t] - step_values[t] + gamma * next_value[t]
        step_advantages[t] = delta + gamma * lam * step_advantages[t + 1]
    later = gamma * next_value[token_step] + gamma * lam * step_advantages[token_step + 1]
    return step_rewards[token_step] - token_values + later
