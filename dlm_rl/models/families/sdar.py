"""SDAR / TraDo (`model_type: sdar`): Qwen3 weights under their own names, block-causal attention."""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from dlm_rl.models.families.base import Family, qwen_fields

MASK_TOKEN_ID = 151669  # <|MASK|>
BLOCK_SIZE = 4  # SDAR's released models attend in blocks of 4 unless the config says otherwise


def native_config(raw: dict) -> Qwen3Config:
    heads = raw["num_attention_heads"]
    return Qwen3Config(
        **qwen_fields(raw, "sdar"),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,  # SDAR states it (not hidden / heads)
        attention_bias=bool(raw.get("attention_bias", False)),
    )


def conventions(raw: dict, tokenizer) -> dict:
    # Fine-tuned SDAR / TraDo configs may state their own mask id and block size.
    return dict(
        mask_token_id=raw.get("mask_token_id") or MASK_TOKEN_ID,
        shift_logits=False,
        attention="block",
        block_size=raw.get("block_size") or BLOCK_SIZE,
    )


SDAR = Family("sdar", Qwen3ForCausalLM, native_config, conventions, tokenizer_class="Qwen2Tokenizer")
