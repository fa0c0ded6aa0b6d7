"""Noise schedules of the masking forward process.

A schedule gives α_t, the probability that a token is still clean at time t ∈ (0, 1], so a token is masked with
probability p(t) = 1 − α_t, and the ELBO weight w(t) = −α'_t / (1 − α_t) (1/t for the linear schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    name: str
    eps: float = 1e-3  # log-linear only: α_1 = eps keeps σ(t) = −log α_t finite

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) = 1 − α_t."""
        if self.name == "linear":
            return t
        if self.name == "cosine":
            return 1 - torch.cos(math.pi / 2 * t)
        return (1 - self.eps) * t  # log-linear: α_t = 1 − (1 − eps) t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = −α'_t / (1 − α_t)."""
        if self.name == "cosine":
            return (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - torch.cos(math.pi / 2 * t))
        return 1 / t  # linear, and log-linear: (1 − eps) / ((1 − eps) t)

    def time_of(self, p: torch.Tensor) -> torch.Tensor:
        """Inverse of mask_prob: the time at which a token is masked with probability p."""
        if self.name == "linear":
            return p
        if self.name == "cosine":
            return (2 / math.pi) * torch.arccos(1 - p)
        return p / (1 - self.eps)


SCHEDULES = ("linear", "cosine", "log-linear")


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")
    return Schedule(name)
