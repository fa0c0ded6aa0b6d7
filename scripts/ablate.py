"""Ablation at equal rollout budget: TraceRL with and without the value model vs diffu-GRPO vs coupled vs random
masking vs wd1 vs JustGRPO vs ESPO vs GDPO vs SPG vs BGPO. Every run uses the same base model, prompts, rewards,
sampler and number of rollout steps; only the way log-probabilities are read (and the value model, wd1's and SPG's
ratio-free losses, JustGRPO's left-to-right rollout, the sequence-level losses of ESPO, GDPO and BGPO) differs, each
method with its recipe's settings. Each (method, seed) is a `dlm_rl.trainers.tracerl.run`.

The score of a run is its held-out greedy accuracy after the last step. Each run also reports its seconds per step
(rollout with rewards, and training) and its process's peak resident memory (each run gets a fresh process). Prints
one JSON line per run, then `{"results": {method: {"mean", "sem", "std", "runs", ...}}, "config": ...}` as the last
line; `--plot` draws the means with their standard errors. `--merge FILE...` runs nothing: it summarises the
per-run lines of earlier outputs (e.g. one process per core and seed) into that last line, and plots them.

    python scripts/ablate.py                                   # addition3-base, 3 seeds, 2 runs in parallel
    python scripts/ablate.py --seeds 0 --steps 5               # a quick look
    python scripts/ablate.py --model testbed:chain-base --task chain --steps 40 --eval-size 128
    python scripts/ablate.py --merge seed0.jsonl seed1.jsonl seed2.jsonl --plot ablation.png --title "chain"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

METHODS = {
    "tracerl": {"method": "tracerl"},
    "tracerl+value": {"method": "tracerl", "value_model": True},
    "diffu_grpo": {"method": "diffu_grpo"},
    "coupled": {"method": "coupled"},
    "random_masking": {"method": "random_masking"},
    "wd1": {"method": "wd1", "inner_epochs": 2},  # its recipe's settings
    "justgrpo": {"method": "justgrpo", "ppo_minibatches": 1, "beta": 0.0, "learning_rate": 3e-4},
    "espo": {"method": "espo", "inner_epochs": 2, "ppo_minibatches": 1},
    "gdpo": {"method": "gdpo"},
    "spg": {"method": "spg", "inner_epochs": 4, "ppo_minibatches": 1},
    "bgpo": {"method": "bgpo"},
    "tracerl+igpo": {"method": "tracerl", "igpo": True},
}


def one_run(method: str, seed: int, settings: dict, threads: int) -> dict:
    import torch

    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    torch.set_num_threads(threads)
    output_dir = os.path.join(settings.pop("output_root"), f"{method}-seed{seed}")
    config = TraceRLConfig(**{**settings, **METHODS[method]}, seed=seed, output_dir=output_dir, report_to="none")
    start = time.perf_counter()
    last = run(config)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    steps = [line for line in lines if "time/training" in line]
    return {
        "method": method,
        "seed": seed,
        "initial": lines[0]["eval/greedy_accuracy"],
        "final": last["eval/greedy_accuracy"],
        "seconds": round(time.perf_counter() - start, 1),
        "rollout_s_per_step": round(statistics.mean(line["time/generation_and_reward"] for line in steps), 3),
        "train_s_per_step": round(statistics.mean(line["time/training"] for line in steps), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # Linux: kilobytes
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed:addition3-base")
    parser.add_argument("--task", default="addition3")
    parser.add_argument("--reward", default="rewards.math:accuracy")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (each gets cores / workers threads)")
    parser.add_argument("--output-dir", default="runs/ablate")
    parser.add_argument("--plot", help="write a bar chart of the means and standard errors here (png)")
    parser.add_argument("--merge", nargs="+", metavar="FILE", help="summarise these outputs' runs; run nothing")
    parser.add_argument("--title", help="the plot's title (default: the task, steps and seeds)")
    args = parser.parse_args()
    if args.merge:
        lines = [json.loads(line) for path in args.merge for line in open(path) if line.startswith("{")]
        records = [line for line in lines if "method" in line and "final" in line]
        if not records:
            parser.error(f"no run lines in {args.merge}")
        results = summarise(records)
        print(json.dumps({"results": results, "best": max(results, key=lambda m: results[m]["mean"]),
                          "merged": args.merge}))
        if args.plot:
            seeds = sorted({r["seed"] for r in records})
            plot(results, args.plot, args.title or f"{len(seeds)} seeds (merged)")
        return

    settings = {
        "model": args.model,
        "dataset_name": args.task,
        "reward_funcs": [args.reward],
        "max_steps": args.steps,
        "eval_steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "eval_size": args.eval_size,
        "learning_rate": args.learning_rate,
        "output_root": args.output_dir,
    }
    threads = max(1, len(os.sched_getaffinity(0)) // args.workers)  # the cores this process may use (taskset)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    records = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(one_run, m, s, dict(settings), threads) for m, s in jobs]
        for future in as_completed(futures):
            records.append(future.result())
            print(json.dumps(records[-1]), flush=True)
    results = summarise(records)
    best = max(results, key=lambda m: results[m]["mean"])
    print(json.dumps({"results": results, "best": best, "config": {**settings, "seeds": args.seeds}}))
    if args.plot:
        plot(results, args.plot, args.title or f"{args.task}, {args.steps} steps, {len(args.seeds)} seeds")


def summarise(records: list[dict]) -> dict:
    """Per method, in order of first appearance: the mean, standard error and standard deviation of the runs'
    final scores (ordered by seed), and the mean time per step and peak memory."""
    runs: dict[str, list[dict]] = {}
    for record in records:
        runs.setdefault(record["method"], []).append(record)
    results = {}
    for method, mine in runs.items():
        finals = [r["final"] for r in sorted(mine, key=lambda r: r["seed"])]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        results[method] = {
            "mean": statistics.mean(finals),
            "sem": std / math.sqrt(len(finals)),
            "std": std,
            "runs": finals,
            "seeds": sorted(r["seed"] for r in mine),
            "initial": mine[0]["initial"],
            "seconds_mean": statistics.mean(r["seconds"] for r in mine),
            **{name: statistics.mean(r[name] for r in mine)
               for name in ("rollout_s_per_step", "train_s_per_step", "peak_rss_mb")},
        }
    return results


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(results, key=lambda m: results[m]["mean"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.errorbar([100 * results[m]["mean"] for m in names], names, xerr=[100 * results[m]["sem"] for m in names],
                fmt="o", color="tab:blue", capsize=3, label="after training")
    for m in names:
        ax.plot([100 * r for r in results[m]["runs"]], [m] * len(results[m]["runs"]), "x", color="grey", alpha=0.6)
    ax.axvline(100 * results[names[0]]["initial"], color="grey", linestyle="--", label="base model")
    ax.set_xlabel("held-out greedy accuracy (%): mean ± standard error, x = one seed")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
