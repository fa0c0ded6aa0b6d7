"""Rollout engines: chunk planning, rewards attached, Local vs Ray determinism, in-memory weight sync, and faults
(an actor killed mid-batch, a hung actor, a chunk that keeps failing, a sampler error)."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time

import pytest
import torch

from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.models.tiny import tiny_model
from dlm_rl.reward_functions import Rewards
from dlm_rl.rollout import LocalEngine, RayEngine, RolloutError
from dlm_rl.rollout.engine import plan, weight_snapshot
from dlm_rl.sampling import SamplerConfig

ray = pytest.importorskip("ray")

PROMPTS = [f"{i}+{i + 1}+{i + 2}=" for i in range(10)]
CONFIG = SamplerConfig(gen_length=16, block_length=8, temperature=1.0, threshold=0.6)
TINY = dict(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)


def tiny():
    return tiny_model(**TINY)


def tiny_with_lora():
    return add_lora(tiny(), LoraArguments(use_lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"]))


def slow_tiny(seconds_per_forward: float):
    model = tiny()
    model.register_forward_pre_hook(lambda *_: time.sleep(seconds_per_forward))
    return model


def tiny_that_hangs_once(marker: str):
    """The first forward (in whichever actor removes the marker file) never returns."""
    model = tiny()

    def hang(*_):
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        time.sleep(10**6)

    model.register_forward_pre_hook(hang)
    return model


def tiny_that_always_dies():
    model = tiny()
    model.register_forward_pre_hook(lambda *_: os._exit(1))
    return model


def signature(trajectories) -> list:
    """Everything a trajectory records, NaN-free so that equal means equal."""
    return [
        (t.prompt_index, t.sample_index, t.response_ids.tolist(), t.step_map.tolist(), t.nfe.tolist(),
         t.log_probs.nan_to_num(-1.0).tolist(), t.completions, t.finish_reason)
        for t in trajectories
    ]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two logit tensors; the mask token's -inf must sit in the same places."""
    assert torch.equal(a.isinf(), b.isinf())
    return (a - b)[~a.isinf()].abs().max().item()


def requested_pairs(trajectories) -> list:
    return sorted(pair for t in trajectories for pair in zip(t.prompt_index, t.sample_index))


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors get this file's factories by value
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # room for two engines at once
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_result():
    return LocalEngine(tiny(), rows_per_chunk=6, seed=7).generate(PROMPTS, 3, CONFIG)


# --- without Ray -------------------------------------------------------------------------------------------------


def test_plan_keeps_a_prompts_samples_together_and_seeds_every_chunk_differently():
    chunks = plan(PROMPTS, 3, rows_per_chunk=6, seed=7, call=0)
    assert [c.prompt_index for c in chunks[:2]] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    assert all(c.sample_index == [0, 1, 2] * (len(c.prompts) // 3) for c in chunks)
    assert sum(len(c.prompts) for c in chunks) == 30
    seeds = [c.seed for c in chunks] + [c.seed for c in plan(PROMPTS, 3, 6, seed=7, call=1)]
    assert len(set(seeds)) == len(seeds)
    assert [c.prompt_index for c in plan(PROMPTS, 8, rows_per_chunk=6, seed=0, call=0)][0] == [0] * 8


def test_local_engine_returns_each_requested_sample_once_with_its_row_and_rewards(local_result):
    assert requested_pairs(local_result) == [(p, s) for p in range(10) for s in range(3)]
    rows = [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS)]

    def answer_length(prompts, completions, answer):
        return [float(len(c) + len(a)) for c, a in zip(completions, answer)]

    def breaks_on_prompt_two(prompts, completions, **columns):
        if "2+3+4=" in prompts:
            raise RuntimeError("cannot score this one")
        return [1.0] * len(prompts)

    engine = LocalEngine(tiny(), rows_per_chunk=6, seed=7, rewards=Rewards([answer_length, breaks_on_prompt_two]))
    result = engine.generate(rows, 3, CONFIG)
    assert signature(result) == signature(local_result)  # rewards change nothing about sampling
    for t in result:
        assert [row["answer"] for row in t.rows] == [str(i) for i in t.prompt_index]
        assert t.rewards["answer_length"] == [len(c) + len(str(i)) for c, i in zip(t.completions, t.prompt_index)]
        for i, error in zip(t.prompt_index, t.rewards["errors"]):
            assert (error is not None) == (i == 2), (i, error)
            assert error is None or "cannot score this one" in error


def test_repeated_calls_draw_new_samples_and_an_explicit_seed_repeats_them():
    engine = LocalEngine(tiny(), rows_per_chunk=6, seed=7)
    first, second = engine.generate(PROMPTS, 3, CONFIG), engine.generate(PROMPTS, 3, CONFIG)
    assert signature(first) != signature(second)
    assert signature(LocalEngine(tiny(), rows_per_chunk=6).generate(PROMPTS, 3, CONFIG, seed=7)) == signature(first)


def test_an_empty_request_returns_no_trajectories(caplog):
    with caplog.at_level(logging.WARNING):
        assert LocalEngine(tiny()).generate([], 4, CONFIG) == []
    assert "empty request" in caplog.text


def test_rollout_batch_size_bounds_the_trainers_sampler_batches():
    from dlm_rl.trainers.online import rollout_engine
    from dlm_rl.trainers.tracerl import TraceRLConfig

    model, batches = tiny(), []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    config = TraceRLConfig(prompts_per_step=5, num_generations=2, rollout_batch_size=5)
    trajectories = rollout_engine(config, model, None).generate(PROMPTS[:5], 2, CONFIG)
    assert sum(len(t.prompt_index) for t in trajectories) == 10
    assert max(batches) == 4  # whole prompts, at most 5 rows: 2 + 2 + 1 prompts (finished rows leave a batch)
    batches.clear()
    rollout_engine(TraceRLConfig(prompts_per_step=5, num_generations=2), model, None).generate(PROMPTS[:5], 2, CONFIG)
    assert max(batches) == 10  # unset: the step's share at once


def test_lora_sync_sends_only_the_adapter():
    model = tiny_with_lora()
    adapter = weight_snapshot(model, full=False)
    assert adapter and all("lora_" in name for name in adapter)
    assert len(weight_snapshot(model, full=True)) > len(adapter)


def test_local_engine_sync_copies_another_models_weights_and_advances_the_version():
    trainer, engine = tiny(), LocalEngine(tiny())
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.05)
    assert engine.sync_weights(trainer) == 1
    for (name, a), b in zip(trainer.state_dict().items(), engine.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert engine.generate(PROMPTS[:2], 1, CONFIG)[0].weight_version == 1


def hints_for(n_prompts: int, n_samples: int) -> list:
    """Sample 1 of every prompt gets tokens 40 and 41 at positions 2 and 9; the others none."""
    hint = [-1] * CONFIG.gen_length
    hint[2], hint[9] = 40, 41
    return [hint if s == 1 else None for _ in range(n_prompts) for s in range(n_samples)]


def test_hints_reach_exactly_their_prompt_and_sample_and_are_never_sampled():
    (trajectory,) = LocalEngine(tiny(), rows_per_chunk=64, seed=7).generate(PROMPTS[:4], 3, CONFIG,
                                                                            hints=hints_for(4, 3))
    hinted = torch.tensor(trajectory.sample_index) == 1
    assert trajectory.response_ids[hinted][:, [2, 9]].tolist() == [[40, 41]] * 4
    assert not trajectory.sampled[hinted][:, [2, 9]].any() and trajectory.sampled[hinted].any(1).all()
    with pytest.raises(ValueError, match="one per"):
        LocalEngine(tiny(), rows_per_chunk=64).generate(PROMPTS[:4], 3, CONFIG, hints=hints_for(4, 2))


def test_ray_engine_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'dlm-rl\[ray\]'"):
        RayEngine(tiny)


# --- on Ray ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_actors(ray_cluster):
    with RayEngine(tiny, num_actors=2, threads_per_actor=1, rows_per_chunk=6, seed=7) as engine:
        yield engine


def test_same_seed_trajectories_are_identical_local_and_ray_with_one_and_two_actors(
    ray_cluster, two_actors, local_result
):
    with RayEngine(tiny, num_actors=1, threads_per_actor=2, rows_per_chunk=6, seed=7) as one_actor:
        assert signature(one_actor.generate(PROMPTS, 3, CONFIG)) == signature(local_result)
    two_actors.calls = 0  # as if fresh: the fixture may have served other tests first
    assert signature(two_actors.generate(PROMPTS, 3, CONFIG)) == signature(local_result)
    two_actors.calls = 0  # hints travel with their chunk to whichever actor samples it
    local = LocalEngine(tiny(), rows_per_chunk=6, seed=7).generate(PROMPTS, 3, CONFIG, hints=hints_for(10, 3))
    assert signature(two_actors.generate(PROMPTS, 3, CONFIG, hints=hints_for(10, 3))) == signature(local)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_sync_every_actor_has_the_trainers_logits(ray_cluster, lora):
    factory = tiny_with_lora if lora else tiny
    trainer = factory()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an "update": every trainable tensor moves (LoRA B starts at zero)
        for p in trainer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    ids = torch.randint(0, 90, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    expected = trainer(ids, mask).logits
    with RayEngine(factory, num_actors=2, threads_per_actor=1, rows_per_chunk=6) as engine:
        before = engine.logits(ids, mask)
        assert all(max_diff(logits, expected) > 1e-3 for logits in before)
        version = engine.sync_weights(trainer, full=not lora)
        for logits in engine.logits(ids, mask):
            assert max_diff(logits, expected) <= 1e-6
        assert {t.weight_version for t in engine.generate(PROMPTS, 2, CONFIG)} == {version} == {1}


def test_a_sampler_error_in_an_actor_is_raised_with_the_prompt_not_retried(two_actors):
    bad = SamplerConfig(gen_length=4096, block_length=64)  # beyond the tiny model's 256 positions
    message = r"generation raised for prompts \d+\.\.\d+ \(first: '\d+\+\d+\+\d+='\).*exceeds the model's context"
    with pytest.raises(RolloutError, match=message):
        two_actors.generate(PROMPTS, 1, bad)


def test_rollout_completes_exactly_when_one_of_two_actors_is_killed_mid_batch(ray_cluster, local_result, caplog):
    factory = functools.partial(slow_tiny, 0.02)  # about 0.3 s per chunk: the kill lands mid-batch
    with RayEngine(factory, num_actors=2, threads_per_actor=1, rows_per_chunk=6, seed=7) as engine:
        victim = engine.actors[0]
        killer = threading.Timer(0.5, lambda: ray.kill(victim))
        with caplog.at_level(logging.WARNING):
            killer.start()
            result = engine.generate(PROMPTS * 4, 3, CONFIG)
            killer.join()
    assert requested_pairs(result) == [(p, s) for p in range(40) for s in range(3)]
    assert "rollout actor 0: the actor died" in caplog.text and "rollout actor 0 restarted" in caplog.text
    assert signature(result[:5]) == signature(local_result)  # re-run chunks are the same chunks


def test_a_hung_actor_is_timed_out_and_its_chunk_rerun(ray_cluster, tmp_path, local_result, caplog):
    marker = tmp_path / "hang"
    marker.write_text("")
    factory = functools.partial(tiny_that_hangs_once, str(marker))
    # 15 s, not less: the rerun on the restarted actor must finish within the same limit, and with three busy
    # processes on two cores it once took more than 5 s
    with RayEngine(factory, num_actors=1, threads_per_actor=2, rows_per_chunk=6, seed=7, chunk_timeout_s=15) as engine:
        with caplog.at_level(logging.WARNING):
            result = engine.generate(PROMPTS, 3, CONFIG)
    assert signature(result) == signature(local_result)
    assert "no result after 15 s (hung)" in caplog.text and "restarted" in caplog.text


def test_actors_that_cannot_be_placed_are_a_clear_error_not_a_hang(ray_cluster):
    with pytest.raises(RolloutError, match=r"did not start within 1 s\. Each needs 64 CPU\(s\)"):
        RayEngine(tiny, num_actors=1, threads_per_actor=64, startup_timeout_s=1)


def test_a_chunk_that_keeps_killing_its_actor_raises_naming_the_prompt(ray_cluster):
    with RayEngine(tiny_that_always_dies, num_actors=1, max_failures=2) as engine:
        with pytest.raises(RolloutError, match=r"chunk 0 .*failed 2 times; first prompt: '0\+1\+2='.*actor died"):
            engine.generate(PROMPTS, 1, CONFIG)


# --- the trainers on Ray actors ----------------------------------------------------------------------------------


def by_characters(prompts, completions, **columns):
    """A reward that differs within most groups, so that every step trains."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _metrics(directory) -> list[dict]:
    import json

    lines = [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


@pytest.mark.parametrize("trainer, use_lora", [("tracerl", True), ("tracerl", False), ("vrpo", True)])
def test_a_trainer_on_a_ray_actor_logs_what_it_logs_in_process(ray_cluster, tmp_path, trainer, use_lora):
    """The actor builds its own policy; the first full sync and a sync after every update must make its rollouts
    the trainer's own, so that each step's rewards, losses and held-out accuracy come out the same."""
    from dlm_rl.trainers import tracerl, vrpo

    module, config_class = (tracerl, tracerl.TraceRLConfig) if trainer == "tracerl" else (vrpo, vrpo.VRPOConfig)
    settings = dict(model="tiny", dataset_name="addition3", train_size=8, eval_size=2, num_generations=4, prompts_per_step=2,
                    lora_r=4, use_lora=use_lora, max_steps=3, eval_steps=3, report_to="none", learning_rate=3e-3,
                    reward_funcs=[f"{__file__}:by_characters"])
    module.run(config_class(output_dir=str(tmp_path / "local"), **settings))
    module.run(config_class(output_dir=str(tmp_path / "ray"), rollout_actors=1, **settings))
    local, on_ray = _metrics(tmp_path / "local"), _metrics(tmp_path / "ray")
    assert [m["step"] for m in on_ray] == [0, 1, 2, 3] and all("loss" in m for m in on_ray[1:])
    assert on_ray == local


def test_a_trainer_on_a_ray_actor_resumes_exactly(ray_cluster, tmp_path):
    """The actors start from their own fresh copies: a resumed run must send them the restored weights (every
    weight, once) before it samples, to log what the uninterrupted run logs."""
    import shutil

    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    settings = dict(model="tiny", dataset_name="addition3", train_size=8, eval_size=2, num_generations=4, prompts_per_step=2,
                    lora_r=4, max_steps=3, eval_steps=3, report_to="none", learning_rate=3e-3, rollout_actors=1,
                    save_steps=1, save_total_limit=None, reward_funcs=[f"{__file__}:by_characters"])
    run(TraceRLConfig(output_dir=str(tmp_path / "whole"), **settings))
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # steps 0-2, as written then
    run(TraceRLConfig(output_dir=str(tmp_path / "resumed"), resume="latest", **settings))
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "whole")


def test_rollout_actors_must_not_be_negative_nor_set_without_rollouts(tmp_path):
    from dlm_rl.trainers.tracerl import TraceRLConfig
    from dlm_rl.trainers.vrpo import VRPOConfig

    with pytest.raises(ValueError, match="rollout_actors must be 0"):
        TraceRLConfig(model="tiny", rollout_actors=-1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "{i}+1=", "chosen": "{i + 1}", "rejected": "0"}}\n' for i in range(9)))
    with pytest.raises(ValueError, match="holds preference pairs, so there is nothing to sample"):
        VRPOConfig(model="tiny", dataset_path=str(pairs), gen_length=4, eval_size=2, prompts_per_step=2,
                   rollout_actors=1)


@pytest.mark.parametrize("world, prompts, actors, expected", [
    (1, 2, 1, 2), (1, 16, 3, 4), (1, 3, 8, 1), (2, 4, 2, 2), (2, 16, 8, 2), (3, 8, 1, 1), (4, 16, 1, 4),
])
def test_chunks_never_straddle_two_ranks_and_feed_every_actor(monkeypatch, world, prompts, actors, expected):
    from dlm_rl import distributed
    from dlm_rl.trainers.online import _prompts_per_chunk
    from dlm_rl.trainers.tracerl import TraceRLConfig

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    config = TraceRLConfig(model="tiny", prompts_per_step=prompts, rollout_actors=actors)
    assert _prompts_per_chunk(config) == expected
