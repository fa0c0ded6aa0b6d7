"""Code rewards: the fraction of a sample's tests its program passes.

Tests come per sample as one of:
- `tests`: a list of assert statements (`assert f(2) == 4`), one test each;
- `tests`: a HumanEval-style program defining `check(candidate)`, with `entry_point` naming the function (0 or 1);
- `stdio`: a list of {"input": ..., "output": ...} cases, each run as its own program (whitespace-normalised).
The program is the row's `code_prefix` (if any) followed by the last fenced Python block of the completion, or the
whole completion if there is none.

The program cannot reach the judge (rewards.sandbox; docs/security.md): it runs in a sandbox and answers requests
`name(*args, **kwargs)`, sent over a pipe as plain values, with the `ascii` of each result, while a harness outside
the sandbox holds the tests, runs each one itself against stubs that forward those calls, reads every answer with
`ast.literal_eval` (plain values, never code) and keeps the verdicts. The program sees the arguments of its calls
and nothing else: no test text, expected value or verdict exists in its sandbox, so printing, writing files or
descriptors, exiting early, raising SystemExit or patching builtins changes nothing but its own answers. A program
that dies is restarted in a fresh sandbox for the next test while its wall-clock limit lasts. stdio programs get
their input on stdin; the harness compares their output.
A check program sees only the program's entry point: what else it calls comes from the test and the row's trusted
`code_prefix` (HumanEval's prompt, with its helpers such as `poly` and `encode_cyclic`), run in the harness. An
assert test calls the program's functions by name (a name that would replace a builtin excepted: `def abs(x):
return 0` must not pass `abs(f(x) - y) < 1e-6`). Tests see return values only, not arguments mutated in place
nor values that are not plain (objects, generators, inf and nan). A failure of the harness itself is the call's
error, never a 0.
"""

from __future__ import annotations

import ast
import builtins
import marshal
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from rewards import completion_text
from rewards.sandbox import Limits, in_harness

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
_ANSWER_BYTES = 1 << 16  # longest answer line read from a program (parsed outside the sandbox's limits)


def extract_code(completion: str) -> str:
    """The last fenced Python block, or the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def pass_rate(prompts, completions, tests=None, entry_point=None, stdio=None, code_prefix=None,
              **columns) -> list[float | None]:
    """Fraction of each sample's tests passed (None for a sample without tests). A sample's `code_prefix` (HumanEval's
    prompt: the function the model completes and its helpers) comes before its code."""
    count = len(completions)
    tests = tests or [None] * count
    entry_point = entry_point or [None] * count
    stdio = stdio or [None] * count
    code_prefix = code_prefix or [""] * count
    if not len(tests) == len(entry_point) == len(stdio) == len(code_prefix) == count:
        raise ValueError(f"pass_rate: {count} completions but tests/entry_point/stdio/code_prefix of other lengths")
    jobs = [
        ((p or "") + extract_code(completion_text(c)), t, e, s, p or "")
        for c, t, e, s, p in zip(completions, tests, entry_point, stdio, code_prefix)
    ]
    # Twice the cores: much of a sandbox's life is waiting on the kernel and on pipes, not computing.
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: score(*job), jobs))


def score(code: str, tests=None, entry_point: str | None = None, stdio=None, trusted: str = "",
          limits: Limits = Limits()) -> float | None:
    """One program against its tests (see the module docstring). `trusted` (a check program's prompt) defines what
    the tests may call besides the entry point."""
    if stdio:
        job = {"stdio": [(case["input"], str(case["output"])) for case in stdio]}
    elif not tests:
        return None
    elif isinstance(tests, str):
        if entry_point is None:
            raise ValueError("a check(candidate) program needs its entry_point")
        job = {"check": tests, "entry_point": entry_point, "trusted": trusted}
    else:
        job = {"asserts": list(tests)}
    verdicts = in_harness("rewards.code:_judge", (code, job), limits, runs=len(stdio) if stdio else 1)
    if verdicts is None:  # the harness overran its time: nothing passed
        return 0.0
    return sum(verdicts) / len(verdicts)


# ---- in the harness ------------------------------------------------------------------------------------------


def _judge(request, limits: Limits, start) -> list[bool]:
    """Harness entry: the verdict of each test of the job."""
    code, job = request
    if "stdio" in job:
        return [_stdio_case(start, code, stdin, expected, limits) for stdin, expected in job["stdio"]]
    program = _Program(start, code, time.monotonic() + limits.seconds)
    try:
        if "check" in job:
            return [program.passes(job["check"], job["entry_point"], job["trusted"])]
        return [program.passes(test) for test in job["asserts"]]
    finally:
        program.close()


def _stdio_case(start, code: str, stdin: str, expected: str, limits: Limits) -> bool:
    sandbox = start(_MAIN, code, time.monotonic() + limits.seconds)
    try:
        if not sandbox.started():
            return False
        output = sandbox.exchange(stdin.encode(), limits.output_bytes, to_end=True)
    finally:
        status = sandbox.close(wait=True)
    return status == 0 and output is not None and output.decode(errors="replace").split() == expected.split()


class _Gone(BaseException):
    """The program's sandbox ended, overran its time or broke the protocol (a BaseException: tests that catch
    Exception around a call must not go on as if it had answered)."""


class _Program:
    """The program loaded in a sandbox, answering calls; started again for the next test after it ends, while
    its wall clock lasts."""

    def __init__(self, start, code: str, deadline: float):
        self.start, self.code, self.deadline = start, code, deadline
        self.sandbox, self.names, self.sequence = None, [], 0
        self.broken: OSError | None = None  # the harness's own failure talking to the sandbox: not a verdict

    def passes(self, test: str, entry_point: str | None = None, trusted: str = "") -> bool:
        """Whether `test` passes. A check program's entry point is the program's, all else it calls is the test's
        own or `trusted`'s (HumanEval's `poly` and `encode_cyclic` are not the program's to redefine)."""
        try:
            space = {"__name__": "test", **self._stubs(entry_point)}
        except _Gone:
            return False
        try:
            if entry_point is not None:
                exec(compile(trusted, "prompt", "exec", dont_inherit=True), space)
                space[entry_point] = self._stub(entry_point)
            exec(compile(test, "test", "exec", dont_inherit=True), space)
            if entry_point is not None:
                space["check"](space[entry_point])
            passed = True
        except BaseException:
            passed = False
        if self.broken:
            raise RuntimeError("the harness lost its sandbox") from self.broken
        return passed

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def _stubs(self, entry_point: str | None) -> dict:
        """A stub per function the program defines (in a check program, only its entry point), except those that
        would replace a builtin the tests use."""
        if self.sandbox is None:
            if time.monotonic() >= self.deadline:
                raise _Gone()
            self.sandbox = self.start(_SERVER, self.code, self.deadline)
            if not self.sandbox.started():
                self.close()
                raise _Gone()
            try:
                names = self._ask(("names",))
            except Exception:  # the program broke its own server: it defines nothing the tests can call
                names = []
            self.names = [n for n in names if isinstance(n, str) and n.isidentifier() and not n.startswith("__")
                          ] if isinstance(names, list) else []
        if entry_point is not None:
            return {entry_point: self._stub(entry_point)}
        return {name: self._stub(name) for name in self.names if not hasattr(builtins, name)}

    def _stub(self, name: str):
        return lambda *args, **kwargs: self._ask(("call", name, args, kwargs))

    def _ask(self, message: tuple):
        """Send one request; its answer as a plain value, or the program's exception raised here."""
        if self.sandbox is None:
            raise _Gone()
        self.sequence += 1
        request = marshal.dumps((self.sequence, message))  # ValueError for an argument that is not a plain value
        try:
            line = self.sandbox.exchange(len(request).to_bytes(4, "big") + request, _ANSWER_BYTES)
        except OSError as error:
            self.broken = error
            raise _Gone() from None
        try:
            sequence, kind, text = line.decode("ascii").split(" ", 2)
            if int(sequence) != self.sequence or kind not in ("value", "error"):
                raise ValueError(line)
            value = ast.literal_eval(text) if kind == "value" else None
            if time.monotonic() > self.deadline:  # parsing a hostile answer took the rest of its time
                raise ValueError(line)
        except Exception:  # no line, not one of ours, or no plain value: it is no longer answering
            self.close()
            raise _Gone() from None
        if kind == "error":
            raised = getattr(builtins, text, None)
            if text in ("StopIteration", "StopAsyncIteration"):  # would end a test's map() or zip() early, unfailed
                raise RuntimeError(text)
            raise raised() if isinstance(raised, type) and issubclass(raised, Exception) else RuntimeError(text)
        return value


# Inside the sandbox: load the program, then answer each request, `marshal`led (plain values only) after its
# length, ("names",) or ("call", name, args, kwargs), with a line "<n> value <ascii(result)>" or "<n> error
# <exception name>". The channel is a private copy of stdin and stdout; the program's own are /dev/null. (No
# `import ast` here: it would double the sandbox's start-up time.)
_SERVER = """\
import builtins, marshal
sys.set_int_max_str_digits(0)
calls, answers = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
space = {"__name__": "solution", "__builtins__": builtins}
try:
    exec(compile(PROGRAM, "solution.py", "exec"), space)
except BaseException:
    space = {}
while len(size := calls.read(4)) == 4:
    number, message = marshal.loads(calls.read(int.from_bytes(size, "big")))
    try:
        if message[0] == "names":
            value = [name for name, v in list(space.items()) if callable(v) and not name.startswith("__")]
        else:
            value = space[message[1]](*message[2], **message[3])
        answer = "value " + ascii(value)
    except BaseException as error:
        answer = "error " + type(error).__name__
    answers.write(f"{number} {answer}\\n".encode())
    answers.flush()
os._exit(0)
"""

# Inside the sandbox: the program as __main__, its stdin and stdout those of the sandbox.
_MAIN = 'exec(compile(PROGRAM, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})'
