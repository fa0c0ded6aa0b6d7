"""Bring your own data: TRL's dataset keys for the online trainers (`dlm_rl.data.sources`), prompt templates and
system prompts, conversational rows, and the TRL-shaped `TraceRLTrainer` with a Python reward and callbacks."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback

from dlm_rl.data.sources import DatasetArguments, load_prompts
from dlm_rl.recipe import parse_recipe
from dlm_rl.trainers.tracerl import TraceRLConfig, TraceRLTrainer, run
from hub_checkpoints import write_checkpoint

MATH_ROWS = [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "level": i % 3} for i in range(30)]
TINY = dict(gen_length=8, max_steps=2, prompts_per_step=2, num_generations=2, eval_size=4, eval_steps=1)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_local_file_without_a_test_split_holds_out_eval_size_rows_that_training_never_sees(tmp_path, caplog):
    args = DatasetArguments(dataset_path=_jsonl(tmp_path / "math.jsonl", MATH_ROWS), eval_size=5)
    with caplog.at_level(logging.INFO):
        data = load_prompts(args, seed=0)
    assert "no split 'test': 5 of its rows are held out" in caplog.text
    assert len(data.held_out) == 5 and len(data.train) == 25
    assert not {r["prompt"] for r in data.train} & set(data.held_out["prompt"])
    assert data.scorer == "rewards.math:accuracy" and data.response_length is None
    assert data.train[0]["level"] in (0, 1, 2)  # other columns travel to the rewards
    assert load_prompts(args, seed=0).held_out["prompt"] == data.held_out["prompt"]  # seeded
    assert load_prompts(args, seed=1).held_out["prompt"] != data.held_out["prompt"]


def test_template_and_system_prompt_shape_training_and_held_out_prompts_alike(tmp_path):
    args = DatasetArguments(dataset_path=_jsonl(tmp_path / "math.jsonl", MATH_ROWS), eval_size=5,
                            prompt_template="{prompt} Put the answer in \\boxed{}.", system_prompt="Be brief.")
    data = load_prompts(args, seed=0)
    for prompt in [data.train[0]["prompt"], data.held_out[0]["prompt"]]:
        assert prompt[0] == {"role": "system", "content": "Be brief."}
        assert prompt[1]["role"] == "user" and prompt[1]["content"].endswith("? Put the answer in \\boxed{}.")
    plain = load_prompts(DatasetArguments(dataset_path=args.dataset_path, eval_size=5, prompt_template="Q: {prompt}"),
                         seed=0)
    assert plain.train[0]["prompt"].startswith("Q: What is")


def test_conversational_rows_keep_their_turns_and_the_template_reaches_the_last_user_message(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Mine."}, {"role": "user", "content": f"Say {i}."}],
             "answer": str(i)} for i in range(12)]
    data = load_prompts(DatasetArguments(dataset_path=_jsonl(tmp_path / "chat.jsonl", rows), eval_size=2,
                                         prompt_template="{prompt}!", system_prompt="Not used."), seed=0)
    assert data.train[0]["prompt"][0] == {"role": "system", "content": "Mine."}  # its own system turn stays
    assert data.train[0]["prompt"][1]["content"].endswith(".!")


def test_saved_splits_give_the_test_split_and_prompt_only_rows_are_checked_by_rewards(tmp_path):
    prompts = [{"prompt": f"Write about {i}.", "topic": i} for i in range(10)]
    DatasetDict({"train": Dataset.from_list(prompts[:8]), "validation": Dataset.from_list(prompts[8:])}
                ).save_to_disk(str(tmp_path / "saved"))
    data = load_prompts(DatasetArguments(dataset_path=str(tmp_path / "saved"), dataset_test_split="validation"), 0)
    assert data.scorer is None and list(data.held_out["topic"]) == [8, 9] and len(data.train) == 8
    with pytest.raises(ValueError, match="no split 'training'.*dataset_train_split"):
        load_prompts(DatasetArguments(dataset_path=str(tmp_path / "saved"), dataset_train_split="training"), 0)


@pytest.mark.parametrize("keys, message", [
    (dict(dataset_name="gsm8k", dataset_path="x.jsonl"), "not both"),
    (dict(dataset_path="/nonexistent/data.jsonl"), "does not exist"),
    (dict(prompt_template="no placeholder"), "has no {prompt} placeholder"),
    (dict(eval_size=0), "eval_size must be a whole number"),
    (dict(dataset_test_split=""), "dataset_test_split must be a non-empty string"),
])
def test_bad_dataset_keys_are_refused_at_parse_time(keys, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TraceRLConfig(**keys)


def test_rows_without_a_prompt_are_refused_naming_the_columns(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"question_text": "hi", "gold": "1"}] * 3)
    with pytest.raises(ValueError, match=r"columns \['question_text', 'gold'\] have no `prompt`"):
        load_prompts(DatasetArguments(dataset_path=path), 0)


def test_task_is_a_deprecated_name_for_dataset_name(caplog):
    with caplog.at_level(logging.WARNING):
        config = TraceRLConfig(task="chain")
    assert config.dataset_name == "chain" and config.task is None
    assert "`task` is deprecated" in caplog.text
    with pytest.raises(ValueError, match="old name of dataset_name: give one of them"):
        TraceRLConfig(task="chain", dataset_name="addition3")


def test_a_dataset_that_is_not_a_testbed_task_needs_gen_length(tmp_path):
    with pytest.raises(ValueError, match="needs gen_length"):
        TraceRLConfig(dataset_path=_jsonl(tmp_path / "math.jsonl", MATH_ROWS))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    """A tiny LLaDA-format checkpoint whose tokenizer has LLaDA's chat template."""
    path = tmp_path_factory.mktemp("llada")
    write_checkpoint("llada", path)
    return str(path)


def test_tracerl_trains_on_a_local_file_with_a_chat_template_and_a_system_prompt(tmp_path, chat_model):
    data = _jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    module, config = parse_recipe("recipes/tracerl_tiny_addition.yaml", [
        "--model", chat_model, "--dataset_path", data, "--chat", "true",
        "--system_prompt", "Answer with a number.", "--prompt_template", "{prompt} Use \\boxed{}.",
        "--output_dir", str(tmp_path / "run"), *[f"--{k}={v}" for k, v in TINY.items()]])
    line = module.run(config)
    assert line["step"] == 2 and "eval/greedy_accuracy" in line
    first = json.loads((tmp_path / "run" / "completions.jsonl").read_text().splitlines()[0])
    assert first["prompt"][0] == {"role": "system", "content": "Answer with a number."}
    assert first["prompt"][1]["content"].endswith("Use \\boxed{}.")


def test_tracerl_trainer_on_a_conversational_dataset_with_a_python_reward_and_a_callback(tmp_path, chat_model):
    rows = [{"prompt": [{"role": "user", "content": f"Name {i} fruits."}], "wanted": i} for i in range(20)]
    seen = []

    def fruity(prompts, completions, wanted, **columns):
        seen.append(wanted)
        return [float(len(text) % (w + 2)) for text, w in zip(completions, wanted)]

    class Recorder(TrainerCallback):
        events = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.events.append(("log", state.global_step, logs["step"]))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.events.append(("evaluate", state.global_step, sorted(metrics)))

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    trainer = TraceRLTrainer(model=chat_model, args=TraceRLConfig(**{**TINY, "max_steps": 4, "eval_steps": 2},
                                                                  output_dir=str(tmp_path / "run")),
                             train_dataset=Dataset.from_list(rows), reward_funcs=[fruity], callbacks=[Recorder()])
    line = trainer.train()
    assert line["step"] == 2  # the callback stopped it after step 2 of 4
    assert "reward/fruity" in line and "eval/reward/fruity" in line and "eval/greedy_accuracy" not in line
    assert Recorder.events[:2] == [("log", 1, 1), ("evaluate", 2, ["eval/reward/fruity", "eval/reward/total"])]
    assert seen and all(isinstance(w, int) for batch in seen for w in batch)
    assert (tmp_path / "run" / "final").is_dir()


def test_a_train_dataset_needs_gen_length_before_the_model_loads(tmp_path):
    trainer = TraceRLTrainer(model="no-such-model", args=TraceRLConfig(output_dir=str(tmp_path / "run"), eval_size=4),
                             train_dataset=MATH_ROWS)
    with pytest.raises(ValueError, match="a train_dataset needs gen_length"):
        trainer.train()


def test_conversations_for_a_tokenizer_without_a_chat_template_fail_before_sampling(tmp_path):
    config = TraceRLConfig(model="tiny", chat=True, output_dir=str(tmp_path / "run"), **TINY)
    with pytest.raises(ValueError, match="no chat template"):
        run(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_readme_snippet_for_your_own_data_and_reward_runs_verbatim(tmp_path, monkeypatch):
    readme = open("README.md").read()
    section = readme.split("## Your own data and reward", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    metrics = [json.loads(line) for line in (tmp_path / "runs/my_data/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "reward/brevity" in metrics[-1] and "eval/greedy_accuracy" in metrics[-1]


def test_sft_and_distillation_read_hub_style_splits_and_conversational_messages(tmp_path):
    from dlm_rl.data.sources import completion_rows
    from dlm_rl.trainers.mdm import MDMConfig, run as mdm_run

    chats = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
             for i in range(16)]
    DatasetDict({"train": Dataset.from_list(chats[:12]), "validation": Dataset.from_list(chats[12:])}
                ).save_to_disk(str(tmp_path / "saved"))
    rows, length = completion_rows(None, str(tmp_path / "saved"), 100, 0, 6, split="validation")
    assert length == 6 and len(rows) == 4
    assert rows[0]["prompt"] == [{"role": "user", "content": "12+1?"}] and rows[0]["completion"] == "13"
    with pytest.raises(ValueError, match="no split 'test'"):
        completion_rows(None, str(tmp_path / "saved"), 100, 0, 6, split="test")
    plain = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(12)]
    Dataset.from_list(plain).save_to_disk(str(tmp_path / "plain"))
    out = mdm_run(MDMConfig(dataset_path=str(tmp_path / "plain"), response_length=4, max_steps=2,
                            per_device_train_batch_size=4, output_dir=str(tmp_path / "sft"), use_cpu=True))
    assert (tmp_path / "sft" / "model.safetensors").exists() and out == str(tmp_path / "sft")


def test_a_hub_dataset_that_cannot_be_reached_says_how_to_use_it_offline(tmp_path, monkeypatch):
    from dlm_rl.data.sources import completion_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="save its splits where the hub is reachable"):
        completion_rows("someone/no-such-dataset", None, 10, 0, 8)
