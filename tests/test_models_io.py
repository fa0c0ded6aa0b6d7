"""Saving and loading diffusion LMs, what load() refuses, and A2D conversion of a causal LM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dlm_rl.data.tokenizer import MASK, char_tokenizer
from dlm_rl.models import FAMILIES, DiffusionLM, from_causal_lm, load, tiny_model

SMALL = dict(hidden_size=32, num_layers=2, intermediate_size=64)



def _batch():
    ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))  # [2, 11]
    ids[1, :3] = 0
    ids[:, -4:] = 2  # a masked canvas
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask).logits


# --- save / load round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention, block_size", [("full", None), ("block", 4)])
def test_save_load_round_trip(tmp_path, attention, block_size):
    model = tiny_model(attention=attention, block_size=block_size, seed=3, **SMALL).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "dlm_rl.json").read_text()) == {
        "mask_token_id": 2, "shift_logits": False, "attention": attention, "block_size": block_size,
        "mask_format": "additive",
    }
    loaded = load(tmp_path).eval()
    assert isinstance(loaded, DiffusionLM)
    assert loaded.conventions == model.conventions
    assert loaded.dtype == torch.float32
    ids, mask = _batch()
    before, after = _logits(model, ids, mask), _logits(loaded, ids, mask)
    assert torch.equal(before, after)
    assert torch.isfinite(after[0, :, 3]).all()  # not trivially equal: real numbers, not all -inf
    tokenizer = loaded.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id) == (0, 1, 2)
    assert tokenizer("\\boxed{12}", add_special_tokens=False)["input_ids"] == [3, 5, 6, 96]
    assert len(tokenizer) == 101 and tokenizer.unk_token_id == 100  # <|unk|>, past the model's 100 rows


def test_load_overrides_replace_saved_conventions(tmp_path):
    tiny_model(seed=0, **SMALL).save_pretrained(tmp_path)
    loaded = load(tmp_path, attention="block", block_size=2)
    assert (loaded.attention, loaded.block_size, loaded.mask_token_id) == ("block", 2, 2)


# --- what load() refuses ---------------------------------------------------------------------------------------


def test_family_table_names_every_published_family():
    assert sorted(FAMILIES) == ["dream", "llada", "llada2_moe", "sdar"]


def test_unknown_custom_code_model_without_trust_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mdlm", "vocab_size": 10}))
    with pytest.raises(ValueError, match="'mdlm' is not a known diffusion LM family .* trust_remote_code=True"):
        load(tmp_path)


def test_custom_code_model_without_a_mask_id_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mdlm", "vocab_size": 10}))
    with pytest.raises(ValueError, match="states no mask_token_id; pass mask_token_id"):
        load(tmp_path, trust_remote_code=True)


def test_adapter_whose_base_is_gone_is_explained(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "gone"}))
    with pytest.raises(ValueError, match="holds a LoRA adapter whose base model 'gone' cannot be found"):
        load(tmp_path)


# --- A2D: from_causal_lm ----------------------------------------------------------------------------------------


def _causal_lm(vocab=101):  # the char tokenizer's 101 tokens, <|unk|> included
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def test_from_causal_lm_adds_missing_mask_token_and_resizes(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.mask_token = None  # an AR tokenizer: no mask token, and `<|new_mask|>` is not in its vocabulary
    model = _causal_lm()
    old = model.get_input_embeddings().weight.detach().clone()
    ids, mask = _batch()
    with torch.no_grad():
        ar = model(input_ids=ids[:1]).logits[0]  # [11, 101]: the AR model before conversion
    dlm = from_causal_lm(model, tokenizer, mask_token="<|new_mask|>")
    assert tokenizer.mask_token == "<|new_mask|>" and tokenizer.mask_token_id == 101 and len(tokenizer) == 102
    assert dlm.mask_token_id == 101
    assert model.get_input_embeddings().num_embeddings == 102
    assert model.get_output_embeddings().out_features == 102
    assert torch.equal(model.get_input_embeddings().weight[:101], old)  # existing rows untouched
    assert dlm.shift_logits is True and dlm.attention == "full"
    # shifted: under causal attention, position i's distribution is the AR model's output at i-1
    with torch.no_grad():
        causal = dlm(ids[:1], attention="causal").logits[0, :, :101]  # [11, 101]
    assert (causal[1:] - ar[:-1]).abs().max() <= 1e-5
    assert (causal[1:] - ar[1:]).abs().max() > 1e-3  # the shift is not a no-op
    ids[:, -4:] = 101
    logits = _logits(dlm, ids, mask)  # [2, 11, 102]
    assert logits.shape == (2, 11, 102)
    assert (logits[..., 101] == float("-inf")).all() and torch.isfinite(logits[..., :101]).all()

    # the A2D model round-trips with its conventions
    dlm.save_pretrained(tmp_path)
    loaded = load(tmp_path).eval()
    assert loaded.conventions == dlm.conventions and loaded.mask_token_id == 101
    assert torch.equal(_logits(loaded, ids, mask), logits)


def test_from_causal_lm_reuses_mask_token_already_in_vocabulary():
    tokenizer = char_tokenizer()
    tokenizer.mask_token = None
    model = _causal_lm()
    old = model.get_input_embeddings().weight.detach().clone()
    dlm = from_causal_lm(model, tokenizer)  # default `<|mask|>` is id 2 of the vocabulary
    assert dlm.mask_token_id == 2 and tokenizer.mask_token == MASK and len(tokenizer) == 101
    assert model.get_input_embeddings().num_embeddings == 101
    assert torch.equal(model.get_input_embeddings().weight, old)
    assert dlm.shift_logits is True


def test_from_causal_lm_keeps_the_tokenizers_own_mask_token():
    tokenizer = char_tokenizer()  # has `<|mask|>` (id 2) as its mask token
    dlm = from_causal_lm(_causal_lm(), tokenizer, mask_token="<|other|>", attention="block", block_size=4)
    assert dlm.mask_token_id == 2 and len(tokenizer) == 101
    assert (dlm.attention, dlm.block_size) == ("block", 4)


def test_from_causal_lm_with_larger_model_vocabulary_does_not_shrink():
    tokenizer = char_tokenizer()
    tokenizer.mask_token = None
    model = _causal_lm(vocab=128)  # padded vocabulary, as in Qwen: the new id 101 already has a row
    dlm = from_causal_lm(model, tokenizer, mask_token="<|new_mask|>")
    assert dlm.mask_token_id == 101
    assert model.get_input_embeddings().num_embeddings == 128
