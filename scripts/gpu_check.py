#!/usr/bin/env python
"""GPU check of a 7-8B (or MoE) diffusion LM: sampler tokens/s (reference vs threshold vs threshold + DualCache)
at generation lengths 256 and 512 on 64 GSM8K-format prompts, then 3 TraceRL steps with LoRA. Prints one JSON
object.

    python scripts/gpu_check.py --model /models/LLaDA-8B-Instruct
    python scripts/gpu_check.py --model /models/Dream-v0-Instruct-7B --prompts gsm8k_test.jsonl

Inputs:
  --model      a LLaDA / LLaDA 1.5, Dream, SDAR / TraDo or LLaDA2 checkpoint directory as the hub delivers it (or
               a hub id, if the hub is reachable), loaded on transformers' own classes without its remote code; or
               a dlm-rl directory. Another model with custom code needs --trust_remote_code.
  --prompts    a GSM8K-format jsonl (`question` and `answer` ending in '#### N', or `prompt` and `answer`); the
               default is reasoning-gym's offline `gsm_symbolic` generator (GSM8K-style problems), so no hub is
               needed.
Everything runs through the library's own code: `dlm_rl.evaluation.rollout` (the sampler) and
`dlm_rl.trainers.tracerl.run` (the trainer); this script only times and reports them. Needs one CUDA GPU with
about 40 GB free for the bf16 weights, the batch's activations and the LoRA optimizer (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

SAMPLERS = {
    # name: SamplerConfig fields besides gen_length and block_length
    "reference": dict(early_stop=False),  # one token per step, LLaDA's published sampler
    "threshold": dict(threshold=0.9),
    "threshold+dual_cache": dict(threshold=0.9, cache="dual"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a LLaDA, Dream, SDAR or LLaDA2 checkpoint directory")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the checkpoint's own modeling code")
    parser.add_argument("--prompts", help="GSM8K-format jsonl (default: reasoning-gym gsm_symbolic, offline)")
    parser.add_argument("--n", type=int, default=64, help="prompts for the sampler timing")
    parser.add_argument("--gen_lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--block_length", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16, help="prompts sampled together")
    parser.add_argument("--tracerl_steps", type=int, default=3)
    parser.add_argument("--tracerl_task", default="reasoning_gym:gsm_symbolic",
                        help="the TraceRL steps' task (a testbed task or reasoning_gym:NAME)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu_smoke_test", action="store_true",
                        help="run on CPU anyway (for the test suite, with a small model such as 'smollm2')")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke_test:
        print("gpu_check.py: no CUDA GPU is visible (torch.cuda.is_available() is False). This check times a 7-8B "
              "model and needs a GPU; on CPU, use scripts/bench_sampler.py with the tiny testbed models.",
              file=sys.stderr)
        return 2
    rows = _prompts(args.prompts, args.n, args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "n_prompts": len(rows),
              "torch": torch.__version__, "sampler": [], "tracerl": None}
    report["sampler"] = _time_samplers(args, rows, device)
    report["tracerl"] = _tracerl_steps(args, device)
    print(json.dumps(report))
    return 0


def _prompts(path: str | None, n: int, seed: int) -> list[dict]:
    """Rows with a chat-message `prompt` and a gold `answer`."""
    if path is None:
        from dlm_rl.data.tasks import reasoning_gym_task

        rows = list(reasoning_gym_task("gsm_symbolic", n, seed=seed))
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()][:n]
        for row in rows:
            if "prompt" not in row:
                row["prompt"] = row["question"]
            row["answer"] = str(row["answer"]).split("####")[-1].strip()
        if not rows:
            raise SystemExit(f"gpu_check.py: {path} holds no prompts")
    instruction = "\nPut the final answer in \\boxed{}."
    return [{**row, "prompt": [{"role": "user", "content": row["prompt"] + instruction}]} for row in rows]


def _time_samplers(args, rows: list[dict], device) -> list[dict]:
    import torch

    from dlm_rl.evaluation import decode_responses, rollout
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.sampling.config import SamplerConfig
    from rewards.math import check

    model = resolve_model(args.model, trust_remote_code=args.trust_remote_code).to(device).eval()
    prompts = [row["prompt"] for row in rows]
    results = []
    for gen_length in args.gen_lengths:
        for name, fields in SAMPLERS.items():
            config = SamplerConfig(gen_length=gen_length, block_length=args.block_length, **fields)
            generator = torch.Generator(device).manual_seed(args.seed)
            _synchronize(device, reset_peak=True)
            start = time.perf_counter()
            trajectories = rollout(model, prompts, config, batch_size=args.batch_size, generator=generator,
                                   progress=f"{name} @ {gen_length}")
            _synchronize(device)
            seconds = time.perf_counter() - start
            texts = [t for tr in trajectories for t in decode_responses(model.tokenizer, tr.response_ids)]
            nfe = torch.cat([tr.nfe for tr in trajectories]).double()
            results.append({
                "sampler": name, "gen_length": gen_length, "seconds": seconds,
                "tokens_per_s": len(prompts) * gen_length / seconds, "nfe": nfe.mean().item(),
                "accuracy": sum(check(row["answer"], text) for row, text in zip(rows, texts)) / len(rows),
                "peak_memory_gb": _peak_memory_gb(device),
            })
    reference = {r["gen_length"]: r["tokens_per_s"] for r in results if r["sampler"] == "reference"}
    for r in results:
        r["speedup"] = r["tokens_per_s"] / reference[r["gen_length"]]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _tracerl_steps(args, device) -> dict:
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    with tempfile.TemporaryDirectory() as output_dir:
        config = TraceRLConfig(
            model=args.model, trust_remote_code=args.trust_remote_code, dataset_name=args.tracerl_task, chat=True,
            gen_length=min(args.gen_lengths), block_length=args.block_length, use_lora=True, lora_r=16,
            num_generations=4, prompts_per_step=4, max_steps=args.tracerl_steps, eval_size=8,
            eval_steps=args.tracerl_steps, micro_batch_rows=8, output_dir=output_dir, report_to="none", seed=args.seed,
        )
        _synchronize(device, reset_peak=True)
        start = time.perf_counter()
        last = run(config)
        seconds = time.perf_counter() - start
        with open(f"{output_dir}/metrics.jsonl") as f:
            lines = [json.loads(line) for line in f]
    return {"steps": args.tracerl_steps, "seconds": seconds, "peak_memory_gb": _peak_memory_gb(device),
            "losses": [line.get("loss") for line in lines if line["step"] > 0], "final": last}


def _synchronize(device, reset_peak: bool = False) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def _peak_memory_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


if __name__ == "__main__":
    sys.exit(main())
