"""MCNoise: the Monte Carlo noise of a likelihood estimate, as an explicit object.

A draw is a set of masked response positions plus its importance weight. Two unbiased forms exist:
- "time":   t ~ U(t_min, 1), each response token masked with probability p(t), weight w(t) (1/t if linear);
- "tokens": ℓ ~ U{1..L}, exactly ℓ of the L response tokens masked uniformly, weight L/ℓ (lower variance).
A budget n = n_t × n_yt draws n_t timesteps (or ℓ values) and n_yt masks at each. Passing the same MCNoise
to the policy and the reference is VRPO's antithetic sampling; reusing it across inner updates aligns masks.

Per-block noise is the block-diffusion form (BD3-LM, arXiv 2503.09573; SDAR, arXiv 2510.06303): every attention
block of a row's response gets draws of its own, of the same law over that block's response tokens (ℓ_b ~ U{1..L_b}
with weight L_b/ℓ_b, or its own t_b with weight w(t_b)), and every position carries its block's weight and time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm_rl.diffusion.schedules import get_schedule

FORMS = ("time", "tokens")


@dataclass
class MCNoise:
    masked: torch.Tensor  # [n, B, T] bool: positions replaced by [MASK] in draw k (response positions only)
    weight: torch.Tensor  # [n, B] float: importance weight of draw k for row b ([n, B, T] per block: 0 off-response)
    t: torch.Tensor  # [n, B] float: the draw's time (time form) or fraction ℓ/L (tokens form) ([n, B, T] per block)
    form: str = "tokens"
    schedule: str = "linear"

    def __len__(self) -> int:
        return self.masked.shape[0]

    @property
    def per_block(self) -> bool:
        """Whether every response block has draws of its own (weights per position)."""
        return self.weight.dim() == 3

    def terms(self, log_probs: torch.Tensor) -> torch.Tensor:
        """[n, B] per-draw ELBO terms from [n, B, T] log-probs (0 where not masked): w Σ_i log p_i, or Σ_i w_i log p_i
        with per-block weights."""
        if self.per_block:
            return (self.weight * log_probs).sum(-1)
        return self.weight * log_probs.sum(-1)

    def to(self, device) -> MCNoise:
        return MCNoise(self.masked.to(device), self.weight.to(device), self.t.to(device), self.form, self.schedule)

    @classmethod
    def sample(
        cls,
        response_mask: torch.Tensor,
        *,
        n_t: int = 1,
        n_yt: int = 1,
        form: str = "tokens",
        schedule: str = "linear",
        t_min: float = 1e-3,
        generator: torch.Generator | None = None,
        blocks: torch.Tensor | None = None,
    ) -> MCNoise:
        """Draw n_t × n_yt masks over the True positions of `response_mask` [B, T] (the prompt is never masked).
        With `blocks` [B, T], the attention block of every column, every block of a row's response gets draws of
        its own (per-block noise, module docstring)."""
        if form not in FORMS:
            raise ValueError(f"unknown estimator form {form!r}; choose one of {FORMS}")
        if n_t < 1 or n_yt < 1:
            raise ValueError(f"the budget needs n_t >= 1 and n_yt >= 1, got n_t={n_t}, n_yt={n_yt}")
        if blocks is not None:
            return cls._sample_blocks(response_mask.bool(), blocks, n_t, n_yt, form, schedule, t_min, generator)
        response = response_mask.bool()
        batch, width = response.shape
        device = response.device
        lengths = response.sum(-1)  # [B]
        n = n_t * n_yt
        # Uniform scores, one per position and draw; masking the lowest scores picks uniform subsets.
        scores = torch.rand(n, batch, width, generator=generator, device=device)  # [n, B, T]
        scores = scores.masked_fill(~response, 2.0)
        if form == "tokens":
            # ℓ ~ U{1..L_b}, shared by the n_yt masks of one draw of ℓ.
            u = torch.rand(n_t, batch, generator=generator, device=device).repeat_interleave(n_yt, dim=0)  # [n, B]
            count = (u * lengths).floor().long() + 1  # [n, B]
            count = torch.minimum(count, lengths.clamp(min=1))
            rank = scores.argsort(-1).argsort(-1)  # [n, B, T]: rank of each position's score
            masked = (rank < count[..., None]) & response
            weight = lengths / count  # [n, B]: L/ℓ
            weight = torch.where(lengths > 0, weight, torch.zeros_like(weight))
            t = count / lengths.clamp(min=1)
        else:
            sched = get_schedule(schedule)
            t = t_min + (1 - t_min) * torch.rand(n_t, batch, generator=generator, device=device)
            t = t.repeat_interleave(n_yt, dim=0)  # [n, B]
            masked = (scores < sched.mask_prob(t)[..., None]) & response
            weight = sched.weight(t)
        return cls(masked, weight.float(), t.float(), form, schedule)

    @classmethod
    def _sample_blocks(cls, response, blocks, n_t, n_yt, form, schedule, t_min, generator) -> MCNoise:
        """Per-block noise: the law of `sample` drawn independently in every block of every row's response, each
        block's n_t times (or ℓ values) shared by its n_yt masks."""
        n, (batch, width), device = n_t * n_yt, response.shape, response.device
        first = torch.where(response, blocks, blocks.max() + 1).amin(-1, keepdim=True)
        index = torch.where(response, blocks - first, 0)  # [B, T]: response block of a position, from the first
        count_blocks = int(index.max()) + 1
        lengths = torch.zeros(batch, count_blocks, dtype=torch.long, device=device).scatter_add_(
            1, index, response.long())  # [B, K]: L_b

        def per_position(values: torch.Tensor) -> torch.Tensor:  # [n, B, K] per block -> [n, B, T] per position
            return values.gather(-1, index.expand(n, batch, width))

        scores = torch.rand(n, batch, width, generator=generator, device=device).masked_fill(~response, 2.0)
        u = torch.rand(n_t, batch, count_blocks, generator=generator, device=device).repeat_interleave(n_yt, dim=0)
        if form == "tokens":
            count = torch.minimum((u * lengths).floor().long() + 1, lengths.clamp(min=1))  # [n, B, K]: ℓ_b
            count, length = per_position(count), per_position(lengths.expand(n, -1, -1))
            masked = (_rank_within_blocks(scores, response, index, lengths) < count) & response
            weight = length / count  # L_b/ℓ_b
            t = count / length.clamp(min=1)
        else:
            sched = get_schedule(schedule)
            t = per_position(t_min + (1 - t_min) * u)
            masked = (scores < sched.mask_prob(t)) & response
            weight = sched.weight(t)
        return cls(masked, torch.where(response, weight, 0.0).float(), torch.where(response, t, 0.0).float(), form,
                   schedule)

    def complement(self, response_mask: torch.Tensor) -> MCNoise:
        """The complementary masks (LaViDa): every response token is masked in a draw or in its complement, and
        the complement is itself a draw of the same law (t' with p(t') = 1 − p(t); ℓ' = L − ℓ), so an estimate
        from complements is unbiased too. A time-form complement that masks nothing gets weight 0. Per-block noise
        takes the complement of every block."""
        response = response_mask.bool()
        if self.per_block:
            return self._block_complement(response)
        masked = response & ~self.masked
        if self.form == "tokens":
            # ℓ' = L − ℓ is uniform on {0..L−1}; where it is 0 (the draw masked everything) the complement masks
            # everything too, so ℓ' is uniform on {1..L} with uniform subsets: exactly the tokens-form law.
            masked = torch.where(masked.any(-1, keepdim=True), masked, response)
            lengths = response.sum(-1).float()  # [B]
            count = masked.sum(-1).float()  # [n, B]
            weight = torch.where(count > 0, lengths / count.clamp(min=1), torch.zeros_like(count))
            t = count / lengths.clamp(min=1)
        else:
            sched = get_schedule(self.schedule)
            t = sched.time_of(1 - sched.mask_prob(self.t)).clamp(min=1e-6)
            weight = sched.weight(t)
        return MCNoise(masked, weight, t, self.form, self.schedule)

    def _block_complement(self, response: torch.Tensor) -> MCNoise:
        """`complement` of per-block noise, read off each position's own block time: ℓ'/L = 1 − ℓ/L, or the whole
        block again where the draw masked it whole (tokens); t' with p(t') = 1 − p(t) (time)."""
        if self.form == "tokens":
            whole = self.t >= 1
            masked = response & (~self.masked | whole)
            t = torch.where(whole, torch.ones_like(self.t), 1 - self.t)
            weight = 1 / t
        else:
            masked = response & ~self.masked
            sched = get_schedule(self.schedule)
            t = sched.time_of(1 - sched.mask_prob(self.t)).clamp(min=1e-6)
            weight = sched.weight(t)
        return MCNoise(masked, torch.where(response, weight, 0.0), torch.where(response, t, 0.0), self.form,
                       self.schedule)


def _rank_within_blocks(scores, response, index, lengths) -> torch.Tensor:
    """[n, B, T] rank of every response position's score among the response positions of its block (`index`, with
    `lengths` [B, K] positions per block): sorting by (block, score), minus the positions of earlier blocks."""
    width = scores.shape[-1]
    by_score = scores.argsort(-1).argsort(-1)  # rank within the row
    key = torch.where(response, index, lengths.shape[-1]) * width + by_score  # other positions sort last
    earlier = (lengths.cumsum(-1) - lengths).gather(-1, index)  # [B, T]
    return key.argsort(-1).argsort(-1) - earlier
