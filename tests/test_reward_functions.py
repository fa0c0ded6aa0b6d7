"""Loading rewards by name, combining them with weights, and refusing or surviving bad reward functions; the
format rewards."""

from __future__ import annotations

import logging
import pathlib

import pytest

from dlm_rl.reward_functions import Rewards, load_reward
from rewards.format import boxed, fenced_code, length_within

EXAMPLE = str(pathlib.Path(__file__).parents[1] / "rewards" / "custom_example.py")
USER_FILE = """
async def exact(prompts, completions, answer, **columns):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def flaky(prompts, completions, **columns):
    if any("boom" in c for c in completions):
        raise RuntimeError("cannot score boom")
    return [1.0] * len(completions)
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return str(path)


def test_module_and_file_references_load(user_file):
    assert load_reward("rewards.math:accuracy").__name__ == "accuracy"
    assert load_reward(f"{user_file}:exact").__name__ == "exact"
    assert load_reward(f"{EXAMPLE}:shorter_is_better").__name__ == "shorter_is_better"


@pytest.mark.parametrize(
    "reference, error, message",
    [
        ("rewards.math:acc", ValueError, r"'rewards.math:acc' not found; did you mean 'rewards.math:accuracy'\?"),
        ("rewards.maths:accuracy", ImportError, "cannot import module 'rewards.maths'"),
        ("rewards.math", ValueError, "must look like 'module:function'"),
        ("no/such/file.py:f", FileNotFoundError, "no file 'no/such/file.py'"),
    ],
)
def test_bad_references_are_clear_errors(reference, error, message):
    with pytest.raises(error, match=message):
        load_reward(reference)


def test_weighted_total_async_rewards_and_columns(user_file):
    rewards = Rewards([f"{user_file}:exact", "rewards.format:boxed"], weights=[2.0, 0.5])
    result = rewards(["p", "q"], ["42", "\\boxed{1}"], {"answer": ["42", "2"]})
    assert result["exact"] == [1.0, 0.0] and result["boxed"] == [0.0, 1.0]
    assert result["total"] == [2.0, 0.5]


def test_async_reward_inside_a_running_event_loop(user_file):
    import asyncio

    async def main():
        return Rewards([f"{user_file}:exact"])(["p"], ["7"], {"answer": ["7"]})

    assert asyncio.run(main())["total"] == [1.0]


def test_none_is_not_applicable_and_counts_zero_in_the_total():
    def partial(prompts, completions, **columns):
        return [None, 1.0]

    result = Rewards([partial])(["p", "q"], ["a", "b"])
    assert result["partial"] == [None, 1.0] and result["total"] == [0.0, 1.0]


def test_missing_column_is_named():
    message = r"reward accuracy needs column\(s\) \['answer'\]; the dataset has \['solution'\]"
    with pytest.raises(ValueError, match=message):
        Rewards(["rewards.math:accuracy"])(["p"], ["\\boxed{1}"], {"solution": ["1"]})


@pytest.mark.parametrize(
    "returned, message",
    [([1.0], "returned 1 scores for 2 completions"), ([1.0, "high"], "returned 'high' for sample 1"),
     ([1.0, float("nan")], "returned nan for sample 1"), (3.0, "returned float scores for 2 completions")],
)
def test_wrong_length_or_non_numbers_are_clear_errors(returned, message):
    def bad(prompts, completions, **columns):
        return returned

    with pytest.raises(ValueError, match=message):
        Rewards([bad])(["p", "q"], ["a", "b"])


def test_a_sample_that_breaks_a_reward_scores_zero_and_is_logged(user_file, caplog):
    with caplog.at_level(logging.WARNING):
        result = Rewards([f"{user_file}:flaky"])(["p"] * 3, ["fine", "boom", "ok"])
    assert result["flaky"] == [1.0, 0.0, 1.0]
    assert result["errors"][0] is None and result["errors"][2] is None
    assert result["errors"][1].startswith("flaky: ") and "cannot score boom" in result["errors"][1]
    assert "failed on sample 1" in caplog.text and "cannot score boom" in caplog.text


def test_example_custom_reward_uses_a_column():
    rewards = Rewards([f"{EXAMPLE}:shorter_is_better"])
    result = rewards(["p", "q"], ["", "x" * 50], {"max_chars": [10, 100]})
    assert result["total"] == [1.0, 0.5]


def test_format_rewards():
    chat = [{"role": "assistant", "content": "```\nx\n```"}]
    completions = ["so \\boxed{3}", "\\boxed{3", "```python\ndef f():\n    pass\n```", chat]
    assert boxed(None, completions) == [1.0, 0.0, 0.0, 0.0]
    assert fenced_code(None, completions) == [0.0, 0.0, 1.0, 1.0]
    assert length_within(12)(None, completions) == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="min_chars <= max_chars"):
        length_within(5, min_chars=10)
