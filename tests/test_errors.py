"""Bad input gets clear errors: recipe keys, dataset columns, mask tokens, sampler geometry."""

import glob
import os

import pytest
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from dlm_rl.cli import main
from dlm_rl.data.tokenizer import char_tokenizer
from dlm_rl.models import Conventions, DiffusionLM, load, tiny_model
from dlm_rl.recipe import parse_recipe
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.trainers.mdm import MDMConfig, MDMTrainer


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_recipe_key_suggests_nearest(tmp_path):
    recipe = write(tmp_path, "trainer: mdm\ntask: addition3\nlearning_rat: 0.001\n")
    with pytest.raises(ValueError, match=r"unknown key 'learning_rat'; did you mean 'learning_rate'\?"):
        parse_recipe(recipe)


def test_unknown_command_line_key_suggests_nearest(tmp_path):
    recipe = write(tmp_path, "trainer: mdm\ntask: addition3\n")
    with pytest.raises(ValueError, match=r"unknown key 'max_step'; did you mean 'max_steps'\?"):
        parse_recipe(recipe, ["--max_step", "5"])


def test_recipe_values_and_overrides(tmp_path):
    recipe = write(tmp_path, f"trainer: mdm\ntask: addition3\nmax_steps: 7\noutput_dir: {tmp_path}/out\n")
    _, config = parse_recipe(recipe, ["--learning_rate", "0.01"])
    assert config.max_steps == 7 and config.learning_rate == 0.01 and config.dataset_name == "addition3"


def test_unknown_trainer_and_cli_exit_code(tmp_path, capsys):
    recipe = write(tmp_path, "trainer: ppo\n")
    assert main(["train", recipe]) == 2
    assert "`trainer` must be one of ['didi', 'mdm', 'tracerl', 'vrpo'], got 'ppo'" in capsys.readouterr().err


def test_missing_dataset_column(tmp_path):
    model = tiny_model()
    data = Dataset.from_dict({"prompt": ["1+2+3="], "response": ["\\boxed{6}"]})
    config = MDMConfig(output_dir=str(tmp_path), dataset_name="addition3", use_cpu=True)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['completion'\]; it has \['prompt', 'response'\]"):
        MDMTrainer(model, config, data, response_length=8)


def test_plain_causal_lm_is_not_a_diffusion_lm(tmp_path):
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_causal_lm"):
        load(tmp_path)


def test_mask_token_outside_vocabulary():
    tokenizer = char_tokenizer()
    model = tiny_model().model
    with pytest.raises(ValueError, match="outside the model's vocabulary of 100.*resize the embeddings"):
        DiffusionLM(model, Conventions(mask_token_id=len(tokenizer) + 5), tokenizer)


def test_block_size_must_divide_generation_length():
    with pytest.raises(ValueError, match=r"block_length=5 does not divide gen_length=32; choose a divisor"):
        SamplerConfig(gen_length=32, block_length=5)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        SamplerConfig(gen_length=32, block_length=8, steps=6)


def test_remote_code_family_needs_trust(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')
    with pytest.raises(ValueError, match="not a known diffusion LM family"):
        load(tmp_path)


def test_lora_targets_that_match_nothing():
    from dlm_rl.models.lora import LoraArguments, add_lora

    with pytest.raises(ValueError, match=r"\['qkv'\] match no module.*'q_proj'"):
        add_lora(tiny_model(), LoraArguments(use_lora=True, lora_target_modules=["q_proj", "qkv"]))


def test_completion_longer_than_canvas():
    from dlm_rl.data.collate import DiffusionCollator

    collate = DiffusionCollator(char_tokenizer(), response_length=3)  # `\boxed{`, `3`, `}` + EOS need 4
    with pytest.raises(ValueError, match="does not fit response_length=3"):
        collate([{"prompt": "1+2=", "completion": "\\boxed{3}"}])


RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_shipped_recipes_parse_and_validate(recipe):
    with open(recipe) as f:
        assert f.readline().startswith("# dlm-rl train recipes/"), "a recipe starts with the command that runs it"
    module, config = parse_recipe(recipe)
    assert callable(module.run)
