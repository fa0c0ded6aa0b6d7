"""Datasets from local files: json/jsonl/csv/parquet, or a directory written by `Dataset.save_to_disk`."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset, load_from_disk

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(path: str) -> Dataset:
    if os.path.isdir(path):
        return load_from_disk(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"dataset file {path}: unsupported extension {extension!r}; use one of {sorted(FORMATS)}")
    return load_dataset(FORMATS[extension], data_files=path, split="train")
