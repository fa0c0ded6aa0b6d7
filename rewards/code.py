"""Code rewards: the fraction of a sample's tests its program passes, judged inside the sandbox by a trusted
harness in a separate process that records each passed test under a secret nonce — never by the exit code or by
what the program prints.

Tests come per sample as one of:
- `tests`: a list of assert statements (`assert f(2) == 4`), one test each;
- `tests`: a HumanEval-style program defining `check(candidate)`, with `entry_point` naming the function (0 or 1);
- `stdio`: a list of {"input": ..., "output": ...} cases, each run as its own program (whitespace-normalised).
The program is the last fenced Python block of the completion, or the whole completion if there is none.
"""

from __future__ import annotations

import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from rewards import completion_text
from rewards.sandbox import Limits, run_python

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

# The trusted harness never runs the untrusted program in its own process: a program can read its caller's frames
# (and so any secret or open file of an in-process harness). The harness forks the child that will load the
# program before it reads anything secret, then makes itself undumpable (no same-user process may read its memory
# or trace it) and reads the nonce. The child loads the solution and answers calls `name(*args)` with the `repr`
# of the result; the harness evaluates every test itself, with stubs that forward each call to the child and
# read the answer back with `ast.literal_eval` (plain values only, never code). A passed test is recorded under
# the nonce, which the child never sees, so exiting early, printing, or writing the results file earns nothing.
# A child that dies is replaced by a fresh interpreter (a fork would copy the nonce) for the next test.
# Limitation: tests see return values only, not arguments mutated in place.
_HARNESS = """\
import ast, ctypes, os, sys
child_code = {"__name__": "child"}
exec(open("child.py").read(), child_code)
def fork_child():
    calls_read, calls_write = os.pipe()
    answers_read, answers_write = os.pipe()
    if os.fork() == 0:  # the child: nothing secret exists yet
        os.close(calls_write)
        os.close(answers_read)
        child_code["serve"](calls_read, answers_write)
    os.close(calls_read)
    os.close(answers_write)
    return os.fdopen(calls_write, "w"), os.fdopen(answers_read, "r")
first = fork_child()
# An interpreter this (unprivileged) user may execute for replacement children; ours may not be one.
python = next(p for p in (os.readlink("/proc/self/exe"), sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")
              if os.access(p, os.X_OK))
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
nonce = sys.stdin.readline().strip()
tests = ast.literal_eval(open("tests.txt").read())
results = open("results.txt", "w")
class Gone(Exception):
    pass
class Child:
    def __init__(self, pipes=None):
        if pipes is None:
            import subprocess  # only now: importing it costs every sample time
            process = subprocess.Popen([python, "-I", "child.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
            pipes = process.stdin, process.stdout
        self.calls, self.answers = pipes
        self.alive = True
    def ask(self, message):
        if not self.alive:
            raise Gone()
        try:
            self.calls.write(repr(message) + "\\n")
            self.calls.flush()
            line = self.answers.readline(1 << 22)
        except OSError:
            line = ""
        if not line.endswith("\\n"):
            self.alive = False
            raise Gone()
        kind, text = ast.literal_eval(line)
        if kind != "value":
            raise RuntimeError(text)
        return ast.literal_eval(text)
child = Child(first)
def namespace():
    global child
    if not child.alive:
        child = Child()
    names = child.ask(("names",))
    def stub(name):
        return lambda *args, **kwargs: child.ask(("call", name, args, kwargs))
    return {name: stub(name) for name in names if isinstance(name, str)}
def passes(source, run=None):
    try:
        space = namespace()
        exec(compile(source, "test", "exec"), space)
        if run is not None:
            space["check"](space[run])
        return True
    except BaseException:
        return False
for i, test in enumerate(tests["asserts"]):
    if passes(test):
        results.write(nonce + " " + str(i) + "\\n")
        results.flush()
if tests["check"] is not None and passes(tests["check"], tests["entry_point"]):
    results.write(nonce + " check\\n")
    results.flush()
"""

# The child: loads the untrusted solution (its own prints and reads go to /dev/null) and answers calls.
_CHILD = """\
import ast, itertools, os, sys
def serve(calls_fd, answers_fd):
    calls, answers = os.fdopen(calls_fd, "r"), os.fdopen(answers_fd, "w")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    sys.stdin, sys.stdout, sys.stderr = open(os.devnull), open(os.devnull, "w"), open(os.devnull, "w")
    first = calls.readline()  # the harness asks only once it is undumpable and holds the nonce: no race
    space = {"__name__": "solution"}
    try:
        exec(compile(open("solution.py").read(), "solution.py", "exec"), space)
    except BaseException:
        space = {}
    for line in itertools.chain([first], calls):
        if not line:
            break
        message = ast.literal_eval(line)
        try:
            if message[0] == "names":
                value = [n for n, v in space.items() if callable(v) and not n.startswith("__")]
            else:
                _, name, args, kwargs = message
                value = space[name](*args, **kwargs)
            reply = ("value", repr(value))
        except BaseException as error:
            reply = ("error", type(error).__name__)
        answers.write(repr(reply) + "\\n")
        answers.flush()
    os._exit(0)
if __name__ == "__main__":
    serve(os.dup(0), os.dup(1))
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
    # Twice the cores: much of a sandbox's start-up is waiting on the kernel (namespaces), not computing.
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
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
        files={"solution.py": code, "child.py": _CHILD, "tests.txt": repr(spec)},
        read_back=("results.txt",),
        limits=limits,
    )
    lines = outcome.files.get("results.txt", "").splitlines()
    passed = {line.split(" ", 1)[1] for line in lines if line.startswith(nonce + " ")} & wanted
    return len(passed) / len(wanted)


def _stdio_case(code: str, case: dict, limits: Limits) -> bool:
    outcome = run_python(code, stdin=case["input"], limits=limits)
    return outcome.returncode == 0 and outcome.stdout.split() == str(case["output"]).split()
