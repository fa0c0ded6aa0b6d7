"""Attention patterns of DiffusionLM: full, block-causal and causal, on tiny Llama and Qwen2 backbones.

Dependence is measured by perturbing one input token and looking at which output positions change. Rows of a
perturbed batch are compared with the same rows of an unperturbed batch of the same shape, so "unchanged"
means bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dlm_rl.models import Conventions, DiffusionLM, tiny_model
from dlm_rl.models.attention import additive_mask, position_ids_from_padding

MASK_ID = 2
NEG = torch.finfo(torch.float32).min



def _tokens(length, seed=0):
    return torch.randint(4, 100, (length,), generator=torch.Generator().manual_seed(seed))


def _other(token):
    return 4 + (int(token) - 4 + 37) % 96  # a different non-special token


def _logits(dlm, ids, attn=None, **kwargs):
    with torch.no_grad():
        return dlm(ids, attn, **kwargs).logits


def _changed(a, b):
    """Per position: does the distribution change (mask column, −inf in both, left out)? [..., T]"""
    keep = torch.arange(a.shape[-1]) != MASK_ID
    return (a[..., keep] - b[..., keep]).abs().amax(-1) > 1e-6


def _perturb_each(ids, attn, columns):
    """Row r of the result is `ids` with token columns[r] replaced; returned with the unperturbed repeat."""
    n = len(columns)
    base = ids.expand(n, -1).clone()
    perturbed = base.clone()
    for r, j in enumerate(columns):
        perturbed[r, j] = _other(perturbed[r, j])
    return base, perturbed, attn.expand(n, -1)


# --- full attention ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_model():
    return tiny_model(attention="full", hidden_size=64, num_layers=2, intermediate_size=128, seed=0).eval()


@pytest.mark.parametrize("pad", [0, 3])
def test_full_attention_every_token_sees_every_token(full_model, pad):
    length = 9
    ids = torch.cat([torch.zeros(pad, dtype=torch.long), _tokens(length - pad)])  # [T], left-padded by `pad`
    attn = (torch.arange(length) >= pad).long()
    real = list(range(pad, length))
    base, perturbed, attns = _perturb_each(ids, attn, real)
    changed = _changed(_logits(full_model, perturbed, attns), _logits(full_model, base, attns))  # [n, T]
    # changing token j changes the output at every real position, before j as well as after
    assert changed[:, pad:].all()
    assert changed[-1, pad].item()  # i < j explicitly: the last token moves the first one


def test_padding_is_invisible_under_full_attention(full_model):
    tokens = _tokens(6)
    padded = torch.cat([torch.zeros(3, dtype=torch.long), tokens])[None]  # [1, 9]
    attn = (torch.arange(9) >= 3).long()[None]
    out = _logits(full_model, padded.expand(2, -1), attn.expand(2, -1))
    repadded = padded.clone()
    repadded[0, :3] = torch.tensor([50, 60, 70])  # padding ids change, the padding mask does not
    out2 = _logits(full_model, torch.cat([repadded, padded]), attn.expand(2, -1))
    assert torch.equal(out2[0, 3:], out[0, 3:])
    # the padded row at its real positions equals the unpadded sequence (positions restart at the first real token)
    unpadded = _logits(full_model, tokens[None])
    torch.testing.assert_close(out[0, 3:], unpadded[0], atol=1e-5, rtol=0)
    assert torch.all(out[..., MASK_ID] == float("-inf"))
    assert torch.isfinite(out[0, 3:, torch.arange(100) != MASK_ID]).all()


# --- block attention --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def block_model():
    return tiny_model(attention="block", block_size=4, hidden_size=64, num_layers=2, intermediate_size=128,
                      seed=0).eval()


@pytest.mark.parametrize("pad", [0, 3])
def test_block_attention_sees_own_and_earlier_blocks(block_model, pad):
    # 3 padding columns: block boundaries by column (4, 8, ...) and by position (7, 11, ...) disagree.
    n_real = 11
    length = pad + n_real
    ids = torch.cat([torch.zeros(pad, dtype=torch.long), _tokens(n_real, seed=1)])
    attn = (torch.arange(length) >= pad).long()
    block = (torch.arange(length) - pad).clamp(min=0) // 4  # [T]: block of each real position
    real = list(range(pad, length))
    base, perturbed, attns = _perturb_each(ids, attn, real)
    out_base = _logits(block_model, base, attns)
    out = _logits(block_model, perturbed, attns)
    for r, j in enumerate(real):
        earlier = block[pad:] < block[j]
        later = ~earlier
        assert torch.equal(out[r, pad:][earlier], out_base[r, pad:][earlier]), f"token {j} leaked backwards"
        assert _changed(out[r, pad:][later], out_base[r, pad:][later]).all(), f"token {j} not seen"
    assert block[pad:].max() == 2  # three blocks, the last one partial


def test_block_attention_padded_row_equals_unpadded(block_model):
    tokens = _tokens(10, seed=2)
    padded = torch.cat([torch.zeros(3, dtype=torch.long), tokens])[None]
    attn = (torch.arange(13) >= 3).long()[None]
    torch.testing.assert_close(_logits(block_model, padded, attn)[0, 3:], _logits(block_model, tokens[None])[0],
                               atol=1e-5, rtol=0)


def test_block_attention_with_kv_cache_matches_one_pass(block_model):
    # Blocks 0-1 are prefilled into a cache; block 2 then comes in alone (query_length < K).
    tokens = _tokens(12, seed=3)
    ids = torch.cat([torch.zeros(2, dtype=torch.long), tokens])[None]  # [1, 14], 2 padding columns
    attn = (torch.arange(14) >= 2).long()[None]
    full = _logits(block_model, ids, attn)
    with torch.no_grad():
        cache = block_model(ids[:, :10], attn[:, :10], use_cache=True).past_key_values
        assert cache.get_seq_length() == 10
        last = block_model(ids[:, 10:], attn, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(last, full[:, 10:], atol=1e-5, rtol=0)


# --- additive_mask against hand-written matrices ----------------------------------------------------------------

# Row 0: no padding. Row 1: one left padding column; real positions 0..3 at columns 1..4. Block size 2.
PADDING = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
ALLOWED = {  # mode: (row 0, row 1), 1 = query (row) may attend to key (column)
    "full": (
        [[1, 1, 1, 1, 1]] * 5,
        [[1, 0, 0, 0, 0]] + [[0, 1, 1, 1, 1]] * 4,  # a padding query sees itself only
    ),
    "block": (
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
        [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]],
    ),
    "causal": (
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
        [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1]],
    ),
}


def _expected(allowed, dtype=torch.float32):
    allowed = torch.tensor(allowed, dtype=torch.bool)[:, None]  # [B, 1, Q, K]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _check(mask, allowed, padding):
    """Real queries: exactly the hand-written pattern. Padding queries (outputs never used): their own column
    is open, so softmax stays finite, and no other padding column is."""
    expected = _expected(allowed, mask.dtype)
    queries = mask.shape[-2]
    real_query = padding[:, -queries:].bool()  # [B, Q]
    assert torch.equal(mask[:, 0][real_query], expected[:, 0][real_query])
    for b, q in (~real_query).nonzero().tolist():
        own = padding.shape[1] - queries + q
        row = mask[b, 0, q]
        assert row[own] == 0
        assert torch.all(row[~padding[b].bool() & (torch.arange(padding.shape[1]) != own)] < 0)


@pytest.mark.parametrize("mode", list(ALLOWED))
def test_additive_mask_matches_hand_written(mode):
    mask = additive_mask(PADDING, mode, block_size=2)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, NEG}
    _check(mask, ALLOWED[mode], PADDING)
    # query_length < K, as when the last 2 tokens follow a KV cache: the last two query rows
    tail = additive_mask(PADDING, mode, block_size=2, query_length=2)
    assert tail.shape == (2, 1, 2, 5)
    _check(tail, [rows[-2:] for rows in ALLOWED[mode]], PADDING)
    half = additive_mask(PADDING, mode, block_size=2, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    _check(half, ALLOWED[mode], PADDING)


def test_additive_mask_padding_query_after_cache():
    # Right padding among the new tokens: the real query does not see the padding key, the padding query sees
    # its own column (the last one, not column 1 of the 2 queries).
    padding = torch.tensor([[1, 1, 1, 0]])
    mask = additive_mask(padding, "block", block_size=2, query_length=2)
    _check(mask, [[[1, 1, 1, 0], [0, 0, 0, 1]]], padding)


def test_position_ids_skip_left_padding():
    assert position_ids_from_padding(PADDING).tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]


def test_additive_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        additive_mask(PADDING, "block")
    with pytest.raises(ValueError, match="attention mode"):
        additive_mask(PADDING, "sliding")


# --- causal mode equals the unwrapped transformers model --------------------------------------------------------

BACKBONES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=1)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=1)),
}


def _backbone(name, implementation="sdpa"):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BACKBONES[name]().eval()
    model.set_attn_implementation(implementation)
    return model


def _padded_batch():
    ids = torch.stack([_tokens(8, seed=4), torch.cat([torch.zeros(3, dtype=torch.long), _tokens(5, seed=5)])])
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    return ids, attn


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_causal_mode_equals_unwrapped_model(name, implementation):
    model = _backbone(name, implementation)
    dlm = DiffusionLM(model, Conventions(mask_token_id=MASK_ID))
    keep = torch.arange(100) != MASK_ID
    ids, attn = _padded_batch()
    with torch.no_grad():
        unpadded = model(ids[:1]).logits
        padded = model(ids, attention_mask=attn, position_ids=position_ids_from_padding(attn)).logits
    wrapped = _logits(dlm, ids[:1], attention="causal")
    assert (wrapped[..., keep] - unpadded[..., keep]).abs().max() <= 1e-5
    assert torch.all(wrapped[..., MASK_ID] == float("-inf"))
    wrapped = _logits(dlm, ids, attn, attention="causal")
    real = attn.bool()
    assert (wrapped[real][:, keep] - padded[real][:, keep]).abs().max() <= 1e-5
    # and full attention really is different from causal (the check above could not pass by accident)
    assert (_logits(dlm, ids, attn)[real][:, keep] - padded[real][:, keep]).abs().max() > 1e-3


# --- shifted logits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "block", "causal"])
def test_shifted_logits_come_from_previous_position(attention):
    model = _backbone("qwen2")
    block_size = 3 if attention == "block" else None
    conv = dict(mask_token_id=MASK_ID, attention=attention, block_size=block_size)
    shifted = DiffusionLM(model, Conventions(shift_logits=True, **conv))
    in_place = DiffusionLM(model, Conventions(shift_logits=False, **conv))
    ids, attn = _padded_batch()
    with torch.no_grad():
        raw = model(ids, attention_mask=additive_mask(attn, attention, block_size=block_size),
                    position_ids=position_ids_from_padding(attn)).logits  # [B, T, V] unshifted backbone
    out = _logits(shifted, ids, attn)
    keep = torch.arange(100) != MASK_ID
    assert (out[:, 1:, keep] - raw[:, :-1, keep]).abs().max() <= 1e-5
    assert (out[:, 1:] == float("-inf")).sum() == out[:, 1:, MASK_ID].numel()  # only the mask column
    assert torch.equal(out[:, 1:], _logits(in_place, ids, attn)[:, :-1])
    assert (out[:, 1:, keep] - raw[:, 1:, keep]).abs().max() > 1e-3  # the shift is not a no-op


# --- errors -----------------------------------------------------------------------------------------------------


def test_block_attention_without_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        Conventions(mask_token_id=MASK_ID, attention="block")
    with pytest.raises(ValueError, match="block_size"):
        Conventions(mask_token_id=MASK_ID, attention="block", block_size=0)
    with pytest.raises(ValueError, match="attention"):
        Conventions(mask_token_id=MASK_ID, attention="bidirectional")


def test_mask_id_outside_vocabulary_is_refused():
    model = _backbone("llama")
    with pytest.raises(ValueError, match="resize"):
        DiffusionLM(model, Conventions(mask_token_id=100))
    assert DiffusionLM(model, Conventions(mask_token_id=99)).mask_token_id == 99
