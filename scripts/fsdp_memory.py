"""Per-rank memory of a model's weights, gradients and AdamW state after one VRPO step, in one process and sharded
with FSDP2 (`fsdp: true`, `dlm_rl.sharding`) over N gloo processes on the CPU; prints one JSON line per setting.

    python scripts/fsdp_memory.py                          # tiny model, full fine-tuning and LoRA, 2 processes
    python scripts/fsdp_memory.py --model smollm2 --processes 2

The bytes are the tensors each rank holds between steps (a shard's own elements, as `DTensor.to_local()` gives them;
FSDP2 pads uneven shards, which this leaves out). `ratio` is the largest rank's total over the one-process total:
about 1/N when everything is sharded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import torch

PAIRS = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(1, 6)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def held(model, optimizer) -> dict:
    """Bytes of this rank's weights, gradients and optimiser state."""
    size = {"weights": 0, "gradients": 0, "optimizer": 0}
    for p in model.parameters():
        size["weights"] += _local(p).numel() * p.element_size()
        if p.grad is not None:
            size["gradients"] += _local(p.grad).numel() * p.grad.element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                size["optimizer"] += _local(value).numel() * value.element_size()
    size["total"] = sum(size.values())
    return size


def measure(model_name: str, use_lora: bool) -> dict:
    """One VRPO step (AdamW) on this rank's share of the pairs; this rank's bytes afterwards."""
    from dlm_rl import distributed, sharding
    from dlm_rl.guards import NonFiniteLoss
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.models.lora import add_lora
    from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs
    from dlm_rl.trainers.optimization import hold_master_weights
    from dlm_rl.trainers.vrpo import VRPOConfig, _update

    distributed.setup(fsdp=True)
    torch.manual_seed(0)
    config = VRPOConfig(model=model_name, use_lora=use_lora, micro_batch_pairs=1, n_t=2, fsdp=True)
    model = resolve_model(model_name)
    frozen = None if use_lora else copy.deepcopy(model).requires_grad_(False)
    if use_lora:
        add_lora(model, config)
    hold_master_weights(config, model)
    distributed.broadcast_parameters(model.parameters())
    if distributed.world_size() > 1:
        sharding.shard(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    chosen, rejected = collate_pairs(model.tokenizer, distributed.share(PAIRS), 8)
    sharding.gather(model)
    _update(model, optimizer, parameters, chosen, rejected, PreferenceEstimator(2), config,
            torch.Generator().manual_seed(distributed.rank()), frozen, NonFiniteLoss(1, "VRPO"))
    sharding.release(model)
    return held(model, optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or 'smollm2' (as a recipe's model:)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rank_output", help=argparse.SUPPRESS)  # set when this script runs as one rank
    args = parser.parse_args()
    if args.rank_output:
        sizes = {"full": measure(args.model, False), "lora": measure(args.model, True)}
        with open(f"{args.rank_output}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(sizes, f)
        return
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as directory:
        ranks = {}
        for world in (1, args.processes):
            output = os.path.join(directory, f"world{world}")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                       os.path.abspath(__file__), "--model", args.model, "--rank_output", output]
            subprocess.run(command, env=env, check=True, capture_output=True)
            ranks[world] = [json.load(open(f"{output}.{r}")) for r in range(world)]
    for setting in ("full", "lora"):
        one = ranks[1][0][setting]
        sharded = [rank[setting] for rank in ranks[args.processes]]
        print(json.dumps({"model": args.model, "setting": setting, "processes": args.processes,
                          "one_process": one, "per_rank": sharded,
                          "ratio": max(rank["total"] for rank in sharded) / one["total"]}))


if __name__ == "__main__":
    main()
