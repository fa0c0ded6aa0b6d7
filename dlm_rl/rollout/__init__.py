"""Rollout engines: `LocalEngine` (in process), `RayEngine` (Ray actors) and `ServedEngine` (a completions server),
one interface."""

from dlm_rl.rollout.engine import RolloutEngine
from dlm_rl.rollout.local import LocalEngine
from dlm_rl.rollout.ray_engine import RayEngine, RolloutError
from dlm_rl.rollout.served import ServedEngine

__all__ = ["LocalEngine", "RayEngine", "RolloutEngine", "RolloutError", "ServedEngine"]
