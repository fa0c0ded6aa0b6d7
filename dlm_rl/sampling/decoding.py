"""The per-step decisions of a diffusion sampler, as pure functions on one block of logits.

Each step proposes a candidate token for every masked position (greedy or Gumbel-max), ranks the positions
(LLaDA confidence, random, Dream's entropy or margin) and commits some of them: a fixed number from the
schedule (LLaDA), every position above a confidence threshold, or Fast-dLLM's factor rule.
"""

from __future__ import annotations

import math

import torch


def sample_tokens(logits: torch.Tensor, temperature: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens and their log-probability under the model (softmax of the plain logits, float64)."""
    logits = logits.double()  # float32 Gumbel noise truncates the tail and biases samples
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        tokens = (logits / temperature + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    log_probs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, log_probs


def ordering_scores(
    logits: torch.Tensor, log_probs: torch.Tensor, ordering: str, generator=None
) -> torch.Tensor:
    """Higher = commit earlier. [.., V] logits and the candidates' log-probs -> [..] scores (float64)."""
    if ordering == "low_confidence":
        return log_probs.exp()
    if ordering == "random":
        return torch.rand(log_probs.shape, generator=generator, dtype=torch.float64, device=log_probs.device)
    probs = logits.double().softmax(-1)
    if ordering == "entropy":
        return (probs * probs.clamp_min(1e-300).log()).sum(-1)  # negative entropy
    if ordering == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    raise ValueError(f"unknown ordering {ordering!r}")


def tokens_per_step(masked_count: int, steps: int, shift: float = 1.0) -> list[int]:
    """How many of a block's masked tokens each of its steps commits.

    Time runs from t=1 (all masked) to 0 over `steps` equal steps; the fraction still masked after a step is
    the shifted time t' = alpha t / (1 + (alpha - 1) t). alpha = 1 splits evenly, earlier steps taking the
    remainder (LLaDA's schedule).
    """
    if shift == 1.0:
        base, extra = divmod(masked_count, steps)
        return [base + (1 if i < extra else 0) for i in range(steps)]
    counts, left = [], masked_count
    for i in range(1, steps + 1):
        t = 1 - i / steps
        target = math.floor(masked_count * shift * t / (1 + (shift - 1) * t))
        # at least one token per step, and at least one left for each later step
        remaining = max(min(target, left - 1), steps - i)
        counts.append(left - remaining)
        left = remaining
    return counts


def ranks(scores: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """0 for the highest-scoring masked position of each row, 1 for the next, ...; unmasked positions rank last."""
    order = scores.masked_fill(~masked, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def commit_top_k(scores: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Commit each row's k[b] best-scoring masked positions. [n, L] -> [n, L] bool."""
    return masked & (ranks(scores, masked) < k[:, None])


def commit_threshold(
    scores: torch.Tensor, confidence: torch.Tensor, masked: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Commit every masked position with confidence >= threshold, and at least the best-scoring one."""
    return masked & ((confidence >= threshold) | (ranks(scores, masked) == 0))


def commit_factor(scores: torch.Tensor, confidence: torch.Tensor, masked: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: with c_1 >= c_2 >= ... the masked confidences in order, commit the largest prefix
    of positions i with (i + 1)(1 - c_i) < factor (always the first)."""
    order = ranks(scores, masked)  # [n, L]
    sorted_conf = confidence.masked_fill(~masked, float("-inf")).sort(dim=-1, descending=True).values
    i = torch.arange(1, confidence.shape[-1] + 1, device=confidence.device, dtype=confidence.dtype)
    ok = (i + 1) * (1 - sorted_conf) < factor  # [n, L]
    ok[:, 0] = True
    count = ok.long().cumprod(-1).sum(-1)  # [n]
    return masked & (order < count[:, None])
