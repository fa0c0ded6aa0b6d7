"""The PPO-clip policy loss on trace tokens, with a k3 KL penalty."""

from __future__ import annotations

import torch


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: r − log r − 1 with r = π_ref/π (≥ 0, unbiased)."""
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - log_ratio - 1


def ppo_trace_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    normaliser: str | int = "tokens",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """−(1/N) Σ_rows (w_row/L_row) Σ_targets min(ρA, clip(ρ, 1−ε, 1+ε)A)  +  β · the same average of k3-KL (unweighted).

    All tensors are [N, R] (advantages may be [N, 1]); `targets` marks the trained tokens, `weights` [N] (default 1)
    scale each row's surrogate (the 1/t of randomly masked rows). `logp_ref` is the
    KL anchor (π_old, or the frozen reference); without it the KL is taken to `logp_old`. `normaliser` is
    "tokens" (L_row = the row's number of targets) or a constant (e.g. the response length).
    """
    targets = targets.to(logp.dtype)
    if normaliser == "tokens":
        per_row = targets.sum(dim=1).clamp(min=1)
    elif isinstance(normaliser, int) and normaliser > 0:
        per_row = torch.full_like(targets[:, 0], float(normaliser))
    else:
        raise ValueError(f"normaliser must be 'tokens' or a positive int, got {normaliser!r}")
    ratio = torch.exp(logp - logp_old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    kl = k3_kl(logp, (logp_old if logp_ref is None else logp_ref).detach())

    def average(x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        per_row_mean = (x * targets).sum(dim=1) / per_row
        return (per_row_mean if row_weights is None else per_row_mean * row_weights).mean()

    loss = -average(surrogate, weights) + beta * average(kl)
    count = targets.sum().clamp(min=1)
    with torch.no_grad():
        stats = {
            "kl": float(average(kl)),
            "clip_fraction": float((((ratio - 1).abs() > epsilon).to(logp.dtype) * targets).sum() / count),
            "ratio_mean": float((ratio * targets).sum() / count),
        }
    return loss, stats
