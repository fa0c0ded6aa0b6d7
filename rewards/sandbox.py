"""Run untrusted Python in a throw-away sandbox, failing closed.

Layers, strongest first (which are active is logged once):
- bubblewrap, when `bwrap` works here: the whole host file system read-only, private tmpfs over the
  world-writable directories (/tmp, /var/tmp, /run/lock, /dev/shm), the work directory at /mnt as the only
  writable host path, no network, its own pid/ipc/uts namespaces; as root the program then runs as an
  unprivileged user, so root-only files cannot be read and the process-count limit applies;
- else namespaces, when running as root with `unshare`: the same without the read-only root (the private
  tmpfs and the unprivileged user keep host files safe);
- always: a fresh temporary directory as working directory, `python -I` (no environment variables, no user
  site), a minimal environment (nothing of ours leaks in), its own session killed as a whole, rlimits (address
  space, CPU seconds, file size, open files, processes), a wall-clock timeout, and output read up to a cap.
Whether a program did its job is never judged here; callers read a result the trusted harness writes.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

logger = logging.getLogger(__name__)

UNPRIVILEGED = 65534  # nobody


@dataclass(frozen=True)
class Limits:
    seconds: float = 5.0
    """Wall-clock limit; CPU time is limited to the same (rounded up)."""
    memory_mb: int = 1024
    file_mb: int = 16
    """Largest file the program may write, its captured output included."""
    processes: int = 64
    open_files: int = 64
    output_bytes: int = 1 << 16
    """Bytes of stdout / stderr kept."""


@dataclass
class Outcome:
    returncode: int | None  # None when the wall-clock limit killed it
    stdout: str
    stderr: str
    files: dict[str, str]  # the requested result files, as written by the program (missing = absent)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_python(
    source: str,
    *,
    stdin: str = "",
    files: dict[str, str] | None = None,
    read_back: tuple[str, ...] = (),
    limits: Limits = Limits(),
) -> Outcome:
    """Run `source` as `main.py` in a fresh directory that also holds `files`; return what it printed and the
    contents of the `read_back` files it left there."""
    workdir = tempfile.mkdtemp(prefix="dlm-rl-sandbox-")
    try:
        for name, text in {"main.py": source, **(files or {})}.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        if _isolation()[0] and os.geteuid() == 0:  # it will run as the unprivileged user: let it own its directory
            for entry in [workdir, *(os.path.join(workdir, n) for n in os.listdir(workdir))]:
                os.chown(entry, UNPRIVILEGED, UNPRIVILEGED)
        os.chmod(workdir, 0o700)
        command = _command(workdir)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                start_new_session=True,
                preexec_fn=functools.partial(_set_limits, limits),
            )
            try:
                process.communicate(stdin.encode(), timeout=limits.seconds)
                returncode = process.returncode
            except subprocess.TimeoutExpired:
                returncode = None
            except BrokenPipeError:  # it exited without reading its input
                returncode = process.wait(timeout=limits.seconds)
            finally:
                _kill_session(process)
            stdout, stderr = (_head(f, limits.output_bytes) for f in (out, err))
        found = {}
        for name in read_back:
            path = os.path.join(workdir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found[name] = _head_path(path, limits.output_bytes)
        return Outcome(returncode, stdout, stderr, found)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _set_limits(limits: Limits) -> None:
    """In the child, before exec: resource limits (inherited by everything it starts)."""
    seconds = int(limits.seconds) + 1
    for which, value in (
        (resource.RLIMIT_CPU, seconds),
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.file_mb << 20),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_NPROC, limits.processes),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _head(f, size: int) -> str:
    f.seek(0)
    return f.read(size).decode(errors="replace")


def _head_path(path: str, size: int) -> str:
    with open(path, "rb") as f:
        return f.read(size).decode(errors="replace")


# Run as root inside fresh namespaces: expose the work directory at /mnt, cover every world-writable host
# directory with a private tmpfs, then drop to the unprivileged user and start Python.
_ENTER = """set -e
mount --bind "$1" /mnt
for d in /tmp /var/tmp /run/lock /dev/shm; do
  if [ -d "$d" ]; then mount -t tmpfs -o size=16m,mode=1777 tmpfs "$d"; fi
done
cd /mnt
shift
exec "$@"
"""


_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")


@functools.cache
def _isolation() -> tuple[str, tuple[str, ...], str]:
    """(layer name, command prefix taking the work directory as its next argument, python) for the strongest
    isolation that works here; the layer is "" when only the always-on limits apply.

    The unprivileged user must be able to run the interpreter: ours if it can, else the system python3 (the
    harness needs only the standard library). Says once in the log which layers are active.
    """
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv")
    drop = (setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups", "--") if root else ()
    candidates = []
    bwrap = shutil.which("bwrap")
    if bwrap and (setpriv or not root):
        tmpfs = [arg for d in _PRIVATE_DIRS if os.path.isdir(d) for arg in ("--tmpfs", d)]
        prefix = (
            bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *tmpfs,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--new-session", "--chdir", "/mnt", "--bind",
        )  # the work directory and `/mnt` follow
        candidates.append(("bubblewrap (read-only host, no network, own pids, private tmp)", prefix, ("/mnt",)))
    unshare = shutil.which("unshare")
    if root and unshare and setpriv:
        prefix = (unshare, "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", _ENTER,
                  "sandbox")
        candidates.append(("namespaces (no network, own pids, private tmp)", prefix, ()))
    # Ours may be out of reach (a venv under /tmp is hidden by the private tmpfs): then the system python3.
    system = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.isfile(p)), None)
    for layer, prefix, after in candidates:
        for python in dict.fromkeys(p for p in (sys.executable, system) if p):
            command = (*prefix, tempfile.gettempdir(), *after, *drop)
            if subprocess.run([*command, python, "-I", "-c", "pass"], capture_output=True).returncode == 0:
                user = ", unprivileged user" if root else ""
                logger.info(
                    "sandbox layers: %s%s, rlimits, wall-clock timeout, fresh directory, minimal environment "
                    "(python: %s)", layer, user, python
                )
                return layer, (*prefix, "{workdir}", *after, *drop), python
    logger.warning(
        "sandbox: neither bubblewrap nor namespaces work here (install bubblewrap, or run as root with unshare and "
        "setpriv); untrusted code runs with rlimits, a timeout, a fresh directory and a minimal environment only: "
        "host files and the network are reachable"
    )
    return "", (), sys.executable


def active_layer() -> str:
    """The isolation layer in use: "bubblewrap ...", "namespaces ..." or "" (limits only)."""
    return _isolation()[0]


def fully_isolated() -> bool:
    """True when bubblewrap or namespaces are active, with the unprivileged user when we are root."""
    return bool(_isolation()[0])


def _command(workdir: str) -> list[str]:
    """The command that runs main.py in `workdir`."""
    _, prefix, python = _isolation()
    return [workdir if arg == "{workdir}" else arg for arg in prefix] + [python, "-I", "main.py"]
