"""Float32 master weights for training a 16-bit checkpoint.

AdamW's update is about the learning rate per weight. A bfloat16 weight of size w is a multiple of about w / 256, so
an update of 5e-7 to a weight of 0.02 (LLaDA 1.5's learning rate on a typical weight) rounds back to the same weight:
full fine-tuning in bfloat16 loses small updates altogether. As in mixed-precision training elsewhere, the trainable
weights are held, updated and checkpointed in float32 (AdamW's state follows them), while every forward still
computes in the checkpoint's 16-bit dtype under `torch.autocast` (`DiffusionLM.compute_dtype`). Frozen weights (a
LoRA adapter's base, a reference model, a teacher) stay in 16 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from dlm_rl.models.diffusion_lm import DiffusionLM

MASTER_WEIGHTS = ("float32", "model")


def float32_masters(module: nn.Module) -> torch.dtype | None:
    """Turn `module`'s trainable bfloat16 weights (and the buffers of its wholly trainable submodules) into float32
    in place and make every DiffusionLM in it compute in
    bfloat16 under autocast; returns bfloat16, or None when no trainable weight was in it (a float32 model, or a
    LoRA adapter, which PEFT already keeps in float32). Call it before the optimiser is built. float16 weights are
    refused: autocast in float16 needs loss scaling, which the trainers do not do."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if any(p.dtype == torch.float16 for p in trainable):
        raise ValueError("float32 master weights for a float16 checkpoint would need loss scaling: load the model "
                         "in bfloat16 (or float32), or train in float16 itself with master_weights: model")
    upcast = [p for p in trainable if p.dtype == torch.bfloat16]
    if not upcast:
        return None
    for sub in module.modules():  # a wholly trainable module with its buffers (a spectral norm's vectors, say)
        own = list(sub.parameters())
        if own and all(p.requires_grad for p in own) and any(p.dtype == torch.bfloat16 for p in own):
            sub.float()
    for p in upcast:  # and the trainable weights of partly frozen modules
        p.data = p.data.float()
    for sub in module.modules():
        if isinstance(sub, DiffusionLM):
            sub.compute_dtype = torch.bfloat16
    return torch.bfloat16
