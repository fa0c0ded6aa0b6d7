"""Where a trainer's prompts come from, in TRL's vocabulary: `dataset_name` (a built-in dataset or a hub id) or
`dataset_path` (a local file or directory), `dataset_config`, `dataset_train_split`, `dataset_test_split`.

Built-in datasets: the testbed tasks (`addition3`, `chain`, `code`, ...) and `reasoning_gym:NAME` (generators:
`train_size` and `eval_size` problems drawn with their own seeds), and `gsm8k`, `math500`, `mbpp`, `humaneval`.
Rows are prompt-only or conversational (`prompt` is text, or a list of chat messages), as TRL's; every other
column reaches the rewards by name. A dataset in a known layout (GSM8K's, MATH-500's, MBPP's, HumanEval's, or
`prompt` + `answer`, `prompt` + `tests`) also gets the held-out check's scorer (math-verify, the code sandbox); any
other dataset with a `prompt` column is checked by the rewards' means alone.

The held-out check asks `eval_size` problems, none of them trained on nor (testbed tasks) one of the problems that
chose a testbed checkpoint; two problems are the same when their prompts are (`dlm_rl.data.tasks.problem_key`;
`facts`: prompt and completion, its prompt is always `#`). Per source:

- a testbed task: training draws `train_size` problems of the task's train split with the seed; the held-out
  problems are the first `eval_size` of its test split drawn with seed 1 (the same for every run, as the
  checkpoints' own held-out evaluation) that are not validation problems of a testbed checkpoint
  (`dlm_rl.testbed.held_out_problems`). The splits are a hash of the problem, so training never holds them. A
  test split too small for that is an error.
- `reasoning_gym:NAME`: training is the generator's first `train_size` problems for the seed; the held-out
  problems are the first `eval_size` new ones of its stream for seed + 1_000_003, none a training problem (the
  generators are procedural: two seeds can make the same problem; `dlm_rl.data.tasks.reasoning_gym_held_out`).
  A generator that runs out gives fewer, with a warning.
- a dataset with a test split (or an `eval_dataset`): training is its training split (its first `train_size`
  rows), whole; the held-out rows are the first `eval_size` rows of the test split whose prompt is not a
  training prompt. Rows skipped for that are logged with their count; a test split that runs out gives fewer
  rows, with a log line.
- a dataset without one: `eval_size` of its rows, drawn with the seed, are held out, and every row asking one of
  their prompts leaves training (logged with its count).

`prompt_template`, `system_prompt` and `chat` shape every prompt, training and held-out alike.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from dlm_rl.data.benchmarks import FILE_EXTENSIONS, HUB, detect_format, humaneval_rows, to_benchmark
from dlm_rl.data.files import is_prompt, load_rows, refuse_empty_file
from dlm_rl.data.tasks import problem_key

logger = logging.getLogger(__name__)

GENERATED_TRAIN_SIZE = 4096  # problems a generator draws for training when train_size is not set


@dataclass
class DatasetArguments:
    """The prompts a trainer learns from and is checked on; every field can be a recipe key."""

    dataset_name: str | None = None
    """A built-in dataset (a testbed task such as 'addition3' or 'code', 'reasoning_gym:NAME', 'gsm8k', 'math500',
    'mbpp', 'humaneval') or a Hugging Face hub dataset id. Unset with no dataset_path: 'addition3'."""
    dataset_path: str | None = None
    """A local dataset: a .jsonl / .json / .parquet / .csv file, or a directory written by `save_to_disk`."""
    dataset_config: str | None = None
    """The hub dataset's configuration (e.g. 'main' for openai/gsm8k)."""
    dataset_train_split: str = "train"
    """The split to train on."""
    dataset_test_split: str | None = "test"
    """The split of the held-out check; a dataset without it (a single file) gives eval_size of its training rows."""
    train_size: int | None = None
    """Training prompts: at most this many rows of the split (all by default); generators draw this many (4096 by
    default)."""
    eval_size: int = 128
    """Held-out prompts the periodic check asks: never a training prompt, nor a testbed checkpoint's validation
    problem (a source with fewer such prompts gives fewer, with a log line; a testbed task refuses)."""
    prompt_template: str | None = None
    """Each prompt as {prompt} inside this text, e.g. '{prompt} Put the final answer in \\boxed{}.' (in a
    conversation: its last user message)."""
    system_prompt: str | None = None
    """A system message before each prompt (the prompt becomes a conversation, through the chat template)."""
    chat: bool = False
    """Send each text prompt as a user message through the tokenizer's chat template (instruct models)."""

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):  # the config classes this one is mixed into
            super().__post_init__()
        if self.dataset_name is not None and self.dataset_path is not None:
            raise ValueError(f"give dataset_name ({self.dataset_name!r}) or dataset_path ({self.dataset_path!r}), "
                             "not both")
        if self.dataset_name is None and self.dataset_path is None:
            self.dataset_name = "addition3"
        if self.dataset_path is not None:
            if not os.path.exists(self.dataset_path):
                raise FileNotFoundError(f"dataset_path {self.dataset_path} does not exist")
            refuse_empty_file(self.dataset_path, "dataset_path")
        for name in ("dataset_train_split", "dataset_test_split", "dataset_name", "dataset_config"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} has no {{prompt}} placeholder")

    @property
    def generated(self) -> bool:
        """Whether the prompts come from a generator (a testbed task or reasoning-gym), with no fixed rows."""
        from dlm_rl.testbed import TASKS

        return self.dataset_path is None and (self.dataset_name in TASKS
                                              or self.dataset_name.startswith("reasoning_gym:"))

    @property
    def conversational(self) -> bool:
        """Whether prompts reach the model as conversations (through the chat template) whatever the rows hold."""
        return self.chat or self.system_prompt is not None


def rename_task(config) -> None:
    """The deprecated `task` key becomes dataset_name, with a warning; both given is an error."""
    if config.task is None:
        return
    logger.warning("`task` is deprecated and will be removed in the next release: use dataset_name: %s", config.task)
    if config.dataset_name is not None:
        raise ValueError(f"task ({config.task!r}) is the old name of dataset_name: give one of them")
    config.dataset_name, config.task = config.task, None


@dataclass
class PromptData:
    train: list[dict]
    held_out: Dataset
    scorer: str | None
    """How the held-out check scores a completion (`dlm_rl.evaluation.score_completions`); None: by the rewards."""
    response_length: int | None
    """The canvas a testbed task was built for; None when the recipe must set gen_length."""


def load_prompts(args: DatasetArguments, seed: int, train: Dataset | list[dict] | None = None,
                 held_out: Dataset | list[dict] | None = None, name: str = "train_dataset") -> PromptData:
    """The training rows (in dataset order) and held-out rows, shaped by `args`' prompt settings: those `args`
    names, or the given `train` (and `held_out`: a test split) datasets, called `name` in messages. No held-out
    prompt is a training prompt, per source as the module docstring says."""
    if train is None and held_out is not None:
        raise ValueError("an eval_dataset needs its train_dataset")
    if train is not None:
        train, held_out = as_dataset(train, name), None if held_out is None else as_dataset(held_out, "eval_dataset")
        length = None
    elif args.generated:
        name = args.dataset_name
        train, held_out, scorer, length = _generated(args, seed)
    else:
        name = args.dataset_path or args.dataset_name
        (train, held_out), length = load_splits(args), None
    if not isinstance(train, list):
        train, scorer = _rows(name, train)
        if held_out is None:
            train, held_out = hold_out(train, args.eval_size, seed, name, args.dataset_test_split)
            train = _without(train, held_out, name)[: args.train_size]
        else:
            train = train[: args.train_size]
            held_out = _unseen(held_out, train, args.eval_size, name)
    shaped = [{**row, "prompt": shape_prompt(row["prompt"], args)} for row in train]
    held_out = held_out.map(lambda row: {"prompt": shape_prompt(row["prompt"], args)})
    return PromptData(shaped, held_out, scorer, length)


def as_dataset(rows, name: str) -> Dataset:
    if isinstance(rows, Dataset):
        return rows
    if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
        return Dataset.from_list(rows)
    raise ValueError(f"{name} must be a datasets.Dataset or a list of dicts (rows), got {type(rows).__name__}")


def hold_out(rows: list[dict], size: int, seed: int, name: str, split: str | None) -> tuple[list[dict], Dataset]:
    """(the rows left to train on, `size` of `rows` drawn with `seed` for the held-out check). Other rows may ask
    a held-out prompt too: `_without` takes them out of training."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if len(order) <= size:
        raise ValueError(f"dataset {name}: {len(order)} rows, not more than eval_size {size}, and no split {split!r} "
                         "to check on; lower eval_size or give a test split")
    chosen = set(order[:size])
    logger.info("dataset %s has no split %r: %d of its rows are held out for the check, %d train", name, split,
                size, len(rows) - size)
    return [row for i, row in enumerate(rows) if i not in chosen], Dataset.from_list(
        [rows[i] for i in sorted(chosen)])


def shape_prompt(prompt, args: DatasetArguments):
    """`prompt` (text or chat messages) with `prompt_template` applied (to a conversation's last user message) and,
    when conversational, as messages with `system_prompt` first (unless the conversation has a system message)."""
    if args.prompt_template is not None:
        if isinstance(prompt, str):
            prompt = args.prompt_template.replace("{prompt}", prompt)
        else:
            last = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
            if last is not None:
                prompt = [dict(m, content=args.prompt_template.replace("{prompt}", m["content"])) if i == last
                          else m for i, m in enumerate(prompt)]
    if isinstance(prompt, str) and args.conversational:
        prompt = [{"role": "user", "content": prompt}]
    if args.system_prompt is not None and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": args.system_prompt}, *prompt]
    return prompt


def is_conversational(rows) -> bool:
    """Whether any of `rows`' prompts is a conversation (it needs the tokenizer's chat template)."""
    return any(not isinstance(row["prompt"], str) for row in rows)


def _generated(args: DatasetArguments, seed: int) -> tuple[list[dict], Dataset, str, int | None]:
    from dlm_rl.data.tasks import reasoning_gym_held_out, reasoning_gym_task
    from dlm_rl.testbed import TASKS, held_out_problems

    size = args.train_size or GENERATED_TRAIN_SIZE
    if args.dataset_name.startswith("reasoning_gym:"):
        name = args.dataset_name.removeprefix("reasoning_gym:")
        train = list(reasoning_gym_task(name, size, seed=seed))
        held_out = reasoning_gym_held_out(name, args.eval_size, seed=seed + 1_000_003,
                                          exclude={problem_key(row) for row in train})
        return train, held_out, "reasoning_gym", None
    task = TASKS[args.dataset_name]
    train = task.dataset("train", size, seed=seed)
    held_out = held_out_problems(args.dataset_name, args.eval_size, seed=1)
    return list(train), held_out, task.generator, task.response_length


def load_splits(args: DatasetArguments) -> tuple[Dataset, Dataset | None]:
    """(the training split, the test split or None when the dataset has none)."""
    if args.dataset_path is not None:
        if os.path.isdir(args.dataset_path):
            from datasets import load_from_disk

            loaded = load_from_disk(args.dataset_path)
            if isinstance(loaded, Dataset):
                return loaded, None
            return _pick(loaded, args, args.dataset_path)
        if not args.dataset_path.lower().endswith(FILE_EXTENSIONS):
            raise ValueError(f"dataset_path {args.dataset_path}: use a {'/'.join(FILE_EXTENSIONS)} file or a "
                             "directory written by save_to_disk")
        return load_rows(args.dataset_path), None
    if args.dataset_name == "humaneval":
        return humaneval_rows(), None
    path, config = args.dataset_name, args.dataset_config
    if path in HUB:
        path, config = HUB[path][0], config or HUB[path][1]
    return _pick(_from_hub(path, config), args, args.dataset_name)


def _pick(splits: DatasetDict, args: DatasetArguments, name: str) -> tuple[Dataset, Dataset | None]:
    if args.dataset_train_split not in splits:
        raise ValueError(f"dataset {name} has no split {args.dataset_train_split!r} (it has {sorted(splits)}); set "
                         "dataset_train_split")
    test = args.dataset_test_split
    return splits[args.dataset_train_split], splits[test] if test is not None and test in splits else None


def _from_hub(path: str, config: str | None) -> DatasetDict:
    from datasets import load_dataset

    try:
        return load_dataset(path, config)
    except (ConnectionError, OSError) as error:
        raise FileNotFoundError(
            f"dataset {path!r} ({config or 'default'}): cannot load it from the Hugging Face hub ({error}). Offline, "
            "save its splits where the hub is reachable (`save_to_disk`, or one .jsonl / .parquet file) and pass "
            "that as dataset_path"
        ) from error


def _rows(name: str, dataset: Dataset) -> tuple[list[dict], str | None]:
    """The rows (in a known layout: mapped to `prompt` + `answer` / `tests`, with its scorer) or, in no known layout,
    as they are, when they have a `prompt` (scored by the rewards alone)."""
    if len(dataset) == 0:
        raise ValueError(f"dataset {name} has no rows")
    try:
        detect_format(dataset.column_names, name)
    except ValueError:
        if "prompt" not in dataset.column_names:
            raise ValueError(f"dataset {name}: columns {dataset.column_names} have no `prompt` (text or chat "
                             "messages), nor the columns of GSM8K, MATH-500, MBPP or HumanEval") from None
        rows = list(dataset)
        for i, row in enumerate(rows):
            if not is_prompt(row["prompt"]):
                raise ValueError(f"dataset {name}: row {i}: prompt {row['prompt']!r} is not text or a list of chat "
                                 "messages")
        return rows, None
    benchmark = to_benchmark(name, dataset)
    return list(benchmark.rows), benchmark.scorer


def _without(train: list[dict], held_out: Dataset, name: str) -> list[dict]:
    """`train` without the prompts the held-out check asks (rows held out of the same dataset: other rows with
    their prompt)."""
    asked = {problem_key(row) for row in held_out}
    kept = [row for row in train if problem_key(row) not in asked]
    if len(kept) < len(train):
        logger.info("dataset %s: %d training prompts are also held-out prompts; left out of training",
                    name, len(train) - len(kept))
    if not kept:
        raise ValueError(f"dataset {name}: no training prompt is left once the held-out prompts are taken out")
    return kept


def _unseen(split: Dataset, train: list[dict], size: int, name: str) -> Dataset:
    """The first `size` rows of the test `split` (in the rows' layout, as `_rows` maps them) whose prompt is not
    a `train` prompt: the training split stays whole, the held-out rows that ask a training prompt are skipped and
    the next rows of the split take their place. Logs how many rows were skipped (a warning: the two splits
    share prompts) and when the split has fewer than `size` rows to give."""
    trained = {problem_key(row) for row in train}
    end = min(size, len(split))
    while True:  # map a growing prefix of the split (a test split can be large), in order
        kept, looked = [], 0
        for row in _rows(f"{name} (held out)", split.select(range(end)))[0]:
            if len(kept) == size:
                break
            looked += 1
            if problem_key(row) not in trained:
                kept.append(row)
        if len(kept) == size or end == len(split):
            break
        end = min(len(split), 2 * end)
    if looked > len(kept):
        logger.warning("dataset %s: %d of the first %d rows of its held-out split ask a training prompt; they are not "
                       "evaluated", name, looked - len(kept), looked)
    if not kept:
        raise ValueError(f"dataset {name}: every row of its held-out split asks a training prompt, so nothing is left "
                         "to check on; give a held-out split apart from the training one")
    if len(kept) < size:
        logger.info("dataset %s: %d held-out rows, fewer than eval_size %d: its held-out split has no more%s", name,
                    len(kept), size, " that training does not ask" if looked > len(kept) else "")
    return Dataset.from_list(kept)


def completion_rows(dataset_name: str | None, dataset_path, size: int, seed: int, response_length: int | None,
                    tokenizer=None, dataset_config: str | None = None, split: str = "train") -> tuple[Dataset, int]:
    """(rows with `prompt` and `completion`, the response length) for SFT and distillation: `size` rows of testbed
    task `dataset_name`; else the `split` of hub dataset `dataset_name` (with `dataset_config`), or a local file or
    saved directory `dataset_path`, or the rows `dataset_path` is (a Dataset or a list of dicts), which must come with
    their `response_length`. TRL's conversational rows (`messages`) give their last assistant turn as the
    completion and the turns before it as the prompt. With the model's `tokenizer`, every row is encoded once, so
    that one a batch would refuse fails now (before the model loads), naming its row."""
    from dlm_rl.data.collate import DiffusionCollator, require_columns
    from dlm_rl.testbed import TASKS

    if dataset_name in TASKS:
        task = TASKS[dataset_name]
        return task.dataset("train", size, seed=seed), response_length or task.response_length
    key = f"dataset_name {dataset_name}" if dataset_name is not None else f"dataset_path {dataset_path}" if isinstance(
        dataset_path, str) else "train_dataset"
    if response_length is None:
        raise ValueError(f"{key}: set response_length (completion + EOS tokens; gen_length in DiDi recipes)")
    where = f"dataset file {dataset_path}" if isinstance(dataset_path, str) else key
    if dataset_name is not None or (isinstance(dataset_path, str) and os.path.isdir(dataset_path)):
        source = DatasetArguments(dataset_name=dataset_name, dataset_path=dataset_path, dataset_config=dataset_config,
                                  dataset_train_split=split)
        rows = load_splits(source)[0]
    elif isinstance(dataset_path, str):
        rows = load_rows(dataset_path)
    else:
        rows = as_dataset(dataset_path, "train_dataset")
    if "messages" in rows.column_names and "completion" not in rows.column_names:
        rows = rows.map(_split_last_turn, remove_columns=["messages"], desc="splitting off the last assistant turn")
    require_columns(rows, ["prompt", "completion"], where)
    if tokenizer is not None:
        DiffusionCollator(tokenizer, response_length).check(rows, where)
    return rows, response_length


def _split_last_turn(row: dict) -> dict:
    """A conversation as `prompt` (the turns before its last assistant turn) and `completion` (that turn's text)."""
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise ValueError(f"a `messages` row needs an assistant turn after at least one other turn: {messages!r}")
    return {"prompt": messages[:last], "completion": messages[last]["content"]}
