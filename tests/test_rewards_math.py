"""rewards.math.accuracy: final answers judged by math-verify, time-bounded in worker processes, the same from
threads as from the main thread."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import rewards.math as math_reward
from rewards.math import accuracy, final_answer

CASES = [
    # (gold, completion, expected)
    ("\\frac{1}{2}", "so the result is \\boxed{0.5}", 1.0),  # fraction vs decimal
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("0.5", "\\boxed{\\frac12}", 1.0),
    ("$\\frac{1}{2}$", "\\boxed{1/2}", 1.0),  # gold with $...$
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", 1.0),  # gold with \boxed
    ("0.5", "\\boxed{0.6}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),  # equivalent radicals
    ("\\sqrt{12}", "\\boxed{2\\sqrt{3}}", 1.0),
    ("\\sqrt{2}", "\\boxed{\\sqrt{3}}", 0.0),
    ("(x+1)^2", "\\boxed{x^2+2x+1}", 1.0),  # polynomial forms
    ("x^2-1", "\\boxed{(x-1)(x+1)}", 1.0),
    ("x^2+1", "\\boxed{x^2-1}", 0.0),
    ("(1,2)", "\\boxed{(1,2)}", 1.0),  # tuples / open intervals
    ("(1,2)", "\\boxed{[1,2]}", 0.0),  # open vs closed interval
    ("[1,2]", "\\boxed{[1,2]}", 1.0),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", 1.0),  # sets, order-free
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", 0.0),
    ("42", "Natalia sold 48/2 = 24 clips in May.\n#### 42", 1.0),  # GSM8K ending
    ("72", "48 + 24 = 72\n#### 72", 1.0),
    ("72", "#### 71", 0.0),
    ("1000", "#### 1,000", 1.0),  # thousands separator is one number
    ("42", "", 0.0),  # empty completion
    ("42", "   \n  ", 0.0),
    ("42", "I am not sure.", 0.0),
    ("3", "\\boxed{3, 4}", 0.0),  # multi-answer lists earn nothing
    ("3", "The answer is 3 or 4", 0.0),
    ("4", "The answer is 3 or 4", 0.0),
    ("3", "\\boxed{3 \\text{ or } 4}", 0.0),
    ("3", "\\boxed{3 \\vee 4}", 0.0),  # hedges that math-verify alone already refused
    ("5", "\\boxed{\\pm 5}", 0.0),
    ("5", "\\boxed{x = 5 \\text{ or } x = -5}", 0.0),
    ("7", "first \\boxed{7}, but actually \\boxed{8}", 0.0),  # the final answer is judged
    ("8", "first \\boxed{7}, but actually \\boxed{8}", 1.0),
    ("42", "The answer is 42.", 1.0),  # a plain last line
    ("42", "We add.\nSo the answer is $42$", 1.0),
    ("-3", "\\boxed{-3}", 1.0),
    ("-3", "\\boxed{3}", 0.0),
    ("10\\%", "\\boxed{0.1}", 1.0),
    ("\\pi", "\\boxed{\\pi}", 1.0),
    ("\\frac{\\pi}{2}", "\\boxed{\\frac{\\pi}{2}}", 1.0),
    ("3", "\\boxed{x = 3}", 1.0),
    ("1.25", "\\boxed{\\frac{5}{4}}", 1.0),
    ("1.25", "\\boxed{1.250}", 1.0),
    ("2", "\\boxed{2", 0.0),  # unbalanced box: no final answer
    ("12", "\\boxed{\\boxed{12}}", 1.0),
]


def test_math_cases():
    scores = accuracy(None, [c for _, c, _ in CASES], answer=[g for g, _, _ in CASES])
    wrong = [(g, c, e, s) for (g, c, e), s in zip(CASES, scores) if s != e]
    assert not wrong, wrong
    assert len(CASES) >= 40


# Final answers that offer alternatives, each scored 1.0 before hedges were refused (math-verify took one of the values
# and the gold was that one). Gold answers are one value.
HEDGES = {
    "or": [
        ("4", "The answer is $3$ or $4$"), ("4", "The answer is $3$ or $4$."), ("4", "$3$ or $4$"),
        ("4", "Final answer: 3 or $4$"), ("4", "The answer is $3$ or $x = 4$"), ("4", "\\boxed{3} or \\boxed{4}"),
        ("4", "either 3 or \\boxed{4}"), ("4", "either $3$ or $\\boxed{4}$"), ("4", "It is $3$, or $\\boxed{4}$"),
        ("3", "\\boxed{3} or 4"), ("3", "\\boxed{3} or maybe 4"), ("3", "\\boxed{3}, or possibly 4"),
        ("4", "The answer is $3$ and $4$"), ("4", "\\boxed{3} and \\boxed{4}"), ("4", "**3** or **4**"),
        ("4", "The answer is $3$ (or $4$)"), ("3", "\\boxed{3} (or 4)"),
    ],
    "vee": [
        ("4", "\\boxed{3 \\vee 4}"), ("4", "\\boxed{x = 3 \\vee x = 4}"), ("4", "\\boxed{3 ∨ 4}"),
        ("4", "The answer is $3 \\vee 4$"), ("4", "#### 3 \\vee 4"), ("4", "\\boxed{3 \\cup 4}"),
        ("4", "\\boxed{3 \\wedge 4}"),
    ],
    "lor": [
        ("4", "\\boxed{3 \\lor 4}"), ("4", "\\boxed{x=3 \\lor x=4}"), ("4", "$3 \\lor 4$"),
        ("4", "The answer is $x = 3 \\lor x = 4$."),
    ],
    "several values": [
        ("3", "\\boxed{3\\text{,}4}"), ("4", "\\boxed{3 \\text{, } 4}"), ("4", "\\boxed{3 \\\\ 4}"),
        ("4", "\\boxed{3 \\& 4}"),
        ("4", "\\boxed{3}, \\boxed{4}"), ("4", "\\boxed{3}; \\boxed{4}"), ("4", "\\boxed{3}\\boxed{4}"),
        ("4", "The answer is $3$, $4$"), ("4", "$3$; $4$"), ("4", "$x = 3$, $x = 4$"), ("4", "#### 3 \\text{,} 4"),
        ("-5", "x_1 = 5, x_2 = -5"), ("-5", "$x_1 = 5$, $x_2 = -5$"),
    ],
    "pm": [
        ("5", "\\boxed{5 \\pm 0}"), ("5", "\\boxed{5\\pm0}"), ("5", "\\boxed{5 ± 0}"), ("5", "\\boxed{5 \\mp 0}"),
        ("5", "\\boxed{x = 5 \\pm 0}"), ("5", "\\boxed{5} \\pm 1"), ("5", "The answer is $5 \\pm 0$"),
        ("5", "#### 5 \\pm 0"), ("5", "x = \\pm 5"),
    ],
    "x = 5 or x = -5": [
        ("-5", "x = 5 or x = -5"), ("-5", "x = 5 \\text{ or } x = -5"), ("-5", "So $x = 5$ or $x = -5$."),
        ("-5", "The solutions are $x=5$ or $x=-5$"), ("-5", "$x=5$ \\text{ or } $x=-5$"),
        ("-5", "\\boxed{x = 5} \\text{ or } \\boxed{x = -5}"), ("-5", "x = 5 \\text{ or } \\boxed{x = -5}"),
        ("-5", "$x = 5 \\text{ or } \\boxed{x = -5}$"), ("-5", "\\boxed{x = 5 \\lor x = -5}"),
        ("-5", "\\boxed{x = 5 \\vee x = -5}"),
    ],
}


@pytest.mark.parametrize("gold, completion", [pytest.param(*case, id=f"{kind}: {case[1]}")
                                              for kind, cases in HEDGES.items() for case in cases])
def test_a_final_answer_that_offers_alternatives_scores_zero(gold, completion):
    assert accuracy(None, [completion], answer=[gold]) == [0.0]


def test_a_hedge_in_a_chat_completion_scores_zero():
    chat = [[{"role": "assistant", "content": "\\boxed{3 \\vee 4}"}], [{"role": "assistant", "content": "\\boxed{4}"}]]
    assert accuracy(None, chat, answer=["4", "4"]) == [0.0, 1.0]


# Answers that must keep scoring 1.0 beside the hedge rule: one value in any form, a set when the gold is that set,
# a correction after an earlier wrong box, thousands separators, words that contain "or" / "and".
CONTROLS = [
    ("4", "\\boxed{4}"), ("4", "The answer is 4."), ("4", "#### 4"), ("5", "x = 5"), ("5", "\\boxed{x = 5}"),
    ("5", "So $x = 5$."), ("3, 4", "\\boxed{3, 4}"), ("3, 4", "\\boxed{\\{4, 3\\}}"), ("\\{3, 4\\}", "\\boxed{4, 3}"),
    ("3, 4", "\\boxed{x = 3 \\text{ or } x = 4}"), ("5, -5", "\\boxed{\\pm 5}"), ("\\pm 5", "\\boxed{\\pm 5}"),
    ("(1, 2]", "\\boxed{(1, 2]}"), ("(3, 4)", "\\boxed{(3,4)}"), ("-5", "\\boxed{-5}"), ("-12", "#### -12"),
    ("-5", "x = -5"), ("\\frac{3}{4}", "\\boxed{\\frac{3}{4}}"), ("-\\frac{1}{2}", "\\boxed{-\\frac{1}{2}}"),
    ("0.75", "The answer is $\\frac{3}{4}$."), ("8", "first \\boxed{7}, but actually \\boxed{8}"),
    ("4", "\\boxed{3} is wrong; recomputing gives \\boxed{4}."),
    ("4", "Is it \\boxed{3}?\nNo: the answer is \\boxed{4}"),
    ("1000", "\\boxed{1,000}"), ("12345", "\\boxed{12,345}"), ("42", "The answer is 42, since 6 \\times 7 = 42."),
    ("42", "So, 42."), ("4", "Therefore, \\boxed{4} for n = 2."), ("6", "$\\boxed{6}$ (or, in words, six)"),
    ("2", "Either way, the answer is $\\boxed{2}$."),
    ("4", "We try 3 or 5 first; neither works.\nSo it is \\boxed{4}."),
    ("4", "\\boxed{4} and we are done."), ("7", "\\boxed{7}, since 3 + 4 = 7"), ("5", "\\boxed{5\\,\\text{cm}}"),
    ("4", "The answer is **4**."), ("5", "x_1 = 5"), ("12", "3*4 = 12"),
]


def test_single_answers_sets_and_corrections_still_score_one():
    scores = accuracy(None, [c for _, c in CONTROLS], answer=[g for g, _ in CONTROLS])
    assert [case for case, score in zip(CONTROLS, scores) if score != 1.0] == []


@pytest.mark.parametrize(
    "gold, completion, expected",
    [("5", "\\boxed{5\\text{ cm}}", 1.0), ("5", "The answer is 5 cm.", 1.0), ("5", "\\boxed{5\\,\\mathrm{kg}}", 1.0),
     ("5 cm", "\\boxed{5}", 1.0),
     ("5\\text{ cm}", "\\boxed{5\\text{ m}}", 1.0), ("5\\text{ m}", "\\boxed{500\\text{ cm}}", 0.0),
     ("0.5", "\\boxed{50\\%}", 1.0), ("50", "\\boxed{50\\%}", 1.0), ("50\\%", "\\boxed{0.5}", 1.0),
     ("50\\%", "\\boxed{50}", 1.0), ("50\\%", "\\boxed{\\frac{1}{2}}", 1.0), ("0.5", "#### 50%", 1.0),
     ("50", "\\boxed{50 \\text{ percent}}", 1.0), ("0.5", "\\boxed{50 \\text{ percent}}", 0.0),
     ("0.5", "\\boxed{50}", 0.0)],
)
def test_units_are_dropped_and_a_percent_sign_matches_both_readings(gold, completion, expected):
    """What the module docstring and docs/rewards.md say about units and percentages (math-verify's behaviour)."""
    assert accuracy(None, [completion], answer=[gold]) == [expected]


def test_same_results_from_a_thread_pool():
    """math-verify's signal timeouts would raise off the main thread; ours must not care."""
    expected = accuracy(None, [c for _, c, _ in CASES], answer=[g for g, _, _ in CASES])
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda case: accuracy(None, [case[1]], answer=[case[0]])[0], CASES))
    assert threaded == expected


def test_pathological_expression_scores_zero_within_its_limit(monkeypatch, caplog):
    monkeypatch.setattr(math_reward, "TIMEOUT", 1.0)
    deep = "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"
    start = time.monotonic()
    assert accuracy(None, [deep, "\\boxed{2}"], answer=["1", "2"]) == [0.0, 1.0]
    assert time.monotonic() - start < 15
    assert "exceeded" in caplog.text
    assert accuracy(None, ["\\boxed{2}"], answer=["2"]) == [1.0]  # the restarted worker serves again


def test_none_gold_is_not_applicable_and_chat_completions_are_read():
    chat = [[{"role": "assistant", "content": "\\boxed{5}"}], [{"role": "assistant", "content": "\\boxed{6}"}]]
    assert accuracy(None, chat, answer=["5", None]) == [1.0, None]


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        accuracy(None, ["a", "b"], answer=["1"])


@pytest.mark.parametrize(
    "text, expected",
    [("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"), ("a\n#### 12\nextra", "12"), ("So it is $7$.", "$7$"),
     ("", None), ("The answer is 9.", "The answer is 9")],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_inside_ray_actors_plain_and_threaded(monkeypatch):
    """Ray actors run methods off the main thread when threaded; signal-based timeouts would break there."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")

    @ray.remote
    class Scorer:
        def score(self, completions, answers):
            from concurrent.futures import ThreadPoolExecutor

            from rewards.math import accuracy as score

            with ThreadPoolExecutor(2) as pool:
                threaded = list(pool.map(lambda c, a: score(None, [c], answer=[a])[0], completions, answers))
            return score(None, completions, answer=answers), threaded

    completions, answers = [c for _, c, _ in CASES[:12]], [g for g, _, _ in CASES[:12]]
    expected = accuracy(None, completions, answer=answers)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = Scorer.options(max_concurrency=2).remote()
        plain, threaded = ray.get(actor.score.remote(completions, answers))
    finally:
        ray.shutdown()
    assert plain == threaded == expected
    assert 0 < sum(expected) < len(expected)


def test_a_users_script_without_a_main_guard_runs_once(tmp_path):
    """Workers are fresh interpreters: multiprocessing's spawn would re-run an unguarded script in each worker."""
    script = tmp_path / "train.py"
    script.write_text(
        "from rewards.math import accuracy\n"
        "print('script ran')\n"
        "print(accuracy(None, ['\\\\boxed{102}', '\\\\boxed{7}'], answer=['102', '102']))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["script ran", "[1.0, 0.0]"]
