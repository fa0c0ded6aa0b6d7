"""Tiny checkpoints in the on-disk formats the hub delivers for LLaDA, Dream and SDAR / TraDo.

Each is what `snapshot_download` would give for the family, shrunk: the family's own `config.json` field names and
special-token ids, its tensor names in `model.safetensors`, tokenizer files with the special tokens at their real
ids (so the vocabularies are full-sized and the rest tiny), and an `auto_map` pointing at modeling files that are not
there: a loader that tried to run remote code would fail. Weights are random; `reference_logits` computes what the
family's published forward computes from these tensors, written out here from the published architecture.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 48

# Special tokens at their published ids; vocabulary size as published (LLaDA: embedding_size).
SPECIALS = {
    "llada": {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|eot_id|>": 126348, "<|mdm_mask|>": 126336},
    "dream": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|mask|>": 151666},
    "sdar": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|MASK|>": 151669},
}
VOCAB = {"llada": 126464, "dream": 152064, "sdar": 151936}


def llada_config() -> dict:
    return {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada", "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": HIDDEN,
        "embedding_dropout": 0.0, "embedding_size": VOCAB["llada"], "eos_token_id": 126081, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 64,
        "mlp_hidden_size": FFN, "mlp_ratio": 4, "multi_query_attention": None, "n_heads": HEADS,
        "n_kv_heads": HEADS, "n_layers": LAYERS, "pad_token_id": 126081, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": VOCAB["llada"], "weight_tying": False,
    }


def dream_config() -> dict:
    return {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "model_type": "Dream", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "mask_token_id": 151666, "max_position_embeddings": 131072, "max_window_layers": 28,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False,
        "vocab_size": VOCAB["dream"],
    }


def sdar_config(block_size: int = 4) -> dict:
    return {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "model_type": "sdar", "attention_bias": False, "attention_dropout": 0.0, "block_size": block_size,
        "bos_token_id": 151643, "eos_token_id": 151643, "fuse_cross_entropy": True, "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.52.4", "use_cache": True, "use_sliding_window": False,
        "vocab_size": VOCAB["sdar"],
    }


CONFIGS = {"llada": llada_config, "dream": dream_config, "sdar": sdar_config}


def _tensor_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the family's checkpoint, under its published name."""
    vocab, hd = VOCAB[family], HIDDEN // HEADS
    kv = (HEADS if family == "llada" else KV_HEADS) * hd
    shapes = {}
    if family == "llada":
        shapes["model.transformer.wte.weight"] = (vocab, HIDDEN)
        for i in range(LAYERS):
            p = f"model.transformer.blocks.{i}."
            shapes |= {p + "attn_norm.weight": (HIDDEN,), p + "ff_norm.weight": (HIDDEN,),
                       p + "q_proj.weight": (HIDDEN, HIDDEN), p + "k_proj.weight": (kv, HIDDEN),
                       p + "v_proj.weight": (kv, HIDDEN), p + "attn_out.weight": (HIDDEN, HIDDEN),
                       p + "ff_proj.weight": (FFN, HIDDEN), p + "up_proj.weight": (FFN, HIDDEN),
                       p + "ff_out.weight": (HIDDEN, FFN)}
        shapes |= {"model.transformer.ln_f.weight": (HIDDEN,), "model.transformer.ff_out.weight": (vocab, HIDDEN)}
        return shapes
    shapes["model.embed_tokens.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                   p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, FFN)}
        if family == "dream":  # Qwen2: biases on q, k, v
            shapes |= {p + "self_attn.q_proj.bias": (HIDDEN,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        else:  # Qwen3: RMS norm of each head's queries and keys
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    shapes["model.norm.weight"] = (HIDDEN,)
    if family == "dream":  # SDAR's small models tie the head to the embeddings
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def weights(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _tensor_shapes(family).items():
        if len(shape) == 1 and "bias" not in name:  # norm weights near 1
            out[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
    return out


def _tokenizer(family: str) -> Tokenizer:
    """A byte-level BPE tokenizer (no merges) of the family's vocabulary size, its special tokens at their ids."""
    specials = SPECIALS[family]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    size = max(specials.values()) + 1
    by_id = {i: token for token, i in specials.items()}
    for i in range(len(vocab), size):
        vocab[by_id.get(i, f"<|reserved_{i}|>")] = i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    return tokenizer


def _tokenizer_config(family: str) -> dict:
    specials = SPECIALS[family]
    decoder = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for t, i in specials.items()}
    if family == "llada":  # a plain fast tokenizer, no mask token declared
        return {"added_tokens_decoder": decoder, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "model_max_length": 1000000000000000019884624838656,
                "tokenizer_class": "PreTrainedTokenizerFast"}
    config = {"added_tokens_decoder": decoder, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "model_max_length": 131072, "errors": "replace", "split_special_tokens": False}
    if family == "dream":  # its own tokenizer class, defined only by its remote code
        return {**config, "bos_token": "<|endoftext|>", "mask_token": "<|mask|>", "tokenizer_class": "DreamTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}}
    return {**config, "bos_token": None, "tokenizer_class": "Qwen2Tokenizer"}


def write_checkpoint(family: str, path: str | os.PathLike, *, seed: int = 0, **config_changes) -> dict:
    """Write a tiny hub-format checkpoint of `family` to `path`; returns its tensors (published names)."""
    os.makedirs(path, exist_ok=True)
    config = {**CONFIGS[family](), **config_changes}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = weights(family, seed)
    save_file({k: v.to(torch.bfloat16) if config.get("torch_dtype") == "bfloat16" else v for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tokenizer = _tokenizer(family)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    if family == "dream":  # Dream ships vocab.json and merges.txt, no tokenizer.json
        os.remove(os.path.join(path, "tokenizer.json"))
        tokenizer.model.save(str(path))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(_tokenizer_config(family), f, indent=2)
    if config.get("torch_dtype") == "bfloat16":
        tensors = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}
    return tensors


# --- the published forward, from the checkpoint's own tensors ------------------------------------------------------


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):
    """Rotary embedding on the two halves of each head (LLaDA's, Qwen2's and Qwen3's convention). x: [B, h, L, d]"""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # [d/2]
    angles = positions[:, None, :, None].float() * inv_freq  # [B, 1, L, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(family: str, tensors: dict, input_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The published model's raw logits [B, L, V] for `input_ids` [B, L] (no padding) under the [B, L, L] bool
    attention pattern `allowed`, positions 0..L-1; for Dream these are the unshifted logits its head emits."""
    config = CONFIGS[family]()
    batch, length = input_ids.shape
    hd = HIDDEN // HEADS
    if family == "llada":
        names = dict(emb="model.transformer.wte.weight", final="model.transformer.ln_f.weight",
                     head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{}.",
                     attn_norm="attn_norm", ffn_norm="ff_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out",
                     gate="ff_proj", up="up_proj", down="ff_out")
        eps, theta = config["rms_norm_eps"], config["rope_theta"]
    else:
        names = dict(emb="model.embed_tokens.weight", final="model.norm.weight",
                     head="lm_head.weight" if family == "dream" else "model.embed_tokens.weight",
                     layer="model.layers.{}.", attn_norm="input_layernorm", ffn_norm="post_attention_layernorm",
                     q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                     gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
        eps, theta = config["rms_norm_eps"], config["rope_theta"]
    w = tensors
    positions = torch.arange(length).expand(batch, -1)
    h = w[names["emb"]][input_ids]  # [B, L, H]
    for i in range(LAYERS):
        p = names["layer"].format(i)

        def proj(x, name):
            out = x @ w[p + name + ".weight"].T
            bias = w.get(p + name + ".bias")
            return out if bias is None else out + bias

        x = _rms(h, w[p + names["attn_norm"] + ".weight"], eps)
        q, k, v = (proj(x, names[n]).view(batch, length, -1, hd).transpose(1, 2) for n in ("q", "k", "v"))
        if family == "sdar":
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope(q, positions, theta), _rope(k, positions, theta)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [B, h, L, L]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        h = h + proj(attn, names["o"])
        x = _rms(h, w[p + names["ffn_norm"] + ".weight"], eps)
        h = h + proj(torch.nn.functional.silu(proj(x, names["gate"])) * proj(x, names["up"]), names["down"])
    return _rms(h, w[names["final"]], eps) @ w[names["head"]].T
