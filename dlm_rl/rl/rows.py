"""Training rows: the model inputs an RL method builds from sampled responses, and the forward pass that reads
each response token's log-probability (or hidden state) from them.

Every row ends with the response in some state; the last R columns are read. Two layouts:
- plain: `[prompt ; response state]` under the model's own attention (full-attention trace rows, random masks).
- packed (block-attention models, TraceRL): `[prompt ; clean response ; noisy copy]`. The copy starts at the
  block boundary before the response (so it repeats the prompt's tail that shares the response's first block,
  left padded to a fixed width) and reuses the clean columns' position ids. A copy token sees the clean tokens of
  earlier blocks and the copy tokens of its own block; no clean token sees the copy. One row then holds one
  denoising state of every block at once, each exactly as the sampler saw it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from dlm_rl.models.attention import position_ids_from_padding


@dataclass
class Rows:
    """N rows; `sample[n]` is the trajectory row (response) row n trains, `weight[n]` scales its loss."""

    input_ids: torch.Tensor  # [N, C]
    attention_mask: torch.Tensor  # [N, C] 1 = real token
    targets: torch.Tensor  # [N, R] bool: response tokens trained in this row
    response_ids: torch.Tensor  # [N, R]: the tokens the targets should predict
    sample: torch.Tensor  # [N]
    step: torch.Tensor  # [N]: the (shrunk) step a trace row replays (packed: its rank); -1 for randomly masked rows
    weight: torch.Tensor  # [N] float
    token_step: torch.Tensor | None = None  # [N, R] trace rows: each target's global (shrunk) step; -1 elsewhere
    position_ids: torch.Tensor | None = None  # [N, C], packed layout only
    noisy: torch.Tensor | None = None  # [N, C] bool: the copy's columns, packed layout only
    block_size: int | None = None  # packed layout only

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    def select(self, index) -> Rows:
        """The rows picked by a bool mask, an index tensor or a slice."""
        return self._map(lambda tensor: tensor[index])

    def to(self, device) -> Rows:
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn) -> Rows:
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: fn(t) for name, t in tensors.items() if isinstance(t, torch.Tensor)})

    def forward_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments for `DiffusionLM.forward` (after `input_ids`)."""
        if self.noisy is None:
            return {"attention_mask": self.attention_mask}
        return {
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "attention_bias": packed_block_bias(self.position_ids, self.attention_mask, self.noisy, self.block_size,
                                                dtype),
        }


def packed_block_bias(
    positions: torch.Tensor, valid: torch.Tensor, noisy: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """[N, 1, C, C] additive mask of the packed `[prompt ; clean ; noisy copy]` layout (see the module docstring)."""
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


def response_log_probs(model, rows: Rows, entropy: bool = False):
    """[N, R] log-probabilities of the response tokens in each row's state (gradients flow when enabled); with
    `entropy`, also the [N, R] entropy of each position's distribution."""
    logits = model(rows.input_ids, **rows.forward_kwargs(model.dtype)).logits[:, -rows.response_length :]
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, rows.response_ids[..., None])[..., 0]
    if not entropy:
        return logp
    probs = logp_all.exp()
    return logp, -(probs * logp_all.nan_to_num(neginf=0.0)).sum(-1)


def reference_log_probs(model, rows: Rows) -> torch.Tensor:
    """Log-probabilities under the frozen base model: the same weights with the LoRA adapter disabled."""
    with model.model.disable_adapter():
        return response_log_probs(model, rows)


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
