"""report_to: the RL trainers' metrics go to W&B (an offline run in output_dir/wandb) and Trackio (its local
database) as they go to TensorBoard, every `logging_steps` steps and at every held-out check, while metrics.jsonl
keeps every step; a resumed run continues the trackers' runs; the old `tensorboard` key still works. A new run
refuses an output_dir holding an earlier run, before any model loads, unless it resumes it or overwrites it, and an
overwrite leaves nothing of the earlier run."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys

import pytest

# metrics.jsonl holds steps 0-3; reported are 2 (logging_steps) and 0 and 3 (held-out checks).
SETTINGS = dict(model="tiny", train_size=8, eval_size=2, num_generations=2, prompts_per_step=2, lora_r=4,
                gen_length=4, max_steps=3, eval_steps=3, logging_steps=2)
REPORTED = [0, 2, 3]


def _metrics(directory) -> dict[int, dict]:
    return {line["step"]: line for line in map(json.loads, (directory / "metrics.jsonl").read_text().splitlines())}


def _numbers(line: dict) -> dict:
    """What a tracker gets of a metrics line: its finite numbers but the step."""
    return {name: value for name, value in line.items()
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


def _wandb_history(run_file: str) -> list[dict]:
    """The metrics lines of a W&B run file (`run-ID.wandb`: a header, then LevelDB-log records of 32 KiB blocks,
    each a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, position, pending, history = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return history


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def test_wandb_gets_the_reported_steps_in_an_offline_run_in_output_dir(tmp_path, offline_wandb):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    run(TraceRLConfig(output_dir=str(tmp_path / "run"), report_to=["wandb"], run_name="tiny-wandb", **SETTINGS))
    metrics = _metrics(tmp_path / "run")
    assert sorted(metrics) == [0, 1, 2, 3]
    assert not (tmp_path / "run" / "tensorboard").exists()
    (run_file,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = _wandb_history(run_file)
    assert [line["_step"] for line in history] == REPORTED
    for line in history:
        expected = _numbers(metrics[line["_step"]])
        assert {name: line[name] for name in expected} == expected
    assert "eval/greedy_accuracy" in history[0] and "reward/total" in history[1]
    text = open(run_file, "rb").read()
    assert b"tiny-wandb" in text and b"logging_steps" in text  # the run's name and config


RESUMED = """\
import sys
from dlm_rl.run_log import RunLog

directory, trackers = sys.argv[1], sys.argv[2:]
log = RunLog(directory, trackers, run_name="resumed")
for step in range(3):
    log.log({"step": step, "loss": float(step)})
log.close()
log = RunLog(directory, trackers, run_name="resumed", resume_step=1)  # killed after step 2, resumed from 1
for step in (2, 3):
    log.log({"step": step, "loss": 10.0 + step})
log.close()
"""


def test_a_resumed_run_continues_the_trackers_runs_from_the_first_step_they_do_not_have(tmp_path, offline_wandb):
    """In a child process: Trackio reads TRACKIO_DIR when it is imported."""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", RESUMED, str(tmp_path / "run"), "wandb", "trackio"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(line["step"], line["loss"]) for line in _metrics(tmp_path / "run").values()] == [
        (0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]
    runs = sorted(glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*")))
    # one W&B run, continued: offline-run-<time>-<id>, with "-1" added when both started in the same second
    assert len(runs) == 2 and len({os.path.basename(path).split("-")[3] for path in runs}) == 1
    (first,), (second,) = (glob.glob(os.path.join(path, "run-*.wandb")) for path in runs)
    assert [(line["_step"], line["loss"]) for line in _wandb_history(first)] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert [(line["_step"], line["loss"]) for line in _wandb_history(second)] == [(3, 13.0)]
    assert _trackio_run(env, "dlm-rl", "resumed")[0] == [{"step": 0, "loss": 0.0}, {"step": 1, "loss": 1.0},
                                                         {"step": 2, "loss": 2.0}, {"step": 3, "loss": 13.0}]


def _trackio_run(env: dict, project: str, run: str) -> tuple[list[dict], dict]:
    """(the steps and metrics, the config) of the project's one Trackio run, read in a child process."""
    read = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
            "assert SQLiteStorage.get_runs(sys.argv[1]) == [sys.argv[2]]\n"
            "print(json.dumps([SQLiteStorage.get_logs(*sys.argv[1:]), SQLiteStorage.get_run_config(*sys.argv[1:])]))")
    output = subprocess.run([sys.executable, "-c", read, project, run], env=env, check=True, capture_output=True,
                            text=True, timeout=120).stdout
    logs, config = json.loads(output.splitlines()[-1])
    return [{name: value for name, value in line.items() if name != "timestamp"} for line in logs], config


def test_trackio_gets_the_reported_steps_in_its_local_database(tmp_path):
    """In a child process: Trackio reads TRACKIO_DIR when it is imported."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer: tracerl\nreport_to: [trackio]\nrun_name: tiny-trackio\nproject: dlm-rl-test\n"
                      + "".join(f"{key}: {value}\n" for key, value in SETTINGS.items())
                      + f"output_dir: {tmp_path / 'run'}\n")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "dlm_rl.cli", "train", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logs, config = _trackio_run(env, "dlm-rl-test", "tiny-trackio")
    assert (tmp_path / "trackio" / "dlm-rl-test.db").exists()
    metrics = _metrics(tmp_path / "run")
    assert [line["step"] for line in logs] == REPORTED
    for line in logs:
        expected = _numbers(metrics[line["step"]])
        assert {name: line[name] for name in expected} == expected
    assert config["logging_steps"] == 2 and config["report_to"] == ["trackio"]


def test_report_to_values_are_checked_when_the_config_is_made(monkeypatch, caplog):
    import importlib.util

    from dlm_rl.trainers.didi import DiDiConfig
    from dlm_rl.trainers.tracerl import TraceRLConfig

    assert TraceRLConfig().report_to == ["tensorboard"] and TraceRLConfig().logging_steps == 1
    assert TraceRLConfig(report_to="none").report_to == []
    assert DiDiConfig(report_to="wandb").report_to == ["wandb"]
    assert TraceRLConfig(report_to="all").report_to == ["tensorboard", "wandb", "trackio"]
    with pytest.raises(ValueError, match=r"unknown tracker 'comet'; choose among \['tensorboard', 'wandb', "):
        TraceRLConfig(report_to=["wandb", "comet"])
    with pytest.raises(ValueError, match="'all' and 'none' stand alone"):
        TraceRLConfig(report_to=["none", "wandb"])
    with pytest.raises(ValueError, match="logging_steps must be a whole number of at least 1, got 0"):
        DiDiConfig(logging_steps=0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"wandb is not installed: pip install wandb"):
        TraceRLConfig(report_to=["wandb"])
    assert TraceRLConfig(report_to="all").report_to == ["tensorboard", "trackio"]
    # The old key, for one release: false leaves TensorBoard out, with a warning.
    assert TraceRLConfig(tensorboard=False).report_to == [] and "`tensorboard` is deprecated" in caplog.text
    assert DiDiConfig(tensorboard=True, report_to="none").report_to == ["tensorboard"]


def test_a_recipe_with_the_old_tensorboard_key_still_parses(tmp_path):
    from dlm_rl.recipe import parse_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer: vrpo\nmodel: tiny\ntensorboard: false\nreport_to: [trackio, tensorboard]\n")
    assert parse_recipe(str(recipe))[1].report_to == ["trackio"]
    assert parse_recipe(str(recipe), ["--tensorboard", "true"])[1].report_to == ["tensorboard", "trackio"]
    recipe.write_text("trainer: didi\nteacher: tiny\nreport_to: wandb\nlogging_steps: 5\n")
    config = parse_recipe(str(recipe), ["--report_to", "wandb", "tensorboard"])[1]
    assert config.report_to == ["wandb", "tensorboard"] and config.logging_steps == 5


EARLIER = ["metrics.jsonl", "completions.jsonl", "tensorboard/", "checkpoint-2/", "final/", "curves.png"]


def _earlier_run(directory) -> None:
    directory.mkdir()
    for name in EARLIER:
        path = directory / name
        if name.endswith("/"):
            path.mkdir()
            (path / "old").write_text("old")
        else:
            path.write_text('{"step": 7, "old": 1}\n')


@pytest.mark.parametrize("trainer", ["tracerl", "vrpo", "didi"])
def test_a_new_run_refuses_an_output_dir_holding_an_earlier_run_before_the_model_loads(tmp_path, monkeypatch,
                                                                                        trainer):
    import importlib

    import dlm_rl.model_spec

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output_dir was refused")

    monkeypatch.setattr(dlm_rl.model_spec, "resolve_model", refuse)
    module = importlib.import_module(f"dlm_rl.trainers.{trainer}")
    config_class = getattr(module, {"tracerl": "TraceRLConfig", "vrpo": "VRPOConfig", "didi": "DiDiConfig"}[trainer])
    model = {"teacher": "tiny"} if trainer == "didi" else {"model": "tiny"}
    _earlier_run(tmp_path / "run")
    with pytest.raises(ValueError) as refused:
        module.run(config_class(output_dir=str(tmp_path / "run"), **model))
    message = str(refused.value)
    assert message.startswith(f"output_dir {tmp_path / 'run'} holds an earlier run (")
    assert all(name in message for name in EARLIER)
    assert "--resume latest to continue it" in message and "--overwrite_output_dir true" in message
    assert "another output_dir" in message
    assert sorted(os.listdir(tmp_path / "run")) == sorted(name.rstrip("/") for name in EARLIER)  # untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"holds an earlier run \(metrics.jsonl\): it saved no checkpoint to "
                                         r"--resume from; pass --overwrite_output_dir true"):
        module.run(config_class(output_dir=str(tmp_path / "other"), **model))


def test_overwrite_output_dir_deletes_the_earlier_run_first(tmp_path):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    _earlier_run(tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run(TraceRLConfig(output_dir=str(tmp_path / "run"), overwrite_output_dir=True, **SETTINGS))
    assert sorted(_metrics(tmp_path / "run")) == [0, 1, 2, 3]
    assert all(json.loads(line)["step"] in (1, 2, 3) for line in
               (tmp_path / "run" / "completions.jsonl").read_text().splitlines())
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    assert not (tmp_path / "run" / "final" / "old").exists() and (tmp_path / "run" / "final").is_dir()
    assert not (tmp_path / "run" / "tensorboard" / "old").exists()
    assert len(os.listdir(tmp_path / "run" / "tensorboard")) == 1  # this run's events only
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # not a run's record
