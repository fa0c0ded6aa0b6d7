"""Forward masking: replace chosen response positions by the mask token (the prompt is never touched)."""

from __future__ import annotations

import torch


def apply_mask(input_ids: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """x_t: `input_ids` with the True positions of `masked` (same shape, or broadcastable) set to [MASK]."""
    return torch.where(masked.bool(), torch.full_like(input_ids, mask_token_id), input_ids)
