"""DiDi-Instruct's parts on hand-made cases (discriminator loss and reward, grouped normalisation, ω clamping, the
two-step log-likelihood, EMA), the ancestral and guided samplers, the judge's measures, and a short trainer run."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dlm_rl.models.tiny import tiny_model
from dlm_rl.rl.didi import (
    Discriminator,
    Rollout,
    conditional_kl,
    discriminator_loss,
    discriminator_reward,
    grouped_advantages,
    kl_and_entropy,
    load_discriminator,
    noise_at,
    rollout,
    save_discriminator,
    teacher_log_likelihood,
    time_weight,
)


def tiny(seed=0):
    return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=seed)


def test_discriminator_loss_on_hand_made_logits():
    real = torch.tensor([[2.0, 99.0]])  # position 1 is not masked: it must not count
    fake = torch.tensor([[-1.0, 0.5]])
    real_masked, fake_masked = torch.tensor([[True, False]]), torch.tensor([[True, True]])
    # without smoothing: ½ (softplus(−2) + mean(softplus(−1), softplus(0.5)))
    expected = 0.5 * (F.softplus(torch.tensor(-2.0)) + (F.softplus(torch.tensor(-1.0))
                                                         + F.softplus(torch.tensor(0.5))) / 2)
    assert discriminator_loss(real, real_masked, fake, fake_masked, 0.0).item() == pytest.approx(expected.item())
    # smoothing 0.1: the paper's targets 0.9 / 0.1; at logit 0 the BCE is log 2 whatever the target
    zeros = torch.zeros(1, 2)
    assert discriminator_loss(zeros, real_masked, zeros, fake_masked, 0.1).item() == pytest.approx(math.log(2))
    smoothed = discriminator_loss(real, real_masked, fake, fake_masked, 0.1).item()
    bce = F.binary_cross_entropy_with_logits
    hand = 0.5 * (bce(torch.tensor([2.0]), torch.tensor([0.9]))
                  + bce(torch.tensor([-1.0, 0.5]), torch.tensor([0.1, 0.1])))
    assert smoothed == pytest.approx(hand.item())


def test_reward_is_the_clipped_mean_logit_over_masked_positions():
    logits = torch.tensor([[10.0, -2.0, 5.0], [1.0, 1.0, 1.0]])
    masked = torch.tensor([[True, True, False], [False, False, False]])
    assert discriminator_reward(logits, masked, clip=8.0).tolist() == [3.0, 0.0]  # (8 − 2)/2; no mask → 0


def test_grouped_normalisation_and_clipping():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    advantages = grouped_advantages(rewards, group_size=3)
    assert advantages[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])  # std of (1, 2, 3) is 1
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]  # a tied group carries no signal
    outlier = grouped_advantages(torch.tensor([0.0] * 15 + [1.0]), group_size=16, clip=3.0)
    assert outlier[-1].item() == 3.0 and outlier[0].item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="groups of 4"):
        grouped_advantages(rewards, group_size=4)


def test_time_weight_is_one_over_t_clamped():
    t = torch.tensor([0.01, 0.1, 0.5, 1.0, 20.0])
    assert time_weight(t).tolist() == pytest.approx([10.0, 10.0, 2.0, 1.0, 0.1])


def test_two_step_log_likelihood_decomposes_and_normalises():
    """log q(x) = Σ_first log q(x_i | all-mask) + Σ_second log q(x_j | x_τ), and for a fixed reveal pattern
    the probabilities of every (x_τ, x_0) sum to 1."""
    model = tiny()
    mask = model.mask_token_id
    prompt = torch.tensor([[model.tokenizer.convert_tokens_to_ids("#")]])
    vocab = model.config.vocab_size
    candidates = torch.tensor([v for v in range(vocab) if v != mask])  # every token the step can draw
    n = len(candidates)
    start = torch.cat([prompt, torch.full((1, 2), mask)], 1).repeat(n, 1)
    first = torch.tensor([[False, True, False]]).repeat(n, 1)  # the first step reveals position 1
    second = torch.tensor([[False, False, True]]).repeat(n, 1)
    with torch.no_grad():
        start_logits = model(start).logits
        middle = start.clone()
        middle[:, 1] = candidates
        middle_logits = model(middle).logits
    total = 0.0
    for b in candidates.tolist():  # x_0 = (a, b) for every a at once
        final = middle.clone()
        final[:, 2] = b
        sample = Rollout([start, middle], [first, second], [start_logits, middle_logits], final,
                         torch.full((n,), 0.5))
        log_prob = sample.log_prob()
        hand = (start_logits[:, 1].log_softmax(-1)[torch.arange(n), candidates]
                + middle_logits[:, 2].log_softmax(-1)[:, b])
        assert torch.allclose(log_prob, hand, atol=1e-5)
        total += float(log_prob.double().exp().sum())
    assert total == pytest.approx(1.0, abs=1e-4)


def test_rollout_reveals_every_response_token_once_and_keeps_the_graph():
    model = tiny()
    ids = torch.tensor([[5, 6, 0, 0, 0, 0]] * 4)
    response = torch.tensor([[False, False, True, True, True, True]] * 4)
    tau = torch.tensor([0.02, 0.5, 0.5, 0.98])
    sample = rollout(model, ids, torch.ones_like(ids), response, tau, generator=torch.Generator().manual_seed(0))
    first, second = sample.revealed
    start, middle = sample.states
    assert torch.equal(first | second, response) and not (first & second).any()
    assert (start[response] == model.mask_token_id).all()
    assert (sample.final[response] != model.mask_token_id).all()
    assert torch.equal(middle[first], sample.final[first])
    assert (middle[second] == model.mask_token_id).all()
    assert torch.equal(sample.final[:, :2], ids[:, :2])  # the prompt is untouched
    sample.log_prob().sum().backward()
    assert model.model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_two_step_rollout_reveals_one_minus_tau_first():
    model = tiny()
    ids = torch.zeros(400, 41, dtype=torch.long)
    response = torch.ones_like(ids, dtype=torch.bool)
    response[:, 0] = False
    tau = torch.tensor([0.2, 0.8]).repeat(200)
    with torch.no_grad():
        first = rollout(model, ids, torch.ones_like(ids), response, tau,
                        generator=torch.Generator().manual_seed(0)).revealed[0]
    fraction = first[:, 1:].double().mean(1)
    assert fraction[tau == 0.2].mean().item() == pytest.approx(0.8, abs=0.01)
    assert fraction[tau == 0.8].mean().item() == pytest.approx(0.2, abs=0.01)


def test_many_step_rollout_follows_the_samplers_schedule_and_sums_every_steps_log_likelihood():
    """Four steps reveal a quarter of the response each in expectation (1/4, 1/3, 1/2, then the rest of what is
    masked); each state is the previous one with its step's tokens, and log q(x) sums every step's tokens."""
    model = tiny()
    steps = 4
    ids = torch.zeros(300, 41, dtype=torch.long)
    response = torch.ones_like(ids, dtype=torch.bool)
    response[:, 0] = False
    tau = torch.full((len(ids),), 0.5)
    with torch.no_grad():
        sample = rollout(model, ids, torch.ones_like(ids), response, tau, steps,
                         generator=torch.Generator().manual_seed(0))
    assert len(sample.states) == len(sample.revealed) == len(sample.logits) == steps
    revealed = torch.stack(sample.revealed)
    assert torch.equal(revealed.sum(0), response.long())  # every response position exactly once
    for k, fraction in enumerate(revealed[:, :, 1:].double().mean((1, 2)).tolist()):
        assert fraction == pytest.approx(1 / steps, abs=0.02), k  # about 5 standard errors
    for k in range(steps):
        after = sample.states[k + 1] if k + 1 < steps else sample.final
        assert torch.equal(after, torch.where(sample.revealed[k], sample.final, sample.states[k]))
    step_of = revealed.long().argmax(0)  # [B, L] the step that revealed each position
    log_probs = torch.stack([logits.log_softmax(-1) for logits in sample.logits])  # [steps, B, L, V]
    hand = torch.zeros(len(ids))
    for row in range(0, len(ids), 37):
        for j in range(1, ids.shape[1]):
            hand[row] += log_probs[step_of[row, j], row, j, sample.final[row, j]]
        assert sample.log_prob()[row].item() == pytest.approx(hand[row].item(), abs=1e-4)


class _CopyTeacher(torch.nn.Module):
    """Two response tokens over {0, 1} (mask 2) that must be equal: a masked token copies the other one when
    it is visible (probability 0.9), and is 0 or 1 evenly when both are masked."""

    mask_token_id = 2

    def forward(self, ids, attention_mask=None):
        probs = torch.full((*ids.shape, 3), 1e-9)
        probs[..., :2] = 0.5
        for i, j in ((0, 1), (1, 0)):
            seen = ids[:, j] != self.mask_token_id
            probs[seen, i, :2] = 0.1
            probs[seen, i, ids[seen, j]] = 0.9
        return type("Out", (), {"logits": probs.log()})()


def test_conditional_kl_scores_each_revealed_token_given_the_others_outside_its_fold():
    """One step reveals both tokens of (1, 1) from all-mask, the student drawing them from even marginals. A token
    whose partner lands in another fold is scored against the teacher's copy: KL((½, ½) ‖ (0.1, 0.9)); in the
    same fold, against the even marginal: 0. Two steps, one token each, give the copy in the second step always."""
    teacher = _CopyTeacher()
    even = torch.zeros(1, 2, 3)
    even[..., 2] = -float("inf")
    start = torch.full((1, 2), 2)
    final = torch.tensor([[1, 1]])
    one_step = Rollout([start], [torch.ones(1, 2, dtype=torch.bool)], [even], final, torch.tensor([0.5]))
    copy_kl = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.9)
    seen = set()
    for seed in range(12):
        total, count = conditional_kl(one_step.logits, teacher, one_step, None, 2, torch.Generator().manual_seed(seed))
        fold = torch.randint(0, 2, (1, 2), generator=torch.Generator().manual_seed(seed))
        apart = bool(fold[0, 0] != fold[0, 1])
        seen.add(apart)
        assert count == 2 and total.item() == pytest.approx(2 * copy_kl if apart else 0.0, abs=1e-6)
    assert seen == {True, False}
    total, _ = conditional_kl(one_step.logits, teacher, one_step, None, 1)
    assert total.item() == pytest.approx(0.0, abs=1e-6)  # one fold: every token against the step's marginal
    middle = torch.tensor([[1, 2]])
    two_steps = Rollout([start, middle], [torch.tensor([[True, False]]), torch.tensor([[False, True]])],
                        [even, even], final, torch.tensor([0.5]))
    total, count = conditional_kl(two_steps.logits, teacher, two_steps, None, 3)
    assert count == 2 and total.item() == pytest.approx(copy_kl, abs=1e-6)  # only the second token sees its partner
    logits = even.clone().requires_grad_(True)
    conditional_kl([logits, logits], teacher, two_steps, None, 1)[0].backward()
    assert logits.grad[0, 1, 1] < 0 < logits.grad[0, 1, 0]  # pulled toward the copy of the visible 1
    with pytest.raises(ValueError, match="folds"):
        conditional_kl(one_step.logits, teacher, one_step, None, 0)


def test_student_update_divides_the_conditional_kl_by_the_revealed_tokens_and_skips_an_unused_teacher_forward():
    from dlm_rl.guards import NonFiniteLoss
    from dlm_rl.trainers.didi import DiDiConfig, _student_update

    teacher, student = tiny(0).requires_grad_(False), tiny(1)
    forwards = []
    teacher.register_forward_hook(lambda *_: forwards.append(1))
    ids = torch.zeros(4, 9, dtype=torch.long)
    response = torch.ones_like(ids, dtype=torch.bool)
    response[:, 0] = False
    attention = torch.ones_like(ids)
    parameters = [p for p in student.parameters() if p.requires_grad]

    def update(kl_coef: float) -> tuple[dict, Rollout]:
        sample = rollout(student, ids, attention, response, torch.full((4,), 0.5), 3,
                         generator=torch.Generator().manual_seed(0))
        config = DiDiConfig(teacher="tiny", dataset_name="addition3", group_size=2, use_discriminator=False, kl_coef=kl_coef,
                            entropy_coef=0.0, conditional_kl_coef=1.0, conditional_folds=2)
        forwards.clear()
        line = _student_update(student, teacher, torch.optim.SGD(parameters, lr=0.0), parameters, sample,
                               torch.zeros(4), response, attention, config, NonFiniteLoss(1, "DiDi"),
                               torch.Generator().manual_seed(3))
        return line, sample

    line, sample = update(kl_coef=0.0)
    used = len(forwards)
    forwards.clear()
    total, count = conditional_kl(sample.logits, teacher, sample, attention, 2, torch.Generator().manual_seed(3))
    assert len(forwards) == used  # the conditional KL's forwards only: the marginal KL's are skipped
    assert count == int(response.sum()) and total.item() > 0
    assert line["conditional_kl"] == pytest.approx(total.item() / count) == pytest.approx(line["loss"])
    assert "kl" not in line
    line, _ = update(kl_coef=0.5)
    assert len(forwards) == used + 3 and line["kl"] > 0  # one forward more per rollout state


def test_student_loss_is_the_papers_balance_by_hand():
    """−mean_b ω_b Â_b Σ_i log q(x_b,i) (log q summed over the tokens, not divided by L) + kl_coef Σ_states KL_s −
    entropy_coef Σ_states H_s, each state's KL and entropy the mean over its masked positions; with
    tau_importance_weight, ω/π(τ)."""
    from dlm_rl.guards import NonFiniteLoss
    from dlm_rl.trainers.didi import DiDiConfig, _student_update

    teacher, student = tiny(0), tiny(1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]] * 4)
    response = torch.tensor([[False, False, True, True, True, True]] * 4)
    attention = torch.ones_like(ids)
    tau = torch.tensor([0.05, 0.05, 0.5, 0.5])
    reward = torch.tensor([0.3, -0.2, 1.0, 2.5])
    density = torch.tensor([2.0, 2.0, 0.5, 0.5])
    parameters = [p for p in student.parameters() if p.requires_grad]
    for importance in (False, True):
        sample = rollout(student, ids, attention, response, tau, 2, generator=torch.Generator().manual_seed(0))
        config = DiDiConfig(teacher="tiny", dataset_name="addition3", group_size=2, kl_coef=0.3, entropy_coef=0.1,
                            tau_importance_weight=importance)
        line = _student_update(student, teacher, torch.optim.SGD(parameters, lr=0.0), parameters, sample, reward,
                               response, attention, config, NonFiniteLoss(1, "DiDi"), None, density)
        with torch.no_grad():
            log_q = sum((logits.float().log_softmax(-1).gather(-1, sample.final[..., None])[..., 0] * revealed).sum(1)
                        for logits, revealed in zip(sample.logits, sample.revealed))
            advantage = grouped_advantages(reward, 2)
            omega = (1 / tau).clamp(0.1, 10.0) / (density if importance else 1.0)  # 10, 10, 2, 2 (÷ π)
            policy = -(omega * advantage * log_q).mean()
            kl = entropy = 0.0
            for state, logits in zip(sample.states, sample.logits):
                masked = (state == student.mask_token_id) & response
                log_p = teacher(state, attention).logits[masked].float().log_softmax(-1)
                log_s = logits[masked].float().log_softmax(-1)
                terms = torch.where(log_p.exp() > 0, log_p.exp() * (log_p - log_s), 0.0)  # 0 at the mask token
                kl += terms.sum(-1).mean()
                entropy += torch.special.entr(log_s.exp()).sum(-1).mean()
        assert line["policy_loss"] == pytest.approx(policy.item(), rel=1e-4)
        assert line["kl"] == pytest.approx(kl.item(), rel=1e-4) and kl > 0
        assert line["loss"] == pytest.approx((policy + 0.3 * kl - 0.1 * entropy).item(), rel=1e-4)


def test_tau_is_beta_on_its_range_with_its_density():
    from dlm_rl.rl.didi import sample_tau

    generator = torch.Generator().manual_seed(0)
    tau, density = sample_tau(4, 0.02, 0.98, generator=generator)
    assert ((0.02 <= tau) & (tau <= 0.98)).all()
    assert torch.allclose(density, torch.full((4,), 1 / 0.96, dtype=torch.float64))
    tau, density = sample_tau(20000, 0.02, 0.98, (2.0, 5.0), generator)
    u = (tau - 0.02) / 0.96
    assert ((0 <= u) & (u <= 1)).all()
    assert torch.allclose(density, 30 * u * (1 - u) ** 4 / 0.96)  # Beta(2, 5): 1/B(2, 5) = 30
    assert u.mean().item() == pytest.approx(2 / 7, abs=0.005) and u.var().item() == pytest.approx(10 / 392, rel=0.05)
    first, _ = sample_tau(8, 0.02, 0.98, (2.0, 5.0), torch.Generator().manual_seed(7))
    second, _ = sample_tau(8, 0.02, 0.98, (2.0, 5.0), torch.Generator().manual_seed(7))
    assert torch.equal(first, second)  # the draws follow the generator (resume replays them)


def test_discriminator_step_clips_its_gradient():
    from dlm_rl.guards import NonFiniteLoss
    from dlm_rl.trainers.didi import DiDiConfig, _discriminator_update

    teacher = tiny()
    discriminator = Discriminator(teacher, trainable_blocks=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 10, 9, 8, 7]])
    response = torch.tensor([[False, False, True, True, True, True]] * 2)
    tau = torch.tensor([0.5, 0.5])
    real, real_masked = noise_at(ids, response, tau, teacher.mask_token_id, torch.Generator().manual_seed(0))
    fake, fake_masked = noise_at(ids.flip(1), response, tau, teacher.mask_token_id, torch.Generator().manual_seed(1))
    parameters = [p for p in discriminator.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in parameters]
    config = DiDiConfig(teacher="tiny", dataset_name="addition3", discriminator_max_grad_norm=0.01)
    _discriminator_update(discriminator, torch.optim.SGD(parameters, lr=1.0), real, real_masked, fake, fake_masked,
                          tau, torch.ones_like(ids), response, config, None, NonFiniteLoss(1, "DiDi"))
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(parameters, before)))
    assert moved.item() == pytest.approx(0.01, rel=1e-3)  # one SGD step of lr 1 on the clipped gradient


def test_kl_and_entropy_are_zero_and_positive_for_a_student_equal_to_its_teacher():
    model = tiny()
    ids = torch.full((2, 5), model.mask_token_id)
    logits = model(ids).logits
    positions = torch.ones(2, 5, dtype=torch.bool)
    kl, entropy = kl_and_entropy(logits, logits.detach(), positions)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and entropy.item() > 0
    other = tiny(seed=1)(ids).logits.detach()
    kl, _ = kl_and_entropy(logits, other, positions)
    assert kl.item() > 0 and torch.isfinite(kl)
    kl.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ema_follows_the_decay():
    """The trainer's EMA (torch's AveragedModel with an EMA average): the first update copies, later ones blend."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    layer = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    expected = None
    for value in [1.0, 2.0, 4.0]:
        layer.weight.data.fill_(value)
        ema.update_parameters(layer)
        expected = value if expected is None else 0.9 * expected + 0.1 * value
    assert ema.module.weight.item() == pytest.approx(expected)  # 0.9 (0.9·1 + 0.1·2) + 0.1·4 = 1.39
    assert expected == pytest.approx(1.39)


def test_discriminator_is_the_papers_last_blocks_spectral_norm_head_and_time_input():
    teacher = tiny()
    torch.manual_seed(0)  # the head's initialisation and the power iteration's start
    discriminator = Discriminator(teacher, trainable_blocks=1)
    trainable = {n for n, p in discriminator.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.model.model.layers.1.", "backbone.model.model.norm", "head",
                                           "time_embedding")) for n in trainable)
    assert any(n.startswith("head") for n in trainable) and any(n.startswith("time_embedding") for n in trainable)
    assert all(p.requires_grad for p in teacher.parameters())  # the copy is frozen, not the teacher
    # the head is Linear(H, H) – SiLU – Linear(H, 1), both spectrally normalised: largest singular value 1
    first, last = discriminator.head[0], discriminator.head[2]
    discriminator.train()
    for _ in range(200):  # power iterations run in training forwards
        discriminator(torch.tensor([[5, 6, 7]]), time=torch.tensor([0.5]))
    for layer in (first, last):
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, rel=1e-3)
    ids = torch.tensor([[5, 6, teacher.mask_token_id]] * 2)
    with pytest.raises(ValueError, match="time="):
        discriminator(ids)
    # the time embedding starts at zero, so D starts the same at every time; once it has weights, time matters
    discriminator.eval()
    times = torch.tensor([0.1, 0.9])
    at = discriminator(ids, time=times)
    assert at.abs().max() > 0 and torch.allclose(at[0], at[1])
    torch.nn.init.normal_(discriminator.time_embedding[-1].weight, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(*discriminator(ids, time=times))
    assert Discriminator(teacher, trainable_blocks=2, head="linear", time_input=False)(ids).abs().max() == 0
    with pytest.raises(ValueError, match="trainable_blocks"):
        Discriminator(teacher, trainable_blocks=3)
    with pytest.raises(ValueError, match="head"):
        Discriminator(teacher, trainable_blocks=1, head="conv")


def test_discriminator_saves_its_settings_and_loads_an_earlier_linear_one(tmp_path):
    teacher = tiny()
    discriminator = Discriminator(teacher, trainable_blocks=1)
    torch.nn.init.normal_(discriminator.time_embedding[-1].weight, generator=torch.Generator().manual_seed(0))
    save_discriminator(discriminator.eval(), str(tmp_path))
    loaded = load_discriminator(teacher, str(tmp_path)).eval()
    ids, times = torch.tensor([[5, 6, teacher.mask_token_id]]), torch.tensor([0.3])
    assert torch.equal(loaded(ids, time=times), discriminator(ids, time=times))
    # a discriminator.json from before the head and time input were saved: 2 blocks, linear head, no time
    earlier = Discriminator(teacher, trainable_blocks=2, head="linear", time_input=False)
    torch.save(earlier.state_dict(), tmp_path / "discriminator.pt")
    (tmp_path / "discriminator.json").write_text(json.dumps({"likelihood_prior": 0.0, "likelihood_folds": 4}))
    assert load_discriminator(teacher, str(tmp_path)).settings["head"] == "linear"
    (tmp_path / "discriminator.json").unlink()  # from before discriminator.json existed
    assert load_discriminator(teacher, str(tmp_path)).settings == {**earlier.settings}


def test_teacher_log_likelihood_scores_each_visible_response_token_once_by_hand():
    teacher = tiny()
    mask = teacher.mask_token_id
    z = torch.tensor([[5, 6, 7, 8, mask, 9], [5, 6, mask, mask, mask, mask]])
    response = torch.tensor([[False, False, True, True, True, True]] * 2)
    attention = torch.ones_like(z)
    visible = [(2, 7), (3, 8), (5, 9)]  # row 0's visible response tokens; the prompt's 5, 6 are never scored

    def hand(folds_of):  # mean over the visible tokens of log p(token | z with the token's fold masked)
        total = 0.0
        for i, token in visible:
            remasked = z[:1].clone()
            remasked[0, [j for j, _ in visible if folds_of[j] == folds_of[i]]] = mask
            total += teacher(remasked, attention[:1]).logits.float().log_softmax(-1)[0, i, token].item()
        return total / len(visible)

    scores = teacher_log_likelihood(teacher, z, attention, response, folds=1)  # one fold: all masked at once
    assert scores[0].item() == pytest.approx(hand({2: 0, 3: 0, 5: 0}), rel=1e-5)
    assert scores[1].item() == 0.0  # nothing visible in the response: nothing to score
    # two folds: the score is the hand value of one of the 8 ways to split the three tokens
    splits = [hand(dict(zip((2, 3, 5), bits))) for bits in itertools.product((0, 1), repeat=3)]
    for seed in range(4):
        score = teacher_log_likelihood(teacher, z, attention, response, 2, torch.Generator().manual_seed(seed))
        assert min(abs(score[0].item() - value) for value in splits) < 1e-5


def test_likelihood_prior_adds_the_weighted_teacher_likelihood_and_is_not_saved(tmp_path):
    from dlm_rl.sampling.guided import ancestral_sample

    teacher = tiny()
    mask = teacher.mask_token_id
    ids = torch.tensor([[5, 6, 7, 8, mask, 9]])
    response = torch.tensor([[False, False, True, True, True, True]])
    attention = torch.ones_like(ids)
    linear = {"head": "linear", "time_input": False}
    discriminator = Discriminator(teacher, trainable_blocks=1, likelihood_prior=2.0, likelihood_folds=1, **linear)
    prior = teacher_log_likelihood(teacher, ids, attention, response, folds=1)
    logits = discriminator(ids, attention, response_mask=response)
    assert logits[0].tolist() == pytest.approx([2 * prior.item()] * 6)  # zero head: the prior alone, everywhere
    embeds = discriminator.backbone.model.get_input_embeddings()(ids)
    assert discriminator(attention_mask=attention, inputs_embeds=embeds).abs().max().item() == 0.0  # ids needed
    plain = Discriminator(teacher, trainable_blocks=1, **linear)
    assert discriminator.state_dict().keys() == plain.state_dict().keys()  # the teacher is used, not stored
    torch.nn.init.normal_(discriminator.head.weight, generator=torch.Generator().manual_seed(0))
    save_discriminator(discriminator, str(tmp_path))
    loaded = load_discriminator(teacher, str(tmp_path))
    assert (loaded.likelihood_prior, loaded.likelihood_folds) == (2.0, 1)
    assert torch.allclose(loaded(ids, attention, response_mask=response), discriminator(ids, attention,
                                                                                         response_mask=response))
    samples = ancestral_sample(teacher, ids[:, :2], attention[:, :2], 8, 4, discriminator=discriminator,
                               candidates=2, generator=torch.Generator().manual_seed(0))
    assert (samples.response_ids != mask).all()
    with pytest.raises(ValueError, match="likelihood"):
        Discriminator(teacher, likelihood_prior=-1.0)


def test_ancestral_sampling_reuses_logits_when_a_step_reveals_nothing():
    from dlm_rl.sampling.guided import ancestral_sample

    model = tiny()
    prompt = torch.tensor([[5, 6]])
    samples = ancestral_sample(model, prompt.repeat(3, 1), torch.ones(3, 2, dtype=torch.long), 8, 1024,
                               generator=torch.Generator().manual_seed(0))
    assert (samples.response_ids != model.mask_token_id).all()
    assert samples.forwards <= 8  # at most one forward per state change, not 1024
    one_step = ancestral_sample(model, prompt, torch.ones(1, 2, dtype=torch.long), 8, 1)
    assert one_step.forwards == 1.0 and (one_step.response_ids != model.mask_token_id).all()


def test_ancestral_sampling_at_temperature_zero_takes_the_argmax():
    from dlm_rl.sampling.guided import ancestral_sample

    model = tiny()
    prompt = torch.tensor([[5, 6]])
    state = torch.cat([prompt, torch.full((1, 8), model.mask_token_id)], 1)
    argmax = model(state).logits[0, 2:].argmax(-1)
    for seed in (0, 1):  # one step reveals all 8 positions from the all-mask state
        samples = ancestral_sample(model, prompt, torch.ones(1, 2, dtype=torch.long), 8, 1, temperature=0.0,
                                   generator=torch.Generator().manual_seed(seed))
        assert samples.response_ids[0].tolist() == argmax.tolist()
    for temperature in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            ancestral_sample(model, prompt, torch.ones(1, 2, dtype=torch.long), 8, 1, temperature=temperature)


def test_guided_sampling_uses_the_discriminator_in_both_halves():
    from dlm_rl.sampling.guided import _guidance, ancestral_sample, guidance_schedule

    model = tiny()
    discriminator = Discriminator(model, trainable_blocks=1, head="linear")
    ids = torch.tensor([[5, 6, model.mask_token_id, model.mask_token_id]])
    logits = model(ids).logits.detach()
    masked = ids == model.mask_token_id
    assert _guidance(discriminator, ids, torch.ones_like(ids), logits, masked, 0.5).abs().max() == 0  # D ≡ 0
    torch.nn.init.normal_(discriminator.head.weight, generator=torch.Generator().manual_seed(0))
    gradient = _guidance(discriminator, ids, torch.ones_like(ids), logits, masked, 0.5)
    assert gradient[masked].abs().max() > 0 and gradient[~masked].abs().max() == 0
    # 16 tokens in 4 steps: some stay masked until the last step (the sampler stops once none is left)
    samples = ancestral_sample(model, ids[:, :2], torch.ones(1, 2, dtype=torch.long), 16, 4,
                               discriminator=discriminator, candidates=3, generator=torch.Generator().manual_seed(0))
    assert (samples.response_ids != model.mask_token_id).all()
    assert samples.discriminator_passes == 2 + 2 * 3  # 2 guided steps, then 2 steps of 3 candidates
    for fraction, passes in ((1.0, 4 * 3), (0.0, 4), (0.75, 1 + 3 * 3)):  # every step re-ranks / tilts / 3 of 4
        samples = ancestral_sample(model, ids[:, :2], torch.ones(1, 2, dtype=torch.long), 16, 4,
                                   discriminator=discriminator, candidates=3, rerank_fraction=fraction,
                                   generator=torch.Generator().manual_seed(0))
        assert samples.discriminator_passes == passes and (samples.response_ids != model.mask_token_id).all()
    with pytest.raises(ValueError, match="rerank_fraction"):
        ancestral_sample(model, ids[:, :2], torch.ones(1, 2, dtype=torch.long), 16, 4, discriminator=discriminator,
                         rerank_fraction=1.5)
    assert guidance_schedule(16, (30.0, 40.0)) == pytest.approx([30 + 10 * k / 7 for k in range(8)])
    assert guidance_schedule(5, (30.0, 40.0)) == [30.0, 40.0] and guidance_schedule(3, 2.0) == [2.0]


def test_guided_sampler_tilts_at_t_with_the_rising_scale_then_reranks_at_s(monkeypatch):
    """4 steps: the first 2 tilt the logits by h · clip(gradient) with h = 30 then 40, D read on soft inputs at
    t = 1 and 0.75; the last 2 re-rank candidates, D read on token ids at s = 0.25 and 0."""
    from dlm_rl.sampling import guided

    model = tiny()
    discriminator = Discriminator(model, trainable_blocks=1)
    reads = []
    discriminator.register_forward_pre_hook(
        lambda module, args, kwargs: reads.append((kwargs.get("inputs_embeds") is not None, kwargs["time"].tolist())),
        with_kwargs=True)
    prompt = torch.tensor([[5, 6]])
    guided.ancestral_sample(model, prompt, torch.ones_like(prompt), 16, 4, discriminator=discriminator, candidates=2,
                            generator=torch.Generator().manual_seed(0))
    assert reads == [(True, [1.0]), (True, [0.75]), (False, [0.25, 0.25]), (False, [0.0, 0.0])]
    # the scale each step adds: with a gradient of 1 everywhere, the logits the step draws from less the model's
    outputs, shifts = [], []
    model.register_forward_hook(lambda module, args, out: outputs.append(out.logits))
    monkeypatch.setattr(guided, "_guidance", lambda discriminator, x, attention, logits, masked, time:
                        torch.ones_like(logits))
    propose = guided._propose

    def recording(x, masked, logits, reveal_prob, temperature, generator):
        shifts.append(round(float((logits - outputs[-1])[0, -1, 0]), 4))
        return propose(x, masked, logits, reveal_prob, temperature, generator)

    monkeypatch.setattr(guided, "_propose", recording)
    guided.ancestral_sample(model, prompt, torch.ones_like(prompt), 16, 4, discriminator=discriminator, candidates=1,
                            generator=torch.Generator().manual_seed(0))
    assert shifts == [30.0, 40.0, 0.0, 0.0]


def test_guidance_reads_the_expected_token_at_masked_positions():
    """The gradient is taken through softmax(logits) · E at the masked positions, the clean ones as their tokens:
    with logits all but one-hot on token v, D sees the state with v written in, and its gradient is that of
    ΣD with respect to a soft one-hot input there."""
    from dlm_rl.sampling.guided import _guidance

    model = tiny()
    mask = model.mask_token_id
    discriminator = Discriminator(model, trainable_blocks=1).eval()
    torch.nn.init.normal_(discriminator.time_embedding[-1].weight, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 6, mask, 7, mask]])
    masked = ids == mask
    attention = torch.ones_like(ids)
    logits = model(ids).logits.detach()
    embeddings = discriminator.backbone.model.get_input_embeddings().weight
    soft = logits.clone().requires_grad_(True)
    inputs = embeddings[ids].detach().clone()
    inputs[masked] = soft[masked].softmax(-1) @ embeddings
    d = discriminator(attention_mask=attention, inputs_embeds=inputs, time=torch.tensor([0.75]))
    (expected,) = torch.autograd.grad(d[masked].sum(), soft)
    gradient = _guidance(discriminator, ids, attention, logits, masked, 0.75)
    assert torch.allclose(gradient, expected, atol=1e-6) and gradient[masked].abs().max() > 0
    with torch.no_grad():  # a near one-hot on token 9 reads like the state with 9 written in
        peaked = torch.full_like(logits, -1e4)
        peaked[..., 9] = 0.0
        written = ids.masked_fill(masked, 9)
        inputs = torch.where(masked[..., None], peaked.softmax(-1) @ embeddings, embeddings[ids])
        assert torch.allclose(discriminator(attention_mask=attention, inputs_embeds=inputs, time=torch.tensor([0.75])),
                              discriminator(written, attention, time=torch.tensor([0.75])), atol=1e-5)


def test_guided_sampling_leaves_a_prompt_position_that_holds_the_mask_id():
    """The character tokenizer reads a character it cannot represent as the mask id: every state the model and the
    discriminator see keeps that prompt position as it was, and the samples come back complete."""
    from dlm_rl.sampling.guided import ancestral_sample

    model = tiny()
    mask = model.mask_token_id
    discriminator = Discriminator(model, trainable_blocks=1)  # its spectral-norm head is not zero
    prompt = torch.tensor([[5, mask, 6], [7, 8, mask]])
    embedded = discriminator.backbone.model.get_input_embeddings()(prompt)
    states, embeddings = [], []
    model.register_forward_pre_hook(lambda module, args: states.append(args[0][:, :3].clone()))
    discriminator.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: embeddings.append(kwargs["inputs_embeds"][:, :3].detach().clone())
        if kwargs.get("inputs_embeds") is not None else None, with_kwargs=True)
    for seed in range(4):
        samples = ancestral_sample(model, prompt, torch.ones_like(prompt), 8, 16, discriminator=discriminator,
                                   candidates=2, generator=torch.Generator().manual_seed(seed))
        assert (samples.response_ids != mask).all()
    assert states and all(any(torch.equal(row, p) for p in prompt) for state in states for row in state)
    assert embeddings and all(torch.equal(e, embedded) for e in embeddings)


def test_candidate_selection_sums_every_response_position_and_no_prompt_position():
    from dlm_rl.sampling.guided import _select

    mask = 2
    candidate = torch.tensor([5, mask, 6, 7, 8, mask])  # the prompt [5, mask, 6] holds the mask id
    response = torch.tensor([[False, False, False, True, True, True]])
    times = []

    def discriminator(ids, attention_mask, *, time, response_mask, generator):
        times.append(time)
        d = torch.zeros(ids.shape)
        d[0, 1] = 100.0  # candidate 0: a high logit at a prompt position
        d[1, 3] = 50.0  # candidate 1: at a clean response position
        return d

    proposals = torch.stack([candidate, candidate])[:, None]  # [M=2, B=1, C]
    chosen = _select(discriminator, proposals, torch.ones(1, 6, dtype=torch.long), response, 0.25,
                     torch.Generator().manual_seed(0))
    assert chosen.tolist() == [1] and times[0].tolist() == [0.25, 0.25]


def test_candidate_selection_with_a_constant_discriminator_is_uniform():
    """Every candidate scores the same under a constant D, however many positions it revealed: the pick is
    uniform. (Summed over the still-masked positions instead, a constant negative D picks the candidate that
    revealed the most.)"""
    from dlm_rl.sampling.guided import _select

    mask = 2
    response = torch.tensor([[False, True, True, True, True]] * 2)
    proposals = torch.tensor([[[1, mask, mask, mask, mask]], [[1, 5, mask, mask, mask]],
                              [[1, 5, 6, mask, mask]], [[1, 5, 6, 7, 8]]]).expand(4, 2, 5)  # [M=4, B=2, C]

    def constant(ids, attention_mask, *, time, response_mask, generator):
        return torch.full(ids.shape, -1.0)

    generator = torch.Generator().manual_seed(0)
    picks = torch.cat([_select(constant, proposals, torch.ones(2, 5, dtype=torch.long), response, 0.5, generator)
                       for _ in range(2000)])
    frequencies = torch.bincount(picks, minlength=4) / len(picks)  # 4000 picks: standard error 0.007
    assert (frequencies - 0.25).abs().max() < 0.03


def test_eval_distill_scheduled_temperature_falls_with_the_masked_fraction():
    """`--teacher_schedule HIGH:LOW`: each row's logits are divided by HIGH · m + LOW · (1 − m), m the fraction of
    its response still masked (the prompt is not counted)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "eval_distill.py"
    spec = importlib.util.spec_from_file_location("eval_distill", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = tiny()
    mask = model.mask_token_id
    ids = torch.tensor([[5, mask, mask, mask, mask], [5, 7, mask, 8, 9], [5, 7, 7, 8, 9]])
    with torch.no_grad():
        plain = model(ids).logits
        scheduled = script._Tempered(model, 1.0, schedule=(1.0, 0.2, 4))(ids).logits
        fixed = script._Tempered(model, 0.5)(ids).logits
    for row, temperature in enumerate([1.0, 0.2 + 0.8 / 4, 0.2]):
        finite = plain[row].isfinite()
        assert torch.allclose(scheduled[row][finite], plain[row][finite] / temperature)
    finite = plain.isfinite()
    assert torch.allclose(fixed[finite], plain[finite] / 0.5)


def test_judge_perplexity_and_entropy_by_hand():
    from dlm_rl.judge import judge_perplexity, unigram_entropy

    judge = tiny().model.eval()  # a causal LM (the tiny backbone run causally)
    eos = 1
    prompt = torch.tensor([[7, 8]])
    response = torch.tensor([[9, 10, eos, eos]])  # scored: 9, 10 and the first EOS
    with torch.no_grad():
        log_probs = judge(torch.tensor([[7, 8, 9, 10, eos]])).logits.double().log_softmax(-1)[0]
    nll = -(log_probs[1, 9] + log_probs[2, 10] + log_probs[3, eos]) / 3
    assert judge_perplexity(judge, prompt, torch.ones_like(prompt), response, eos) == pytest.approx(
        math.exp(nll.item()), rel=1e-5)
    assert unigram_entropy(torch.tensor([[4, 4, 5, 5, eos, 6], [4, 4, 4, 4, 4, 4]]), eos) == pytest.approx(
        math.log(2) / 2)


def test_reward_against_validity_scores_the_training_samples_by_hand():
    from dlm_rl.data.tokenizer import char_tokenizer
    from dlm_rl.trainers.didi import _reward_against_validity

    tokenizer = char_tokenizer()
    # 2, 1, 1 and 2 valid facts of the 21 a sample should hold
    texts = ["1+2=3;3*3=9;", "1+2=4;4*3=2;", "1+2=3;3*3=7;", "1+2=3;3*3=9;"]
    response = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                             for t in texts])
    prompt = torch.full((4, 1), tokenizer.convert_tokens_to_ids("#"))
    final = torch.cat([prompt, response], 1)
    response_mask = torch.ones_like(final, dtype=torch.bool)
    response_mask[:, 0] = False
    reward = torch.tensor([2.0, -1.0, 0.0, 1.0])
    result = _reward_against_validity(final, response_mask, reward, tokenizer, "facts", [{}] * 4)
    # centred, validity ∝ (1, −1, −1, 1) and reward (1.5, −1.5, −0.5, 0.5): r = 4 / (2 · √5)
    assert result["sample_validity"] == pytest.approx(1.5 / 21)
    assert result["reward_validity_correlation"] == pytest.approx(2 / math.sqrt(5))


def test_trainer_runs_reads_the_reward_after_the_discriminator_update_and_saves_the_student(tmp_path):
    """A three-step rollout (the two-step one runs in tests/test_resume.py and tests/test_ddp.py)."""
    from dlm_rl.trainers.didi import DiDiConfig, run

    config = DiDiConfig(teacher="tiny", dataset_name="addition3", train_size=64, prompts_per_step=2, group_size=2,
                        max_steps=3, discriminator_warmup_steps=1, rollout_steps=3, eval_steps=3, eval_samples=4,
                        eval_nfe=4, learning_rate=1e-3, report_to="none", output_dir=str(tmp_path))
    run(config)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "loss" not in lines[1]  # step 1 trains only the discriminator
    assert all(math.isfinite(line["loss"]) for line in lines[2:])
    assert all(math.isfinite(line["discriminator_loss"]) for line in lines[1:])
    assert all(0 <= line["sample_validity"] <= 1 and -1 <= line["reward_validity_correlation"] <= 1
               for line in lines[1:])
    assert 0 <= lines[-1]["eval/validity"] <= 1 and lines[-1]["eval/entropy"] > 0
    assert (tmp_path / "final" / "discriminator.pt").exists()
    saved = json.loads((tmp_path / "final" / "discriminator.json").read_text())
    assert (saved["trainable_blocks"], saved["head"], saved["time_input"]) == (4, "mlp", True)
    # a zero linear head: D ≡ 0 before its first update, so the first BCE is log 2; the reward, read from the
    # updated discriminator, is not 0
    zero = DiDiConfig(**{**config.__dict__, "max_steps": 1, "discriminator_head": "linear",
                         "discriminator_learning_rate": 1e-3, "output_dir": str(tmp_path / "zero")})
    line = run(zero)
    assert line["discriminator_loss"] == pytest.approx(math.log(2), abs=1e-6) and line["reward"] != 0.0
    prior = DiDiConfig(**{**config.__dict__, "max_steps": 2, "likelihood_prior": 1.0, "discriminator_head": "linear",
                          "output_dir": str(tmp_path / "prior")})
    run(prior)
    lines = [json.loads(x) for x in (tmp_path / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["reward"] < 0  # the teacher's mean log-likelihood of the sample, from the first step
    assert json.loads((tmp_path / "prior" / "final" / "discriminator.json").read_text())["likelihood_prior"] == 1.0
    # at step 1 D ≈ 0 (a zero head moved by 1e-12), so the rewards tie and carry no advantage, unless the sequence
    # entropy term ranks the rows
    for beta in (0.0, 1.0):
        first = DiDiConfig(**{**config.__dict__, "max_steps": 1, "discriminator_warmup_steps": 0, "ema": 0.0,
                              "discriminator_head": "linear", "discriminator_learning_rate": 1e-12,
                              "sequence_entropy_coef": beta, "output_dir": str(tmp_path / f"beta{beta}")})
        line = run(first)
        assert line["rollout_log_prob"] < 0 and (line["advantage_abs"] > 0.5) == (beta > 0)
    # the conditional KL alone trains the student; the marginal KL is then neither computed nor logged
    conditional = DiDiConfig(**{**config.__dict__, "max_steps": 1, "discriminator_warmup_steps": 0,
                                "use_discriminator": False, "kl_coef": 0.0, "entropy_coef": 0.0,
                                "conditional_kl_coef": 1.0, "output_dir": str(tmp_path / "conditional")})
    line = run(conditional)
    assert line["conditional_kl"] > 0 and line["grad_norm"] > 0 and "kl" not in line
    with pytest.raises(ValueError, match="conditional_folds"):
        DiDiConfig(conditional_folds=0)
    with pytest.raises(ValueError, match="set one of dataset_name .* not both"):
        DiDiConfig(dataset_name="facts", dataset_path=__file__)
    with pytest.raises(ValueError, match="kl_coef"):
        DiDiConfig(use_discriminator=False, kl_coef=0.0)
    with pytest.raises(ValueError, match="rollout_steps"):
        DiDiConfig(rollout_steps=1)
    with pytest.raises(ValueError, match="likelihood_folds"):
        DiDiConfig(likelihood_folds=0)


def test_evaluation_draws_eval_batch_size_samples_at_a_time():
    from dlm_rl.trainers.didi import DiDiConfig, _evaluate

    model, batches = tiny_model(hidden_size=32, num_layers=1, intermediate_size=64), []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    rows = [{"prompt": "", "completion": "1+2=3"}] * 3
    config = DiDiConfig(teacher="tiny", dataset_name="facts", eval_samples=5, eval_batch_size=2, eval_nfe=2)
    metrics = _evaluate(model, config, rows, 8, torch.device("cpu"), "facts")
    assert set(batches) == {2, 1}  # 5 samples: 2, 2 and 1
    assert 0 <= metrics["eval/validity"] <= 1 and metrics["eval/entropy"] > 0
