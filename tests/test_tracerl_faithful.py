"""TraceRL as published: each test here failed on a departure the trainer used to make (one optimiser step per
rollout, β = 0, a per-row token normaliser, post-EOS targets, sampler log-probs with shrinkage, NaN from k3 off
the targets, GAE over packed-row ranks). The value arm's group z-scores are tested in test_tracerl.py."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_rl.rl.losses import ppo_trace_loss
from dlm_rl.rl.masking import diffu_grpo_rows, random_mask_rows
from dlm_rl.rl.trace import packed_trace_rows, trace_rows
from dlm_rl.rl.value import trace_gae
from dlm_rl.sampling.trajectory import Trajectory
from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

M, EOS, BLOCK = 99, 2, 4


def test_defaults_are_the_papers():
    config = TraceRLConfig(model="tiny")
    assert (config.epsilon, config.beta, config.kl_reference) == (0.2, 0.01, "old")
    assert config.normaliser == "length"  # a constant: a sample's weight does not grow with its number of steps
    assert config.ppo_minibatches > 1 and config.inner_epochs == 1


def _rollout():
    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig

    model = add_lora(tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0),
                     LoraArguments(use_lora=True, lora_r=4))
    half = Rewards([lambda prompts, completions, **c: [float(i % 2) for i in range(len(completions))]])
    engine = LocalEngine(model, rows_per_chunk=64, rewards=half)
    return model, engine.generate(["1+2=", "3+4="], 4, SamplerConfig(gen_length=8, temperature=1.0))


@pytest.mark.parametrize("minibatches", [1, 4])
def test_minibatches_make_the_ratio_its_clip_and_the_kl_to_the_old_policy_act(minibatches):
    model, trajectories = _rollout()
    config = TraceRLConfig(model="tiny", ppo_minibatches=minibatches, learning_rate=5e-2)
    learner = Learner(model, config, gen_length=8)
    metrics = learner.update(trajectories)
    assert metrics["optimizer_steps"] == minibatches
    assert learner.optimizer.state[learner.parameters[0]]["step"] == minibatches
    if minibatches == 1:  # π_θ = π_old at the only step: ratio 1, no clipping, k3 to π_old exactly 0
        assert metrics["kl"] == 0.0 and metrics["clip_fraction"] == 0.0
    else:  # after the first step π_θ ≠ π_old on the later minibatches
        assert metrics["kl"] > 0 and metrics["clip_fraction"] > 0


def test_every_sample_trains_in_exactly_one_minibatch():
    model, trajectories = _rollout()
    learner = Learner(model, TraceRLConfig(model="tiny", ppo_minibatches=3), gen_length=8)
    (batches,), _ = learner.prepare(trajectories)
    parts = learner.minibatches(batches)
    samples = [int(s) for part in parts for batch in part for s in torch.unique(batch["rows"].sample)]
    assert sorted(samples) == sorted(torch.unique(batches[0]["rows"].sample).tolist())
    rows = sum(len(batch["rows"]) for part in parts for batch in part)
    assert rows == len(batches[0]["rows"])


def post_eos_trajectory() -> Trajectory:
    """One sample: tokens 0-2 drawn, token 3 an EOS drawn at step 2, tokens 4-5 drawn at steps 0 and 1 (a diffusion
    sampler unmasks out of order), token 6 EOS drawn last, token 7 an early-stop fill."""
    return Trajectory(
        prompt_ids=torch.tensor([[11, 12]]),
        prompt_mask=torch.tensor([[1, 1]]),
        response_ids=torch.tensor([[30, 31, 32, EOS, 40, 41, EOS, EOS]]),
        step_map=torch.tensor([[0, 1, 1, 2, 0, 1, 3, 3]]),
        log_probs=torch.zeros(1, 8),
        sampled=torch.tensor([[True] * 7 + [False]]),
        nfe=torch.tensor([4]),
        block_length=8,
        block_offset=torch.tensor([2]),  # blocks are aligned to positions: the prompt fills 2 of the first 8
        finish_reason=["eos"],
        eos_token_id=EOS,
    )


def test_tokens_after_the_first_eos_are_never_targets():
    trajectory = post_eos_trajectory()
    answer = torch.tensor([[True, True, True, True, False, False, False, False]])  # the first EOS is trained
    assert torch.equal(trajectory.trainable, answer)
    generator = torch.Generator().manual_seed(0)
    layouts = {
        "tracerl": trace_rows(trajectory, M, s=1),
        "tracerl_packed": packed_trace_rows(trajectory, M, block_size=8, s=1),
        "diffu_grpo": diffu_grpo_rows(trajectory, M, generator),
        "coupled": random_mask_rows(trajectory, M, generator, coupled=True),
    }
    for name, rows in layouts.items():
        assert not rows.targets[:, 4:].any(), name
    assert torch.equal(layouts["tracerl"].targets.any(0, keepdim=True), answer)
    assert torch.equal(layouts["coupled"].targets.any(0, keepdim=True), answer)  # mask ∪ complement: every one
    # The states still show what the sampler had drawn: token 4 was visible from step 1 on.
    assert layouts["tracerl"].input_ids[1, 2 + 4] == 40


def test_sampler_log_probs_are_refused_with_shrinkage():
    TraceRLConfig(model="tiny", old_log_probs="sampler", shrink=1)
    with pytest.raises(ValueError, match="shrink 1"):
        TraceRLConfig(model="tiny", old_log_probs="sampler", shrink=2)


def test_the_loss_is_finite_whatever_sits_off_the_targets():
    """The sampler leaves log-prob 0 off its committed tokens, and a position the model finds impossible has logp
    −100: exp(logp_old − logp) = exp(100) overflows float32, and inf · 0 was NaN in the loss and its gradient."""
    logp = torch.tensor([[-1.0, -100.0, -100.0]], requires_grad=True)
    old = torch.tensor([[-1.2, 0.0, 0.0]])
    targets = torch.tensor([[True, False, False]])
    loss, stats = ppo_trace_loss(logp, old, torch.tensor([[1.0]]), targets, beta=0.01, normaliser=3)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all() and math.isfinite(stats["kl"])
    k3 = math.exp(-1.2 + 1.0) - (-1.2 + 1.0) - 1
    assert loss.item() == pytest.approx(-min(math.exp(0.2), 1.2) / 3 + 0.01 * k3 / 3, rel=1e-6)


def block_trajectory() -> Trajectory:
    """Block size 4, prompt of 3, response of 6 in blocks 0 | 1 1 1 1 | 2 with global steps 0 | 1 1 2 3 | 4."""
    return Trajectory(
        prompt_ids=torch.tensor([[11, 12, 13]]),
        prompt_mask=torch.tensor([[1, 1, 1]]),
        response_ids=torch.tensor([[30, 31, 32, 33, 34, 35]]),
        step_map=torch.tensor([[0, 1, 1, 2, 3, 4]]),
        log_probs=torch.zeros(1, 6),
        sampled=torch.ones(1, 6, dtype=torch.bool),
        nfe=torch.tensor([5]),
        block_length=BLOCK,
        block_offset=torch.tensor([3]),
        finish_reason=["length"],
    )


def test_gae_runs_over_global_steps_in_packed_rows():
    """A packed row holds the i-th state of every block at once (here row 0 trains steps 0, 1 and 4); step-level GAE
    must still see the trace's five steps, so with γ, λ < 1 packed rows give the plain rows' advantages."""
    trajectory = block_trajectory()
    token_values = torch.tensor([[0.1, -0.3, 0.4, 0.2, 0.6, -0.5]])
    reward = torch.tensor([1.0])
    advantages = {}
    for name, rows in {"plain": trace_rows(trajectory, M), "packed": packed_trace_rows(trajectory, M, BLOCK)}.items():
        gae = trace_gae(rows, token_values[rows.sample], reward, gamma=0.9, lam=0.8)
        per_token = torch.zeros(6)
        for n in range(len(rows)):
            per_token[rows.targets[n]] = gae[n, rows.targets[n]]
        advantages[name] = per_token
    assert len(packed_trace_rows(trajectory, M, BLOCK)) == 3 < len(trace_rows(trajectory, M)) == 5
    assert torch.allclose(advantages["packed"], advantages["plain"], atol=1e-6)
    # by hand: step values V* = 0.1, (−0.3 + 0.4)/2, 0.2, 0.6, −0.5; the last token: A = R − V = 1.5
    assert advantages["plain"][5].item() == pytest.approx(1.5)
    delta3 = 0.0 - 0.6 + 0.9 * -0.5
    assert advantages["plain"][4].item() == pytest.approx(delta3 + 0.9 * 0.8 * 1.5)


@pytest.mark.parametrize("method", ["tracerl", "diffu_grpo", "coupled", "random_masking"])
def test_every_method_reads_a_block_model_with_clean_earlier_blocks(method):
    """On a block-attention model every method's rows are packed (`[prompt ; clean ; noisy copy]`), so a block
    is scored given clean earlier blocks, as the sampler decoded it."""
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig

    model = tiny_model(hidden_size=32, num_layers=1, intermediate_size=64, attention="block", block_size=4, seed=0)
    (trajectory,) = LocalEngine(model, rows_per_chunk=8).generate(["1+2="], 2, SamplerConfig(gen_length=8))
    rows = Learner(model, TraceRLConfig(model="tiny", method=method, use_lora=False), gen_length=8).rows(trajectory)
    assert rows.noisy is not None and rows.block_size == 4
