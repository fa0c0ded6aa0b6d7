"""What `draws_per_graph` saves: peak memory and time of one VRPO loss and backward pass on SmolLM2-135M-Instruct
(offline, A2D, LoRA r 16), for one micro-batch of pairs whose chosen and rejected responses are each scored with
n_t draws, (a) with every draw's graph kept until the backward pass (the default) and (b) with the draws computed
`draws_per_graph` at a time and recomputed in the backward pass.

Each case runs in its own process so its peak RSS is its own. Prints one JSON line per case and a summary with
ratios to the default last. Usage: python scripts/bench_vrpo_memory.py [--pairs 1 --n_t 8 --length 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def one_case(draws_per_graph: int | None, pairs: int, n_t: int, length: int) -> dict:
    import resource
    import time

    import torch

    from dlm_rl.models.assets import smollm2
    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.rl.vrpo import PreferenceEstimator, vrpo_loss

    torch.manual_seed(0)
    model = add_lora(smollm2(), LoraArguments(use_lora=True, lora_r=16))
    response = length // 2

    def batch():
        ids = torch.randint(0, len(model.tokenizer) - 1, (pairs, length))
        response_mask = torch.zeros(pairs, length, dtype=torch.bool)
        response_mask[:, -response:] = True
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response_mask}

    chosen, rejected = batch(), batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    loss, _ = vrpo_loss(model, chosen, rejected, PreferenceEstimator(n_t=n_t), beta=0.1,
                        generator=torch.Generator().manual_seed(1), draws_per_graph=draws_per_graph)
    loss.backward()
    seconds = time.perf_counter() - start
    grad_norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"draws_per_graph": draws_per_graph, "peak_rss_gb": peak, "rss_before_loss_gb": before,
            "seconds": seconds, "loss": loss.item(), "grad_norm": float(grad_norm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--n_t", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--draws_per_graph", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: run one case here (0: the default)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(one_case(args.case or None, args.pairs, args.n_t, args.length)))
        return
    results = {}
    for case in [*args.draws_per_graph, 0]:
        out = subprocess.run([sys.executable, __file__, "--case", str(case), "--pairs", str(args.pairs), "--n_t",
                              str(args.n_t), "--length", str(args.length)], capture_output=True, text=True, check=True)
        results[case or "all"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[case or "all"]), flush=True)
    base = results["all"]

    def grown(result):  # the memory the loss and backward pass add over the loaded model
        return result["peak_rss_gb"] - result["rss_before_loss_gb"]

    print(json.dumps({
        "pairs": args.pairs, "n_t": args.n_t, "length": args.length,
        "peak_rss_gb": {c: round(r["peak_rss_gb"], 3) for c, r in results.items()},
        "added_gb_ratio_to_all": {c: round(grown(r) / grown(base), 3) for c, r in results.items()},
        "seconds_ratio_to_all": {c: round(r["seconds"] / base["seconds"], 3) for c, r in results.items()},
        "max_grad_norm_difference": max(abs(r["grad_norm"] - base["grad_norm"]) for r in results.values()),
        "max_loss_difference": max(abs(r["loss"] - base["loss"]) for r in results.values()),
    }))


if __name__ == "__main__":
    main()
