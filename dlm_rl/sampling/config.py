"""Sampler configuration, validated up front so a bad setting fails before any forward pass."""

from __future__ import annotations

from dataclasses import dataclass

REMASKING = ("low_confidence", "random")


@dataclass
class SamplerConfig:
    gen_length: int = 32
    """Response canvas length in tokens."""
    block_length: int | None = None
    """Semi-autoregressive block length (must divide gen_length); None = one block of gen_length."""
    steps: int | None = None
    """Total denoising steps over all blocks (a multiple of the number of blocks); None = gen_length."""
    temperature: float = 0.0
    """0 = greedy; otherwise Gumbel-max sampling at this temperature, in float64."""
    remasking: str = "low_confidence"
    """Which masked positions to commit each step: the most confident ones, or random ones."""

    def __post_init__(self):
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be positive, got {self.gen_length}")
        if self.block_length is None:
            self.block_length = self.gen_length
        if self.block_length < 1 or self.gen_length % self.block_length:
            raise ValueError(
                f"block_length={self.block_length} does not divide gen_length={self.gen_length}; "
                f"choose a divisor such as {_divisors(self.gen_length)}"
            )
        if self.steps is None:
            self.steps = self.gen_length
        if self.steps < self.num_blocks or self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} must be a positive multiple of the number of blocks ({self.num_blocks} = "
                f"gen_length {self.gen_length} / block_length {self.block_length})"
            )
        if self.steps // self.num_blocks > self.block_length:
            raise ValueError(
                f"steps={self.steps} gives {self.steps // self.num_blocks} steps per block, more than the "
                f"{self.block_length} tokens of a block; use at most {self.block_length * self.num_blocks} steps"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
