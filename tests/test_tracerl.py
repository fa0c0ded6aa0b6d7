"""The TraceRL trainer end to end on a tiny model: a recipe naming a user's own reward file runs, the reward is
loaded and used (the logged scores are that function's), the metrics are finite, and bad recipes fail early."""

from __future__ import annotations

import json
import math

import pytest

from dlm_rl.cli import main
from dlm_rl.recipe import parse_recipe

USER_REWARD = '''\
def prefers_short(prompts, completions, answer):
    """A user's reward: 1 for an empty completion, falling by 0.1 per character."""
    return [max(0.0, 1.0 - 0.1 * len(c)) for c in completions]
'''

RECIPE = """\
trainer: tracerl
model: tiny
task: addition3
train_size: 64
eval_size: 8
reward_funcs: [rewards.format:boxed, {reward_file}:prefers_short]
reward_weights: [0.5, 1.0]
lora_r: 4
lora_target_modules: [q_proj, v_proj]
num_generations: 4
prompts_per_step: 4
max_steps: 2
eval_steps: 2
learning_rate: 1.0e-3
output_dir: {out}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tracerl")
    reward_file = directory / "my_rewards.py"
    reward_file.write_text(USER_REWARD)
    recipe = directory / "recipe.yaml"
    recipe.write_text(RECIPE.format(reward_file=reward_file, out=directory / "run"))
    assert main(["train", str(recipe)]) == 0
    return directory / "run"


def test_a_users_reward_named_in_the_recipe_is_loaded_and_used(run_dir):
    lines = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4 * 4  # steps x prompts x generations
    for line in lines:
        assert line["prefers_short"] == pytest.approx(max(0.0, 1.0 - 0.1 * len(line["completion"])))
        assert line["total"] == pytest.approx(0.5 * line["boxed"] + line["prefers_short"])


def test_metrics_are_logged_per_step_and_finite(run_dir):
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/greedy_accuracy" in metrics[0] and "eval/greedy_accuracy" in metrics[2]
    for m in metrics[1:]:
        assert "reward/prefers_short" in m and "reward/total" in m
        if not m.get("skipped"):
            assert math.isfinite(m["loss"]) and m["rows"] > 0
            assert m["optimizer_steps"] > 1 and m["kl"] > 0  # minibatches after the first see a ratio ≠ 1
    assert (run_dir / "final" / "adapter_config.json").exists()


def test_a_misspelt_reward_fails_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer: tracerl\nmodel: tiny\nreward_funcs: [rewards.math:acuracy]\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(recipe)]) == 2
    assert "did you mean 'rewards.math:accuracy'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_validation(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer: tracerl\nnum_generations: 1\n")
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        parse_recipe(str(recipe))
    recipe.write_text("trainer: tracerl\nreward_weights: [1.0, 2.0]\n")
    with pytest.raises(ValueError, match="1 reward_funcs but 2 reward_weights"):
        parse_recipe(str(recipe))


def test_with_lora_only_the_adapter_gets_gradients_and_the_reference_is_the_disabled_adapter():
    import torch

    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig
    from dlm_rl.rl.rows import Rows, reference_log_probs, response_log_probs
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    def tiny():
        return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)

    base, model = tiny(), add_lora(tiny(), LoraArguments(use_lora=True, lora_r=4))
    with torch.no_grad():  # a trained adapter: LoRA B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn_like(p))

    def by_characters(prompts, completions, **columns):
        return [float(sum(map(ord, c)) % 5) for c in completions]

    engine = LocalEngine(model, rows_per_chunk=16, rewards=Rewards([by_characters]))
    trajectories = engine.generate(["1+2=", "3+4=", "5+6=", "7+8="], 4, SamplerConfig(gen_length=8, temperature=1.0))
    config = TraceRLConfig(model="tiny", beta=0.1, kl_reference="reference")
    learner = Learner(model, config, gen_length=8)
    learner.optimizer = torch.optim.SGD(learner.parameters, lr=0.0)
    metrics = learner.update(trajectories)
    assert math.isfinite(metrics["loss"]) and metrics["kl"] > 0  # the adapter moved the policy off the reference
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    ids = torch.randint(3, 90, (2, 10))
    rows = Rows(input_ids=ids, attention_mask=torch.ones_like(ids), targets=torch.ones(2, 4, dtype=torch.bool),
                response_ids=ids[:, -4:], sample=torch.arange(2), step=torch.zeros(2), weight=torch.ones(2))
    with torch.no_grad():
        reference = reference_log_probs(model, rows)
        assert torch.allclose(reference, response_log_probs(base, rows), atol=1e-6)
        assert not torch.allclose(response_log_probs(model, rows), response_log_probs(base, rows))


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "diffu_grpo", "inner_epochs": 2},
        {"method": "coupled"},
        {"method": "random_masking"},
        {"method": "tracerl", "value_model": True, "inner_epochs": 2, "shrink": 2},
        {"method": "wd1", "inner_epochs": 2},
        {"method": "justgrpo", "ppo_minibatches": 1, "beta": 0.0},
        {"method": "espo", "inner_epochs": 2, "ppo_minibatches": 1, "micro_batch_rows": 3},
        {"method": "gdpo", "kl_reference": "reference"},
        {"method": "spg", "inner_epochs": 2, "micro_batch_rows": 3},
        {"method": "bgpo", "bgpo_draws": 3, "micro_batch_rows": 5},
    ],
    ids=["diffu_grpo", "coupled", "random_masking", "tracerl+value", "wd1", "justgrpo", "espo", "gdpo", "spg", "bgpo"],
)
def test_every_method_trains_and_writes_tensorboard_and_a_curve(tmp_path, extra):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    config = TraceRLConfig(model="tiny", dataset_name="addition3", train_size=16, eval_size=4, num_generations=4,
                           prompts_per_step=2, max_steps=2, eval_steps=2, lora_r=4, learning_rate=1e-3,
                           reward_funcs=[f"{_write_reward(tmp_path)}:by_length"],  # varies within groups
                           output_dir=str(tmp_path / "run"), **extra)
    last = run(config)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics[1:] if not m.get("skipped")]
    assert trained, "no step trained"
    for m in trained:
        assert math.isfinite(m["loss"]) and m["rows"] > 0
        if extra["method"] in ("wd1", "spg"):  # no π_old: no ratio, KL or entropy; the likelihood it weighs instead
            assert m["log_likelihood"] < 0 and not {"kl", "clip_fraction", "entropy"} & m.keys()
        elif extra["method"] == "bgpo":  # no clip, no KL: the mean of the draws' ratios instead
            assert math.isfinite(m["entropy"]) and m["ratio_mean"] > 0 and not {"kl", "clip_fraction"} & m.keys()
        else:
            assert math.isfinite(m["entropy"]) and m["kl"] >= 0 and 0 <= m["clip_fraction"] <= 1
        if extra.get("value_model"):
            assert math.isfinite(m["value_loss"]) and "value_mean" in m
    assert last["step"] == 2
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if extra.get("value_model"):
        assert (tmp_path / "run" / "final" / "value_model.pt").exists()


def _write_reward(directory):
    path = directory / "by_length.py"
    path.write_text("def by_length(prompts, completions, **columns):\n"
                    "    return [float(len(c) % 3) for c in completions]\n")
    return path


def test_a_batch_emptied_by_the_group_filter_is_skipped_and_the_run_goes_on(tmp_path):
    from dlm_rl.trainers.tracerl import TraceRLConfig, run

    path = tmp_path / "constant.py"
    path.write_text("def constant(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    config = TraceRLConfig(model="tiny", dataset_name="addition3", train_size=8, eval_size=2, num_generations=2,
                           prompts_per_step=2, max_steps=3, eval_steps=3, lora_r=4, report_to="none",
                           reward_funcs=[f"{path}:constant"], output_dir=str(tmp_path / "run"))
    last = run(config)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped") for m in metrics[1:]] == [1, 1, 1] and last["step"] == 3
    assert all(m["kept_fraction"] == 0 for m in metrics[1:])


def test_value_model_learns_the_group_z_scores_and_only_its_adapter_and_head_train():
    import torch

    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.rl.value import ValueModel
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    torch.manual_seed(0)  # the adapters' initialisation
    config = TraceRLConfig(model="tiny", value_model=True, lora_r=4, learning_rate=0.0, value_learning_rate=3e-3,
                           ppo_minibatches=1)
    model = tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)
    value = ValueModel.from_policy(model, config)
    add_lora(model, LoraArguments(use_lora=True, lora_r=4))
    engine = LocalEngine(model, rows_per_chunk=16, rewards=Rewards([lambda prompts, completions, **c: [
        float(i % 2) for i in range(len(completions))]]))  # every group: half 1, half 0 (by sample index)
    trajectories = engine.generate(["1+2=", "3+4="], 4, SamplerConfig(gen_length=8, temperature=1.0))
    learner = Learner(model, config, gen_length=8, value=value)
    epochs, _ = learner.prepare(trajectories)
    (batch,) = epochs[0]
    rows = batch["rows"]
    # V = 0 at the start, so with γ = λ = 1 each token's advantage is its sample's group z-score: ±1 (population
    # std of {0, 1, 0, 1} is 0.5), negative for the samples without reward (raw rewards would give 0, never < 0).
    signs = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(trajectories[0]))])
    assert torch.allclose(batch["advantages"][rows.targets], signs[rows.sample][:, None].expand_as(rows.targets)[
        rows.targets], atol=1e-5)
    first = learner.update(trajectories)
    assert first["value_mean"] == 0.0 and first["value_loss"] == pytest.approx(0.5, rel=1e-4)  # ½ z² at V = 0
    for name, p in value.named_parameters():
        assert (p.grad is not None) == ("lora_" in name or name.startswith("head")), name
    for _ in range(30):
        last = learner.update(trajectories)
    # A sample's later states show its tokens, so the value model can tell the rewarded samples from the others.
    assert last["value_loss"] < 0.6 * first["value_loss"]


def _tiny_rollout(reward, n_prompts=2, samples=4, gen_length=8, **model_kwargs):
    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig

    model = add_lora(tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0, **model_kwargs),
                     LoraArguments(use_lora=True, lora_r=4))
    engine = LocalEngine(model, rows_per_chunk=64, rewards=Rewards([reward]))
    prompts = ["1+2=", "3+4=", "5+6=", "7+8="][:n_prompts]
    return model, engine.generate(prompts, samples, SamplerConfig(gen_length=gen_length, temperature=1.0))


def test_old_log_probs_from_the_sampler_equal_the_exact_recompute():
    import torch

    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    model, (trajectory,) = _tiny_rollout(lambda prompts, completions, **c: [1.0] * len(completions))
    exact = Learner(model, TraceRLConfig(model="tiny"), gen_length=8)
    recorded = Learner(model, TraceRLConfig(model="tiny", old_log_probs="sampler"), gen_length=8)
    rows = exact.rows(trajectory)
    (a, _), (b, _) = exact.score_old(rows, trajectory), recorded.score_old(rows, trajectory)
    assert torch.isfinite(b).all() and (a - b)[rows.targets].abs().max() <= 1e-5
    with pytest.raises(ValueError, match="needs method 'tracerl'"):
        TraceRLConfig(model="tiny", method="coupled", old_log_probs="sampler")


def test_justgrpo_rolls_out_left_to_right_and_trains_each_token_in_the_state_it_was_drawn_in():
    import torch

    from dlm_rl.rollout import LocalEngine
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig, rollout_sampler

    config = TraceRLConfig(model="tiny", method="justgrpo", block_length=4, threshold=0.5)  # sampler keys overridden
    model, _ = _tiny_rollout(lambda prompts, completions, **c: [1.0] * len(completions))
    (trajectory,) = LocalEngine(model, rows_per_chunk=64).generate(["1+2=", "33+4="], 4, rollout_sampler(config, 8))
    order = torch.arange(8).expand_as(trajectory.step_map)
    drawn = trajectory.trainable  # up to the first EOS
    assert drawn[:, 0].all() and torch.equal(trajectory.step_map[drawn], order[drawn])  # token j at step j
    rows = Learner(model, config, gen_length=8).rows(trajectory)
    assert (rows.targets.sum(1) == 1).all() and len(rows) == int(drawn.sum())  # one row per token
    for row in range(len(rows)):  # the row's state: the prompt, the tokens before its target, masks after
        j = int(rows.targets[row].nonzero())
        state = rows.input_ids[row, -8:]
        assert torch.equal(state[:j], rows.response_ids[row, :j])
        assert (state[j:] == model.mask_token_id).all()
    parallel = rollout_sampler(TraceRLConfig(model="tiny", block_length=4, threshold=0.5), 8)
    assert (parallel.block_length, parallel.threshold) == (4, 0.5)
    with pytest.raises(ValueError, match="justgrpo' needs shrink 1"):
        TraceRLConfig(model="tiny", method="justgrpo", shrink=2)


def test_truncation_penalty_separates_otherwise_equal_rewards():
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    model, trajectories = _tiny_rollout(lambda prompts, completions, **c: [1.0] * len(completions), gen_length=4)
    (trajectory,) = trajectories
    trajectory.finish_reason = ["length", "eos"] * (len(trajectory) // 2)  # half of each group hit the limit
    assert Learner(model, TraceRLConfig(model="tiny"), gen_length=4).update(trajectories).get("skipped") == 1
    metrics = Learner(model, TraceRLConfig(model="tiny", truncation_penalty=0.5), gen_length=4).update(trajectories)
    assert not metrics.get("skipped") and metrics["kept_fraction"] == 1.0 and metrics["rows"] > 0


def test_value_model_reads_packed_rows_of_a_block_attention_model():
    import torch

    from dlm_rl.rl.value import ValueModel
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    def by_length(prompts, completions, **columns):
        return [float(len(c) % 3) for c in completions]

    model, trajectories = _tiny_rollout(by_length, gen_length=8, attention="block", block_size=4)
    config = TraceRLConfig(model="tiny", value_model=True, value_learning_rate=1e-2)
    learner = Learner(model, config, gen_length=8, value=ValueModel.from_policy(model))
    rows = learner.rows(trajectories[0])
    assert rows.noisy is not None  # the packed layout
    first = learner.update(trajectories)
    assert math.isfinite(first["value_loss"]) and first["value_mean"] == 0.0
    learner.update(trajectories)
    with torch.no_grad():
        assert learner.value(rows).abs().max() > 0  # the head moved


@pytest.mark.parametrize("method", ["espo", "gdpo", "spg"])
def test_sequence_level_methods_give_the_same_gradient_whatever_the_micro_batch_size(method):
    """Their loss is a function of each sample's whole ELBO estimate, so a forward pass must hold all of a sample's
    rows: cutting them across passes (as row-level methods may) would change the gradient."""
    import torch

    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    model, (trajectory,) = _tiny_rollout(lambda prompts, completions, **c: [float(sum(map(ord, x)) % 3)
                                                                            for x in completions])
    with torch.no_grad():  # a trained adapter, so that the KL to the reference (the base) is not flat
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    gradients = []
    for size in (64, 3):
        config = TraceRLConfig(model="tiny", method=method, micro_batch_rows=size, ppo_minibatches=1, beta=1.0,
                               kl_reference="reference", max_grad_norm=1e9)
        learner = Learner(model, config, gen_length=8)
        learner.optimizer = torch.optim.SGD(learner.parameters, lr=0.0)
        assert len(learner.micro_batches({"rows": learner.rows(trajectory)})) == (1 if size == 64 else 8)
        learner.generator.manual_seed(0)  # the same masks for both sizes
        learner.update([trajectory])
        gradients.append(torch.cat([p.grad.flatten() for p in learner.parameters]))
    assert gradients[0].abs().max() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["spg", "espo", "bgpo"])
def test_responses_with_nothing_to_train_give_a_zero_step_not_a_crash(method):
    """IGPO can give every token of a response (nothing drawn, nothing trained): a step of only such responses."""
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    model, (trajectory,) = _tiny_rollout(lambda prompts, completions, **c: [float(sum(map(ord, x)) % 3)
                                                                            for x in completions])
    trajectory.sampled[:] = False
    learner = Learner(model, TraceRLConfig(model="tiny", method=method, ppo_minibatches=1), gen_length=8)
    metrics = learner.update([trajectory])
    assert abs(metrics["loss"]) < 1e-6 and metrics["grad_norm"] == 0.0  # ESPO: −mean A, 0 up to rounding
