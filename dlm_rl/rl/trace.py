"""TraceRL's training rows: the states the sampler actually visited, rebuilt from `Trajectory.step_map`.

Shrinkage s merges every s consecutive distinct steps of a sample into one, labelled by the group's last step:
τ_s(j). For each label t the state is the prompt plus the response with every token of τ_s ≥ t masked, and the
targets are the tokens with τ_s = t that the model drew (early-stop fills are masked in the states they were
masked in, but never targets). Full-attention models need one row per (sample, shrunk step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm_rl.sampling.trajectory import Trajectory


def shrink_steps(step_map: torch.Tensor, s: int) -> torch.Tensor:
    """[B, R] step labels with every s consecutive distinct steps of a row merged into the group's last one."""
    if s < 1:
        raise ValueError(f"shrinkage s must be at least 1, got {s}")
    shrunk = torch.empty_like(step_map)
    for b, row in enumerate(step_map):
        distinct = torch.unique(row)  # sorted
        group = torch.searchsorted(distinct, row) // s
        last = torch.clamp((torch.arange(len(distinct), device=row.device) // s + 1) * s - 1, max=len(distinct) - 1)
        labels = distinct[last[:: s]]  # the label of group g
        shrunk[b] = labels[group]
    return shrunk


@dataclass
class TraceRows:
    """N training rows; `sample[n]` is the trajectory row they come from, `step[n]` their shrunk step label."""

    input_ids: torch.Tensor  # [N, P + R]: prompt, then the response in the state of that step
    attention_mask: torch.Tensor  # [N, P + R]
    targets: torch.Tensor  # [N, R] bool: response tokens trained in this row
    response_ids: torch.Tensor  # [N, R]: the tokens the targets should predict
    sample: torch.Tensor  # [N]
    step: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]


def trace_rows(trajectory: Trajectory, mask_token_id: int, s: int = 1) -> TraceRows:
    """One row per (sample, shrunk step) that has at least one drawn token (full-attention models)."""
    shrunk = shrink_steps(trajectory.step_map, s)
    rows = {k: [] for k in ("input_ids", "attention_mask", "targets", "response_ids", "sample", "step")}
    response_mask = torch.ones_like(trajectory.response_ids)
    for b in range(len(trajectory)):
        for t in torch.unique(shrunk[b]).tolist():
            targets = (shrunk[b] == t) & trajectory.sampled[b]
            if not targets.any():
                continue
            state = trajectory.response_ids[b].masked_fill(shrunk[b] >= t, mask_token_id)
            rows["input_ids"].append(torch.cat([trajectory.prompt_ids[b], state]))
            rows["attention_mask"].append(torch.cat([trajectory.prompt_mask[b], response_mask[b]]))
            rows["targets"].append(targets)
            rows["response_ids"].append(trajectory.response_ids[b])
            rows["sample"].append(b)
            rows["step"].append(t)
    if not rows["sample"]:
        raise ValueError("the trajectory has no drawn tokens to train on")
    stacked = {k: torch.stack(v) for k, v in rows.items() if k not in ("sample", "step")}
    device = trajectory.response_ids.device
    return TraceRows(
        **stacked,
        sample=torch.tensor(rows["sample"], device=device),
        step=torch.tensor(rows["step"], device=device),
    )
