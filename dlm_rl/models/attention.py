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
    Padding queries see every key, which keeps softmax finite; their outputs are never used.
    """
    valid = attention_mask.bool()  # [B, K]
    queries = valid.shape[1] if query_length is None else query_length
    positions = position_ids_from_padding(attention_mask)  # [B, K]
    if mode == "causal":  # by column, which orders real tokens like their positions and keeps padding apart
        positions = torch.arange(valid.shape[1], device=valid.device).expand_as(positions)
    return positional_mask(
        positions, valid, positions[:, -queries:], valid[:, -queries:], mode, block_size=block_size, dtype=dtype
    )


def positional_mask(
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor,
    mode: str,
    *,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The [B, 1, Q, K] float mask for keys and queries given by their positions, in any column order.

    Samplers with KV caches feed tokens out of order (a dual cache holds the suffix before the current block);
    attention then follows the true positions. A valid query sees valid keys as `mode` allows; a padding query
    sees every key, which keeps its softmax finite (its output is never used).
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
    allowed = key_valid.bool()[:, None, :].expand(-1, query_positions.shape[1], -1)  # [B, Q, K]
    if mode == "block":
        if not block_size or block_size < 1:
            raise ValueError(f"attention mode 'block' needs a positive block_size, got {block_size!r}")
        allowed = allowed & (key_positions[:, None, :] // block_size <= query_positions[:, :, None] // block_size)
    elif mode == "causal":
        allowed = allowed & (key_positions[:, None, :] <= query_positions[:, :, None])
    allowed = allowed | ~query_valid.bool()[:, :, None]
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
