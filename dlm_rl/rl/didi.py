"""DiDi-Instruct's parts (arXiv 2509.25035): the discriminator, the student's rollout and its
log-likelihood, the reward, grouped normalisation, the time weight ω(t) and the regularisers.

The student minimises ∫ ω(t) KL(q_student(·, t) ‖ q_teacher(·, t)) dt. Its gradient has the policy-gradient form
E[ω(τ) · r(z_τ) · ∇ log q_student(x)], where r is the log density ratio of data to student marginals at z_τ,
estimated by a discriminator: a copy of the teacher, only its last blocks trainable, the time fed through them,
with a per-token logit head trained by BCE on masked positions ("real" = data noised at τ, "fake" = student samples noised at τ), so its
optimal logit is that log ratio and higher means more teacher-like (optionally the frozen teacher's
pseudo-log-likelihood of the visible tokens is added to the logit as a prior, the BCE then training the residual:
on the facts testbed the head alone does not see the teacher's few-step errors). The student rolls out two steps,
all-mask → x_τ → x_0, and log q(x) = log q(x_τ | all-mask) + log q(x_0 | x_τ) over the tokens each step reveals
(or, as an option, the few ancestral steps it is sampled with, log q(x) summing over every step).

The objective, which paper choice each part follows and the options beyond it: docs/algorithms.md, section 6.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlm_rl.sampling.decoding import sample_tokens


class Discriminator(nn.Module):
    """A teacher copy whose last `trainable_blocks` transformer blocks (and final norm) train, read by a per-token
    logit head, with the diffusion time fed through the trainable blocks.

    `head` "mlp" is the paper's: spectral-norm Linear(H, H) – SiLU – spectral-norm Linear(H, 1). "linear" is a
    zero-initialised linear head, D = 0 everywhere at the start. With `time_input` the time t of the state D reads
    enters the first trainable block: its input hidden states get a learned embedding of t (sinusoidal features
    through a two-layer MLP whose last layer starts at zero, so D starts as it would without it). Transformers
    checkpoints have no time input of their own; this plays the part of the time conditioning the paper's DiT
    blocks receive.

    With `likelihood_prior` w > 0 every position's logit also gets w · ℓ(z), ℓ the frozen teacher's
    pseudo-log-likelihood of the input's visible response tokens (`teacher_log_likelihood`): a prior for the log
    density ratio, so the head and blocks, trained by the same BCE on the sum, learn only the residual. The prior
    needs token ids; a forward on `inputs_embeds` (gradient guidance) reads the learned part alone."""

    def __init__(self, teacher, trainable_blocks: int = 4, likelihood_prior: float = 0.0,
                 likelihood_folds: int = 4, head: str = "mlp", time_input: bool = True):
        super().__init__()
        if likelihood_prior < 0 or likelihood_folds < 1:
            raise ValueError(f"need likelihood_prior >= 0 and likelihood_folds >= 1, got {likelihood_prior}, "
                             f"{likelihood_folds}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.backbone = copy.deepcopy(teacher).requires_grad_(False)
        _disable_checkpointing(self.backbone.model)  # a recomputation in backward would miss the time embedding
        blocks = _blocks(self.backbone.model)
        if not 1 <= trainable_blocks <= len(blocks):
            raise ValueError(f"trainable_blocks must be in [1, {len(blocks)}], got {trainable_blocks}")
        for block in blocks[-trainable_blocks:]:
            block.requires_grad_(True)
        norm = getattr(getattr(self.backbone.model, "model", None), "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
        hidden, factory = teacher.config.hidden_size, {"device": teacher.device, "dtype": teacher.dtype}
        if head == "mlp":
            spectral = nn.utils.parametrizations.spectral_norm
            self.head = nn.Sequential(spectral(nn.Linear(hidden, hidden, **factory)), nn.SiLU(),
                                      spectral(nn.Linear(hidden, 1, **factory)))
        else:
            self.head = nn.Linear(hidden, 1, **factory)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.time_embedding = None
        if time_input:
            self.time_embedding = nn.Sequential(nn.Linear(TIME_FEATURES, hidden, **factory), nn.SiLU(),
                                                nn.Linear(hidden, hidden, **factory))
            nn.init.zeros_(self.time_embedding[-1].weight)
            nn.init.zeros_(self.time_embedding[-1].bias)
            blocks[-trainable_blocks].register_forward_pre_hook(self._add_time, with_kwargs=True)
        self._time = None  # [B, 1, H] the embedding of the time of the forward under way
        self.settings = {"trainable_blocks": trainable_blocks, "likelihood_prior": likelihood_prior,
                         "likelihood_folds": likelihood_folds, "head": head, "time_input": time_input}
        self.likelihood_prior, self.likelihood_folds = likelihood_prior, likelihood_folds
        self._teacher = (teacher,)  # a tuple: the frozen teacher is used, not owned (nor saved) by D

    def forward(self, input_ids=None, attention_mask=None, *, time=None, inputs_embeds=None, response_mask=None,
                generator=None) -> torch.Tensor:
        """[B, L] per-token logits (float32) of states at diffusion time `time` ([B] in [0, 1]; needed with a
        time input). `response_mask` (default: every position) bounds the tokens the likelihood prior scores;
        its folds are drawn with `generator`."""
        if self.time_embedding is not None:
            if time is None:
                raise ValueError("this discriminator reads the diffusion time: pass time=")
            self._time = self.time_embedding(time_features(time).to(self.head_dtype))[:, None, :]
        try:
            out = self.backbone(input_ids, attention_mask, inputs_embeds=inputs_embeds, output_hidden_states=True)
        finally:
            self._time = None
        logits = self.head(out.hidden_states.to(self.head_dtype)).squeeze(-1).float()
        if self.likelihood_prior and input_ids is not None:
            region = response_mask if response_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            prior = teacher_log_likelihood(self._teacher[0], input_ids, attention_mask, region,
                                           self.likelihood_folds, generator)
            logits = logits + self.likelihood_prior * prior[:, None]
        return logits

    @property
    def head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def _add_time(self, module, args, kwargs):
        """Forward pre-hook of the first trainable block: its input hidden states plus the time embedding."""
        if self._time is None:
            return None
        if args:
            return (args[0] + self._time.to(args[0].dtype), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ValueError(f"cannot add the time to {type(module).__name__}: its hidden states come neither first "
                             f"nor as hidden_states (keywords: {sorted(kwargs)}); set time_input false")
        kwargs["hidden_states"] = kwargs["hidden_states"] + self._time.to(kwargs["hidden_states"].dtype)
        return args, kwargs


HEADS = ("mlp", "linear")
EARLIER_DISCRIMINATOR = {"trainable_blocks": 2, "head": "linear", "time_input": False}
"""The settings a discriminator.json written before they were saved leaves out: its discriminator's."""
TIME_FEATURES = 64


def time_features(t: torch.Tensor) -> torch.Tensor:
    """[B, TIME_FEATURES] sinusoidal features of times t ∈ [0, 1]: cos and sin of 1000 t · f, f from 1 down to
    1000^(−(h−1)/h), h = TIME_FEATURES / 2 (the usual timestep features, t read as 1000 timesteps)."""
    half = TIME_FEATURES // 2
    frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], -1)


def save_discriminator(discriminator: Discriminator, directory: str, weights: dict | None = None) -> None:
    """`discriminator.pt` (the weights, or `weights`: its state dict gathered from shards) and `discriminator.json`
    (its settings) in `directory`."""
    torch.save(discriminator.state_dict() if weights is None else weights, os.path.join(directory, "discriminator.pt"))
    with open(os.path.join(directory, "discriminator.json"), "w") as f:
        json.dump(discriminator.settings, f)


def load_discriminator(teacher, directory: str) -> Discriminator:
    """The discriminator `save_discriminator` wrote to `directory`, on top of `teacher`."""
    settings = dict(EARLIER_DISCRIMINATOR)
    path = os.path.join(directory, "discriminator.json")
    if os.path.isfile(path):  # saved before discriminator.json existed: the earlier discriminator, without a prior
        with open(path) as f:
            settings.update(json.load(f))
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


def _disable_checkpointing(model) -> None:
    """Turn a transformers model's activation checkpointing off (named gradient checkpointing before 5.x)."""
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


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
    """BCE on masked positions, real → 1 − s and fake → s for smoothing s (the paper's 0.1: targets 0.9 and 0.1);
    each side is the mean over its masked positions, and the loss is the mean of the two sides. `counts`
    (real, fake) replace the numbers of masked positions the sides are divided by (under data parallelism: the
    global numbers)."""
    real = real_logits[real_masked]
    fake = fake_logits[fake_masked]
    real_count, fake_count = counts or (real.numel(), fake.numel())
    bce = F.binary_cross_entropy_with_logits
    return 0.5 * (bce(real, torch.full_like(real, 1 - label_smoothing), reduction="sum") / max(real_count, 1)
                  + bce(fake, torch.full_like(fake, label_smoothing), reduction="sum") / max(fake_count, 1))


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


def sample_tau(n: int, low: float, high: float, beta: tuple[float, float] = (1.0, 1.0), generator=None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] τ, [n] π(τ)): τ = low + (high − low) · u with u ~ Beta(a, b) (Beta(1, 1): uniform), and π the
    density τ is drawn from, for the importance weight ω(τ)/π(τ). Float64; the draws come from `generator`."""
    a, b = beta
    if (a, b) == (1.0, 1.0):
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    else:  # torch's Beta takes no generator: numpy's, seeded from it, keeps the draws reproducible and resumable
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        u = torch.from_numpy(np.random.default_rng(seed).beta(a, b, n)).to(device)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    clipped = u.clamp(1e-12, 1 - 1e-12)
    density = torch.exp((a - 1) * clipped.log() + (b - 1) * (-clipped).log1p() - log_beta) / (high - low)
    return low + (high - low) * u, density


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
