"""The block-diffusion ELBO of block-attention models, checked against its definition.

The block likelihood (BD3-LM, arXiv 2503.09573; SDAR, arXiv 2510.06303) generates block b given the clean earlier
blocks, so its ELBO is Σ_b E[w_b Σ_{i∈b, masked} log p(y_i | x, y^{<b}, y^b_t)]. The reference here reads every
conditional from the row cut after block b (later blocks absent), earlier blocks clean, with the model's own
block attention; the estimator reads all blocks of a draw in one packed forward. Tokens form, exactly:
Σ_b Σ_{S ⊆ b, S ≠ ∅} (1/L_b) (1/C(L_b, |S|)) (L_b/|S|) f_b(S), f_b(S) = Σ_{i∈S} log p(y_i | x, y^{<b}, y^b with S
masked). Block size 2; row 0 is `pad pad p p y y y y` (two aligned blocks of two response tokens), row 1
`pad p p p y y y y`, whose first response token shares its block with the prompt's last token (positions 2-3): blocks
of 1, 2 and 1 response tokens.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dlm_rl.data.collate import DiffusionCollator
from dlm_rl.diffusion import MCNoise, mdm_loss, noised_log_probs
from dlm_rl.diffusion.elbo import elbo_blocks
from dlm_rl.diffusion.masking import apply_mask
from dlm_rl.models.attention import position_ids_from_padding
from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.models.tiny import tiny_model
from dlm_rl.rl.masking import diffu_grpo_rows, random_mask_rows
from dlm_rl.diffusion.packed import packed_block_size
from dlm_rl.rl.rows import response_log_probs
from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs, elbo_draws, preference_score, vrpo_loss
from dlm_rl.sampling.trajectory import Trajectory

BLOCK, PAD, PROMPT = 2, 0, 4
IDS = torch.tensor([[PAD, PAD, 10, 11, 20, 21, 22, 23], [PAD, 12, 13, 14, 30, 31, 32, 33]])
ATTN = (IDS != PAD).long()
RESP = torch.zeros_like(IDS, dtype=torch.bool)
RESP[:, PROMPT:] = True


def block_model(seed: int = 0):
    return tiny_model(hidden_size=32, num_layers=1, intermediate_size=64, attention="block", block_size=BLOCK,
                      seed=seed)


@pytest.fixture(scope="module")
def model():
    """A tiny block model trained 20 steps on the two rows, so log-probs depend on context."""
    model = block_model()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        noise = MCNoise.sample(RESP, n_t=4, blocks=elbo_blocks(model, ATTN), generator=generator)
        loss = mdm_loss(model, IDS, RESP, noise, ATTN)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def block_conditionals(model, clean, noisy, attn, scored) -> torch.Tensor:
    """[T] float64 log p(clean_i | its block as in `noisy`, the earlier blocks clean) at the `scored` columns of one
    row (0 elsewhere), each block read from the row cut after it: the block likelihood's own conditionals."""
    blocks = position_ids_from_padding(attn) // model.block_size
    out = torch.zeros(len(clean), dtype=torch.float64)
    for block in blocks[scored].unique().tolist():
        inside = (blocks == block) & attn.bool()
        end = int(inside.nonzero().max()) + 1
        row = torch.where(inside, noisy, clean)[:end]
        logits = model(row[None], attn[None, :end]).logits[0].double()
        logp = logits.log_softmax(-1).gather(-1, clean[:end, None])[:, 0]
        out[:end] = torch.where(inside[:end] & scored[:end], logp, out[:end])
    return out


def reference_terms(model, ids, attn, noise) -> torch.Tensor:
    """[n, B] float64 per-draw terms Σ_i w_i log p_i of per-block `noise`, by the definition."""
    terms = torch.zeros(noise.masked.shape[:2], dtype=torch.float64)
    for k, b in itertools.product(range(len(noise)), range(ids.shape[0])):
        masked = noise.masked[k, b]
        noisy = apply_mask(ids[b], masked, model.mask_token_id)
        terms[k, b] = (noise.weight[k, b].double() * block_conditionals(model, ids[b], noisy, attn[b], masked)).sum()
    return terms


def response_blocks(row: int) -> list[list[int]]:
    """The response columns of each block of a row."""
    blocks = (position_ids_from_padding(ATTN[row]) // BLOCK).tolist()
    columns = [c for c in range(IDS.shape[1]) if RESP[row, c]]
    return [[c for c in columns if blocks[c] == block] for block in sorted({blocks[c] for c in columns})]


@pytest.fixture(scope="module")
def table(model):
    """Per row, per block: (columns, f over every subset S, by bit code: bit j = the block's j-th column masked)."""
    rows = []
    for b in range(2):
        blocks = []
        for columns in response_blocks(b):
            f = np.zeros(2 ** len(columns))
            for code in range(1, len(f)):
                masked = torch.zeros(IDS.shape[1], dtype=torch.bool)
                masked[[c for j, c in enumerate(columns) if code >> j & 1]] = True
                noisy = apply_mask(IDS[b], masked, model.mask_token_id)
                f[code] = float(block_conditionals(model, IDS[b], noisy, ATTN[b], masked).sum())
            blocks.append((columns, f))
        rows.append(blocks)
    return rows


def exact_tokens_elbo(blocks) -> float:
    total = 0.0
    for columns, f in blocks:
        length = len(columns)
        for code in range(1, len(f)):
            size = bin(code).count("1")
            total += (1 / length) / math.comb(length, size) * (length / size) * f[code]
    return total


def exact_time_elbo(blocks, t_min: float) -> float:
    """Σ_b (1/(1 − t_min)) ∫ (1/t) Σ_S t^|S| (1 − t)^(L_b − |S|) f_b(S) dt (linear schedule), by 64-point
    Gauss–Legendre."""
    x, w = np.polynomial.legendre.leggauss(64)
    t = t_min + (1 - t_min) * (x + 1) / 2
    w = w * (1 - t_min) / 2
    total = 0.0
    for columns, f in blocks:
        sizes = np.array([bin(code).count("1") for code in range(len(f))])
        prob = t[:, None] ** sizes * (1 - t[:, None]) ** (len(columns) - sizes)
        total += float((w / t * (prob * f).sum(-1)).sum() / (1 - t_min))
    return total


def tokens_support(row: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Every draw of the tokens form for one row: (masked [T], weight [T], probability), each block independently
    masking S with probability (1/L_b) / C(L_b, |S|), weight L_b/|S|."""
    per_block = []
    for columns in response_blocks(row):
        length = len(columns)
        options = []
        for size in range(1, length + 1):
            for subset in itertools.combinations(columns, size):
                options.append((subset, length / size, (1 / length) / math.comb(length, size)))
        per_block.append(options)
    draws = []
    for choice in itertools.product(*per_block):
        masked = torch.zeros(IDS.shape[1], dtype=torch.bool)
        weight = torch.zeros(IDS.shape[1])
        for (subset, w, _), columns in zip(choice, response_blocks(row)):
            masked[list(subset)] = True
            weight[columns] = w
        draws.append((masked, weight, math.prod(p for _, _, p in choice)))
    return draws


@pytest.fixture(scope="module")
def support():
    """The support of both rows as one MCNoise of n = 9 draws (row 1's 3 draws each repeated 3 times) and the
    probability [n, B] of each draw."""
    rows = [tokens_support(0), tokens_support(1)]
    n = math.lcm(*(len(r) for r in rows))
    masked = torch.stack([torch.stack([r[k % len(r)][0] for r in rows]) for k in range(n)])
    weight = torch.stack([torch.stack([r[k % len(r)][1] for r in rows]) for k in range(n)])
    prob = torch.tensor([[r[k % len(r)][2] * len(r) / n for r in rows] for k in range(n)], dtype=torch.float64)
    assert torch.allclose(prob.sum(0), torch.ones(2, dtype=torch.float64))
    t = torch.where(weight > 0, 1 / weight.clamp(min=1e-9), torch.zeros_like(weight))
    return MCNoise(masked, weight, t, "tokens"), prob


def test_log_probs_depend_on_the_block_context(table):
    # Otherwise the checks below could not tell a right conditioning from a wrong one.
    per_token = [f[code] / bin(code).count("1") for blocks in table for _, f in blocks for code in range(1, len(f))]
    assert np.std(per_token) > 0.05 and max(per_token) < 0


def test_block_estimator_mean_over_its_whole_support_is_the_exact_block_elbo(model, table, support):
    noise, prob = support
    with torch.no_grad():
        log_probs = noised_log_probs(model, IDS, noise, ATTN)
        chunked = noised_log_probs(model, IDS, noise, ATTN, draws_per_forward=4)  # chunks with other copy widths
    terms = noise.terms(log_probs).double()  # [n, B]
    mean = (prob * terms).sum(0)
    for b in range(2):
        assert mean[b].item() == pytest.approx(exact_tokens_elbo(table[b]), abs=1e-5)
    torch.testing.assert_close(chunked, log_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(terms, reference_terms(model, IDS, ATTN, noise), atol=1e-5, rtol=0)


def test_plain_rows_miss_the_block_elbo_and_the_block_form_ignores_earlier_noisy_blocks(model, table, support):
    """The old estimate read `[prompt ; noisy response]` under block attention: a block saw the noisy earlier
    blocks. Its mean over the same draws is not the block ELBO; the block form's does not depend on them."""
    noise, prob = support
    with torch.no_grad():
        noisy = apply_mask(IDS.expand(len(noise), -1, -1), noise.masked, model.mask_token_id)
        logits = model(noisy.flatten(0, 1), ATTN.repeat(len(noise), 1)).logits.double()
        plain = logits.log_softmax(-1).gather(-1, IDS.repeat(len(noise), 1)[..., None])[..., 0]
        plain = torch.where(noise.masked, plain.view(noise.masked.shape), 0.0)
        packed = noised_log_probs(model, IDS, noise, ATTN)
    plain_mean = (prob * noise.terms(plain)).sum(0)
    for b in range(2):
        assert abs(plain_mean[b].item() - exact_tokens_elbo(table[b])) > 1e-3
    # Row 0: draws 0 and 3 mask block 2 alike (its first option) and block 1 differently.
    second = response_blocks(0)[1]
    assert torch.equal(noise.masked[0, 0, second], noise.masked[3, 0, second])
    assert not torch.equal(noise.masked[0, 0], noise.masked[3, 0])
    torch.testing.assert_close(packed[0, 0, second], packed[3, 0, second], atol=1e-6, rtol=0)
    assert (plain[0, 0, second] - plain[3, 0, second]).abs().max() > 1e-3


def test_row_level_noise_read_in_blocks_estimates_the_same_block_elbo(model, table):
    """One ℓ ~ U{1..L} over the whole response, weight L/ℓ: each block sees a mixture of its own law, so the
    packed reading is unbiased for the block ELBO with row-level noise too (every subset enumerated)."""
    length = int(RESP[0].sum())
    subsets = [s for size in range(1, length + 1) for s in itertools.combinations(range(length), size)]
    masked = torch.zeros(len(subsets), 2, IDS.shape[1], dtype=torch.bool)
    for k, subset in enumerate(subsets):
        masked[k, :, [PROMPT + j for j in subset]] = True
    sizes = masked[:, 0].sum(-1).double()
    fraction = (sizes / length).float()[:, None].expand(-1, 2)  # [n, B]: ℓ/L
    noise = MCNoise(masked, 1 / fraction, fraction)
    prob = (1 / length) / torch.tensor([math.comb(length, int(size)) for size in sizes], dtype=torch.float64)
    with torch.no_grad():
        mean = (prob[:, None] * noise.terms(noised_log_probs(model, IDS, noise, ATTN)).double()).sum(0)
    for b in range(2):
        assert mean[b].item() == pytest.approx(exact_tokens_elbo(table[b]), abs=1e-5)


def _codes(masked: torch.Tensor, row: int) -> list[torch.Tensor]:
    """Per block of a row: the subset code of every draw, [n]."""
    return [(masked[:, row, columns].long() << torch.arange(len(columns))).sum(-1) for columns in response_blocks(row)]


def test_per_block_tokens_noise_draws_that_support_with_those_probabilities():
    n = 40_000
    noise = MCNoise.sample(RESP, n_t=n, form="tokens", blocks=position_ids_from_padding(ATTN) // BLOCK,
                           generator=torch.Generator().manual_seed(1))
    assert noise.per_block and not (noise.masked & ~RESP).any()
    assert torch.all(noise.weight[:, ~RESP] == 0)
    for row in range(2):
        codes = torch.stack(_codes(noise.masked, row), -1)  # [n, blocks]
        expected = {}
        for masked, weight, p in tokens_support(row):
            key = tuple(int((masked[columns].long() << torch.arange(len(columns))).sum())
                        for columns in response_blocks(row))
            expected[key] = (p, weight)
        keys = [tuple(c) for c in codes.tolist()]
        assert set(keys) == set(expected)  # every draw is in the support, and all of it is drawn
        for key, (p, weight) in expected.items():
            hits = torch.tensor([k == key for k in keys])
            assert abs(hits.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n), (row, key)
            assert torch.all(noise.weight[hits, row] == weight)
            t = noise.t[hits, row][:, RESP[row]]
            torch.testing.assert_close(t, (1 / weight[RESP[row]]).expand_as(t))


def test_per_block_time_noise_is_unbiased_for_the_block_elbo(table):
    n_t, t_min = 200_000, 1e-3
    noise = MCNoise.sample(RESP, n_t=n_t, form="time", t_min=t_min, blocks=position_ids_from_padding(ATTN) // BLOCK,
                           generator=torch.Generator().manual_seed(2))
    for row in range(2):
        values = np.zeros(n_t)
        for (columns, f), codes in zip(table[row], _codes(noise.masked, row)):
            t = noise.t[:, row, columns]
            assert torch.equal(t, t[:, :1].expand_as(t))  # one time per block
            values += noise.weight[:, row, columns[0]].double().numpy() * f[codes.numpy()]
        mean, se = values.mean(), values.std(ddof=1) / math.sqrt(n_t)
        exact = exact_time_elbo(table[row], t_min)
        assert abs(mean - exact) < 4 * se and se < 0.02 * abs(exact), (row, mean, exact, se)


def test_per_block_budget_shares_each_blocks_draw_between_its_masks():
    n_t, n_yt = 30, 4
    noise = MCNoise.sample(RESP, n_t=n_t, n_yt=n_yt, blocks=position_ids_from_padding(ATTN) // BLOCK,
                           generator=torch.Generator().manual_seed(3))
    t = noise.t.view(n_t, n_yt, 2, -1)
    assert torch.equal(t, t[:, :1].expand_as(t))
    blocks = response_blocks(0)
    assert not torch.equal(noise.t[:, 0, blocks[0][0]], noise.t[:, 0, blocks[1][0]])  # blocks draw independently


def test_per_block_tokens_complement_is_unbiased_too(model, table, support):
    noise, prob = support
    complement = noise.complement(RESP)
    assert torch.all((complement.masked | noise.masked) == RESP)
    with torch.no_grad():
        terms = complement.terms(noised_log_probs(model, IDS, complement, ATTN)).double()
    mean = (prob * terms).sum(0)
    for b in range(2):
        assert mean[b].item() == pytest.approx(exact_tokens_elbo(table[b]), abs=1e-5)


def test_per_block_noise_is_refused_by_a_full_attention_model_and_nothing_masked_scores_zero(model):
    blocks = position_ids_from_padding(ATTN) // BLOCK
    noise = MCNoise.sample(RESP, n_t=2, blocks=blocks, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="per-block noise"):
        noised_log_probs(tiny_model(hidden_size=32, num_layers=1, intermediate_size=64), IDS, noise, ATTN)
    nothing = MCNoise(torch.zeros_like(noise.masked), noise.weight, noise.t)
    with torch.no_grad():
        assert torch.equal(noised_log_probs(model, IDS, nothing, ATTN), torch.zeros(noise.masked.shape))


# --- the users of the ELBO take the block form on a block model -------------------------------------------------


def test_mdm_loss_and_trainer_use_the_block_elbo(model, tmp_path):
    from dlm_rl.trainers.mdm import MDMConfig, MDMTrainer

    noise = MCNoise.sample(RESP, n_t=3, blocks=elbo_blocks(model, ATTN), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss = mdm_loss(model, IDS, RESP, noise, ATTN)
    expected = -(reference_terms(model, IDS, ATTN, noise).mean(0) / RESP.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)

    rows = [{"prompt": "12+3=", "completion": "15"}, {"prompt": "4=", "completion": "4"}]
    config = MDMConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                       complementary_masks=True)
    trainer = MDMTrainer(model, config, rows, response_length=4)
    batch = DiffusionCollator(model.tokenizer, 4)(rows)
    torch.manual_seed(6)
    with torch.no_grad():
        trained = trainer.compute_loss(model, batch)
    torch.manual_seed(6)
    noise = MCNoise.sample(batch["response_mask"], blocks=elbo_blocks(model, batch["attention_mask"]))
    both = noise.complement(batch["response_mask"])
    both = MCNoise(*(torch.cat([getattr(noise, f), getattr(both, f)]) for f in ("masked", "weight", "t")))
    assert both.per_block
    expected = -(reference_terms(model, batch["input_ids"], batch["attention_mask"], both).mean(0) / 4).mean()
    assert trained.item() == pytest.approx(expected.item(), abs=1e-5)


PAIRS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    {"prompt": "10+5=", "chosen": "15", "rejected": "16"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "41"},
]


def test_vrpo_scores_policy_and_reference_with_the_same_per_block_noise(model):
    policy, frozen = block_model(seed=1).eval(), model
    chosen, rejected = collate_pairs(policy.tokenizer, PAIRS, response_length=4)
    estimator = PreferenceEstimator(n_t=2)
    with torch.no_grad():
        _, stats = vrpo_loss(policy, chosen, rejected, estimator, beta=0.5,
                             generator=torch.Generator().manual_seed(7), frozen=frozen)
    generator = torch.Generator().manual_seed(7)  # the draws vrpo_loss made, in its order
    elbos = []
    for batch in (chosen, rejected):
        noise = estimator.sample(batch["response_mask"], generator, elbo_blocks(policy, batch["attention_mask"]))
        assert noise.per_block
        for scorer in (policy, frozen):  # the same noise for both: antithetic sampling
            elbos.append(reference_terms(scorer, batch["input_ids"], batch["attention_mask"], noise).mean(0))
            with torch.no_grad():
                torch.testing.assert_close(elbo_draws(scorer, batch, noise).double().mean(0), elbos[-1], atol=1e-5,
                                           rtol=0)
    torch.testing.assert_close(stats["score"].double(), preference_score(*elbos, beta=0.5), atol=1e-5, rtol=0)


def test_vrpo_at_theta_equal_ref_on_a_block_model_is_exactly_log2():
    model = add_lora(block_model(), LoraArguments(use_lora=True, lora_r=4))
    chosen, rejected = collate_pairs(model.tokenizer, PAIRS, response_length=4)
    loss, stats = vrpo_loss(model, chosen, rejected, PreferenceEstimator(n_t=3), beta=0.2,
                            generator=torch.Generator().manual_seed(8))
    assert torch.equal(stats["score"], torch.zeros(3))
    assert loss.item() == torch.tensor(2.0).log().item()


def _trajectory() -> Trajectory:
    """The two rows as a sampled trajectory (prompt 4 columns, response 4); row 1's last token an early-stop fill."""
    return Trajectory(
        prompt_ids=IDS[:, :PROMPT], prompt_mask=ATTN[:, :PROMPT], response_ids=IDS[:, PROMPT:],
        step_map=torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2]]), log_probs=torch.zeros(2, 4),
        sampled=torch.tensor([[True] * 4, [True] * 3 + [False]]), nfe=torch.tensor([2, 3]), block_length=BLOCK,
        block_offset=torch.tensor([0, 1]), finish_reason=["length", "length"],
    )


@pytest.mark.parametrize("method", ["diffu_grpo", "random_masking", "coupled"])
def test_baseline_rows_on_a_block_model_score_each_block_given_clean_earlier_blocks(model, method):
    trajectory, generator = _trajectory(), torch.Generator().manual_seed(9)
    block_size = packed_block_size(model)
    assert block_size == BLOCK
    if method == "diffu_grpo":
        rows = diffu_grpo_rows(trajectory, model.mask_token_id, generator, prompt_mask_p=0.5, block_size=block_size)
    else:
        rows = random_mask_rows(trajectory, model.mask_token_id, generator, coupled=method == "coupled",
                                block_size=block_size)
    assert rows.noisy is not None and rows.targets.any()
    with torch.no_grad():
        logp = response_log_probs(model, rows)
    for n in range(len(rows)):
        b = int(rows.sample[n])
        prompt = rows.input_ids[n, :PROMPT]  # diffu-GRPO's masked prompt, the same in the copy
        state = rows.input_ids[n, -trajectory.response_ids.shape[1]:]
        clean, noisy = torch.cat([prompt, IDS[b, PROMPT:]]), torch.cat([prompt, state])
        targets = torch.cat([torch.zeros(PROMPT, dtype=torch.bool), rows.targets[n]])
        expected = block_conditionals(model, clean, noisy, ATTN[b], targets)[PROMPT:]
        torch.testing.assert_close(logp[n][rows.targets[n]].double(), expected[rows.targets[n]], atol=1e-5, rtol=0)
        assert torch.equal(rows.input_ids[n, PROMPT : PROMPT + 4], IDS[b, PROMPT:])  # the clean response
