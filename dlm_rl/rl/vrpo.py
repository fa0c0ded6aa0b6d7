"""VRPO (LLaDA 1.5, arXiv 2505.19223): DPO on ELBO estimates, with the estimator's variance cut.

Score ŝ = β[(B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))], loss −log σ(ŝ). The three variance reducers,
all unbiased, are options of `PreferenceEstimator`: the budget n = n_t × n_yt, its allocation (n_t timesteps,
n_yt masks each; n_yt = 1 is the optimal one), and antithetic sampling: the policy and the reference score a
response with the same MCNoise. With antithetic sampling and θ = ref, ŝ is exactly 0 and the loss log 2.
On a block-attention model B̂ is the block-diffusion ELBO (`dlm_rl.diffusion.elbo`), with per-block noise that the
policy and the reference share alike.

The reference is the disabled LoRA adapter (no second copy of the weights) or a separate frozen model. Reference
ELBOs computed ahead of time travel only with the noise that produced them (`ReferenceELBO`).

The defaults and where they depart from the paper: docs/algorithms.md, section 3.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm_rl.data.collate import DiffusionCollator, encode_completion
from dlm_rl.diffusion.elbo import elbo_blocks, noised_log_probs
from dlm_rl.diffusion.noise import MCNoise


def preference_score(policy_chosen, reference_chosen, policy_rejected, reference_rejected, beta: float):
    """ŝ per pair from the four ELBO estimates [B]."""
    return beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))


def preference_loss(score: torch.Tensor) -> torch.Tensor:
    """−log σ(ŝ), averaged over pairs."""
    return -F.logsigmoid(score).mean()


@dataclass(frozen=True)
class PreferenceEstimator:
    """How B̂ is estimated: budget n = n_t × n_yt draws, the estimator form, and antithetic sampling."""

    n_t: int = 8
    n_yt: int = 1
    antithetic: bool = True
    form: str = "tokens"

    def __post_init__(self):
        if self.n_t < 1 or self.n_yt < 1:
            raise ValueError(f"the budget needs n_t >= 1 and n_yt >= 1, got n_t={self.n_t}, n_yt={self.n_yt}")

    @property
    def budget(self) -> int:
        return self.n_t * self.n_yt

    def sample(self, response_mask: torch.Tensor, generator: torch.Generator | None,
               blocks: torch.Tensor | None = None) -> MCNoise:
        """The noise of one estimate; per block with `blocks` (`elbo_blocks` of the model)."""
        return MCNoise.sample(response_mask, n_t=self.n_t, n_yt=self.n_yt, form=self.form, generator=generator,
                              blocks=blocks)


@dataclass
class ReferenceELBO:
    """A reference ELBO's per-draw terms [n, B] and the noise they were computed with (antithetic sampling reuses
    that noise)."""

    draws: torch.Tensor
    noise: MCNoise


def elbo_draws(model, batch: dict, noise: MCNoise, draws_per_graph: int | None = None) -> torch.Tensor:
    """[n, B] per-draw ELBO terms w_k Σ_i 1[masked] log p (`MCNoise.terms`); their mean over draws is the
    estimate B̂. With `draws_per_graph`, the draws are computed that many at a time, each batch's activations
    recomputed in the backward pass (`noised_log_probs(recompute=True)`)."""
    logp = noised_log_probs(model, batch["input_ids"], noise, batch["attention_mask"],
                            draws_per_forward=draws_per_graph, recompute=draws_per_graph is not None)
    return noise.terms(logp)


def collate_pairs(tokenizer, rows: list[dict], response_length: int) -> tuple[dict, dict]:
    """(chosen batch, rejected batch) from rows with `prompt`, `chosen`, `rejected` (text or chat messages)."""
    for i, row in enumerate(rows):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
        if missing:
            raise ValueError(f"preference row {i} lacks column(s) {missing}; it has {sorted(row)}")
        for column in ("chosen", "rejected"):
            if not _text(row[column]).strip():
                raise ValueError(f"preference row {i} has an empty {column!r} response")
    collator = DiffusionCollator(tokenizer, response_length)
    chosen = collator([{"prompt": r["prompt"], "completion": _text(r["chosen"])} for r in rows])
    rejected = collator([{"prompt": r["prompt"], "completion": _text(r["rejected"])} for r in rows])
    return chosen, rejected


def fitting_pairs(tokenizer, rows: list[dict], response_length: int) -> list[bool]:
    """Per row: do both responses, plus one EOS, fit a canvas of `response_length` tokens?"""
    return [
        all(len(encode_completion(tokenizer, _text(row[c]))) + 1 <= response_length for c in ("chosen", "rejected"))
        for row in rows
    ]


def _text(response) -> str:
    """A response given as text, or as chat messages whose last turn is the assistant's."""
    if isinstance(response, list):
        if not response or not isinstance(response[-1], dict) or "content" not in response[-1]:
            raise ValueError(f"a chat-message response must end with a message dict, got {response!r:.80}")
        return response[-1]["content"]
    if not isinstance(response, str):
        raise TypeError(f"a response must be text or chat messages, got {type(response).__name__}")
    return response


def reference_elbo(model, batch: dict, noise: MCNoise, frozen=None, draws_per_forward: int | None = None
                   ) -> ReferenceELBO:
    """B̂_ref of a batch under `noise`: the frozen model if given, else `model` with its LoRA adapter disabled."""
    with torch.no_grad(), _reference(model, frozen) as reference:
        draws = elbo_draws(reference, batch, noise, draws_per_forward)
    return ReferenceELBO(draws.detach(), noise)


@contextlib.contextmanager
def _reference(model, frozen):
    if frozen is not None:
        yield frozen
        return
    if not hasattr(model.model, "disable_adapter"):
        raise ValueError("the reference is the disabled LoRA adapter: add a LoRA adapter or pass a frozen model")
    with model.model.disable_adapter():
        yield model


def vrpo_loss(
    model,
    chosen: dict,
    rejected: dict,
    estimator: PreferenceEstimator,
    beta: float,
    *,
    generator: torch.Generator | None = None,
    frozen=None,
    reference: tuple[ReferenceELBO, ReferenceELBO] | None = None,
    draws_per_graph: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """The VRPO loss of a batch of pairs, and its statistics.

    `draws_per_graph` bounds activation memory: the policy's draws are computed that many at a time and recomputed
    in the backward pass, so one batch of draws (of every pair of the batch, on one side) holds activations at a
    time; the loss and its gradient are the same.

    The policy's noise is drawn here (or, with antithetic sampling and precomputed `reference`, taken from it),
    per block on a block-attention model (`elbo_blocks`); without antithetic sampling the reference gets its own
    independent draws. `estimator_var` estimates Var[ŝ] over the noise from the spread of the per-draw scores
    (their variance / n, averaged over pairs).
    """
    estimates = {}
    for name, batch, ref in zip(("chosen", "rejected"), (chosen, rejected), reference or (None, None)):
        blocks = elbo_blocks(model, batch["attention_mask"])
        if ref is not None and estimator.antithetic:
            noise = ref.noise
        else:
            noise = estimator.sample(batch["response_mask"], generator, blocks)
        if ref is None:
            ref_noise = noise if estimator.antithetic else estimator.sample(batch["response_mask"], generator, blocks)
            ref = reference_elbo(model, batch, ref_noise, frozen, draws_per_graph)
        estimates[name] = (elbo_draws(model, batch, noise, draws_per_graph), ref.draws)
    per_draw = preference_score(*estimates["chosen"], *estimates["rejected"], beta)  # [n, B]
    score = per_draw.mean(0)
    loss = preference_loss(score)
    with torch.no_grad():
        n = per_draw.shape[0]
        stats = {
            "score_mean": float(score.mean()),
            "implicit_accuracy": float((score > 0).float().mean()),
            "reward_margin": float(score.mean() / beta) if beta else 0.0,
            "estimator_var": float(per_draw.var(0).mean() / n) if n > 1 else float("nan"),
        }
    return loss, {**stats, "score": score.detach()}
