"""Testbed bookkeeping (fast) and its learning promises (slow: they train the tiny base models)."""

import pytest
import torch

from dlm_rl import testbed


def test_missing_checkpoint_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DLM_RL_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run `python scripts/build_tiny_models.py addition3`"):
        testbed.checkpoint("addition3")
    with pytest.raises(ValueError, match="unknown testbed checkpoint 'adition3'"):
        testbed.checkpoint("adition3")


def test_the_demo_base_checkpoint_ships_verified_and_needs_no_build(tmp_path, monkeypatch):
    """With an empty cache `testbed:addition3-base` is the shipped checkpoint (its recipe unchanged since it was
    built, every file matching its checksum), and it keeps the testbed's promise: room left for RL."""
    import json
    import os

    monkeypatch.setenv("DLM_RL_CACHE", str(tmp_path))
    path = testbed.checkpoint("addition3-base")
    assert os.path.dirname(path) == testbed.SHIPPED
    metrics = json.loads(open(os.path.join(path, "metrics.json")).read())
    assert testbed.targets_met(metrics) and metrics["steps"] <= testbed.CHECKPOINTS["addition3-base"].max_steps
    assert testbed.build("addition3-base")["cached"] and not os.listdir(tmp_path)  # nothing trained


def test_a_shipped_checkpoint_with_a_changed_or_extra_file_is_refused(tmp_path, monkeypatch):
    import os
    import shutil

    name = testbed.directory_name("addition3-base")
    shutil.copytree(os.path.join(testbed.SHIPPED, name), tmp_path / name)
    monkeypatch.setattr(testbed, "SHIPPED", str(tmp_path))
    assert testbed.shipped_checkpoint("addition3-base") == str(tmp_path / name)
    (tmp_path / name / "extra.bin").write_bytes(b"0")
    with pytest.raises(RuntimeError, match="does not hold exactly the files"):
        testbed.checkpoint("addition3-base")
    (tmp_path / name / "extra.bin").unlink()
    config = tmp_path / name / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 128', '"hidden_size": 129'))
    with pytest.raises(RuntimeError, match="config.json does not match its checksum"):
        testbed.checkpoint("addition3-base")


def test_cache_key_follows_the_recipe():
    spec = testbed.CHECKPOINTS["chain-base"]
    changed = testbed.Checkpoint(**{**spec.__dict__, "max_steps": spec.max_steps + 1})
    assert testbed._key(spec) != testbed._key(changed)
    assert testbed._key(spec) == testbed._key(testbed.Checkpoint(**spec.__dict__))


def test_child_key_follows_its_parents_recipe(monkeypatch):
    """A checkpoint continued from another must rebuild when the parent's recipe changes."""
    child = testbed.CHECKPOINTS["chain128-base"]
    before = testbed._key(child)
    parent = testbed.CHECKPOINTS[child.init]
    monkeypatch.setitem(testbed.CHECKPOINTS, child.init, testbed.Checkpoint(**{**parent.__dict__, "seed": 1}))
    assert testbed._key(child) != before


def test_build_waves_put_children_after_parents():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "build_tiny_models.py"
    spec = importlib.util.spec_from_file_location("build_tiny_models", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    waves = script._waves(["chain128-base", "chain-base", "code-base"], testbed.CHECKPOINTS)
    assert waves == [["chain-base", "code-base"], ["chain128-base"]]


@pytest.mark.parametrize(
    "metrics, met",
    [
        ({"purpose": "sft", "greedy_accuracy": 0.95}, True),
        ({"purpose": "sft", "greedy_accuracy": 0.85}, False),
        ({"purpose": "rl-base", "greedy_accuracy": 0.5, "pass@1": 0.4, "pass@8": 0.7}, True),
        ({"purpose": "rl-base", "greedy_accuracy": 0.5, "pass@1": 0.6, "pass@8": 0.7}, False),
        ({"purpose": "rl-base", "greedy_accuracy": 0.9, "pass@1": 0.4, "pass@8": 0.9}, False),
        ({"purpose": "rl-base", "greedy_accuracy": 0.1, "pass@1": 0.1, "pass@8": 0.5}, False),
        ({"purpose": "sft"}, None),  # a one-prompt corpus (facts) is not evaluated
    ],
)
def test_targets(metrics, met):
    assert testbed.targets_met(metrics) is met


def test_build_stops_at_target_caches_and_loads(tmp_path, monkeypatch):
    """An rl-base build stops at the first validation check that meets its target (0 here: the first check),
    saves a loadable model with its metrics, and a second call returns the cache without training."""
    from dlm_rl.model_spec import resolve_model

    monkeypatch.setenv("DLM_RL_CACHE", str(tmp_path))
    probe = testbed.Checkpoint(
        "addition3", max_steps=40, purpose="rl-base", stop_at_accuracy=0.0, check_every=10,
        batch_size=8, warmup_steps=0, train_size=64,
    )
    monkeypatch.setitem(testbed.CHECKPOINTS, "probe", probe)
    metrics = testbed.build("probe")
    assert metrics["steps"] == 10 and metrics["cached"] is False
    assert metrics["n"] == testbed.EVAL_SIZE - metrics["n_overlap_removed"]
    assert 0 <= metrics["pass@1"] <= metrics["pass@8"] <= 1
    assert metrics["environment"]["torch"] == torch.__version__ and metrics["environment"]["cpu"]
    assert testbed.build("probe") == {**metrics, "cached": True}
    model = resolve_model("testbed:probe")
    assert model.mask_token_id == 2 and model.tokenizer.decode(model.tokenizer("1+2=")["input_ids"]) == "1+2="


def test_an_unconditional_corpus_is_built_without_the_greedy_evaluation(tmp_path, monkeypatch):
    """The facts corpus has one prompt: greedy decoding would give one text 256 times, so it is not run."""
    monkeypatch.setenv("DLM_RL_CACHE", str(tmp_path))
    small = dict(batch_size=4, warmup_steps=0, train_size=16)
    monkeypatch.setitem(testbed.CHECKPOINTS, "facts-probe", testbed.Checkpoint("facts", 2, "sft", **small))
    metrics = testbed.build("facts-probe")
    assert metrics["steps"] == 2 and "greedy_accuracy" not in metrics and "environment" in metrics
    assert testbed.targets_met(metrics) is None


def test_init_starts_from_the_parents_weights(tmp_path, monkeypatch):
    """With learning rate 0 a continued checkpoint must come out with exactly its parent's weights."""
    from dlm_rl.model_spec import resolve_model

    monkeypatch.setenv("DLM_RL_CACHE", str(tmp_path))
    small = dict(batch_size=8, warmup_steps=0, train_size=64)
    monkeypatch.setitem(testbed.CHECKPOINTS, "parent", testbed.Checkpoint("addition3", 3, "sft", **small))
    child = testbed.Checkpoint("addition3", 2, "sft", learning_rate=0.0, init="parent", **small)
    monkeypatch.setitem(testbed.CHECKPOINTS, "child", child)
    testbed.build("child")  # builds the parent first
    parent, child = resolve_model("testbed:parent"), resolve_model("testbed:child")
    fresh = resolve_model("tiny")
    for (name, a), b, c in zip(parent.state_dict().items(), child.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(parent.state_dict().values(), fresh.state_dict().values()))


def test_every_task_fits_its_canvas():
    from dlm_rl.data.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    for name, task in testbed.TASKS.items():
        rows = task.dataset("train", 300, seed=0)
        longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in rows["completion"])
        assert longest + 1 <= task.response_length, f"{name}: {longest} tokens + EOS > {task.response_length}"


def test_chain_is_long_content():
    """Its answers write out their steps: at least 24 content tokens before the final \\boxed{} (not padding)."""
    from dlm_rl.data.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    rows = testbed.TASKS["chain"].dataset("test", 256, seed=1)
    content = [len(tokenizer(c.split("\\boxed{")[0], add_special_tokens=False)["input_ids"])
               for c in rows["completion"]]
    assert min(content) >= 24


@pytest.mark.slow
@pytest.mark.parametrize("name", testbed.STANDARD_CHECKPOINTS)  # the facts teacher is judged by eval_distill.py
def test_checkpoint_meets_its_target(name, tmp_path, monkeypatch):
    """Builds from scratch (≈ 5–15 CPU-minutes each): 'sft' ≥ 90% held-out, 'rl-base' 20–85% with pass@8 − pass@1
    ≥ 15 points."""
    monkeypatch.setenv("DLM_RL_CACHE", str(tmp_path))
    metrics = testbed.build(name)
    assert testbed.targets_met(metrics), metrics
