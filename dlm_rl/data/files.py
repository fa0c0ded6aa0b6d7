"""Datasets from local files: json/jsonl/csv/parquet, or a directory written by `Dataset.save_to_disk`."""

from __future__ import annotations

import json
import os

from datasets import Dataset, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError
from pyarrow import ArrowException

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(path: str) -> Dataset:
    """The rows of a dataset file or saved directory; an empty file, mixed column types or a prompt that is not text
    are errors naming the file (and the row)."""
    if os.path.isdir(path):
        return load_from_disk(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"dataset file {path}: unsupported extension {extension!r}; use one of {sorted(FORMATS)}")
    refuse_empty_file(path, "dataset file")
    try:
        rows = load_dataset(FORMATS[extension], data_files=path, split="train")
    except StopIteration:  # the json builder's way of saying "no rows"
        raise ValueError(f"dataset file {path} has no rows") from None
    except ValueError as error:
        if "corresponds to no data" in str(error):  # `[]`: the split is empty
            raise ValueError(f"dataset file {path} has no rows") from None
        raise
    except (ArrowException, DatasetGenerationError) as error:
        bad = _first_bad_prompt(path) if FORMATS[extension] == "json" else None
        if bad is not None:
            raise ValueError(bad) from None
        raise ValueError(f"dataset file {path} cannot be read as a table ({error}); every row must give a column "
                         "values of one type") from None
    if len(rows) == 0:
        raise ValueError(f"dataset file {path} has no rows")
    refuse_non_text_prompts(rows, f"dataset file {path}")
    return rows


def refuse_empty_file(path: str, key: str) -> None:
    """Raise when the file `key` names exists but holds nothing but whitespace (a missing file is left to the
    loader, which names it)."""
    if os.path.isfile(path) and os.path.getsize(path) < 1 << 20:
        with open(path, "rb") as f:
            if not f.read().strip():
                raise ValueError(f"{key} {path} is empty: it holds no rows")


def refuse_non_text_prompts(rows, where: str) -> None:
    """Raise on the first `prompt` that is neither text nor a list of chat messages, naming its row."""
    if "prompt" not in rows.column_names:
        return
    feature = rows.features["prompt"]
    if getattr(feature, "dtype", None) in ("string", "large_string") and not rows.data.column("prompt").null_count:
        return  # a text column without nulls: nothing to look at row by row
    for i, prompt in enumerate(rows["prompt"]):
        if not is_prompt(prompt):
            raise ValueError(f"{where}: row {i}: prompt {prompt!r} (type {type(prompt).__name__}) is not "
                             "text or a list of chat messages")


def is_prompt(prompt) -> bool:
    """Text, or a list of chat messages."""
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt))


def _first_bad_prompt(path: str) -> str | None:
    """For a json/jsonl file that does not load as a table: the first row whose prompt is not text, described."""
    with open(path) as f:
        text = f.read()
    try:
        parsed = json.loads(text)
        rows = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    for i, row in enumerate(rows):
        if isinstance(row, dict) and "prompt" in row and not is_prompt(row["prompt"]):
            prompt = row["prompt"]
            return (f"dataset file {path}: row {i}: prompt {prompt!r} (type {type(prompt).__name__}) is not "
                    "text or a list of chat messages")
    return None
