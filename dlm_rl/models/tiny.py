"""Tiny Llama-architecture diffusion LMs for the CPU testbed (same code path as real Llama/Qwen backbones)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dlm_rl.data.tokenizer import EMBEDDED, char_tokenizer
from dlm_rl.models.diffusion_lm import Conventions, DiffusionLM


def tiny_model(
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_positions: int = 256,
    attention: str = "full",
    block_size: int | None = None,
    seed: int = 0,
) -> DiffusionLM:
    """A freshly initialised tiny LlamaForCausalLM with the character tokenizer, run as a diffusion LM."""
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(EMBEDDED),  # not <|unk|>: the testbed checkpoints embed ids 0-99
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    conventions = Conventions(
        mask_token_id=tokenizer.mask_token_id, shift_logits=False, attention=attention, block_size=block_size
    )
    return DiffusionLM(model, conventions, tokenizer)
