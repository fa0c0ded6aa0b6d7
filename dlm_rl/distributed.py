"""Data-parallel training for the RL trainers under `torchrun` / `accelerate launch` (docs/scaling.md).

Every process (rank) holds the whole model and trains on its share of each step's global batch. A rank's loss is
its part of the global loss: its rows' terms divided by the global count (of rows, pairs or tokens), so after the
local backward passes one sum of the gradients over the ranks (`sum_gradients`) gives exactly the gradient of the
single-process step on the global batch, whatever number of rows each rank had.

That is DDP's result, without DDP's wrapper: the wrapper all-reduces inside every backward pass, so every rank
must run the same number of them through the wrapper, while here TraceRL's rows per response vary, the group
filter can leave a rank with no rows at all, and DiDi's discriminator runs twice before its backward pass.

In one process (WORLD_SIZE unset or 1) every function is the identity or does nothing.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
# How long a rank waits at a collective. The default (10 minutes for NCCL) is too short: the other ranks wait
# while rank 0 runs the held-out evaluation and, with rollout actors, samples every rank's share of a step.
TIMEOUT = datetime.timedelta(hours=2)


def setup(fsdp: bool = False) -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, NCCL on GPUs); this rank's device.
    An accelerate FSDP launch needs `fsdp` (the trainer shards the model itself: `dlm_rl.sharding`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        for variable, name in SHARDED.items():
            if os.environ.get(variable, "").lower() == "true" and not (fsdp and name == "FSDP"):
                raise ValueError(
                    f"launched with an accelerate {name} config: the dlm-rl RL trainers replicate the model on every "
                    "process (data parallel) unless the recipe sets `fsdp: true`; launch them with "
                    "configs/accelerate/ddp.yaml or torchrun. DeepSpeed configs are for `trainer: mdm` (the "
                    "transformers Trainer); see docs/scaling.md")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 logs, evaluates and saves."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; in one process, nothing."""
    if world_size() > 1:
        dist.barrier()


def share(items: list) -> list:
    """This rank's contiguous share of a global batch; shares differ in size by at most one item."""
    n, world, r = len(items), world_size(), rank()
    if n < world:
        raise ValueError(f"a global batch of {n} prompts cannot give each of the {world} processes one; "
                         f"raise prompts_per_step to at least {world}")
    bounds = share_bounds(n)
    return items[bounds[r] : bounds[r + 1]]


def share_bounds(n: int) -> list[int]:
    """Where each rank's share of a global batch of `n` items starts, then `n`: rank r's is [bounds[r], bounds[r+1])."""
    world = world_size()
    return [n * r // world for r in range(world + 1)]


def all_sum(value):
    """The sum over ranks of a number, or of every number in a dict (one all-reduce); in one process, `value`."""
    if world_size() == 1:
        return value
    keys = list(value) if isinstance(value, dict) else None
    numbers = [float(value[k]) for k in keys] if keys is not None else [float(value)]
    total = torch.tensor(numbers, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    total = total.tolist()
    return dict(zip(keys, total)) if keys is not None else total[0]


def sum_gradients(parameters) -> None:
    """Sum the gradients of the trainable `parameters` over the ranks (a parameter without one counts as zero).
    Call after the local backward passes, before clipping and the optimiser step."""
    if world_size() == 1:
        return
    pending = []
    for p in parameters:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            pending.append(dist.all_reduce(p.grad, async_op=True))
    for work in pending:
        work.wait()


def broadcast_parameters(parameters) -> None:
    """Copy rank 0's trainable `parameters` to every rank, so that all ranks start from the same weights."""
    if world_size() == 1:
        return
    for p in parameters:
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


def gather(items: list) -> list | None:
    """Every rank's `items` concatenated in rank order, on rank 0 (None elsewhere). Tensors in them must be on the
    CPU (a CUDA tensor would be unpickled on rank 0 onto the sender's device index)."""
    if world_size() == 1:
        return items
    parts = [None] * world_size() if is_main() else None
    dist.gather_object(items, parts, dst=0)
    return [item for part in parts for item in part] if is_main() else None


class MainProcessFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed while making what `scatter_from_main` sends."""


class _Failure(str):
    """What rank 0 sends in place of the parts when making them failed: the error's description."""


def scatter_from_main(make_parts):
    """Rank 0 calls `make_parts()` (one part per rank: tensors in them on the CPU, as for `gather`) and each rank
    r returns part r; in one process, part 0. If `make_parts` raises on rank 0, it raises there and every other
    rank raises `MainProcessFailed` at once, rather than waiting for its part until the collective times out."""
    if world_size() == 1:
        return make_parts()[0]
    parts = None
    if is_main():
        try:
            parts = make_parts()
            if len(parts) != world_size():
                raise ValueError(f"{len(parts)} parts for {world_size()} processes")
        except BaseException as error:  # an interrupt of rank 0 alone, too
            dist.scatter_object_list([None], [_Failure(f"{type(error).__name__}: {error}")] * world_size(), src=0)
            raise
    received = [None]
    dist.scatter_object_list(received, parts, src=0)
    if isinstance(received[0], _Failure):
        raise MainProcessFailed(f"rank 0 failed ({received[0]}); see its log")
    return received[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
