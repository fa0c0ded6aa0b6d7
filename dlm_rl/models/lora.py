"""PEFT LoRA adapters on a DiffusionLM; the disabled adapter is the reference model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from dlm_rl.models.diffusion_lm import DiffusionLM

logger = logging.getLogger(__name__)

# The module types PEFT's LoRA wraps; a target naming anything else makes PEFT raise with the module's full repr.
ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


@dataclass
class LoraArguments:
    """LoRA settings shared by every trainer's config."""

    use_lora: bool = False
    """Train a LoRA adapter instead of all weights."""
    lora_r: int = 16
    """Adapter rank."""
    lora_alpha: int = 32
    """Adapter scale numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; by default the family's attention and MLP projections (`default_lora_targets`)."""


def lora_arguments(peft_config) -> LoraArguments:
    """The LoRA settings of a `peft.LoraConfig` (TRL's `peft_config`)."""
    targets = peft_config.target_modules
    return LoraArguments(use_lora=True, lora_r=peft_config.r, lora_alpha=peft_config.lora_alpha,
                         lora_dropout=peft_config.lora_dropout,
                         lora_target_modules=None if targets is None else [targets] if isinstance(targets, str)
                         else sorted(targets))


# Every attention and MLP projection, by the backbone's model_type; Llama / Qwen names (LLaDA, Dream and SDAR load
# on those classes) for every other one.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = {"llada2_moe": ["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"]}


def default_lora_targets(model: nn.Module) -> list[str]:
    """The LoRA targets used when a config names none: the family's attention and MLP projections."""
    return list(DEFAULT_TARGETS.get(getattr(model.config, "model_type", None), LLAMA_TARGETS))


def add_lora(dlm: DiffusionLM, args: LoraArguments) -> DiffusionLM:
    """Wrap the backbone in a PEFT LoRA model in place, after checking the target names (`lora_targets`)."""
    if hasattr(dlm.model, "peft_config"):
        raise ValueError(
            f"the model already carries a LoRA adapter ({type(dlm.model).__name__}, e.g. a saved adapter directory); "
            "to train that adapter further, attach it to the base model with peft.PeftModel.from_pretrained(dlm.model, "
            "ADAPTER, is_trainable=True); to add a new one on top, merge it first: dlm.model = dlm.model.merge_and_unload()"
        )
    targets = list(args.lora_target_modules or default_lora_targets(dlm.model))
    excluded = lora_targets(dlm.model, targets)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        exclude_modules=excluded or None,
        bias="none",
    )
    dlm.model = get_peft_model(dlm.model, config)
    return dlm


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Check target names as PEFT matches them (a module's full name or a dotted suffix of it); returns the modules
    to exclude. A name that matches nothing is an error (PEFT skips it silently when another name matches), and so
    is a name of a module LoRA cannot adapt. The output layer is excluded, with a warning, when a name picks it up
    together with other layers (LLaDA calls both its blocks' last projection and its LM head `ff_out`)."""
    modules = dict(model.named_modules())
    matches = {t: [name for name in modules if name == t or name.endswith("." + t)] for t in targets}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, nn.Linear)})
    where = f"{type(model).__name__}, whose linear layers are named {linear}"
    unmatched = [t for t, names in matches.items() if not names]
    if unmatched:
        raise ValueError(f"LoRA target modules {unmatched} match no module of {where}; "
                         "set lora_target_modules to some of those")
    for target, names in matches.items():
        other = [name for name in names if not isinstance(modules[name], ADAPTABLE)]
        if other:
            raise ValueError(f"LoRA target module {target!r} names {other[0]} ({type(modules[other[0]]).__name__}), "
                             f"which LoRA cannot adapt, in {where}; name the linear layers inside it instead")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((name for name, m in modules.items() if m is head), None)
    widened = [t for t, names in matches.items() if head_name in names and len(names) > 1]
    if not widened or any(names == [head_name] for names in matches.values()):
        return []
    logger.warning("LoRA target modules %s also match the output layer %s (the LM head); it is left out. To adapt "
                   "it too, add its full name %r to lora_target_modules", widened, head_name, head_name)
    return [head_name]
