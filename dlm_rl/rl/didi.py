"""DiDi-Instruct's parts (arXiv 2509.25035): the discriminator, the student's rollout and its
log-likelihood, the reward, grouped normalisation, the time weight ω(t) and the regularisers.

The student minimises ∫ ω(t) KL(q_student(·, t) ‖ q_teacher(·, t)) dt. Its gradient has the policy-gradient form
E[ω(τ) · r(z_τ) · ∇ log q_student(x)], where r is the log density ratio of data to student marginals at z_τ,
estimated by a discriminator: a copy of the teacher, only its last blocks trainable, with a per-token logit head
trained by BCE on masked positions ("real" = data noised at τ, "fake" = student samples noised at τ), so its
optimal logit is that log ratio and higher means more teacher-like (optionally the frozen teacher's
pseudo-log-likelihood of the visible tokens is added to the logit as a prior, the BCE then training the residual:
on the facts testbed the head alone does not see the teacher's few-step errors). The student rolls out two steps,
all-mask → x_τ → x_0, and log q(x) = log q(x_τ | all-mask) + log q(x_0 | x_τ) over the tokens each step reveals
(or, as an option, the few ancestral steps it is sampled with, log q(x) summing over every step).

The objective and where this code currently departs from the paper: docs/algorithms.md, section 6.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlm_rl.sampling.decoding import sample_tokens


class Discriminator(nn.Module):
    """A teacher copy whose last `trainable_blocks` transformer blocks (and final norm) train, read by a
    zero-initialised per-token logit head: D = 0 everywhere at the start.

    With `likelihood_prior` w > 0 every position's logit also gets w · ℓ(z), ℓ the frozen teacher's
    pseudo-log-likelihood of the input's visible response tokens (`teacher_log_likelihood`): a prior for the log
    density ratio, so the head and blocks, trained by the same BCE on the sum, learn only the residual. The prior
    needs token ids; a forward on `inputs_embeds` (gradient guidance) reads the learned part alone."""

    def __init__(self, teacher, trainable_blocks: int = 2, likelihood_prior: float = 0.0,
                 likelihood_folds: int = 4):
        super().__init__()
        if likelihood_prior < 0 or likelihood_folds < 1:
            raise ValueError(f"need likelihood_prior >= 0 and likelihood_folds >= 1, got {likelihood_prior}, "
                             f"{likelihood_folds}")
        self.backbone = copy.deepcopy(teacher).requires_grad_(False)
        blocks = _blocks(self.backbone.model)
        if not 1 <= trainable_blocks <= len(blocks):
            raise ValueError(f"trainable_blocks must be in [1, {len(blocks)}], got {trainable_blocks}")
        for block in blocks[-trainable_blocks:]:
            block.requires_grad_(True)
        norm = getattr(getattr(self.backbone.model, "model", None), "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
        self.head = nn.Linear(teacher.config.hidden_size, 1, device=teacher.device, dtype=teacher.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.likelihood_prior, self.likelihood_folds = likelihood_prior, likelihood_folds
        self._teacher = (teacher,)  # a tuple: the frozen teacher is used, not owned (nor saved) by D

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, response_mask=None,
                generator=None) -> torch.Tensor:
        """[B, L] per-token logits (float32). `response_mask` (default: every position) bounds the
        tokens the likelihood prior scores; its folds are drawn with `generator`."""
        out = self.backbone(input_ids, attention_mask, inputs_embeds=inputs_embeds, output_hidden_states=True)
        logits = self.head(out.hidden_states).squeeze(-1).float()
        if self.likelihood_prior and input_ids is not None:
            region = response_mask if response_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            prior = teacher_log_likelihood(self._teacher[0], input_ids, attention_mask, region,
                                           self.likelihood_folds, generator)
            logits = logits + self.likelihood_prior * prior[:, None]
        return logits


def save_discriminator(discriminator: Discriminator, directory: str) -> None:
    """`discriminator.pt` (the weights) and `discriminator.json` (the likelihood prior's settings) in `directory`."""
    torch.save(discriminator.state_dict(), os.path.join(directory, "discriminator.pt"))
    with open(os.path.join(directory, "discriminator.json"), "w") as f:
        json.dump({"likelihood_prior": discriminator.likelihood_prior,
                   "likelihood_folds": discriminator.likelihood_folds}, f)


def load_discriminator(teacher, directory: str) -> Discriminator:
    """The discriminator `save_discriminator` wrote to `directory`, on top of `teacher`."""
    settings_path = os.path.join(directory, "discriminator.json")
    settings = {}
    if os.path.isfile(settings_path):  # saved before the likelihood prior existed: the plain discriminator
        with open(settings_path) as f:
            settings = json.load(f)
    discriminator = Discriminator(teacher, **settings)
    discriminator.load_state_dict(torch.load(os.path.join(directory, "discriminator.pt"), map_location=teacher.device))
    return discriminator


@torch.no_grad()
def teacher_log_likelihood(teacher, z, attention_mask, response_mask, folds: int = 4, generator=None) -> torch.Tensor:
    """[B] the teacher's pseudo-log-likelihood of z's visible response tokens: the mean over them of log p(token |
    z with the token's fold masked again). Each visible response token joins one of `folds` random folds, and each
    fold is scored in its own forward, so every token is scored once with about 1/folds of its context hidden.
    Low where a token contradicts its visible context (a wrong sum, a broken chain); 0 for a row with no visible
    response token."""
    mask_id = teacher.mask_token_id
    visible = response_mask.bool() & (z != mask_id)
    fold = torch.randint(0, folds, z.shape, generator=generator, device=z.device)
    total = torch.zeros(len(z), device=z.device)
    for k in range(folds):
        remasked = visible & (fold == k)
        if remasked.any():
            log_probs = _token_log_probs(teacher(z.masked_fill(remasked, mask_id), attention_mask).logits, z)
            total += torch.where(remasked, log_probs, 0.0).sum(1)
    return total / visible.sum(1).clamp(min=1)


def _blocks(model) -> nn.ModuleList:
    """The transformer blocks of a transformers model: the ModuleList with one entry per hidden layer."""
    layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise ValueError(f"cannot find the {layers} transformer blocks of {type(model).__name__}")


def discriminator_loss(
    real_logits: torch.Tensor, real_masked: torch.Tensor, fake_logits: torch.Tensor, fake_masked: torch.Tensor,
    label_smoothing: float = 0.1, counts: tuple[float, float] | None = None,
) -> torch.Tensor:
    """BCE on masked positions, real → 1 and fake → 0 softened to 1 − ε/2 and ε/2; each side is the mean over
    its masked positions, and the loss is the mean of the two sides. `counts` (real, fake) replace the numbers of
    masked positions the sides are divided by (under data parallelism: the global numbers)."""
    real = real_logits[real_masked]
    fake = fake_logits[fake_masked]
    real_count, fake_count = counts or (real.numel(), fake.numel())
    high, low = 1 - label_smoothing / 2, label_smoothing / 2
    bce = F.binary_cross_entropy_with_logits
    return 0.5 * (bce(real, torch.full_like(real, high), reduction="sum") / max(real_count, 1)
                  + bce(fake, torch.full_like(fake, low), reduction="sum") / max(fake_count, 1))


def discriminator_reward(logits: torch.Tensor, masked: torch.Tensor, clip: float = 8.0) -> torch.Tensor:
    """[B] reward: the per-token logits clipped to ±clip, averaged over each row's masked positions (0 if none)."""
    clipped = logits.clamp(-clip, clip) * masked
    return clipped.sum(1) / masked.sum(1).clamp(min=1)


def grouped_advantages(rewards: torch.Tensor, group_size: int, clip: float = 3.0) -> torch.Tensor:
    """Rewards of consecutive groups of `group_size` rows (the repeats of one prompt), normalised within the
    group: clip((r − mean_g) / (std_g + 1e−8), ±clip)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size).double()
    std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    normalised = (groups - groups.mean(1, keepdim=True)) / (std + 1e-8)
    return normalised.clamp(-clip, clip).flatten().to(rewards.dtype)


def time_weight(t: torch.Tensor, low: float = 0.1, high: float = 10.0) -> torch.Tensor:
    """ω(t) = 1/t clamped to [low, high]."""
    return (1 / t).clamp(low, high)


def noise_at(ids: torch.Tensor, response_mask: torch.Tensor, t: torch.Tensor, mask_token_id: int, generator=None):
    """(z_t, masked): every response token masked independently with probability t[b]."""
    u = torch.rand(ids.shape, generator=generator, device=ids.device, dtype=torch.float64)
    masked = response_mask & (u < t[:, None].double())
    return ids.masked_fill(masked, mask_token_id), masked


@dataclass
class Rollout:
    """The student's ancestral rollout from all-mask to x_0 over a batch of rows [B, L], one entry per step."""

    states: list[torch.Tensor]
    """[B, L] the state each step starts from: `states[0]` is the prompt with every response position masked;
    in the two-step rollout `states[1]` is x_τ."""
    revealed: list[torch.Tensor]
    """[B, L] bool: the response positions each step reveals (together: every response position, once)."""
    logits: list[torch.Tensor]
    """[B, L, V] the student's logits at each state (with the graph when rolled out with gradients)."""
    final: torch.Tensor
    """[B, L] x_0."""
    tau: torch.Tensor
    """[B] the discriminator's time (in the two-step rollout also the intermediate state's)."""

    def log_prob(self) -> torch.Tensor:
        """[B] Σ_steps log q(tokens revealed | the step's state): in two steps log q(x_τ | all-mask) +
        log q(x_0 | x_τ)."""
        return sum((_token_log_probs(logits, self.final) * revealed).sum(1)
                   for logits, revealed in zip(self.logits, self.revealed))


def rollout(student, input_ids, attention_mask, response_mask, tau, steps: int = 2, generator=None) -> Rollout:
    """Roll the student out in `steps` ancestral steps (tokens drawn at temperature 1, noise in float64).

    Two steps is DiDi-Instruct's all-mask → x_τ → x_0: each response position is revealed first with probability
    1 − τ, then every remaining one. More steps follow the sampler's schedule (`ancestral_sample`: time 1 → 0 in
    equal steps, a masked position revealed with probability 1/(steps − k) at step k), so the student is trained
    on the samples it is evaluated on; τ is then only the discriminator's time. Run under `torch.enable_grad()`
    to keep the logits' graph for `log_prob`."""
    if steps < 2:
        raise ValueError(f"rollout steps must be at least 2, got {steps}")
    mask_id = student.mask_token_id
    state = input_ids.masked_fill(response_mask, mask_id)
    still_masked = response_mask.clone()
    states, revealed, all_logits = [], [], []
    for k in range(steps):
        logits = student(state, attention_mask).logits
        tokens, _ = sample_tokens(logits.detach(), 1.0, generator)
        if k == steps - 1:
            reveal = still_masked
        else:
            u = torch.rand(state.shape, generator=generator, device=state.device, dtype=torch.float64)
            keep = tau[:, None].double() if steps == 2 else 1 - 1.0 / (steps - k)
            reveal = still_masked & (u >= keep)
        states.append(state)
        revealed.append(reveal)
        all_logits.append(logits)
        state = torch.where(reveal, tokens, state)
        still_masked = still_masked & ~reveal
    return Rollout(states, revealed, all_logits, state, tau)


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def conditional_kl(student_logits, teacher, sample: Rollout, attention_mask, folds: int = 4, generator=None,
                   ) -> tuple[torch.Tensor, int]:
    """(Σ, n): the sum over the n tokens the rollout's steps reveal of KL(q_i ‖ p_i), q_i the student's
    distribution at the step's state and p_i the teacher's conditional of token i given that state and the
    other tokens the step reveals — all but those of i's fold (one of `folds` random folds of the step's
    revealed tokens), masked again with i. `student_logits` are the rollout's per-step logits.

    The path of a few-step sampler draws the tokens a step reveals independently; the teacher's joint ties them.
    The KL of the two paths is Σ_k E KL(Π_i q(x_i | s_k) ‖ p(x_{R_k} | s_k)), and the fixed point of each term
    in q_i is q_i ∝ exp E_{x_{R∖i} ∼ q} log p(x_i | s_k, x_{R∖i}): this loss's minimiser, with the states
    held at the student's own. It sharpens the student where tokens revealed together must agree, which the
    marginal KL (`kl_and_entropy`) cannot see."""
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    mask_id = teacher.mask_token_id
    total, count = torch.zeros((), device=sample.final.device), 0
    for k, (logits, revealed) in enumerate(zip(student_logits, sample.revealed)):
        if not revealed.any():
            continue
        after = sample.states[k + 1] if k + 1 < len(sample.states) else sample.final
        fold = torch.randint(0, folds, after.shape, generator=generator, device=after.device)
        for f in range(folds):
            positions = revealed & (fold == f)
            if not positions.any():
                continue
            with torch.no_grad():
                teacher_logits = teacher(after.masked_fill(positions, mask_id), attention_mask).logits
            log_p = teacher_logits[positions].float().clamp(min=-1e4).log_softmax(-1)
            log_q_f = logits[positions].float().clamp(min=-1e4).log_softmax(-1)
            total = total + (log_q_f.exp() * (log_q_f - log_p)).sum()
            count += int(positions.sum())
    return total, count


def kl_and_entropy(student_logits, teacher_logits, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over `positions` [B, L] of KL(teacher ‖ student) and of the student's entropy, per token."""
    if not positions.any():
        zero = student_logits.sum() * 0
        return zero, zero
    # The mask token's logit is -inf in both; a finite floor keeps 0 · (−inf) out of the sums and the gradient.
    log_q = student_logits[positions].float().clamp(min=-1e4).log_softmax(-1)
    log_p = teacher_logits[positions].float().clamp(min=-1e4).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    return kl.mean(), entropy.mean()
