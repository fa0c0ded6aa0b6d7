"""The online trainers' held-out sets (`dlm_rl.data.sources.load_prompts`) share no problem with the training draw
nor with the problems that chose a testbed checkpoint (`dlm_rl.testbed.build`'s validation draw), for every source:
the testbed tasks at the sizes the shipped recipes use, reasoning-gym generators, and user datasets."""

from __future__ import annotations

import glob
import json
import logging

import pytest
import yaml
from datasets import Dataset, DatasetDict

from dlm_rl.data.benchmarks import load_benchmark
from dlm_rl.data.sources import GENERATED_TRAIN_SIZE, DatasetArguments, load_prompts
from dlm_rl.data.tasks import reasoning_gym_held_out, reasoning_gym_task
from dlm_rl.testbed import CHECKPOINTS, TASKS, VALIDATION_SIZE, Task, held_out_problems


def _recipe_sizes() -> list[tuple[str, int, int | None]]:
    """(testbed task, eval_size, train_size) of every shipped online recipe on a testbed task, and the defaults
    (eval_size 128, train_size unset) for the testbed tasks no such recipe uses."""
    sizes = set()
    for path in sorted(glob.glob("recipes/*.yaml")):
        with open(path) as f:
            recipe = yaml.safe_load(f)
        if recipe.get("trainer") in ("tracerl", "vrpo") and recipe.get("dataset_name") in TASKS:
            sizes.add((recipe["dataset_name"], recipe.get("eval_size", 128), recipe.get("train_size")))
    for task in TASKS:
        if not any(size[0] == task for size in sizes):
            sizes.add((task, DatasetArguments.eval_size, None))
    return sorted(sizes, key=str)


def _key(row, generator: str):
    """A problem as the test tells problems apart: its prompt; a facts text (prompt always '#') by its completion."""
    return (row["prompt"], row["completion"]) if generator == "facts" else row["prompt"]


def _validation(generator: str) -> set:
    """What `testbed.build` validates each checkpoint on, for the checkpoints of tasks with this generator."""
    return {_key(row, generator) for spec in CHECKPOINTS.values() if TASKS[spec.task].generator == generator
            for row in TASKS[spec.task].dataset("test", VALIDATION_SIZE, seed=spec.seed + 2)}


@pytest.mark.parametrize("task, eval_size, train_size", _recipe_sizes())
def test_a_testbed_tasks_held_out_problems_are_neither_trained_on_nor_validation_problems(task, eval_size,
                                                                                         train_size):
    # before: code (eval_size 192) held 57 validation problems, chain and chain128 (256 and 128) 3 and 2, and
    # facts had no training prompt left (every facts prompt is '#')
    generator = TASKS[task].generator
    data = load_prompts(DatasetArguments(dataset_name=task, eval_size=eval_size, train_size=train_size), seed=0)
    held = [_key(row, generator) for row in data.held_out]
    assert len(held) == len(set(held)) == eval_size
    assert not set(held) & _validation(generator)
    draw = TASKS[task].dataset("train", train_size or GENERATED_TRAIN_SIZE, seed=0)
    assert [_key(row, generator) for row in data.train] == [_key(row, generator) for row in draw]  # whole
    assert not set(held) & {_key(row, generator) for row in draw}


def test_testbed_held_out_problems_are_the_seeds_test_draw_without_validation_and_do_not_depend_on_the_run():
    task = TASKS["code"]
    validation = _validation("code")
    drawn = [row["prompt"] for row in task.dataset("test", 192, seed=1)]
    held = held_out_problems("code", 192)["prompt"]
    kept = [p for p in drawn if p not in validation]
    assert held[: len(kept)] == kept and len(kept) < 192  # the draw without validation, then the next ones
    assert load_prompts(DatasetArguments(dataset_name="code", eval_size=192), seed=5).held_out["prompt"] == held
    # `dlm-rl eval` on a testbed task asks the same problems
    assert list(load_benchmark("code", n=192).rows["prompt"]) == held


def test_a_testbed_task_too_small_for_eval_size_besides_validation_is_refused(monkeypatch):
    monkeypatch.setitem(TASKS, "code1", Task("code", {"max_ops": 1}, response_length=32))  # 27 problems, ~3 test
    with pytest.raises(ValueError, match="dataset code1: 5 held-out problems .eval_size. are more than its test "
                                         "split has besides the 128 validation problems"):
        held_out_problems("code1", 5)


@pytest.mark.parametrize("name, eval_size", [("gsm_symbolic", 256), ("chain_sum", 128)])
def test_reasoning_gym_held_out_problems_are_not_in_the_training_draw(name, eval_size, caplog):
    # before: the held-out draw (seed 1_000_003) repeated 1 (gsm_symbolic) and 2 (chain_sum) problems of the
    # 4096-problem training draw (seed 0), which training then lost
    draw = reasoning_gym_task(name, GENERATED_TRAIN_SIZE, seed=0)
    with caplog.at_level(logging.INFO, logger="dlm_rl.data.tasks"):
        data = load_prompts(DatasetArguments(dataset_name=f"reasoning_gym:{name}", eval_size=eval_size), seed=0)
    held = data.held_out["prompt"]
    assert not set(held) & set(draw["prompt"])
    assert len(held) == len(set(held)) == eval_size
    assert "repeated a training problem or each other; the next ones of the stream took their place" in caplog.text
    assert [row["prompt"] for row in data.train] == draw["prompt"]  # train_size problems, whole
    again = load_prompts(DatasetArguments(dataset_name=f"reasoning_gym:{name}", eval_size=eval_size), seed=0)
    assert again.held_out["prompt"] == held  # deterministic


def test_a_reasoning_gym_generator_that_runs_out_gives_fewer_held_out_problems_with_a_warning(caplog):
    stream = reasoning_gym_task("basic_arithmetic", 32, seed=7)["prompt"]  # 8 * 4 problems looked at for 4
    assert len(set(stream)) == 32
    exclude = {repr(prompt) for prompt in stream[:-1]}
    with caplog.at_level(logging.WARNING, logger="dlm_rl.data.tasks"):
        held = reasoning_gym_held_out("basic_arithmetic", 4, seed=7, exclude=exclude)
    assert held["prompt"] == [stream[-1]]
    assert "only 1 held-out problems, fewer than the 4 asked: 31 of the 32 problems drawn repeat" in caplog.text
    with pytest.raises(ValueError, match="none of 32 problems drawn with seed 7 is new"):
        reasoning_gym_held_out("basic_arithmetic", 4, seed=7, exclude=exclude | {repr(stream[-1])})


ROWS = [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(20)]


def _saved(tmp_path, train: list[dict], test: list[dict]) -> str:
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(str(tmp_path / "d"))
    return str(tmp_path / "d")


def test_a_test_split_row_asking_a_training_prompt_is_not_evaluated_and_training_keeps_its_split(tmp_path, caplog):
    # before: the duplicated prompt was evaluated (and taken out of training instead)
    train, test = ROWS[:12], [ROWS[3], *ROWS[12:]]  # the test split's first row asks a training prompt
    with caplog.at_level(logging.INFO, logger="dlm_rl.data.sources"):
        data = load_prompts(DatasetArguments(dataset_path=_saved(tmp_path, train, test), eval_size=4), seed=0)
    assert data.held_out["prompt"] == [row["prompt"] for row in ROWS[12:16]]  # the next row took its place
    assert [row["prompt"] for row in data.train] == [row["prompt"] for row in train]
    assert "1 of the first 5 rows of its held-out split ask a training prompt; they are not evaluated" in caplog.text
    given = load_prompts(DatasetArguments(eval_size=4), 0, train=train, held_out=test)  # TRL's eval_dataset
    assert given.held_out["prompt"] == data.held_out["prompt"] and len(given.train) == 12


def test_a_test_split_that_runs_out_gives_fewer_rows_with_a_log_line_and_none_left_is_refused(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dlm_rl.data.sources"):
        data = load_prompts(DatasetArguments(eval_size=8), 0, train=ROWS[:12], held_out=[ROWS[0], *ROWS[12:15]])
    assert data.held_out["prompt"] == [row["prompt"] for row in ROWS[12:15]]
    assert "3 held-out rows, fewer than eval_size 8: its held-out split has no more that training does not ask" in (
        caplog.text)
    with pytest.raises(ValueError, match="every row of its held-out split asks a training prompt"):
        load_prompts(DatasetArguments(eval_size=8), 0, train=ROWS[:12], held_out=ROWS[:2])


def test_train_size_counts_only_the_rows_trained_on(tmp_path):
    data = load_prompts(DatasetArguments(eval_size=2, train_size=5), 0, train=ROWS[:12], held_out=[ROWS[8], ROWS[3]])
    assert data.held_out["prompt"] == [ROWS[8]["prompt"]] and len(data.train) == 5  # ROWS[8] is not trained on


def test_without_a_test_split_every_copy_of_a_held_out_prompt_leaves_training(tmp_path, caplog):
    rows = [*ROWS, *ROWS[:10]]  # ten prompts asked twice
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for seed in range(3):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dlm_rl.data.sources"):
            data = load_prompts(DatasetArguments(dataset_path=str(path), eval_size=6), seed=seed)
        held = set(data.held_out["prompt"])
        assert len(data.held_out) == 6
        assert [row["prompt"] for row in data.train] == [row["prompt"] for row in rows if row["prompt"] not in held]
        copies = sum(row["prompt"] in held for row in rows) - 6
        assert (f"{copies} training prompts are also held-out prompts; left out of training" in caplog.text) == (
            copies > 0)
