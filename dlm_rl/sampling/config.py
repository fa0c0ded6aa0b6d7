"""Sampler configuration, validated up front so a bad setting fails before any forward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

ORDERINGS = ("low_confidence", "random", "entropy", "margin")
CACHES = ("none", "prefix", "dual")


@dataclass
class SamplerConfig:
    gen_length: int = 32
    """Response canvas length in tokens."""
    block_length: int | None = None
    """Semi-autoregressive block length (must divide gen_length); None = the model's attention block for
    block-attention models, else one block of gen_length."""
    steps: int | None = None
    """Fixed schedule: total denoising steps over all blocks (a multiple of the number of blocks);
    None = gen_length, one token per step. Ignored by threshold and factor decoding."""
    threshold: float | None = None
    """Fast-dLLM parallel decoding: commit every masked position of the block whose confidence >= threshold
    (at least the most confident one) instead of a fixed number per step."""
    factor: float | None = None
    """Fast-dLLM factor rule: commit the n most confident positions with (i+1)(1 - c_i) < factor for all i <= n."""
    temperature: float = 0.0
    """0 = greedy; otherwise Gumbel-max sampling at this temperature, in float64."""
    remasking: str = "low_confidence"
    """Order in which masked positions are committed: probability of the candidate (LLaDA), random,
    negative entropy or top-2 margin (Dream)."""
    cache: str = "none"
    """KV cache: "prefix" reuses the prompt and finished blocks within a block, "dual" also the masked suffix.
    Exact for block-attention models, approximate for full attention (refreshed once per block)."""
    cfg_scale: float = 0.0
    """Classifier-free guidance: logits = u + (s+1)(c - u), u computed with the prompt masked (no cache)."""
    schedule_shift: float = 1.0
    """Fixed schedule only: alpha of the time shift t' = alpha t / (1 + (alpha - 1) t); > 1 commits fewer tokens
    in early steps and more later."""
    early_stop: bool = True
    """Once a row has committed EOS and every position left of it, fill its remaining masks with EOS without
    further forwards. The text up to the first EOS is fixed by then, so this never changes a decoded answer."""

    def __post_init__(self):
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be positive, got {self.gen_length}")
        if self.block_length is not None:
            self.check_block_length(self.block_length)
            self.steps_per_block(self.block_length)
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and not 0 < self.factor < math.inf:
            raise ValueError(f"factor must be positive and finite, got {self.factor}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set threshold or factor, not both")
        if self.parallel and self.remasking == "random":
            raise ValueError("threshold and factor decoding rank by confidence; they cannot use remasking='random'")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.remasking not in ORDERINGS:
            raise ValueError(f"remasking must be one of {ORDERINGS}, got {self.remasking!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {self.cache!r}")
        if not 0 <= self.cfg_scale < math.inf:
            raise ValueError(f"cfg_scale must be >= 0 and finite, got {self.cfg_scale}")
        if self.cfg_scale and self.cache != "none":
            raise ValueError("classifier-free guidance is implemented without KV caches; set cache='none'")
        if not 0 < self.schedule_shift < math.inf:
            raise ValueError(f"schedule_shift must be positive and finite, got {self.schedule_shift}")

    @property
    def parallel(self) -> bool:
        """True for threshold or factor decoding (a variable number of tokens per step)."""
        return self.threshold is not None or self.factor is not None

    def check_block_length(self, block_length: int) -> None:
        if block_length < 1 or self.gen_length % block_length:
            raise ValueError(
                f"block_length={block_length} does not divide gen_length={self.gen_length}; "
                f"choose a divisor such as {_divisors(self.gen_length)}"
            )

    def steps_per_block(self, block_length: int) -> int:
        """Steps of the fixed schedule in each block (validated against the block length in use)."""
        blocks = self.gen_length // block_length
        steps = self.gen_length if self.steps is None else self.steps
        if steps < blocks or steps % blocks:
            raise ValueError(
                f"steps={steps} must be a positive multiple of the number of blocks ({blocks} = "
                f"gen_length {self.gen_length} / block_length {block_length})"
            )
        if steps // blocks > block_length:
            raise ValueError(
                f"steps={steps} gives {steps // blocks} steps per block, more than the {block_length} tokens of "
                f"a block; use at most {block_length * blocks} steps"
            )
        return steps // blocks


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
