"""Code rewards: the fraction of a sample's tests its program passes, judged inside the sandbox by a trusted
harness that records each passed test under a secret nonce — never by the exit code or by what the program prints.

Tests come per sample as one of:
- `tests`: a list of assert statements (`assert f(2) == 4`), one test each;
- `tests`: a HumanEval-style program defining `check(candidate)`, with `entry_point` naming the function (0 or 1);
- `stdio`: a list of {"input": ..., "output": ...} cases, each run as its own program (whitespace-normalised).
The program is the last fenced Python block of the completion, or the whole completion if there is none.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from rewards import completion_text
from rewards.sandbox import Limits, run_python

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

# The nonce is read from stdin before the untrusted program runs, and lines without it are ignored, so exiting
# early, printing "passed" or writing the results file by hand earns nothing.
_HARNESS = """\
import json, sys
def _run():
    nonce = sys.stdin.readline().strip()
    tests = json.load(open("tests.json"))
    results = open("results.txt", "w")
    space = {"__name__": "solution"}
    try:
        exec(compile(open("solution.py").read(), "solution.py", "exec"), space)
    except BaseException:
        return
    for i, test in enumerate(tests["asserts"]):
        try:
            exec(compile(test, f"test_{i}", "exec"), space)
        except BaseException:
            continue
        results.write(f"{nonce} {i}\\n")
        results.flush()
    if tests["check"] is not None:
        try:
            exec(compile(tests["check"], "check", "exec"), space)
            space["check"](space[tests["entry_point"]])
        except BaseException:
            return
        results.write(f"{nonce} check\\n")
        results.flush()
_run()
"""


def extract_code(completion: str) -> str:
    """The last fenced Python block, or the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def pass_rate(prompts, completions, tests=None, entry_point=None, stdio=None, **columns) -> list[float | None]:
    """Fraction of each sample's tests passed (None for a sample without tests)."""
    count = len(completions)
    tests = tests or [None] * count
    entry_point = entry_point or [None] * count
    stdio = stdio or [None] * count
    if not len(tests) == len(entry_point) == len(stdio) == count:
        raise ValueError(f"pass_rate: {count} completions but tests/entry_point/stdio of other lengths")
    jobs = [
        (extract_code(completion_text(c)), t, e, s) for c, t, e, s in zip(completions, tests, entry_point, stdio)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: score(*job), jobs))


def score(code: str, tests=None, entry_point: str | None = None, stdio=None, limits: Limits = Limits()) -> float | None:
    """One program against its tests (see the module docstring)."""
    if stdio:
        passed = [_stdio_case(code, case, limits) for case in stdio]
        return sum(passed) / len(passed)
    if not tests:
        return None
    if isinstance(tests, str):
        if entry_point is None:
            raise ValueError("a check(candidate) program needs its entry_point")
        spec = {"asserts": [], "check": tests, "entry_point": entry_point}
        wanted = {"check"}
    else:
        spec = {"asserts": list(tests), "check": None, "entry_point": entry_point}
        wanted = {str(i) for i in range(len(tests))}
    nonce = secrets.token_hex(16)
    outcome = run_python(
        _HARNESS,
        stdin=nonce + "\n",
        files={"solution.py": code, "tests.json": json.dumps(spec)},
        read_back=("results.txt",),
        limits=limits,
    )
    lines = outcome.files.get("results.txt", "").splitlines()
    passed = {line.split(" ", 1)[1] for line in lines if line.startswith(nonce + " ")} & wanted
    return len(passed) / len(wanted)


def _stdio_case(code: str, case: dict, limits: Limits) -> bool:
    outcome = run_python(code, stdin=case["input"], limits=limits)
    return outcome.returncode == 0 and outcome.stdout.split() == str(case["output"]).split()
