"""The canvas a batch is decoded on: prompts, response masks and padding laid out on one column grid.

Decoding blocks are shared column ranges, so every step works on one slice for all rows. Two alignments:
- response (full attention, LLaDA): prompts left padded to a common end; block k is response tokens
  [k L, (k+1) L) of every row.
- position (block attention, SDAR): a model's attention blocks are positions [k L, (k+1) L) counted from a
  row's first token, prompt included. Each row is left padded by a multiple of L so that columns and positions
  agree modulo L; a row's first decoding block then holds the tail of its prompt and its response continues
  past the others' where prompts differ in length (right padding fills the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Canvas:
    ids: torch.Tensor  # [B, C]
    valid: torch.Tensor  # [B, C] bool: prompt or response (False = padding)
    prompt: torch.Tensor  # [B, C] bool: prompt tokens
    response: torch.Tensor  # [B, C] bool: response tokens
    positions: torch.Tensor  # [B, C] position ids (real tokens counted from 0)
    response_cols: torch.Tensor  # [B, R] column of each response token
    first_col: int  # column where decoding block 0 starts
    num_blocks: int
    block_length: int
    block_offset: torch.Tensor  # [B] offset of response token 0 inside its block

    @classmethod
    def build(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        gen_length: int,
        block_length: int,
        mask_token_id: int,
        *,
        align_positions: bool,
    ) -> Canvas:
        """Lay out left-padded prompts ([B, P] ids and 1/0 mask) with `gen_length` masks after each."""
        device = prompt_ids.device
        batch, width = prompt_ids.shape
        lengths = prompt_mask.long().sum(1)  # [B]
        longest = int(lengths.max())
        if align_positions:
            pad = block_length * ((longest - lengths) // block_length)  # [B]
        else:
            pad = longest - lengths
        start = pad + lengths  # [B] first response column
        if align_positions:
            first_col = block_length * (int(start.min()) // block_length)
            columns = -(-(int(start.max()) + gen_length) // block_length) * block_length
        else:
            first_col, columns = longest, longest + gen_length
        col = torch.arange(columns, device=device)[None, :]  # [1, C]
        prompt = (col >= pad[:, None]) & (col < start[:, None])  # [B, C]
        response = (col >= start[:, None]) & (col < start[:, None] + gen_length)
        source = (col - start[:, None] + width).clamp(0, width - 1)  # column of the prompt token in prompt_ids
        ids = torch.where(prompt, prompt_ids.gather(1, source), torch.full_like(source, mask_token_id))
        return cls(
            ids=ids,
            valid=prompt | response,
            prompt=prompt,
            response=response,
            positions=(col - pad[:, None]).clamp(min=0),
            response_cols=start[:, None] + torch.arange(gen_length, device=device),
            first_col=first_col,
            num_blocks=(columns - first_col) // block_length,
            block_length=block_length,
            block_offset=(start - first_col) % block_length,
        )
