"""LLaDA-8B / LLaDA 1.5 (`model_type: llada`): an OLMo-style Llama block run bidirectionally, on LlamaForCausalLM."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from dlm_rl.models.families.base import Family, dtype_of, require

MASK_TOKEN_ID = 126336  # <|mdm_mask|>; LLaDA's config states it, its tokenizer declares no mask token

# LLaDA's tensor names → Llama's (its blocks' last projection and its LM head are both called `ff_out`).
_BLOCK = r"^model\.transformer\.blocks\.(\d+)\."
KEY_MAPPING = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    _BLOCK + r"attn_norm\.": r"model.layers.\1.input_layernorm.",
    _BLOCK + r"ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
    _BLOCK + r"q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    _BLOCK + r"k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    _BLOCK + r"v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    _BLOCK + r"attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    _BLOCK + r"ff_proj\.": r"model.layers.\1.mlp.gate_proj.",  # the SiLU-gated branch
    _BLOCK + r"up_proj\.": r"model.layers.\1.mlp.up_proj.",
    _BLOCK + r"ff_out\.": r"model.layers.\1.mlp.down_proj.",
}


def native_config(raw: dict) -> LlamaConfig:
    """LlamaConfig from LLaDA's OLMo-style config; options a Llama block does not compute are refused."""
    require(
        raw,
        "llada",
        block_type="llama",
        activation_type="silu",
        layer_norm_type="rms",
        rope=True,
        alibi=(False, None),
        include_bias=False,
        include_qkv_bias=(False, None),
        bias_for_layer_norm=(False, None),
        attention_layer_norm=(False, None),
        input_emb_norm=(False, None),
        scale_logits=(False, None),
        clip_qkv=None,
        block_group_size=(1, None),
    )
    heads = raw["n_heads"]
    kv_heads = 1 if raw.get("multi_query_attention") else raw.get("n_kv_heads") or heads
    hidden = raw["d_model"]
    return LlamaConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * hidden,
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=raw["max_sequence_length"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(raw.get("weight_tying", True)),
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=raw.get("bos_token_id"),  # LLaDA's config states none (the tokenizer's is 126080)
        eos_token_id=raw.get("eos_token_id"),
        # Not its pad id (126081, also EOS): Llama would make that embedding row a padding_idx that never trains;
        # LLaDA's embedding has none. Padding is the tokenizer's.
        pad_token_id=None,
        **dtype_of(raw),
    )


def conventions(raw: dict, tokenizer) -> dict:
    return dict(mask_token_id=raw.get("mask_token_id") or MASK_TOKEN_ID, shift_logits=False, attention="full")


LLADA = Family("llada", LlamaForCausalLM, native_config, conventions, KEY_MAPPING)
