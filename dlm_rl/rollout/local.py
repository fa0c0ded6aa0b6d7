"""LocalEngine: rollouts in this process, on the trainer's own model (the default on one machine)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from dlm_rl.rollout.engine import Chunk, RolloutEngine, load_weights, run_chunk, weight_snapshot
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.trajectory import Trajectory


class LocalEngine(RolloutEngine):
    """Samples with `model` itself, so the trainer's updates are visible at once; `sync_weights(model)` with that
    same model only advances the weight version, with another model it copies that model's weights in."""

    def __init__(
        self,
        model,
        *,
        rows_per_chunk: int = 64,
        seed: int = 0,
        rewards: Callable | None = None,
        reward_threads: int = 2,
        progress: bool = False,
    ):
        super().__init__(rows_per_chunk=rows_per_chunk, seed=seed, rewards=rewards, reward_threads=reward_threads)
        self.model = model
        self.progress = progress

    def _run(self, chunks: list[Chunk], config: SamplerConfig, done: Callable[[Trajectory], None]) -> list[Trajectory]:
        trajectories = []
        for chunk in tqdm(chunks, desc="rollout", disable=not self.progress, leave=False):
            trajectory = run_chunk(self.model, chunk, config, self.version)
            done(trajectory)
            trajectories.append(trajectory)
        return trajectories

    def sync_weights(self, model, *, full: bool = False) -> int:
        if model is not self.model:
            load_weights(self.model, weight_snapshot(model, full))
        self.version += 1
        return self.version
