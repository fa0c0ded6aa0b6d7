"""The packed layout of a block-attention model, `[prompt ; clean response ; noisy copy]`: one forward scores every
response block in some noisy state given the clean earlier blocks, as a block diffusion model generates them (the
block ELBO of `dlm_rl.diffusion.elbo`, and the RL rows of `dlm_rl.rl`). The copy reuses the clean columns' position
ids; a copy token sees the clean tokens of earlier blocks and the copy tokens of its own block; no clean token sees
the copy.
"""

from __future__ import annotations

import torch

from dlm_rl.models.attention import position_ids_from_padding


def packed_block_size(model) -> int | None:
    """The block size of the packed layout `model` needs: its attention block for an in-place block-attention model,
    None (plain rows) otherwise. A model with shifted logits reads a token from the column before it, which the
    packed copy does not hold, so it keeps plain rows even with block attention."""
    if getattr(model, "attention", "full") == "block" and not model.shift_logits:
        return model.block_size
    return None


def copy_width(attention_mask: torch.Tensor, scored: torch.Tensor, block_size: int) -> int:
    """The columns the noisy copy of rows [N, C] needs so that it holds, whole, every block with a `scored` position
    (the response's first block with its prompt tail): from the earliest such block's first column to the end
    (at least one column, so that a forward runs when nothing is scored)."""
    width = scored.shape[-1]
    columns = torch.arange(width, device=scored.device)
    offsets = position_ids_from_padding(attention_mask) % block_size  # a column's place in its block
    starts = torch.where(scored.bool(), columns - offsets, width)
    return max(width - int(starts.min()), 1)


def packed_layout(clean_ids: torch.Tensor, noisy_ids: torch.Tensor, attention_mask: torch.Tensor, copy: int) -> dict:
    """The packed inputs of left-padded rows [N, C] given clean and in a noisy state: the clean rows, then the last
    `copy` columns (`copy_width`) of the noisy rows, with the clean columns' position ids; as `Rows` fields
    (input_ids, attention_mask, position_ids, noisy). Copy columns before a row's first scored block are never
    seen by a scored token, so they stay as they are."""
    positions = position_ids_from_padding(attention_mask)
    clean = torch.zeros_like(attention_mask, dtype=torch.bool)
    return {
        "input_ids": torch.cat([clean_ids, noisy_ids[:, -copy:]], dim=1),
        "attention_mask": torch.cat([attention_mask, attention_mask[:, -copy:]], dim=1),
        "position_ids": torch.cat([positions, positions[:, -copy:]], dim=1),
        "noisy": torch.cat([clean, ~clean[:, -copy:]], dim=1),
    }


def packed_block_bias(
    positions: torch.Tensor, valid: torch.Tensor, noisy: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """[N, 1, C, C] additive mask of the packed `[prompt ; clean ; noisy copy]` layout (module docstring)."""
    block = positions // block_size
    valid, noisy = valid.bool(), noisy.bool()
    earlier = block[:, None, :] < block[:, :, None]  # [N, Q, K]: the key's block is before the query's
    same = block[:, None, :] == block[:, :, None]
    key_noisy = noisy[:, None, :]
    allowed = torch.where(
        noisy[:, :, None],
        (key_noisy & same) | (~key_noisy & earlier),  # a copy token: its own block of the copy, earlier clean blocks
        ~key_noisy & (earlier | same),  # a clean token: block attention over the clean tokens, never the copy
    )
    allowed = (allowed & valid[:, None, :]) | ~valid[:, :, None]  # padding queries see everything (finite softmax)
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
