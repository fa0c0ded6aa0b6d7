"""ELBO likelihood estimator and the masked-diffusion (MDM) training loss.

B(y|x) = E_draw[ w · Σ_i 1[y_t^i = M] log p_θ(y^i | y_t, x) ], one draw per MCNoise entry, with w = w(t)
(time form, 1/t for the linear schedule) or L/ℓ (tokens form). Both are unbiased for the same bound.
The MDM loss is the negative ELBO per response token: −E[w Σ_i 1[masked] log p] / L (LLaDA's SFT loss).

A block-attention model that predicts in place (`dlm_rl.diffusion.packed.packed_block_size`: SDAR, LLaDA2) is a
block diffusion model (BD3-LM, arXiv 2503.09573; SDAR, arXiv 2510.06303): log p(y|x) = Σ_b log p(y^b | x, y^{<b}),
each block generated given the clean earlier blocks, as our sampler decodes. Its ELBO is the sum of the blocks' own
masked-diffusion ELBOs, B(y|x) = Σ_b E_draw[ w_b Σ_{i∈b} 1[y_t^i = M] log p_θ(y^i | x, y^{<b}, y^b_t) ]: each block
noised on its own (per-block MCNoise, `elbo_blocks`), every earlier block clean, later blocks unseen, the prompt
tokens that share the response's first block never masked. One forward scores all blocks of a draw at once, in
the packed layout `[prompt ; clean response ; noisy copy]`. Row-level noise read this way estimates the same bound
without bias (the draw a block sees is a mixture of its own law), with every block's draws tied together.

The estimator forms, their weights and the block ELBO: docs/algorithms.md, sections 1 and 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dlm_rl.diffusion.masking import apply_mask
from dlm_rl.diffusion.noise import MCNoise
from dlm_rl.models.attention import position_ids_from_padding
from dlm_rl.diffusion.packed import copy_width, packed_block_bias, packed_block_size, packed_layout


def elbo_blocks(model, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """[B, T] the attention block of every column (position // block_size) when `model`'s ELBO is the block one
    (`packed_block_size`), else None: the `blocks` that make `MCNoise.sample` draw per-block noise for `model`."""
    block_size = packed_block_size(_unwrap(model))
    return None if block_size is None else position_ids_from_padding(attention_mask) // block_size


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

    A block-attention model that predicts in place reads each draw in the packed layout (`_packed_logits`): a
    masked token sees its block's noisy state and the clean earlier blocks. Any other model (full attention, or
    shifted logits, which the packed copy cannot serve) reads the plain row `[prompt ; noisy response]`.
    """
    n, batch, width = noise.masked.shape
    step = draws_per_forward or n
    mask_id = _unwrap(model).mask_token_id
    block_size = packed_block_size(_unwrap(model))
    if noise.per_block and block_size is None:
        raise ValueError("per-block noise estimates a block-attention model's ELBO; this model reads plain rows: "
                         "draw its noise without `blocks`")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def scored(masked: torch.Tensor) -> torch.Tensor:  # [k, B, T] draws -> their log-probs
        k = masked.shape[0]
        noisy = apply_mask(input_ids.expand(k, batch, width), masked, mask_id).reshape(k * batch, width)
        flat_masked = masked.reshape(k * batch, width)
        if block_size is None:
            logits = model(noisy, attention_mask.repeat(k, 1)).logits  # [k*B, T, V]
        else:
            logits = _packed_logits(model, input_ids.repeat(k, 1), noisy, attention_mask.repeat(k, 1), flat_masked,
                                    block_size)  # [k*B, C, V]: the last C columns
        read = slice(width - logits.shape[1], None)  # the columns the logits are of
        targets = input_ids.repeat(k, 1)[:, read]  # [k*B, C]
        chosen = flat_masked[:, read]
        # Only masked positions are scored: gather them to keep the float32 softmax small on big vocabularies.
        logp = torch.zeros(k * batch, width, dtype=torch.float32, device=input_ids.device)
        logp[:, read][chosen] = -F.cross_entropy(logits[chosen].float(), targets[chosen], reduction="none")
        return logp.reshape(k, batch, width)

    chunks = []
    for start in range(0, n, step):
        masked = noise.masked[start : start + step]
        if recompute and torch.is_grad_enabled():
            chunks.append(checkpoint(scored, masked, use_reentrant=False))
        else:
            chunks.append(scored(masked))
    return torch.cat(chunks)


def _packed_logits(model, clean_ids, noisy_ids, attention_mask, masked, block_size: int) -> torch.Tensor:
    """[N, C, V] logits of the last C columns of rows [N, T] read as the packed `[prompt ; clean response ; noisy
    copy]` (`dlm_rl.diffusion.packed`): the copy holds every block with a masked position, which sees its own noisy state
    and the clean earlier blocks."""
    copy = copy_width(attention_mask, masked, block_size)
    inputs = packed_layout(clean_ids, noisy_ids, attention_mask, copy)
    bias = packed_block_bias(inputs["position_ids"], inputs["attention_mask"], inputs["noisy"], block_size,
                             _unwrap(model).dtype)
    out = model(inputs["input_ids"], inputs["attention_mask"], position_ids=inputs["position_ids"],
                attention_bias=bias)
    return out.logits[:, -copy:]


def elbo(model, input_ids, response_mask, noise: MCNoise, attention_mask=None, **kwargs) -> torch.Tensor:
    """Monte Carlo ELBO of each row's response given its prompt: [B] (a log-likelihood bound, in nats); the block
    diffusion ELBO on a block-attention model (module docstring)."""
    logp = noised_log_probs(model, input_ids, noise, attention_mask, **kwargs)  # [n, B, T]
    return noise.terms(logp).mean(0)


def mdm_loss(model, input_ids, response_mask, noise: MCNoise, attention_mask=None, **kwargs) -> torch.Tensor:
    """Masked-diffusion loss: −ELBO / L per row, averaged over rows (rows without a response are skipped)."""
    lengths = response_mask.sum(-1)  # [B]
    per_row = elbo(model, input_ids, response_mask, noise, attention_mask, **kwargs)
    keep = lengths > 0
    return -(per_row[keep] / lengths[keep]).mean()


def _unwrap(model):
    """The DiffusionLM behind a DDP/accelerate wrapper."""
    return getattr(model, "module", model)
