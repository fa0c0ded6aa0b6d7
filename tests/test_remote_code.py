"""The transformers-5 compatibility layer for remote-code models, on a tiny remote-code package each test writes.

The package reproduces what breaks transformers-4 code under transformers 5: a `LossKwargs` import, a rotary
embedding that looks up `ROPE_INIT_FUNCTIONS["default"]`, a model that never calls `post_init` (so has no
`all_tied_weights_keys`), and an `_init_weights` that leaves `inv_freq` as the meta-device load left it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TypedDict

import pytest
import torch
import transformers.utils
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.dynamic_module_utils import HF_MODULES_CACHE, get_class_from_dynamic_module
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dlm_rl.data.tokenizer import char_tokenizer
from dlm_rl.models import load
from dlm_rl.models.remote_code import load_remote_model

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tiny_remote"

    def __init__(self, vocab_size=32, hidden_size=16, num_attention_heads=2, max_position_embeddings=64,
                 rope_theta=10000.0, rope_style="own", rotary_base=None, rope_tables=None, rope_persistent=False,
                 call_post_init=True, tie_word_embeddings=False, scale_buffer=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_style = rope_style  # "own" (keeps dim, base), "lookup" (transformers' registry), "anonymous"
        self.rotary_base = rotary_base  # the base of the "anonymous" style
        self.rope_tables = rope_tables  # None, "rebuildable" (has _set_cos_sin_cache) or "fixed"
        self.rope_persistent = rope_persistent
        self.call_post_init = call_post_init
        self.tie_word_embeddings = tie_word_embeddings
        self.scale_buffer = scale_buffer  # a non-persistent buffer that is not a rotary one
        super().__init__(**kwargs)
'''

LOSS_KWARGS = '''
from transformers.utils import LossKwargs


class TinyKwargs(LossKwargs, total=False):  # a TypedDict built on it
    block_size: int
'''

MODELING = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_tiny import TinyConfig
# LOSS_KWARGS


class TinyRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        head_dim = config.hidden_size // config.num_attention_heads
        if config.rope_style == "lookup":  # through transformers 4's registry
            self.rope_type = "default"
            self.rope_init_fn = ROPE_INIT_FUNCTIONS["default"]
            inv_freq, _ = self.rope_init_fn(config, None)
        elif config.rope_style == "own":
            self.dim, self.base = head_dim, config.rope_theta
            inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2).float() / self.dim)
        else:  # "anonymous": keeps nothing that says how inv_freq was made
            inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=config.rope_persistent)
        self.original_inv_freq = self.inv_freq
        if config.rope_tables:
            self.build_tables(config.max_position_embeddings)

    def build_tables(self, length):
        angles = torch.outer(torch.arange(length).float(), self.inv_freq)
        self.register_buffer("cos_cached", torch.cat([angles, angles], -1).cos(), persistent=False)
        self.register_buffer("sin_cached", torch.cat([angles, angles], -1).sin(), persistent=False)

    def forward(self, positions):
        if self.config.rope_tables:
            return self.cos_cached[positions], self.sin_cached[positions]
        angles = positions[..., None].float() * self.inv_freq
        return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()


class TinyRebuildableRotaryEmbedding(TinyRotaryEmbedding):
    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.build_tables(seq_len)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


class TinyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        rebuildable = config.rope_tables == "rebuildable"
        self.rotary_emb = (TinyRebuildableRotaryEmbedding if rebuildable else TinyRotaryEmbedding)(config)
        if config.scale_buffer:
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids) * (self.scale if hasattr(self, "scale") else 1.0)
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.rotary_emb(torch.arange(n).expand(b, n))
        y = nn.functional.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
        return x + self.out(y.transpose(1, 2).reshape(b, n, h))


class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "model"
    _tied_weights_keys = ["lm_head.weight"]  # the transformers-4 list form

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.call_post_init:
            self.post_init()
        elif config.tie_word_embeddings:  # no post_init: it ties its embeddings itself
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):  # weights only: inv_freq stays as the meta-device load leaves it
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.5)  # large enough for logits of order 1
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids)))
'''

IDS = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))  # [B, L]


class _LossKwargsV4(TypedDict, total=False):
    num_items_in_batch: int | None


def _default_rope_v4(config, device=None, **kwargs):
    """transformers 4's default RoPE, written here again so the reference does not depend on the code under test."""
    dim = config.hidden_size // config.num_attention_heads
    return 1.0 / config.rope_theta ** (torch.arange(0, dim, 2).float() / dim), 1.0


@pytest.fixture(autouse=True, scope="module")
def _clean_modules_cache():
    """transformers copies remote code into its modules cache, and every test here writes new packages."""
    yield
    for name in ("tiny_remote_reference", "tiny_remote_model"):
        shutil.rmtree(Path(HF_MODULES_CACHE, "transformers_modules", name), ignore_errors=True)


def _package(directory, *, loss_kwargs: bool, **config):
    directory.mkdir()
    # The path in a comment gives each package its own source hash, hence its own modules: an import that failed
    # (or succeeded) for another package does not carry over, nor does the model class transformers registered for
    # another package's config class.
    (directory / "configuration_tiny.py").write_text(f"# {directory}\n{CONFIGURATION}")
    modeling = MODELING.replace("# LOSS_KWARGS\n", LOSS_KWARGS if loss_kwargs else "")
    (directory / "modeling_tiny.py").write_text(f"# {directory}\n{modeling}")
    auto_map = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny_remote", "auto_map": auto_map, **config}))
    return directory


def _checkpoint(tmp_path, *, loss_kwargs=False, **config):
    """A tiny remote-code checkpoint, and the in-memory model (built as under transformers 4) it was saved from."""
    source = _package(tmp_path / "tiny_remote_reference", loss_kwargs=loss_kwargs, **config)
    with pytest.MonkeyPatch.context() as patch:  # what transformers 4 provided
        patch.setitem(ROPE_INIT_FUNCTIONS, "default", _default_rope_v4)
        patch.setattr(transformers.utils, "LossKwargs", _LossKwargsV4, raising=False)
        model_class = get_class_from_dynamic_module("modeling_tiny.TinyForCausalLM", source)
        torch.manual_seed(0)
        reference = model_class(AutoConfig.from_pretrained(source, trust_remote_code=True)).eval()
    path = _package(tmp_path / "tiny_remote_model", loss_kwargs=loss_kwargs, **config)
    tied = reference.lm_head.weight is reference.model.embed_tokens.weight
    weights = {k: v for k, v in reference.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path, reference


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits  # [B, L, V]


def _assert_same_logits(loaded, reference):
    assert (_logits(loaded) - _logits(reference)).abs().max() <= 1e-6


# What breaks (as in SDAR; Dream and LLaDA2; LLaDA), how transformers 5 fails on it, and its message.
BREAKAGES = {
    "loss_kwargs": (dict(loss_kwargs=True), ImportError, "LossKwargs"),
    "rope_default": (dict(rope_style="lookup"), KeyError, "default"),
    "no_post_init": (dict(call_post_init=False, tie_word_embeddings=True), AttributeError, "all_tied_weights_keys"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_breakage_fails_without_the_layer_and_loads_with_it(tmp_path, breakage):
    options, error, message = BREAKAGES[breakage]
    path, reference = _checkpoint(tmp_path, **options)
    with pytest.raises(error, match=message):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    loaded = load_remote_model(path, auto_class=AutoModelForCausalLM)
    _assert_same_logits(loaded, reference)


def test_tied_weights_follow_the_transformers4_list(tmp_path):
    path, reference = _checkpoint(tmp_path, call_post_init=False, tie_word_embeddings=True)
    loaded = load_remote_model(path, auto_class=AutoModelForCausalLM)
    assert loaded.all_tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, not re-initialised as missing


def test_silent_rope_corruption_is_repaired(tmp_path, caplog):
    path, reference = _checkpoint(tmp_path)  # only the _init_weights override: transformers 5 loads it, wrongly
    plain = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert not torch.allclose(plain.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert not torch.allclose(_logits(plain), _logits(reference), atol=0.1)  # garbage, maybe NaN, is not close
    with caplog.at_level(logging.WARNING, logger="dlm_rl.models.remote_code"):
        loaded = load_remote_model(path, auto_class=AutoModelForCausalLM)
    assert "rebuilt the rotary buffers of model.rotary_emb" in caplog.text
    assert torch.equal(loaded.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    _assert_same_logits(loaded, reference)


def test_every_breakage_at_once_with_rebuildable_tables(tmp_path):
    path, reference = _checkpoint(
        tmp_path, loss_kwargs=True, rope_style="lookup", call_post_init=False, tie_word_embeddings=True,
        rope_tables="rebuildable",
    )
    with pytest.raises(ImportError):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    loaded = load_remote_model(path, auto_class=AutoModelForCausalLM)
    rotary = loaded.model.rotary_emb
    assert torch.equal(rotary.cos_cached, reference.model.rotary_emb.cos_cached)
    assert torch.equal(rotary.original_inv_freq, rotary.inv_freq)  # no longer the meta tensor __init__ kept
    _assert_same_logits(loaded, reference)


def test_right_buffers_are_left_alone(tmp_path, caplog):
    path, reference = _checkpoint(tmp_path, rope_persistent=True)  # inv_freq comes from the checkpoint
    with caplog.at_level(logging.WARNING, logger="dlm_rl.models.remote_code"):
        loaded = load_remote_model(path, auto_class=AutoModelForCausalLM)
    assert "rebuilt" not in caplog.text
    _assert_same_logits(loaded, reference)


def test_tables_without_a_rebuild_method_are_refused(tmp_path):
    path, _ = _checkpoint(tmp_path, rope_tables="fixed")
    with pytest.raises(ValueError, match=r"model.rotary_emb .*\['cos_cached', 'sin_cached'\] are wrong.*no _set_cos"):
        load_remote_model(path, auto_class=AutoModelForCausalLM)


def test_underivable_frequencies_are_refused(tmp_path):
    path, _ = _checkpoint(tmp_path, rope_style="anonymous", rotary_base=500.0, rope_theta=None)
    with pytest.raises(ValueError, match="cannot derive the inverse frequencies .* states no rope_theta"):
        load_remote_model(path, auto_class=AutoModelForCausalLM)


def test_shims_are_removed_after_the_load(tmp_path):
    def absent():
        return ("default" not in ROPE_INIT_FUNCTIONS and not hasattr(transformers.utils, "LossKwargs")
                and not hasattr(PreTrainedModel, "all_tied_weights_keys"))

    assert absent()  # what transformers 5 has on its own
    path, _ = _checkpoint(tmp_path, loss_kwargs=True, rope_style="lookup", call_post_init=False)
    load_remote_model(path, auto_class=AutoModelForCausalLM)
    assert absent()
    (path / "model.safetensors").unlink()
    with pytest.raises(OSError):  # a load that fails inside the shims removes them too
        load_remote_model(path, auto_class=AutoModelForCausalLM)
    assert absent()


def test_other_unverifiable_buffers_are_refused(tmp_path):
    """transformers 5 leaves every non-persistent buffer uninitialised when the model's own _init_weights does not
    fill it; one the layer cannot check (not a rotary buffer) makes the load an error, never silently wrong."""
    path, reference = _checkpoint(tmp_path, scale_buffer=True)
    plain = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert not torch.equal(plain.model.scale, reference.model.scale)
    with pytest.raises(ValueError, match=r"non-persistent buffers \['model.scale'\].*cannot verify"):
        load_remote_model(path, auto_class=AutoModelForCausalLM)


def test_a_remote_code_model_runs_saves_and_reloads_through_load(tmp_path):
    """load(trust_remote_code=True) gives a DiffusionLM whose save (transformers-4 tied-weight list included) loads
    again with load() and the flag, and not without it."""
    path, reference = _checkpoint(tmp_path, loss_kwargs=True, rope_style="lookup", call_post_init=False,
                                  tie_word_embeddings=True)
    char_tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match="pass mask_token_id"):
        load(path, trust_remote_code=True)
    model = load(path, trust_remote_code=True, mask_token_id=2).eval()
    with torch.no_grad():
        logits = model(IDS).logits
        expected = _logits(reference)
    assert (logits[..., 3:] - expected[..., 3:]).abs().max() <= 1e-6 and logits[..., 2].isneginf().all()
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="pass trust_remote_code=True"):
        load(tmp_path / "saved")
    again = load(tmp_path / "saved", trust_remote_code=True).eval()
    assert again.conventions == model.conventions
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, logits)
