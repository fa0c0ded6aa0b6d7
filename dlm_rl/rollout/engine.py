"""What every rollout engine shares: the request split into seeded chunks, one chunk's generation, weight
snapshots for syncing, and rewards scored next to generation.

Determinism: a request is cut into chunks of whole prompts (all samples of a prompt in one chunk, adjacent) and
each chunk is sampled as one batch with its own generator, seeded from (engine seed, call number, chunk index).
A chunk's trajectory therefore depends only on the weights and the chunk, not on which worker ran it or when.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dlm_rl.data.collate import encode_prompt, left_pad
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.sampler import generate
from dlm_rl.sampling.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """A batch of (prompt, sample) requests sampled together with one seed."""

    index: int
    prompts: list  # one per row: text or chat messages
    prompt_index: list[int]
    sample_index: list[int]
    seed: int
    hints: list | None = None  # one per row: response token ids (-1: the sampler decides) or None (`generate`)


def plan(prompts: Sequence, n_samples: int, rows_per_chunk: int, seed: int, call: int,
         hints: Sequence | None = None) -> list[Chunk]:
    """Chunks of whole prompts, each with about `rows_per_chunk` rows (at least one prompt); `hints`, one per
    (prompt, sample) in request order (prompt-major), go with their rows."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be at least 1, got {rows_per_chunk}")
    if hints is not None and len(hints) != len(prompts) * n_samples:
        raise ValueError(f"hints: one per (prompt, sample), {len(prompts) * n_samples}, got {len(hints)}")
    per_chunk = max(1, rows_per_chunk // n_samples)
    chunks = []
    for index, start in enumerate(range(0, len(prompts), per_chunk)):
        indices = [i for i in range(start, min(start + per_chunk, len(prompts))) for _ in range(n_samples)]
        samples = [s for _ in range(0, len(indices), n_samples) for s in range(n_samples)]
        chunk_seed = int(np.random.SeedSequence([seed, call, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
        chunks.append(
            Chunk(
                index=index,
                prompts=[prompts[i] for i in indices],
                prompt_index=indices,
                sample_index=samples,
                seed=chunk_seed,
                hints=None if hints is None else [hints[p * n_samples + s] for p, s in zip(indices, samples)],
            )
        )
    return chunks


@torch.no_grad()
def run_chunk(model, chunk: Chunk, config: SamplerConfig, weight_version: int) -> Trajectory:
    """Sample a chunk on `model` (put in eval mode for the call) and label the trajectory."""
    from dlm_rl.evaluation import decode_responses

    tokenizer = model.tokenizer
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in chunk.prompts], tokenizer.pad_token_id)
    generator = torch.Generator(model.device).manual_seed(chunk.seed)
    was_training = model.training
    model.eval()
    hints = None
    if chunk.hints is not None and any(h is not None for h in chunk.hints):
        hints = torch.tensor([[-1] * config.gen_length if h is None else list(h) for h in chunk.hints],
                             device=model.device)
    try:
        trajectory = generate(model, ids.to(model.device), mask.to(model.device), config, generator, hints=hints)
    finally:
        model.train(was_training)
    trajectory.completions = decode_responses(tokenizer, trajectory.response_ids)
    trajectory.prompt_index = list(chunk.prompt_index)
    trajectory.sample_index = list(chunk.sample_index)
    trajectory.weight_version = weight_version
    return trajectory


def weight_snapshot(model, full: bool) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors to send: every parameter and buffer when `full` (a tied tensor once), else the
    trainable parameters only (after a LoRA update, just the adapter)."""
    if full:
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensors[name] = tensor
    else:
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise ValueError("the model has no trainable parameters to sync; pass full=True to send every weight")
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model` by name; names the model lacks are an error (the structures differ)."""
    own = model.state_dict(keep_vars=True)
    unknown = [name for name in tensors if name not in own]
    if unknown:
        raise ValueError(
            f"{len(unknown)} synced tensors are not in the rollout model (first: {unknown[0]!r}); the engine's "
            "model must have the trainer's structure (same LoRA settings)"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))


def as_rows(prompts: Sequence) -> list[dict]:
    """Dataset rows from prompts given as rows (dicts with a "prompt" key), texts or chat-message lists."""
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            if "prompt" not in p:
                raise ValueError(f"prompt {i} is a row without a 'prompt' column: {sorted(p)}")
            rows.append(p)
        else:
            rows.append({"prompt": p})
    return rows


class RewardScorer:
    """Scores finished chunks in background threads while generation goes on (math and code rewards do their
    work in worker processes and sandboxes, so threads overlap them with sampling)."""

    def __init__(self, rewards: Callable | None, threads: int = 2):
        self.rewards = rewards
        self.pool = concurrent.futures.ThreadPoolExecutor(threads) if rewards is not None else None
        self.pending: list[concurrent.futures.Future] = []

    def submit(self, trajectory: Trajectory, rows: list[dict]) -> None:
        trajectory.rows = [rows[i] for i in trajectory.prompt_index]
        if self.pool is not None:
            self.pending.append(self.pool.submit(self._score, trajectory))

    def _score(self, trajectory: Trajectory) -> None:
        prompts = [row["prompt"] for row in trajectory.rows]
        completions = [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(prompts, trajectory.completions)
        ]
        names = {name for row in trajectory.rows for name in row if name != "prompt"}
        columns = {name: [row.get(name) for row in trajectory.rows] for name in sorted(names)}
        trajectory.rewards = self.rewards(prompts, completions, columns)
        for i, error in enumerate(trajectory.rewards["errors"]):
            if error is not None:
                logger.warning(
                    "reward failed for prompt %d sample %d: %s",
                    trajectory.prompt_index[i], trajectory.sample_index[i], error,
                )

    def wait(self) -> None:
        """Block until every submitted chunk is scored; a reward that raised (a bad configuration) raises here."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class RolloutEngine:
    """The interface: `generate(prompts, n_samples, config) -> list[Trajectory]` and `sync_weights(model)`.

    `prompts` are dataset rows (dicts with a "prompt" column, the other columns go to the rewards) or bare
    prompts. The result is one Trajectory per chunk, in request order; every (prompt, sample) appears exactly once.
    """

    def __init__(self, *, rows_per_chunk: int, seed: int, rewards: Callable | None, reward_threads: int):
        self.rows_per_chunk = rows_per_chunk
        self.seed = seed
        self.calls = 0
        self.version = 0
        self.scorer = RewardScorer(rewards, reward_threads)

    def generate(
        self, prompts: Sequence, n_samples: int, config: SamplerConfig, *, seed: int | None = None,
        hints: Sequence | None = None,
    ) -> list[Trajectory]:
        """`hints` (inpainting): one per (prompt, sample), prompt-major, each None or `gen_length` token ids with -1
        where the sampler decides (`dlm_rl.sampling.sampler.generate`)."""
        rows = as_rows(prompts)
        call, self.calls = self.calls, self.calls + 1
        if not rows:
            logger.warning("rollout: empty request, nothing to generate")
            return []
        chunks = plan([r["prompt"] for r in rows], n_samples, self.rows_per_chunk, self.seed if seed is None else seed,
                      call, hints)
        trajectories = self._run(chunks, config, lambda t: self.scorer.submit(t, rows))
        self.scorer.wait()
        return trajectories

    def _run(self, chunks: list[Chunk], config: SamplerConfig, done: Callable[[Trajectory], None]) -> list[Trajectory]:
        """Every chunk's trajectory in chunk order; `done` is called on each as soon as it is ready."""
        raise NotImplementedError

    def sync_weights(self, model, *, full: bool = False) -> int:
        """Make the engine generate with `model`'s weights (after a LoRA update only the adapter travels;
        `full=True` sends every weight); returns the new weight version, which later trajectories carry."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The call counter (chunk seeds derive from it) and the weight version, for checkpoints."""
        return {"calls": self.calls, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """Continue the counters of a checkpoint. The weights are the caller's: an engine with its own model copies
        (RayEngine) needs `sync_weights(model)` after the trainer's model is restored."""
        self.calls, self.version = state["calls"], state["version"]

    def close(self) -> None:
        self.scorer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
