"""Recipes: a YAML file naming a trainer plus its config keys, with `--key value` overrides from the command line.

Parsing reuses TRL's parser (YAML values become the dataclass defaults, then argparse reads the overrides); what
we add is refusing unknown keys, with the nearest valid key as a suggestion, and YAML values of the wrong type
(argparse converts the command line, but takes YAML values as they come: `max_steps: 2.5` would stay a float).
The config classes refuse values out of range; a learning rate of 0, which code may set on purpose (to freeze a
policy), is refused in recipes and on the command line only.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import math
import types
import typing
from dataclasses import fields

import yaml
from transformers import TrainingArguments
from trl import TrlParser

# trainer name -> (module, config class); each module has `run(config)`.
TRAINERS = {
    "mdm": ("dlm_rl.trainers.mdm", "MDMConfig"),
    "tracerl": ("dlm_rl.trainers.tracerl", "TraceRLConfig"),
    "vrpo": ("dlm_rl.trainers.vrpo", "VRPOConfig"),
    "didi": ("dlm_rl.trainers.didi", "DiDiConfig"),
}


def read_recipe(path: str) -> dict:
    with open(path) as f:
        recipe = yaml.safe_load(f)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path}: expected a YAML mapping of config keys, got {type(recipe).__name__}")
    return recipe


def parse_recipe(path: str, overrides: list[str] | None = None):
    """(trainer module, config) from a recipe file and command-line overrides."""
    recipe = read_recipe(path)
    name = recipe.pop("trainer", None)
    if name not in TRAINERS:
        raise ValueError(f"recipe {path}: `trainer` must be one of {sorted(TRAINERS)}, got {name!r}")
    module_name, class_name = TRAINERS[name]
    module = importlib.import_module(module_name)
    config_class = getattr(module, class_name)
    valid = [f.name for f in fields(config_class)]
    unknown = [key for key in recipe if key not in valid]
    if unknown:
        raise ValueError(f"recipe {path}: " + "; ".join(_unknown_key(key, valid) for key in unknown))
    _check_types(recipe, config_class, path)
    parser = TrlParser([config_class], allow_abbrev=False)  # a misspelt prefix must not pass silently
    parser.set_defaults_with_config(**recipe)
    overrides = list(overrides or [])
    if "--resume" in overrides:  # a bare --resume continues the newest checkpoint
        i = overrides.index("--resume") + 1
        if i == len(overrides) or overrides[i].startswith("--"):
            overrides.insert(i, "latest")
    try:
        config, rest = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except ValueError as error:  # the config class refused a value
        raise ValueError(f"recipe {path}: {error}") from None
    flags = [arg.lstrip("-").split("=")[0].replace("-", "_") for arg in rest if arg.startswith("--")]
    if rest:
        raise ValueError(
            f"command line: could not use {rest}. "
            + "; ".join(_unknown_key(flag, valid) for flag in flags if flag not in valid)
        )
    for key in valid:
        if key.endswith("learning_rate") and not (math.isfinite(getattr(config, key)) and getattr(config, key) > 0):
            raise ValueError(f"recipe {path}: {key} must be positive, got {getattr(config, key)}")
    return module, config


def _check_types(recipe: dict, config_class, path: str) -> None:
    """Refuse a YAML value that is not of its key's type (ints pass as floats; strings argparse would convert)."""
    hints = typing.get_type_hints(config_class)
    # transformers' own TrainingArguments fields (MDM) convert their values themselves: `fsdp: true` is documented
    # though annotated `str | None`, `resume_from_checkpoint: true` likewise.
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)} if issubclass(config_class, TrainingArguments) \
        else set()
    for key, value in recipe.items():
        if key == "resume" or key in theirs:  # `resume` also takes true / false (`resume_setting`)
            continue
        expected = hints.get(key, typing.Any)
        if not _fits(value, expected):
            hint = f"; write a list: [{value}]" if isinstance(value, str) and _fits([value], expected) else ""
            raise ValueError(f"recipe {path}: {key}: {value!r} is not {_describe(expected)}{hint}")


def _fits(value, expected) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected in (int, float):
        if isinstance(value, str):  # argparse converts a string default: it must convert
            try:
                expected(value)
            except ValueError:
                return False
            return True
        return isinstance(value, int if expected is int else (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value if args)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    if isinstance(expected, type) and issubclass(expected, enum.Enum):
        return isinstance(value, expected) or value in {member.value for member in expected}
    return True  # a class of its own (e.g. a parallelism config): left to the config


def _describe(expected) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             dict: "a mapping"}
    return names.get(expected, names.get(origin, getattr(expected, "__name__", str(expected))))


def _unknown_key(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint}"
