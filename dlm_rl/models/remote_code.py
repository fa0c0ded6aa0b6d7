"""transformers-5 compatibility for `trust_remote_code` models written for transformers 4.x.

`load_remote_model` loads such a model with shims in place, removes them, then checks its rotary buffers:
transformers 5 builds models on the meta device and refills non-persistent buffers only in its own `_init_weights`,
so code that overrides `_init_weights` runs with garbage `inv_freq` and no error. For each module with `inv_freq`:
- `inv_freq` differs from what its own recipe or the config gives: rebuilt, with a warning;
- cos/sin tables kept as buffers are wrong: rebuilt by its `_set_cos_sin_cache`, with a warning, else refused
  (ValueError): their layout cannot be guessed;
- the expected values cannot be derived (no recipe, no rope_theta, a scaled RoPE type, another length): refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TypedDict

import torch
import transformers.utils
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

__all__ = ["load_remote_model"]
logger = logging.getLogger(__name__)


def load_remote_model(
    path: str | os.PathLike, *, auto_class, dtype: torch.dtype | str = "auto", device_map=None
) -> PreTrainedModel:
    """`auto_class.from_pretrained(path, trust_remote_code=True, ...)` under the shims, its rotary buffers checked."""
    with _shims():
        model = auto_class.from_pretrained(path, trust_remote_code=True, dtype=dtype, device_map=device_map)
    _check_rotary(model, str(path))
    _refuse_unverifiable_buffers(model, str(path))
    _tied_keys_as_dict(model)
    return model


def _tied_keys_as_dict(model: PreTrainedModel) -> None:
    """transformers 5 saves by reading `_tied_weights_keys` as a {tied: source} dict; a transformers-4 list makes
    `save_pretrained` fail ('list' object has no attribute 'keys'). Each module holding the list gets the dict."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and isinstance(module._tied_weights_keys, list):
            module._tied_weights_keys = _tied_weights(module)


ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


def _refuse_unverifiable_buffers(model: PreTrainedModel, path: str) -> None:
    """transformers 5 refills every non-persistent buffer with uninitialised memory unless the model's
    `_init_weights` fills it. When the model overrides `_init_weights`, buffers this layer cannot check (anything
    but the rotary ones `_check_rotary` verified) may hold garbage: the load is refused, naming them."""
    if type(model)._init_weights is PreTrainedModel._init_weights:
        return
    unchecked = [
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        for buffer in module._non_persistent_buffers_set
        if buffer not in ROTARY_BUFFERS and not (module._buffers.get("inv_freq") is not None
                                                 and buffer.lstrip("_").startswith(("cos", "sin")))
    ]
    if unchecked:
        raise ValueError(
            f"{path}: its model overrides _init_weights and keeps non-persistent buffers {sorted(unchecked)}, which "
            "transformers 5 leaves uninitialised after loading and dlm-rl cannot verify; port the model to a native "
            "transformers class"
        )


@contextlib.contextmanager
def _shims():
    """What transformers-4 remote code takes from transformers, present only while it loads (not thread-safe)."""
    with contextlib.ExitStack() as undo:
        # Dream / LLaDA2: `ROPE_INIT_FUNCTIONS["default"]` is a KeyError, transformers 5 no longer registers it.
        # (transformers 5's own `_init_weights` also resolves "default" here for the rotary modules it refills.)
        if "default" not in ROPE_INIT_FUNCTIONS:
            ROPE_INIT_FUNCTIONS["default"] = _default_rope_parameters
            undo.callback(ROPE_INIT_FUNCTIONS.pop, "default")
        # SDAR: `from transformers.utils import LossKwargs` is an ImportError, transformers 5 removed the TypedDict.
        if not hasattr(transformers.utils, "LossKwargs"):
            transformers.utils.LossKwargs = _LossKwargs
            undo.callback(delattr, transformers.utils, "LossKwargs")
        # LLaDA: its model never calls `post_init`, where transformers 5 sets `all_tied_weights_keys`, and loading
        # reads it (AttributeError). A class-level property computes it on first use.
        if not hasattr(PreTrainedModel, "all_tied_weights_keys"):
            PreTrainedModel.all_tied_weights_keys = property(_get_tied, _set_tied)
            undo.callback(delattr, PreTrainedModel, "all_tied_weights_keys")
        yield


class _LossKwargs(TypedDict, total=False):
    """`transformers.utils.LossKwargs` as transformers 4.52 had it: keyword arguments of the loss."""

    num_items_in_batch: int | None


def _default_rope_parameters(config=None, device=None, seq_len=None, **rope_kwargs) -> tuple[torch.Tensor, float]:
    """transformers 4.x `_compute_default_rope_parameters`: inverse frequencies 1 / base^(2i/d), attention scale 1.
    Modules built without a config pass `base` and `dim` as keywords instead (transformers 4.4x)."""
    if "dim" in rope_kwargs:
        return _inv_freq(rope_kwargs["base"], rope_kwargs["dim"], device), 1.0
    return _inv_freq(_rope_base(config), _rotary_dim(config), device), 1.0


def _inv_freq(base: float, dim: int, device=None) -> torch.Tensor:  # [ceil(dim / 2)]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def _rope_parameters(config) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters` (`rope_scaling` is its old name)."""
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def _rope_base(config) -> float:
    base = getattr(config, "rope_theta", None) or _rope_parameters(config).get("rope_theta")
    if base is None:
        raise ValueError(f"{type(config).__name__} states no rope_theta")
    return base


def _rotary_dim(config) -> int:
    """head_dim (or hidden_size / num_attention_heads) times partial_rotary_factor, as transformers 4 read them."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and hasattr(config, "hidden_size") and hasattr(config, "num_attention_heads"):
        head_dim = config.hidden_size // config.num_attention_heads
    if head_dim is None:
        raise ValueError(f"{type(config).__name__} states neither head_dim nor hidden_size and num_attention_heads")
    factor = getattr(config, "partial_rotary_factor", None) or _rope_parameters(config).get("partial_rotary_factor")
    return int(head_dim * (factor or 1.0))


def _get_tied(model: PreTrainedModel) -> dict[str, str]:
    # The property wins over the instance dict, so the value is kept there: it outlives the shim.
    if "all_tied_weights_keys" not in model.__dict__:
        model.__dict__["all_tied_weights_keys"] = _tied_weights(model)
    return model.__dict__["all_tied_weights_keys"]


def _set_tied(model: PreTrainedModel, value: dict[str, str]) -> None:  # post_init's assignment, in other models
    model.__dict__["all_tied_weights_keys"] = value


def _tied_weights(model: PreTrainedModel) -> dict[str, str]:
    """{tied parameter: its source}, as transformers 5's post_init would have found it."""
    keys = model._tied_weights_keys
    if keys is None or isinstance(keys, dict):  # the transformers-5 form: transformers' own expansion
        return model.get_expanded_tied_weights_keys(all_submodels=True)
    # The transformers-4 list names what its tie_weights tied to the input embeddings, when the config ties them.
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    embeddings = model.get_input_embeddings()
    source = next(f"{name}.weight" for name, module in model.named_modules() if module is embeddings)
    return {key: source for key in keys if key != source}


@torch.no_grad()
def _check_rotary(model: PreTrainedModel, path: str) -> None:
    """Leave every rotary buffer right, or refuse the model: never silently wrong."""
    rebuilt = []
    for name, module in model.named_modules():
        if module._buffers.get("inv_freq") is None:
            continue
        where = f"{path}: rotary module {name} ({type(module).__name__})"
        if module.inv_freq.is_meta:
            raise ValueError(f"{where}: inv_freq is still on the meta device after loading")
        own = getattr(module, "config", None)
        config = own if isinstance(own, PretrainedConfig) else model.config.get_text_config()
        try:
            expected = _expected_inv_freq(module, config)
        except ValueError as error:
            raise ValueError(
                f"{where}: cannot derive the inverse frequencies its inv_freq should hold ({error}), so cannot tell "
                "whether transformers 5 left it uninitialised; port the model to a native transformers class"
            ) from error
        wrong = not _close(module.inv_freq, expected)
        if wrong:
            module.inv_freq.copy_(expected)
        wrong |= _repair_tables(module, where)
        # `original_inv_freq` is by definition the loaded inv_freq (dynamic RoPE resets to it); kept as a plain
        # attribute, as Dream does, the meta-device build leaves it on the meta device.
        original = getattr(module, "original_inv_freq", None)
        if isinstance(original, torch.Tensor) and (original.is_meta or not _close(original, module.inv_freq)):
            module.original_inv_freq = module.inv_freq.clone()
        if wrong:
            rebuilt.append(name)
    if rebuilt:
        logger.warning(
            "%s: rebuilt the rotary buffers of %s, which transformers 5 left uninitialised (the model's own "
            "_init_weights does not fill them)", path, ", ".join(rebuilt)
        )


def _expected_inv_freq(module: torch.nn.Module, config) -> torch.Tensor:
    """The module's own recipe when it keeps one (Dream, LLaDA2), else the default RoPE from its dim and base or
    from the config. Scaled RoPE types change the frequencies in ways only a recipe knows."""
    device = module.inv_freq.device
    recipe = getattr(module, "rope_init_fn", None)
    if callable(recipe):
        expected = recipe(getattr(module, "config", None), device, **getattr(module, "rope_kwargs", {}))[0]
    else:
        parameters = _rope_parameters(config)
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"RoPE type {rope_type!r} without the module's own rope_init_fn")
        dim = getattr(module, "dim", None) or _rotary_dim(config)
        expected = _inv_freq(getattr(module, "base", None) or _rope_base(config), dim, device)
    if expected.shape != module.inv_freq.shape:
        raise ValueError(f"derived shape {tuple(expected.shape)}, the buffer's is {tuple(module.inv_freq.shape)}")
    return expected


def _repair_tables(module: torch.nn.Module, where: str) -> bool:
    """Check cos/sin tables kept as buffers against inv_freq in the usual [T, D] layout; rebuild wrong ones with
    the module's `_set_cos_sin_cache` (the transformers-4 name). Returns whether it rebuilt them."""
    tables = {n: t for n, t in module._buffers.items() if t is not None and n.lstrip("_").startswith(("cos", "sin"))}
    if all(_close(table, _table(module.inv_freq, table, cos=name.lstrip("_").startswith("cos")))
           for name, table in tables.items()):
        return False
    if not callable(getattr(module, "_set_cos_sin_cache", None)):
        raise ValueError(
            f"{where}: its cos/sin tables {sorted(tables)} are wrong after loading and it has no _set_cos_sin_cache "
            "to rebuild them; port the model to a native transformers class"
        )
    table = next(iter(tables.values()))
    length = getattr(module, "max_seq_len_cached", None) or table.shape[-2]
    module._set_cos_sin_cache(length, table.device, table.dtype)
    return True


def _table(inv_freq: torch.Tensor, like: torch.Tensor, *, cos: bool) -> torch.Tensor:
    """cos or sin of position x frequency, halves repeated (rotate_half layout), shaped like the module's table."""
    if like.dim() < 2:
        return inv_freq.new_empty(0)
    angles = torch.outer(torch.arange(like.shape[-2], device=inv_freq.device).float(), inv_freq.float())  # [T, D/2]
    emb = torch.cat([angles, angles], dim=-1)  # [T, D]
    table = emb.cos() if cos else emb.sin()
    return table.reshape(like.shape) if table.numel() == like.numel() else table


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to a few roundings of the buffer's dtype (bf16 buffers hold rounded values); NaN is never equal."""
    tol = max(1e-5, 8 * torch.finfo(actual.dtype).eps)
    if actual.shape != expected.shape:
        return False
    return torch.allclose(actual.float(), expected.to(actual).float(), rtol=tol, atol=tol)
