"""Rewards named in a recipe (`module:function` or `path/to/file.py:function`), checked, weighted and summed.

A reward has TRL's signature `fn(prompts, completions, **columns) -> list[float | None]` and may be `async def`.
Dataset columns reach it by name: all of them when it takes `**columns`, else the ones it names. `None` means
"not applicable to this sample" and counts as 0 in the total, as in TRL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import importlib
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)


def load_reward(reference: str) -> Callable:
    """Import `module:function` or `path/to/file.py:function`; errors suggest the nearest name."""
    module_name, sep, function_name = reference.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward {reference!r} must look like 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"reward {reference!r}: no file {module_name!r}")
        spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ImportError(f"reward {reference!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        names = [
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        ]
        close = [n for n in names if n.startswith(function_name)] or difflib.get_close_matches(function_name, names, 1)
        hint = f"; did you mean '{module_name}:{close[0]}'?" if close else f"; it has {sorted(names)}"
        raise ValueError(f"reward {reference!r} not found{hint}")
    return function


class Rewards:
    """Several rewards with weights; calling it scores a batch and returns each reward's scores and the total."""

    def __init__(self, references: list[str | Callable], weights: list[float] | None = None):
        if not references:
            raise ValueError("no reward functions given")
        if weights is not None and len(weights) != len(references):
            raise ValueError(f"{len(references)} rewards but {len(weights)} weights")
        self.functions = [load_reward(r) if isinstance(r, str) else r for r in references]
        self.names = [getattr(f, "__name__", str(r)) for f, r in zip(self.functions, references)]
        self.weights = list(weights) if weights is not None else [1.0] * len(references)

    def __call__(self, prompts: list, completions: list, columns: dict[str, list] | None = None) -> dict[str, list]:
        """{name: scores (None where not applicable), ..., "total": weighted sum, "errors": why a sample's reward
        failed (None when none did)}, one entry per completion; a failed reward scores that sample 0."""
        columns = columns or {}
        for name, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(completions)} completions")
        result, errors = {}, [[] for _ in completions]
        for name, function in zip(self.names, self.functions):
            wanted = _check_columns(name, function, columns)
            result[name] = self._score(name, function, prompts, completions, wanted, errors)
        result["total"] = [
            sum(w * s for w, s in zip(self.weights, scores) if s is not None)
            for scores in zip(*(result[n] for n in self.names))
        ]
        result["errors"] = ["; ".join(e) or None for e in errors]
        return result

    def _score(self, name, function, prompts, completions, columns, errors) -> list[float | None]:
        try:
            scores = _call(function, prompts, completions, columns)
        except Exception as error:  # find the samples that fail, score them 0, keep the rest
            logger.warning("reward %s failed on the batch (%r); scoring sample by sample", name, error)
            scores = []
            for i in range(len(completions)):
                row = {k: v[i : i + 1] for k, v in columns.items()}
                try:
                    scores.extend(_call(function, prompts[i : i + 1], completions[i : i + 1], row))
                except Exception as sample_error:
                    logger.warning("reward %s failed on sample %d (scored 0): %r", name, i, sample_error)
                    errors[i].append(f"{name}: {sample_error!r}")
                    scores.append(0.0)
        return _validated(name, scores, len(completions))


def _call(function, prompts, completions, columns):
    out = function(prompts, completions, **columns)
    if inspect.isawaitable(out):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(_awaited(out))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside an event loop
            return pool.submit(asyncio.run, _awaited(out)).result()
    return out


async def _awaited(awaitable):
    return await awaitable


def _check_columns(name: str, function, columns: dict) -> dict:
    """The columns to pass: every one if the function takes **kwargs, else those it names; missing ones raise."""
    parameters = list(inspect.signature(function).parameters.values())[2:]
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in named if p.default is p.empty and p.name not in columns]
    if missing:
        raise ValueError(f"reward {name} needs column(s) {missing}; the dataset has {sorted(columns)}")
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return columns
    return {p.name: columns[p.name] for p in named if p.name in columns}


def _validated(name: str, scores, count: int) -> list[float | None]:
    if not isinstance(scores, (list, tuple)) or len(scores) != count:
        size = len(scores) if hasattr(scores, "__len__") else type(scores).__name__
        raise ValueError(f"reward {name} returned {size} scores for {count} completions; return one per completion")
    checked = []
    for i, score in enumerate(scores):
        if score is None:
            checked.append(None)
        elif isinstance(score, (int, float)) and score == score:  # NaN != NaN
            checked.append(float(score))
        else:
            raise ValueError(f"reward {name} returned {score!r} for sample {i}; scores must be numbers or None")
    return checked
