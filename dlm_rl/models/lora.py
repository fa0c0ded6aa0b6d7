"""PEFT LoRA adapters on a DiffusionLM; the disabled adapter is the reference model."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from torch import nn

from dlm_rl.models.diffusion_lm import DiffusionLM


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
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names to adapt (Llama/Qwen names by default)."""


def add_lora(dlm: DiffusionLM, args: LoraArguments) -> DiffusionLM:
    """Wrap the backbone in a PEFT LoRA model in place; refuse target names that match no module."""
    names = {name.rsplit(".", 1)[-1] for name, _ in dlm.model.named_modules()}
    unmatched = [t for t in args.lora_target_modules if t not in names]
    if unmatched:
        linear = {n.rsplit(".", 1)[-1] for n, m in dlm.model.named_modules() if isinstance(m, nn.Linear)}
        raise ValueError(
            f"LoRA target modules {unmatched} match no module of {type(dlm.model).__name__}; "
            f"its linear layers are named {sorted(linear)}"
        )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        bias="none",
    )
    dlm.model = get_peft_model(dlm.model, config)
    return dlm
