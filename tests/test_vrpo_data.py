"""VRPO's data in TRL's vocabulary: pairs from `dataset_path` / `dataset_name` / `train_dataset`, checked on held-out
pairs never trained on, errors in pairs and before the model loads, `VRPOTrainer` with callbacks, and the
deprecated `dataset` / `dataset_split` keys."""

from __future__ import annotations

import json
import logging
import math

import pytest
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback

import dlm_rl.model_spec
from dlm_rl.recipe import parse_recipe
from dlm_rl.trainers import vrpo
from dlm_rl.trainers.vrpo import VRPOConfig, VRPOTrainer, load_data, run

PAIRS = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(12)]
TINY = dict(model="tiny", gen_length=4, n_t=2, lora_r=4, report_to="none")


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what it checks must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(dlm_rl.model_spec, "resolve_model", refuse)


def test_too_few_pairs_are_counted_in_pairs_when_the_recipe_is_parsed(tmp_path, no_model):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS[:5])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer: vrpo\nmodel: tiny\ndataset_path: {path}\ngen_length: 4\neval_size: 1\n")
    with pytest.raises(ValueError, match=r"16 pairs per step \(prompts_per_step\) but the dataset has only 4 "
                                         "training pairs"):
        parse_recipe(str(recipe))
    with pytest.raises(ValueError, match=f"dataset {path}: 5 pairs, not more than eval_size 128, and no split 'test'"):
        VRPOConfig(dataset_path=path, gen_length=4)
    trainer = VRPOTrainer(args=VRPOConfig(**TINY, output_dir=str(tmp_path / "run")), train_dataset=PAIRS[:5],
                          eval_dataset=PAIRS[5:6])
    with pytest.raises(ValueError, match=r"16 pairs per step \(prompts_per_step\) but the dataset has only 5 "
                                         "training pairs"):  # a train_dataset: when it is read, before the model
        trainer.train()


def test_a_pairs_file_trains_and_is_checked_on_held_out_pairs_it_never_trains_on(tmp_path, monkeypatch):
    trained, checked, score = [], [], vrpo.held_out_pairs

    class Recorded(vrpo.PromptStream):
        def next(self):
            batch = super().next()
            trained.extend(batch)
            return batch

    def recorded(model, rows, *args):
        checked.append(rows)
        return score(model, rows, *args)

    monkeypatch.setattr(vrpo, "PromptStream", Recorded)
    monkeypatch.setattr(vrpo, "held_out_pairs", recorded)
    config = VRPOConfig(**TINY, dataset_path=_jsonl(tmp_path / "pairs.jsonl", PAIRS), eval_size=4,
                        prompts_per_step=4, max_steps=2, eval_steps=1, learning_rate=0.05,
                        output_dir=str(tmp_path / "run"))
    run(config)
    lines = _metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert lines[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # θ = ref: every score exactly 0
    assert lines[0]["eval/implicit_accuracy"] == 0 and lines[0]["eval/score_mean"] == 0
    assert lines[2]["eval/loss"] != lines[0]["eval/loss"] and 0 <= lines[2]["eval/implicit_accuracy"] <= 1
    assert "eval/greedy_accuracy" not in lines[2]
    assert len(checked) == 3 and all(rows == checked[0] for rows in checked) and len(checked[0]) == 4
    assert len(trained) == 8 and not {r["prompt"] for r in trained} & {r["prompt"] for r in checked[0]}
    assert {r["prompt"] for r in trained} | {r["prompt"] for r in checked[0]} == {r["prompt"] for r in PAIRS}


def test_a_test_split_gives_the_held_out_pairs_and_the_prompt_keys_shape_them(tmp_path):
    DatasetDict({"train_prefs": Dataset.from_list(PAIRS[:8]), "test_prefs": Dataset.from_list(PAIRS[8:])}
                ).save_to_disk(str(tmp_path / "saved"))
    config = VRPOConfig(dataset_path=str(tmp_path / "saved"), dataset_train_split="train_prefs",
                        dataset_test_split="test_prefs", eval_size=3, prompts_per_step=8, gen_length=4,
                        prompt_template="Q: {prompt}", system_prompt="Add.")
    data = load_data(config)
    assert len(data.train) == 8 and [r["chosen"] for r in data.held_out] == ["9", "10", "11"]
    for row in (data.train[0], data.held_out[0]):
        assert row["prompt"][0] == {"role": "system", "content": "Add."}
        assert row["prompt"][1]["content"].startswith("Q: ") and row["prompt"][1]["content"].endswith("+1=")
    prompts = load_data(VRPOConfig(dataset_path=_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]), eval_size=2, gen_length=4,
        prompts_per_step=2))
    assert not isinstance(prompts, vrpo.PairData) and len(prompts.train) == 10  # prompts: pairs built on-policy
    with pytest.raises(ValueError, match="rollout_actors samples on-policy pairs"):
        VRPOConfig(dataset_path=str(tmp_path / "saved"), dataset_train_split="train_prefs", gen_length=4,
                   rollout_actors=1)


def test_vrpo_trainer_on_a_dataset_of_pairs_with_a_callback(tmp_path):
    class Recorder(TrainerCallback):
        events = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.events.append("begin")

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.events.append(("log", state.global_step, logs["pairs"]))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.events.append(("evaluate", state.global_step, sorted(metrics)))

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

        def on_train_end(self, args, state, control, **kwargs):
            self.events.append("end")

    config = VRPOConfig(**TINY, max_steps=4, eval_steps=2, prompts_per_step=3, output_dir=str(tmp_path / "run"))
    trainer = VRPOTrainer(model="tiny", args=config, train_dataset=Dataset.from_list(PAIRS[:9]),
                          eval_dataset=PAIRS[9:], callbacks=[Recorder()])
    line = trainer.train()
    assert line["step"] == 2 and line["pairs"] == 3  # the callback stopped it after step 2 of 4
    assert Recorder.events == ["begin", ("log", 1, 3),
                               ("evaluate", 2, ["eval/implicit_accuracy", "eval/loss", "eval/score_mean"]),
                               ("log", 2, 3), "end"]
    assert (tmp_path / "run" / "final").is_dir()


def test_a_run_that_never_steps_writes_no_final_model(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no step")

    monkeypatch.setattr(vrpo, "_update", fail)
    with pytest.raises(RuntimeError, match="no step"):
        VRPOTrainer(args=VRPOConfig(**TINY, eval_size=2, prompts_per_step=2, output_dir=str(tmp_path / "run")),
                    train_dataset=PAIRS).train()
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "final").exists()


def test_conversations_for_a_tokenizer_without_a_chat_template_fail_before_any_check(tmp_path, no_model):
    turns = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
             for r in PAIRS]
    path = _jsonl(tmp_path / "chat.jsonl", turns)
    for keys in (dict(dataset_path=path), dict(train_dataset=PAIRS, system_prompt="Add.")):
        config = VRPOConfig(**TINY, eval_size=2, prompts_per_step=2, output_dir=str(tmp_path / "run"),
                            **{k: v for k, v in keys.items() if k != "train_dataset"})
        with pytest.raises(ValueError, match="prompts are conversations .* no chat template"):
            run(config, train_dataset=keys.get("train_dataset"))
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_on_policy_conversations_for_a_tokenizer_without_a_chat_template_fail_before_any_check(tmp_path):
    config = VRPOConfig(model="tiny", chat=True, train_size=4, eval_size=2, prompts_per_step=2, num_generations=2,
                        lora_r=4, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="no chat template"):
        run(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_dataset_and_dataset_split_are_deprecated_names_of_the_dataset_keys(tmp_path, caplog):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with caplog.at_level(logging.WARNING):
        local = VRPOConfig(dataset=path, task="addition3", gen_length=4, eval_size=2, prompts_per_step=2)
        hub = VRPOConfig(dataset="HuggingFaceH4/ultrafeedback_binarized", dataset_split="train_prefs", gen_length=8)
    assert (local.dataset_path, local.dataset_name, local.dataset, local.task) == (path, None, None, None)
    assert (hub.dataset_name, hub.dataset_train_split, hub.dataset, hub.dataset_split) == (
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None, None)
    assert "`dataset` is deprecated" in caplog.text and "`dataset_split` is deprecated" in caplog.text
    assert "task 'addition3' chose the held-out check" in caplog.text
    with pytest.raises(ValueError, match="old name of dataset_path and dataset_name"):
        VRPOConfig(dataset=path, dataset_name="gsm8k", gen_length=4)
