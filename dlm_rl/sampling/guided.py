"""Ancestral sampling of a masked diffusion LM (MDLM), and DiDi-Instruct's reward-guided variant.

Time runs from 1 to 0 in `steps` equal steps; from t to s every masked response position is revealed with
probability (t − s)/t, its token drawn from the model at temperature 1 (Gumbel noise in float64). A step that
reveals nothing in a row leaves that row's state, and so its logits, unchanged: the next step reuses them (MDLM's
caching) and forwards only the rows that changed, so `steps` beyond the response length cost no extra forwards.

Guidance (DiDi-Instruct's reward-guided ancestral sampler) uses the discriminator D. In the first steps (the
first half in the paper; all but the last `rerank_fraction` of them) the logits get h · clip(∂ΣD/∂logits, ±1), ΣD
summed over the masked positions of the state whose masked positions hold their expected token (input embedding
softmax(logits) · E) and whose clean ones their token, D read at the step's time t; h rises linearly over those
steps (the paper's 30 → 40). In the remaining steps M candidate next states are drawn and one is picked by a
softmax over their D logits summed over every response position, D read at the time s the step ends at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm_rl.sampling.decoding import sample_tokens

RERANK_FRACTION = 0.5
"""The paper's share of the steps (the last ones) that re-rank candidates; the others take gradient guidance."""


@dataclass
class AncestralSamples:
    response_ids: torch.Tensor
    """[B, R] the sampled responses."""
    forwards: float
    """Forward passes of the model per sample (mean over rows)."""
    discriminator_passes: int
    """Forward (and, for gradient guidance, backward) passes of the discriminator."""


@torch.no_grad()
def ancestral_sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen_length: int,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    discriminator=None,
    guidance_scale: float | tuple[float, float] = (30.0, 40.0),
    candidates: int = 4,
    temperature: float = 1.0,
    rerank_fraction: float = RERANK_FRACTION,
) -> AncestralSamples:
    """Sample `gen_length` tokens after each left-padded prompt in `steps` ancestral steps, tokens drawn at
    `temperature` (below 1: the baseline a distilled student must beat); with a `discriminator`, reward-guided
    (`candidates`-way selection over the last `rerank_fraction` of the steps, gradient guidance before them at a
    scale rising from `guidance_scale[0]` to `[1]`, or constant if one number)."""
    if steps < 1 or gen_length < 1:
        raise ValueError(f"steps and gen_length must be positive, got {steps} and {gen_length}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 and finite (0: argmax), got {temperature}")
    if discriminator is not None and candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    if not 0 <= rerank_fraction <= 1:
        raise ValueError(f"rerank_fraction must be in [0, 1], got {rerank_fraction}")
    scales = guidance_schedule(steps, guidance_scale, rerank_fraction)  # gradient guidance; the later steps re-rank
    batch, width = prompt_ids.shape
    device = prompt_ids.device
    mask_id = model.mask_token_id
    x = torch.cat([prompt_ids, torch.full((batch, gen_length), mask_id, device=device, dtype=prompt_ids.dtype)], 1)
    attention_mask = torch.cat([prompt_mask, torch.ones(batch, gen_length, dtype=prompt_mask.dtype, device=device)], 1)
    response = torch.zeros_like(x, dtype=torch.bool)
    response[:, width:] = True
    logits = None
    stale = torch.ones(batch, dtype=torch.bool, device=device)  # rows whose logits must be recomputed
    row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    passes = 0
    for k in range(steps):
        masked = (x == mask_id) & response  # [B, C]; a prompt may hold the mask id (an unknown character)
        if not masked.any():
            break
        if stale.any():
            fresh = model(x[stale], attention_mask[stale]).logits
            logits = fresh if logits is None else logits.index_put((stale.nonzero()[:, 0],), fresh)
            row_forwards += stale
        reveal_prob = 1.0 / (steps - k)  # (t − s)/t with t = 1 − k/steps, s = t − 1/steps
        t, s = 1 - k / steps, 1 - (k + 1) / steps
        step_logits = logits
        if discriminator is not None and k < len(scales):
            step_logits = logits + scales[k] * _guidance(discriminator, x, attention_mask, logits, masked,
                                                         t).clamp(-1, 1)
            passes += 1
        if discriminator is not None and k >= len(scales) and candidates > 1:
            proposals = torch.stack([_propose(x, masked, step_logits, reveal_prob, temperature, generator)
                                     for _ in range(candidates)])  # [M, B, C]
            chosen = _select(discriminator, proposals, attention_mask, response, s, generator)
            passes += candidates
            new = proposals[chosen, torch.arange(batch, device=device)]
        else:
            new = _propose(x, masked, step_logits, reveal_prob, temperature, generator)
        stale = (new != x).any(1) & ((new == mask_id) & response).any(1)  # changed, and something left to reveal
        x = new
    return AncestralSamples(x[:, width:], float(row_forwards.double().mean()), passes)


def guidance_schedule(steps: int, scale: float | tuple[float, float],
                      rerank_fraction: float = RERANK_FRACTION) -> list[float]:
    """The gradient guidance's scale h at each of the first int(steps · (1 − rerank_fraction)) steps: constant, or
    rising linearly from scale[0] at the first to scale[1] at the last (the reference sampler's schedule)."""
    first, last = (scale, scale) if isinstance(scale, (int, float)) else scale
    guided = int(round(steps * (1 - rerank_fraction), 9))
    return [first + (last - first) * k / max(1, guided - 1) for k in range(guided)]


def _propose(x, masked, logits, reveal_prob: float, temperature: float, generator) -> torch.Tensor:
    """One ancestral step: reveal each masked position with probability `reveal_prob`."""
    tokens, _ = sample_tokens(logits, temperature, generator)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    return torch.where(masked & (u < reveal_prob), tokens, x)


def _guidance(discriminator, x, attention_mask, logits, masked, time: float) -> torch.Tensor:
    """∂/∂logits of ΣD over the masked positions, D read at time `time` on x with each masked position's input
    embedding softmax(logits) · E (its expected token) and each other position's its token's."""
    embeddings = discriminator.backbone.model.get_input_embeddings().weight  # [V, H]
    with torch.enable_grad():
        soft = logits.detach().float().requires_grad_(True)
        expected = soft.softmax(-1).to(embeddings.dtype) @ embeddings  # [B, C, H]
        inputs = torch.where(masked[..., None], expected, embeddings[x])
        d = discriminator(attention_mask=attention_mask, inputs_embeds=inputs, time=_times(time, x))
        (gradient,) = torch.autograd.grad((d * masked).sum(), soft)
    return gradient.to(logits.dtype)


def _select(discriminator, proposals, attention_mask, response_mask, time: float, generator) -> torch.Tensor:
    """[B] index of the chosen candidate per row, drawn from the softmax of the candidates' D logits (at `time`)
    summed over every response position."""
    m, b, c = proposals.shape
    flat = proposals.reshape(m * b, c)
    response = response_mask.repeat(m, 1)
    d = discriminator(flat, attention_mask.repeat(m, 1), time=_times(time, flat), response_mask=response,
                      generator=generator)  # [M·B, C]
    scores = (d * response).sum(1).view(m, b).T.double()  # [B, M]
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def _times(time: float, rows: torch.Tensor) -> torch.Tensor:
    return torch.full((len(rows),), time, device=rows.device)
