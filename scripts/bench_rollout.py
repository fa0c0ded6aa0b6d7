"""Rollout engines compared in one run: LocalEngine vs RayEngine with 1 and 2 actors on the same total threads
(trajectories/s on the tiny math model), and weight-sync time for a LoRA adapter and for full weights.

    python scripts/bench_rollout.py [--prompts 512] [--threads 2] [--model testbed:addition3-base]

A "trajectory" is one sampled response. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402

from dlm_rl.models.lora import LoraArguments, add_lora  # noqa: E402
from dlm_rl.model_spec import resolve_model  # noqa: E402
from dlm_rl.rollout import LocalEngine, RayEngine  # noqa: E402
from dlm_rl.rollout.engine import weight_snapshot  # noqa: E402
from dlm_rl.sampling import SamplerConfig  # noqa: E402
from dlm_rl.testbed import TASKS  # noqa: E402


def with_lora(spec: str):
    return add_lora(resolve_model(spec), LoraArguments(use_lora=True, lora_r=16))


def throughput(engine, prompts, config) -> float:
    start = time.perf_counter()
    trajectories = engine.generate(prompts, 1, config)
    seconds = time.perf_counter() - start
    return sum(len(t) for t in trajectories) / seconds


def alternating_throughputs(engines: dict, prompts, config, repeats: int) -> list[dict]:
    """Trajectories/s of each engine in `repeats` rounds that alternate between the engines, so that the
    machine's slow spells (up to ±15% here) hit all of them; ratios are taken within a round."""
    for engine in engines.values():
        engine.generate(prompts[:64], 1, config)  # warm up
    return [{name: throughput(e, prompts, config) for name, e in engines.items()} for _ in range(repeats)]


def summarise(rounds: list[dict], engine: str, baseline: str, result: dict, key: str) -> None:
    """Median trajectories/s of `engine`, and its ratio to `baseline` (median of the per-round ratios, with
    the smallest and largest)."""
    result[f"{key}_traj_per_s"] = statistics.median(r[engine] for r in rounds)
    ratios = [r[engine] / r[baseline] for r in rounds]
    result[f"{key}_vs_local"] = statistics.median(ratios)
    result[f"{key}_vs_local_range"] = [round(min(ratios), 3), round(max(ratios), 3)]


def sync_seconds(engine, model, full: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.sync_weights(model, full=full)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def megabytes(tensors: dict) -> float:
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed:addition3-base")
    parser.add_argument("--task", default="addition3", help="testbed task whose prompts are sampled")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads, split over the actors")
    parser.add_argument("--rows-per-chunk", type=int, default=64)
    parser.add_argument("--sync-repeats", type=int, default=9)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    task = TASKS[args.task]
    prompts = list(task.dataset("test", args.prompts, seed=5)["prompt"])
    config = SamplerConfig(gen_length=task.response_length, temperature=1.0, threshold=0.9)
    factory = functools.partial(resolve_model, args.model)
    chunk = {"rows_per_chunk": args.rows_per_chunk, "seed": 0}

    torch.set_num_threads(args.threads)
    result = {"model": args.model, "prompts": args.prompts, "threads": args.threads, "gen_length": config.gen_length}
    local = LocalEngine(factory(), **chunk)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    with RayEngine(factory, num_actors=1, threads_per_actor=args.threads, **chunk) as engine:
        rounds = alternating_throughputs({"local": local, "ray1": engine}, prompts, config, args.repeats)
        result["local_traj_per_s"] = statistics.median(r["local"] for r in rounds)
        summarise(rounds, "ray1", "local", result, "ray1")
        trainer = factory()
        result["full_sync_s"] = sync_seconds(engine, trainer, True, args.sync_repeats)
        result["full_sync_mb"] = megabytes(weight_snapshot(trainer, True))
    with RayEngine(factory, num_actors=2, threads_per_actor=max(1, args.threads // 2), **chunk) as engine:
        rounds = alternating_throughputs({"local": local, "ray2": engine}, prompts, config, args.repeats)
        summarise(rounds, "ray2", "local", result, "ray2")
    lora_factory = functools.partial(with_lora, args.model)
    with RayEngine(lora_factory, num_actors=1, threads_per_actor=args.threads, **chunk) as engine:
        trainer = lora_factory()
        result["lora_sync_s"] = sync_seconds(engine, trainer, False, args.sync_repeats)
        result["lora_sync_mb"] = megabytes(weight_snapshot(trainer, False))
    ray.shutdown()

    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
