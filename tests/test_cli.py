"""The command line end to end (train → sample → eval on a tiny model), recipe overrides and errors, and the
evaluation helpers (pass@k, decoding up to EOS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dlm_rl.cli import main
from dlm_rl.data.tokenizer import char_tokenizer
from dlm_rl.evaluation import decode_responses, pass_at_k
from dlm_rl.recipe import parse_recipe

RECIPE = """\
# python -m dlm_rl.cli train recipe.yaml — a 3-step CPU smoke run
trainer: mdm
model: tiny
{data}
max_steps: 3
per_device_train_batch_size: 16
output_dir: {out}
use_cpu: true
report_to: none
save_strategy: "no"
tiny_hidden_size: 32
tiny_num_layers: 1
"""



def _recipe(directory, data="task: addition3\ntrain_size: 512", name="recipe.yaml"):
    path = directory / name
    path.write_text(RECIPE.format(data=data, out=directory / "run"))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 3 steps by `dlm-rl train`; the path of its output directory."""
    directory = tmp_path_factory.mktemp("cli")
    assert main(["train", _recipe(directory)]) == 0
    return str(directory / "run")


# --- train / sample / eval --------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["mdm", "tracerl", "vrpo", "didi"])
def test_a_recipe_that_sets_nothing_gets_the_config_classes_defaults(tmp_path, trainer):
    """The recipe parser builds its own defaults from the dataclass fields; they must be the config class's."""
    import dataclasses
    import importlib

    from dlm_rl.recipe import TRAINERS

    module, class_name = TRAINERS[trainer]
    config_class = getattr(importlib.import_module(module), class_name)
    data = {"task": "addition3"} if trainer == "mdm" else {}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer: {trainer}\n" + "".join(f"{k}: {v}\n" for k, v in data.items()))
    parsed = parse_recipe(str(recipe), ["--output_dir", str(tmp_path)])[1]
    direct = config_class(output_dir=str(tmp_path), **data)
    assert {f.name: getattr(parsed, f.name) for f in dataclasses.fields(config_class)} == {
        f.name: getattr(direct, f.name) for f in dataclasses.fields(config_class)}


def test_the_shipped_mdm_recipe_trains_through_the_cli(tmp_path):
    """`dlm-rl train recipes/mdm_tiny_addition.yaml`, as the README gives it, with only its length cut: the keys the
    recipe leaves unset (report_to) must take the trainer's defaults."""
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                          "mdm_tiny_addition.yaml")
    out = tmp_path / "run"
    assert main(["train", recipe, "--max_steps", "2", "--train_size", "64", "--per_device_train_batch_size", "8",
                 "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "dlm_rl.json").exists()



def test_train_writes_model_tokenizer_and_conventions(trained):
    files = set(os.listdir(trained))
    assert {"dlm_rl.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert json.loads(open(os.path.join(trained, "dlm_rl.json")).read())["mask_token_id"] == 2
    config = json.loads(open(os.path.join(trained, "config.json")).read())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 1, 100)


def test_sample_prints_one_json_line_per_prompt(trained, capsys):
    capsys.readouterr()
    assert main(["sample", "--model", trained, "--prompt", "12+57+33=", "--gen-length", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"prompt", "completion", "nfe", "finish_reason"} and record["prompt"] == "12+57+33="
    assert 1 <= record["nfe"] <= 8 and record["finish_reason"] in ("eos", "length")
    ids = char_tokenizer()(record["completion"], add_special_tokens=False)["input_ids"]
    assert isinstance(record["completion"], str) and len(ids) <= 8


def test_sample_several_prompts_and_samples(trained, capsys):
    capsys.readouterr()
    argv = ["sample", "--model", trained, "--prompt", "1+2=", "--prompt", "3+4=", "--gen-length", "4",
            "--num-samples", "2", "--temperature", "1.0"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in records] == ["1+2=", "1+2=", "3+4=", "3+4="]


def test_sample_fast_sampler_prints_its_trajectory(trained, capsys):
    capsys.readouterr()
    argv = ["sample", "--model", trained, "--prompt", "12+57+33=", "--gen-length", "8", "--block-length", "4",
            "--threshold", "0.5", "--cache", "dual", "--trajectory"]
    assert main(argv) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(record["response_ids"]) == len(record["step_map"]) == len(record["log_probs"]) == 8
    steps = [s for s, lp in zip(record["step_map"], record["log_probs"]) if lp is not None]
    assert sorted(set(steps)) == list(range(record["nfe"]))  # every forward committed something
    assert all(lp <= 0 for lp in record["log_probs"] if lp is not None)


def test_sample_bad_threshold_is_a_clear_error(trained, capsys):
    assert main(["sample", "--model", trained, "--prompt", "1+2=", "--threshold", "1.5"]) == 2
    assert "threshold must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_eval_prints_accuracy_and_pass_at_k(trained, tmp_path, capsys):
    capsys.readouterr()
    argv = ["eval", "--model", trained, "--task", "addition3", "--n", "8", "--samples", "2",
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert (result["model"], result["dataset"], result["n"]) == (trained, "addition3", 8)
    # 8 problems: greedy accuracy and pass@2 count problems (k/8); pass@1 averages c/2 over them (k/16)
    for key, grain in (("greedy_accuracy", 8), ("pass@1", 16), ("pass@2", 8)):
        assert 0.0 <= result[key] <= 1.0
        assert result[key] * grain == pytest.approx(round(result[key] * grain), abs=1e-9)
    assert result["pass@1"] <= result["pass@2"]


def test_eval_scores_greedy_completions_with_a_reward_from_a_user_file(trained, tmp_path, capsys):
    user_file = tmp_path / "my_rewards.py"
    user_file.write_text(
        "def length(prompts, completions, answer):\n"
        "    assert len(answer) == len(completions)  # a dataset column, passed by name\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    capsys.readouterr()
    command = ["eval", "--model", trained, "--task", "addition3", "--n", "3", "--samples", "0",
               "--output-dir", str(tmp_path / "out")]
    assert main([*command, "--reward", f"{user_file}:length", "--reward-weight", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    mean_length = sum(len(text) for text in result["examples"]) / 3  # n = 3: the examples are all completions
    assert result["rewards"] == pytest.approx({"length": mean_length, "total": 2 * mean_length})
    assert main([*command, "--reward", f"{user_file}:lenght"]) == 2
    assert f"did you mean '{user_file}:length'?" in capsys.readouterr().err


def test_eval_unknown_task_lists_valid_tasks(trained, capsys):
    assert main(["eval", "--model", trained, "--task", "addition4"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'addition4': give a testbed task ['addition3', 'chain', 'chain128', 'code', 'facts']" in err


def test_eval_unknown_model_is_an_error(capsys):
    assert main(["eval", "--model", "not-a-model", "--task", "addition3"]) == 2
    assert "model 'not-a-model' is neither 'tiny'" in capsys.readouterr().err


# --- plot -------------------------------------------------------------------------------------------------------

# The metric names each trainer logs (a subset), as its metrics.jsonl has them: step 0 is the held-out check.
PLOT_METRICS = {
    "tracerl": {"reward/total": 0.5, "reward/accuracy": 0.4, "kl": 0.01, "nfe": 3.0, "loss": 0.1,
                "time/generation_and_reward": 0.4, "time/training": 0.2, "truncated_fraction": 0.1,
                "guard/truncated_steps": 0, "guard/nonfinite_steps": 0},
    "vrpo": {"loss": 0.69, "implicit_accuracy": 0.5, "pairs": 6, "time/training": 0.3},
    "didi": {"reward": 0.1, "loss": 0.2, "kl": 0.3, "discriminator_loss": 0.69, "time/step": 0.5},
}


@pytest.mark.parametrize("trainer", sorted(PLOT_METRICS))
def test_plot_draws_a_runs_curves_to_a_png(trainer, tmp_path, capsys):
    from PIL import Image

    lines = [{"step": 0, "eval/greedy_accuracy": 0.1}]
    lines += [{"step": step, **{k: v * step for k, v in PLOT_METRICS[trainer].items()}} for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert capsys.readouterr().out.startswith(f"wrote {png}: reward") == (trainer != "vrpo")
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 700


def test_plot_writes_where_told_and_refuses_a_directory_without_metrics(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl": 0.5}\n{"step": 2, "kl": 0.25}\n')
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "elsewhere.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'elsewhere.png'}: KL\n"
    assert (tmp_path / "elsewhere.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").unlink()
    assert main(["plot", str(tmp_path)]) == 2
    assert f"dlm-rl plot: error: {tmp_path} has no metrics.jsonl; give the output_dir of a" in capsys.readouterr().err


def test_run_summary_gives_each_held_out_metric_first_and_last(tmp_path):
    from dlm_rl.run_log import summary

    lines = [{"step": 0, "eval/greedy_accuracy": 0.5}, {"step": 1, "reward/total": 0.3},
             {"step": 50, "eval/greedy_accuracy": 0.625, "reward/total": 0.4},
             {"step": 100, "eval/greedy_accuracy": 0.75}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert summary(str(path), ("reward/total", "eval/greedy_accuracy", "eval/validity")) == [
        "eval/greedy_accuracy: 0.5000 at step 0 -> 0.7500 at step 100 (+0.2500)"]


def test_a_run_stopped_with_sigterm_still_saves_its_model_and_log(tmp_path):
    """Schedulers stop jobs with SIGTERM: the run exits 143 after its `finally` has written final/ and the log."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer: tracerl\nmodel: tiny\ntask: addition3\ntrain_size: 64\neval_size: 8\n"
                      f"reward_funcs: [rewards.format:boxed]\nlora_r: 4\nnum_generations: 2\nprompts_per_step: 2\n"
                      f"max_steps: 100000\neval_steps: 100000\noutput_dir: {tmp_path / 'run'}\n")
    run = subprocess.Popen([sys.executable, "-m", "dlm_rl.cli", "train", str(recipe)], stderr=subprocess.PIPE,
                           text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"step": 1' in metrics.read_text()):  # step 0 is the held-out check
        assert run.poll() is None, run.stderr.read()
        assert time.monotonic() < deadline, "no training step within 120 s"
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopping" in err
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


# --- gpu_check.py -----------------------------------------------------------------------------------------------


def test_gpu_check_documents_its_inputs_and_refuses_cpu_clearly():
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--model" in done.stdout and "--prompts" in done.stdout and "GSM8K" in done.stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for CPU-only machines")
    done = subprocess.run([sys.executable, script, "--model", "/models/LLaDA-8B-Instruct"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no CUDA GPU is visible" in done.stderr


# --- recipes: overrides and errors ------------------------------------------------------------------------------


def test_command_line_override_is_honoured(tmp_path):
    _, config = parse_recipe(_recipe(tmp_path), ["--max_steps", "2", "--learning_rate", "0.005"])
    assert (config.max_steps, config.learning_rate) == (2, 0.005)
    # untouched recipe values survive
    assert (config.per_device_train_batch_size, config.tiny_hidden_size, config.train_size) == (16, 32, 512)
    assert config.output_dir == str(tmp_path / "run") and config.dataset_name == "addition3"
    _, config = parse_recipe(_recipe(tmp_path))
    assert config.max_steps == 3


def test_bad_value_on_command_line_fails_clearly(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    try:
        code = main(["train", recipe, "--learning_rate", "abc"])
    except SystemExit as exit:  # argparse's own error path
        code = exit.code
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "--learning_rate" in err and "invalid float value: 'abc'" in err
    assert not os.path.exists(tmp_path / "run")  # nothing was trained


def test_dataset_path_recipe_trains(tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "completion": f"\\boxed{{{a + b}}}"} for a in range(8) for b in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = _recipe(tmp_path, data=f"dataset_path: {data}\nresponse_length: 6")
    assert main(["train", recipe, "--max_steps", "2"]) == 0
    conventions = json.loads((tmp_path / "run" / "dlm_rl.json").read_text())
    assert conventions["mask_token_id"] == 2
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_dataset_path_without_response_length_is_refused(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "completion": "3"}) + "\n")
    recipe = _recipe(tmp_path, data=f"dataset_path: {data}")
    assert main(["train", recipe]) == 2
    assert f"dataset_path {data}: set response_length" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "model.safetensors")


@pytest.mark.parametrize("name", ["dataset_name", "task"])  # task: the deprecated name
def test_dataset_name_and_dataset_path_are_exclusive(tmp_path, capsys, name):
    recipe = _recipe(tmp_path, data=f"{name}: addition3\ndataset_path: rows.jsonl")
    assert main(["train", recipe]) == 2
    assert "set exactly one of dataset_name (a testbed task) and dataset_path" in capsys.readouterr().err


# --- evaluation helpers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [(8, 2, 1, 0.25), (8, 2, 8, 1.0), (4, 1, 2, 0.5), (8, 0, 1, 0.0), (8, 0, 8, 0.0), (5, 5, 1, 1.0),
     (8, 2, 2, 1 - 15 / 28), (10, 3, 4, 1 - 35 / 210)],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_with_no_correct_sample_is_never_one():
    """k > n is a caller error; it must not turn zero correct samples into pass@k = 1."""
    try:
        value = pass_at_k(2, 0, 3)
    except ValueError:
        return
    assert value == 0.0


def test_decode_responses_cuts_at_first_eos():
    tokenizer = char_tokenizer()
    eos, pad, mask, boxed = 1, 0, 2, 3
    one, two, close = 5, 6, 96
    rows = torch.tensor([
        [boxed, one, two, close, eos, one, eos],  # text after the first EOS is dropped
        [one, mask, two, pad, one, two, one],  # no EOS: everything, special tokens dropped
        [eos, one, one, one, one, one, one],  # EOS first: empty
    ])
    assert decode_responses(tokenizer, rows) == ["\\boxed{12}", "12121", ""]
