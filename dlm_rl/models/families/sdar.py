"""SDAR / TraDo (`model_type: sdar`): Qwen3 weights under their own names, block-causal attention."""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from dlm_rl.models.families.base import Family, dtype_of, require, rope_parameters, token_ids

MASK_TOKEN_ID = 151669  # <|MASK|>
BLOCK_SIZE = 4  # SDAR's released models attend in blocks of 4 unless the config says otherwise


def native_config(raw: dict) -> Qwen3Config:
    require(raw, "sdar", hidden_act=("silu", None), use_sliding_window=(False, None))
    heads = raw["num_attention_heads"]
    return Qwen3Config(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_parameters=rope_parameters(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        use_sliding_window=False,
        **token_ids(raw),
        **dtype_of(raw),
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
