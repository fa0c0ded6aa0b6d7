"""DiDi-Instruct's parts (arXiv 2509.25035; DESIGN.md §4.5): the discriminator, the student's two-step rollout and
its log-likelihood, the reward, grouped normalisation, the time weight ω(t) and the regularisers.

The student minimises ∫ ω(t) KL(q_student(·, t) ‖ q_teacher(·, t)) dt. Its gradient has the policy-gradient form
E[ω(τ) · r(z_τ) · ∇ log q_student(x)], where r is the log density ratio of data to student marginals at z_τ,
estimated by a discriminator: a copy of the teacher, only its last blocks trainable, with a per-token logit head
trained by BCE on masked positions ("real" = data noised at τ, "fake" = student samples noised at τ), so its
optimal logit is that log ratio and higher means more teacher-like. The student rolls out two steps,
all-mask → x_τ → x_0, and log q(x) = log q(x_τ | all-mask) + log q(x_0 | x_τ) over the tokens each step reveals.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlm_rl.sampling.decoding import sample_tokens


class Discriminator(nn.Module):
    """A teacher copy whose last `trainable_blocks` transformer blocks (and final norm) train, read by a
    zero-initialised per-token logit head: D = 0 everywhere at the start."""

    def __init__(self, teacher, trainable_blocks: int = 2):
        super().__init__()
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

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None) -> torch.Tensor:
        """[B, L] per-token logits (float32)."""
        out = self.backbone(input_ids, attention_mask, inputs_embeds=inputs_embeds, output_hidden_states=True)
        return self.head(out.hidden_states).squeeze(-1).float()


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
class TwoStep:
    """The student's two-step rollout all-mask → x_τ → x_0 over a batch of rows [B, L]."""

    start: torch.Tensor
    """[B, L] the prompt with every response position masked."""
    middle: torch.Tensor
    """[B, L] x_τ."""
    final: torch.Tensor
    """[B, L] x_0."""
    first: torch.Tensor
    """[B, L] bool: response positions revealed by the first step."""
    second: torch.Tensor
    """[B, L] bool: response positions revealed by the second step."""
    tau: torch.Tensor
    """[B] the intermediate time."""
    start_logits: torch.Tensor
    """[B, L, V] the student's logits at `start` (with the graph when rolled out with gradients)."""
    middle_logits: torch.Tensor
    """[B, L, V] the student's logits at `middle`."""

    def log_prob(self) -> torch.Tensor:
        """[B] log q(x_τ | all-mask) + log q(x_0 | x_τ): the log-probabilities of the tokens each step revealed."""
        first = _token_log_probs(self.start_logits, self.final) * self.first
        second = _token_log_probs(self.middle_logits, self.final) * self.second
        return first.sum(1) + second.sum(1)


def two_step_rollout(student, input_ids, attention_mask, response_mask, tau, generator=None) -> TwoStep:
    """Roll the student out in two ancestral steps: from all-mask, each response position is revealed with
    probability 1 − τ (tokens drawn from the student at temperature 1, Gumbel noise in float64), then every
    remaining one. Run under `torch.enable_grad()` to keep the logits' graph for `log_prob`."""
    mask_id = student.mask_token_id
    start = input_ids.masked_fill(response_mask, mask_id)
    start_logits = student(start, attention_mask).logits
    tokens, _ = sample_tokens(start_logits.detach(), 1.0, generator)
    u = torch.rand(start.shape, generator=generator, device=start.device, dtype=torch.float64)
    first = response_mask & (u >= tau[:, None].double())
    middle = torch.where(first, tokens, start)
    middle_logits = student(middle, attention_mask).logits
    tokens, _ = sample_tokens(middle_logits.detach(), 1.0, generator)
    second = response_mask & ~first
    final = torch.where(second, tokens, middle)
    return TwoStep(start, middle, final, first, second, tau, start_logits, middle_logits)


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


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
