"""Trajectory: what a batch of samples was, and how each was decoded — the rollout record TraceRL trains on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Trajectory:
    """A batch of B samples; token ids travel end to end (nothing is decoded and re-tokenised).

    `step_map[b, j]` is the row's own denoising step (0, 1, ...) at which response token j was first unmasked:
    each forward a row takes part in is one step, so steps are monotone across blocks and `nfe` = last step + 1.
    The state at step s is the prompt plus the response with every token of `step_map >= s` masked; the tokens
    committed at s are those with `step_map == s`, and `log_probs` holds their log-probability under the model
    (softmax of the plain, unguided logits) in that state. Tokens filled by early stop (`sampled` False) were not
    drawn from the model: their step is the step that finished the row and their log-prob is NaN.
    Response token j lies in decoding block `(block_offset[b] + j) // block_length`. A served engine
    (`dlm_rl.rollout.served`) records no steps: its trajectories have `step_map` and `log_probs` None, `sampled`
    True on the tokens the server returned and `nfe` their number.

    A rollout engine (`dlm_rl.rollout`) also fills in the fields after `finish_reason`: the decoded texts, which
    requested (prompt, sample) each row is, the version of the weights that produced it, the prompt's dataset
    row, and the rewards.
    """

    prompt_ids: torch.Tensor  # [B, P] left padded
    prompt_mask: torch.Tensor  # [B, P] 1 = real token
    response_ids: torch.Tensor  # [B, R]
    step_map: torch.Tensor | None  # [B, R] long
    log_probs: torch.Tensor | None  # [B, R] float32; NaN where not sampled
    sampled: torch.Tensor  # [B, R] bool: committed by a model step (False: filled by early stop)
    nfe: torch.Tensor  # [B] forward passes the row took part in
    block_length: int
    block_offset: torch.Tensor  # [B]: offset of response token 0 inside its decoding block
    finish_reason: list[str]  # "eos" or "length"
    eos_token_id: int | None = None  # the token that ends a response (None: the model has none)
    completions: list[str] = field(default_factory=list)  # response text up to EOS
    prompt_index: list[int] = field(default_factory=list)  # position of the row's prompt in the request
    sample_index: list[int] = field(default_factory=list)  # 0 .. n_samples - 1 within that prompt
    weight_version: int = 0
    rows: list[dict] = field(default_factory=list)  # the prompt's dataset row (columns for the rewards)
    rewards: dict[str, list] = field(default_factory=dict)  # as returned by `Rewards`: per reward, "total", "errors"

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def trainable(self) -> torch.Tensor:
        """[B, R] bool: the tokens an RL method trains on: drawn by the model (`sampled`) and not after the
        response's first EOS (the EOS itself, the decision to stop, is trained; what follows it is not part of the
        answer, as in d1 and TraceRL)."""
        if self.eos_token_id is None:
            return self.sampled
        eos = self.response_ids == self.eos_token_id
        after_first = (eos.long().cumsum(1) - eos.long()) > 0
        return self.sampled & ~after_first

    @property
    def steps_per_block(self) -> torch.Tensor:
        """[B] mean number of steps per block each row decoded (early stop ends a row's last block early)."""
        positions = torch.arange(self.response_ids.shape[1], device=self.response_ids.device)
        block = (self.block_offset[:, None] + positions) // self.block_length  # [B, R]
        first = block[:, 0]
        last = block.masked_fill(~self.sampled, -1).max(dim=1).values
        return self.nfe.double() / (last - first + 1)

    def with_rows(self, rows: list[int], other: Trajectory, other_rows: list[int]) -> Trajectory:
        """A copy in which row rows[k] is `other`'s row other_rows[k] (a sample of the same prompt drawn again), with
        its tokens, steps, texts and rewards; prompts are left padded to the wider of the two batches. Prompt and
        sample indices, and the dataset rows, stay this trajectory's."""
        width = max(self.prompt_ids.shape[1], other.prompt_ids.shape[1])

        def padded(t: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
            extra = width - t.prompt_ids.shape[1]
            pad = torch.zeros(len(t), extra, dtype=t.prompt_ids.dtype, device=t.prompt_ids.device)
            return torch.cat([pad, t.prompt_ids], 1), torch.cat([torch.zeros_like(pad), t.prompt_mask], 1)

        (ids, mask), (other_ids, other_mask) = padded(self), padded(other)
        ours, theirs = torch.tensor(rows), torch.tensor(other_rows)
        tensors = {"prompt_ids": (ids, other_ids), "prompt_mask": (mask, other_mask)}
        for name in ("response_ids", "step_map", "log_probs", "sampled", "nfe", "block_offset"):
            tensors[name] = (getattr(self, name), getattr(other, name))
        replaced = {}
        for name, (mine, given) in tensors.items():
            mine = mine.clone()
            mine[ours] = given[theirs].to(mine.device)
            replaced[name] = mine

        def lists(mine: list, given: list) -> list:
            out = list(mine)
            for k, j in zip(rows, other_rows):
                out[k] = given[j]
            return out

        rewards = {name: lists(values, other.rewards[name]) for name, values in self.rewards.items()}
        return replace(self, **replaced, finish_reason=lists(self.finish_reason, other.finish_reason),
                       completions=lists(self.completions, other.completions), rewards=rewards,
                       weight_version=max(self.weight_version, other.weight_version))
