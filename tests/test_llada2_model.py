"""The native LLaDA2.x (`llada2_moe`) model on tiny random configs: checkpoint names, router, masks, KV cache, I/O."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from dlm_rl.models.attention import positional_mask
from dlm_rl.models.diffusion_lm import Conventions, DiffusionLM
from dlm_rl.models.families.llada2 import (
    LLaDA2MoeConfig,
    LLaDA2MoeForCausalLM,
    LLaDA2MoeGate,
    LLaDA2MoeRotaryEmbedding,
    register,
)

VOCAB = 61


def tiny_config(**overrides) -> LLaDA2MoeConfig:
    """One dense layer then two MoE layers (8 experts in 4 groups, top-2, one shared), GQA, qk-norm, half rotary."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=2, moe_intermediate_size=24, first_k_dense_replace=1, use_bias=False, use_qkv_bias=False,
        rms_norm_eps=1e-6, rope_theta=600000.0, partial_rotary_factor=0.5, pad_token_id=0,
        max_position_embeddings=128, attention_dropout=0.0, initializer_range=0.1,
    )
    return LLaDA2MoeConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LLaDA2MoeForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LLaDA2MoeForCausalLM(tiny_config(**overrides))
        for layer in model.model.layers[1:]:  # a non-zero expert bias, as trained checkpoints have
            layer.mlp.gate.expert_bias.normal_(0.0, 0.05)
    return model.eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def mask(key_positions, query_positions, mode, batch=2, block_size=4) -> torch.Tensor:
    """The library's own [B, 1, Q, K] additive mask for keys and queries at these positions."""
    keys, queries = torch.tensor(key_positions).expand(batch, -1), torch.tensor(query_positions).expand(batch, -1)
    return positional_mask(keys, torch.ones_like(keys, dtype=torch.bool), queries,
                           torch.ones_like(queries, dtype=torch.bool), mode, block_size=block_size)


def test_parameter_names_are_the_published_checkpoints():
    model = tiny_model()
    attention = ["attention.query_key_value.weight", "attention.query_layernorm.weight",
                 "attention.key_layernorm.weight", "attention.dense.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"]
    dense = [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    sparse = ["mlp.gate.weight", "mlp.gate.expert_bias"] + [
        f"mlp.{expert}.{p}_proj.weight"
        for expert in [f"experts.{e}" for e in range(8)] + ["shared_experts"] for p in ("gate", "up", "down")
    ]
    expected = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i, mlp in enumerate([dense, sparse, sparse]):
        expected |= {f"model.layers.{i}.{name}" for name in attention + mlp}
    state = model.state_dict()
    assert set(state) == expected  # the rotary frequencies are recomputed, never saved
    assert state["model.layers.0.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 16, 48)
    assert state["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (24, 48)
    assert not model.model.layers[1].mlp.gate.expert_bias.requires_grad  # a buffer, as published


def test_published_mini_config_json_is_read_with_its_field_names(tmp_path):
    published = {  # LLaDA2.0-mini's config.json
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184,
        "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5, "rotary_dim": 64,
        "rope_theta": 600000, "rope_scaling": None, "max_position_embeddings": 32768, "num_experts": 256,
        "num_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "moe_intermediate_size": 512, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "norm_topk_prob": True,
        "router_dtype": "fp32", "use_qk_norm": True, "use_qkv_bias": False, "use_bias": False,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "pad_token_id": 156892, "torch_dtype": "bfloat16",
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    config = LLaDA2MoeConfig.from_pretrained(tmp_path)
    assert (config.head_dim, config.num_key_value_heads, config.num_experts, config.n_group) == (128, 4, 256, 8)
    assert config.rope_parameters["rope_theta"] == 600000 and config.rope_parameters["rope_type"] == "default"
    inv_freq, _ = LLaDA2MoeRotaryEmbedding.compute_default_rope_parameters(config)
    assert 2 * inv_freq.numel() == published["rotary_dim"]
    assert config.router_dtype == "fp32"  # fields the model does not read are kept
    defaults = LLaDA2MoeConfig()  # the published defaults
    assert (defaults.num_key_value_heads, defaults.head_dim, defaults.use_bias) == (16, 64, True)
    assert defaults.rope_parameters["partial_rotary_factor"] == 0.5 and defaults.rope_parameters["rope_theta"] == 1e4


def test_checkpoint_in_the_published_layout_loads_with_no_missing_or_unexpected_keys(tmp_path):
    model = tiny_model()
    config = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "rope_theta": 600000.0,
              "rope_scaling": None, "partial_rotary_factor": 0.5,
              **{k: v for k, v in tiny_config().to_dict().items() if k not in ("rope_parameters", "architectures")}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    loaded, info = LLaDA2MoeForCausalLM.from_pretrained(
        tmp_path, config=LLaDA2MoeConfig.from_pretrained(tmp_path), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens()).logits, model(tokens()).logits)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("bias_on_expert_1", [0.0, 1.5])
def test_router_limits_groups_and_uses_the_bias_for_selection_only(bias_on_expert_1):
    config = tiny_config(hidden_size=8, num_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    gate = LLaDA2MoeGate(config)
    logits = [2.0, -2.0, 0.0, 0.0, 1.0, 0.5, -1.0, 3.0]  # experts in groups {0,1} {2,3} {4,5} {6,7}
    with torch.no_grad():
        gate.weight.copy_(torch.eye(8))
        gate.expert_bias.zero_()[1] = bias_on_expert_1
    experts, weights = gate(torch.tensor([logits]))
    s = [sigmoid(x) for x in logits]
    if bias_on_expert_1 == 0:
        # Groups by their two best scores: {4,5} 1.35 and {6,7} 1.22 beat {0,1} 1.0 and {2,3} 1.0, so expert 0
        # (0.88) is out despite outscoring expert 4 (0.73); the top two left are 7 and 4.
        chosen = [7, 4]
    else:
        # The bias lifts group {0,1} to 2.5 and expert 1 to 1.62: experts 1 and 0 are chosen, and expert 1 is
        # weighted by its unbiased score 0.12.
        chosen = [1, 0]
    total = s[chosen[0]] + s[chosen[1]]
    assert experts.tolist() == [chosen]
    torch.testing.assert_close(weights, torch.tensor([[2.5 * s[chosen[0]] / total, 2.5 * s[chosen[1]] / total]]))


def staged_mask(first, then, mode) -> torch.Tensor:
    """[B, 1, L, L] over positions 0..L-1 giving each row what it saw when `first` was cached and `then` came after:
    rows of `first` saw the keys of `first`, rows of `then` see all keys, each as `mode` allows."""
    length = len(first) + len(then)
    seen = torch.full((2, 1, length, length), torch.finfo(torch.float32).min)
    rows = torch.tensor(first)
    seen[:, :, rows[:, None], rows] = mask(first, first, mode)
    seen[:, :, torch.tensor(then)] = mask(range(length), then, mode)
    return seen


@pytest.mark.parametrize("mode", ["block", "full"])
def test_tokens_after_a_kv_cache_match_the_full_forward(mode):
    model, ids = tiny_model(), tokens()
    first, then = list(range(8)), list(range(8, 12))
    with torch.no_grad():
        full = model(ids, attention_mask=staged_mask(first, then, mode)).logits  # [B, 12, V]
        cache = DynamicCache()
        model(ids[:, :8], attention_mask=mask(first, first, mode), position_ids=torch.tensor(first).expand(2, -1),
              past_key_values=cache, use_cache=True)
        out = model(ids[:, 8:], attention_mask=mask(first + then, then, mode),
                    position_ids=torch.tensor(then).expand(2, -1), past_key_values=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == 12
    torch.testing.assert_close(out.logits, full[:, 8:], atol=1e-5, rtol=0)
    cache.crop(-4)  # what the samplers do with what we stored
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.get_seq_length() == 8 and cache.layers[0].keys.shape == (1, 2, 8, 16)


@pytest.mark.parametrize("mode", ["block", "full"])
def test_a_suffix_cached_before_its_block_attends_by_true_positions(mode):
    """A dual cache: prefix and suffix are fed first, then the block between them, so columns are out of order."""
    model, ids = tiny_model(), tokens(length=14)
    first, then = list(range(6)) + list(range(10, 14)), list(range(6, 10))
    with torch.no_grad():
        full = model(ids, attention_mask=staged_mask(first, then, mode)).logits
        cache = DynamicCache()
        model(ids[:, first], attention_mask=mask(first, first, mode), position_ids=torch.tensor(first).expand(2, -1),
              past_key_values=cache)
        block = model(ids[:, then], attention_mask=mask(first + then, then, mode),
                      position_ids=torch.tensor(then).expand(2, -1), past_key_values=cache).logits
    torch.testing.assert_close(block, full[:, then], atol=1e-5, rtol=0)


def test_no_mask_is_full_attention_and_a_padding_mask_hides_padding():
    model, ids = tiny_model(), tokens()
    changed = ids.clone()
    changed[:, -1] = changed[:, -1] % (VOCAB - 1) + 1  # another token at the last position
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[:, -1] = 0
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(full, model(ids, attention_mask=mask(range(12), range(12), "full")).logits)
        assert not torch.allclose(model(changed).logits[:, 0], full[:, 0])  # the first token sees the last ...
        padded = model(ids, attention_mask=padding).logits
        torch.testing.assert_close(model(changed, attention_mask=padding).logits[:, :-1], padded[:, :-1])  # ... unless


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_gives_logits_and_gradients(checkpointing):
    model = tiny_model().train()
    if checkpointing:
        model.activation_checkpointing_enable()
    logits = model(tokens(), attention_mask=mask(range(12), range(12), "block")).logits
    assert logits is not None and logits.requires_grad
    logits.logsumexp(-1).mean().backward()
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.shared_experts.down_proj.weight.grad.abs().sum() > 0
    assert any(expert.up_proj.weight.grad is not None for expert in moe.experts)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    plain = tiny_model().train()
    plain(tokens(), attention_mask=mask(range(12), range(12), "block")).logits.logsumexp(-1).mean().backward()
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads.get(name), param.grad)


def test_lora_on_attention_and_expert_projections_trains():
    from peft import LoraConfig, get_peft_model

    from dlm_rl.models.lora import lora_targets

    targets = ["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"]
    model = tiny_model()
    assert lora_targets(model, targets) == []
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False)).train()
    peft_model(tokens()).logits.float().pow(2).mean().backward()
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert any(".experts.3." in n for n in lora) and any("shared_experts" in n for n in lora)
    assert all(p.grad is not None for n, p in lora.items() if "attention" in n or "shared" in n)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_bfloat16_load_and_forward_are_finite(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = LLaDA2MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # positions keep their precision
    with torch.no_grad():
        logits = model(tokens(), attention_mask=mask(range(12), range(12), "block").bfloat16()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_auto_load_round_trip(tmp_path, tie):
    register()
    register()  # idempotent
    model = tiny_model(tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.word_embeddings.weight) == tie
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())  # readable by the published code too
    assert (saved["rope_theta"], saved["partial_rotary_factor"], saved["rope_scaling"]) == (600000.0, 0.5, None)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LLaDA2MoeConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LLaDA2MoeForCausalLM
    assert (loaded.lm_head.weight is loaded.model.word_embeddings.weight) == tie
    fresh, _ = LLaDA2MoeRotaryEmbedding.compute_default_rope_parameters(loaded.config)
    assert torch.equal(loaded.model.rotary_emb.inv_freq, fresh)  # recomputed, not left uninitialised
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits, atol=1e-6, rtol=0)


def test_runs_as_a_diffusion_lm_with_a_block_cache():
    dlm = DiffusionLM(tiny_model(), Conventions(mask_token_id=VOCAB - 1, attention="block", block_size=4))
    ids = tokens()
    with torch.no_grad():
        full = dlm(ids).logits
        first = dlm(ids[:, :8], use_cache=True)
        tail = dlm(ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(tail, full[:, 8:], atol=1e-5, rtol=0)
    assert (full[..., VOCAB - 1] == float("-inf")).all()
