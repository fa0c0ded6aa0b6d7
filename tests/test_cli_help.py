"""`dlm-rl train RECIPE --help` lists the recipe's keys, list values on the command line, and `dlm-rl merge`."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import pathlib
import textwrap

import pytest
import torch
from transformers import TrainingArguments

from dlm_rl.cli import main
from dlm_rl.models import load, tiny_model
from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.recipe import TRAINERS, parse_recipe, read_recipe

RECIPES = pathlib.Path(__file__).parents[1] / "recipes"
TINY = sorted(RECIPES.glob("*_tiny*.yaml"))


def _words(text: str) -> str:
    return " ".join(text.split())


def _attribute_docs(cls) -> dict[str, str]:
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):
        return {}
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def _described(config_class, name: str) -> str:
    """A field's docstring in the most specific class that defines it, else transformers' help text, else ''."""
    for cls in config_class.__mro__:
        if name in inspect.get_annotations(cls):
            doc = _attribute_docs(cls).get(name) or cls.__dataclass_fields__[name].metadata.get("help")
            if doc:
                return doc
    return ""


def test_the_shipped_tiny_recipes_cover_every_trainer():
    assert {read_recipe(str(path))["trainer"] for path in TINY} == set(TRAINERS)


@pytest.mark.parametrize("recipe", TINY, ids=lambda path: path.stem)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_recipe_help_lists_every_key_with_its_description(recipe, flag, capsys, monkeypatch):
    monkeypatch.setattr("dlm_rl.model_spec.resolve_model", lambda *a, **k: pytest.fail("--help loaded a model"))
    assert main(["train", str(recipe), flag]) == 0
    out = capsys.readouterr().out
    module, class_name = TRAINERS[read_recipe(str(recipe))["trainer"]]
    config_class = getattr(importlib.import_module(module), class_name)
    listed = _words(out)
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)} - set(inspect.get_annotations(config_class))
    for field in dataclasses.fields(config_class):
        assert f"\n  {field.name}: " in out, field.name
        doc = _words(_described(config_class, field.name))
        assert (doc.split(". ")[0][:30] if field.name in theirs else doc) in listed, field.name


def test_train_recipe_help_shows_types_and_the_recipes_values(capsys):
    assert main(["train", str(RECIPES / "tracerl_tiny_math.yaml"), "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert '  output_dir: str = "runs/tracerl_tiny_math"  (recipe)' in lines
    assert "  reward_weights: list[float] | None = null" in lines
    assert "  epsilon: float = 0.2" in lines
    assert "TraceRL (TraceRLConfig):" in lines and "LoRA (LoraArguments):" in lines


def test_mdm_help_lists_transformers_keys_last_one_line_each(capsys):
    assert main(["train", str(RECIPES / "mdm_tiny_addition.yaml"), "--help"]) == 0
    out = capsys.readouterr().out
    ours, theirs = out.split("\ntransformers TrainingArguments (TrainingArguments")
    assert "\n  noise_form: str = " in ours and "\n  adam_beta1: " not in ours
    assert "\n  adam_beta1: float = 0.9  # " in theirs
    assert all(line.startswith("  ") and not line.startswith("   ") for line in theirs.splitlines()[1:])


def test_train_help_without_a_recipe_says_how_to_list_keys(capsys):
    assert main(["train", "--help"]) == 0
    assert "dlm-rl train RECIPE --help` lists every key" in _words(capsys.readouterr().out)
    with pytest.raises(SystemExit) as stop:
        main(["train"])
    assert stop.value.code == 2
    assert "required: RECIPE" in capsys.readouterr().err


def test_list_values_parse_as_separate_words_or_as_one_yaml_list(tmp_path):
    recipe = str(RECIPES / "tracerl_tiny_math.yaml")
    out = ["--output_dir", str(tmp_path)]
    words = parse_recipe(recipe, ["--reward_funcs", "rewards.math:accuracy", "x.py:f", "--reward_weights", "1", "0.5",
                                  *out])[1]
    assert (words.reward_funcs, words.reward_weights) == (["rewards.math:accuracy", "x.py:f"], [1.0, 0.5])
    for listed in (["--reward_funcs", "[rewards.math:accuracy, x.py:f]", "--reward_weights", "[1.0, 0.5]"],
                   ["--reward_funcs", '["rewards.math:accuracy", "x.py:f"]', "--reward_weights=[1, 0.5]"]):
        assert parse_recipe(recipe, [*listed, *out])[1] == words
    mdm = str(RECIPES / "mdm_tiny_addition.yaml")
    config = parse_recipe(mdm, ["--lora_target_modules", "[q_proj, v_proj]", *out])[1]
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config == parse_recipe(mdm, ["--lora_target_modules", "q_proj", "v_proj", *out])[1]


@pytest.mark.parametrize("value", ["[1.0, 0.5", "[]", "[[1.0], 0.5]", "[1.0, null]"])
def test_a_malformed_list_on_the_command_line_is_an_error(value):
    with pytest.raises(ValueError, match=r"--reward_weights .* is not a non-empty list of values; quote a list whole"):
        parse_recipe(str(RECIPES / "tracerl_tiny_math.yaml"), ["--reward_weights", value])


def test_a_bracket_is_only_a_list_for_list_keys(tmp_path):
    """`--model '[x]'` stays one string (and `--output_dir` a path); only list-typed keys take a quoted list."""
    config = parse_recipe(str(RECIPES / "tracerl_tiny_math.yaml"), ["--output_dir", f"[{tmp_path}]"])[1]
    assert config.output_dir == f"[{tmp_path}]"


# --- dlm-rl merge ------------------------------------------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path):
    """(adapter directory, the adapted model, its base), the adapter's LoRA weights made non-trivial."""
    tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0).save_pretrained(tmp_path / "base")
    model = add_lora(load(tmp_path / "base"), LoraArguments(use_lora=True, lora_r=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model.eval(), load(tmp_path / "base").eval()


def test_merge_writes_the_adapted_model_as_a_full_directory(adapter, tmp_path, capsys):
    path, adapted, base = adapter
    assert main(["merge", str(path), str(tmp_path / "merged")]) == 0
    assert '"class": "LlamaForCausalLM"' in capsys.readouterr().out
    assert not [name for name in os.listdir(tmp_path / "merged") if name.startswith("adapter_")]
    merged = load(tmp_path / "merged").eval()
    assert not hasattr(merged.model, "peft_config")
    assert merged.conventions == adapted.conventions
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, -4:] = merged.mask_token_id
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, expected, original = merged(ids, mask).logits, adapted(ids, mask).logits, base(ids, mask).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    finite = torch.isfinite(original)  # the mask token's column is -inf
    assert (logits - original)[finite].abs().max() > 1e-2


def test_merge_refuses_a_directory_without_an_adapter_and_an_occupied_output(adapter, tmp_path, capsys):
    path = adapter[0]
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "out")]) == 2
    assert "holds no LoRA adapter on its own" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
