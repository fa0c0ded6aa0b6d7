"""Fully sharded data parallelism (torch's FSDP2, `fully_shard`) for the RL trainers' models: between steps every rank
holds 1/world of the trained weights, of their gradients and of AdamW's state.

A step works on whole weights gathered once: `gather` all-gathers them (in the compute dtype, bfloat16 over float32
master weights) and keeps them through the rollout, every forward and backward pass, however many each rank runs
(TraceRL's rows per response vary; the group filter can leave a rank with none), and the held-out check on rank 0
alone, with no other collective in between. The backward passes leave whole gradients on each rank, as under data
parallelism; `sum_gradients` sums them over the ranks one tensor at a time, keeps each rank's slice of the sum as
the sharded gradient and reshards the weights, so that clipping and AdamW work on shards. So the gradients equal
the one-process step's on the global batch, exactly as `dlm_rl.distributed` makes them under data parallelism, and
at the step's peak a rank holds the whole compute-dtype weights and one whole gradient tensor at a time on top of
its shards. In one process (or an unsharded model) every function here does nothing but `sum_gradients`, which
falls back on `dlm_rl.distributed.sum_gradients`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dlm_rl import distributed


def shard(model: nn.Module) -> None:
    """Shard `model` (a DiffusionLM, after any LoRA adapter is added and its weights are the same on every rank):
    each transformer block (the backbone's `_no_split_modules`) is one unit, the rest the root's. A model computing
    in bfloat16 over float32 master weights (`dlm_rl.models.precision`) gathers its weights in bfloat16."""
    compute = getattr(model, "compute_dtype", None)
    # reduce_dtype = the compute dtype: FSDP then leaves the gathered weights' gradients on them (with another dtype
    # it would move them to a buffer of its own); `sum_gradients` sums them in float32 itself.
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=compute) if compute else None
    options = {"mp_policy": policy} if policy else {}
    blocks = set().union(*(getattr(module, "_no_split_modules", None) or () for module in model.modules()))
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    model._sharding_layout = {name: (p.device_mesh, p.placements) for name, p in model.named_parameters()}


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "_sharding_layout")


def gather(model: nn.Module) -> None:
    """Whole weights on every rank until `sum_gradients` (or `release`); a collective: every rank calls it at the
    same point. Gathering gathered weights does nothing."""
    if not is_sharded(model) or getattr(model, "_gathered", False):
        return
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    model.set_requires_gradient_sync(False)
    for module in _units(model):
        module.unshard()
    model._gathered = True


def release(model: nn.Module) -> None:
    """Back to shards (no collective); the whole weights' gradients, if any, are dropped."""
    if not getattr(model, "_gathered", False):
        return
    for p in model.parameters():
        p.grad = None
    for module in _units(model):
        module.reshard()
    model.set_reshard_after_forward(True)
    model.set_reshard_after_forward(False, recurse=False)  # FSDP's default for the root
    model.set_reshard_after_backward(True)
    model.set_requires_gradient_sync(True)
    model._gathered = False


def sum_gradients(model: nn.Module, parameters) -> None:
    """After the local backward passes: the sum over the ranks of the gradients of `model`'s trainable weights
    (a weight without one counts as zero), as sharded gradients of its sharded weights, which it reshards. For an
    unsharded model, `dlm_rl.distributed.sum_gradients(parameters)`."""
    if not is_sharded(model):
        distributed.sum_gradients(parameters)
        return
    if not getattr(model, "_gathered", False):
        raise RuntimeError("sum_gradients on a sharded model expects the gradients of its gathered weights")
    shards = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            total = torch.zeros(p.shape, dtype=torch.float32, device=p.device) if p.grad is None else p.grad.float()
            p.grad = None
            if distributed.world_size() > 1:
                dist.all_reduce(total)
            mesh, placements = model._sharding_layout[name]
            shards[name] = distribute_tensor(total, mesh, placements, src_data_rank=None).to_local().clone()
    release(model)
    for name, p in model.named_parameters():
        if name in shards:
            p.grad = DTensor.from_local(shards.pop(name).to(p.dtype), p.device_mesh, p.placements,
                                        shape=p.shape, stride=p.stride())


def whole_state_dict(model: nn.Module) -> dict:
    """The sharded `model`'s state dict, whole and on the CPU, on rank 0 (empty elsewhere). A collective: every rank
    calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _units(model: nn.Module) -> list:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]
