"""What a dLLM family is: how its hub checkpoint becomes a native transformers model and a DiffusionLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Family:
    """A published dLLM family and the native transformers class its weights load into."""

    model_type: str
    """The checkpoint's `config.json` model_type, lower-cased."""
    model_class: type
    """The transformers model class the weights load into."""
    native_config: Callable[[dict], object]
    """Builds the native config from the checkpoint's raw `config.json`; refuses options the native class lacks."""
    conventions: Callable[[dict, object], dict]
    """DiffusionLM conventions from the raw config and the tokenizer."""
    key_mapping: dict[str, str] = field(default_factory=dict)
    """Regex renames of the checkpoint's tensor names to the native ones (transformers' `key_mapping`)."""
    tokenizer_class: str = "PreTrainedTokenizerFast"
    """The transformers tokenizer class to read the tokenizer files with when they name a remote-code class."""


def require(raw: dict, model_type: str, **expected) -> None:
    """Refuse a config option the native class does not implement (it would load and compute something else)."""
    for key, allowed in expected.items():
        value = raw.get(key)
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if value not in allowed:
            raise ValueError(
                f"{model_type} checkpoint sets {key}={value!r}; dlm-rl loads this family on a transformers class that "
                f"computes only {key} in {allowed}, so it would give other logits than the checkpoint's own code"
            )


def rope_parameters(raw: dict, default_theta: float = 10000.0) -> dict:
    """transformers-5 `rope_parameters` from a 4.x-style config (rope_theta plus an optional rope_scaling)."""
    if raw.get("rope_parameters"):
        return dict(raw["rope_parameters"])
    scaling = dict(raw.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return {**scaling, "rope_type": rope_type, "rope_theta": float(raw.get("rope_theta", default_theta))}


def token_ids(raw: dict) -> dict:
    """The special-token ids a config states (bos / eos / pad), for the native config."""
    return {key: raw[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(key) is not None}


def dtype_of(raw: dict) -> dict:
    """The checkpoint's stored dtype, so that `dtype='auto'` keeps it."""
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return {"dtype": dtype} if dtype else {}


def qwen_fields(raw: dict, model_type: str) -> dict:
    """The config fields Qwen2 and Qwen3 share, from a Qwen-style hub config (Dream's, SDAR's); options the native
    classes do not compute are refused."""
    require(raw, model_type, hidden_act=("silu", None), use_sliding_window=(False, None))
    heads = raw["num_attention_heads"]
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_parameters=rope_parameters(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        **token_ids(raw),
        **dtype_of(raw),
    )
