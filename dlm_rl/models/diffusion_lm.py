"""DiffusionLM: one wrapper that makes any transformers backbone a masked diffusion language model.

It owns the conventions that differ between dLLM families: the mask token id, whether logits are shifted
(Dream and AR-converted models predict token i from hidden state i-1; LLaDA and SDAR predict in place) and
the attention pattern (full bidirectional, or block-causal as in SDAR). Everything above it (losses, samplers,
trainers) works with `logits[b, i]` = the distribution of token i, whatever the backbone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dlm_rl.models.attention import ATTENTION_MODES, additive_mask, position_ids_from_padding

CONVENTIONS_FILE = "dlm_rl.json"
MASK_FORMATS = ("additive", "bool", "attention_bias")


@dataclass(frozen=True)
class Conventions:
    """What makes a backbone a diffusion LM; saved next to the weights as `dlm_rl.json`."""

    mask_token_id: int
    shift_logits: bool = False
    attention: str = "full"
    block_size: int | None = None
    # How the backbone takes a 4-D attention mask: "additive" float as `attention_mask` (transformers models, and
    # the published families, which load on them), "bool" as `attention_mask` or "attention_bias" additive float
    # (remote-code models whose forward reads the mask that way and takes no position ids).
    mask_format: str = "additive"

    def __post_init__(self):
        if self.mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {self.mask_format!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.attention == "block" and (self.block_size is None or self.block_size < 1):
            raise ValueError(f"attention='block' needs a positive block_size, got {self.block_size!r}")
        if self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a vocabulary id, got {self.mask_token_id}")


@dataclass
class DiffusionOutput:
    logits: torch.Tensor  # [B, Q, V]: row i is the distribution of token i (shift already undone)
    past_key_values: object | None = None
    hidden_states: torch.Tensor | None = None  # [B, Q, H] last layer, aligned like the logits (when asked for)


class DiffusionLM(nn.Module):
    """A transformers model plus the conventions that make it a masked diffusion LM.

    `forward` returns logits where position i predicts token i, with the mask token's logit set to -inf
    (with tied embeddings the mask token is an output class; it must never be predicted or sampled).

    `compute_dtype` (None: the weights' own) runs every forward under `torch.autocast` in that dtype: a 16-bit
    checkpoint trained with float32 master weights (`dlm_rl.models.precision`) still computes in 16 bits.
    """

    compute_dtype: torch.dtype | None = None

    def __init__(self, model: nn.Module, conventions: Conventions, tokenizer=None):
        super().__init__()
        vocab = model.get_input_embeddings().num_embeddings
        if conventions.mask_token_id >= vocab:
            raise ValueError(
                f"mask_token_id {conventions.mask_token_id} is outside the model's vocabulary of {vocab}; "
                "add the mask token to the tokenizer and resize the embeddings (DiffusionLM.from_causal_lm does this)"
            )
        self.model = model
        self.conventions = conventions
        self.tokenizer = tokenizer

    # The familiar attribute names, read from the conventions.
    mask_token_id = property(lambda self: self.conventions.mask_token_id)
    shift_logits = property(lambda self: self.conventions.shift_logits)
    attention = property(lambda self: self.conventions.attention)
    block_size = property(lambda self: self.conventions.block_size)
    config = property(lambda self: self.model.config)
    device = property(lambda self: self.model.get_input_embeddings().weight.device)
    dtype = property(lambda self: self.model.get_input_embeddings().weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention: str | None = None,
        attention_bias: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> DiffusionOutput:
        """Logits for `input_ids` [B, Q].

        attention_mask: [B, K] padding mask (1 = real token) over the cache plus the new tokens; defaults to all ones.
        attention: override the model's attention mode ("full", "block", "causal") for this call.
        attention_bias: an explicit [B, 1, Q, K] additive mask (e.g. TraceRL's packed rows); replaces the mode.
        past_key_values / use_cache: the KV-cache hook for samplers; the cache is returned in the output.
        output_hidden_states: also return the last layer's hidden states (a value head reads them).
        inputs_embeds: [B, Q, H] input embeddings instead of `input_ids` (soft tokens, e.g. for guidance gradients).
        With shifted logits the first new token's distribution comes from the previous token, which the caller
        must therefore include in `input_ids` when it uses a cache.
        """
        if self.compute_dtype is None:
            autocast = contextlib.nullcontext()
        else:
            autocast = torch.autocast(self.device.type, dtype=self.compute_dtype)
        with autocast:
            return self._forward(input_ids, attention_mask, inputs_embeds, position_ids, attention, attention_bias,
                                 past_key_values, use_cache, output_hidden_states)

    def _forward(self, input_ids, attention_mask, inputs_embeds, position_ids, attention, attention_bias,
                 past_key_values, use_cache, output_hidden_states) -> DiffusionOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        batch, length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        cached = 0 if past_key_values is None else past_key_values.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, cached + length, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = position_ids_from_padding(attention_mask)[:, -length:]
        if attention_bias is None:
            attention_bias = additive_mask(
                attention_mask,
                attention or self.attention,
                block_size=self.block_size,
                query_length=length,
                dtype=self.compute_dtype or self.dtype,
            )
        kwargs = {"use_cache": use_cache}
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        cache_name = _cache_argument(type(_base_model(self.model)))
        if past_key_values is not None:
            kwargs[cache_name] = past_key_values
        if self.conventions.mask_format == "attention_bias":  # such a forward takes no position ids
            kwargs["attention_bias"] = attention_bias
        else:
            kwargs["position_ids"] = position_ids
            kwargs["attention_mask"] = attention_bias == 0 if self.conventions.mask_format == "bool" else attention_bias
        if inputs_embeds is not None:
            out = self.model(inputs_embeds=inputs_embeds, **kwargs)
        else:
            out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits  # [B, Q, V]
        hidden = out.hidden_states[-1] if output_hidden_states else None
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            hidden = None if hidden is None else torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        logits = logits.index_fill(-1, torch.tensor([self.mask_token_id], device=logits.device), float("-inf"))
        return DiffusionOutput(
            logits=logits, past_key_values=getattr(out, cache_name) if use_cache else None, hidden_states=hidden
        )

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Save weights (or the LoRA adapter), tokenizer and `dlm_rl.json` so that `load` restores all three. A
        `state_dict` given (with this module's names, e.g. gathered from shards) is saved instead of the weights'."""
        os.makedirs(path, exist_ok=True)
        if kwargs.get("state_dict") is not None:  # a tied weight (lm_head = embeddings) once, as transformers saves it
            tied = ({name for name, _ in self.named_parameters(remove_duplicate=False)}
                    - {name for name, _ in self.named_parameters()})
            kwargs["state_dict"] = {name.removeprefix("model."): value for name, value in kwargs["state_dict"].items()
                                    if name not in tied}
        self.model.save_pretrained(path, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, CONVENTIONS_FILE), "w") as f:
            json.dump(asdict(self.conventions), f, indent=2)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose forward takes any keyword)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _cache_argument(backbone: type) -> str:
    """The keyword a backbone's forward takes the KV cache by, and its output returns it as: `cache` (transformers
    models since it replaced the deprecated `past_key_values`) or `past_key_values` (remote code, older releases)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
