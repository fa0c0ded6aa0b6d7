"""Published dLLM checkpoints (LLaDA, Dream, SDAR / TraDo) in their hub on-disk format load on transformers' own
classes without their remote code, compute what the published model computes, and go through every sampler mode,
exact replay, a LoRA training step, saving and reloading."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest
import torch

from dlm_rl.models import load
from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.rl.rows import response_log_probs
from dlm_rl.rl.trace import model_trace_rows
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.sampler import generate
from hub_checkpoints import SPECIALS, reference_logits, write_checkpoint

FAMILIES = ["llada", "dream", "sdar", "llada2"]
NATIVE = {"llada": "LlamaForCausalLM", "dream": "Qwen2ForCausalLM", "sdar": "Qwen3ForCausalLM",
          "llada2": "LLaDA2MoeForCausalLM"}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA_TARGETS = {"llada": PROJECTIONS, "dream": PROJECTIONS, "sdar": PROJECTIONS,
                "llada2": {"query_key_value", "dense", "gate_proj", "up_proj", "down_proj"}}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """family -> (checkpoint directory, its tensors under their published names, in float32)."""
    root = tmp_path_factory.mktemp("hub")
    return {family: (root / family, write_checkpoint(family, root / family)) for family in FAMILIES}


def _load(hub, family, **kwargs):
    return load(hub[family][0], dtype=kwargs.pop("dtype", torch.float32), **kwargs).eval()


def _small_blocks(hub, family, **kwargs):
    """The model with LLaDA2's 32-token attention blocks cut to SDAR's 4: the same code path, and sampling a
    157k-token vocabulary over 32-token blocks takes about a second a step on one CPU thread."""
    return _load(hub, family, **({"block_size": 4} if family == "llada2" else {}), **kwargs)


def _canvas(model) -> dict:
    """The shortest canvas of whole decoding blocks: blocks of 4, or the model's own attention block."""
    block = model.block_size or 4
    return dict(gen_length=max(8, block), block_length=block)


def _prompts(model, rows=((5, 6, 7, 8, 9), (40, 41, 42))):
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --- load: class, conventions, tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_on_the_native_class_with_the_familys_conventions(hub, family):
    model = _load(hub, family)
    assert type(model.model).__name__ == NATIVE[family]
    expected = {"llada": (126336, False, "full", None), "dream": (151666, True, "full", None),
                "sdar": (151669, False, "block", 4), "llada2": (156895, False, "block", 32)}[family]
    assert (model.mask_token_id, model.shift_logits, model.attention, model.block_size) == expected
    tokenizer = model.tokenizer
    mask_token = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "sdar": "<|MASK|>", "llada2": "<|mask|>"}[family]
    assert tokenizer.mask_token == mask_token and tokenizer.mask_token_id == model.mask_token_id
    assert tokenizer.eos_token_id == SPECIALS[family]["<|endoftext|>"]
    assert tokenizer.convert_tokens_to_ids(mask_token) == model.mask_token_id
    assert tokenizer.decode(tokenizer("12+3=", add_special_tokens=False)["input_ids"]) == "12+3="
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True,
                                         tokenize=False)
    assert "1+1=" in chat and "assistant" in chat.lower()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_published_forward(hub, family):
    """The mapped model's logits equal the published architecture's, computed from the checkpoint's own tensors
    by name (a swapped rename, a missing bias or qk-norm, a wrong RoPE base or logit shift would all fail)."""
    path, tensors = hub[family]
    model = _load(hub, family)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    ids[:, -4:] = model.mask_token_id
    length = ids.shape[1]
    if model.attention == "block":  # block-causal from position 0
        pos = torch.arange(length)
        allowed = (pos[None, :] // model.block_size <= pos[:, None] // model.block_size).expand(2, -1, -1)
    else:
        allowed = torch.ones(2, length, length, dtype=torch.bool)
    expected = reference_logits(family, tensors, ids, allowed)
    if family == "dream":  # hidden state i-1 predicts token i
        expected = torch.cat([expected[:, :1], expected[:, :-1]], 1)
    with torch.no_grad():
        logits = model(ids).logits
    keep = torch.arange(logits.shape[-1]) != model.mask_token_id
    assert (logits[..., keep] - expected[..., keep]).abs().max() <= 1e-4
    assert logits[..., model.mask_token_id].isneginf().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_no_remote_code_runs(hub, family):
    """The checkpoints hold the modeling files their auto_map names, each raising when imported: loading (and so
    every test here) never runs them."""
    config = json.loads((hub[family][0] / "config.json").read_text())
    files = sorted(p.name for p in hub[family][0].glob("*.py"))
    assert files and all(ref.split(".")[0] + ".py" in files for ref in config["auto_map"].values())
    _load(hub, family, trust_remote_code=True)  # the flag changes nothing for a known family


def test_a_sharded_checkpoint_loads_as_one_file_does(hub, tmp_path):
    write_checkpoint("llada", tmp_path, shards=3)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(tmp_path, dtype=torch.float32)(ids).logits, _load(hub, "llada")(ids).logits)


def test_llada_eos_row_trains_and_its_special_ids_are_its_own(hub):
    """LLaDA's pad id is its EOS: on Llama it must not become the embedding's padding_idx (a row that never gets a
    gradient, though EOS is sampled and fed back in every response); its bos is the tokenizer's, not Llama's 1."""
    model = _load(hub, "llada")
    assert model.config.pad_token_id is None and model.config.bos_token_id is None
    assert model.config.eos_token_id == 126081 and model.tokenizer.pad_token_id == 126081
    eos = model.tokenizer.eos_token_id
    model(torch.tensor([[5, eos, 7, eos]])).logits[..., :1000].sum().backward()
    assert model.model.get_input_embeddings().weight.grad[eos].abs().sum() > 0


def test_llada_context_is_its_max_sequence_length(tmp_path):
    write_checkpoint("llada", tmp_path, max_sequence_length=64)
    model = load(tmp_path)
    assert model.config.max_position_embeddings == 64
    ids, mask = _prompts(model)
    with pytest.raises(ValueError, match="exceeds the model's context of 64 positions"):
        generate(model, ids, mask, SamplerConfig(gen_length=64))


@pytest.mark.parametrize("change, message", [
    ({"alibi": True}, "alibi=True"),
    ({"block_type": "sequential"}, "block_type='sequential'"),
    ({"include_bias": True}, "include_bias=True"),
])
def test_llada_options_the_llama_class_lacks_are_refused(tmp_path, change, message):
    write_checkpoint("llada", tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_llada2_options_its_model_does_not_compute_are_refused(tmp_path):
    write_checkpoint("llada2", tmp_path, norm_head=True)
    with pytest.raises(ValueError, match="norm_head=True"):
        load(tmp_path)


def test_a_missing_tensor_is_an_error_not_a_random_init(hub, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = hub["dream"]
    for name in ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fit Qwen2ForCausalLM.*model.layers.1.mlp.up_proj.weight"):
        load(tmp_path)


def test_a_dlm_rl_directory_missing_a_tensor_is_an_error(hub, tmp_path):
    from safetensors.torch import load_file, save_file

    _load(hub, "sdar").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fit Qwen3ForCausalLM.*model.layers.0.self_attn.k_norm.weight"):
        load(tmp_path)


# --- sampling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decoding", [dict(steps=8), dict(threshold=0.5), dict(factor=1.0)])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_sampler_mode_runs(hub, family, decoding, cache):
    model = _small_blocks(hub, family)
    ids, mask = _prompts(model)
    config = SamplerConfig(**_canvas(model), temperature=1.0, cache=cache, **decoding)
    trajectory = generate(model, ids, mask, config, torch.Generator().manual_seed(0))
    assert trajectory.response_ids.shape == (2, config.gen_length)
    assert (trajectory.response_ids != model.mask_token_id).all()
    assert trajectory.log_probs[trajectory.sampled].isfinite().all()


@pytest.mark.parametrize("family", ["sdar", "llada2"])
@pytest.mark.parametrize("decoding", [dict(steps=12), dict(threshold=0.3)])
def test_block_model_caches_equal_uncached_sampling(hub, family, decoding):
    model = _small_blocks(hub, family)
    ids, mask = _prompts(model)
    length = 3 * model.block_size if model.block_size < 8 else 2 * model.block_size  # several blocks
    runs = {cache: generate(model, ids, mask, SamplerConfig(gen_length=length, temperature=1.0, cache=cache, **decoding),
                            torch.Generator().manual_seed(0)) for cache in ("none", "prefix", "dual")}
    for cache in ("prefix", "dual"):
        assert torch.equal(runs[cache].response_ids, runs["none"].response_ids), cache
        assert torch.equal(runs[cache].step_map, runs["none"].step_map), cache
        torch.testing.assert_close(runs[cache].log_probs, runs["none"].log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_rows_replay_the_samplers_log_probs(hub, family):
    model = _small_blocks(hub, family)
    ids, mask = _prompts(model)
    config = SamplerConfig(**_canvas(model), temperature=1.0, threshold=0.3)
    trajectory = generate(model, ids, mask, config, torch.Generator().manual_seed(2))
    rows = model_trace_rows(trajectory, model)
    with torch.no_grad():
        replayed = response_log_probs(model, rows)
    recorded = trajectory.log_probs[rows.sample]
    assert rows.targets.sum() == trajectory.sampled.sum()
    assert (replayed - recorded)[rows.targets].abs().max() <= 1e-5


# --- training, saving, dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_save_and_reload(hub, family, tmp_path):
    """Default LoRA targets exist, a training-mode forward gives logits and gradients, an update changes the
    logits, and both the adapter and the merged full weights reload with load() alone."""
    model = add_lora(_small_blocks(hub, family), LoraArguments(use_lora=True, lora_r=4)).train()
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == LORA_TARGETS[family]
    ids, mask = _prompts(model)
    logits = model(ids, mask).logits
    assert logits.requires_grad
    logits[..., :1000].logsumexp(-1).mean().backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(ids, mask).logits
    assert not torch.allclose(after[..., :1000], logits.detach()[..., :1000])

    model.save_pretrained(tmp_path / "adapter")
    reloaded = load(tmp_path / "adapter", dtype=torch.float32).eval()
    assert reloaded.conventions == model.conventions
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask).logits, after, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        add_lora(reloaded, LoraArguments(use_lora=True, lora_r=4))
    merged = type(model)(model.model.merge_and_unload(), model.conventions, model.tokenizer)
    merged.save_pretrained(tmp_path / "full")
    full = load(tmp_path / "full").eval()
    assert type(full.model).__name__ == NATIVE[family]
    with torch.no_grad():
        torch.testing.assert_close(full(ids, mask).logits, after, atol=1e-5, rtol=0)


def test_an_adapter_that_does_not_fit_its_base_is_an_error(hub, tmp_path):
    """PEFT only warns when adapter tensors match no module (e.g. saved under LLaDA's old module names) and leaves
    the bare base model; load() refuses."""
    from safetensors.torch import load_file, save_file

    model = add_lora(_load(hub, "llada"), LoraArguments(use_lora=True, lora_r=4, lora_target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k.replace("self_attn.q_proj", "attn_out"): v for k, v in tensors.items()},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="the adapter does not fit its base"):
        load(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_forward_and_sampling(hub, family):
    model = _small_blocks(hub, family, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids, mask = _prompts(model)
    trajectory = generate(model, ids, mask, SamplerConfig(**_canvas(model), threshold=0.5, cache="dual"),
                          torch.Generator().manual_seed(0))
    assert (trajectory.response_ids != model.mask_token_id).all()
    with torch.no_grad():
        bf16 = model(ids, mask).logits.float()
        fp32 = _small_blocks(hub, family)(ids, mask).logits
    keep = torch.arange(fp32.shape[-1]) != model.mask_token_id
    assert (bf16[..., keep] - fp32[..., keep]).abs().max() < 0.5


def test_the_model_layer_imports_nothing_above_it():
    """dlm_rl.models stands below everything: loading a model never imports a trainer, the testbed, the sampler or
    the evaluation harness."""
    above = ("dlm_rl.testbed", "dlm_rl.trainers", "dlm_rl.sampling", "dlm_rl.evaluation", "dlm_rl.rl",
             "dlm_rl.rollout", "dlm_rl.model_spec")
    root = pathlib.Path(__file__).parents[1] / "dlm_rl" / "models"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert not (name or "").startswith(above), f"{path.name} imports {name}"


# --- the command line takes hub-format directories ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_writes_a_dlm_rl_directory_with_the_same_logits(hub, family, tmp_path, capsys):
    from dlm_rl.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(hub[family][0]), str(out), "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["class"] == NATIVE[family] and report["dtype"] == "float32"
    assert json.loads((out / "dlm_rl.json").read_text())["mask_token_id"] == report["mask_token_id"]
    assert json.loads((out / "config.json").read_text())["model_type"] in ("llama", "qwen2", "qwen3", "llada2_moe")
    from safetensors import safe_open

    names = set(safe_open(out / "model.safetensors", "pt").keys())
    assert not any(name.startswith("model.transformer.") for name in names)  # LLaDA's are written as Llama's
    converted, original = load(out).eval(), _load(hub, family)
    assert converted.conventions == original.conventions
    ids, mask = _prompts(original)
    with torch.no_grad():
        assert torch.equal(converted(ids, mask).logits, original(ids, mask).logits)
    assert main(["convert", str(hub[family][0]), str(out)]) == 2  # never over an earlier conversion


def test_eval_takes_a_hub_directory(hub, tmp_path, capsys):
    from dlm_rl.cli import main

    assert main(["eval", "--model", str(hub["dream"][0]), "--dataset", "addition3", "--n", "2", "--samples", "1",
                 "--gen-length", "8", "--block-length", "4", "--threshold", "0.5",
                 "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 2
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["nfe"] > 0 for line in lines)  # 2 problems: greedy and 1 sample each


def test_sample_takes_a_hub_directory(hub, capsys):
    from dlm_rl.cli import main

    assert main(["sample", "--model", str(hub["sdar"][0]), "--prompt", "1+2=", "--gen-length", "8",
                 "--threshold", "0.5", "--cache", "prefix"]) == 0
    assert capsys.readouterr().out.strip()


def test_gpu_check_runs_on_a_hub_directory_in_cpu_smoke_mode(hub, tmp_path):
    """scripts/gpu_check.py on a hub-format checkpoint: the three samplers and a TraceRL step with LoRA."""
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "4+4=", "answer": "8"}\n')
    script = pathlib.Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--model", str(hub["sdar"][0]), "--cpu_smoke_test", "--prompts", str(prompts),
         "--tracerl_task", "addition3", "--n", "2", "--gen_lengths", "8", "--block_length", "4", "--batch_size", "2",
         "--tracerl_steps", "1"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["sampler"] for r in report["sampler"]] == ["reference", "threshold", "threshold+dual_cache"]
    assert all(r["nfe"] > 0 for r in report["sampler"])
    assert report["tracerl"]["steps"] == 1 and report["tracerl"]["final"]["step"] == 1
