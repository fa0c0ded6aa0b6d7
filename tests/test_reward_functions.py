"""Loading rewards by name, combining them with weights, and refusing or surviving bad reward functions (ones that
never return, exit, or return NumPy / torch numbers); the format rewards."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
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


# --- custom rewards in a worker process: time limits, exits, NumPy / torch scores ---------------------------------

SPIN = """
import os, pathlib, subprocess, sys

def spin(prompts, completions, **columns):
    if "hang" in completions:  # keep cores busy: this process, a child in a session of its own, and a daemon
        spin = [sys.executable, "-c", "while True: pass"]
        child = subprocess.Popen(spin, start_new_session=True)
        daemon = subprocess.run(  # its parent has exited: an orphan in its own session
            [sys.executable, "-c", f"import subprocess; print(subprocess.Popen({{spin!r}}, start_new_session=True,"
             " stdout=subprocess.DEVNULL).pid)"], capture_output=True, text=True).stdout.strip()
        pathlib.Path({pids!r}).write_text(f"{{os.getpid()}} {{child.pid}} {{daemon}}")
        while True:
            pass
    return [float(len(c)) for c in completions]
"""


def _spin_file(tmp_path) -> tuple[str, pathlib.Path]:
    pids = tmp_path / "pids"
    path = tmp_path / "spinning.py"
    path.write_text(SPIN.format(pids=str(pids)))
    return f"{path}:spin", pids


def _gone(pid: int, wait: float = 5.0) -> bool:
    """The process no longer exists (or is a zombie, which uses no CPU and waits only to be reaped)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_reward_that_never_returns_is_abandoned_and_its_processes_are_killed(tmp_path, caplog):
    reference, pids = _spin_file(tmp_path)
    rewards = Rewards([reference, "rewards.format:boxed"], timeout=2)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = rewards(["p", "q"], ["hang", "\\boxed{1}"])
    assert time.monotonic() - start < 2 + 3
    assert result["spin"] == [None, None] and result["boxed"] == [0.0, 1.0]
    assert result["total"] == [None, None]  # no reward: the trainers leave these samples out
    assert result["errors"] == ["spin: no result within 2 s"] * 2
    assert f"reward 'spin' ({reference}): no result within 2 s on 2 completions" in caplog.text
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 3 and all(_gone(pid) for pid in started)  # no core left busy
    assert rewards(["p"], ["ok"])["spin"] == [2.0]  # a new worker serves the next call


def test_consecutive_failed_calls_stop_with_an_error_naming_the_reward(tmp_path, user_file, caplog):
    reference, _ = _spin_file(tmp_path)
    rewards = Rewards([reference], timeout=1, max_failures=2)
    with caplog.at_level(logging.WARNING):
        assert rewards(["p"], ["hang"])["total"] == [None]
    assert "reward 'spin': 1 of max_reward_failures=2 failed calls in a row" in caplog.text
    assert rewards(["p"], ["ok"])["spin"] == [2.0]  # a call that scores resets the count
    rewards(["p"], ["hang"])
    with pytest.raises(ValueError, match=rf"reward 'spin' \({reference}\) failed 2 calls in a row \(last: no result "
                                         r"within 1 s\); stopping\. .*raise reward_timeout \(now 1 s\) or "
                                         r"max_reward_failures \(now 2\)"):
        rewards(["p"], ["hang"])
    raising = Rewards([f"{user_file}:flaky"], max_failures=2)  # exceptions on every sample count alike
    assert raising(["p"], ["boom"])["flaky"] == [0.0]
    with pytest.raises(ValueError, match=rf"reward 'flaky' \({user_file}:flaky\) failed 2 calls in a row \(last: "
                                         r"every sample raised \(last: RuntimeError\('cannot score boom'\)\)\)"):
        raising(["p"], ["boom"])


@pytest.mark.parametrize("statement, shown", [("raise SystemExit(0)", "SystemExit: 0"),
                                              ("import sys; sys.exit()", "SystemExit"),
                                              ("raise KeyboardInterrupt", "KeyboardInterrupt"),
                                              ("raise GeneratorExit", "GeneratorExit")])
def test_an_exit_at_import_is_that_rewards_error(tmp_path, statement, shown):
    path = tmp_path / "quits.py"
    path.write_text(f"{statement}\n\ndef f(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    with pytest.raises(ValueError, match=rf"reward '{path}:f': importing '{path}' raised {shown}$"):
        Rewards([f"{path}:f"])


@pytest.mark.parametrize("statement, shown", [("raise SystemExit(0)", "SystemExit: 0"), ("sys.exit()", "SystemExit"),
                                              ("raise KeyboardInterrupt", "KeyboardInterrupt"),
                                              ("raise GeneratorExit", "GeneratorExit")])
def test_an_exit_in_the_call_is_that_rewards_error(tmp_path, statement, shown):
    path = tmp_path / "quits.py"
    path.write_text(f"import sys\n\ndef quits(prompts, completions, **columns):\n    {statement}\n")
    rewards = Rewards([f"{path}:quits", "rewards.format:boxed"])
    with pytest.raises(ValueError, match=f"reward quits raised {shown} while scoring"):
        rewards(["p"], ["\\boxed{1}"])


def test_a_reward_file_that_exits_ends_a_run_with_an_error_naming_it(tmp_path, capsys):
    """Before: `raise SystemExit(0)` in a reward file ended `dlm-rl train` with exit 0, nothing written."""
    from dlm_rl.cli import main

    for where, source in [("import", "raise SystemExit(0)\n\ndef quits(prompts, completions, **c):\n    return []\n"),
                          ("call", "def quits(prompts, completions, **c):\n    raise SystemExit(0)\n")]:
        path = tmp_path / f"quits_at_{where}.py"
        path.write_text(source)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"trainer: tracerl\nmodel: tiny\ntask: addition3\ntrain_size: 16\neval_size: 2\n"
                          f"reward_funcs: ['{path}:quits']\nlora_r: 4\nnum_generations: 2\nprompts_per_step: 2\n"
                          f"max_steps: 1\nreport_to: none\noutput_dir: {tmp_path / where}\n")
        assert main(["train", str(recipe)]) == 2, where
        err = capsys.readouterr().err
        assert "dlm-rl train: error: reward " in err and "quits" in err and "SystemExit" in err, (where, err)


NUMERIC = """
import numpy as np
import torch

def np_scalars(prompts, completions, **columns):
    return [np.float32(0.5), np.int64(1)]

def np_array(prompts, completions, **columns):
    return np.array([0.25, 1.0], dtype=np.float32)

def tensor(prompts, completions, **columns):
    return torch.tensor([0.5, 2.0])

def tensor_items(prompts, completions, **columns):
    return [torch.tensor(0.5), torch.tensor(True)]

def np_bools(prompts, completions, **columns):
    return np.array([True, False])
"""


def test_numpy_and_torch_numbers_and_arrays_are_scores(tmp_path):
    path = tmp_path / "numeric.py"
    path.write_text(NUMERIC)
    names = ["np_scalars", "np_array", "tensor", "tensor_items", "np_bools"]
    result = Rewards([f"{path}:{name}" for name in names])(["p", "q"], ["a", "b"])  # in the worker process
    assert [result[name] for name in names] == [[0.5, 1.0], [0.25, 1.0], [0.5, 2.0], [0.5, 1.0], [1.0, 0.0]]
    assert all(type(score) is float for name in names for score in result[name])
    assert result["total"] == [2.75, 5.0]

    def in_this_process(prompts, completions, **columns):
        return np.arange(len(completions), dtype=np.float32)

    assert Rewards([in_this_process])(["p", "q"], ["a", "b"])["total"] == [0.0, 1.0]


def test_arrays_of_the_wrong_length_or_non_numbers_are_errors_naming_the_reward(tmp_path):
    cases = [("np.zeros(3)", r"returned 3 scores for 2 completions"),
             ("np.zeros((2, 1))", r"returned an array of shape \(2, 1\) for 2 completions"),
             ("torch.ones(2, 2)", r"returned an array of shape \(2, 2\)"),
             ("np.array(['a', 'b'])", "returned 'a' for sample 0"),
             ("[np.float32('nan'), 1.0]", "returned nan for sample 0")]
    for returned, message in cases:
        path = tmp_path / "odd.py"
        library = "torch" if returned.startswith("torch") else "numpy as np"
        path.write_text(f"import {library}\n\ndef odd(prompts, completions, **columns):\n    return {returned}\n")
        with pytest.raises(ValueError, match=f"reward odd {message}"):
            Rewards([f"{path}:odd"])(["p", "q"], ["a", "b"])


def test_samples_without_a_reward_are_left_out_of_advantages_and_pairs():
    """None in "total" (a reward gave no result): TraceRL's group statistics and VRPO's pairs skip the sample."""
    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig
    from dlm_rl.trainers.vrpo import on_policy_pairs

    model = add_lora(tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0),
                     LoraArguments(use_lora=True, lora_r=4))
    engine = LocalEngine(model, rows_per_chunk=64, rewards=Rewards([lambda p, c, **k: [0.0] * len(c)]))
    (trajectory,) = engine.generate(["1+2=", "3+4="], 4, SamplerConfig(gen_length=4, temperature=1.0))
    assert trajectory.prompt_index == [0, 0, 0, 0, 1, 1, 1, 1]
    trajectory.rewards["total"] = [None, None, None, 1.0, 4.0, None, 6.0, 7.0]  # prompt 0: one sample scored
    metrics = Learner(model, TraceRLConfig(model="tiny"), gen_length=4).update([trajectory])
    assert not metrics.get("skipped") and metrics["kept_fraction"] == 3 / 8  # prompt 1's three scored samples
    chosen, rejected, counts = on_policy_pairs([trajectory], min_margin=0.0)
    assert counts == {"pairs": 1, "ties_dropped": 0, "below_margin": 0}
    assert chosen["input_ids"][0, -4:].tolist() == trajectory.response_ids[7].tolist()  # reward 7.0
    assert rejected["input_ids"][0, -4:].tolist() == trajectory.response_ids[4].tolist()  # 4.0, not the None


def test_training_with_a_reward_that_never_returns_ends_on_its_own_naming_it(tmp_path):
    """`dlm-rl train ... --reward_funcs hang.py:hang --reward_timeout 10 --max_steps 1` used to hang forever."""
    (tmp_path / "hang.py").write_text(
        "import os, pathlib\n\ndef hang(prompts, completions, **columns):\n"
        "    with open('pids', 'a') as f:\n        f.write(f'{os.getpid()}\\n')\n    while True:\n        pass\n")
    recipe = pathlib.Path(__file__).parents[1] / "recipes" / "tracerl_tiny_addition.yaml"
    small = ["--model", "tiny", "--train_size", "16", "--eval_size", "2", "--num_generations", "2",
             "--prompts_per_step", "2", "--lora_r", "4", "--report_to", "none", "--output_dir", "run"]
    done = subprocess.run([sys.executable, "-m", "dlm_rl.cli", "train", str(recipe), "--reward_funcs", "hang.py:hang",
                           "--reward_timeout", "10", "--max_steps", "1", *small],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,  # it used to run forever
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    # the held-out check at step 0, the rollout of step 1 and the final check each time out
    assert "dlm-rl train: error: reward 'hang' (hang.py:hang) failed 3 calls in a row (last: no result within 10 s)" \
        in done.stderr
    assert done.stderr.count("reward 'hang' (hang.py:hang): no result within 10 s") == 3
    pids = [int(line) for line in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 3 and all(_gone(pid) for pid in pids)
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


def test_eval_abandons_a_custom_reward_after_reward_timeout(tmp_path, capsys, caplog):
    import json

    from dlm_rl.cli import main

    hang = tmp_path / "hang_always.py"
    hang.write_text("def hang(prompts, completions, **columns):\n    while True:\n        pass\n")
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--model", "tiny", "--dataset", "addition3", "--n", "2", "--samples", "0",
                     "--gen-length", "4", "--reward", f"{hang}:hang", "--reward", "rewards.format:boxed",
                     "--reward-timeout", "1", "--output-dir", str(tmp_path / "eval")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result["rewards"]) == {"hang", "boxed", "total"}
    assert f"reward 'hang' ({hang}:hang): no result within 1 s on 2 completions" in caplog.text
