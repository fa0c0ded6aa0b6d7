"""What the custom-loop trainers (TraceRL, VRPO, DiDi) take from transformers' TrainingArguments about optimisation:
a learning-rate schedule with warmup, counted in training steps, and gradient checkpointing."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from transformers import get_scheduler

from dlm_rl.models.precision import MASTER_WEIGHTS, float32_masters

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class OptimizationArguments:
    """The learning-rate schedule and gradient checkpointing; every field can be a recipe key."""

    lr_scheduler_type: str = "constant"
    """How the learning rate changes over max_steps after the warmup: 'constant' (with a warmup:
    'constant_with_warmup'), 'linear' or 'cosine' (to 0 at max_steps)."""
    warmup_ratio: float = 0.0
    """Warmup from 0 over this fraction of max_steps (linear)."""
    warmup_steps: int = 0
    """Warmup over this many steps; overrides warmup_ratio when positive."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: less memory, one more
    forward."""
    master_weights: str = "float32"
    """How a bfloat16 checkpoint's trainable weights are held and updated: 'float32' (master weights, with AdamW's
    state, in float32; forwards still compute in bfloat16 under autocast: `dlm_rl.models.precision`) or 'model'
    (in bfloat16 itself: half the memory, but updates smaller than about 1/256 of a weight round away). LoRA
    adapters and float32 models are float32 either way."""

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1):
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a whole number of at least 0, got {self.warmup_steps!r}")

    def warmup(self) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)


def lr_scheduler(config, optimizer):
    """The schedule of `optimizer`'s learning rates over `config.max_steps` training steps: one `step()` per
    training step, an update or not, so that the rate follows the step count."""
    name = config.lr_scheduler_type
    if name == "constant" and config.warmup():
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup(), num_training_steps=config.max_steps)


def advance(*schedulers) -> float:
    """Move `schedulers` on by one training step; returns the first one's rate of the step done. A step whose
    update was skipped (no pair, equal rewards, a non-finite loss) moves them on too, which torch would warn about."""
    rate = schedulers[0].get_last_lr()[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
        for scheduler in schedulers:
            scheduler.step()
    return rate


def scheduled(config) -> bool:
    """Whether the learning rate changes during the run (then the schedule's position is checkpointed)."""
    return config.lr_scheduler_type != "constant" or config.warmup() > 0


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint the backbone's layers (non-reentrant: a LoRA adapter's inputs need no gradient); transformers
    renamed the method in 5.x."""
    backbone, options = model.model, {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def hold_master_weights(config, *modules) -> None:
    """With master_weights 'float32', the trainable bfloat16 weights of `modules` become float32 masters
    (`float32_masters`); call before their optimisers are built."""
    if config.master_weights == "float32":
        for module in modules:
            float32_masters(module)
