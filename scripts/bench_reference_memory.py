"""What the frozen reference costs with LoRA: peak memory of one TraceRL update on SmolLM2-135M-Instruct (offline,
A2D) with β > 0 and the KL taken to (a) the disabled LoRA adapter (what the trainer does), (b) a separate frozen
copy of the weights (what a naive implementation does), and (c) no reference at all (β = 0).

Each case runs in its own process so its peak RSS is its own. Prints one JSON line per case and a summary with
ratios to (c) last. Usage: python scripts/bench_reference_memory.py [--rows 16 --length 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = ("disabled_adapter", "frozen_copy", "no_reference")


def one_case(case: str, rows: int, length: int) -> dict:
    import copy
    import resource

    import torch

    from dlm_rl.models.assets import smollm2
    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.rl.losses import ppo_trace_loss
    from dlm_rl.rl.rows import Rows, reference_log_probs, response_log_probs

    torch.manual_seed(0)
    model = smollm2()
    frozen = copy.deepcopy(model).requires_grad_(False) if case == "frozen_copy" else None
    add_lora(model, LoraArguments(use_lora=True, lora_r=16))
    ids = torch.randint(0, len(model.tokenizer) - 1, (rows, length))
    response = length // 2
    state = ids.clone()
    state[:, -response:][torch.rand(rows, response) < 0.5] = model.mask_token_id
    targets = state[:, -response:] == model.mask_token_id
    batch = Rows(input_ids=state, attention_mask=torch.ones_like(ids), targets=targets, response_ids=ids[:, -response:],
                 sample=torch.arange(rows), step=torch.zeros(rows), weight=torch.ones(rows))
    with torch.no_grad():
        old = response_log_probs(model, batch)
        if case == "disabled_adapter":
            reference = reference_log_probs(model, batch)
        elif case == "frozen_copy":
            reference = response_log_probs(frozen, batch)
        else:
            reference = None
    logp = response_log_probs(model, batch)
    loss, _ = ppo_trace_loss(logp, old, torch.randn(rows, 1), batch.targets, beta=0.0 if reference is None else 0.01,
                             logp_ref=reference)
    loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"case": case, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "policy_weights_gb": weights / 2**30, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case, args.rows, args.length)))
        return
    results = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--rows", str(args.rows), "--length",
                              str(args.length)], capture_output=True, text=True, check=True)
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[case]), flush=True)
    base = results["no_reference"]["peak_rss_gb"]
    print(json.dumps({
        "rows": args.rows, "length": args.length,
        "peak_rss_gb": {c: round(r["peak_rss_gb"], 3) for c, r in results.items()},
        "ratio_to_no_reference": {c: round(r["peak_rss_gb"] / base, 3) for c, r in results.items()},
        "extra_gb_over_no_reference": {c: round(r["peak_rss_gb"] - base, 3) for c, r in results.items()},
    }))


if __name__ == "__main__":
    main()
