"""Rewards named in a recipe (`module:function` or `path/to/file.py:function`), checked, weighted and summed.

A reward has TRL's signature `fn(prompts, completions, **columns) -> list[float | None]` and may be `async def`.
Dataset columns reach it by name: all of them when it takes `**columns`, else the ones it names. `None` means
"not applicable to this sample" and counts as 0 in the total, as in TRL. Scores may also be NumPy or torch numbers,
or a NumPy array / torch tensor with one score per completion.

Custom rewards (every reference but the built-in `rewards.math`, `rewards.code` and `rewards.format`, which bound
their own time) are imported and called in a worker process of their `Rewards`: a fresh
`python -m dlm_rl.reward_functions` in a session of its own, which dies with the process that started it and adopts
the processes its children leave. A call that gives no result within `timeout` seconds is abandoned: the worker and
every process it started, in whatever session, are killed (a new one serves the next call), the call's samples get no reward (None in that reward's scores and in "total", so that
the trainers leave them out of advantages and pairs), and a warning names the reward. A call fails when it times
out, its worker dies, or every sample raises; after `max_failures` failed calls of one reward in a row, `RewardError`
stops the run. `SystemExit`, `KeyboardInterrupt` and `GeneratorExit` raised by reward code (at import or in a call)
are that reward's `RewardError`, never an exit. A function passed as an object (the Python API) is the caller's own
code: it runs in the caller's process, with no time limit (and a KeyboardInterrupt it raises on the main thread,
where the user's Ctrl-C arrives, stays one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)

BUILT_IN = ("rewards.math:", "rewards.code:", "rewards.format:")  # trusted, and bound their own time
IMPORT_TIMEOUT = 30.0  # seconds at least for a worker to start and import the custom rewards


class RewardError(ValueError):
    """A reward that cannot be used: its import failed, it exited, it returned something other than one score per
    completion, or it failed `max_failures` calls in a row."""


def load_reward(reference: str) -> Callable:
    """Import `module:function` or `path/to/file.py:function`; errors suggest the nearest name."""
    module_name, function_name = _split(reference)
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ImportError(f"reward {reference!r}: cannot import module {module_name!r} ({error})") from None
    except (Exception, SystemExit, GeneratorExit) as error:  # a KeyboardInterrupt here is the user's Ctrl-C
        raise RewardError(_import_failed(reference, error)) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        names = [
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        ]
        close = [n for n in names if n.startswith(function_name)] or difflib.get_close_matches(function_name, names, 1)
        hint = f"; did you mean '{module_name}:{close[0]}'?" if close else f"; it has {sorted(names)}"
        raise ValueError(f"reward {reference!r} not found{hint}")
    return function


def _split(reference: str) -> tuple[str, str]:
    """(module or file, function) of a reference; a malformed reference or a missing file is an error."""
    module_name, sep, function_name = reference.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward {reference!r} must look like 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise FileNotFoundError(f"reward {reference!r}: no file {module_name!r}")
    return module_name, function_name


class Rewards:
    """Several rewards with weights; calling it scores a batch and returns each reward's scores and the total.
    Custom rewards run in a worker process, `timeout` seconds per call (see the module docstring)."""

    def __init__(self, references: list[str | Callable], weights: list[float] | None = None, *,
                 timeout: float = 60.0, max_failures: int = 3):
        if not references:
            raise ValueError("no reward functions given")
        if weights is not None and len(weights) != len(references):
            raise ValueError(f"{len(references)} rewards but {len(weights)} weights")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"reward_timeout must be a positive number of seconds, got {timeout}")
        if max_failures < 1:
            raise ValueError(f"max_reward_failures must be at least 1, got {max_failures}")
        self.weights = list(weights) if weights is not None else [1.0] * len(references)
        self.timeout, self.max_failures = timeout, max_failures
        custom = [r for r in references if isinstance(r, str) and not r.startswith(BUILT_IN)]
        for reference in custom:  # what can be checked without running the reward's code
            _split(reference)
        self.workers = _Workers(custom, timeout)
        loaded = dict(zip(custom, self.workers.start_one().functions)) if custom else {}  # import errors raise here
        self.rewards = []  # (name, reference, in-process function or worker index, signature)
        for reference in references:
            if reference in loaded:
                name, signature = loaded[reference]
                self.rewards.append((name, reference, custom.index(reference), signature))
            else:
                function = load_reward(reference) if isinstance(reference, str) else reference
                name = getattr(function, "__name__", str(reference))
                self.rewards.append((name, reference, function, _signature(function)))
        self.names = [name for name, *_ in self.rewards]
        self.failures = {name: 0 for name in self.names}  # failed calls in a row
        self.lock = threading.Lock()

    def __call__(self, prompts: list, completions: list, columns: dict[str, list] | None = None) -> dict[str, list]:
        """{name: scores (None where not applicable or not scored), ..., "total": weighted sum (None where a reward
        gave no result), "errors": why a sample's reward failed (None when none did)}, one entry per completion; a
        sample on which a reward raised scores 0."""
        columns = columns or {}
        for name, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(completions)} completions")
        result, errors, unscored = {}, [[] for _ in completions], set()
        for name, reference, function, signature in self.rewards:
            wanted = _wanted_columns(name, signature, columns)
            if isinstance(function, int):
                outcome = self._score_in_worker(name, reference, function, prompts, completions, wanted)
            else:
                outcome = _score(name, function, prompts, completions, wanted)
            if isinstance(outcome, str):  # the call was abandoned; why
                unscored.update(range(len(completions)))
                result[name] = [None] * len(completions)
                for e in errors:
                    e.append(f"{name}: {outcome}")
                continue
            result[name], sample_errors, batch_error = outcome
            self._report(name, reference, batch_error, sample_errors, errors)
        result["total"] = [
            None if i in unscored else sum(w * s for w, s in zip(self.weights, scores) if s is not None)
            for i, scores in enumerate(zip(*(result[n] for n in self.names)))
        ]
        result["errors"] = ["; ".join(e) or None for e in errors]
        return result

    def close(self) -> None:
        """Stop the worker processes (also done when the object is collected or the interpreter exits)."""
        self.workers.close()

    def _score_in_worker(self, name, reference, index, prompts, completions, columns):
        """(scores, sample errors, batch error) from the worker, or why the call was abandoned."""
        try:
            request = pickle.dumps((index, prompts, completions, columns), pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            raise RewardError(f"reward {name}: cannot send the batch to its worker process ({error!r}); prompts, "
                              "completions and dataset columns must be picklable") from None
        worker = self.workers.acquire()
        start = time.monotonic()
        try:
            reply = worker.call(request, start + self.timeout)
        except Exception as error:  # no reply in time, or the worker died (or broke the channel)
            if isinstance(error, TimeoutError):
                why = f"no result within {self.timeout:g} s"
            else:
                try:
                    why = f"its worker process ended (exit code {worker.process.wait(1)})"
                except subprocess.TimeoutExpired:
                    why = f"its worker process broke the channel ({error!r})"
            worker.kill()
            logger.warning("reward %r (%s): %s on %d completions; the call is abandoned (its worker process and "
                           "what it started are killed) and its samples get no reward", name, reference, why,
                           len(completions))
            self._count(name, reference, why)
            return why
        self.workers.release(worker)
        if reply[0] == "error":
            raise RewardError(reply[1])
        return reply[1:]

    def _report(self, name, reference, batch_error, sample_errors, errors) -> None:
        """Log the call's failures, record them per sample, and count a call on which every sample failed."""
        if batch_error is not None:
            logger.warning("reward %s failed on the batch (%s); scoring sample by sample", name, batch_error)
        for i, error in enumerate(sample_errors):
            if error is not None:
                logger.warning("reward %s failed on sample %d (scored 0): %s", name, i, error)
                errors[i].append(f"{name}: {error}")
        if sample_errors and all(e is not None for e in sample_errors):
            self._count(name, reference, f"every sample raised (last: {sample_errors[-1]})")
        else:
            with self.lock:
                self.failures[name] = 0

    def _count(self, name: str, reference, why: str) -> None:
        with self.lock:
            self.failures[name] += 1
            count = self.failures[name]
        if count >= self.max_failures:
            where = f" ({reference})" if isinstance(reference, str) else ""
            raise RewardError(
                f"reward {name!r}{where} failed {count} calls in a row (last: {why}); stopping. Fix the reward, or "
                f"raise reward_timeout (now {self.timeout:g} s) or max_reward_failures (now {self.max_failures})")
        logger.warning("reward %r: %d of max_reward_failures=%d failed calls in a row", name, count,
                       self.max_failures)


def _score(name, function, prompts, completions, columns) -> tuple[list, list, str | None]:
    """(scores, per-sample errors, batch error): the batch in one call, else sample by sample (a sample that raises
    scores 0 and has its error). Exits raised by the reward become a `RewardError` naming it (a KeyboardInterrupt
    on the main thread stays one: it may be the user's Ctrl-C)."""
    errors, batch_error = [None] * len(completions), None
    try:
        try:
            scores = _call(function, prompts, completions, columns)
        except Exception as error:  # find the samples that fail, score them 0, keep the rest
            batch_error, scores = repr(error), []
            for i in range(len(completions)):
                row = {k: v[i : i + 1] for k, v in columns.items()}
                try:
                    scores.extend(_as_list(name, _call(function, prompts[i : i + 1], completions[i : i + 1], row), 1))
                except Exception as sample_error:
                    errors[i] = repr(sample_error)
                    scores.append(0.0)
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as error:
        if isinstance(error, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            raise  # the user's Ctrl-C: signals reach the main thread only
        raise RewardError(f"reward {name} raised {_describe(error)} while scoring; a reward must return scores, "
                          "not exit") from None
    return _validated(name, scores, len(completions)), errors, batch_error


def _call(function, prompts, completions, columns):
    out = function(prompts, completions, **columns)
    if inspect.isawaitable(out):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(_awaited(out))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside an event loop
            return pool.submit(asyncio.run, _awaited(out)).result()
    return out


async def _awaited(awaitable):
    return await awaitable


def _signature(function) -> tuple[list[str], list[str], bool]:
    """(the columns it names, those without a default, whether it takes **kwargs), from its parameters after
    (prompts, completions)."""
    parameters = list(inspect.signature(function).parameters.values())[2:]
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind is p.VAR_KEYWORD for p in parameters))


def _wanted_columns(name: str, signature, columns: dict) -> dict:
    """The columns to pass: every one if the function takes **kwargs, else those it names; missing ones raise."""
    named, required, takes_all = signature
    missing = [n for n in required if n not in columns]
    if missing:
        raise ValueError(f"reward {name} needs column(s) {missing}; the dataset has {sorted(columns)}")
    return columns if takes_all else {n: columns[n] for n in named if n in columns}


def _as_list(name: str, scores, count: int):
    """A NumPy array or torch tensor of scores as a list; anything else as it is."""
    if hasattr(scores, "ndim") and hasattr(scores, "tolist"):
        if scores.ndim != 1:
            raise RewardError(f"reward {name} returned an array of shape {tuple(scores.shape)} for {count} "
                              "completions; return one score per completion")
        return scores.tolist()
    return scores


def _validated(name: str, scores, count: int) -> list[float | None]:
    scores = _as_list(name, scores, count)
    if not isinstance(scores, (list, tuple)) or len(scores) != count:
        size = len(scores) if hasattr(scores, "__len__") else type(scores).__name__
        raise RewardError(f"reward {name} returned {size} scores for {count} completions; return one per completion")
    checked = []
    for i, score in enumerate(scores):
        if getattr(score, "ndim", None) == 0 and hasattr(score, "item"):  # np.float32(1.0), torch.tensor(1.0)
            score = score.item()
        if score is None:
            checked.append(None)
        elif isinstance(score, (int, float)) and score == score:  # NaN != NaN
            checked.append(float(score))
        else:
            raise RewardError(f"reward {name} returned {score!r} for sample {i}; scores must be numbers or None")
    return checked


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _import_failed(reference: str, error: BaseException) -> str:
    return f"reward {reference!r}: importing {reference.rpartition(':')[0]!r} raised {_describe(error)}"


class _Worker:
    """One `python -m dlm_rl.reward_functions` process holding the custom rewards, spoken to in length-prefixed
    pickles over its stdin and stdout with a deadline on every exchange."""

    def __init__(self, references: list[str], timeout: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dlm_rl.reward_functions", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        os.set_blocking(self.process.stdin.fileno(), False)
        limit = max(timeout, IMPORT_TIMEOUT)
        try:
            reply = self.call(pickle.dumps(references), time.monotonic() + limit)
        except (TimeoutError, EOFError, OSError) as error:
            self.kill()
            why = f"did not finish within {limit:g} s" if isinstance(error, TimeoutError) else "ended its process"
            raise RewardError(f"rewards {references}: importing them {why}") from None
        if reply[0] == "error":
            self.kill()
            kind, message = reply[1:]
            raise {"ValueError": ValueError, "ImportError": ImportError}.get(kind, RewardError)(message)
        self.functions = reply[1]  # (name, signature) per reference

    def call(self, request: bytes, deadline: float):
        """Send a pickled request and return the unpickled reply; TimeoutError after `deadline` (monotonic), EOFError
        or OSError when the worker died."""
        view = memoryview(struct.pack("<Q", len(request)) + request)
        stdin, stdout = self.process.stdin.fileno(), self.process.stdout.fileno()
        while view:
            _wait(stdin, select.POLLOUT, deadline)
            view = view[os.write(stdin, view) :]
        (size,) = struct.unpack("<Q", _read(stdout, 8, deadline))
        return pickle.loads(_read(stdout, size, deadline))

    def kill(self) -> None:
        """Kill every process the worker started, then the worker, and reap it. The worker is a child subreaper,
        so what its processes left behind (in sessions of their own too) stays among its descendants while it
        lives."""
        for _ in range(100):  # until a round finds none: a forking process left more as it died
            try:
                descendants = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.Error:
                break
            if not descendants:
                break
            for process in descendants:
                try:
                    process.kill()
                except psutil.Error:
                    pass
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


def _wait(fd: int, event: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, event)
    if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
        raise TimeoutError


def _read(fd: int, size: int, deadline: float) -> bytes:
    chunks, left = [], size
    while left:
        _wait(fd, select.POLLIN, deadline)
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Workers:
    """Idle workers of one `Rewards`, one per concurrent call (the rollout engine scores chunks in threads)."""

    def __init__(self, references: list[str], timeout: float):
        self.references, self.timeout = references, timeout
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.finalizer = weakref.finalize(self, _kill_all, self.idle)

    def start_one(self) -> _Worker:
        worker = _Worker(self.references, self.timeout)
        self.release(worker)
        return worker

    def acquire(self) -> _Worker:
        while True:
            with self.lock:
                worker = self.idle.pop() if self.idle else None
            if worker is None:
                return _Worker(self.references, self.timeout)
            if worker.process.poll() is None:
                return worker
            worker.kill()  # died between calls (with the thread that started it): start another

    def release(self, worker: _Worker) -> None:
        with self.lock:
            self.idle.append(worker)

    def close(self) -> None:
        self.finalizer()


def _kill_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().kill()


def _serve(parent: int) -> None:
    """The worker: imports the references it is sent, then answers (index, prompts, completions, columns) requests
    with ("ok", scores, sample errors, batch error) or ("error", message)."""
    try:  # die with the process that started us, even while a reward spins; adopt what our processes leave
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent:
        return
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # reward code that reads stdin or prints cannot touch the channel
    os.dup2(2, 1)
    references, functions = _receive(requests) or [], []
    try:
        for reference in references:
            functions.append(load_reward(reference))
    except BaseException as error:  # a KeyboardInterrupt too: nobody presses Ctrl-C in this process
        message = str(error) if isinstance(error, Exception) else _import_failed(reference, error)
        _reply(replies, ("error", type(error).__name__, message))
        return
    names = [getattr(f, "__name__", r) for f, r in zip(functions, references)]
    _reply(replies, ("ready", [(n, _signature(f)) for n, f in zip(names, functions)]))
    while (request := _receive(requests)) is not None:
        index, prompts, completions, columns = request
        try:
            _reply(replies, ("ok", *_score(names[index], functions[index], prompts, completions, columns)))
        except RewardError as error:
            _reply(replies, ("error", str(error)))
        except BaseException as error:  # KeyboardInterrupt too: nobody presses Ctrl-C in this process
            _reply(replies, ("error", f"reward {names[index]} raised {_describe(error)} while scoring"))


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    return pickle.loads(stream.read(struct.unpack("<Q", header)[0]))


def _reply(stream, message) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


if __name__ == "__main__":
    import dlm_rl.reward_functions as module  # the worker's RewardError is the one load_reward raises

    module._serve(int(sys.argv[1]))
