"""Dream-7B (`model_type: Dream`): Qwen2 weights under their own names, shifted logits, full attention."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM

from dlm_rl.models.families.base import Family, dtype_of, require, rope_parameters, token_ids

MASK_TOKEN_ID = 151666  # <|mask|>


def native_config(raw: dict) -> Qwen2Config:
    require(raw, "Dream", hidden_act=("silu", None), use_sliding_window=(False, None))
    heads = raw["num_attention_heads"]
    return Qwen2Config(
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


def conventions(raw: dict, tokenizer) -> dict:
    # Dream was initialised from an AR model: hidden state i-1 predicts token i.
    return dict(mask_token_id=raw.get("mask_token_id") or MASK_TOKEN_ID, shift_logits=True, attention="full")


DREAM = Family("dream", Qwen2ForCausalLM, native_config, conventions, tokenizer_class="Qwen2Tokenizer")
