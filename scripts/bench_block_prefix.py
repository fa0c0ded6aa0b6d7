#!/usr/bin/env python
"""The block-attention prefix cache, kept from block to block, against recomputing the prefix at every block.

    python scripts/bench_block_prefix.py [--gen-lengths 128 256 512] [--batch-size 16] [--threads 1]

A block-attention model's prefix is final once its blocks are decoded, so the sampler keeps its keys and values
and a block's first step feeds only the block before it and the block itself. `recomputed` is the sampler with
that switched off inside this script (the prefix fed whole at each block's first step, as before the cache was
kept); `none` feeds the whole canvas at every step. Each configuration decodes the same prompts with the same
seed, in blocks of 32 tokens, 4 steps per block, with a freshly initialised model (hidden size 256, 4 layers):
timing does not depend on the weights, and all three give the same tokens (`same_tokens`).
Prints one JSON object: per generation length, seconds and columns fed per configuration and the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

BLOCK = 32
STEPS_PER_BLOCK = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the fastest counts)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dlm_rl.data.collate import left_pad
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.sampling import sampler
    from dlm_rl.sampling.config import SamplerConfig

    model = tiny_model(hidden_size=256, intermediate_size=1024, num_layers=4, attention="block", block_size=BLOCK,
                       max_positions=64 + max(args.gen_lengths)).eval()
    tokenizer = model.tokenizer
    texts = [f"{a}+{b}=" for a, b in zip(range(100, 100 + args.batch_size), range(7, 7 + 13 * args.batch_size, 13))]
    ids, mask = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], tokenizer.pad_token_id)

    fed = [0]
    run, final_prefix = sampler._BlockForward._run, sampler._BlockForward._final_prefix

    def counting_run(self, rows, feed, **kwargs):
        fed[0] += rows.numel() * feed.numel()
        return run(self, rows, feed, **kwargs)

    def recomputed(self, rows):
        self.decoder.prefix = None
        return 0

    sampler._BlockForward._run = counting_run
    results = []
    for gen_length in args.gen_lengths:
        config = dict(gen_length=gen_length, steps=gen_length // BLOCK * STEPS_PER_BLOCK, early_stop=False)
        row, tokens = {"gen_length": gen_length, "block_length": BLOCK, "batch_size": args.batch_size}, {}
        for name, cache in (("kept", "prefix"), ("recomputed", "prefix"), ("none", "none")):
            sampler._BlockForward._final_prefix = recomputed if name == "recomputed" else final_prefix
            times = []
            for _ in range(args.repeats + 1):  # the first run warms up
                fed[0] = 0
                start = time.perf_counter()
                out = sampler.generate(model, ids, mask, SamplerConfig(cache=cache, **config),
                                       torch.Generator().manual_seed(0))
                times.append(time.perf_counter() - start)
            tokens[name] = out.response_ids
            row[f"{name}_seconds"] = round(min(times[1:]), 4)
            row[f"{name}_columns_fed"] = fed[0]
            print(f"{gen_length} {name}: {row[f'{name}_seconds']} s", file=sys.stderr, flush=True)
        row["speedup_kept_vs_recomputed"] = round(row["recomputed_seconds"] / row["kept_seconds"], 3)
        row["speedup_kept_vs_none"] = round(row["none_seconds"] / row["kept_seconds"], 3)
        row["same_tokens"] = all(torch.equal(tokens["kept"], t) for t in tokens.values())
        results.append(row)
    machine = {"torch_threads": args.threads, "torch": torch.__version__, "device": "cpu"}
    print(json.dumps({"machine": machine, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
