"""Dream-7B (`model_type: Dream`): Qwen2 weights under their own names, shifted logits, full attention."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM

from dlm_rl.models.families.base import Family, qwen_fields

MASK_TOKEN_ID = 151666  # <|mask|>


def native_config(raw: dict) -> Qwen2Config:
    return Qwen2Config(**qwen_fields(raw, "Dream"))


def conventions(raw: dict, tokenizer) -> dict:
    # Dream was initialised from an AR model: hidden state i-1 predicts token i.
    return dict(mask_token_id=raw.get("mask_token_id") or MASK_TOKEN_ID, shift_logits=True, attention="full")


DREAM = Family("dream", Qwen2ForCausalLM, native_config, conventions, tokenizer_class="Qwen2Tokenizer")
