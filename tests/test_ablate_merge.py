"""scripts/ablate.py --merge: runs made by separate processes (one per core and seed) summarised as one table."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "ablate.py")


def _run(method, seed, final):
    return {"method": method, "seed": seed, "initial": 0.5, "final": final, "seconds": 10.0 * (seed + 1),
            "rollout_s_per_step": 1.0, "train_s_per_step": 2.0 + seed, "peak_rss_mb": 600}


def test_merged_outputs_give_each_methods_mean_and_standard_error_over_every_seed(tmp_path):
    first, second = tmp_path / "seed0.jsonl", tmp_path / "seed12.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in [_run("tracerl", 0, 0.6), _run("coupled", 0, 0.5)])
                     + '\n{"results": {"tracerl": {}}, "best": "tracerl"}\n')
    second.write_text("\n".join(json.dumps(r) for r in [_run("tracerl", 2, 0.8), _run("tracerl", 1, 0.7)]) + "\n")
    done = subprocess.run([sys.executable, SCRIPT, "--merge", str(first), str(second), "--plot",
                           str(tmp_path / "plot.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    tracerl = summary["results"]["tracerl"]
    assert tracerl["runs"] == pytest.approx([0.6, 0.7, 0.8]) and tracerl["seeds"] == [0, 1, 2]
    assert tracerl["mean"] == pytest.approx(0.7) and tracerl["sem"] == pytest.approx(0.1 / 3**0.5)
    assert tracerl["train_s_per_step"] == pytest.approx(3.0)
    assert summary["results"]["coupled"]["runs"] == [0.5] and summary["best"] == "tracerl"
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_merging_files_without_runs_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"results": {}}\n')
    done = subprocess.run([sys.executable, SCRIPT, "--merge", str(empty)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "no run lines" in done.stderr
