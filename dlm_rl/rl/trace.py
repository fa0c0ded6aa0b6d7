"""TraceRL's training rows: the states the sampler actually visited, rebuilt from `Trajectory.step_map`.

Shrinkage s merges every s consecutive distinct steps of a sample into one, labelled by the group's last step:
τ_s(j). For each label t the state is the prompt plus the response with every token of τ_s ≥ t masked, and the
targets are the tokens with τ_s = t that the model drew, up to the response's first EOS (`Trajectory.trainable`:
early-stop fills and tokens after the first EOS are masked in the states they were masked in, but never targets). Full-attention models need one row per (sample, shrunk step); block-attention
models pack one state of every block into a row (`dlm_rl.rl.rows`), with blocks aligned exactly as the sampler's.
"""

from __future__ import annotations

import torch

from dlm_rl.diffusion.packed import packed_block_size
from dlm_rl.rl.rows import Rows
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


def trace_rows(trajectory: Trajectory, mask_token_id: int, s: int = 1) -> Rows:
    """Plain rows: one per (sample, shrunk step) that has at least one drawn token (full-attention models)."""
    shrunk = shrink_steps(trajectory.step_map, s)
    trainable = trajectory.trainable
    rows = {k: [] for k in ("input_ids", "attention_mask", "targets", "response_ids", "sample", "step", "token_step")}
    response_mask = torch.ones_like(trajectory.response_ids)
    for b in range(len(trajectory)):
        for t in torch.unique(shrunk[b]).tolist():
            targets = (shrunk[b] == t) & trainable[b]
            if not targets.any():
                continue
            state = trajectory.response_ids[b].masked_fill(shrunk[b] >= t, mask_token_id)
            rows["input_ids"].append(torch.cat([trajectory.prompt_ids[b], state]))
            rows["attention_mask"].append(torch.cat([trajectory.prompt_mask[b], response_mask[b]]))
            rows["targets"].append(targets)
            rows["token_step"].append(torch.where(targets, t, -1))
            rows["response_ids"].append(trajectory.response_ids[b])
            rows["sample"].append(b)
            rows["step"].append(t)
    return _stack(rows, trajectory)


def packed_trace_rows(trajectory: Trajectory, mask_token_id: int, block_size: int, s: int = 1) -> Rows:
    """Packed rows for block-attention models: `[prompt ; clean response ; copy]` (`dlm_rl.rl.rows`), where row i
    of a sample holds, in every block of the copy, that block's i-th shrunk state (steps are shrunk within each
    block). A sample needs as many rows as its busiest block has shrunk steps (at most block_size / s)."""
    if trajectory.block_length != block_size:
        raise ValueError(f"the trajectory was decoded in blocks of {trajectory.block_length}, the model attends in "
                         f"blocks of {block_size}: training blocks must be the sampler's")
    lengths = trajectory.prompt_mask.long().sum(1)
    width = trajectory.response_ids.shape[1]
    if not torch.equal(lengths % block_size, trajectory.block_offset.to(lengths.device)):
        raise ValueError("the trajectory's block offsets do not match its prompt lengths: it was not decoded with "
                         "position-aligned blocks")
    rows = {k: [] for k in ("input_ids", "attention_mask", "targets", "response_ids", "sample", "step",
                            "token_step", "position_ids", "noisy")}
    ones = torch.ones_like(trajectory.response_ids[0])
    trainable = trajectory.trainable
    for b in range(len(trajectory)):
        positions = lengths[b] + torch.arange(width, device=lengths.device)
        block = positions // block_size
        shrunk = trajectory.step_map[b].clone()
        labels = []  # per block: its shrunk step labels that train at least one drawn token
        for k in torch.unique(block).tolist():
            inside = block == k
            shrunk[inside] = shrink_steps(trajectory.step_map[b, inside][None], s)[0]
            drawn = inside & trainable[b]
            labels.append((inside, torch.unique(shrunk[drawn]).tolist()))
        prompt_positions = (trajectory.prompt_mask[b].long().cumsum(0) - 1).clamp(min=0)
        # The copy: left padding, the prompt tail in the response's first block, then the noisy response.
        tail = int(trajectory.block_offset[b])
        lead = block_size - 1 - tail
        copy_mask = torch.cat([torch.zeros(lead, dtype=ones.dtype, device=ones.device), ones[:1].expand(tail), ones])
        copy_positions = torch.cat([torch.zeros(lead, dtype=positions.dtype, device=positions.device),
                                    prompt_positions[len(prompt_positions) - tail :], positions])
        copy_prompt = torch.cat([torch.zeros(lead, dtype=ones.dtype, device=ones.device),
                                 trajectory.prompt_ids[b, trajectory.prompt_ids.shape[1] - tail :]])
        noisy = torch.tensor([False] * (trajectory.prompt_ids.shape[1] + width) + [True] * (block_size - 1 + width),
                             device=ones.device)
        for i in range(max(len(steps) for _, steps in labels)):
            state, targets = trajectory.response_ids[b].clone(), torch.zeros_like(trainable[b])
            for inside, steps in labels:
                if i < len(steps):
                    state[inside & (shrunk >= steps[i])] = mask_token_id
                    targets |= inside & (shrunk == steps[i]) & trainable[b]
            rows["input_ids"].append(torch.cat([trajectory.prompt_ids[b], trajectory.response_ids[b], copy_prompt,
                                                state]))
            rows["attention_mask"].append(torch.cat([trajectory.prompt_mask[b], ones, copy_mask]))
            rows["position_ids"].append(torch.cat([prompt_positions, positions, copy_positions]))
            rows["noisy"].append(noisy)
            rows["targets"].append(targets)
            rows["token_step"].append(torch.where(targets, shrunk, -1))
            rows["response_ids"].append(trajectory.response_ids[b])
            rows["sample"].append(b)
            rows["step"].append(i)
    return _stack(rows, trajectory, block_size=block_size)


def model_trace_rows(trajectory: Trajectory, model, s: int = 1) -> Rows:
    """The row layout `model` needs: packed for in-place block-attention models, plain otherwise (a model with
    shifted logits reads a token from the column before it, which the packed copy does not provide)."""
    block_size = packed_block_size(model)
    if block_size is not None:
        return packed_trace_rows(trajectory, model.mask_token_id, block_size, s)
    return trace_rows(trajectory, model.mask_token_id, s)


def _stack(rows: dict, trajectory: Trajectory, **extra) -> Rows:
    if not rows["sample"]:
        raise ValueError("the trajectory has no drawn tokens to train on")
    device = trajectory.response_ids.device
    stacked = {k: torch.stack(v) for k, v in rows.items() if k not in ("sample", "step")}
    sample = torch.tensor(rows["sample"], device=device)
    return Rows(**stacked, sample=sample, step=torch.tensor(rows["step"], device=device),
                weight=torch.ones(len(sample), device=device), **extra)
