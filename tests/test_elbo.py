"""ELBO estimator and MCNoise: unbiasedness checked against the exact expectation, by enumerating every mask.

For a response of L ≤ 6 tokens there are 2^L masks S; f(S) = Σ_{i∈S} log p(x_i | x with S masked) is computed
for all of them with one forward pass. Exact expectations (float64):
- tokens form: Σ_ℓ (1/L)(L/ℓ) mean_{|S|=ℓ} f(S);
- time form:   (1/(1−t_min)) ∫_{t_min}^1 w(t) Σ_S p(t)^{|S|} (1−p(t))^{L−|S|} f(S) dt (Gauss–Legendre quadrature).
Monte Carlo means of `elbo` must land within 4 standard errors of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlm_rl.diffusion import MCNoise, elbo, mdm_loss, noised_log_probs
from dlm_rl.models import tiny_model

MASK_ID = 2
PAD_ID = 0
WIDTH = 10
EPS = 1e-3  # the log-linear schedule's α_1



def _data():
    """8 rows of 10 tokens; row 0: prompt 4 + response 6; row 1: 1 left pad + prompt 4 + response 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 100, (8, WIDTH), generator=g)  # [8, T]
    attn = torch.ones_like(ids)
    resp = torch.zeros(8, WIDTH, dtype=torch.bool)
    resp[:, 4:] = True
    ids[1, 0] = PAD_ID
    attn[1, 0] = 0
    resp[1, 4] = False
    return ids, attn, resp


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained 30 steps on the 8 rows, so log-probs depend on position and context."""
    model = tiny_model(hidden_size=64, num_layers=2, intermediate_size=128, seed=0)
    ids, attn, resp = _data()
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = mdm_loss(model, ids, resp, MCNoise.sample(resp, n_t=4, generator=g), attn)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ids[:2], attn[:2], resp[:2]


def _subset_table(model, ids, attn, resp):
    """Per row b: (response positions, f(S) for all 2^L subsets S in bit order, |S|), f in float64."""
    rows = []
    for b in range(ids.shape[0]):
        pos = resp[b].nonzero().squeeze(-1)
        n_sub = 2 ** len(pos)
        bits = (torch.arange(n_sub)[:, None] >> torch.arange(len(pos))) & 1  # [2^L, L]
        masked = torch.zeros(n_sub, WIDTH, dtype=torch.bool)
        masked[:, pos] = bits.bool()
        noisy = torch.where(masked, MASK_ID, ids[b])  # [2^L, T]
        with torch.no_grad():
            logits = model(noisy, attn[b].expand(n_sub, WIDTH)).logits  # [2^L, T, V]
        logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[b].expand(n_sub, WIDTH)[..., None])[..., 0]
        f = torch.where(masked, logp, torch.zeros_like(logp)).sum(-1)  # [2^L]
        rows.append((pos, f.numpy(), bits.sum(-1).numpy()))
    return rows


@pytest.fixture(scope="module")
def table(trained):
    model, ids, attn, resp = trained
    return _subset_table(model, ids, attn, resp)


def _codes(masked, pos):
    """Subset index (bit j = response position j masked) of each draw: [n]."""
    return (masked[:, pos].long() << torch.arange(len(pos))).sum(-1)


def _per_draw(noise, table):
    """w · f(S) of every draw and row from the enumeration: [n, B] float64."""
    values = [noise.weight[:, b].double().numpy() * f[_codes(noise.masked[:, b], pos).numpy()]
              for b, (pos, f, _) in enumerate(table)]
    return np.stack(values, 1)


def _exact_tokens(f, k):
    L = int(k.max())
    return sum(f[k == l].mean() / l for l in range(1, L + 1))


def _schedule(name, t):
    """p(t) and w(t), written out independently of dlm_rl.diffusion.schedules."""
    if name == "linear":
        return t, 1 / t
    if name == "cosine":
        return 1 - np.cos(np.pi / 2 * t), (np.pi / 2) * np.sin(np.pi / 2 * t) / (1 - np.cos(np.pi / 2 * t))
    return (1 - EPS) * t, 1 / t  # log-linear


def _exact_time(f, k, t_min, schedule="linear", t_max=1.0):
    """(1/(1−t_min)) ∫_{t_min}^{t_max} w(t) Σ_S p^|S| (1−p)^(L−|S|) f(S) dt, by 64-point Gauss–Legendre."""
    L = int(k.max())
    x, w = np.polynomial.legendre.leggauss(64)
    t = t_min + (t_max - t_min) * (x + 1) / 2
    w = w * (t_max - t_min) / 2
    p, wt = _schedule(schedule, t)
    prob = p[:, None] ** k[None] * (1 - p[:, None]) ** (L - k[None])  # [nodes, 2^L]
    return float((w * wt * (prob * f[None]).sum(-1)).sum() / (1 - t_min))


def _exact_closed(f, k):
    L = int(k.max())
    c = np.array([0.0 if j == 0 else math.factorial(j - 1) * math.factorial(L - j) / math.factorial(L) for j in k])
    return float((c * f).sum())


# --- the enumeration itself -------------------------------------------------------------------------------------


def test_log_probs_vary_with_context(table):
    # Otherwise the unbiasedness checks below could not tell a right weighting from a wrong one.
    for pos, f, k in table:
        per_token = f[k > 0] / k[k > 0]
        assert per_token.std() > 0.05
        assert f[k > 0].max() < 0 and f[0] == 0


def test_noised_log_probs_match_enumeration(trained, table):
    model, ids, attn, resp = trained
    n = 64
    masked = torch.zeros(n, 2, WIDTH, dtype=torch.bool)
    for b, (pos, _, _) in enumerate(table):  # draw j masks subset j mod 2^L_b
        codes = torch.arange(n) % 2 ** len(pos)
        masked[:, b, pos] = ((codes[:, None] >> torch.arange(len(pos))) & 1).bool()
    noise = MCNoise(masked, torch.ones(n, 2), torch.ones(n, 2))
    with torch.no_grad():
        logp = noised_log_probs(model, ids, noise, attn)  # [n, B, T]
        chunked = noised_log_probs(model, ids, noise, attn, draws_per_forward=7)
    assert logp.shape == (n, 2, WIDTH)
    assert torch.all(logp[~masked] == 0) and torch.all(logp[masked] < 0)
    for b, (pos, f, _) in enumerate(table):
        expected = f[torch.arange(n) % 2 ** len(pos)]
        np.testing.assert_allclose(logp[:, b].sum(-1).double().numpy(), expected, atol=1e-4)
    torch.testing.assert_close(chunked, logp, atol=1e-5, rtol=0)


def test_exact_forms_agree_without_truncation(table):
    # At t_min = 0 the 1/t (time) and L/ℓ (tokens) forms have the same expectation: Σ_S f(S) (|S|−1)!(L−|S|)!/L!.
    for _, f, k in table:
        closed = _exact_closed(f, k)
        assert _exact_tokens(f, k) == pytest.approx(closed, abs=1e-6)
        assert _exact_time(f, k, 0.0, "linear") == pytest.approx(closed, abs=1e-6)
        assert _exact_time(f, k, 0.0, "cosine") == pytest.approx(closed, abs=1e-6)


# --- Monte Carlo through `elbo` ---------------------------------------------------------------------------------

RUNS = {  # name: (form, n_t, n_yt, t_min)
    "tokens": ("tokens", 3000, 1, 1e-3),
    "tokens_nyt4": ("tokens", 750, 4, 1e-3),
    "time": ("time", 3000, 1, 1e-3),
    "time_nyt4": ("time", 750, 4, 1e-3),
}


@pytest.fixture(scope="module")
def mc_runs(trained, table):
    """elbo() over n = n_t × n_yt draws, with the per-draw values w·f(S) read from the enumeration."""
    model, ids, attn, resp = trained
    out = {}
    for i, (name, (form, n_t, n_yt, t_min)) in enumerate(RUNS.items()):
        g = torch.Generator().manual_seed(100 + i)
        noise = MCNoise.sample(resp, n_t=n_t, n_yt=n_yt, form=form, t_min=t_min, generator=g)
        with torch.no_grad():
            est = elbo(model, ids, resp, noise, attn, draws_per_forward=1000)  # [B]
        values = _per_draw(noise, table)  # [n, B]
        group_means = values.reshape(n_t, n_yt, -1).mean(1)  # draws sharing a timestep are not independent
        se = group_means.std(0, ddof=1) / math.sqrt(n_t)
        out[name] = (est.double().numpy(), values, se)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_elbo_mc_mean_matches_exact(name, mc_runs, table):
    form, _, _, t_min = RUNS[name]
    est, values, se = mc_runs[name]
    # elbo() is exactly the mean of the per-draw w·f(S) (same draws), so `se` is the SE of `est`.
    np.testing.assert_allclose(est, values.mean(0), atol=2e-4)
    for b, (_, f, k) in enumerate(table):
        exact = _exact_tokens(f, k) if form == "tokens" else _exact_time(f, k, t_min)
        assert abs(est[b] - exact) < 4 * se[b], (b, est[b], exact, se[b])
        assert se[b] < 0.1 * abs(exact)  # the check has teeth


@pytest.mark.parametrize("n_yt", [1, 4])
def test_tokens_and_time_forms_agree_in_mc(n_yt, mc_runs):
    suffix = "" if n_yt == 1 else "_nyt4"
    tok, _, se_tok = mc_runs["tokens" + suffix]
    tim, _, se_tim = mc_runs["time" + suffix]
    assert np.all(np.abs(tok - tim) < 4 * np.sqrt(se_tok**2 + se_tim**2))


# Many more draws, scored from the enumeration (elbo() was shown above to average exactly these values).
BIG = {  # name: (form, schedule, n_t, n_yt, t_min)
    "tokens": ("tokens", "linear", 200_000, 1, 1e-3),
    "tokens_nyt5": ("tokens", "linear", 40_000, 5, 1e-3),
    "time_linear": ("time", "linear", 200_000, 1, 1e-3),
    "time_linear_tmin0.2": ("time", "linear", 200_000, 1, 0.2),
    "time_linear_nyt5": ("time", "linear", 40_000, 5, 0.05),
    "time_cosine": ("time", "cosine", 200_000, 1, 1e-3),
    "time_loglinear": ("time", "log-linear", 200_000, 1, 1e-3),
}


@pytest.mark.parametrize("name", list(BIG))
def test_estimator_is_unbiased_with_many_draws(name, trained, table):
    form, schedule, n_t, n_yt, t_min = BIG[name]
    resp = trained[3]
    g = torch.Generator().manual_seed(7)
    noise = MCNoise.sample(resp, n_t=n_t, n_yt=n_yt, form=form, schedule=schedule, t_min=t_min, generator=g)
    groups = _per_draw(noise, table).reshape(n_t, n_yt, -1).mean(1)  # [n_t, B]
    mean, se = groups.mean(0), groups.std(0, ddof=1) / math.sqrt(n_t)
    for b, (_, f, k) in enumerate(table):
        if form == "tokens":
            exact = _exact_tokens(f, k)
        else:  # log-linear masks with p = (1 − eps) t, so its bound stops at p = 1 − eps
            exact = _exact_time(f, k, t_min, schedule)
        assert abs(mean[b] - exact) < 4 * se[b], (b, mean[b], exact, se[b])
        assert se[b] < 0.02 * abs(exact)


@pytest.mark.parametrize("form", ["tokens", "time"])
def test_complement_estimate_is_unbiased(form, trained, table):
    # LaViDa's complementary mask is a second sample of the same bound. Tokens form: ℓ' = L − ℓ is uniform on
    # {0..L−1}, so with weight L/ℓ' (and 0 for ℓ' = 0) the all-masked term (1/L) f(all) is never estimated.
    resp = trained[3]
    n_t = 200_000
    g = torch.Generator().manual_seed(8)
    comp = MCNoise.sample(resp, n_t=n_t, form=form, t_min=1e-3, generator=g).complement(resp)
    values = _per_draw(comp, table)
    mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(n_t)
    for b, (_, f, k) in enumerate(table):
        # Time form: t' = 1 − t ~ U(0, 1 − t_min), the density still 1/(1 − t_min).
        exact = _exact_tokens(f, k) if form == "tokens" else _exact_time(f, k, 0.0, t_max=1 - 1e-3) / (1 - 1e-3)
        assert abs(mean[b] - exact) < 4 * se[b], (
            f"row {b}: complement mean {mean[b]:.4f} vs exact ELBO {exact:.4f} (SE {se[b]:.4f}); "
            f"(1/L) f(all masked) = {f[-1] / k.max():.4f}"
        )


# --- MCNoise ----------------------------------------------------------------------------------------------------


def _masks_3rows(width=WIDTH):
    """Row 0: response at 4..; row 1: left pad at 0, response at 5..; row 2: no response."""
    resp = torch.zeros(3, width, dtype=torch.bool)
    resp[0, 4:] = True
    resp[1, 5:] = True
    return resp


def test_tokens_form_masks_exactly_l_tokens_with_weight_l_over_L():
    resp = _masks_3rows()
    n = 6000
    noise = MCNoise.sample(resp, n_t=n, form="tokens", generator=torch.Generator().manual_seed(0))
    assert noise.masked.shape == (n, 3, WIDTH) and noise.weight.shape == (n, 3) and noise.t.shape == (n, 3)
    assert not (noise.masked & ~resp).any()  # never a prompt or padding position
    count = noise.masked.sum(-1)  # [n, B]
    for b, L in enumerate([6, 5]):
        assert count[:, b].min() == 1 and count[:, b].max() == L
        torch.testing.assert_close(noise.weight[:, b], L / count[:, b].float())
        torch.testing.assert_close(noise.t[:, b], count[:, b].float() / L)
        # ℓ ~ U{1..L}
        freq = torch.bincount(count[:, b], minlength=L + 1)[1:].float() / n
        assert torch.all((freq - 1 / L).abs() < 5 * math.sqrt((1 / L) * (1 - 1 / L) / n))
        # given ℓ the subset is uniform, so every response position is masked with probability (L + 1) / (2L)
        p = (L + 1) / (2 * L)
        rate = noise.masked[:, b, resp[b]].float().mean(0)
        assert torch.all((rate - p).abs() < 5 * math.sqrt(p * (1 - p) / n))
    assert not noise.masked[:, 2].any() and torch.all(noise.weight[:, 2] == 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "log-linear"])
def test_time_form_mask_rate_follows_t(schedule):
    width, t_min = 400, 0.05
    resp = torch.ones(2, width, dtype=torch.bool)
    resp[1, :100] = False  # prompt: never masked
    noise = MCNoise.sample(resp, n_t=300, form="time", schedule=schedule, t_min=t_min,
                           generator=torch.Generator().manual_seed(1))
    t = noise.t.double().numpy()
    assert t.min() >= t_min and t.max() <= 1
    assert abs(t.mean() - (1 + t_min) / 2) < 5 * (1 - t_min) / math.sqrt(12 * t.size)  # t ~ U(t_min, 1)
    assert not noise.masked[:, 1, :100].any()
    p, w = _schedule(schedule, t)
    np.testing.assert_allclose(noise.weight.double().numpy(), w, rtol=1e-5)
    for b, L in enumerate([400, 300]):
        rate = noise.masked[:, b].sum(-1).double().numpy() / L
        assert np.all(np.abs(rate - p[:, b]) < 5 * np.sqrt(p[:, b] * (1 - p[:, b]) / L) + 1e-9)


@pytest.mark.parametrize("form", ["tokens", "time"])
def test_budget_is_n_t_timesteps_times_n_yt_masks(form):
    resp = _masks_3rows()
    n_t, n_yt = 50, 4
    noise = MCNoise.sample(resp, n_t=n_t, n_yt=n_yt, form=form, generator=torch.Generator().manual_seed(2))
    assert len(noise) == n_t * n_yt
    t = noise.t.view(n_t, n_yt, 3)[:, :, :2]
    assert torch.equal(t, t[:, :1].expand_as(t))  # the n_yt draws of one timestep share t
    distinct = len(torch.unique(t[:, 0, 0]))  # different timesteps differ (tokens form: all ℓ in 1..6 occur)
    assert distinct == 6 if form == "tokens" else distinct == n_t
    masked = noise.masked.view(n_t, n_yt, 3, WIDTH)
    differs = (masked != masked[:, :1]).flatten(2).any(-1)[:, 1:]  # [n_t, n_yt − 1]
    assert differs.float().mean() > 0.5  # ... but get their own masks
    if form == "tokens":
        count = masked.sum(-1)
        assert torch.equal(count, count[:, :1].expand_as(count))


@pytest.mark.parametrize("form", ["tokens", "time"])
def test_complement_is_disjoint_and_covers_the_response(form):
    resp = _masks_3rows()
    noise = MCNoise.sample(resp, n_t=500, form=form, generator=torch.Generator().manual_seed(3))
    comp = noise.complement(resp)
    assert torch.equal(comp.masked | noise.masked, resp.expand_as(noise.masked))
    count = comp.masked.sum(-1).float()
    if form == "tokens":
        # Disjoint, except where the draw masked the whole response: then the complement masks it all too,
        # which keeps ℓ' uniform on {1..L} (the tokens-form law) instead of losing the ℓ = L term.
        full = noise.masked.sum(-1) == resp.sum(-1)  # [n, B]
        assert full[:, 0].any()  # ℓ = L happened
        overlap = (comp.masked & noise.masked).any(-1)
        assert torch.equal(overlap, full & resp.any(-1))
        assert torch.equal(comp.masked[full], resp.expand_as(noise.masked)[full])
        lengths = resp.sum(-1).float()
        torch.testing.assert_close(comp.weight, torch.where(count > 0, lengths / count.clamp(min=1), count))
    else:
        torch.testing.assert_close(comp.t, 1 - noise.t)
        torch.testing.assert_close(comp.weight, 1 / (1 - noise.t))


@pytest.mark.parametrize("form", ["tokens", "time"])
def test_same_seed_same_noise(form):
    resp = _masks_3rows()
    a, b, c = (MCNoise.sample(resp, n_t=8, n_yt=2, form=form, generator=torch.Generator().manual_seed(s))
               for s in (5, 5, 6))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.weight, b.weight) and torch.equal(a.t, b.t)
    assert not torch.equal(a.masked, c.masked)


def test_sample_rejects_bad_arguments():
    resp = _masks_3rows()
    with pytest.raises(ValueError, match="form"):
        MCNoise.sample(resp, form="steps")
    with pytest.raises(ValueError, match="n_t"):
        MCNoise.sample(resp, n_t=0)
    with pytest.raises(ValueError, match="schedule"):
        MCNoise.sample(resp, form="time", schedule="square")


# --- antithetic sampling and the MDM loss -----------------------------------------------------------------------


def test_same_noise_on_identical_models_gives_zero_difference():
    ids, attn, resp = _data()
    policy, ref, other = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    noise = MCNoise.sample(resp, n_t=4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        b_policy = elbo(policy, ids, resp, noise, attn)
        b_ref = elbo(ref, ids, resp, noise, attn)
        b_other = elbo(other, ids, resp, noise, attn)
        b_resampled = elbo(ref, ids, resp, MCNoise.sample(resp, n_t=4, generator=torch.Generator().manual_seed(5)),
                           attn)
    assert torch.equal(b_policy - b_ref, torch.zeros(8))
    # VRPO at θ = ref: ŝ = β[(B_θ(y_w) − B_ref(y_w)) − (B_θ(y_l) − B_ref(y_l))] = 0, loss exactly log 2
    s = 0.2 * ((b_policy[0] - b_ref[0]) - (b_policy[1] - b_ref[1]))
    assert -F.logsigmoid(s).item() == pytest.approx(math.log(2), abs=1e-7)
    assert (b_policy - b_other).abs().min() > 0  # a different model or different noise does not cancel
    assert (b_policy - b_resampled).abs().max() > 1e-3


class _Uniform(torch.nn.Module):
    """Equal logits on every class but the mask token: log p = −log(V − 1) everywhere."""

    mask_token_id = MASK_ID

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 100)
        logits[..., MASK_ID] = float("-inf")
        return type("Out", (), {"logits": logits})


def test_mdm_loss_of_uniform_predictor_is_log_of_classes():
    ids, attn, resp = _data()
    uniform = math.log(100 - 1)
    noise = MCNoise.sample(resp, n_t=64, form="tokens", generator=torch.Generator().manual_seed(6))
    # tokens form: every draw has w · ℓ = L exactly
    assert mdm_loss(_Uniform(), ids, resp, noise, attn).item() == pytest.approx(uniform, rel=1e-6)
    noise = MCNoise.sample(resp, n_t=4000, form="time", t_min=0.05, generator=torch.Generator().manual_seed(6))
    # time form: E[w(t) · #masked] = L, a mean of 4000 draws with weight ≤ 20
    assert mdm_loss(_Uniform(), ids, resp, noise, attn).item() == pytest.approx(uniform, rel=0.05)


@pytest.mark.parametrize("form", ["tokens", "time"])
def test_mdm_loss_at_initialisation_is_near_uniform(form):
    model = tiny_model(seed=0)
    ids, attn, resp = _data()
    noise = MCNoise.sample(resp, n_t=16, form=form, t_min=0.05, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss = mdm_loss(model, ids, resp, noise, attn).item()
    # the uniform predictor's loss on the same draws (log(V − 1) in expectation, and exactly in tokens form)
    uniform = mdm_loss(_Uniform(), ids, resp, noise, attn).item()
    assert uniform == pytest.approx(math.log(model.config.vocab_size - 1), rel=0.5)
    assert abs(loss - uniform) < 0.05 * uniform, (loss, uniform)


def test_mdm_loss_skips_rows_without_response(trained):
    model, ids, attn, resp = trained
    noise = MCNoise.sample(resp, n_t=8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        per_row = elbo(model, ids, resp, noise, attn)
        loss = mdm_loss(model, ids, resp, noise, attn)
    expected = -(per_row / resp.sum(-1)).mean()
    torch.testing.assert_close(loss, expected)
    # a third row with no response changes nothing
    ids3 = torch.cat([ids, ids[:1]])
    attn3 = torch.cat([attn, attn[:1]])
    resp3 = torch.cat([resp, torch.zeros_like(resp[:1])])
    noise3 = MCNoise(torch.cat([noise.masked, torch.zeros_like(noise.masked[:, :1])], 1),
                     torch.cat([noise.weight, torch.zeros_like(noise.weight[:, :1])], 1),
                     torch.cat([noise.t, torch.zeros_like(noise.t[:, :1])], 1))
    with torch.no_grad():
        torch.testing.assert_close(mdm_loss(model, ids3, resp3, noise3, attn3), expected, atol=1e-5, rtol=0)
