"""What rollouts promise training: recorded log-probs replay exactly from `step_map`, caches are exact where
they claim to be, and bad sampler input fails with a clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlm_rl.data.collate import encode_prompt, left_pad
from dlm_rl.evaluation import rollout
from dlm_rl.models import tiny_model
from dlm_rl.models.diffusion_lm import DiffusionLM
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.sampler import generate

PROMPTS = ["12+57+33=", "1+2=", "99+1+0=", "7*8", "5"]


def _model(attention="full", shift=False, num_layers=2, seed=0):
    block_size = 4 if attention == "block" else None
    model = tiny_model(seed=seed, num_layers=num_layers, attention=attention, block_size=block_size)
    if shift:  # an AR-converted (A2D) model reads token i from hidden state i-1
        model = DiffusionLM(model.model, dataclasses.replace(model.conventions, shift_logits=True), model.tokenizer)
    return model.eval()


def _batch(model, prompts=PROMPTS):
    return left_pad([encode_prompt(model.tokenizer, p) for p in prompts], model.tokenizer.pad_token_id)


def _replayed_log_probs(model, trajectory):
    """Rebuild every step's state from step_map (prompt + response with tokens of step >= s masked), run the
    model on it from scratch, and read the log-prob of each token committed at s. [B, R], NaN where unsampled."""
    ids = torch.cat([trajectory.prompt_ids, trajectory.response_ids], dim=1)  # [B, P+R]
    mask = torch.cat([trajectory.prompt_mask, torch.ones_like(trajectory.response_ids)], dim=1)
    width = trajectory.prompt_ids.shape[1]
    replayed = torch.full(trajectory.log_probs.shape, float("nan"))
    for step in range(int(trajectory.nfe.max())):
        state = ids.clone()
        state[:, width:][trajectory.step_map >= step] = model.mask_token_id
        with torch.no_grad():
            log_probs = model(state, mask).logits[:, width:].double().log_softmax(-1)  # [B, R, V]
        chosen = log_probs.gather(-1, trajectory.response_ids[..., None]).squeeze(-1).float()
        here = (trajectory.step_map == step) & trajectory.sampled
        replayed[here] = chosen[here]
    return replayed


SAMPLERS = {
    "reference": dict(),
    "blocks": dict(block_length=4, steps=8),
    "threshold": dict(threshold=0.05, block_length=4),
    "factor": dict(factor=2.0, block_length=8),
    "shifted-schedule": dict(block_length=8, steps=8, schedule_shift=3.0, remasking="margin"),
}


@pytest.mark.parametrize("model_kind", ["full", "block", "full+shift"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_replaying_step_map_reproduces_the_recorded_log_probs(model_kind, temperature, sampler):
    """TraceRL trains on π(y_j | x^(t)) for the states the sampler visited: they must be rebuildable."""
    model = _model(attention=model_kind.split("+")[0], shift=model_kind.endswith("shift"))
    ids, mask = _batch(model)
    options = dict(SAMPLERS[sampler])
    if model_kind == "block":
        options.pop("block_length", None)  # decoding blocks are the model's attention blocks
    config = SamplerConfig(gen_length=16, temperature=temperature, **options)
    trajectory = generate(model, ids, mask, config, torch.Generator().manual_seed(0))
    assert trajectory.sampled.any() and not trajectory.log_probs[trajectory.sampled].isnan().any()
    replayed = _replayed_log_probs(model, trajectory)
    sampled = trajectory.sampled
    assert torch.equal(replayed.isnan(), ~sampled)
    assert (replayed[sampled] - trajectory.log_probs[sampled]).abs().max() <= 1e-5


def test_replay_covers_early_stopped_rows():
    """With early stop some tokens are filled, not sampled; the sampled ones still replay exactly."""
    model = _model()
    eos = model.tokenizer.eos_token_id

    def favour_eos(module, inputs, output):  # EOS likely enough that rows finish early, but not everywhere
        output.logits[..., eos] += 4.0
        return output

    model.model.register_forward_hook(favour_eos)
    ids, mask = _batch(model)
    trajectory = generate(model, ids, mask, SamplerConfig(gen_length=16, threshold=0.5))
    assert (~trajectory.sampled).any(), "no row was early-stopped; the test would be vacuous"
    assert (trajectory.nfe < 16).any()
    replayed = _replayed_log_probs(model, trajectory)
    sampled = trajectory.sampled
    assert (replayed[sampled] - trajectory.log_probs[sampled]).abs().max() <= 1e-5


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("decoding", [dict(steps=16), dict(threshold=0.05)])
def test_block_attention_caches_give_the_uncached_tokens(shift, temperature, decoding):
    """Block-causal models: the prefix depends only on finished blocks, so cached decoding is exact."""
    model = _model(attention="block", shift=shift)
    ids, mask = _batch(model)
    runs = {}
    for cache in ("none", "prefix", "dual"):
        config = SamplerConfig(gen_length=16, temperature=temperature, cache=cache, early_stop=False, **decoding)
        runs[cache] = generate(model, ids, mask, config, torch.Generator().manual_seed(0))
    for cache in ("prefix", "dual"):
        assert torch.equal(runs[cache].response_ids, runs["none"].response_ids), cache
        assert torch.equal(runs[cache].step_map, runs["none"].step_map), cache
        torch.testing.assert_close(runs[cache].log_probs, runs["none"].log_probs, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_model_caches_when_the_response_starts_in_the_first_block(cache):
    """Short prompts inside a block model's first block leave nothing to cache at that block; rows that finish
    early then leave the batch (an empty cache once kept its old batch size there and the next step crashed)."""
    model = tiny_model(seed=0, num_layers=2, attention="block", block_size=8).eval()
    ids, mask = _batch(model, ["1+2=", "5", "7*8"])
    runs = {}
    for mode in ("none", cache):
        config = SamplerConfig(gen_length=16, temperature=1.0, threshold=0.3, cache=mode)
        runs[mode] = generate(model, ids, mask, config, torch.Generator().manual_seed(3))
    assert len(set(runs["none"].block_offset.tolist())) > 1  # rows hold different numbers of masks in block 0
    assert torch.equal(runs[cache].response_ids, runs["none"].response_ids)
    torch.testing.assert_close(runs[cache].log_probs, runs["none"].log_probs, atol=1e-5, rtol=0, equal_nan=True)


class _CacheAsPastKeyValues(torch.nn.Module):
    """A backbone whose forward takes and returns its KV cache as `past_key_values`, the name remote-code models
    and older transformers releases use; the transformers model inside calls it `cache`."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                            output_hidden_states=output_hidden_states)
        return dataclasses.make_dataclass("Output", ["logits", "past_key_values", "hidden_states"])(
            out.logits, out.cache, out.hidden_states)


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # not the deprecated keyword
@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_caches_pass_by_the_keyword_the_backbone_takes(cache_name):
    model = _model(num_layers=1)
    if cache_name == "past_key_values":
        model = DiffusionLM(_CacheAsPastKeyValues(model.model), model.conventions, model.tokenizer)
    ids, mask = _batch(model)
    runs = {}
    for mode in ("none", "prefix", "dual"):
        config = SamplerConfig(gen_length=16, block_length=4, threshold=0.05, cache=mode, early_stop=False)
        runs[mode] = generate(model, ids, mask, config, torch.Generator().manual_seed(0))
    for mode in ("prefix", "dual"):
        assert torch.equal(runs[mode].response_ids, runs["none"].response_ids), mode


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_full_attention_caches_are_exact_for_a_one_layer_model(shift, cache):
    """With one layer, cached keys/values depend only on their own token and position, which do not change
    within a block: a correct cache (ordering, positions, re-fed column, cropping) then matches no cache."""
    model = _model(shift=shift, num_layers=1)
    ids, mask = _batch(model)
    runs = {}
    for mode in ("none", cache):
        config = SamplerConfig(gen_length=16, block_length=4, threshold=0.05, cache=mode, early_stop=False)
        runs[mode] = generate(model, ids, mask, config, torch.Generator().manual_seed(0))
    assert (runs["none"].nfe > 4).all()  # several steps per block, so the cached path really ran
    assert torch.equal(runs[cache].response_ids, runs["none"].response_ids)
    torch.testing.assert_close(runs[cache].log_probs, runs["none"].log_probs, atol=1e-5, rtol=0)


def test_full_attention_caches_differ_only_after_a_blocks_first_step():
    """Deeper full-attention models: the refreshing step is exact, later steps use stale keys (documented)."""
    model = _model(num_layers=2)
    ids, mask = _batch(model)
    config = dict(gen_length=16, block_length=16, threshold=0.05, early_stop=False)
    plain = generate(model, ids, mask, SamplerConfig(**config))
    dual = generate(model, ids, mask, SamplerConfig(cache="dual", **config))
    first = plain.step_map == 0
    assert torch.equal(dual.step_map == 0, first)
    torch.testing.assert_close(dual.log_probs[first], plain.log_probs[first], atol=1e-5, rtol=0)


def test_block_model_rows_start_responses_inside_their_prompts_last_block():
    """Position alignment: response token j of a prompt of length n lies in block (n + j) // block_size."""
    model = _model(attention="block")
    ids, mask = _batch(model)
    trajectory = generate(model, ids, mask, SamplerConfig(gen_length=8))
    assert trajectory.block_offset.tolist() == (mask.sum(1) % 4).tolist()


# --- bad input ----------------------------------------------------------------------------------------------------


def test_empty_prompt_list_is_an_error():
    with pytest.raises(ValueError, match="no prompts"):
        rollout(_model(), [], SamplerConfig(gen_length=8))


def test_empty_prompt_row_is_an_error():
    model = _model()
    ids, mask = _batch(model)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(model, ids, mask, SamplerConfig(gen_length=8))


def test_right_padded_prompts_are_an_error():
    model = _model()
    ids, mask = _batch(model)
    with pytest.raises(ValueError, match="left padded"):
        generate(model, ids.flip(1), mask.flip(1), SamplerConfig(gen_length=8))


@pytest.mark.parametrize("kwargs", [dict(block_length=3), dict(block_length=5, threshold=0.9)])
def test_gen_length_not_a_multiple_of_block_length(kwargs):
    with pytest.raises(ValueError, match=r"block_length=\d does not divide gen_length=8"):
        SamplerConfig(gen_length=8, **kwargs)


def test_block_model_gen_length_must_be_a_multiple_of_its_block():
    model = _model(attention="block")
    ids, mask = _batch(model)
    with pytest.raises(ValueError, match="block_length=4 does not divide gen_length=6"):
        generate(model, ids, mask, SamplerConfig(gen_length=6, threshold=0.9))
    with pytest.raises(ValueError, match="attends in blocks of 4 tokens"):
        generate(model, ids, mask, SamplerConfig(gen_length=8, block_length=8))


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01])
def test_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match=rf"threshold must be in \(0, 1\], got {threshold}"):
        SamplerConfig(gen_length=8, threshold=threshold)


def test_prompt_longer_than_the_context_is_an_error():
    model = _model()  # 256 positions
    ids, mask = _batch(model, ["1" * 250])
    with pytest.raises(ValueError, match="a prompt of 250 tokens plus gen_length 8 exceeds the model's context of 256"):
        generate(model, ids, mask, SamplerConfig(gen_length=8))


def test_caches_refused_for_the_attention_bias_mask_format():
    model = _model()
    llada_like = DiffusionLM(
        model.model, dataclasses.replace(model.conventions, mask_format="attention_bias"), model.tokenizer
    )
    ids, mask = _batch(model)
    with pytest.raises(ValueError, match="takes its mask as attention_bias takes no position ids or KV cache"):
        generate(llada_like, ids, mask, SamplerConfig(gen_length=8, cache="prefix"))


@pytest.mark.parametrize("attention", ["full", "block"])
def test_caches_work_on_a_qwen2_backbone(attention):
    """Grouped-query attention and qkv biases (Qwen2, the SDAR/Dream family) through the same cache path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dlm_rl.models import Conventions

    torch.manual_seed(0)
    backbone = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=1,
    )).eval()
    block_size = 4 if attention == "block" else None
    model = DiffusionLM(backbone, Conventions(mask_token_id=2, attention=attention, block_size=block_size))
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    runs = {}
    for cache in ("none", "prefix", "dual"):
        config = SamplerConfig(gen_length=8, block_length=4, threshold=0.05, cache=cache)
        runs[cache] = generate(model, ids, mask, config, torch.Generator().manual_seed(0))
    for cache in ("prefix", "dual"):
        assert torch.equal(runs[cache].response_ids, runs["none"].response_ids), cache
        torch.testing.assert_close(runs[cache].log_probs, runs["none"].log_probs, atol=1e-5, rtol=0)
