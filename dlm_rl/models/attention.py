"""4-D additive attention masks for diffusion LMs: full (bidirectional), block-causal, and causal.

transformers takes a float mask of shape [B, 1, Q, K] added to the attention scores: 0 where attention is
allowed, the dtype's most negative value where it is not. A bool mask is silently wrong under eager attention,
so we always build float masks.
"""

from __future__ import annotations

import torch

ATTENTION_MODES = ("full", "block", "causal")


def position_ids_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them; padding gets position 0."""
    positions = attention_mask.long().cumsum(-1) - 1  # [B, K]
    return positions.clamp(min=0)


def additive_mask(
    attention_mask: torch.Tensor,
    mode: str,
    *,
    block_size: int | None = None,
    query_length: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the [B, 1, Q, K] float mask for `mode` from a [B, K] padding mask (1 = real token).

    The queries are the last `query_length` keys (all of them by default), as when new tokens follow a KV cache.
    - full: every query sees every real key.
    - block: a query sees real keys whose block (position // block_size) is not after its own.
    - causal: a query sees real keys at or before its own column.
    Padding queries also see themselves, which keeps softmax finite where no key is allowed; their outputs are
    never used.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
    valid = attention_mask.bool()  # [B, K]
    batch, keys = valid.shape
    queries = keys if query_length is None else query_length
    allowed = valid[:, None, :].expand(batch, queries, keys)  # [B, Q, K]
    if mode == "block":
        if not block_size or block_size < 1:
            raise ValueError(f"attention mode 'block' needs a positive block_size, got {block_size!r}")
        block = position_ids_from_padding(attention_mask) // block_size  # [B, K]
        allowed = allowed & (block[:, None, :] <= block[:, -queries:, None])
    elif mode == "causal":
        columns = torch.arange(keys, device=valid.device)
        allowed = allowed & (columns[None, :] <= columns[-queries:, None])[None]
    own = torch.zeros(queries, keys, dtype=torch.bool, device=valid.device)
    own[torch.arange(queries), torch.arange(keys - queries, keys)] = True
    allowed = allowed | (own[None] & ~valid[:, -queries:, None])
    mask = torch.zeros(batch, 1, queries, keys, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
