"""Tiny checkpoints in the on-disk formats the hub delivers for LLaDA, Dream, SDAR / TraDo and LLaDA2.

Each is what `snapshot_download` would give for the family, shrunk: the family's own `config.json` field names and
special-token ids, its tensor names in `model.safetensors`, tokenizer files with the special tokens at their real
ids (so the vocabularies are full-sized and the rest tiny), and an `auto_map` pointing at modeling files that are not
there but files that raise when imported: a loader that ran remote code would fail. Weights are random; `reference_logits` computes what the
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
    "llada": {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
              "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348},
    "dream": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|mask|>": 151666},
    "sdar": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|MASK|>": 151669},
    "llada2": {"<|endoftext|>": 156892, "<|mask|>": 156895, "<|role_end|>": 156896},
}
VOCAB = {"llada": 126464, "dream": 152064, "sdar": 151936, "llada2": 157184}
EXPERTS, GROUPS, MOE_FFN, LLADA2_HEAD_DIM = 4, 2, 16, 16


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
        "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
        "mlp_hidden_size": FFN, "mlp_ratio": 4, "multi_query_attention": None, "n_heads": HEADS,
        "n_kv_heads": HEADS, "n_layers": LAYERS, "pad_token_id": 126081, "precision": "amp_bf16", "torch_dtype": "bfloat16",
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
        "mask_token_id": 151669, "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.52.4", "use_cache": True, "use_sliding_window": False,
        "vocab_size": VOCAB["sdar"],
    }


def llada2_config() -> dict:
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "model_type": "llada2_moe", "attention_dropout": 0.0, "dtype": "bfloat16", "embedding_dropout": 0.0,
        "first_k_dense_replace": 1, "head_dim": LLADA2_HEAD_DIM, "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": 32768,
        "max_window_layers": 28, "moe_intermediate_size": MOE_FFN, "moe_router_enable_expert_bias": True,
        "n_group": GROUPS, "norm_head": False, "norm_topk_prob": True, "num_attention_heads": HEADS,
        "num_experts": EXPERTS, "num_experts_per_tok": 2, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "num_shared_experts": 1, "output_dropout": 0.0, "output_router_logits": False, "pad_token_id": 156892,
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 600000,
        "rotary_dim": LLADA2_HEAD_DIM // 2, "routed_scaling_factor": 2.5, "router_dtype": "fp32",
        "score_function": "sigmoid", "sliding_window": 4096, "tie_word_embeddings": False, "topk_group": 1,
        "transformers_version": "4.56.2", "use_bias": False, "use_cache": True, "use_qk_norm": True,
        "use_qkv_bias": False, "use_sliding_window": False, "vocab_size": VOCAB["llada2"],
    }


CONFIGS = {"llada": llada_config, "dream": dream_config, "sdar": sdar_config, "llada2": llada2_config}


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
    if family == "llada2":
        return _llada2_shapes(vocab)
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


def _llada2_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    hd = LLADA2_HEAD_DIM
    shapes = {"model.word_embeddings.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "attention.query_key_value.weight": ((HEADS + 2 * KV_HEADS) * hd, HIDDEN),
                   p + "attention.query_layernorm.weight": (hd,), p + "attention.key_layernorm.weight": (hd,),
                   p + "attention.dense.weight": (HIDDEN, HEADS * hd)}
        mlps = [(p + "mlp.", FFN)] if i == 0 else (  # the first layer is dense, the others mixtures of experts
            [(p + f"mlp.experts.{e}.", MOE_FFN) for e in range(EXPERTS)] + [(p + "mlp.shared_experts.", MOE_FFN)])
        for prefix, width in mlps:
            shapes |= {prefix + "gate_proj.weight": (width, HIDDEN), prefix + "up_proj.weight": (width, HIDDEN),
                       prefix + "down_proj.weight": (HIDDEN, width)}
        if i > 0:
            shapes |= {p + "mlp.gate.weight": (EXPERTS, HIDDEN), p + "mlp.gate.expert_bias": (EXPERTS,)}
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)}


def weights(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _tensor_shapes(family).items():
        if name.endswith("expert_bias"):  # large enough to change which experts are picked
            out[name] = torch.randn(shape, generator=generator)
        elif len(shape) == 1 and "bias" not in name:  # norm weights near 1
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


# The families' chat templates, in short: LLaDA's Llama-3 headers, Dream's and SDAR's ChatML.
LLADA_CHAT = ("{% for m in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
              "m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLADA2_CHAT = ("{% for m in messages %}{{ '<role>' + m['role'] | upper + '</role>' + m['content'] + '<|role_end|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}")


def _tokenizer_config(family: str) -> dict:
    specials = SPECIALS[family]
    decoder = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for t, i in specials.items()}
    if family == "llada":  # a plain fast tokenizer, no mask token declared
        return {"added_tokens_decoder": decoder, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "model_max_length": 1000000000000000019884624838656,
                "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLADA_CHAT}
    config = {"added_tokens_decoder": decoder, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "model_max_length": 131072, "errors": "replace", "split_special_tokens": False,
              "chat_template": CHATML}
    if family == "dream":  # its own tokenizer class, defined only by its remote code
        return {**config, "bos_token": "<|endoftext|>", "mask_token": "<|mask|>", "tokenizer_class": "DreamTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}}
    if family == "llada2":
        return {**config, "bos_token": None, "mask_token": "<|mask|>", "chat_template": LLADA2_CHAT,
                "tokenizer_class": "PreTrainedTokenizerFast"}
    return {**config, "bos_token": None, "tokenizer_class": "Qwen2Tokenizer"}


def write_checkpoint(family: str, path: str | os.PathLike, *, seed: int = 0, shards: int = 1,
                     **config_changes) -> dict:
    """Write a tiny hub-format checkpoint of `family` to `path` (its tensors in `shards` files with an index, as
    the hub stores large models); returns its tensors (published names)."""
    os.makedirs(path, exist_ok=True)
    config = {**CONFIGS[family](), **config_changes}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for module in {ref.split(".")[0] for ref in config["auto_map"].values()}:  # remote code that must never run
        with open(os.path.join(path, module + ".py"), "w") as f:
            f.write(f"raise RuntimeError('the remote code {module}.py was run')\n")
    tensors = weights(family, seed)
    bf16 = "bfloat16" in (config.get("torch_dtype"), config.get("dtype"))
    stored = {k: v.to(torch.bfloat16) if bf16 else v for k, v in tensors.items()}
    _save_shards(stored, path, shards)
    tokenizer = _tokenizer(family)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    if family == "dream":  # Dream ships vocab.json and merges.txt, no tokenizer.json
        os.remove(os.path.join(path, "tokenizer.json"))
        tokenizer.model.save(str(path))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(_tokenizer_config(family), f, indent=2)
    if bf16:
        tensors = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}
    return tensors


def _save_shards(tensors: dict, path, shards: int) -> None:
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {}}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
        index["weight_map"] |= {n: file for n in part}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


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
    if family == "llada2":
        return _llada2_logits(tensors, input_ids, allowed)
    config = CONFIGS[family]()
    batch, length = input_ids.shape
    hd = HIDDEN // HEADS
    if family == "llada":
        names = dict(emb="model.transformer.wte.weight", final="model.transformer.ln_f.weight",
                     head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{}.",
                     attn_norm="attn_norm", ffn_norm="ff_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out",
                     gate="ff_proj", up="up_proj", down="ff_out")
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
        attn = _attend(q, k, v, allowed).transpose(1, 2).reshape(batch, length, -1)
        h = h + proj(attn, names["o"])
        x = _rms(h, w[p + names["ffn_norm"] + ".weight"], eps)
        h = h + proj(torch.nn.functional.silu(proj(x, names["gate"])) * proj(x, names["up"]), names["down"])
    return _rms(h, w[names["final"]], eps) @ w[names["head"]].T


def _attend(q, k, v, allowed):
    """Scaled dot-product attention over [B, h, L, d] heads (keys and values grouped), `allowed` [B, L, L]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v


def _llada2_logits(w: dict, input_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """LLaDA2.0's forward: fused QKV, per-head RMS qk-norm, rotary on the first half of each head; a dense SwiGLU
    first layer, then mixtures of experts (sigmoid router whose expert bias only picks, group-limited top-k,
    weights renormalised and scaled by routed_scaling_factor, plus the shared expert)."""
    config = llada2_config()
    eps, theta, hd = config["rms_norm_eps"], config["rope_theta"], LLADA2_HEAD_DIM
    rotary = int(hd * config["partial_rotary_factor"])
    batch, length = input_ids.shape
    positions = torch.arange(length).expand(batch, -1)

    def swiglu(x, prefix):
        gate = x @ w[prefix + "gate_proj.weight"].T
        return (torch.nn.functional.silu(gate) * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T

    h = w["model.word_embeddings.weight"][input_ids]  # [B, L, H]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        qkv = (x @ w[p + "attention.query_key_value.weight"].T).view(batch, length, HEADS + 2 * KV_HEADS, hd)
        q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=2)
        q = _rms(q, w[p + "attention.query_layernorm.weight"], eps).transpose(1, 2)
        k = _rms(k, w[p + "attention.key_layernorm.weight"], eps).transpose(1, 2)
        q = torch.cat([_rope(q[..., :rotary], positions, theta), q[..., rotary:]], -1)
        k = torch.cat([_rope(k[..., :rotary], positions, theta), k[..., rotary:]], -1)
        attn = _attend(q, k, v.transpose(1, 2), allowed).transpose(1, 2).reshape(batch, length, -1)
        h = h + attn @ w[p + "attention.dense.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps).reshape(batch * length, -1)  # [T, H]
        if i == 0:
            out = swiglu(x, p + "mlp.")
        else:
            scores = torch.sigmoid(x @ w[p + "mlp.gate.weight"].T)  # [T, E]
            biased = scores + w[p + "mlp.gate.expert_bias"]
            grouped = biased.view(len(x), GROUPS, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = torch.zeros_like(group_score).scatter(1, group_score.topk(config["topk_group"], -1).indices, 1)
            biased = biased.masked_fill(~keep.bool().repeat_interleave(EXPERTS // GROUPS, 1), float("-inf"))
            chosen = biased.topk(config["num_experts_per_tok"], -1).indices  # [T, k]
            weight = scores.gather(1, chosen)
            weight = weight / weight.sum(-1, keepdim=True) * config["routed_scaling_factor"]
            out = swiglu(x, p + "mlp.shared_experts.")
            for slot in range(chosen.shape[1]):
                for e in range(EXPERTS):
                    rows = chosen[:, slot] == e
                    if rows.any():
                        out[rows] += weight[rows, slot, None] * swiglu(x[rows], p + f"mlp.experts.{e}.")
        h = h + out.view(batch, length, -1)
    return _rms(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T
