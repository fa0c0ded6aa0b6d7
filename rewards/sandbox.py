"""Run untrusted Python where it can reach nothing of the judge, within limits of its own, failing closed.

Three kinds of process take part (docs/security.md: the threat model, each layer and limit, what a host without
each layer loses):
- the judge (training, evaluation) works out once how sandboxes start on this host, then hands jobs to
- harnesses (`in_harness`): `python -I -S` processes outside any sandbox, each serving one job at a time and
  reused. Only a harness holds a job's tests and expected values: it starts sandboxes, talks to them over pipes
  it owns, computes the verdicts, and before answering kills and reaps everything they started (it is their
  child subreaper);
- sandboxes (`Sandbox`): `python -I -S` under bubblewrap in their own user, pid, mount, network, IPC and UTS
  namespaces, unable to make more user namespaces. A sandbox sees the interpreter, its standard library and the
  shared libraries they load (read-only), an empty size-capped tmpfs at /work (also its /tmp and /dev/shm), a
  minimal /dev and its own /proc: nothing else of the host. As root, each concurrent sandbox runs as a uid of
  its own from a pool.
Limits per sandbox (`Limits`): wall clock (the harness kills it), memory (RLIMIT_AS per process times the
process count, which RLIMIT_NPROC caps in the sandbox's own user namespace), bytes written (the tmpfs size), CPU
seconds and open files per process. cgroups are not used. Without a working bubblewrap nothing runs unless the
user accepts, by UNISOLATED_ENV, a sandbox of limits, a fresh directory and (as root) a uid only. The log says once
which layers hold.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import errno
import functools
import logging
import math
import os
import re
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STATE = "/run/dlm-rl-sandbox"
"""As root: the uid pool's lock file, and the mount point of each sandbox's tmpfs (mounted in a private mount
namespace, so never visible on the host)."""
UID_BASE, UID_POOL = 2_000_000_000, 1 << 16
"""As root, concurrent sandboxes run as distinct uids UID_BASE + i, i < UID_POOL: these must be unused here."""
UNISOLATED_ENV = "DLM_RL_SANDBOX_UNISOLATED"
"""Set to 1 to run programs without bubblewrap where it is absent or fails (limits only; docs/security.md)."""
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory holding `rewards`
_INODES = 8192  # files and directories a sandbox may create (each costs kernel memory)

# Linux constants (Python 3.11's os module has neither unshare nor mount)
CLONE_NEWNS, MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x20000, 2, 4, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
# Kernel memory no rlimit counts: System V shared memory, message queues and semaphores, memfd and memfd_secret
# files, keys (kept per uid, beyond the sandbox's life), and asynchronous I/O contexts (a quota the whole host
# shares). A seccomp filter makes these calls fail in the sandbox, as it does every call of another ABI (i386,
# x32), through which they could be made too. By machine: (its AUDIT_ARCH, shmget, msgget, semget, memfd_create,
# memfd_secret, add_key, request_key, keyctl, io_setup).
_BLOCKED = {"x86_64": (0xC000003E, 29, 68, 64, 319, 447, 248, 249, 250, 206),
            "aarch64": (0xC00000B7, 194, 186, 190, 279, 447, 217, 218, 219, 0)}


@dataclass(frozen=True)
class Limits:
    seconds: float = 5.0
    """Wall clock for the sandbox's whole job (restarts included); also each process's CPU seconds."""
    memory_mb: int = 1024
    """Address space of all the sandbox's processes together: each may map memory_mb // processes."""
    processes: int = 4
    """Processes and threads the program may run at once, its own interpreter included."""
    disk_mb: int = 16
    """Bytes it may write, all files together (the size of its tmpfs)."""
    open_files: int = 64
    output_bytes: int = 1 << 16
    """Bytes of standard output kept from a program judged on its output."""


# ---- the judge's side ----------------------------------------------------------------------------------------


def in_harness(entry: str, request, limits: Limits = Limits(), runs: int = 1, setup: dict | None = None):
    """`entry(request, limits, start)` run in a harness, where `start(script, program, deadline)` starts a
    `Sandbox`; returns its result (a plain value), or None when the job overran `runs` wall-clock limits (the
    harness is then killed, and its sandboxes with it). `setup` (a probe's) gets a harness of its own."""
    harness = _Harness(setup) if setup else _borrow()
    answer = harness.run(ascii((entry, request, dataclasses.asdict(limits))), runs * limits.seconds + 10)
    if answer is None or answer[0] != "ok" or setup:
        harness.kill()
    else:
        with _pool_lock:
            _idle.append(harness)
    if answer is None:
        logger.warning("code sandbox: a job of %s overran its time; its harness was killed, no test passes", entry)
        return None
    if answer[0] != "ok":
        raise RuntimeError(f"code sandbox: the harness running {entry} failed:\n{answer[1]}")
    return answer[1]


class _Harness:
    """A harness process: a request line in, an answer line out, one job at a time."""

    def __init__(self, setup: dict):
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, _PROJECT, ascii(setup)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        )
        self.channel = _Channel(self.process)

    def run(self, request: str, seconds: float) -> tuple | None:
        """("ok", result) or ("error", why); None when `seconds` passed first."""
        deadline = time.monotonic() + seconds
        line = self.channel.exchange(request.encode() + b"\n", 1 << 30, deadline)
        if line is not None:
            return ast.literal_eval(line.decode())
        if time.monotonic() >= deadline:
            return None
        self.process.wait()
        self.errors.seek(0)
        return "error", f"it exited ({self.process.returncode}): {self.errors.read().decode(errors='replace')[-3000:]}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.channel.close()
        self.errors.close()


_idle: list[_Harness] = []
_pool_lock = threading.Lock()


def _borrow() -> _Harness:
    setup = _setup()
    with _pool_lock:
        while _idle:
            harness = _idle.pop()
            if harness.process.poll() is None:
                return harness
    return _Harness(setup)


@atexit.register
def _close_idle() -> None:
    """Idle harnesses end when their input closes."""
    with _pool_lock:
        for harness in _idle:
            harness.channel.close()
            harness.process.wait()


def active_layer() -> str:
    """What isolates sandboxes here: "bubblewrap ..." or "" (none: limits only, or no sandbox at all)."""
    return _describe(_setup()) if fully_isolated() else ""


def fully_isolated() -> bool:
    """True when bubblewrap isolates the sandboxes (and, as root, each runs as a uid of its own)."""
    try:
        return bool(_setup()["bwrap"])
    except RuntimeError:
        return False


_setup_lock = threading.Lock()


def _setup() -> dict:
    with _setup_lock:  # pool threads ask at once on first use
        return _find_setup()


def _forget_pool() -> None:
    """In a forked child: the parent's harnesses (and locks another thread may have held) are the parent's."""
    global _idle, _pool_lock, _setup_lock
    _idle, _pool_lock, _setup_lock = [], threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


@functools.cache
def _find_setup() -> dict:
    """How sandboxes start here: bubblewrap with our interpreter, else with the system's; logs once what is
    enforced by what. Without a working bubblewrap, an error unless UNISOLATED_ENV accepts limits only."""
    root = os.geteuid() == 0
    if root:
        os.makedirs(f"{STATE}/mnt", exist_ok=True)
        for path in (STATE, f"{STATE}/mnt"):
            os.chmod(path, 0o755)  # the sandbox uids pass through to their tmpfs
    bwrap = shutil.which("bwrap")
    pythons = dict.fromkeys(  # the sandbox's uid may not reach ours (a pyenv under /root): then the system's
        os.path.realpath(p)
        for p in (getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3", "/usr/local/bin/python3")
        if os.path.isfile(p)
    )
    problems = []
    for isolate in ([True, False] if bwrap else [False]):
        if not isolate and os.environ.get(UNISOLATED_ENV) != "1":
            why = "does not work here:\n" + "\n".join(problems) if bwrap else "is not installed (apt install bubblewrap)"
            raise RuntimeError(
                f"code sandbox: bubblewrap {why}\nPrograms are not run without it. Set {UNISOLATED_ENV}=1 to run "
                "them with limits only, able to read the host's files and reach its network (docs/security.md)."
            )
        for python in pythons:
            setup = {"root": root, "python": python, "bwrap": _bwrap_view(bwrap, python) if isolate else None,
                     "tmpfs_size": isolate and "--size" in _output([bwrap, "--help"])}
            for seconds in (10, 30):  # a probe that ran out of time gets another, longer, on a busy host
                try:
                    answer = in_harness("rewards.sandbox:_probe", None, Limits(seconds=seconds), setup=setup)
                except RuntimeError as error:
                    answer = str(error)
                if answer is not None:
                    break
            if answer == "ok":
                if not isolate:
                    logger.warning("code sandbox: bubblewrap does not work here (%s), running with limits only as "
                                   "%s=1 asks", "; ".join(problems) or "absent", UNISOLATED_ENV)
                logger.info("code sandbox: %s", _describe(setup))
                return setup
            problems.append(f"{'bubblewrap' if isolate else 'no isolation'} with {python}: {str(answer)[-400:].strip()}")
    raise RuntimeError("code sandbox: no way to run a program here:\n" + "\n".join(problems))


def _bwrap_view(bwrap: str, python: str) -> list[str]:
    """bubblewrap's arguments up to the writable directories: fresh namespaces; read-only the interpreter, its
    standard library (without site-packages) and the shared libraries they load; a minimal /dev; its own /proc."""
    stdlib, dynload = _output([python, "-I", "-S", "-c", _PATHS]).split("\n")[:2]
    binaries = [python, *(os.path.join(dynload, n) for n in sorted(os.listdir(dynload))
                          if n.endswith(".so") and n.split(".")[0] not in _LEFT_OUT)]
    libraries = sorted(set(re.findall(r"(/\S+) \(0x", _output(["ldd", *binaries]))))
    args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv"]
    for path in [python, stdlib, *libraries]:
        args += ["--ro-bind", path, path]
    site = os.path.join(stdlib, "site-packages")
    if os.path.isdir(site):
        args += ["--tmpfs", site, "--remount-ro", site]
    return args + ["--dev", "/dev", "--proc", "/proc"]


# Extension modules whose libraries stay out of the view (each bind costs start-up time): terminals, displays,
# NIS and dbm files, none of which a judged program has.
_LEFT_OUT = {"_curses", "_curses_panel", "readline", "_tkinter", "nis", "_dbm", "_gdbm"}
_PATHS = "import sysconfig; print(sysconfig.get_path('stdlib')); print(sysconfig.get_config_var('DESTSHARED'))"


def _output(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True).stdout


def _describe(setup: dict) -> str:
    if setup["bwrap"]:
        writes = ("one size-capped tmpfs in a private mount namespace" if setup["root"] else
                  "size-capped tmpfs mounts (/work, /tmp, /dev/shm each)" if setup["tmpfs_size"] else
                  "UNCAPPED tmpfs mounts (this bubblewrap has no --size)")
        return (
            "bubblewrap (own user/pid/mount/net/ipc/uts namespaces, no nested user namespaces; sees "
            f"{setup['python']}, its standard library and shared libraries read-only, an empty /work, a minimal "
            f"/dev, its own /proc){'; a uid of its own per sandbox' if setup['root'] else ''}; memory: RLIMIT_AS "
            "memory_mb/processes per process x RLIMIT_NPROC processes (counted in its own user namespace); "
            f"bytes written: {writes}; no System V shared memory, message queues or memfd files (seccomp"
            f"{'' if _seccomp_filter(os.uname().machine) else ': NOT on this machine'}); wall clock: killed by the "
            "harness; CPU seconds and open files: rlimits per process; cgroups: not used"
        )
    return (
        f"NOT ISOLATED: {setup['python']} runs with rlimits (address space, CPU, file size, open files"
        f"{', processes per uid' if setup['root'] else ''}), a fresh directory and a minimal environment, "
        f"{'as a uid of its own' if setup['root'] else 'as this user'}: host files and the network are reachable, "
        "memory is capped per process only and writes per file only; install bubblewrap"
    )


# ---- the harness's side --------------------------------------------------------------------------------------

_BOOT = "import sys; sys.path.append(sys.argv[1]); from rewards.sandbox import _harness_main; _harness_main(sys.argv[2])"


def _harness_main(setup: str) -> None:
    """A harness: answers each request line `(entry, request, limits)` on stdin with a line
    `("ok", entry(request, limits, start))` or `("error", traceback)` on stdout, until stdin closes."""
    import importlib
    import traceback

    setup = ast.literal_eval(setup)
    sys.set_int_max_str_digits(0)  # answers are at most 64 KB: a long int parses in milliseconds
    answers, sys.stdout = sys.stdout, open(os.devnull, "w")  # a test that prints must not garble the answers
    libc = _libc()
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no process of our uid may read our memory or trace us
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # what a sandbox leaves running becomes our child
    uids = _Uids() if setup["root"] else None
    for line in sys.stdin:
        entry, request, limits = ast.literal_eval(line)
        module, name = entry.split(":")
        limits = Limits(**limits)
        try:
            function = getattr(importlib.import_module(module), name)
            answer = ("ok", function(request, limits, functools.partial(Sandbox, setup, uids, limits)))
        except Exception:
            answer = ("error", traceback.format_exc())
        answers.write(ascii(answer) + "\n")
        answers.flush()


def _probe(request, limits: Limits, start) -> str:
    """Harness entry: what a sandbox prints of a trivial program (with bubblewrap's complaints, if any)."""
    sandbox = start("print(PROGRAM, end='')", "ok", time.monotonic() + limits.seconds, merge_stderr=True)
    try:
        return (sandbox.exchange(b"", 4096, to_end=True) or b"").decode(errors="replace").removeprefix("ready\n")
    finally:
        sandbox.close()


class _Uids:
    """As root: the pool of sandbox uids that every harness on this host shares, one byte of a lock file each."""

    def __init__(self):
        self.fd = os.open(f"{STATE}/uids.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def take(self, deadline: float) -> int:
        """A uid no other sandbox here is using, until `give_back`; waits for one until `deadline`."""
        import fcntl

        first = int.from_bytes(os.urandom(4), "big")
        while True:
            for i in range(UID_POOL):
                slot = (first + i) % UID_POOL
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                    return UID_BASE + slot
                except OSError:
                    continue
            if time.monotonic() >= deadline:
                raise RuntimeError(f"code sandbox: all {UID_POOL} sandbox uids stayed in use")
            time.sleep(0.05)

    def give_back(self, uid: int) -> None:
        import fcntl

        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, uid - UID_BASE)


class Sandbox:
    """`script` (trusted code) run by `python -I -S` in a fresh sandbox, with the untrusted `program` given to it
    as the string PROGRAM; the sandbox's stdin and stdout are pipes to us. Only a harness makes these: starting
    one forks with a hook that runs Python, which a threaded process must not do."""

    def __init__(self, setup: dict, uids: _Uids | None, limits: Limits, script: str, program: str, deadline: float,
                 merge_stderr: bool = False):
        self.deadline, self.uids = deadline, uids
        self.uid = uid = uids.take(deadline) if uids else None  # given back once all its processes are gone
        self.workdir = None if setup["bwrap"] else tempfile.mkdtemp(prefix="dlm-rl-sandbox-")
        home = self.workdir or "/work"
        source = os.memfd_create("program")  # read once by the prelude; never a file the program could rewrite
        try:
            os.write(source, program.encode(errors="replace"))
            os.lseek(source, 0, os.SEEK_SET)
            if self.workdir and uid is not None:
                os.chown(self.workdir, uid, uid)
            # In its own user namespace the process limit counts this sandbox alone (bubblewrap's init included);
            # as root without one, its uid.
            processes = limits.processes + 1 if setup["bwrap"] else limits.processes if uid is not None else 0
            self.process = subprocess.Popen(
                [*(_bwrap_command(setup, uid, limits) if setup["bwrap"] else ()),
                 setup["python"], "-I", "-S", "-c", _PRELUDE + script, str(source), str(processes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge_stderr else subprocess.DEVNULL,
                pass_fds=(source,),
                cwd=self.workdir,
                env={"HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
                preexec_fn=functools.partial(_enter, setup, uid, limits),
            )
        except BaseException:
            _end_all()
            if self.workdir:
                _remove_tree(self.workdir)
            if uid is not None:
                uids.give_back(uid)
            raise
        finally:
            os.close(source)
        self.channel = _Channel(self.process)

    def started(self) -> bool:
        """Whether the sandbox's interpreter came up (its first line) before the deadline. RuntimeError when the
        sandbox ended first: bubblewrap or the interpreter failed before any of the program ran, a failure of the
        judge's, not a wrong program."""
        if self.exchange(b"", 64) == b"ready":
            return True
        if time.monotonic() >= self.deadline and self.process.poll() is None:
            return False
        raise RuntimeError(f"code sandbox: a sandbox ended before its program ran (exit status {self.process.wait()})")

    def exchange(self, data: bytes, cap: int, *, to_end: bool = False) -> bytes | None:
        """`_Channel.exchange` by the sandbox's deadline."""
        return self.channel.exchange(data, cap, self.deadline, to_end=to_end)

    def close(self, wait: bool = False) -> int | None:
        """Kill the sandbox and everything it started, and free what it held. Returns its exit status if it had
        ended by itself (with `wait`: by its deadline), else None."""
        if wait:
            try:
                self.process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        status = self.process.poll()
        self.process.kill()
        self.process.wait()
        self.channel.close()
        _end_all()
        if self.workdir:
            _remove_tree(self.workdir)
        if self.uid is not None:
            self.uids.give_back(self.uid)
        return status


class _Channel:
    """Writes to a child's stdin and reads from its stdout, by a deadline."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.buffer = process, b""
        os.set_blocking(process.stdin.fileno(), False)

    def exchange(self, data: bytes, cap: int, deadline: float, *, to_end: bool = False) -> bytes | None:
        """Send `data` and read the answer: the next line (without its newline) or, with `to_end`, all the child
        writes until it closes its output (its input is closed once `data` is sent). None if the child closed
        its output first, `deadline` passed, or it wrote more than `cap` bytes."""
        stdin, out, pending = self.process.stdin, self.process.stdout.fileno(), data
        if to_end and not pending:
            stdin.close()
        with selectors.DefaultSelector() as selector:  # not select(): descriptors past 1024 in a busy judge
            selector.register(out, selectors.EVENT_READ)
            if pending:
                selector.register(stdin, selectors.EVENT_WRITE)
            while True:
                if not to_end and b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    return line if len(line) <= cap else None
                left = deadline - time.monotonic()
                if len(self.buffer) > cap or left <= 0:
                    return None
                for key, _ in selector.select(left):
                    if key.fd == out:
                        chunk = os.read(out, 1 << 16)
                        if not chunk:
                            return self.buffer if to_end and len(self.buffer) <= cap else None
                        self.buffer += chunk
                        continue
                    try:
                        pending = pending[os.write(key.fd, pending[: 1 << 16]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = b""
                    if not pending:
                        selector.unregister(stdin)
                        if to_end:
                            stdin.close()

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


# In the sandbox, first: the process limit (in the sandbox's own user namespace it counts this sandbox alone),
# and the program, read from the descriptor the harness passed; nothing of either is left in argv. Then the line
# "ready" (`Sandbox.started`), before any of the program runs.
_PRELUDE = """\
import os, resource, sys
if int(sys.argv[2]):
    resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[2]), int(sys.argv[2])))
with open(int(sys.argv[1]), "rb") as _source:
    PROGRAM = _source.read().decode(errors="replace")
del sys.argv[1:], _source
os.write(1, b"ready\\n")
"""


def _bwrap_command(setup: dict, uid: int | None, limits: Limits) -> list[str]:
    """The view, then what it may write: as root, the tmpfs `_enter` mounted; else bubblewrap's own tmpfs mounts;
    then all else read-only."""
    args = list(setup["bwrap"])
    for path in ("/work", "/tmp", "/dev/shm"):
        if uid is not None:
            args += ["--bind", f"{STATE}/mnt/{os.path.basename(path)}", path]
        else:
            args += [*(["--size", str(limits.disk_mb << 20)] if setup["tmpfs_size"] else []), "--tmpfs", path]
    return args + ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/work",
                   "--setenv", "HOME", "/work", "--setenv", "LANG", "C.UTF-8"]


def _enter(setup: dict, uid: int | None, limits: Limits) -> None:
    """In the sandbox's first process, between fork and exec. As root: with bubblewrap, a private mount
    namespace holding one size-capped tmpfs for all it writes; then its own uid. Always: the per-process limits
    everything in it inherits, and death with the harness."""
    libc = _libc()
    if uid is not None:
        if setup["bwrap"]:
            _check(libc.unshare(CLONE_NEWNS))
            _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))  # our mounts never reach the host
            options = f"size={limits.disk_mb}m,nr_inodes={_INODES},mode=0700,uid={uid},gid={uid}"
            _check(libc.mount(b"tmpfs", f"{STATE}/mnt".encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()))
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if setup["bwrap"]:
            for name in ("work", "tmp", "shm"):
                os.mkdir(f"{STATE}/mnt/{name}", 0o700)
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))  # after the uid change, which clears it
    for which, value in (
        (resource.RLIMIT_AS, (limits.memory_mb // limits.processes) << 20),
        (resource.RLIMIT_CPU, math.ceil(limits.seconds) + 1),
        (resource.RLIMIT_FSIZE, limits.disk_mb << 20),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))
    program = _seccomp_filter(os.uname().machine)
    if program:
        import ctypes

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(SockFprog(len(program) // 8, program)), 0, 0))


def _seccomp_filter(machine: str) -> bytes:
    """Classic BPF for seccomp: EPERM for `_BLOCKED`'s calls and for any call of another ABI, else allow ("" on
    a machine not in `_BLOCKED`)."""
    if machine not in _BLOCKED:
        return b""
    arch, *numbers = _BLOCKED[machine]
    load, equal, at_least, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    n = len(numbers)  # below, a jump's offset counts the instructions it skips, up to the last one: EPERM
    program = [(load, 0, 0, 4), (equal, 0, n + 3, arch), (load, 0, 0, 0), (at_least, n + 1, 0, 0x40000000)]
    program += [(equal, n - i, 0, number) for i, number in enumerate(numbers)]
    program += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | errno.EPERM)]  # ALLOW; ERRNO
    return b"".join(struct.pack("=HBBI", *op) for op in program)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> None:
    if result != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _end_all() -> None:
    """Kill and reap every process under this harness. It is a child subreaper: whatever a sandbox left running
    (a daemon that left its session, a process holding files open) became its child when its parents died."""
    while True:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look at every process's parent
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(pid))
            except (OSError, ValueError, IndexError):
                pass
        return found


def _remove_tree(top: str) -> None:
    """Remove a directory a program may have built to resist (thousands of levels deep, unreadable directories,
    fifos), never following a link, never raising, with one directory open at a time."""
    fd = None
    try:
        os.chmod(top, 0o700)
        fd, names = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW), []
        while True:
            subdir = None
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    subdir = entry.name
                else:
                    os.unlink(entry.name, dir_fd=fd)
            if subdir is not None:  # down into it
                os.chmod(subdir, 0o700, dir_fd=fd)
                child = os.open(subdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(subdir)
            elif names:  # empty: up, and remove it
                parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = parent
                os.rmdir(names.pop(), dir_fd=fd)
            else:
                os.close(fd)
                fd = None
                os.rmdir(top)
                return
    except OSError as error:
        if fd is not None:
            os.close(fd)
        logger.warning("code sandbox: could not remove %s: %s", top, error)
