"""MCNoise: the Monte Carlo noise of a likelihood estimate, as an explicit object.

A draw is a set of masked response positions plus its importance weight. Two unbiased forms exist:
- "time":   t ~ U(t_min, 1), each response token masked with probability p(t), weight w(t) (1/t if linear);
- "tokens": ℓ ~ U{1..L}, exactly ℓ of the L response tokens masked uniformly, weight L/ℓ (lower variance).
A budget n = n_t × n_yt draws n_t timesteps (or ℓ values) and n_yt masks at each. Passing the same MCNoise
to the policy and the reference is VRPO's antithetic sampling; reusing it across inner updates aligns masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm_rl.diffusion.schedules import get_schedule

FORMS = ("time", "tokens")


@dataclass
class MCNoise:
    masked: torch.Tensor  # [n, B, T] bool: positions replaced by [MASK] in draw k (response positions only)
    weight: torch.Tensor  # [n, B] float: importance weight of draw k for row b
    t: torch.Tensor  # [n, B] float: the draw's time (time form) or fraction ℓ/L (tokens form)
    form: str = "tokens"
    schedule: str = "linear"

    def __len__(self) -> int:
        return self.masked.shape[0]

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
    ) -> MCNoise:
        """Draw n_t × n_yt masks over the True positions of `response_mask` [B, T] (the prompt is never masked)."""
        if form not in FORMS:
            raise ValueError(f"unknown estimator form {form!r}; choose one of {FORMS}")
        if n_t < 1 or n_yt < 1:
            raise ValueError(f"the budget needs n_t >= 1 and n_yt >= 1, got n_t={n_t}, n_yt={n_yt}")
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

    def complement(self, response_mask: torch.Tensor) -> MCNoise:
        """The complementary masks (LaViDa): every response token is masked in a draw or in its complement, and
        the complement is itself a draw of the same law (t' with p(t') = 1 − p(t); ℓ' = L − ℓ), so an estimate
        from complements is unbiased too. A time-form complement that masks nothing gets weight 0."""
        response = response_mask.bool()
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
