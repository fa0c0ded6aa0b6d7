"""Loading diffusion LMs: our own checkpoints, remote-code dLLMs (LLaDA, Dream, SDAR), and AR models via A2D."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from dlm_rl.models.diffusion_lm import CONVENTIONS_FILE, Conventions, DiffusionLM

# Conventions of the remote-code dLLM families, keyed by config.model_type (facts from their public code).
FAMILIES = {
    # LLaDA: in-place logits, full attention, the mask goes in as `attention_bias`; AutoModelForCausalLM.
    "llada": dict(mask_token_id=126336, shift_logits=False, attention="full", mask_format="attention_bias"),
    # Dream: shifted logits (AR-initialised), 4-D bool mask with position ids; only AutoModel is mapped.
    "dream": dict(mask_token_id=151666, shift_logits=True, attention="full", mask_format="bool"),
    # SDAR / TraDo: block-causal attention, block length 4 unless the config says otherwise.
    "sdar": dict(mask_token_id=151669, shift_logits=False, attention="block", block_size=4, mask_format="bool"),
}


def load(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = "auto",
    device_map=None,
    **overrides,
) -> DiffusionLM:
    """Load a diffusion LM from a local path or hub name.

    - a directory saved by `DiffusionLM.save_pretrained` (has `dlm_rl.json`): weights, tokenizer, conventions;
    - a LLaDA, Dream or SDAR checkpoint (needs `trust_remote_code=True`): the family's conventions;
    - anything else is refused with advice: an AR model becomes a diffusion LM through `from_causal_lm`.
    `overrides` (mask_token_id, shift_logits, attention, block_size, mask_format) replace what was found.
    """
    path = str(path)
    saved = os.path.join(path, CONVENTIONS_FILE)
    if os.path.isfile(saved):
        with open(saved) as f:
            conventions = {**json.load(f), **overrides}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return DiffusionLM(model, Conventions(**conventions), tokenizer)

    adapter_only = not os.path.isfile(os.path.join(path, "config.json"))
    if adapter_only and os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(
            f"{path} holds a LoRA adapter only: load its base model with dlm_rl.models.load(BASE), then attach the "
            f"adapter with peft.PeftModel.from_pretrained(dlm.model, {path!r})"
        )
    # The raw config first: an unknown remote-code model_type makes AutoConfig fail before we can explain.
    model_type = str(PretrainedConfig.get_config_dict(path)[0].get("model_type", ""))
    family = FAMILIES.get(model_type.lower())
    if family is None:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not a known diffusion LM family ({', '.join(FAMILIES)}) "
            f"and has no {CONVENTIONS_FILE}. To run an autoregressive model as a diffusion LM, convert it with "
            "dlm_rl.models.from_causal_lm(model, tokenizer) (A2D)."
        )
    if not trust_remote_code:
        raise ValueError(f"{path} is a {model_type} checkpoint with custom code: pass trust_remote_code=True")
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    conventions = {**family, **_config_conventions(config), **overrides}
    auto = AutoModel if model_type.lower() == "dream" else AutoModelForCausalLM
    model = auto.from_pretrained(path, trust_remote_code=True, dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    return DiffusionLM(model, Conventions(**conventions), tokenizer)


def _config_conventions(config) -> dict:
    """Values a checkpoint's own config states (fine-tuned SDAR configs carry mask_token_id and block_size)."""
    found = {}
    if getattr(config, "mask_token_id", None) is not None:
        found["mask_token_id"] = config.mask_token_id
    if config.model_type.lower() == "sdar" and getattr(config, "block_size", None):
        found["block_size"] = config.block_size
    return found


def from_causal_lm(
    model,
    tokenizer,
    *,
    mask_token: str = "<|mask|>",
    attention: str = "full",
    block_size: int | None = None,
) -> DiffusionLM:
    """A2D: run an autoregressive transformers model as a diffusion LM.

    Uses the tokenizer's mask token if it has one, else `mask_token` if it is already in the vocabulary, else adds
    it and resizes the embeddings. Logits are shifted (token i is predicted from hidden state i-1, as the AR
    model was trained) and attention becomes bidirectional (or block-causal) through the 4-D mask.
    """
    if tokenizer.mask_token is None:
        if mask_token in tokenizer.get_vocab():
            tokenizer.mask_token = mask_token
        else:
            tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = tokenizer.mask_token_id
    if mask_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    conventions = Conventions(mask_token_id=mask_id, shift_logits=True, attention=attention, block_size=block_size)
    return DiffusionLM(model, conventions, tokenizer)
