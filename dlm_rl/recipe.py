"""Recipes: a YAML file naming a trainer plus its config keys, with `--key value` overrides from the command line.

Parsing reuses TRL's parser (YAML values become the dataclass defaults, then argparse reads the overrides); what
we add is refusing unknown keys, with the nearest valid key as a suggestion, and YAML values of the wrong type
(argparse converts the command line, but takes YAML values as they come: `max_steps: 2.5` would stay a float).
A list override is `--key a b` or one quoted YAML list, `--key '[a, b]'`. `describe_keys` lists a recipe's keys
(`dlm-rl train RECIPE --help`).
The config classes refuse values out of range; a learning rate of 0, which code may set on purpose (to freeze a
policy), is refused in recipes and on the command line only.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import functools
import importlib
import inspect
import json
import math
import re
import textwrap
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
    module, config_class = _trainer(recipe, path)
    valid = [f.name for f in fields(config_class)]
    unknown = [key for key in recipe if key not in valid]
    if unknown:
        raise ValueError(f"recipe {path}: " + "; ".join(_unknown_key(key, valid) for key in unknown))
    _check_types(recipe, config_class, path)
    _drop_replaced_source(recipe, overrides or [])
    parser = TrlParser([config_class], allow_abbrev=False)  # a misspelt prefix must not pass silently
    parser.set_defaults_with_config(**recipe)
    overrides = _expand_lists(parser, list(overrides or []))
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


def _trainer(recipe: dict, path: str):
    """(trainer module, config class) that the recipe's `trainer` key, which this removes, names."""
    name = recipe.pop("trainer", None)
    if name not in TRAINERS:
        raise ValueError(f"recipe {path}: `trainer` must be one of {sorted(TRAINERS)}, got {name!r}")
    module_name, class_name = TRAINERS[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def _expand_lists(parser, overrides: list[str]) -> list[str]:
    """The overrides with `--key '[a, b]'` (a YAML or JSON list) written as `--key a b`, for the keys the parser
    reads as lists (nargs '+'); argparse would take the whole text for one item."""
    lists = {option for action in parser._actions if action.nargs == "+" for option in action.option_strings}
    expanded = []
    for i, arg in enumerate(overrides):
        key, equals, value = arg.partition("=")
        if equals and key in lists and value.startswith("["):
            expanded += [key, *_list_items(key, value)]
        elif arg.startswith("[") and i > 0 and overrides[i - 1] in lists:
            expanded += _list_items(overrides[i - 1], arg)
        else:
            expanded.append(arg)
    return expanded


def _list_items(key: str, text: str) -> list[str]:
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list) or not items or any(item is None or isinstance(item, (list, dict))
                                                       for item in items):
        raise ValueError(f"command line: {key} {text!r} is not a non-empty list of values; quote a list whole, "
                         f"{key} '[a, b]', or give its items one by one, {key} a b")
    return [str(item) for item in items]


SOURCES = ("dataset_name", "dataset_path", "task", "dataset")  # the keys that name where the data comes from


def _drop_replaced_source(recipe: dict, overrides: list[str]) -> None:
    """A data source given on the command line replaces the recipe's, whichever key either uses."""
    given = {arg.lstrip("-").split("=")[0].replace("-", "_") for arg in overrides if arg.startswith("--")}
    if given & set(SOURCES):
        for key in SOURCES:
            recipe.pop(key, None)


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


# Headings of the key listing, by the class that defines the keys (else its name).
GROUPS = {
    "TraceRLConfig": "TraceRL",
    "VRPOConfig": "VRPO",
    "DiDiConfig": "DiDi",
    "MDMConfig": "masked-diffusion SFT",
    "OnlineArguments": "shared online settings (TraceRL, VRPO)",
    "DatasetArguments": "dataset",
    "LoraArguments": "LoRA",
    "CheckpointArguments": "checkpoints",
    "NonFiniteArguments": "NaN/inf guard",
    "HubArguments": "Hugging Face Hub upload",
    "TrainingArguments": "transformers TrainingArguments",
}


def describe_keys(path: str, width: int = 100) -> str:
    """Every key the recipe's trainer takes, grouped by the class that defines it, most specific first: its type,
    the value this recipe gives it (else the default) and its description. Keys of transformers' TrainingArguments
    (MDM) come last, one line each with the first sentence of their help."""
    recipe = read_recipe(path)
    name = recipe.get("trainer")
    config_class = _trainer(recipe, path)[1]
    hints = typing.get_type_hints(config_class)
    mro = config_class.__mro__
    groups: dict[type, list] = {}
    for field in fields(config_class):
        owner = next(cls for cls in mro if field.name in inspect.get_annotations(cls))
        groups.setdefault(owner, []).append(field)
    lines = [f"{path}: trainer {name} ({config_class.__name__}). Every key below can be set in the recipe or on the "
             "command line, --key value; a list as --key a b or --key '[a, b]'. Values shown are the recipe's "
             "(marked 'recipe') or the defaults."]
    for owner in sorted(groups, key=mro.index):
        order = list(inspect.get_annotations(owner))
        theirs = owner is TrainingArguments
        note = "; see transformers.TrainingArguments for the full descriptions" if theirs else ""
        title = GROUPS.get(owner.__name__)
        lines += ["", f"{title} ({owner.__name__}{note}):" if title else f"{owner.__name__}{note}:"]
        for field in sorted(groups[owner], key=lambda f: order.index(f.name)):
            value = recipe[field.name] if field.name in recipe else _default(field)
            head = f"  {field.name}: {_type_name(hints[field.name])} = {json.dumps(value, default=str)}"
            head += "  (recipe)" if field.name in recipe else ""
            doc = " ".join(_doc(config_class, field.name).split())
            if theirs:
                lines.append(f"{head}  # {_first_sentence(doc)}" if doc else head)
            else:
                lines += [head, *textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                                 break_on_hyphens=False)]
    return "\n".join(lines)


def _default(field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _type_name(hint) -> str:
    """A type as it is written: `int`, `float | None`, `list[str]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in sorted(args, key=lambda arg: arg is type(None)))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if hint is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(arg) for arg in args)}]" if args else name
    return getattr(hint, "__name__", str(hint))


def _doc(config_class, name: str) -> str:
    """A field's attribute docstring in the most specific class that defines it, else its `help` metadata."""
    for cls in config_class.__mro__:
        if name not in inspect.get_annotations(cls):
            continue
        doc = _attribute_docs(cls).get(name) or cls.__dataclass_fields__[name].metadata.get("help")
        if doc:
            return doc
    return ""


@functools.cache
def _attribute_docs(cls) -> dict[str, str]:
    """{field: docstring} for the string literals right after a class's annotated fields."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    return {
        statement.target.id: following.value.value
        for statement, following in zip(body, body[1:])
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
        and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        and isinstance(following.value.value, str)
    }


def _first_sentence(text: str) -> str:
    return re.split(r"(?<!e\.g)(?<!i\.e)(?<!etc)(?<=[.!?])\s", text, maxsplit=1)[0]
