"""Recipes: a YAML file naming a trainer plus its config keys, with `--key value` overrides from the command line.

Parsing reuses TRL's parser (YAML values become the dataclass defaults, then argparse reads the overrides); what
we add is refusing unknown keys, with the nearest valid key as a suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import fields

import yaml
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
    parser = TrlParser([config_class], allow_abbrev=False)  # a misspelt prefix must not pass silently
    parser.set_defaults_with_config(**recipe)
    overrides = list(overrides or [])
    if "--resume" in overrides:  # a bare --resume continues the newest checkpoint
        i = overrides.index("--resume") + 1
        if i == len(overrides) or overrides[i].startswith("--"):
            overrides.insert(i, "latest")
    config, rest = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    flags = [arg.lstrip("-").split("=")[0].replace("-", "_") for arg in rest if arg.startswith("--")]
    if rest:
        raise ValueError(
            f"command line: could not use {rest}. "
            + "; ".join(_unknown_key(flag, valid) for flag in flags if flag not in valid)
        )
    return module, config


def _unknown_key(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint}"
