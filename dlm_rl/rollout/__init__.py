"""Rollout engines: `LocalEngine` (in process) and `RayEngine` (Ray actors), one interface."""

from dlm_rl.rollout.engine import RolloutEngine
from dlm_rl.rollout.local import LocalEngine
from dlm_rl.rollout.ray_engine import RayEngine, RolloutError

__all__ = ["LocalEngine", "RayEngine", "RolloutEngine", "RolloutError"]
