"""Hostile programs against the code reward (issue 25): they cannot reach the judge's tests, expected values or
verdicts, cannot read the host, stay within limits of their own sandbox without touching their neighbours, and
leave nothing behind however they try. docs/security.md lists these cases."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from rewards import sandbox
from rewards.code import pass_rate, score
from rewards.sandbox import Limits, fully_isolated

pytestmark = [
    pytest.mark.skipif(not fully_isolated(),
                       reason="bubblewrap does not work here: the sandbox holds limits only (docs/security.md)"),
    pytest.mark.alone,  # they look for any sandbox's processes and files left on the machine
]

FAST = Limits(seconds=3.0)
SQUARES = ["assert f(2) == 4", "assert f(3) == 9", "assert f(-1) == 1", "assert f(5) == 25"]
CHECK = "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {x * x}\n" for x in (2, 3, -1, 5))
# The same through a builtin, as HumanEval's float tests are written: `abs(candidate(x) - y) < 1e-6`.
SHADOWED_TESTS = [f"assert abs(f({x}) - {x * x}) < 1e-9" for x in (2, 3, -1, 5)]
SHADOWED_CHECK = "def check(candidate):\n" + "".join(f"    {t.replace('f(', 'candidate(')}\n" for t in SHADOWED_TESTS)
HONEST_ONE = "def f(x):\n    return 4 if x == 2 else 0\n"  # passes the first of SQUARES: 0.25 honestly

# ---- 1. nothing of the judge is within reach ---------------------------------------------------------------

# Reads every regular file in its directory (three levels down) and in each parent directory, the world-writable
# directories, and every /proc entry it may open (command lines, environments, open files, memory), and answers
# from any test text it finds: the old harness's tests.txt sat in its working directory.
SCANNER = r'''
import os, re, stat
FOUND = {}
PATTERN = re.compile(rb"(?:f|candidate)\((-?\d+)\) == (-?\d+)")
def scan(path, size=1 << 20):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # not the pipes it talks over: it would only cut its own line
                for arg, want in PATTERN.findall(os.read(fd, size)):
                    FOUND[int(arg)] = int(want)
        finally:
            os.close(fd)
    except OSError:
        pass
def files(top, depth):
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            scan(entry.path)
        elif depth and entry.is_dir(follow_symlinks=False):
            files(entry.path, depth - 1)
here = os.getcwd()
files(here, 3)
while here != os.path.dirname(here):
    here = os.path.dirname(here)
    files(here, 0)
for top in ("/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt"):
    files(top, 2)
for pid in filter(str.isdigit, os.listdir("/proc")):
    for name in ("cmdline", "environ"):
        scan(f"/proc/{pid}/{name}")
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            scan(f"/proc/{pid}/fd/{fd}")
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if "r" in line.split()[1] and end - start < 1 << 26:
                    try:
                        mem.seek(start)
                        for arg, want in PATTERN.findall(mem.read(end - start)):
                            FOUND[int(arg)] = int(want)
                    except (OSError, ValueError, OverflowError):
                        pass
    except OSError:
        pass
def f(x):
    return FOUND.get(x, 0)
'''


@pytest.mark.parametrize("mode", ["asserts", "check"])
def test_a_program_that_searches_everything_it_can_open_for_its_tests_finds_only_its_own_text(mode):
    """Was 1.0: the tests sat in the program's own working directory. The comment proves the search works: it
    finds that one in its own memory, and so passes that one test."""
    program = SCANNER + "# f(5) == 25\n"
    if mode == "asserts":
        assert score(program, SQUARES, limits=FAST) == 0.25
    else:
        assert score(program, CHECK, "f", limits=FAST) == 0.0


# Each passes the first test honestly and tries to have the others counted too.
FORGERS = {
    # Was 1.0: a background process waits for the first passed line in results.txt, takes its nonce and appends a
    # line for every test while slow answers keep the harness waiting.
    "nonce taken from the results file": r'''
import os, time
if os.fork() == 0:
    end = time.time() + 6
    while time.time() < end:
        for d in (os.getcwd(), "/tmp", "/mnt", "/work"):
            try:
                words = open(os.path.join(d, "results.txt")).read().split()
            except OSError:
                continue
            if words:
                with open(os.path.join(d, "results.txt"), "a") as out:
                    out.write("".join(f"{words[0]} {i}\n" for i in range(8)) + f"{words[0]} check\n")
                os._exit(0)
        time.sleep(0.002)
    os._exit(0)
def f(x):
    if x != 2:
        time.sleep(0.4)
    return 4 if x == 2 else 0
''',
    "verdict lines printed, written to every descriptor and to files": r'''
import os, sys
LINES = "".join(f"{n} value {n * n}\n{n} value True\n" for n in range(1, 40))
LINES += "('ok', [True, True, True, True])\n[True, True, True, True]\n4 passed, 0 failed\nOK\n"
print(LINES); print(LINES, file=sys.stderr)
for fd in range(0, 256):
    try:
        os.write(fd, LINES.encode())
    except OSError:
        pass
for d in (os.getcwd(), "/tmp", "/dev/shm", "..", "/"):
    for name in ("results.txt", "verdicts.txt", "tests.txt"):
        try:
            open(os.path.join(d, name), "w").write(LINES)
        except OSError:
            pass
def f(x):
    return 4 if x == 2 else 0
''',
    "exit status 0 right after the honest pass": """
import os
def f(x):
    if x != 2:
        os._exit(0)
    return 4
""",
    "SystemExit raised in the function": """
def f(x):
    if x != 2:
        raise SystemExit(0)
    return 4
""",
    "builtins and the interpreter patched": r'''
import builtins, marshal, os, sys
builtins.AssertionError = type("AssertionError", (Exception,), {})
builtins.isinstance = lambda *a: True
builtins.ascii = lambda value: "True"
sys.exit = os._exit = lambda *a: None
marshal.loads = lambda data: (1, ("call", "f", (2,), {}))
def f(x):
    return 4 if x == 2 else 0
''',
    # Was 1.0: a function the program defined stood in for the builtin the tests use.
    "builtins the tests use shadowed": "def abs(x):\n    return 0\n" + HONEST_ONE,
    "an object equal to everything": (
        "class Any:\n    def __eq__(self, other): return True\n    def __repr__(self): return '4'\n"
        "def f(x):\n    return 4 if x == 2 else Any()\n"
    ),
    "its own calls read ahead and answered early": r'''
import os, threading
def steal():
    for fd in range(3, 64):
        try:
            os.read(fd, 1 << 16)
            os.write(fd, b"2 value 9\n3 value 1\n4 value 25\n")
        except OSError:
            pass
threading.Thread(target=steal, daemon=True).start()
def f(x):
    return 4 if x == 2 else 0
''',
}


@pytest.mark.parametrize("name", list(FORGERS))
def test_forged_verdicts_earn_nothing_beyond_the_honest_pass(name):
    tests = SHADOWED_TESTS if "shadowed" in name else SQUARES
    assert score(FORGERS[name], tests, limits=FAST) <= 0.25


@pytest.mark.parametrize("name", list(FORGERS))
def test_forged_verdicts_pass_no_check_program(name):
    check = SHADOWED_CHECK if "shadowed" in name else CHECK
    assert score(FORGERS[name] + "def check(candidate):\n    pass\n", check, "f", limits=FAST) == 0.0


# ---- 2. nothing of the host is within reach ----------------------------------------------------------------


@pytest.mark.parametrize("parent", ["/var/lib", "/opt"])
def test_a_world_readable_host_file_outside_tmp_cannot_be_read(parent):
    """Was 1.0: the whole host was visible read-only."""
    planted = tempfile.mkdtemp(prefix="dlm-rl-planted-", dir=parent)
    try:
        os.chmod(planted, 0o755)
        path = os.path.join(planted, "answer.txt")
        with open(path, "w") as f:
            f.write("the answer is 42")
        os.chmod(path, 0o644)
        code = f"def f():\n    try:\n        return open({path!r}).read()\n    except OSError:\n        return None\n"
        assert score(code, ["assert f() == 'the answer is 42'"], limits=FAST) == 0.0
    finally:
        shutil.rmtree(planted)


def test_the_sandbox_sees_the_interpreter_an_empty_directory_and_its_own_processes_only():
    """Was 0.0 on each: host paths visible, the harness's files in the working directory."""
    host = ["/etc/passwd", "/etc/hostname", "/home", "/root", "/opt", "/srv", "/var", "/boot", "/mnt", "/run",
            "/usr/share", "/usr/bin/bwrap", "/bin/sh", "/sys/class", os.path.abspath(__file__), sys.executable]
    code = (
        "import os\n"
        f"def hidden():\n    return [p for p in {host!r} if os.path.lexists(p)]\n"
        "def work():\n    return os.listdir('.')\n"
        "def processes():\n    return len([p for p in os.listdir('/proc') if p.isdigit()])\n"
    )
    tests = ["assert hidden() == []", "assert work() == []", "assert processes() <= 3"]
    assert score(code, tests, limits=FAST) == 1.0


# ---- 3. limits per sandbox, and sandboxes apart --------------------------------------------------------------

LIMITS = {
    # Was 1.0: RLIMIT_NPROC counted the one user every sandbox ran as (64 processes).
    "ten processes": ("""
import os, time
def f():
    n = 0
    for _ in range(10):
        try:
            if os.fork() == 0:
                time.sleep(60)
            n += 1
        except OSError:
            break
    return n
""", "assert f() >= 10"),
    # Was 1.0: the address-space limit held per process (1 GB each).
    "more than memory_mb across processes": ("""
import os, time
def hold():
    got, blocks = 0, []
    try:
        while got < 400:
            block = bytearray(50 << 20)
            block[::4096] = b"x" * len(range(0, 50 << 20, 4096))  # touched, not only mapped
            blocks.append(block)
            got += 50
    except MemoryError:
        pass
    return got, blocks
def f():
    total = 0
    for _ in range(6):
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            got, blocks = hold()
            os.write(w, str(got).encode().ljust(8))
            time.sleep(60)
        total += int(os.read(r, 8))
    return total
""", "assert f() > 1024"),
    # Was 1.0: memory that no address-space limit counts: System V shared memory (it outlives detaching) ...
    "more than memory_mb in System V shared memory": ("""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def f():
    total = 0
    for _ in range(12):
        segment = libc.shmget(0, 100 << 20, 0o1600)
        address = libc.shmat(segment, None, 0) if segment >= 0 else None
        if address in (None, 2 ** 64 - 1):
            break
        ctypes.memset(address, 1, 100 << 20)
        libc.shmdt(ctypes.c_void_p(address))
        total += 100
    return total
""", "assert f() > 1024"),
    # ... and memfd files, in three processes.
    "more than memory_mb in memfd files": ("""
import os, time
def hold():
    fds = []
    try:
        for _ in range(40):
            fd = os.memfd_create("m")
            os.write(fd, b"x" * (15 << 20))
            fds.append(fd)
    except OSError:
        pass
    return fds
def f():
    total = 0
    for _ in range(3):
        r, w = os.pipe()
        if os.fork() == 0:
            fds = hold()
            os.write(w, str(15 * len(fds)).encode().ljust(8))
            time.sleep(60)
        total += int(os.read(r, 8))
    return total
""", "assert f() > 1024"),
    # Was 1.0: the file-size limit held per file (16 MB each), on the host's disk.
    "more than disk_mb across files": ("""
import os
def f():
    total = 0
    for d in (".", "/tmp", "/dev/shm"):
        for i in range(24):
            try:
                with open(f"{d}/fill{i}", "wb") as out:
                    out.write(b"x" * (4 << 20))
                total += 4 << 20
            except OSError:
                break
    return total
""", "assert f() >= 64 << 20"),
}


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_limit_holds_for_the_sandbox_as_a_whole(name):
    code, test = LIMITS[name]
    assert score(code, [test], limits=FAST) == 0.0


def test_the_wall_clock_limit_ends_a_program_that_never_answers():
    start = time.monotonic()
    assert score("def f(x):\n    while True:\n        pass\n", SQUARES, limits=Limits(seconds=2.0)) == 0.0
    assert time.monotonic() - start < 2.0 + 3.0


HOSTILE_NEIGHBOURS = [
    """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""",
    """
import os, time
for _ in range(3):  # several processes, each taking all the memory it can
    try:
        os.fork()
    except OSError:
        pass
blocks = []
while True:
    try:
        block = bytearray(16 << 20)
        block[::4096] = b"x" * len(range(0, 16 << 20, 4096))
        blocks.append(block)
    except MemoryError:
        time.sleep(0.01)
""",
    """
import os
i = 0
while True:  # fills every writable place, then keeps trying
    for d in (".", "/tmp", "/dev/shm"):
        i += 1
        try:
            with open(f"{d}/fill{i}", "wb") as out:
                out.write(os.urandom(1 << 20))
        except OSError:
            pass
""",
]


@pytest.mark.parametrize("round", range(3))
def test_a_batch_with_a_fork_bomb_a_memory_bomb_and_a_disk_filler_scores_every_correct_program_1(round):
    """Was 4 to 6 of 7 correct programs zeroed: all sandboxes shared one uid's process limit."""
    correct = "def f(x):\n    return x * x\n"
    programs = HOSTILE_NEIGHBOURS + [correct] * 7
    scores = pass_rate(None, programs, tests=[SQUARES] * len(programs))
    assert scores == [0.0] * 3 + [1.0] * 7


def test_a_program_that_signals_every_process_it_can_see_harms_no_neighbour():
    killer = """
import os, signal, time
end = time.time() + 2
while time.time() < end:
    for pid in [-1, *range(1, 4096)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""
    correct = "import time\ndef f(x):\n    time.sleep(0.2)\n    return x * x\n"
    scores = pass_rate(None, [killer, killer] + [correct] * 6, tests=[SQUARES] * 8)
    assert scores == [0.0] * 2 + [1.0] * 6


def test_the_log_says_once_which_limits_hold_and_by_what(caplog):
    sandbox._find_setup.cache_clear()
    with caplog.at_level(logging.INFO, logger="rewards.sandbox"):
        for _ in range(2):
            assert score("def f(x):\n    return x * x\n", SQUARES, limits=FAST) == 1.0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("code sandbox: bubblewrap")]
    assert len(said) == 1
    expected = ["RLIMIT_AS", "RLIMIT_NPROC", "tmpfs", "seccomp", "wall clock", "cgroups"]
    for what in expected + (["uid of its own"] if os.geteuid() == 0 else []):
        assert what in said[0], what


# ---- 4. cleanup: never raises, leaves nothing ---------------------------------------------------------------

DAEMON = """
import subprocess, sys
daemon = "import time\\nout = open('held', 'w')\\nwhile True:\\n    out.write('x')\\n    time.sleep(0.01)  # 7654321"
subprocess.Popen([sys.executable, "-c", daemon], start_new_session=True)  # holds a file open, keeps writing
"""
DEEP = """
import os
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
"""
DEBRIS = {
    # Was a RecursionError out of score() and the sandbox directory left in the host's /tmp.
    "3000-deep tree": DEEP + "open('leaf', 'w').write('x')\n",
    "chmod 000 directories": """
import os
os.makedirs("a/b/c")
open("a/b/c/f", "w").write("x")
for d in ("a/b/c", "a/b", "a", "."):
    os.chmod(d, 0)
""",
    "fifos": "import os\nos.mkfifo('pipe')\nos.mkfifo('/tmp/pipe')\nfd = os.open('pipe', os.O_RDWR)\n",
    "a daemon holding files open": DAEMON,
    "all of them": "import os\nos.mkfifo('pipe')\nos.makedirs('a/b')\nos.chmod('a/b', 0)\n" + DEEP + DAEMON
    + "os.chmod('.', 0)\n",
}


@pytest.mark.parametrize("name", list(DEBRIS))
def test_cleanup_never_raises_and_leaves_nothing_on_the_host(name):
    before = set(os.listdir(tempfile.gettempdir()))
    assert score(DEBRIS[name] + "def f(x):\n    return 0\n", SQUARES, limits=FAST) == 0.0
    assert set(os.listdir(tempfile.gettempdir())) - before == set()
    assert _stray() == []
    with open("/proc/self/mountinfo") as mounts:
        assert sandbox.STATE + "/" not in mounts.read()


def test_without_bubblewrap_cleanup_and_limits_still_hold():
    """The fallback (no working bubblewrap): a host directory as the work directory, removed whatever was built in
    it, the daemon killed, and, as root, a uid of its own."""
    setup = dict(sandbox._setup(), bwrap=None)
    correct = sandbox.in_harness("rewards.code:_judge", ("def f(x):\n    return x * x\n", {"asserts": SQUARES}), FAST,
                                 setup=setup)
    assert correct == [True] * 4
    before = set(os.listdir(tempfile.gettempdir()))
    program = DEBRIS["all of them"] + "def f(x):\n    return os.getuid()\n"
    uid = f"f(0) >= {sandbox.UID_BASE}" if os.geteuid() == 0 else f"f(0) == {os.getuid()}"  # as root, never root
    verdicts = sandbox.in_harness("rewards.code:_judge", (program, {"asserts": [f"assert {uid}"]}), FAST, setup=setup)
    assert verdicts == [True]
    assert set(os.listdir(tempfile.gettempdir())) - before == set()
    assert _stray() == []


def test_a_bubblewrap_that_fails_stops_scoring_unless_limits_only_are_accepted(monkeypatch, caplog):
    """Failing closed: a broken bubblewrap is an error naming the way out, not a silent fall back to no isolation."""
    directory = tempfile.mkdtemp()  # the sandbox's uid runs it: not under pytest's private tmp_path
    os.chmod(directory, 0o755)
    broken = os.path.join(directory, "bwrap")
    with open(broken, "w") as f:
        f.write("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    os.chmod(broken, 0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: broken if name == "bwrap" else None)
    monkeypatch.delenv(sandbox.UNISOLATED_ENV, raising=False)
    sandbox._find_setup.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=f"(?s)uid map: Permission denied.*{sandbox.UNISOLATED_ENV}=1"):
            sandbox._setup()
        assert not fully_isolated()
        monkeypatch.setenv(sandbox.UNISOLATED_ENV, "1")
        with caplog.at_level(logging.WARNING, logger="rewards.sandbox"):
            assert sandbox._setup()["bwrap"] is None
        assert "running with limits only" in caplog.text
    finally:
        sandbox._find_setup.cache_clear()
        shutil.rmtree(directory)


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero():
    """A failure of the judge's own (here an interpreter that is gone) must not read as a wrong program: an RL run
    would learn from those zeros."""
    setup = dict(sandbox._setup(), python="/nonexistent/python3")
    with pytest.raises(RuntimeError, match="a sandbox ended before its program ran"):
        sandbox.in_harness("rewards.code:_judge", ("def f(x):\n    return x * x\n", {"asserts": SQUARES}), FAST,
                           setup=setup)


def test_sandbox_uids_are_held_only_while_their_sandbox_runs():
    """As root each sandbox takes a uid from a pool of UID_POOL, and gives it back when it ends: idle harnesses
    hold none, so no number of processes scoring at once can run the pool dry between jobs."""
    if os.geteuid() != 0:
        pytest.skip("sandboxes take uids only as root")
    import fcntl

    assert pass_rate(None, ["def f(x):\n    return x * x\n"] * 4, tests=[SQUARES] * 4) == [1.0] * 4
    held = []
    fd = os.open(f"{sandbox.STATE}/uids.lock", os.O_RDWR)
    try:
        for slot in range(sandbox.UID_POOL):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            except OSError:
                held.append(slot)
    finally:
        os.close(fd)  # closing releases this process's locks
    assert held == []


def test_the_fallback_cleanup_removes_a_tree_built_to_resist_as_an_unprivileged_user():
    """Run as `nobody`, so unreadable directories really are unreadable; links out of the tree are not followed."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become nobody")
    base = tempfile.mkdtemp(prefix="dlm-rl-remove-")
    try:
        os.chmod(base, 0o755)
        outside, home = os.path.join(base, "outside"), os.path.join(base, "home")
        os.mkdir(outside)
        with open(os.path.join(outside, "keep"), "w") as f:
            f.write("precious")
        os.mkdir(home)
        shutil.chown(home, "nobody")
        top = os.path.join(home, "tree")
        build = f"""
import os, sys
sys.setrecursionlimit(100)
os.mkdir(sys.argv[1])
os.chdir(sys.argv[1])
os.symlink(sys.argv[2], "link")
os.mkfifo("fifo")
os.makedirs("a/b")
os.chmod("a/b", 0)
os.chmod("a", 0)
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
os.symlink(sys.argv[2], "deep-link")
os.chdir(sys.argv[1])
os.chmod("d", 0)
sys.path.insert(0, {base!r})
from sandbox_copy import _remove_tree
_remove_tree(sys.argv[1])
"""
        shutil.copy(sandbox.__file__, os.path.join(base, "sandbox_copy.py"))  # the checkout may be unreadable to nobody
        python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-I", "-c", build,
                        top, outside], check=True)
        assert not os.path.lexists(top)
        with open(os.path.join(outside, "keep")) as f:
            assert f.read() == "precious"
    finally:
        subprocess.run(["rm", "-rf", base])  # shutil.rmtree recurses: a tree left by a failure would stop it


def _stray() -> list[str]:
    """Processes of sandbox uids, or the daemon of DEBRIS, still running."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read()
        except (OSError, StopIteration):
            continue
        if sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_POOL or b"7654321" in args:
            found.append(f"{pid} uid {uid}: {args[:80]!r}")
    return found


# ---- found by a hostile review after the design above -----------------------------------------------------------

KERNEL_MEMORY = {
    # each held about 2 GB (semaphores) or 880 MB past RLIMIT_AS (memfd_secret) of host memory while it ran
    "System V semaphores": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "made = sum(libc.semget(0, 32000, 0o1600) >= 0 for _ in range(50))\n",
    "memfd_secret": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nmade = int(libc.syscall(447, 0) >= 0)\n",
    # took the whole host's AIO quota (fs.aio-max-nr): the host's own io_setup failed
    "AIO contexts": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\ncontext = ctypes.c_ulong(0)\n"
    "made = int(libc.syscall({io_setup}, 128, ctypes.byref(context)) == 0)\n",
}


@pytest.mark.parametrize("name", list(KERNEL_MEMORY))
def test_kernel_memory_no_rlimit_counts_cannot_be_taken(name):
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the seccomp filter covers x86_64 and aarch64")
    io_setup = 206 if os.uname().machine == "x86_64" else 0
    code = KERNEL_MEMORY[name].format(io_setup=io_setup) + "def f():\n    return made\n"
    assert score(code, ["assert f() == 0"], limits=FAST) == 1.0


def test_a_program_that_breaks_its_own_server_scores_0_and_its_neighbours_are_scored():
    """Was a RuntimeError out of pass_rate for the whole batch: the names request raised outside the test."""
    broken = "globals()[0] = print\ndef f(x):\n    return x * x\n"
    patched = "import builtins\nbuiltins.callable = lambda v: 1 / 0\ndef f(x):\n    return x * x\n"
    correct = "def f(x):\n    return x * x\n"
    assert pass_rate(None, [broken, patched, correct], tests=[SQUARES] * 3) == [0.0, 0.0, 1.0]


def test_stop_iteration_from_the_program_does_not_end_a_test_early():
    """A function raising StopIteration inside the test's map() would end it silently: it was 1.0."""
    code = "def is_even(n):\n    raise StopIteration\n"
    tests = ["assert all(map(is_even, [2, 4, 6]))", "assert not any(map(is_even, [1, 3]))",
             "for got, want in zip(map(is_even, [2, 3]), [True, False]):\n    assert got == want"]
    assert score(code, tests, limits=FAST) == 0.0


def test_an_int_longer_than_4300_digits_travels_back():
    assert score("def f(n):\n    return 10 ** n\n", ["assert f(5000) == 10 ** 5000"], limits=FAST) == 1.0
