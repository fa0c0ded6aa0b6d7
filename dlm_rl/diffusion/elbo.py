"""ELBO likelihood estimator and the masked-diffusion (MDM) training loss.

B(y|x) = E_draw[ w · Σ_i 1[y_t^i = M] log p_θ(y^i | y_t, x) ], one draw per MCNoise entry, with w = w(t)
(time form, 1/t for the linear schedule) or L/ℓ (tokens form). Both are unbiased for the same bound.
The MDM loss is the negative ELBO per response token: −E[w Σ_i 1[masked] log p] / L (LLaDA's SFT loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dlm_rl.diffusion.masking import apply_mask
from dlm_rl.diffusion.noise import MCNoise


def noised_log_probs(
    model,
    input_ids: torch.Tensor,
    noise: MCNoise,
    attention_mask: torch.Tensor | None = None,
    *,
    draws_per_forward: int | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """log p_θ(x_0^i | x_t) at the masked positions of every draw, 0 elsewhere: [n, B, T].

    `model` is a DiffusionLM (or anything returning its output). Draws are batched `draws_per_forward` at a
    time (all at once by default); lower it to bound memory on large models. Under autograd every batch keeps its
    activations until the backward pass, unless `recompute`: then each batch keeps only its [k, B, T] output and
    its forward runs again in the backward pass (activation checkpointing, with the same dropout draws), so the
    activations of one batch are alive at a time, for one forward more.
    """
    n, batch, width = noise.masked.shape
    step = draws_per_forward or n
    mask_id = _unwrap(model).mask_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def scored(masked: torch.Tensor) -> torch.Tensor:  # [k, B, T] draws -> their log-probs
        k = masked.shape[0]
        noisy = apply_mask(input_ids.expand(k, batch, width), masked, mask_id).reshape(k * batch, width)
        logits = model(noisy, attention_mask.repeat(k, 1)).logits  # [k*B, T, V]
        targets = input_ids.repeat(k, 1)  # [k*B, T]
        flat_masked = masked.reshape(k * batch, width)
        # Only masked positions are scored: gather them to keep the float32 softmax small on big vocabularies.
        logp = torch.zeros(k * batch, width, dtype=torch.float32, device=input_ids.device)
        logp[flat_masked] = -F.cross_entropy(logits[flat_masked].float(), targets[flat_masked], reduction="none")
        return logp.reshape(k, batch, width)

    chunks = []
    for start in range(0, n, step):
        masked = noise.masked[start : start + step]
        if recompute and torch.is_grad_enabled():
            chunks.append(checkpoint(scored, masked, use_reentrant=False))
        else:
            chunks.append(scored(masked))
    return torch.cat(chunks)


def elbo(model, input_ids, response_mask, noise: MCNoise, attention_mask=None, **kwargs) -> torch.Tensor:
    """Monte Carlo ELBO of each row's response given its prompt: [B] (a log-likelihood bound, in nats)."""
    logp = noised_log_probs(model, input_ids, noise, attention_mask, **kwargs)  # [n, B, T]
    return (noise.weight * logp.sum(-1)).mean(0)


def mdm_loss(model, input_ids, response_mask, noise: MCNoise, attention_mask=None, **kwargs) -> torch.Tensor:
    """Masked-diffusion loss: −ELBO / L per row, averaged over rows (rows without a response are skipped)."""
    lengths = response_mask.sum(-1)  # [B]
    per_row = elbo(model, input_ids, response_mask, noise, attention_mask, **kwargs)
    keep = lengths > 0
    return -(per_row[keep] / lengths[keep]).mean()


def _unwrap(model):
    """The DiffusionLM behind a DDP/accelerate wrapper."""
    return getattr(model, "module", model)
