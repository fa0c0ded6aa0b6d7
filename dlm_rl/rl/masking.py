"""The baselines' training rows: log-probabilities from random masks instead of the visited states.

- diffu-GRPO (d1): one row per response, the response fully masked and each prompt token masked with p = 0.15.
- random masking: one row per response, each response token masked with probability t ~ U(0.2, 0.8); weight 1/t.
- coupled (DiffuCoder): the random-masking row plus its complement (the other tokens masked), weight 1/(1 − t),
  so every response token is scored exactly once.
- ESPO: a row with exactly x of the L response tokens masked, x spread evenly over the batch's responses from a random
  start (x_i = round(k + i(L + 1)/n) mod (L + 1)), plus its complement; weights (L + 1)/(2x) and (L + 1)/(2(L − x)),
  so the two rows' weighted sum is the average of two ELBO estimates.
- GDPO: one row per Gauss–Legendre node t_k of [0, 1] (3 nodes), each token masked with probability t_k, weight
  w_k/t_k (w_k the node's quadrature weight): the ELBO's integral over t by quadrature.
- SPG: per draw, one block of the response (its decoding blocks, up to the last trainable token) is picked at
  random; earlier blocks stay clean, a uniform number (1 to all) of the picked block's tokens are masked, later
  blocks and everything after the response are masked, and each prompt token is masked with p = 0.15. Weight: the
  response's trainable span (SPG weighs each response's loss by its length).
- BGPO: `draws` rows per response, each one draw of the ELBO's tokens-form estimator (`dlm_rl.diffusion.noise`:
  ℓ ~ U{1..L} of the L canvas tokens masked, weight L/ℓ).
A row's targets are its masked response tokens that the model drew, up to the first EOS (`Trajectory.trainable`).
Rows are drawn from `generator`; a trainer draws fresh rows for every inner epoch and scores old, reference and
current policy on the same rows.

With `block_size` (`dlm_rl.diffusion.packed.packed_block_size` of a block-attention model) the rows take the packed
layout `[prompt ; clean response ; masked copy]`: every response block is scored in its masked state given the clean
earlier blocks, as the block-diffusion likelihood conditions it (BD3-LM, arXiv 2503.09573; SDAR, arXiv
2510.06303), instead of given the masked earlier blocks of a plain row. diffu-GRPO's masked prompt is the prompt of
both the clean part and the copy.

Their weights and normalisers: docs/algorithms.md, section 5.
"""

from __future__ import annotations

import numpy as np
import torch

from dlm_rl.diffusion.noise import MCNoise
from dlm_rl.diffusion.packed import copy_width, packed_layout
from dlm_rl.rl.rows import Rows
from dlm_rl.sampling.trajectory import Trajectory

MASK_LOW, MASK_HIGH = 0.2, 0.8


def diffu_grpo_rows(
    trajectory: Trajectory, mask_token_id: int, generator: torch.Generator, prompt_mask_p: float = 0.15,
    block_size: int | None = None,
) -> Rows:
    device = trajectory.response_ids.device
    noise = torch.rand(trajectory.prompt_ids.shape, generator=generator, device=generator.device).to(device)
    prompt = trajectory.prompt_ids.masked_fill((noise < prompt_mask_p) & trajectory.prompt_mask.bool(), mask_token_id)
    response = torch.full_like(trajectory.response_ids, mask_token_id)
    targets, weights = [trajectory.trainable], [torch.ones(len(trajectory), device=device)]
    return _rows(trajectory, prompt, [response], targets, weights, block_size)


def random_mask_rows(trajectory: Trajectory, mask_token_id: int, generator: torch.Generator, coupled: bool,
                     block_size: int | None = None) -> Rows:
    device = trajectory.response_ids.device
    t = MASK_LOW + (MASK_HIGH - MASK_LOW) * torch.rand(len(trajectory), 1, generator=generator, device=generator.device)
    masked = torch.rand(trajectory.response_ids.shape, generator=generator, device=generator.device) < t
    t, masked = t.to(device), masked.to(device)
    halves = [masked, ~masked] if coupled else [masked]
    weights = [1 / t[:, 0], 1 / (1 - t[:, 0])]
    states = [trajectory.response_ids.masked_fill(m, mask_token_id) for m in halves]
    return _rows(trajectory, trajectory.prompt_ids, states, [m & trajectory.trainable for m in halves],
                 weights[: len(halves)], block_size)


def spread_mask_rows(trajectory: Trajectory, mask_token_id: int, generator: torch.Generator,
                     block_size: int | None = None) -> Rows:
    device = trajectory.response_ids.device
    n, length = trajectory.response_ids.shape
    start = torch.randint(0, length + 1, (), generator=generator, device=generator.device).item()
    counts = torch.round(start + torch.arange(n, dtype=torch.float64) * (length + 1) / n).long() % (length + 1)
    order = torch.rand(n, length, generator=generator, device=generator.device).argsort(dim=1).argsort(dim=1)
    masked = (order < counts[:, None].to(order.device)).to(device)  # exactly counts[i] positions, chosen uniformly
    counts = counts.to(device).float()
    weights = [(length + 1) / (2 * counts.clamp(min=1)), (length + 1) / (2 * (length - counts).clamp(min=1))]
    halves = [masked, ~masked]
    states = [trajectory.response_ids.masked_fill(m, mask_token_id) for m in halves]
    return _rows(trajectory, trajectory.prompt_ids, states, [m & trajectory.trainable for m in halves], weights,
                 block_size)


def block_mask_rows(trajectory: Trajectory, mask_token_id: int, generator: torch.Generator, draws: int,
                    prompt_mask_p: float = 0.15, block_size: int | None = None) -> Rows:
    device = trajectory.response_ids.device
    n, length = trajectory.response_ids.shape
    trainable = trajectory.trainable
    positions = torch.arange(length, device=device)
    span = torch.where(trainable, positions + 1, torch.zeros_like(positions)).max(dim=1).values  # up to the last
    block = (trajectory.block_offset[:, None].to(device) + positions) // trajectory.block_length  # [n, L]
    prompts, states, targets = [], [], []
    for _ in range(draws):
        masked = torch.zeros(n, length, dtype=torch.bool)
        for i in range(n):
            if span[i] == 0:
                continue
            blocks = block[i, : span[i]].unique().tolist()
            chosen = blocks[int(torch.randint(len(blocks), (), generator=generator))]
            inside = ((block[i] == chosen) & (positions < span[i])).nonzero()[:, 0].cpu()
            count = int(torch.randint(1, len(inside) + 1, (), generator=generator))
            masked[i, inside[torch.randperm(len(inside), generator=generator)[:count]]] = True
            masked[i, (block[i] > chosen).cpu() | (positions >= span[i]).cpu()] = True
        masked = masked.to(device)
        noise = torch.rand(trajectory.prompt_ids.shape, generator=generator, device=generator.device).to(device)
        prompt_masked = (noise < prompt_mask_p) & trajectory.prompt_mask.bool()
        prompts.append(trajectory.prompt_ids.masked_fill(prompt_masked, mask_token_id))
        states.append(trajectory.response_ids.masked_fill(masked, mask_token_id))
        targets.append(masked & trainable)
    weights = [span.float()] * draws
    return _rows(trajectory, prompts, states, targets, weights, block_size)


def elbo_draw_rows(trajectory: Trajectory, mask_token_id: int, generator: torch.Generator, draws: int,
                   block_size: int | None = None) -> Rows:
    canvas = torch.ones_like(trajectory.response_ids, dtype=torch.bool)
    noise = MCNoise.sample(canvas, n_t=draws, generator=generator)
    states = [trajectory.response_ids.masked_fill(masked, mask_token_id) for masked in noise.masked]
    targets = [masked & trajectory.trainable for masked in noise.masked]
    return _rows(trajectory, trajectory.prompt_ids, states, targets, list(noise.weight), block_size)


GAUSS_LEGENDRE_NODES = 3


def quadrature_rows(trajectory: Trajectory, mask_token_id: int, generator: torch.Generator,
                    nodes: int = GAUSS_LEGENDRE_NODES, block_size: int | None = None) -> Rows:
    device = trajectory.response_ids.device
    points, quadrature = _gauss_legendre(nodes)
    states, targets, weights = [], [], []
    for t, w in zip(points, quadrature):
        noise = torch.rand(trajectory.response_ids.shape, generator=generator, device=generator.device)
        masked = (noise < t).to(device)
        states.append(trajectory.response_ids.masked_fill(masked, mask_token_id))
        targets.append(masked & trajectory.trainable)
        weights.append(torch.full((len(trajectory),), w / t, device=device))
    return _rows(trajectory, trajectory.prompt_ids, states, targets, weights, block_size)


def _gauss_legendre(nodes: int) -> tuple[list[float], list[float]]:
    """The Gauss–Legendre nodes and weights of [0, 1] (the weights sum to 1)."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    return [float((x + 1) / 2) for x in points], [float(w / 2) for w in weights]


def _rows(trajectory: Trajectory, prompt_ids, states, targets, weights, block_size: int | None) -> Rows:
    """Rows of the response `states` after `prompt_ids` (one tensor for every state, or a list: one per state)."""
    n = len(trajectory)
    prompts = prompt_ids if isinstance(prompt_ids, list) else [prompt_ids] * len(states)
    mask = torch.cat([trajectory.prompt_mask, torch.ones_like(trajectory.response_ids)], dim=1).repeat(len(states), 1)
    noisy = torch.cat([torch.cat([prompt, state], dim=1) for prompt, state in zip(prompts, states)])
    inputs = {"input_ids": noisy, "attention_mask": mask}
    if block_size is not None:
        clean = torch.cat([torch.cat([prompt, trajectory.response_ids], dim=1) for prompt in prompts])
        response = (torch.arange(mask.shape[1], device=mask.device) >= prompts[0].shape[1]).expand_as(mask)
        inputs = {**packed_layout(clean, noisy, mask, copy_width(mask, response, block_size)), "block_size": block_size}
    return Rows(
        **inputs,
        targets=torch.cat(targets),
        response_ids=trajectory.response_ids.repeat(len(states), 1),
        sample=torch.arange(n, device=mask.device).repeat(len(states)),
        step=torch.full((n * len(states),), -1, device=mask.device),
        weight=torch.cat(weights).float(),
    )
