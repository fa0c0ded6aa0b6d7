"""Checkpoints verify themselves: a truncated, bit-flipped or incomplete checkpoint, or one with a malformed manifest,
is skipped by `--resume latest` (with a warning naming it) for the newest whole one, and is an error when named; a
checkpoint from before manifests is accepted with a warning; MDM SFT's Trainer checkpoints carry manifests too;
`final/` is replaced whole or not at all, and an old one a kill left aside is put back."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
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


@pytest.mark.parametrize("manifest", [[], {"files": [1, 2]}, {"files": {"state.pt": 3}},
                                      {"files": {"state.pt": {"bytes": "x"}}},
                                      {"files": {"state.pt": {"bytes": 10}}}])
def test_a_manifest_of_the_wrong_shape_is_damage_not_a_crash(run, caplog, manifest):
    config, weights = run
    path = os.path.join(config.output_dir, "checkpoint-2")
    with open(os.path.join(path, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert checkpoint.verify_checkpoint(path).startswith("manifest.json is malformed")
    step, weight = _resume(config, "latest")
    assert step == 1 and torch.equal(weight, weights[1])
    assert "checkpoint-2 is damaged (manifest.json is malformed" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-2 is damaged: manifest.json is malformed"):
        _resume(config, path)


@pytest.mark.parametrize("name", ["../checkpoint-1/state.pt", "sub/../../checkpoint-1/config.json",
                                  "../../etc/passwd", "/etc/passwd"])
def test_a_manifest_naming_a_path_outside_the_checkpoint_is_malformed(run, name):
    """Even when the file outside exists and matches its entry."""
    config, _ = run
    path = os.path.join(config.output_dir, "checkpoint-2")
    outside = os.path.normpath(os.path.join(path, name))
    entry = {"bytes": 0, "sha256": ""}
    if os.path.isfile(outside):
        entry = {"bytes": os.path.getsize(outside), "sha256": checkpoint.file_sha256(outside)}
    manifest = json.loads(open(os.path.join(path, checkpoint.MANIFEST)).read())
    manifest["files"][name] = entry
    with open(os.path.join(path, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)
    expected = f"manifest.json is malformed: it names {name!r}, a path outside the checkpoint"
    assert checkpoint.verify_checkpoint(path) == expected
    assert _resume(config, "latest")[0] == 1


def test_a_manifest_covers_the_files_in_subdirectories(tmp_path):
    """As a Trainer checkpoint sharded with FSDP holds them."""
    (tmp_path / "pytorch_model_fsdp_0").mkdir()
    (tmp_path / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")
    (tmp_path / "trainer_state.json").write_text("{}")
    checkpoint.write_manifest(str(tmp_path))
    files = json.loads((tmp_path / checkpoint.MANIFEST).read_text())["files"]
    assert sorted(files) == ["pytorch_model_fsdp_0/__0_0.distcp", "trainer_state.json"]
    assert checkpoint.verify_checkpoint(str(tmp_path)) is None
    (tmp_path / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard!")
    expected = "pytorch_model_fsdp_0/__0_0.distcp has 6 bytes, the manifest says 5"
    assert checkpoint.verify_checkpoint(str(tmp_path)) == expected


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


def _exchange_works(tmp_path) -> bool:
    """Whether libc, the kernel and the filesystem of `tmp_path` can exchange two directories."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    works = renameat2 is not None and renameat2(-100, bytes(tmp_path / "a"), -100, bytes(tmp_path / "b"), 2) == 0
    (tmp_path / "a").rmdir()
    (tmp_path / "b").rmdir()
    return works


def test_final_is_exchanged_with_the_new_one_in_one_step(tmp_path, monkeypatch):
    """On Linux the new final/ and the old one trade places in one `renameat2` call: there is no instant without
    final/ for a kill to fall into."""
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2 with RENAME_EXCHANGE is not available here")
    final = tmp_path / "final"
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "old", "README.md": "old"}))

    def renamed(source, target):
        raise AssertionError(f"final/ was swapped in two renames ({source} -> {target})")

    monkeypatch.setattr(os, "rename", renamed)
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new"}))
    assert {p.name: p.read_text() for p in final.iterdir()} == {"adapter.safetensors": "new"}
    assert sorted(os.listdir(tmp_path)) == ["final"]


def _without_exchange(monkeypatch):
    """`renameat2` failing as on a kernel without it."""
    def renameat2(*args):
        ctypes.set_errno(errno.ENOSYS)
        return -1
    monkeypatch.setattr(checkpoint, "_renameat2", lambda: renameat2)


def test_ctrl_c_during_the_swap_waits_until_final_is_whole(tmp_path, monkeypatch):
    """Without the exchange (ENOSYS), final/ is replaced in two renames, which Ctrl-C does not come between."""
    final = tmp_path / "final"
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "old"}))
    _without_exchange(monkeypatch)
    rename = os.rename

    def interrupted(source, target):  # Ctrl-C arrives between moving the old final/ aside and the new one in
        rename(source, target)
        if target.endswith(".final.old"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", interrupted)
    # Python's own Ctrl-C handler, whatever an earlier test or library left installed (held signals are delivered
    # to the handler that was there: an ignored SIGINT stays ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new"}))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (final / "adapter.safetensors").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["final"]


def test_an_old_final_a_kill_left_aside_is_put_back(tmp_path, caplog):
    """Without the exchange, a kill (SIGKILL, which cannot be held) between the two renames leaves the old final/ as
    .final.old and no final/: the next write_directory puts it back first, so even a write that fails leaves it."""
    final, old = tmp_path / "final", tmp_path / ".final.old"
    old.mkdir()
    (old / "adapter.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new", "stop": KeyboardInterrupt}))
    assert {p.name: p.read_text() for p in final.iterdir()} == {"adapter.safetensors": "old"}
    assert sorted(os.listdir(tmp_path)) == ["final"]
    assert f"{final} is missing and {old} is there" in caplog.text
    checkpoint.write_directory(str(final), _write({"adapter.safetensors": "new"}))
    assert (final / "adapter.safetensors").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["final"]


def test_mdm_checkpoints_carry_a_manifest_and_resume_skips_a_damaged_one(tmp_path, caplog):
    """MDM SFT saves through the transformers Trainer: each checkpoint-STEP gets a manifest of every file; `resume:
    true` skips a damaged checkpoint with a warning for the newest whole one and goes on exactly; naming the damaged
    one is an error. A checkpoint without a manifest (older) is accepted, one without trainer_state.json is not."""
    from transformers.trainer import TRAINER_STATE_NAME

    from dlm_rl.trainers.mdm import MDMConfig
    from dlm_rl.trainers.mdm import run as run_mdm

    def config(**resume):
        return MDMConfig(output_dir=str(tmp_path), dataset_name="addition3", train_size=32, tiny_hidden_size=32,
                         tiny_num_layers=2, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, use_cpu=True, seed=3, **resume)

    def losses() -> list[float]:
        state = json.loads((tmp_path / "checkpoint-4" / TRAINER_STATE_NAME).read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    run_mdm(config())
    for step in (2, 4):
        path = tmp_path / f"checkpoint-{step}"
        files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
        assert sorted(files) == sorted(str(p.relative_to(path)) for p in path.rglob("*")
                                       if p.is_file() and p.name != checkpoint.MANIFEST)
        assert {TRAINER_STATE_NAME, "optimizer.pt", "rng_state.pth"} <= files.keys()
        assert checkpoint.verify_checkpoint(str(path)) is None
    whole = losses()
    damaged = tmp_path / "checkpoint-4"
    (weights,) = [p for p in damaged.iterdir() if p.suffix == ".safetensors"]
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(data)

    with pytest.raises(ValueError, match=f"checkpoint {damaged} is damaged: {weights.name} does not match"):
        run_mdm(config(resume_from_checkpoint=str(damaged)))
    caplog.set_level(logging.WARNING)
    run_mdm(config(resume=True))
    assert f"checkpoint {damaged} is damaged ({weights.name} does not match its checksum)" in caplog.text
    assert losses() == whole and checkpoint.verify_checkpoint(str(damaged)) is None  # steps 3 and 4 again, saved

    os.remove(damaged / checkpoint.MANIFEST)
    assert checkpoint.good_checkpoint("latest", str(tmp_path), TRAINER_STATE_NAME) == str(damaged)
    os.remove(damaged / TRAINER_STATE_NAME)  # a save cut short
    assert checkpoint.good_checkpoint("latest", str(tmp_path), TRAINER_STATE_NAME) == str(tmp_path / "checkpoint-2")
