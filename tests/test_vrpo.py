"""VRPO's score and loss: hand-made ELBO values, the exact zero of antithetic sampling at θ = ref (disabled
adapter, frozen copy, and precomputed reference ELBOs), preference pairs with chat messages, and bad pairs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.models.tiny import tiny_model
from dlm_rl.rl.vrpo import (
    PreferenceEstimator,
    collate_pairs,
    preference_loss,
    preference_score,
    reference_elbo,
    vrpo_loss,
)

ROWS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    {"prompt": "10+5=", "chosen": "15", "rejected": "16"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "41"},
]


def tiny():
    return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)


def test_score_and_loss_on_hand_made_elbos():
    score = preference_score(torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.0]),
                             torch.tensor([-5.0, -2.0]), torch.tensor([-5.0, -1.5]), beta=0.2)
    assert score.tolist() == pytest.approx([0.2 * (1.0 - 0.0), 0.2 * (0.0 - (-0.5))])
    expected = -(math.log(1 / (1 + math.exp(-0.2))) + math.log(1 / (1 + math.exp(-0.1)))) / 2
    assert preference_loss(score).item() == pytest.approx(expected)


@pytest.mark.parametrize("reference", ["disabled_adapter", "frozen_copy", "precomputed"])
def test_antithetic_sampling_at_theta_equal_ref_gives_exactly_zero_and_log2(reference):
    base = tiny()
    frozen = copy.deepcopy(base) if reference == "frozen_copy" else None
    model = add_lora(base, LoraArguments(use_lora=True, lora_r=4))  # LoRA B starts at 0: θ = ref
    chosen, rejected = collate_pairs(model.tokenizer, ROWS, response_length=4)
    estimator = PreferenceEstimator(n_t=4, n_yt=2, antithetic=True)
    generator = torch.Generator().manual_seed(0)
    precomputed = None
    if reference == "precomputed":
        precomputed = tuple(reference_elbo(model, b, estimator.sample(b["response_mask"], generator))
                            for b in (chosen, rejected))
    loss, stats = vrpo_loss(model, chosen, rejected, estimator, beta=0.2, generator=generator, frozen=frozen,
                            reference=precomputed)
    assert torch.equal(stats["score"], torch.zeros(3))
    assert loss.item() == torch.tensor(2.0).log().item()  # log 2 to the last float32 bit
    loss.backward()  # the gradient is still there: it is what moves θ away from ref
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_without_antithetic_sampling_the_score_is_noisy_at_theta_equal_ref():
    model = add_lora(tiny(), LoraArguments(use_lora=True, lora_r=4))
    chosen, rejected = collate_pairs(model.tokenizer, ROWS, response_length=4)
    estimator = PreferenceEstimator(n_t=1, n_yt=1, antithetic=False)
    _, stats = vrpo_loss(model, chosen, rejected, estimator, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert stats["score"].abs().max() > 0


def _lora_gradients(model, compute) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_draws_per_graph_gives_the_same_loss_and_gradient():
    """Recomputing batches of draws in the backward pass (activation checkpointing) changes memory, not the math."""
    model = add_lora(tiny(), LoraArguments(use_lora=True, lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    chosen, rejected = collate_pairs(model.tokenizer, ROWS, response_length=4)
    estimator = PreferenceEstimator(n_t=4, n_yt=1)
    runs = {chunk: _lora_gradients(model, lambda: vrpo_loss(
        model, chosen, rejected, estimator, beta=0.5, generator=torch.Generator().manual_seed(0),
        draws_per_graph=chunk)[0]) for chunk in (None, 1, 3)}
    loss, grads = runs[None]
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    for chunk in (1, 3):
        assert runs[chunk][0] == pytest.approx(loss, abs=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(runs[chunk][1][name], g, atol=1e-6, rtol=1e-5)


def test_recomputed_draws_replay_their_dropout():
    """With LoRA dropout, the recomputed forward must draw the dropout masks of the first one: the gradient is then
    the one the kept graph would give, bit for bit."""
    from dlm_rl.diffusion import MCNoise
    from dlm_rl.diffusion.elbo import noised_log_probs

    model = add_lora(tiny(), LoraArguments(use_lora=True, lora_r=4, lora_dropout=0.5)).train()
    chosen, _ = collate_pairs(model.tokenizer, ROWS, response_length=4)
    noise = MCNoise.sample(chosen["response_mask"], n_t=4, generator=torch.Generator().manual_seed(0))

    def elbo_sum(recompute):
        torch.manual_seed(1)
        return noised_log_probs(model, chosen["input_ids"], noise, chosen["attention_mask"], draws_per_forward=2,
                                recompute=recompute).sum()

    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    kept = _lora_gradients(model, lambda: elbo_sum(False))
    assert len(forwards) == 2  # two batches of two draws
    recomputed = _lora_gradients(model, lambda: elbo_sum(True))
    assert len(forwards) == 6  # and with recompute, each batch's forward once more, in the backward pass
    assert kept[0] == recomputed[0]
    assert all(torch.equal(kept[1][name], recomputed[1][name]) for name in kept[1])
    torch.manual_seed(2)  # the check can fail: other dropout draws give another gradient
    other = _lora_gradients(model, lambda: noised_log_probs(model, chosen["input_ids"], noise,
                                                           chosen["attention_mask"], draws_per_forward=2).sum())
    assert not all(torch.equal(kept[1][name], other[1][name]) for name in kept[1])


def test_pairs_with_chat_messages_use_the_chat_template():
    model = tiny()
    model.tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    rows = [{"prompt": [{"role": "user", "content": "1+2="}], "chosen": [{"role": "assistant", "content": "3"}],
             "rejected": [{"role": "assistant", "content": "4"}]}]
    chosen, rejected = collate_pairs(model.tokenizer, rows, response_length=3)
    text = model.tokenizer.decode(chosen["input_ids"][0][chosen["attention_mask"][0].bool()])
    assert text.startswith("<1+2=>3")
    assert torch.equal(chosen["input_ids"][:, :-3], rejected["input_ids"][:, :-3])  # same prompt
    assert chosen["response_mask"].sum() == 3


def test_bad_pairs_fail_clearly():
    tokenizer = tiny().tokenizer
    with pytest.raises(ValueError, match=r"row 0 lacks column\(s\) \['rejected'\]"):
        collate_pairs(tokenizer, [{"prompt": "1+2=", "chosen": "3"}], response_length=4)
    with pytest.raises(ValueError, match="row 1 has an empty 'rejected' response"):
        collate_pairs(tokenizer, [ROWS[0], {"prompt": "1=", "chosen": "1", "rejected": "  "}], response_length=4)
    with pytest.raises(ValueError, match="n_t >= 1"):
        PreferenceEstimator(n_t=0)
    with pytest.raises(ValueError, match="disabled LoRA adapter"):
        chosen, _ = collate_pairs(tokenizer, ROWS, response_length=4)
        reference_elbo(tiny(), chosen, PreferenceEstimator().sample(chosen["response_mask"], None))


def test_on_policy_pairs_take_each_prompts_best_and_worst_and_count_ties():
    from dlm_rl.sampling.trajectory import Trajectory
    from dlm_rl.trainers.vrpo import on_policy_pairs

    trajectory = Trajectory(
        prompt_ids=torch.tensor([[0, 11], [0, 11], [0, 11], [12, 13], [12, 13], [12, 13]]),
        prompt_mask=torch.tensor([[0, 1]] * 3 + [[1, 1]] * 3),
        response_ids=torch.arange(6)[:, None].repeat(1, 3) + 20,
        step_map=torch.zeros(6, 3, dtype=torch.long), log_probs=torch.zeros(6, 3),
        sampled=torch.ones(6, 3, dtype=torch.bool), nfe=torch.ones(6), block_length=3,
        block_offset=torch.zeros(6, dtype=torch.long), finish_reason=["eos"] * 6,
        prompt_index=[0, 0, 0, 1, 1, 1], rewards={"total": [0.5, 1.0, 0.0, 1.0, 1.0, 1.0]},
    )
    tied = Trajectory(**{**trajectory.__dict__, "rewards": {"total": [0.2, 0.3, 0.25, 0.0, 1.0, 0.5]}})
    chosen, rejected, counts = on_policy_pairs([trajectory], min_margin=0.0)
    assert counts == {"pairs": 1, "ties_dropped": 1, "below_margin": 0}
    assert chosen["input_ids"].tolist() == [[0, 11, 21, 21, 21]]  # prompt 0: sample 1 (reward 1) over 2 (0)
    assert rejected["input_ids"].tolist() == [[0, 11, 22, 22, 22]]
    assert chosen["response_mask"].tolist() == [[False, False, True, True, True]]
    _, _, counts = on_policy_pairs([tied], min_margin=0.2)
    assert counts == {"pairs": 1, "ties_dropped": 0, "below_margin": 1}


def test_the_trainer_on_a_pairs_file_starts_at_log2_and_fails_clearly_on_bad_files(tmp_path):
    import json

    from dlm_rl.trainers.vrpo import VRPOConfig, run

    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in pairs))
    config = VRPOConfig(model="tiny", dataset_path=str(data), eval_size=4, prompts_per_step=6, max_steps=2,
                        eval_steps=2, lora_r=4, gen_length=4, n_t=2, report_to="none", output_dir=str(tmp_path / "run"))
    run(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and lines[1]["pairs"] == 6
    assert all(math.isfinite(m["loss"]) and m["estimator_var"] >= 0 for m in lines[1:])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+2=", "chosen": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        VRPOConfig(model="tiny", dataset_path=str(bad), gen_length=4, output_dir=str(tmp_path / "bad"))


def test_loading_pairs_splits_implicit_chat_prompts_and_drops_pairs_that_do_not_fit():
    from datasets import Dataset

    from dlm_rl.trainers.vrpo import PairData, VRPOConfig, fit_pairs, pair_rows

    def conversation(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    rows = [  # HuggingFaceH4/ultrafeedback_binarized's layout: the prompt also opens both conversations
        {"prompt": "1+2=", "chosen": conversation("1+2=", "3"), "rejected": conversation("1+2=", "4")},
        {"prompt": "9+9=", "chosen": conversation("9+9=", "18"), "rejected": conversation("9+9=", "1234567")},
    ]
    pairs = pair_rows(Dataset.from_list(rows), "chat")
    assert pairs[0] == {"prompt": [{"role": "user", "content": "1+2="}],
                        "chosen": [{"role": "assistant", "content": "3"}],
                        "rejected": [{"role": "assistant", "content": "4"}]}
    tokenizer = tiny().tokenizer
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    config = VRPOConfig(prompts_per_step=1)
    fitted = fit_pairs(PairData(pairs, pairs, "chat"), tokenizer, 4, config)  # "1234567" + EOS does not fit
    assert fitted.train == fitted.held_out == pairs[:1]
    with pytest.raises(ValueError, match="no pair fits gen_length=1"):
        fit_pairs(PairData(pairs, pairs, "chat"), tokenizer, 1, config)
