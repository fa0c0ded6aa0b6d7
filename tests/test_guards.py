"""The LoRA target check on the tiny testbed: targets that match nothing, a block instead of its linear layers, or
more than intended (the LM head)."""

from __future__ import annotations

import types

import pytest
from torch import nn

from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.models.tiny import tiny_model


def tiny():
    return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)


# --- LoRA target modules ---------------------------------------------------------------------------------------


def test_a_lora_target_that_matches_nothing_is_an_error_even_when_another_matches():
    # PEFT 0.21 skips 'nonexistent' silently here, since q_proj matches
    with pytest.raises(ValueError, match=r"\['nonexistent'\] match no module of LlamaForCausalLM, whose linear "
                                         r"layers are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head'"):
        add_lora(tiny(), LoraArguments(lora_r=2, lora_target_modules=["q_proj", "nonexistent"]))


def test_a_lora_target_naming_a_block_not_a_linear_layer_is_an_error():
    with pytest.raises(ValueError, match=r"'mlp' names model.layers.0.mlp \(LlamaMLP\), which LoRA cannot adapt"):
        add_lora(tiny(), LoraArguments(lora_r=2, lora_target_modules=["q_proj", "mlp"]))


def test_a_dotted_lora_target_is_matched_as_peft_matches_it():
    model = add_lora(tiny(), LoraArguments(lora_r=2, lora_target_modules=["self_attn.q_proj"]))
    assert model.model.targeted_module_names == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


class _LLaDALike(nn.Module):
    """LLaDA's naming: each block's last projection and the LM head are both called `ff_out`."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.blocks = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(4, 4),
                                                                      "ff_out": nn.Linear(4, 4)}) for _ in range(2)])
        self.model.transformer.ff_out = nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.model.transformer.ff_out


def test_a_lora_target_that_also_matches_the_lm_head_leaves_the_head_out_loudly(caplog):
    wrapped = add_lora(types.SimpleNamespace(model=_LLaDALike()),
                       LoraArguments(lora_r=2, lora_target_modules=["q_proj", "ff_out"]))
    assert "model.transformer.ff_out" not in wrapped.model.targeted_module_names
    assert "model.transformer.blocks.1.ff_out" in wrapped.model.targeted_module_names
    assert "['ff_out'] also match the output layer model.transformer.ff_out (the LM head); it is left" in caplog.text
    named = add_lora(types.SimpleNamespace(model=_LLaDALike()),
                     LoraArguments(lora_r=2, lora_target_modules=["ff_out", "transformer.ff_out"]))
    assert "model.transformer.ff_out" in named.model.targeted_module_names  # named on its own: intended
