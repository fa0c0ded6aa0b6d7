"""TraceRL's diffusion value model: per-token values on the visited states, turned into step-level GAE advantages.

The value model is a copy of the policy's backbone (its own LoRA adapter when the policy uses one) with a
zero-initialised linear head on the last hidden state, so it starts at V = 0. It reads the same rows as the
policy (plain or packed); V_j is read in the row where token j is a target. A sample's steps are its global
(shrunk) denoising steps, whichever row holds their tokens.

The GAE and the value loss next to TraceRL's reference code: docs/algorithms.md, section 4.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dlm_rl.rl.advantages import step_gae
from dlm_rl.rl.rows import Rows


class ValueModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1, device=backbone.device, dtype=backbone.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy, lora_args=None) -> ValueModel:
        """A value model on a copy of `policy` (call before the policy gets its LoRA adapter), with its own
        adapter when `lora_args.use_lora`."""
        from dlm_rl.models.lora import add_lora

        backbone = copy.deepcopy(policy)
        if lora_args is not None and lora_args.use_lora:
            add_lora(backbone, lora_args)
        return cls(backbone)

    def forward(self, rows: Rows) -> torch.Tensor:
        """[N, R] values of the response tokens in each row's state."""
        out = self.backbone(rows.input_ids, **rows.forward_kwargs(self.backbone.dtype), output_hidden_states=True)
        hidden = out.hidden_states[:, -rows.response_length :]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # a float32 master head


def trace_gae(
    rows: Rows, values: torch.Tensor, rewards: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> torch.Tensor:
    """[N, R] per-token advantages (zero off the targets) from the rows' values [N, R] and one final reward per
    sample (`rewards[rows.sample]`), by step-level GAE over the sample's global (shrunk) denoising steps
    (`rows.token_step`, which packed rows need: one packed row holds tokens of several steps), with the step value
    V*_t = the mean of V_j over the tokens decoded at step t."""
    if rows.token_step is None:
        raise ValueError("step-level GAE needs trace rows (their token_step), not randomly masked rows")
    advantages = torch.zeros_like(values, dtype=torch.float64)
    for b in torch.unique(rows.sample).tolist():
        members = (rows.sample == b).nonzero()[:, 0]
        targets = rows.targets[members]
        token_values = values[members].double()[targets]
        labels, token_step = torch.unique(rows.token_step[members][targets], return_inverse=True)  # 0..T-1 in order
        counts = torch.zeros(len(labels), dtype=torch.float64, device=values.device).index_add_(
            0, token_step, torch.ones_like(token_values))
        step_values = torch.zeros_like(counts).index_add_(0, token_step, token_values) / counts
        step_rewards = torch.zeros_like(counts)
        step_rewards[-1] = float(rewards[b])
        token_advantages = step_gae(step_rewards, step_values, token_values, token_step, gamma, lam)
        block = advantages[members]
        block[targets] = token_advantages
        advantages[members] = block
    return advantages.float()


def clipped_value_loss(values, old_values, returns, targets, clip: float, count: float | None = None) -> torch.Tensor:
    """PPO's clipped value loss: ½ max((V − G)², (V_old + clip(V − V_old, ±c) − G)²), summed over targets and
    divided by `count` (default: these targets' number; a trainer passes the step's total over micro-batches and
    ranks, so that the loss does not depend on how the rows were split)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    targets = targets.to(loss.dtype)
    return (loss * targets).sum() / (targets.sum().clamp(min=1) if count is None else max(count, 1))
