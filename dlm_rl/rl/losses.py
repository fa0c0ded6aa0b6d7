"""The PPO-clip policy loss on trace tokens, with a k3 KL penalty; the sequence-level PPO-clip loss on ELBO estimates,
with a k2 KL penalty (ESPO, GDPO); BGPO's bound of the sequence ratio, linear in its Monte Carlo draws; the ratio-free
losses: wd1's weighted likelihood and SPG's sandwiched bounds.

The loss as TraceRL and the baselines train it, and where it departs from TraceRL's reference code:
docs/algorithms.md, sections 4 and 5.
"""

from __future__ import annotations

import torch


LOG_RATIO_LIMIT = 10.0
"""|log ρ| and |log r| are clamped to this on the targets before `exp` (as TraceRL's reference code does), so that one
token whose probability collapsed gives a large, finite gradient (the guard and gradient clipping handle it)."""


def _log_ratio(numerator: torch.Tensor, denominator: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(numerator/denominator) on the targets, clamped to ±LOG_RATIO_LIMIT, and exactly 0 elsewhere: an
    off-target log-prob (−∞, or any value a sampler left there) never reaches `exp`, so it cannot make inf · 0 = NaN
    in the loss or its gradient."""
    difference = torch.where(targets, numerator - denominator, torch.zeros_like(numerator))
    return difference.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: r − log r − 1 with r = π_ref/π (≥ 0, unbiased); 0 off the
    `targets` (default: everywhere)."""
    if targets is None:
        targets = torch.ones_like(logp, dtype=torch.bool)
    log_ratio = _log_ratio(logp_ref, logp, targets.bool())
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
    trained = targets.bool()
    targets = targets.to(logp.dtype)
    if normaliser == "tokens":
        per_row = targets.sum(dim=1).clamp(min=1)
    elif isinstance(normaliser, int) and normaliser > 0:
        per_row = torch.full_like(targets[:, 0], float(normaliser))
    else:
        raise ValueError(f"normaliser must be 'tokens' or a positive int, got {normaliser!r}")
    ratio = torch.exp(_log_ratio(logp, logp_old, trained))
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    kl = k3_kl(logp, (logp_old if logp_ref is None else logp_ref).detach(), trained)

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


def weighted_likelihood_loss(logp: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor
                             ) -> tuple[torch.Tensor, dict[str, float]]:
    """wd1's loss: −(1/N) Σ_rows w_row · Σ_targets log p, the log-likelihood of each row's response summed over its
    trained tokens (no length normaliser, no ratio, no KL). `logp` and `targets` [N, R], `weights` [N] or [N, 1]."""
    likelihood = torch.where(targets.bool(), logp, torch.zeros_like(logp)).sum(dim=1)
    loss = -(weights.reshape(-1).to(logp.dtype) * likelihood).mean()
    return loss, {"log_likelihood": float(likelihood.detach().mean())}


def sequence_elbo(logp: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, sample: torch.Tensor,
                  samples: int) -> torch.Tensor:
    """[S] ELBO estimates: for each sample s < `samples`, Σ over its rows (`sample[n] == s`) of w_row · Σ_targets log p.
    `logp` and `targets` [N, R], `weights` and `sample` [N]."""
    per_row = torch.where(targets.bool(), logp, torch.zeros_like(logp)).sum(dim=1) * weights.to(logp.dtype)
    return torch.zeros(samples, dtype=logp.dtype, device=logp.device).index_add(0, sample, per_row)


def sequence_ppo_loss(
    elbo: torch.Tensor,
    elbo_old: torch.Tensor,
    advantages: torch.Tensor,
    length: int,
    *,
    epsilon: float = 0.2,
    beta: float = 0.0,
    elbo_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """−mean_s min(ρ_s A_s, clip(ρ_s, 1−ε, 1+ε) A_s)  +  β · mean_s (ℓ_s − ℓ_ref,s)² / (2L), with one ratio per sample
    ρ_s = exp((ℓ_s − ℓ_old,s) / L) from the ELBO estimates ℓ (ESPO: the sequence's log-likelihood per token, `length`
    L the response canvas) and the k2 KL of the ELBOs per token. All tensors [S]; the KL anchor `elbo_ref` defaults to
    `elbo_old`."""
    log_ratio = ((elbo - elbo_old.detach()) / length).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    advantages = advantages.to(elbo.dtype)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    kl = (elbo - (elbo_old if elbo_ref is None else elbo_ref).detach()) ** 2 / (2 * length)
    loss = -surrogate.mean() + beta * kl.mean()
    with torch.no_grad():
        stats = {"kl": float(kl.mean()), "clip_fraction": float(((ratio - 1).abs() > epsilon).to(elbo.dtype).mean()),
                 "ratio_mean": float(ratio.mean())}
    return loss, stats


def sandwiched_log_likelihood(logp: torch.Tensor, targets: torch.Tensor, sample: torch.Tensor, lengths: torch.Tensor,
                              positive: torch.Tensor, *, beta: float = 1.5, mix: float = 0.5) -> torch.Tensor:
    """[S] SPG's per-token log-likelihood of each sample s < len(`positive`) from its rows (`sample[n] == s`):
    a lower bound (ELBO: the mean over its rows of the mean log p of each row's targets) where `positive`, else
    mix · EUBO + (1 − mix) · ELBO, with the upper bound
        EUBO = (1/β) · mean over the tokens j some row masks of log( mean over rows of 1{j target} · p_j^β / t ),
    t the row's fraction of targets among the sample's `lengths` (its trainable span). `logp` and `targets` [N, R]."""
    samples = len(positive)
    trained = targets.bool()
    t = trained.to(logp.dtype)
    count = t.sum(dim=1)
    rows = torch.zeros(samples, dtype=logp.dtype, device=logp.device).index_add(0, sample, torch.ones_like(count))
    on_target = torch.where(trained, logp, torch.zeros_like(logp))
    row_mean = on_target.sum(dim=1) / count.clamp(min=1)
    elbo = torch.zeros_like(rows).index_add(0, sample, row_mean) / rows
    fraction = (count / lengths.to(logp.dtype)[sample]).clamp(min=1e-8)
    powered = torch.exp(beta * on_target) * t / fraction[:, None]
    average = torch.zeros(samples, logp.shape[1], dtype=logp.dtype, device=logp.device).index_add(0, sample, powered)
    average = average / rows[:, None]
    scored = average > 0
    logs = torch.log(torch.where(scored, average, torch.ones_like(average)))  # 0 where no row masks the token
    eubo = logs.sum(dim=1) / scored.sum(dim=1).clamp(min=1) / beta
    return torch.where(positive, elbo, mix * eubo + (1 - mix) * elbo)


def bounded_ratio_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """BGPO's loss: each row is one Monte Carlo draw of a response's ELBO, ℓ = w_row · Σ_targets log p, and with
    x = ℓ_θ − ℓ_old (clamped to ±LOG_RATIO_LIMIT) the loss is the mean over rows of −A(1 + x) where A ≥ 0 (exp's
    tangent, a lower bound of A·e^x) and −A·e^x where A < 0 (by Jensen, the mean of e^x over draws bounds e^(mean x)
    from above). Every term depends on one row only, so rows can be taken in any micro-batches (constant memory in
    the number of draws); at θ = θ_old value and gradient equal those of A·exp(mean x). `logp`, `logp_old`,
    `targets` [N, R]; `advantages` [N] or [N, 1]; `weights` [N]."""
    difference = torch.where(targets.bool(), logp - logp_old.detach(), torch.zeros_like(logp)).sum(dim=1)
    x = (weights.to(logp.dtype) * difference).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    advantages = advantages.reshape(-1).to(logp.dtype)
    ratio = torch.exp(x)
    loss = -(advantages * torch.where(advantages >= 0, 1 + x, ratio)).mean()
    return loss, {"ratio_mean": float(ratio.detach().mean())}
