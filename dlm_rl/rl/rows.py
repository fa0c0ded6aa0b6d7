"""Training rows: the model inputs an RL method builds from sampled responses, and the forward pass that reads
each response token's log-probability (or hidden state) from them.

Every row ends with the response in some state; the last R columns are read. Two layouts:
- plain: `[prompt ; response state]` under the model's own attention (full-attention trace rows, random masks).
- packed (block-attention models, `dlm_rl.diffusion.packed`): `[prompt ; clean response ; noisy copy]`. The copy
  starts at the block boundary before the response (so it repeats the prompt's tail that shares the response's
  first block, left padded to a fixed width) and reuses the clean columns' position ids. A copy token sees the
  clean tokens of earlier blocks and the copy tokens of its own block; no clean token sees the copy. One row then
  holds one denoising state of every block at once, each exactly as the sampler saw it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from dlm_rl.diffusion.packed import packed_block_bias


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
