#!/usr/bin/env python
"""Compare samplers in one run: reference (one token per step), threshold, threshold + prefix cache,
threshold + dual cache — accuracy, forward passes, steps per block and tokens/s on held-out testbed problems; and
the block-attention prefix cache kept from block to block against recomputing the prefix at every block.

    python scripts/bench_sampler.py [--settings math,chain,chain128,block_prefix] [--n 512] [--threads 1]

Each setting is a testbed checkpoint (addition3-base ships with the package; build the others first with
`python scripts/build_tiny_models.py chain-base chain128-base`) at a generation length; every sampler runs greedy
and at T = 1 on the same prompts. tokens/s counts the whole canvas (n x gen_length tokens) over the wall time of
the sampling calls. The reference is LLaDA's sampler as published
(no early stop); `ablations` adds it with early stop, to show how much of the gain early stop alone gives.

`block_prefix` times a block-attention model's sampler three ways on the same prompts and seed, in blocks of 32
tokens, 4 steps per block, with a freshly initialised model (hidden size 256, 4 layers: timing does not depend on
the weights): `kept` (the prefix's keys and values kept, a block's first step feeding only the block before it and
the block itself), `recomputed` (that switched off inside this script: the prefix fed whole at each block's first
step, as before the cache was kept) and `none` (the whole canvas at every step). All three give the same tokens
(`same_tokens`).
The last line printed is one JSON object with the keys `results`, `ablations` and `block_prefix`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SETTINGS = {
    # name: (testbed checkpoint, task, generation length, block length)
    "math": ("addition3-base", "addition3", 8, 8),
    "chain": ("chain-base", "chain", 40, 40),
    "chain128": ("chain128-base", "chain128", 128, 32),
}
SAMPLERS = {
    "reference": dict(early_stop=False),
    "threshold": dict(threshold=0.9),
    "threshold+prefix": dict(threshold=0.9, cache="prefix"),
    "threshold+dual": dict(threshold=0.9, cache="dual"),
}
ABLATIONS = {"reference+early_stop": dict(early_stop=True)}
BLOCK_PREFIX = dict(block=32, steps_per_block=4, gen_lengths=(128, 256, 512), batch_size=16, repeats=3)


def run(model, prompts, rows, task, sampler: dict, gen_length, block_length, temperature, batch_size, seed) -> dict:
    from dlm_rl.data.tasks import score
    from dlm_rl.evaluation import decode_responses, rollout
    from dlm_rl.sampling.config import SamplerConfig

    config = SamplerConfig(gen_length=gen_length, block_length=block_length, temperature=temperature, **sampler)
    generator = torch.Generator(model.device).manual_seed(seed)
    start = time.perf_counter()
    trajectories = rollout(model, prompts, config, batch_size=batch_size, generator=generator)
    seconds = time.perf_counter() - start
    texts = [t for tr in trajectories for t in decode_responses(model.tokenizer, tr.response_ids)]
    nfe = torch.cat([tr.nfe for tr in trajectories]).double()
    steps_per_block = torch.cat([tr.steps_per_block for tr in trajectories])
    correct = [score(task, text, row) >= 1.0 for text, row in zip(texts, rows)]
    return {
        "accuracy": sum(correct) / len(rows),
        "nfe": nfe.mean().item(),
        "steps_per_block": steps_per_block.mean().item(),
        "tokens_per_s": len(prompts) * gen_length / seconds,
        "seconds": seconds,
    }


def block_prefix() -> list[dict]:
    """Per generation length: seconds and columns fed with the prefix kept, recomputed and not cached."""
    from dlm_rl.data.collate import left_pad
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.sampling import sampler
    from dlm_rl.sampling.config import SamplerConfig

    block, lengths, batch_size = BLOCK_PREFIX["block"], BLOCK_PREFIX["gen_lengths"], BLOCK_PREFIX["batch_size"]
    model = tiny_model(hidden_size=256, intermediate_size=1024, num_layers=4, attention="block", block_size=block,
                       max_positions=64 + max(lengths)).eval()
    tokenizer = model.tokenizer
    texts = [f"{a}+{b}=" for a, b in zip(range(100, 100 + batch_size), range(7, 7 + 13 * batch_size, 13))]
    ids, mask = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], tokenizer.pad_token_id)

    fed = [0]
    run_forward, final_prefix = sampler._BlockForward._run, sampler._BlockForward._final_prefix

    def counting_run(self, rows, feed, **kwargs):
        fed[0] += rows.numel() * feed.numel()
        return run_forward(self, rows, feed, **kwargs)

    def recomputed(self, rows):
        self.decoder.prefix = None
        return 0

    sampler._BlockForward._run = counting_run
    rows = []
    try:
        for gen_length in lengths:
            config = dict(gen_length=gen_length, steps=gen_length // block * BLOCK_PREFIX["steps_per_block"],
                          early_stop=False)
            row, tokens = {"name": "block_prefix", "gen_length": gen_length, "block_length": block,
                           "batch_size": batch_size}, {}
            for name, cache in (("kept", "prefix"), ("recomputed", "prefix"), ("none", "none")):
                sampler._BlockForward._final_prefix = recomputed if name == "recomputed" else final_prefix
                times = []
                for _ in range(BLOCK_PREFIX["repeats"] + 1):  # the first run warms up
                    fed[0] = 0
                    start = time.perf_counter()
                    out = sampler.generate(model, ids, mask, SamplerConfig(cache=cache, **config),
                                           torch.Generator().manual_seed(0))
                    times.append(time.perf_counter() - start)
                tokens[name] = out.response_ids
                row[f"{name}_seconds"] = round(min(times[1:]), 4)
                row[f"{name}_columns_fed"] = fed[0]
                print(f"block_prefix {gen_length} {name}: {row[f'{name}_seconds']} s", file=sys.stderr, flush=True)
            row["speedup_kept_vs_recomputed"] = round(row["recomputed_seconds"] / row["kept_seconds"], 3)
            row["speedup_kept_vs_none"] = round(row["none_seconds"] / row["kept_seconds"], 3)
            row["same_tokens"] = all(torch.equal(tokens["kept"], t) for t in tokens.values())
            rows.append(row)
    finally:
        sampler._BlockForward._run, sampler._BlockForward._final_prefix = run_forward, final_prefix
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings = [*SETTINGS, "block_prefix"]
    parser.add_argument("--settings", default=",".join(settings), help=f"comma-separated, from {settings}")
    parser.add_argument("--n", type=int, default=512, help="held-out problems per setting")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    every = [*SAMPLERS, *ABLATIONS]
    parser.add_argument("--samplers", default=",".join(every), help=f"comma-separated, from {every}")
    parser.add_argument("--temperatures", default="0,1", help="comma-separated")
    args = parser.parse_args()
    names, samplers = args.settings.split(","), args.samplers.split(",")
    unknown = [n for n in names if n not in settings] + [n for n in samplers if n not in every]
    if unknown:
        parser.error(f"unknown settings or samplers {unknown}; choose from {settings} and {every}")
    temperatures = [float(t) for t in args.temperatures.split(",")]
    torch.set_num_threads(args.threads)

    from dlm_rl.model_spec import resolve_model
    from dlm_rl.testbed import TASKS, VALIDATION_SIZE

    results, ablations = [], []
    for name in [n for n in names if n in SETTINGS]:
        checkpoint, task_name, gen_length, block_length = SETTINGS[name]
        model = resolve_model(f"testbed:{checkpoint}").eval()
        task = TASKS[task_name]
        seen = set(task.dataset("test", VALIDATION_SIZE, seed=2)["prompt"])  # the checkpoints' stopping problems
        held_out = task.dataset("test", args.n + VALIDATION_SIZE, seed=11).filter(lambda r: r["prompt"] not in seen)
        held_out = held_out.select(range(min(args.n, len(held_out))))
        prompts, rows = list(held_out["prompt"]), list(held_out)
        # Warm-up at full batch size (thread pools, allocator, caches); the reference with one step per block.
        warm_up = [dict(steps=gen_length // block_length)] + [o for n, o in SAMPLERS.items() if n != "reference"]
        for options in warm_up:
            warm = prompts[: args.batch_size]
            run(model, warm, rows, task.generator, options, gen_length, block_length, 1.0, args.batch_size, 0)
        for temperature in temperatures:
            common = dict(task=task_name, gen_length=gen_length, block_length=block_length, temperature=temperature)
            measured = {}
            for sampler in samplers:
                options = {**SAMPLERS, **ABLATIONS}[sampler]
                print(f"{name} T={temperature} {sampler} ...", file=sys.stderr, flush=True)
                measured[sampler] = run(
                    model, prompts, rows, task.generator, options, gen_length, block_length, temperature,
                    args.batch_size, args.seed,
                )
                print(f"  {measured[sampler]}", file=sys.stderr, flush=True)
            reference, threshold = measured.get("reference"), measured.get("threshold")
            for sampler, m in measured.items():
                row = {"name": sampler, **common, "n": len(prompts), **m}
                if reference:
                    row["speedup_vs_reference"] = m["tokens_per_s"] / reference["tokens_per_s"]
                    row["nfe_reduction_vs_reference"] = reference["nfe"] / m["nfe"]
                    row["accuracy_delta_vs_reference"] = m["accuracy"] - reference["accuracy"]
                if threshold and sampler.startswith("threshold+"):
                    row["speedup_vs_threshold"] = m["tokens_per_s"] / threshold["tokens_per_s"]
                    row["accuracy_delta_vs_threshold"] = m["accuracy"] - threshold["accuracy"]
                (ablations if sampler in ABLATIONS else results).append(row)
    machine = {"torch_threads": args.threads, "torch": torch.__version__, "device": "cpu"}
    rows = block_prefix() if "block_prefix" in names else []
    print(json.dumps({"machine": machine, "results": results, "ablations": ablations, "block_prefix": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
