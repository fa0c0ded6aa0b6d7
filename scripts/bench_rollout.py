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
from dlm_rl.models.resolve import resolve_model  # noqa: E402
from dlm_rl.rollout import LocalEngine, RayEngine  # noqa: E402
from dlm_rl.rollout.engine import weight_snapshot  # noqa: E402
from dlm_rl.sampling import SamplerConfig  # noqa: E402
from dlm_rl.testbed import TASKS  # noqa: E402


def with_lora(spec: str):
    return add_lora(resolve_model(spec), LoraArguments(use_lora=True, lora_r=16))


def throughput(engine, prompts, config) -> float:
    engine.generate(prompts[:64], 1, config)  # warm up
    start = time.perf_counter()
    trajectories = engine.generate(prompts, 1, config)
    seconds = time.perf_counter() - start
    return sum(len(t) for t in trajectories) / seconds


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
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads, split over the actors")
    parser.add_argument("--rows-per-chunk", type=int, default=64)
    parser.add_argument("--sync-repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    task = TASKS[args.task]
    prompts = list(task.dataset("test", args.prompts, seed=5)["prompt"])
    config = SamplerConfig(gen_length=task.response_length, temperature=1.0, threshold=0.9)
    factory = functools.partial(resolve_model, args.model)
    chunk = {"rows_per_chunk": args.rows_per_chunk, "seed": 0}

    torch.set_num_threads(args.threads)
    result = {"model": args.model, "prompts": args.prompts, "threads": args.threads, "gen_length": config.gen_length}
    result["local_traj_per_s"] = throughput(LocalEngine(factory(), **chunk), prompts, config)

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    for actors in (1, 2):
        with RayEngine(factory, num_actors=actors, threads_per_actor=args.threads // actors, **chunk) as engine:
            result[f"ray{actors}_traj_per_s"] = throughput(engine, prompts, config)
            if actors == 1:
                trainer = factory()
                result["full_sync_s"] = sync_seconds(engine, trainer, True, args.sync_repeats)
                result["full_sync_mb"] = megabytes(weight_snapshot(trainer, True))
    lora_factory = functools.partial(with_lora, args.model)
    with RayEngine(lora_factory, num_actors=1, threads_per_actor=args.threads, **chunk) as engine:
        trainer = lora_factory()
        result["lora_sync_s"] = sync_seconds(engine, trainer, False, args.sync_repeats)
        result["lora_sync_mb"] = megabytes(weight_snapshot(trainer, False))
    ray.shutdown()

    result["ray1_vs_local"] = result["ray1_traj_per_s"] / result["local_traj_per_s"]
    result["ray2_vs_local"] = result["ray2_traj_per_s"] / result["local_traj_per_s"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
