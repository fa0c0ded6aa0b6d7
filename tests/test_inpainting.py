"""IGPO's inpainting: hints from a reference solution, row replacement in a trajectory, and a failed group sampled
again with hints whose right answers take the wrong ones' places."""

from __future__ import annotations

import math

import torch

from dlm_rl.models.tiny import tiny_model
from dlm_rl.reward_functions import Rewards
from dlm_rl.rollout import LocalEngine
from dlm_rl.sampling import SamplerConfig
from dlm_rl.sampling.trajectory import Trajectory
from dlm_rl.trainers.inpainting import inpaint_failed_groups, reference_hint
from dlm_rl.trainers.tracerl import TraceRLConfig

REFERENCE = "\\boxed{12}"


def test_a_hint_holds_a_fraction_of_the_reference_tokens_at_their_own_positions():
    tokenizer = tiny_model(hidden_size=32, num_layers=1, intermediate_size=64).tokenizer
    ids = tokenizer.encode(REFERENCE, add_special_tokens=False) + [tokenizer.eos_token_id]
    for fraction in (0.0, 0.5, 1.0):
        hint = reference_hint(tokenizer, REFERENCE, 16, fraction, torch.Generator().manual_seed(0))
        given = [i for i, token in enumerate(hint) if token >= 0]
        assert len(hint) == 16 and len(given) == round(fraction * len(ids))
        assert all(hint[i] == ids[i] for i in given)
    assert reference_hint(tokenizer, REFERENCE, 3, 1.0, torch.Generator()) == ids[:3]  # cut to the canvas
    messages = [{"role": "assistant", "content": REFERENCE}]  # a conversational dataset's completion
    assert reference_hint(tokenizer, messages, 16, 1.0, torch.Generator()) == ids + [-1] * (16 - len(ids))


def _trajectory(prompt_width: int, value: int) -> Trajectory:
    n = 2
    return Trajectory(
        prompt_ids=torch.full((n, prompt_width), value), prompt_mask=torch.ones(n, prompt_width, dtype=torch.long),
        response_ids=torch.full((n, 3), value + 1), step_map=torch.full((n, 3), value),
        log_probs=torch.full((n, 3), -float(value)), sampled=torch.ones(n, 3, dtype=torch.bool),
        nfe=torch.full((n,), value), block_length=3, block_offset=torch.zeros(n, dtype=torch.long),
        finish_reason=["eos", "length"], completions=[f"a{value}", f"b{value}"], prompt_index=[0, 0],
        sample_index=[0, 1], rows=[{"prompt": "p"}] * n, rewards={"total": [0.0, 0.0], "errors": [None, None]},
    )


def test_with_rows_takes_another_trajectorys_rows_and_left_pads_the_prompts():
    mine, other = _trajectory(2, 10), _trajectory(4, 20)
    other.rewards = {"total": [1.0, 0.5], "errors": [None, "x"]}
    merged = mine.with_rows([1], other, [0])
    assert merged.prompt_ids.tolist() == [[0, 0, 10, 10], [20, 20, 20, 20]]
    assert merged.prompt_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert merged.response_ids[:, 0].tolist() == [11, 21] and merged.nfe.tolist() == [10, 20]
    assert merged.completions == ["a10", "a20"] and merged.finish_reason == ["eos", "eos"]
    assert merged.rewards == {"total": [0.0, 1.0], "errors": [None, None]}
    assert merged.sample_index == [0, 1] and mine.response_ids[1, 0] == 11  # the original is unchanged


def test_a_group_that_failed_is_sampled_again_with_hints_and_its_right_answers_replace_wrong_ones():
    def exact(prompts, completions, **columns):
        return [float(c == ref) for c, ref in zip(completions, columns["completion"])]

    model = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)
    engine = LocalEngine(model, rows_per_chunk=64, rewards=Rewards([exact]))
    rows = [{"prompt": "5+7=", "completion": REFERENCE}, {"prompt": "1+2=", "completion": "\\boxed{3}"}]
    sampler = SamplerConfig(gen_length=12, temperature=1.0)
    (trajectory,) = engine.generate(rows, 4, sampler)
    assert trajectory.rewards["total"] == [0.0] * 8  # the random tiny model never writes the reference
    config = TraceRLConfig(model="tiny", num_generations=4, igpo=True, igpo_share=0.5, igpo_hint_min=1.0,
                           igpo_hint_max=1.0)  # every reference token given: every regeneration is right
    (after,), counts = inpaint_failed_groups(engine, [trajectory], config, sampler, model.tokenizer,
                                             torch.Generator().manual_seed(0))
    assert counts == {"igpo/groups": 2, "igpo/regenerated": 4, "igpo/kept": 4}
    replaced = [i for i, s in enumerate(after.sample_index) if s < 2]  # samples 0 and 1 of each prompt
    assert [after.completions[i] for i in replaced] == [REFERENCE, REFERENCE, "\\boxed{3}", "\\boxed{3}"]
    assert [after.rewards["total"][i] for i in replaced] == [1.0] * 4
    assert not after.sampled[replaced].any()  # all given, nothing drawn: nothing of theirs is trained
    kept = [i for i in range(8) if i not in replaced]
    assert torch.equal(after.response_ids[kept], trajectory.response_ids[kept])
    assert math.isclose(sum(after.rewards["total"]), 4.0)


def test_igpo_is_refused_before_a_model_loads_without_its_own_engine_or_reference_solutions(tmp_path, monkeypatch):
    import pytest

    from dlm_rl.trainers.tracerl import run

    with pytest.raises(ValueError, match="rollout_actors: 0"):
        TraceRLConfig(model="tiny", igpo=True, rollout_actors=2)
    with pytest.raises(ValueError, match="must not exceed"):
        TraceRLConfig(model="tiny", igpo=True, igpo_hint_min=0.7, igpo_hint_max=0.3)
    monkeypatch.setattr("dlm_rl.model_spec.resolve_model", lambda *a, **k: pytest.fail("a model was loaded"))
    config = TraceRLConfig(model="tiny", igpo=True, gen_length=8, eval_size=1, reward_funcs=["rewards.math:accuracy"],
                           output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="'completion' column"):
        run(config, train_dataset=[{"prompt": "1+2="}, {"prompt": "3+4="}])
