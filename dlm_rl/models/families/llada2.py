"""LLaDA2.x (`model_type: "llada2_moe"`): inclusionAI's LLaDA2.0-mini / -flash diffusion LMs, natively in transformers.

The Ling 2.0 (BailingMoeV2) architecture run bidirectionally: fused-QKV grouped-query attention with per-head RMS
qk-norm and NeoX rotary on the first `head_dim * partial_rotary_factor` channels; a dense SwiGLU MLP in the first
`first_k_dense_replace` layers and a mixture of experts after them (sigmoid router, group-limited top-k, an expert
bias used for selection only, plus shared experts). Module and parameter names are those of the published
checkpoints, so their safetensors load as they are. Facts and formulas follow the published
`modeling_llada2_moe.py`; the code is our own. Logits stay in the model dtype (the published head upcasts to float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from dlm_rl.models.families.base import Family, require


class LLaDA2MoeConfig(PreTrainedConfig):
    """The published `LLaDA2MoeConfig`: same field names and defaults.

    `rope_theta`, `rope_scaling` and `partial_rotary_factor` (default 0.5) are folded into `rope_parameters`, as in
    every transformers 5 config. Published fields the model does not read (dropouts other than attention's,
    `norm_head`, sliding-window settings, `rotary_dim`, `router_dtype`, ...) are kept as plain attributes; loading a
    checkpoint refuses `norm_head` and sliding windows when they are switched on (`native_config`).
    `num_key_value_heads=0` (the published default) means one key/value head per query head.
    """

    model_type = "llada2_moe"
    default_theta = 10_000.0

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 0
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = True
    use_qk_norm: bool = True
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    max_position_embeddings: int = 16384
    rope_parameters: dict | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 126081
    num_experts: int | None = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"

    def __post_init__(self, **kwargs):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        kwargs.setdefault("partial_rotary_factor", 0.5)
        super().__post_init__(**kwargs)
        if self.score_function != "sigmoid":
            raise ValueError(f"LLaDA2MoeConfig: score_function {self.score_function!r} is not supported; "
                             "LLaDA2 routes with 'sigmoid' scores")
        if self.num_experts and self.num_experts % self.n_group:
            raise ValueError(f"LLaDA2MoeConfig: num_experts={self.num_experts} does not split into "
                             f"n_group={self.n_group} equal groups; set n_group to a divisor of num_experts")

    def to_dict(self) -> dict:
        """Also the published top-level RoPE fields, which the published code and inference engines read."""
        out = super().to_dict()
        rope = self.rope_parameters
        out["rope_theta"] = rope["rope_theta"]
        out["partial_rotary_factor"] = rope.get("partial_rotary_factor", 1.0)
        out["rope_scaling"] = None if rope["rope_type"] == "default" else dict(rope)
        return out


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    """cos/sin [B, Q, R] at the given positions, for the R = head_dim * partial_rotary_factor rotary channels."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        default = self.rope_type == "default"
        rope_init = self.compute_default_rope_parameters if default else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init(config)
        # Not saved with the weights: PreTrainedModel._init_weights recomputes both after loading (it finds
        # rotary modules by their class name and `original_inv_freq`), so neither stays on the meta device.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LLaDA2MoeConfig, device=None, seq_len=None):
        rope = config.rope_parameters
        dim = int(config.head_dim * rope.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)
        return inv_freq, 1.0  # [R/2], no attention scaling

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, Q, R/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, Q, R]
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of x [B, heads, Q, D] in NeoX halves; channels R..D pass through unchanged."""
    rotary = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, Q, R]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    first, second = x_rot.chunk(2, dim=-1)
    turned = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + turned * sin, x_pass), dim=-1)


class LLaDA2MoeAttention(nn.Module):
    """Bidirectional attention: the mask alone decides who sees whom (full, block-causal, padding)."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.use_qkv_bias
        )
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden, position_embeddings, attention_mask=None, cache=None) -> torch.Tensor:
        batch, length, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)  # [B, h+2g, Q, D]
        query, key, value = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        if self.use_qk_norm:
            query, key = self.query_layernorm(query), self.key_layernorm(key)
        cos, sin = position_embeddings
        query, key = apply_partial_rotary(query, cos, sin), apply_partial_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # [B, g, K, D]: cached keys, then these
        repeat = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            query,
            key.repeat_interleave(repeat, dim=1),
            value.repeat_interleave(repeat, dim=1),
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.head_dim**-0.5,
        )  # [B, h, Q, D]
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class LLaDA2MoeMLP(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router. Experts are chosen by score + expert_bias among the `topk_group` groups whose two best biased
    scores sum highest; they are weighted by their unbiased scores (normalised over the top-k when top-k > 1, as
    published, unless `norm_topk_prob` is false) times `routed_scaling_factor`. All in float32."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.normalise = config.norm_topk_prob and config.num_experts_per_tok > 1
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # A buffer, saved in the checkpoint (`...mlp.gate.expert_bias`): load balancing sets it, gradients never do.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> expert ids [T, k] and their weights [T, k] (float32)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [T, E]
        biased = scores + self.expert_bias
        groups = biased.view(x.shape[0], self.n_group, -1)  # [T, G, E/G]
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # [T, G]
        best_groups = group_score.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
        biased = biased.masked_fill(~keep.repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
        experts = biased.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, experts)  # [T, k]
        if self.normalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (a loop over the experts that some token chose) plus the always-on shared experts."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.experts = nn.ModuleList(
            LLaDA2MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.gate = LLaDA2MoeGate(config)
        self.shared_experts = (
            LLaDA2MoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        experts, weights = self.gate(x)  # [T, k]
        routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # summed in float32, as published
        for expert in experts.unique().tolist():
            token, slot = (experts == expert).nonzero(as_tuple=True)
            routed.index_add_(0, token, self.experts[expert](x[token]).float() * weights[token, slot, None])
        out = routed.to(hidden.dtype).view_as(hidden)
        return out if self.shared_experts is None else out + self.shared_experts(hidden)


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        sparse = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = LLaDA2MoeSparseMoeBlock(config) if sparse else LLaDA2MoeMLP(config, config.intermediate_size)
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, position_embeddings=None, attention_mask=None, cache=None) -> torch.Tensor:
        hidden = hidden + self.attention(self.input_layernorm(hidden), position_embeddings, attention_mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _input_embed_layer = "word_embeddings"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        super()._init_weights(module)  # linears, embeddings (zero padding row), RMS norms, rotary buffers
        if isinstance(module, LLaDA2MoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.expert_bias)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """The embeddings and decoder layers, up to the final norm: hidden states [B, Q, H]."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        pad = config.pad_token_id
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, pad if pad is not None and pad < config.vocab_size else None
        )
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask: None (full attention), [B, 1, Q, K] additive float or bool (True = attend), or a [B, K]
        padding mask (1 = real token; every query sees every real key). position_ids [B, Q]: default after the cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDA2MoeModel: pass exactly one of input_ids and inputs_embeds")
        hidden = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, Q, H]
        if use_cache if use_cache is not None else self.config.use_cache:
            cache = DynamicCache() if cache is None else cache
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]  # [1, Q]
        mask = _attention_bias(attention_mask, hidden.dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        all_hidden = () if output_hidden_states else None  # as published: each layer's input, then the normed output
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden,)
            hidden = layer(hidden, position_embeddings=position_embeddings, attention_mask=mask, cache=cache)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=all_hidden)


def _attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as SDPA takes it: None, bool [B, 1, Q, K], or additive [B, 1, Q, K] in the activations' dtype."""
    if mask is None or (mask.dtype == torch.bool and mask.dim() == 4):
        return mask
    if mask.dim() == 2:  # [B, K] padding mask: bidirectional over the real tokens
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask == 0, torch.finfo(dtype).min)[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"LLaDA2 attention_mask must be [B, K] or [B, 1, Q, K], got shape {tuple(mask.shape)}")
    return mask.to(dtype)


class LLaDA2MoeForCausalLM(LLaDA2MoePreTrainedModel):
    """LLaDA2 with its LM head: logits[b, i] is the distribution of token i (in place; LLaDA2 does not shift)."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, Q, V] in the model dtype. `cache` is transformers 5's name for `past_key_values` (a
        DynamicCache, extended in place); either may be given. Masks and positions as in `LLaDA2MoeModel.forward`.
        No loss is computed (the diffusion losses live in dlm_rl.diffusion); other transformers keywords are ignored."""
        if cache is not None and past_key_values is not None:
            raise ValueError("LLaDA2MoeForCausalLM: pass the KV cache as `cache` or `past_key_values`, not both")
        if kwargs.get("labels") is not None:
            raise ValueError("LLaDA2MoeForCausalLM computes no loss from `labels`: compute the masked-diffusion loss "
                             "from the logits (dlm_rl.diffusion)")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        return CausalLMOutputWithPast(
            logits=self.lm_head(out.last_hidden_state), cache=out.cache, hidden_states=out.hidden_states
        )


def register() -> None:
    """Let AutoConfig / AutoModelForCausalLM build these classes for `model_type: "llada2_moe"` (idempotent)."""
    AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeForCausalLM, exist_ok=True)


# --- the family: a published LLaDA2 checkpoint as a DiffusionLM ---------------------------------------------------

MASK_TOKEN = "<|mask|>"  # id 156895 in LLaDA2.0's tokenizer; the config does not state it
MASK_TOKEN_ID = 156895
BLOCK_SIZE = 32  # LLaDA2.0 is trained and sampled in blocks of 32 tokens


def native_config(raw: dict) -> LLaDA2MoeConfig:
    # Options other ports of this architecture implement and this model does not: refused, never ignored.
    require(raw, "llada2_moe", norm_head=(False, None), use_sliding_window=(False, None),
            output_router_logits=(False, None))
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "model_type")}
    return LLaDA2MoeConfig(**fields)


def conventions(raw: dict, tokenizer) -> dict:
    mask_id = raw.get("mask_token_id")
    if mask_id is None and tokenizer is not None and MASK_TOKEN in tokenizer.get_vocab():
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    return dict(mask_token_id=MASK_TOKEN_ID if mask_id is None else mask_id, shift_logits=False, attention="block",
                block_size=raw.get("block_size") or BLOCK_SIZE)


LLADA2 = Family("llada2_moe", LLaDA2MoeForCausalLM, native_config, conventions)
