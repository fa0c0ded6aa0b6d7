#!/usr/bin/env python
"""Reward throughput on this machine: math scores/s (math-verify in worker processes) and code samples/s
(sandboxed, 3 assert tests each). Prints one JSON object as its last line.

    python scripts/bench_rewards.py [--math 2000] [--code 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def math_workload(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """A mix of right and wrong answers in the forms models write: boxed fractions, decimals, GSM8K endings."""
    completions, answers = [], []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        form = rng.randrange(3)
        if form == 0:
            completions.append(f"We simplify.\nSo the answer is \\boxed{{\\frac{{{a}}}{{{b}}}}}")
            answers.append(str(a / b) if rng.random() < 0.5 else f"\\frac{{{a}}}{{{b + 1}}}")
        elif form == 1:
            completions.append(f"{a} + {b} = {a + b}\n#### {a + b}")
            answers.append(str(a + b + rng.randrange(2)))
        else:
            completions.append(f"\\boxed{{{a}\\sqrt{{{b}}}}}")
            answers.append(f"\\sqrt{{{a * a * b}}}")
    return completions, answers


def code_workload(n: int, rng: random.Random) -> tuple[list[str], list[list[str]]]:
    completions, tests = [], []
    for _ in range(n):
        k = rng.randint(1, 9)
        correct = rng.random() < 0.5
        completions.append(f"```python\ndef f(x):\n    return x * {k if correct else k + 1}\n```")
        tests.append([f"assert f({x}) == {x * k}" for x in (1, 2, 3)])
    return completions, tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--math", type=int, default=2000, help="math completions to score")
    parser.add_argument("--code", type=int, default=200, help="code completions to score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from rewards.code import pass_rate
    from rewards.math import accuracy

    rng = random.Random(args.seed)
    completions, answers = math_workload(args.math, rng)
    accuracy(None, completions[:8], answer=answers[:8])  # start the workers
    start = time.perf_counter()
    math_scores = accuracy(None, completions, answer=answers)
    math_seconds = time.perf_counter() - start

    programs, tests = code_workload(args.code, rng)
    pass_rate(None, programs[:2], tests=tests[:2])  # probe the sandbox layers once
    start = time.perf_counter()
    code_scores = pass_rate(None, programs, tests=tests)
    code_seconds = time.perf_counter() - start

    print(json.dumps({
        "cpus": os.cpu_count(),
        "math_scores_per_s": len(completions) / math_seconds,
        "math_n": len(completions),
        "math_mean_score": sum(math_scores) / len(math_scores),
        "code_samples_per_s": len(programs) / code_seconds,
        "code_n": len(programs),
        "code_tests_per_sample": 3,
        "code_mean_score": sum(code_scores) / len(code_scores),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
