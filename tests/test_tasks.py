"""Tests of the task generators and checkers in dlm_rl.data.tasks."""

import string

import pytest

from dlm_rl.data.tasks import (
    CODE_OPS,
    addition,
    boxed_answer,
    chain,
    code,
    code_pass_rate,
    exact_match,
    facts,
    facts_validity,
    reasoning_gym_task,
    score,
    split_of,
)

ALLOWED = set(string.printable) - set("\t\r\x0b\x0c")
TESTS_F = ["assert f(0) == 6", "assert f(-3) == 0", "assert f(1) == 8", "assert f(10) == 26"]  # (x+3)*2


def ascii_only(ds) -> bool:
    return all(set(r["prompt"] + r["completion"] + r["answer"]) <= ALLOWED for r in ds)


def test_addition_rows_are_correct():
    ds = addition(200, seed=1)
    assert ds.column_names == ["prompt", "completion", "answer"]
    assert ascii_only(ds)
    for r in ds:
        xs = [int(x) for x in r["prompt"].removesuffix("=").split("+")]
        assert len(xs) == 3 and all(10 <= x <= 99 for x in xs)
        assert r["answer"] == str(sum(xs))
        assert r["completion"] == "\\boxed{" + r["answer"] + "}"
    hard = addition(20, operands=5, digits=3)
    assert all(len(r["prompt"]) == 5 * 4 for r in hard)


def test_chain_writes_running_sums():
    ds = chain(500, seed=2)
    assert ascii_only(ds)
    for r in ds:
        xs = [int(x) for x in r["prompt"].removesuffix("=").split("+")]
        total, lines = xs[0], []
        for x in xs[1:]:
            lines.append(f"{total}+{x}={total + x}")
            total += x
        assert r["completion"] == "\n".join(lines) + "\n\\boxed{" + str(total) + "}"
        assert r["answer"] == str(total)
        assert len(r["completion"].split("\\boxed{")[0]) >= 24


def test_hand_checked_first_rows():
    assert addition(1)[0] == {"prompt": "43+75+72=", "completion": "\\boxed{190}", "answer": "190"}
    assert chain(1)[0] == {
        "prompt": "59+63+15+43=",
        "completion": "59+63=122\n122+15=137\n137+43=180\n\\boxed{180}",
        "answer": "180",
    }
    row = code(3)[2]
    assert row["prompt"] == "f(x): add 2, mul 5\n"
    assert row["completion"] == "def f(x):\n return (x+2)*5"
    assert row["tests"] == ["assert f(0) == 10", "assert f(-4) == -10", "assert f(1) == 15", "assert f(15) == 85"]


def test_code_rows_pass_their_own_tests():
    ds = code(200, seed=3)
    assert ds.column_names == ["prompt", "completion", "answer", "tests", "entry_point"]
    assert ascii_only(ds)
    for r in ds:
        assert r["entry_point"] == "f" and len(r["tests"]) == 4
        inputs = [int(t.split("f(")[1].split(")")[0]) for t in r["tests"]]
        assert 0 in inputs and any(x < 0 for x in inputs)
        ops = r["prompt"].removeprefix("f(x): ").removesuffix("\n").split(", ")
        assert 1 <= len(ops) <= 2 and all(o.split()[0] in CODE_OPS and 1 <= int(o.split()[1]) <= 9 for o in ops)
        assert code_pass_rate(r["completion"], r["tests"]) == 1.0
        assert r["completion"] == "def f(x):\n return " + r["answer"]


@pytest.mark.parametrize("make", [addition, chain, code])
def test_splits_disjoint_and_deterministic(make):
    train, test = make(300, seed=5), make(30, split="test", seed=5)
    assert set(train["prompt"]).isdisjoint(test["prompt"])
    assert len(set(train["prompt"])) == 300 and len(set(test["prompt"])) == 30
    assert all(split_of(p) == "train" for p in train["prompt"])
    assert all(split_of(p) == "test" for p in test["prompt"])
    assert make(300, seed=5).to_list() == train.to_list()
    assert make(300, seed=6)["prompt"] != train["prompt"]


def test_too_small_space_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="distinct test problems"):
        addition(20, operands=2, digits=1, split="test")
    with pytest.raises(ValueError, match="split"):
        addition(5, split="valid")
    with pytest.raises(ValueError, match="operands"):
        chain(5, operands=1)
    with pytest.raises(ValueError, match="756 problems"):
        code(700)


def test_boxed_answer():
    assert boxed_answer("x \\boxed{1} y \\boxed{22}") == "22"
    assert boxed_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert boxed_answer("\\boxed{7} then \\boxed{8") == "7"
    assert boxed_answer("no box") is None
    assert boxed_answer("\\boxed{") is None
    assert boxed_answer("\\boxed{}") == ""


def test_exact_match():
    assert exact_match("12+57=69\n\\boxed{ 102 }", "102")
    assert not exact_match("\\boxed{1020}", "102")
    assert not exact_match("102", "102")


@pytest.mark.parametrize(
    "completion, rate",
    [
        ("def f(x):\n return (x+3)*2", 1.0),
        ("def f(x): return x*2+6", 1.0),
        ("Here:\n```python\ndef f(y):\n    return 2*y - -6\n```", 1.0),
        ("```python\ndef f(x): return x\n```\n```python\ndef f(x): return (x+3)*2\n```", 1.0),
        ("def f(x): return x*2", 0.0),
        ("def f(x): return 6", 0.25),
        ("def f(x): return (x+3)*2 + 100 // (x+3)", 0.0),  # zero division at -3, wrong elsewhere
        ("def f(x): return (x + 3) * 2 + 0 // (x - 1)", 0.75),  # zero division only at 1
        ("import os\ndef f(x): return (x+3)*2", 0.0),
        ("def f(x): return __import__('os').system('true') or (x+3)*2", 0.0),
        ("def f(x): return 9**9**9", 0.0),
        ("def f(x):\n while True:\n  pass", 0.0),
        ("def f(x): return x.real*2+6", 0.0),
        ("def f(x): return abs(x)", 0.0),
        ("def f(x): return y", 0.0),
        ("def f(x): return (x+3)*2.0", 0.0),
        ("def f(x): return True*x*2+6", 0.0),
        ("def f(x): return x*10000000*10000000", 0.0),
        ("def f(x): return 10000000000000+x", 0.0),
        ("def g(x): return (x+3)*2", 0.0),
        ("def f(x, y=1): return (x+3)*2", 0.0),
        ("@print\ndef f(x): return (x+3)*2", 0.0),
        ("def f(x): return (x+3)*2\nf(1)", 0.0),
        ("def f(x) return x", 0.0),
        ("lambda x: (x+3)*2", 0.0),
        ("def f(x): return " + "-" * 100000 + "x", 0.0),
        ("def f(x): return " + "+".join(["x"] * 20000), 0.0),
        ("", 0.0),
    ],
)
def test_code_pass_rate(completion, rate):
    assert code_pass_rate(completion, TESTS_F) == rate


def test_code_pass_rate_rejects_malformed_tests():
    with pytest.raises(ValueError, match="assert f"):
        code_pass_rate("def f(x): return x", ["assert f(1) > 0"])


def test_score_dispatch():
    assert score("addition", "\\boxed{102}", {"answer": "102"}) == 1.0
    assert score("chain", "69\n\\boxed{101}", {"answer": "102"}) == 0.0
    assert score("code", "def f(x): return x*2+6", {"tests": TESTS_F, "entry_point": "f"}) == 1.0
    with pytest.raises(ValueError, match="unknown task"):
        score("nope", "", {})


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum"])
def test_reasoning_gym_task(name):
    ds = reasoning_gym_task(name, 5, seed=1)
    assert set(ds.column_names) >= {"prompt", "completion", "answer", "task"}
    assert ds.to_list() == reasoning_gym_task(name, 5, seed=1).to_list()
    for r in ds:
        assert r["task"] == name and r["completion"] == "\\boxed{" + r["answer"] + "}"
        assert score("reasoning_gym", r["completion"], r) == 1.0
        assert score(name, r["completion"], r) == 1.0
        assert score(name, "no answer", r) == 0.0
        wrong = str(int(r["answer"]) + 1)
        assert score(name, "\\boxed{" + wrong + "}", r) < 1.0


def test_all_ops_in_code_space():
    prompts = set(code(600)["prompt"])
    seen = {o.split()[0] for p in prompts for o in p[6:-1].split(", ")}
    assert seen == set(CODE_OPS)


def test_facts_are_valid_chains_and_the_checker_counts_bad_facts():
    train, test = facts(50, seed=3), facts(5, split="test", seed=3)
    assert set(train["completion"]).isdisjoint(test["completion"]) and set(train["prompt"]) == {"#"}
    assert all(len(text) == 126 and facts_validity(text) == 1.0 for text in train["completion"])
    assert facts_validity("3+4=7;7*6=2;", count=2) == 1.0
    assert facts_validity("3+4=8;8*6=8;", count=2) == 0.5  # a wrong sum; the next fact chains from what was written
    assert facts_validity("3+4=7;5*6=0;", count=2) == 0.5  # correct, but not chained
    assert facts_validity("3+4=7;7-9=8;", count=2) == 1.0  # 7 − 9 = 8 mod 10
    assert facts_validity("3+4=7;", count=2) == 0.5  # a missing fact
    assert facts_validity("3+4=7;7*6=2;1+1=2;", count=2) == 0.5  # extra text spoils the sample
    assert facts_validity("3+4=7;7*6=2", count=2) == 0.5  # unterminated
    assert score("facts", "3+4=7;x", {}) == pytest.approx(1 / 21)
