"""Checkpoints verify themselves: a truncated, bit-flipped or incomplete checkpoint is skipped by `--resume latest`
(with a warning naming it) for the newest whole one, and is an error when named; a checkpoint from before manifests
is accepted with a warning; `final/` is replaced whole or not at all."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from dlm_rl import checkpoint
from dlm_rl.checkpoint import STATE, load_checkpoint, save_checkpoint
from dlm_rl.trainers.online import PromptStream
from dlm_rl.trainers.vrpo import VRPOConfig


def _objects(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(32, 32), "prompts": PromptStream([{"prompt": str(i)} for i in range(8)], 2, 0)}


@pytest.fixture
def run(tmp_path):
    """An output_dir with checkpoints 1 and 2 of different weights; returns (config, the weights of each step)."""
    config = VRPOConfig(output_dir=str(tmp_path), save_total_limit=None)
    weights = {}
    for step in (1, 2):
        objects = _objects(seed=step)
        save_checkpoint(config, step, objects)
        weights[step] = objects["model"].weight.detach().clone()
    return config, weights


def _resume(config, resume: str) -> tuple[int, torch.Tensor]:
    config.resume = resume
    objects = _objects(seed=99)
    return load_checkpoint(config, objects), objects["model"].weight.detach()


def _state(config, step: int) -> str:
    return os.path.join(config.output_dir, f"checkpoint-{step}", STATE)


def test_a_whole_checkpoint_records_each_files_checksum_and_resumes(run):
    config, weights = run
    manifest = json.loads(open(os.path.join(config.output_dir, "checkpoint-2", checkpoint.MANIFEST)).read())
    assert sorted(manifest["files"]) == ["config.json", "state.pt"] and manifest["algorithm"] == "sha256"
    assert manifest["files"]["state.pt"]["bytes"] == os.path.getsize(_state(config, 2))
    step, weight = _resume(config, "latest")
    assert step == 2 and torch.equal(weight, weights[2])


def test_a_truncated_state_is_skipped_for_the_checkpoint_before_it(run, caplog):
    config, weights = run
    path = _state(config, 2)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    step, weight = _resume(config, "latest")
    assert step == 1 and torch.equal(weight, weights[1])
    assert f"checkpoint {config.output_dir}/checkpoint-2 is damaged (state.pt has" in caplog.text


def test_a_bit_flipped_inside_tensor_data_is_caught_not_resumed_silently(run, caplog):
    config, weights = run
    path = _state(config, 2)
    data = bytearray(open(path, "rb").read())
    start = bytes(data).find(weights[2].numpy().tobytes())
    assert start > 0
    data[start + 1000] ^= 0x10  # one bit of one weight
    open(path, "wb").write(data)
    flipped = torch.load(path, weights_only=True)["model"]["weight"]  # torch itself does not notice
    assert not torch.equal(flipped, weights[2]) and torch.isfinite(flipped).all()
    step, weight = _resume(config, "latest")
    assert step == 1 and torch.equal(weight, weights[1])
    assert "checkpoint-2 is damaged (state.pt does not match its checksum)" in caplog.text


def test_a_missing_file_is_skipped(run, caplog):
    config, weights = run
    os.remove(os.path.join(config.output_dir, "checkpoint-2", "config.json"))
    assert _resume(config, "latest")[0] == 1
    assert "checkpoint-2 is damaged (config.json is missing)" in caplog.text


def test_a_damaged_checkpoint_named_explicitly_is_an_error(run):
    config, _ = run
    with open(_state(config, 2), "r+b") as f:
        f.truncate(100)
    named = os.path.join(config.output_dir, "checkpoint-2")
    with pytest.raises(ValueError, match=f"checkpoint {named} is damaged: state.pt has 100 bytes.*--resume latest"):
        _resume(config, named)


def test_every_checkpoint_damaged_is_an_error_naming_each(run):
    config, _ = run
    for step in (1, 2):
        with open(_state(config, step), "r+b") as f:
            f.truncate(10)
    with pytest.raises(ValueError, match="no whole checkpoint in output_dir.*checkpoint-2: state.pt has 10 bytes.*"
                                         "checkpoint-1: state.pt has 10 bytes"):
        _resume(config, "latest")


def test_a_checkpoint_from_before_manifests_is_accepted_with_a_warning(run, caplog):
    """Decision: older checkpoints have no manifest; they resume (warned that they cannot be verified), and one whose
    state cannot be read is skipped by 'latest' like a damaged one."""
    config, weights = run
    for step in (1, 2):
        os.remove(os.path.join(config.output_dir, f"checkpoint-{step}", checkpoint.MANIFEST))
    step, weight = _resume(config, "latest")
    assert step == 2 and torch.equal(weight, weights[2])
    assert "checkpoint-2 has no manifest.json (saved by an earlier version)" in caplog.text
    with open(_state(config, 2), "r+b") as f:
        f.truncate(os.path.getsize(_state(config, 2)) // 2)
    assert _resume(config, "latest")[0] == 1
    assert "checkpoint-2 is damaged (it cannot be read" in caplog.text


def _write(files: dict):
    def write(directory: str) -> None:
        os.makedirs(directory)
        for name, text in files.items():
            if text is KeyboardInterrupt:
                raise KeyboardInterrupt  # a second Ctrl-C while final/ is written
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
    return write


def test_final_interrupted_while_written_keeps_the_old_one_whole(tmp_path):
    final = tmp_path / "final"
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "old", "README.md": "old"}))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new", "stop": KeyboardInterrupt}))
    assert {p.name: p.read_text() for p in final.iterdir()} == {"adapter.safetensors": "old", "README.md": "old"}
    assert sorted(os.listdir(tmp_path)) == ["final"]  # nothing half-written left beside it
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new"}))
    assert {p.name: p.read_text() for p in final.iterdir()} == {"adapter.safetensors": "new"}  # no stale README


def test_ctrl_c_during_the_swap_waits_until_final_is_whole(tmp_path, monkeypatch):
    final = tmp_path / "final"
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "old"}))
    rename = os.rename

    def interrupted(source, target):  # Ctrl-C arrives between moving the old final/ aside and the new one in
        rename(source, target)
        if target.endswith(".final.old"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new"}))
    assert (final / "adapter.safetensors").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["final"]
