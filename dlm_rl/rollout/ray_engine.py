"""RayEngine: rollouts on N Ray actors, each with its own copy of the model and the sampler.

- Joins a running cluster (`address="auto"` or `ray://...`) or starts a local one. With GPUs in the cluster each
  actor gets one GPU through a placement group; without, each gets `threads_per_actor` CPU threads (by default
  the cluster's free CPUs split evenly).
- Actors build the model themselves from `model_factory` (a picklable zero-argument callable, e.g.
  `functools.partial(resolve_model, "testbed:addition3-base")`, with LoRA added when the trainer uses it).
  `sync_weights` then moves tensors through the object store: the trainable ones (the adapter after a LoRA
  update) or, with `full=True`, every weight. No checkpoint files, no shared disk.
- Each actor has `pipeline` chunks in flight, so it starts the next one without waiting for the driver.
- Faults: an actor that dies mid-chunk, or whose chunk outlives `chunk_timeout_s`, is killed and replaced by a
  fresh actor that is brought to the current weights; its unfinished chunks are re-run. A chunk failing
  `max_failures` times raises `RolloutError` naming the prompt and the cause. Chunks are seeded, so a re-run
  gives the same trajectory and every (prompt, sample) appears exactly once.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dlm_rl.rollout.engine import Chunk, RolloutEngine, load_weights, run_chunk, weight_snapshot
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.trajectory import Trajectory

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """A chunk of prompts could not be generated within the allowed number of failures."""


class RolloutWorker:
    """The actor: a model built by the factory, on this actor's GPU if it has one."""

    def __init__(self, model_factory: Callable, threads: int):
        torch.set_num_threads(threads)
        self.model = model_factory()
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval()
        self.version = 0

    def ready(self) -> int:
        return os.getpid()

    def load(self, version: int, *snapshots: dict) -> int:
        for tensors in snapshots:
            load_weights(self.model, tensors)
        self.version = version
        return version

    def run(self, chunk: Chunk, config: SamplerConfig) -> Trajectory:
        return run_chunk(self.model, chunk, config, self.version)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        return self.model(input_ids.to(device), attention_mask.to(device)).logits.float().cpu()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "RayEngine needs Ray: pip install 'dlm-rl[ray]' (or 'ray[default]'); LocalEngine works without it"
        ) from None
    return ray


class RayEngine(RolloutEngine):
    def __init__(
        self,
        model_factory: Callable,
        *,
        num_actors: int = 1,
        threads_per_actor: int | None = None,
        address: str | None = None,
        rows_per_chunk: int = 64,
        seed: int = 0,
        rewards: Callable | None = None,
        reward_threads: int = 2,
        pipeline: int = 2,
        chunk_timeout_s: float = 600.0,
        startup_timeout_s: float = 600.0,
        max_failures: int = 3,
        progress: bool = False,
    ):
        super().__init__(rows_per_chunk=rows_per_chunk, seed=seed, rewards=rewards, reward_threads=reward_threads)
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        ray = self.ray = _import_ray()
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.model_factory = model_factory
        self.pipeline = pipeline
        self.chunk_timeout_s = chunk_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_failures = max_failures
        self.progress = progress
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.available_resources().get("CPU", 0))  # what is free, not what the cluster has
        self.threads = threads_per_actor or max(1, cpus // num_actors)
        self.placement = None
        if gpus:
            if gpus < num_actors:
                raise ValueError(f"{num_actors} rollout actors need {num_actors} GPUs; the cluster has {gpus}")
            from ray.util.placement_group import placement_group

            self.placement = placement_group([{"GPU": 1, "CPU": self.threads}] * num_actors, strategy="PACK")
            ray.get(self.placement.ready())
        # Object refs that bring a fresh actor to the current weights: the last full sync, then the last sync of
        # the trainable tensors after it.
        self.full_snapshot = self.trainable_snapshot = None
        self.actors = [self._start(slot) for slot in range(num_actors)]
        self._wait_ready(list(range(num_actors)))
        logger.info(
            "RayEngine: %d actor(s), %s", num_actors, "one GPU each" if gpus else f"{self.threads} CPU thread(s) each"
        )

    def _start(self, slot: int):
        options = {"num_cpus": self.threads, "max_restarts": 0}
        if self.placement is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["num_gpus"] = 1
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.placement, placement_group_bundle_index=slot
            )
        actor = self.ray.remote(RolloutWorker).options(**options).remote(self.model_factory, self.threads)
        snapshots = [ref for ref in (self.full_snapshot, self.trainable_snapshot) if ref is not None]
        if snapshots:
            actor.load.remote(self.version, *snapshots)
        return actor

    def _wait_ready(self, slots: list[int]) -> list[int]:
        """The actors' pids once they have built their models; a clear error if they cannot start in time."""
        try:
            return self.ray.get([self.actors[slot].ready.remote() for slot in slots], timeout=self.startup_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            for slot in slots:
                self.ray.kill(self.actors[slot], no_restart=True)
            need = f"{self.threads} CPU(s)" + (" and 1 GPU" if self.placement is not None else "")
            raise RolloutError(
                f"rollout actor(s) {slots} did not start within {self.startup_timeout_s:g} s. Each needs {need}; the "
                f"cluster has {self.ray.available_resources()} free. Lower threads_per_actor or num_actors, or "
                "raise startup_timeout_s if building the model is slow"
            ) from None

    def _restart(self, slot: int, reason: str) -> None:
        logger.warning("rollout actor %d: %s; restarting it", slot, reason)
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[slot] = self._start(slot)
        (pid,) = self._wait_ready([slot])
        logger.warning("rollout actor %d restarted (pid %d, weight version %d)", slot, pid, self.version)

    def _run(self, chunks: list[Chunk], config: SamplerConfig, done: Callable[[Trajectory], None]) -> list[Trajectory]:
        ray = self.ray
        queue = collections.deque(chunks)
        # Per actor, the chunks sent to it in order (up to `pipeline`, so it never waits for the driver) and
        # when the one it is working on started.
        sent: dict[int, collections.deque] = {slot: collections.deque() for slot in range(len(self.actors))}
        started: dict[int, float] = {}
        results: dict[int, Trajectory] = {}
        failures: collections.Counter = collections.Counter()
        bar = tqdm(total=len(chunks), desc="rollout", disable=not self.progress, leave=False)

        def failed(slot: int, chunk: Chunk, cause: str) -> None:
            failures[chunk.index] += 1
            where = f"chunk {chunk.index} (prompts {chunk.prompt_index[0]}..{chunk.prompt_index[-1]})"
            if failures[chunk.index] >= self.max_failures:
                raise RolloutError(
                    f"{where} failed {failures[chunk.index]} times; first prompt: {str(chunk.prompts[0])[:200]!r}; "
                    f"last cause: {cause}"
                )
            lost = [c for _, c in sent[slot]]
            sent[slot].clear()
            self._restart(slot, f"{cause} while generating {where} (failure {failures[chunk.index]} of "
                                f"{self.max_failures}); its {len(lost)} unfinished chunk(s) are re-run")
            queue.extendleft(reversed(lost))

        while queue or any(sent.values()):
            for slot, pending in sent.items():
                while queue and len(pending) < self.pipeline:
                    if not pending:
                        started[slot] = time.monotonic()
                    chunk = queue.popleft()
                    pending.append((self.actors[slot].run.remote(chunk, config), chunk))
            owner = {ref: slot for slot, pending in sent.items() for ref, _ in pending}
            deadline = min(started[slot] for slot, pending in sent.items() if pending) + self.chunk_timeout_s
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                slot = owner[ref]
                position = next(i for i, (r, _) in enumerate(sent[slot]) if r == ref)
                chunk = sent[slot][position][1]
                try:
                    trajectory = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    failed(slot, chunk, f"the actor died ({type(error).__name__})")
                    continue
                except ray.exceptions.RayTaskError as error:  # the sampler itself raised: re-running cannot help
                    raise RolloutError(
                        f"chunk {chunk.index}: generation raised for prompts {chunk.prompt_index[0]}.."
                        f"{chunk.prompt_index[-1]} (first: {str(chunk.prompts[0])[:200]!r}): {error.cause!r}"
                    ) from error
                del sent[slot][position]
                started[slot] = time.monotonic()  # the actor has moved on to its next chunk
                results[chunk.index] = trajectory
                done(trajectory)
                bar.update()
            now = time.monotonic()
            for slot, pending in sent.items():
                if pending and now - started[slot] >= self.chunk_timeout_s:
                    failed(slot, pending[0][1], f"no result after {self.chunk_timeout_s:g} s (hung)")
        bar.close()
        return [results[chunk.index] for chunk in chunks]

    def sync_weights(self, model, *, full: bool = False) -> int:
        ref = self.ray.put(weight_snapshot(model, full))
        if full:
            self.full_snapshot, self.trainable_snapshot = ref, None
        else:
            self.trainable_snapshot = ref
        self.version += 1
        pending = {slot: actor.load.remote(self.version, ref) for slot, actor in enumerate(self.actors)}
        for slot, result in pending.items():
            try:
                self.ray.get(result, timeout=self.chunk_timeout_s)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError) as error:
                self._restart(slot, f"weight sync failed ({type(error).__name__})")  # a new actor loads them all
        return self.version

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Each actor's logits for the same input (to check that weights arrived)."""
        return self.ray.get([actor.logits.remote(input_ids, attention_mask) for actor in self.actors])

    def close(self) -> None:
        super().close()
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
        if self.owns_ray:
            self.ray.shutdown()
