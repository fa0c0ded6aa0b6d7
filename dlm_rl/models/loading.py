"""Loading diffusion LMs: our own checkpoints, published dLLM checkpoints on native classes, remote code, and A2D."""

from __future__ import annotations

import json
import logging
import os

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from dlm_rl.models.diffusion_lm import CONVENTIONS_FILE, Conventions, DiffusionLM
from dlm_rl.models.families import FAMILIES, Family

logger = logging.getLogger(__name__)


def load(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = "auto",
    device_map=None,
    **overrides,
) -> DiffusionLM:
    """Load a diffusion LM from a local path or hub name.

    - a directory saved by `DiffusionLM.save_pretrained` (has `dlm_rl.json`): weights, tokenizer, conventions; a
      saved LoRA adapter loads on the base model its `adapter_config.json` names;
    - a published LLaDA, Dream, SDAR / TraDo or LLaDA2 checkpoint: its weights on transformers' own class (Llama,
      Qwen2, Qwen3, or dlm-rl's LLaDA2 MoE) with the family's conventions; its remote code is never run;
    - another checkpoint with custom code, with `trust_remote_code=True`: its own code, behind a transformers-5
      compatibility layer; `overrides` must then give what its config does not (at least the mask token id);
    - anything else is refused with advice: an AR model becomes a diffusion LM through `from_causal_lm`.
    `overrides` (mask_token_id, shift_logits, attention, block_size, mask_format) replace what was found.
    """
    path = str(path)
    saved = os.path.join(path, CONVENTIONS_FILE)
    if os.path.isfile(saved) and os.path.isfile(os.path.join(path, "config.json")):
        with open(saved) as f:
            conventions = {**json.load(f), **overrides}
        if PretrainedConfig.get_config_dict(path)[0].get("auto_map"):  # saved from a model with its own code
            return _load_remote(path, dtype, device_map, conventions, trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device_map, output_loading_info=True
        )
        _check_loading_info(info, path, type(model).__name__)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return DiffusionLM(model, Conventions(**conventions), tokenizer)

    adapter_only = not os.path.isfile(os.path.join(path, "config.json"))
    if adapter_only and os.path.isfile(os.path.join(path, "adapter_config.json")):
        return _load_adapter(path, trust_remote_code, dtype, device_map, overrides)
    # The raw config first: a remote-code model_type makes AutoConfig fail before we can explain.
    raw = PretrainedConfig.get_config_dict(path)[0]
    model_type = str(raw.get("model_type", ""))
    family = FAMILIES.get(model_type.lower())
    if family is not None:
        return _load_native(path, raw, family, dtype, device_map, overrides)
    if not trust_remote_code:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not a known diffusion LM family ({', '.join(FAMILIES)}) "
            f"and has no {CONVENTIONS_FILE}. A checkpoint with its own modeling code loads with "
            "trust_remote_code=True and its conventions as keywords (mask_token_id=..., shift_logits=...); an "
            "autoregressive model becomes a diffusion LM with dlm_rl.models.from_causal_lm(model, tokenizer) (A2D)."
        )
    if "mask_token_id" not in overrides and raw.get("mask_token_id") is None:
        raise ValueError(f"{path}: its config states no mask_token_id; pass mask_token_id=... to load()")
    return _load_remote(path, dtype, device_map, {"mask_token_id": raw.get("mask_token_id"), **overrides}, True)


def saved_tokenizer(path: str):
    """The tokenizer `load` gives a directory saved by `DiffusionLM.save_pretrained` (without modelling code of its
    own), read without the weights; None for any other path."""
    if not (os.path.isfile(os.path.join(path, CONVENTIONS_FILE)) and os.path.isfile(os.path.join(path, "config.json"))):
        return None
    if PretrainedConfig.get_config_dict(path)[0].get("auto_map"):
        return None
    return AutoTokenizer.from_pretrained(path)


def _check_loading_info(info: dict, path: str, class_name: str) -> None:
    """A tensor the class lacks, or one it has that the checkpoint does not fill, is an error: transformers would
    only warn and leave the missing one randomly initialised."""
    problems = {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[key]}
    if problems:
        raise ValueError(f"{path}: the checkpoint's tensors do not fit {class_name}: {problems}")


def _load_adapter(path: str, trust_remote_code: bool, dtype, device_map, overrides: dict) -> DiffusionLM:
    """A saved LoRA adapter on the base model its adapter_config.json names (loaded as `load` loads it)."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base or not (os.path.isdir(base) or "/" in base):
        raise ValueError(
            f"{path} holds a LoRA adapter whose base model {base!r} cannot be found: load the base with "
            f"dlm_rl.models.load(BASE), then attach the adapter with peft.PeftModel.from_pretrained(dlm.model, {path!r})"
        )
    saved = os.path.join(path, CONVENTIONS_FILE)
    if os.path.isfile(saved):
        with open(saved) as f:
            overrides = {**json.load(f), **overrides}
    dlm = load(base, trust_remote_code=trust_remote_code, dtype=dtype, device_map=device_map, **overrides)
    dlm.model = PeftModel.from_pretrained(dlm.model, path)
    # PEFT only warns about adapter tensors that match no module (e.g. an adapter saved under other module names),
    # which would leave the bare base model: every saved tensor must have been loaded.
    saved_keys, loaded_keys = set(load_peft_weights(path)), set(get_peft_model_state_dict(dlm.model))
    if saved_keys != loaded_keys:
        raise ValueError(
            f"{path}: the adapter does not fit its base {base}: saved but not loaded {sorted(saved_keys - loaded_keys)[:5]}"
            f", expected but not saved {sorted(loaded_keys - saved_keys)[:5]}"
        )
    return dlm


def _load_native(path: str, raw: dict, family: Family, dtype, device_map, overrides: dict) -> DiffusionLM:
    """A published checkpoint's weights, renamed as the family says, in transformers' own class."""
    try:
        config = family.native_config(raw)
    except KeyError as error:
        raise ValueError(f"{path}: the {family.model_type} config.json lacks the field {error}") from None
    model, info = family.model_class.from_pretrained(
        path,
        config=config,
        key_mapping=family.key_mapping or None,
        dtype=dtype,
        device_map=device_map,
        output_loading_info=True,
    )
    _check_loading_info(info, path, family.model_class.__name__)
    # Saves write the native names: transformers (5.25: core_model_loading.revert_weight_conversion) would otherwise
    # undo the renaming it recorded in this private attribute when the model is saved (tested by the convert test).
    model._weight_conversions = []
    tokenizer = _tokenizer(path, family, config)
    conventions = {**family.conventions(raw, tokenizer), **overrides}
    _name_mask_token(tokenizer, conventions["mask_token_id"])
    return DiffusionLM(model, Conventions(**conventions), tokenizer)


def _tokenizer(path: str, family: Family, config):
    """The checkpoint's tokenizer without its remote code: AutoTokenizer (given the native config, so that the
    checkpoint's own config is not read again), or the family's transformers class when the tokenizer config names a
    class that only the checkpoint's own code defines."""
    try:
        return AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=False)
    except ValueError as error:  # "contains custom code which must be executed"
        logger.info("AutoTokenizer cannot read %s without remote code (%s); using %s", path, error,
                    family.tokenizer_class)
    return getattr(transformers, family.tokenizer_class).from_pretrained(path)


def _name_mask_token(tokenizer, mask_token_id: int) -> None:
    """Give the tokenizer the mask token the config names when its own files declare none (LLaDA's)."""
    if tokenizer is not None and tokenizer.mask_token is None and mask_token_id < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(mask_token_id)
        if token is not None:
            tokenizer.mask_token = token


def _load_remote(path: str, dtype, device_map, conventions: dict, trust_remote_code: bool) -> DiffusionLM:
    """A checkpoint with its own modeling code, run behind the transformers-5 compatibility layer."""
    from dlm_rl.models.remote_code import load_remote_model

    if not trust_remote_code:
        raise ValueError(f"{path} holds a model with its own modeling code: pass trust_remote_code=True to run it")
    auto_map = PretrainedConfig.get_config_dict(path)[0].get("auto_map") or {}
    auto_class = AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else AutoModel
    model = load_remote_model(path, auto_class=auto_class, dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    return DiffusionLM(model, Conventions(**conventions), tokenizer)


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
