"""Math accuracy: the completion's final answer checked against a gold answer with math-verify.

The final answer is the last `\\boxed{...}` (an earlier boxed answer, corrected later, does not count), else what
follows the last `####` (GSM8K), else the last non-empty line. A final answer that offers alternatives scores 0 when
the gold is one value: values joined by "or" / "and" (also as `\\text{ or }`), `\\vee`, `\\lor`, `\\cup`; several
values in one box (`3, 4`, `3;4`, `3\\text{,}4`, `\\{3, 4\\}`, `3 \\quad 4`); `\\pm` / `\\mp`; `x = 5 \\text{ or }
x = -5`; a box joined to another value or box by such a word or a comma (`\\boxed{3} or \\boxed{4}`). A gold of
several values (a set, tuple or interval such as `3, 4`, `\\{3, 4\\}`, `(1, 2]`, or `\\pm 5`) is left to math-verify,
which matches the same set in any order and any of these spellings. `1,000` (a comma before exactly three digits)
is one number.

Units and percentages are math-verify's (measured with math-verify 0.9, docs/rewards.md): units are dropped, not
converted: `5 cm`, `5\\text{ cm}`, `5\\,\\mathrm{kg}` and `5 m` all match a gold `5` or `5 cm`, and `500 cm` does not
match `5 m`. A percent sign makes both readings right: `50\\%` matches a gold `0.5` and a gold `50`, and a gold `50\\%`
is matched by `0.5`, `\\frac{1}{2}` and `50`; `50 \\text{ percent}` matches `50` only.

math-verify bounds its own time with `signal.alarm`, which raises off the main thread (thread pools, threaded
Ray actors) and silently turns rewards into 0. Its timeouts are therefore disabled and every check runs in a
worker process instead: a fresh `python -m rewards.math` (the caller's script is never re-run in it), ready
before its first check is timed. A check that takes longer than `TIMEOUT` seconds has its worker killed and
restarted, and scores 0. Works the same on the main thread, in threads and in Ray actors.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import subprocess
import sys
import threading
from multiprocessing.connection import wait

from rewards import completion_text

logger = logging.getLogger(__name__)

TIMEOUT = 5.0  # seconds per check, wall clock
STARTUP_TIMEOUT = 300.0  # seconds for a worker to import math-verify
# Alternatives in a final answer ("3 or 4", "3, 4", "\pm 5"): listing the right value among others earns nothing.
_CONNECTIVE = r"(?:(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])|\\(?:vee|lor|wedge|land|cup)(?![A-Za-z])|[∨∧∪])"
_SEPARATOR = r"(?:,(?!\d{3}(?!\d))|;|\\q?quad(?![A-Za-z])|\\\\|&)"  # 1,000 is one number
_PLUS_MINUS = r"(?:\\(?:pm|mp)(?![A-Za-z])|[±∓])"
_VARIABLE = r"(?:[a-z](?:_\{?\w+\}?)?\s*=\s*)?"  # `x = `, `x_2 = `
# What an alternative starts with: `-5`, `x = 5`, `\frac`, `(1`, after an optional "maybe".
_VALUE = rf"(?:(?:maybe|perhaps|possibly|probably|rather|even)\s+)?{_VARIABLE}[-+]?\s*(?:\d|\\[A-Za-z]|\()"
_JOIN = rf"\s*[,(]?\s*(?:{_CONNECTIVE}|{_SEPARATOR})\s*"  # `, or`, ` or `, ` (or `, `;`
_ALTERNATIVES = re.compile(f"{_CONNECTIVE}|{_SEPARATOR}|{_PLUS_MINUS}", re.IGNORECASE)  # inside one answer (a box)
_JOINED = re.compile(rf"[\d)}}\]]{_JOIN}{_VALUE}|{_PLUS_MINUS}\s*{_VALUE}", re.IGNORECASE)  # on an answer line
_JOINED_BEFORE = re.compile(rf"[\d)}}\]]{_JOIN}{_VARIABLE}$", re.IGNORECASE)
_JOINED_AFTER = re.compile(rf"(?:{_JOIN}{_VALUE}|\s*{_PLUS_MINUS}\s*{_VALUE})", re.IGNORECASE)
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]")  # \, \; \: \! and "\ " are spaces, not separators
_WRAPPED = re.compile(r"\\(?:text\w*|math\w*|mbox|hbox|operatorname|emph)\s*\{([^{}]*)\}")
WORKERS = 2


def accuracy(prompts, completions, answer, **columns) -> list[float | None]:
    """1.0 where the completion's final answer equals the gold `answer` mathematically, else 0.0
    (None where the sample has no gold answer)."""
    if len(answer) != len(completions):
        raise ValueError(f"accuracy: {len(completions)} completions but {len(answer)} answers")
    texts = [completion_text(c) for c in completions]
    pairs = [(str(gold), text) for gold, text in zip(answer, texts) if gold is not None]
    scores = iter(_pool().map(pairs))
    return [None if gold is None else next(scores) for gold in answer]


def final_answer(text: str) -> str | None:
    """The answer a completion ends with: the last `\\boxed{...}`, else what follows the last `####` (GSM8K),
    else the last `$...$` of the last non-empty line, else that line."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    inline = re.findall(r"\$([^$]+)\$", lines[-1])
    return f"${inline[-1]}$" if inline else lines[-1].rstrip(".")


def check(gold: str, completion: str) -> float:
    """Score one completion in this process (no time bound; `accuracy` bounds it from outside)."""
    from math_verify import parse, verify

    predicted = final_answer(completion)
    if predicted is None or (hedged(completion) and not _ALTERNATIVES.search(_plain(_as_latex(gold)))):
        return 0.0
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    # boxed / #### / $..$ answers are one expression; a plain last line is searched by math-verify's extractors
    explicit = predicted.startswith("$") or _last_boxed(completion) is not None or "####" in completion
    predicted_parsed = parse(_as_latex(predicted) if explicit else predicted, parsing_timeout=None)
    if not gold_parsed or not predicted_parsed:
        return 0.0
    return float(verify(gold_parsed, predicted_parsed, timeout_seconds=None))


def hedged(text: str) -> bool:
    """Whether the final answer offers alternatives: within the last box, joined to it on its line, or (with no
    box) anywhere on the `####` line or the last line; see the module docstring."""
    boxed = _last_boxed(text)
    if boxed is None:
        if "####" in text:
            line = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        else:
            line = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        return bool(_JOINED.search(_plain(line)))
    start = text.rfind("\\boxed{")
    before = text[:start].rsplit("\n", 1)[-1]
    after = text[start + len("\\boxed{") + len(boxed) + 1 :].split("\n", 1)[0]
    previous = _last_boxed(before)
    return bool(
        _ALTERNATIVES.search(_plain(boxed))
        or _JOINED_BEFORE.search(_plain(before.replace("\\boxed", "")))  # `3 or \boxed{4}`
        or _JOINED_AFTER.match(_plain(after))  # `\boxed{3} or 4`
        or (previous is not None and before.rstrip(" $").endswith(previous + "}"))  # `\boxed{3}\boxed{4}`
    )


def _plain(latex: str) -> str:
    """`latex` with `\\text{...}`-like wrappers opened (words keep spaces around them), `{,}` as a comma, spacing
    (`\\,`, `\\;`), `$` and `*` as spaces, so that `3\\text{ or }4`, `3\\text{,}4` and `$3$ or $4$` read as `3 or 4`,
    `3,4`, `3 or 4`, and `5\\,\\text{cm}` as `5 cm`."""
    for _ in range(3):  # nested wrappers: \text{\textbf{or}}
        latex = _WRAPPED.sub(lambda m: f" {m[1]} " if re.search("[A-Za-z]", m[1]) else m[1], latex)
    latex = _SPACING.sub(" ", latex)
    return latex.replace("{,}", ",").replace("$", " ").replace("*", " ")  # `**3** or **4**`: Markdown bold


def _as_latex(answer: str) -> str:
    """`42`, `$42$` and `\\boxed{42}` alike, as one inline-math expression."""
    answer = answer.strip()
    boxed = _last_boxed(answer)
    if boxed is not None:
        answer = boxed
    return f"${answer.strip('$').strip()}$"


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no final answer



def _serve() -> None:
    """The worker: reads JSON [gold, completion] lines on stdin, writes a score (or {"error": ...}) per line."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off
    replies, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints cannot corrupt the replies
    check("1", "1")  # import and warm up math-verify (seconds on a busy machine) before the clock starts
    print(json.dumps("ready"), file=replies, flush=True)
    for line in sys.stdin:
        gold, completion = json.loads(line)
        try:
            result = check(gold, completion)
        except Exception as error:  # a parse error is a wrong answer, not a crash
            result = {"error": repr(error)}
        print(json.dumps(result), file=replies, flush=True)


class _Worker:
    """One `python -m rewards.math` process (a fresh interpreter: the caller's script is never re-run, as it
    would be by multiprocessing's spawn)."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rewards.math"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self.stdout = self.process.stdout

    def fileno(self) -> int:
        return self.stdout.fileno()

    def wait_ready(self) -> _Worker:
        """Start-up (importing math-verify) never counts against a check's time limit."""
        if not wait([self], timeout=STARTUP_TIMEOUT) or json.loads(self.stdout.readline() or "null") != "ready":
            self.kill()
            raise RuntimeError(f"a math-verify worker did not start within {STARTUP_TIMEOUT:.0f} s")
        return self

    def send(self, pair: tuple[str, str]) -> None:
        self.process.stdin.write(json.dumps(list(pair)) + "\n")
        self.process.stdin.flush()

    def receive(self):
        line = self.stdout.readline()
        return json.loads(line) if line else {"error": "the worker exited"}

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class _Pool:
    """Worker processes that score (gold, completion) pairs, each under a wall-clock limit."""

    def __init__(self, size: int):
        self.workers = [worker.wait_ready() for worker in [_Worker() for _ in range(size)]]
        self.lock = threading.Lock()

    def map(self, pairs: list[tuple[str, str]]) -> list[float]:
        import time

        scores = [0.0] * len(pairs)
        with self.lock:
            pending = list(enumerate(pairs))[::-1]
            busy = {}  # connection -> (worker index, item index, deadline)
            idle = list(range(len(self.workers)))
            while pending or busy:
                while idle and pending:
                    w = idle.pop()
                    item, pair = pending.pop()
                    self.workers[w].send(pair)
                    busy[self.workers[w]] = (w, item, time.monotonic() + TIMEOUT)
                timeout = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
                for connection in wait(list(busy), timeout=timeout):
                    w, item, _ = busy.pop(connection)
                    result = connection.receive()
                    if isinstance(result, dict):
                        logger.warning("math check of sample %d failed (scored 0): %s", item, result["error"])
                    else:
                        scores[item] = result
                    idle.append(w)
                now = time.monotonic()
                for connection, (w, item, deadline) in list(busy.items()):
                    if now >= deadline:
                        logger.warning("math check of sample %d exceeded %.0f s (scored 0); restarting its worker",
                                       item, TIMEOUT)
                        self.workers[w].kill()
                        self.workers[w] = _Worker().wait_ready()
                        del busy[connection]
                        idle.append(w)
        return scores

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


_shared: _Pool | None = None
_shared_lock = threading.Lock()


def _pool() -> _Pool:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = _Pool(WORKERS)
            atexit.register(_shared.close)
        return _shared


if __name__ == "__main__":
    _serve()
