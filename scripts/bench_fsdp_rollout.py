"""Rollouts of a model sharded with FSDP2 over N gloo processes: sampling through the sharded model (every forward
all-gathers each block's weights and frees them again) against gathering the whole weights once per rollout
(`dlm_rl.sharding.gather`, what the RL trainers do). One JSON line: seconds of each, their ratio, and whether the
samples are the same.

    python scripts/bench_fsdp_rollout.py                      # tiny model, 2 processes
    python scripts/bench_fsdp_rollout.py --model smollm2 --gen_length 32

Both sample one token per step (no threshold), so every rank runs the same number of forwards, which sampling
through the sharded model needs (its all-gathers are collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def measure(args) -> dict:
    from dlm_rl import distributed, sharding
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig

    distributed.setup(fsdp=True)
    torch.manual_seed(0)
    model = resolve_model(args.model)
    distributed.broadcast_parameters(model.parameters())
    sharding.shard(model)
    prompts = distributed.share([f"{i}+{i + 1}=" for i in range(args.prompts)])
    config = SamplerConfig(gen_length=args.gen_length, threshold=None, temperature=1.0)
    model.eval()
    with torch.no_grad():
        engine = LocalEngine(model, seed=1 + distributed.rank())
        engine.generate(prompts, 2, config)  # warm-up (FSDP's lazy initialisation)
        seconds, tokens = {}, {}
        for way in ("sharded", "gathered", "sharded", "gathered"):  # interleaved: drifts in speed hit both
            engine = LocalEngine(model, seed=1 + distributed.rank())
            distributed.barrier()
            start = time.perf_counter()
            if way == "gathered":
                sharding.gather(model)
            trajectories = engine.generate(prompts, args.samples, config)
            sharding.release(model)
            distributed.barrier()
            seconds[way] = seconds.get(way, 0.0) + time.perf_counter() - start
            tokens[way] = [t.response_ids.tolist() for t in trajectories]
    return {"seconds": seconds, "same_samples": tokens["sharded"] == tokens["gathered"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or 'smollm2' (as a recipe's model:)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--gen_length", type=int, default=64)
    parser.add_argument("--rank_output", help=argparse.SUPPRESS)  # set when this script runs as one rank
    args = parser.parse_args()
    if args.rank_output:
        result = measure(args)
        if os.environ.get("RANK", "0") == "0":
            with open(args.rank_output, "w") as f:
                json.dump(result, f)
        return
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "result.json")
        forwarded = [f"--{name}={getattr(args, name)}" for name in ("model", "prompts", "samples", "gen_length")]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.processes}", os.path.abspath(__file__), *forwarded,
                   "--rank_output", output]
        subprocess.run(command, env=env, check=True, capture_output=True)
        with open(output) as f:
            result = json.load(f)
    seconds = result["seconds"]
    print(json.dumps({"model": args.model, "processes": args.processes, "prompts": args.prompts,
                      "samples": args.samples, "gen_length": args.gen_length, "seconds": seconds,
                      "sharded_over_gathered": seconds["sharded"] / seconds["gathered"],
                      "same_samples": result["same_samples"]}))


if __name__ == "__main__":
    main()
