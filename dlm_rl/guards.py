"""Guards against runs that go wrong quietly: most completions cut off by the length limit, a reward that gives a
whole batch one value step after step, and NaN/inf losses (the step is skipped, counted, and the run stops after
`max_nonfinite_steps`). Their counts go into the metrics as `guard/...`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class NonFiniteArguments:
    """The NaN/inf-loss guard's setting, shared by every trainer's config."""

    max_nonfinite_steps: int = 3
    """The run stops when this many updates had a NaN/inf loss or gradient norm (each of them is skipped)."""


class NonFiniteLoss:
    """Skips updates whose loss or gradient norm is NaN or inf, and stops the run at the `limit`-th one."""

    def __init__(self, limit: int, trainer: str):
        if limit < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {limit}")
        self.limit, self.trainer, self.count = limit, trainer, 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]

    def skip(self, optimizers, **values: float) -> bool:
        """False when every value (loss, grad_norm, ...) is finite. Otherwise drop the gradients, so that no
        optimiser step may follow (AdamW leaves a parameter without a gradient untouched), count the update, warn,
        and raise FloatingPointError at the `limit`-th."""
        bad = {name: value for name, value in values.items() if not math.isfinite(value)}
        if not bad:
            return False
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.count += 1
        found = ", ".join(f"{name} {value}" for name, value in bad.items())
        if self.count >= self.limit:
            raise FloatingPointError(
                f"{self.trainer}: {found}; that is {self.count} non-finite updates (max_nonfinite_steps="
                f"{self.limit}), so the run stops before the weights are damaged. Lower learning_rate or "
                "max_grad_norm, look for NaN/inf in the data or rewards, or raise max_nonfinite_steps")
        logger.warning("%s: %s; update skipped (gradients dropped, no optimiser step), %d of max_nonfinite_steps=%d",
                       self.trainer, found, self.count, self.limit)
        return True


class RolloutGuards:
    """Warnings about each step's rollouts: more than half of the completions truncated, and a reward that gave
    every completion of a step the same score for `patience` steps in a row (an error with `error`)."""

    def __init__(self, gen_length: int, patience: int, error: bool = False):
        if patience < 0:
            raise ValueError(f"constant_reward_patience must be at least 0 (0: off), got {patience}")
        self.gen_length, self.patience, self.error = gen_length, patience, error
        self.truncated_steps = 0
        self.streaks: dict[str, int] = {}  # reward name -> steps in a row with one score for the whole batch

    def state_dict(self) -> dict:
        return {"truncated_steps": self.truncated_steps, "streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict) -> None:
        self.truncated_steps, self.streaks = state["truncated_steps"], dict(state["streaks"])

    def __call__(self, step: int, trajectories) -> dict:
        """Check a step's trajectories (scored); returns the guard metrics for the step's log line."""
        reasons = [reason for t in trajectories for reason in t.finish_reason]
        truncated = reasons.count("length")
        if truncated > len(reasons) / 2:
            self.truncated_steps += 1
            logger.warning("step %d: %d of %d completions (%.0f%%) hit the length limit without EOS; their rewards "
                           "score cut-off answers. Raise gen_length (now %d)", step, truncated, len(reasons),
                           100 * truncated / len(reasons), self.gen_length)
        if self.patience:
            self._constant_rewards(step, trajectories)
        return {"guard/truncated_steps": self.truncated_steps,
                "guard/constant_rewards": sum(s >= self.patience for s in self.streaks.values())}

    def _constant_rewards(self, step: int, trajectories) -> None:
        for name in trajectories[0].rewards:
            if name in ("total", "errors"):
                continue
            scores = {score for t in trajectories for score in t.rewards[name]}
            constant = len(scores) == 1 and None not in scores  # all None: the reward applies to none of them
            self.streaks[name] = self.streaks.get(name, 0) + 1 if constant else 0
            if self.streaks[name] and self.streaks[name] % self.patience == 0:
                message = (f"step {step}: reward {name!r} gave every completion the same score {scores.pop()} for "
                           f"{self.streaks[name]} steps in a row: it carries no learning signal. Check it against "
                           "completions.jsonl in the output directory (does it read the right columns and answer "
                           "format?)")
                if self.error:
                    raise ValueError(f"{message}; stopping (constant_reward_error is set)")
                logger.warning("%s. constant_reward_error: true stops the run instead; constant_reward_patience: 0 "
                               "turns this check off", message)
