"""Ambient RNA removal: pure maths, the stage's contract, profile estimation and recovery of known contamination.

The recovery tests use the package simulator with a known contamination level. Each group's markers (genes
up-regulated in that group only) are zeroed in the other groups' true counts, so the ambient RNA (the pooled
expression, as lysed cells release it) carries genes that those groups do not express: the setting CellBender's
model is built for. Even there the fraction is not identifiable from the cells alone (the decoder can absorb the
ambient counts into each type's profile), so, as CellBender does, the ambient amount comes from empty droplets:
the tests add droplets holding ambient RNA only, as many molecules as the cells' droplets hold.
"""

import functools
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
from helpers import tree_allclose

import diffbio_eqx as dx
from diffbio_eqx._ambient import _stage as ambient_stage
from diffbio_eqx._ambient._math import (
    ambient_count_log_likelihood,
    ambient_log_rates,
    cell_share,
    contamination_fraction,
    gaussian_kl_to_prior,
    log_fractions,
    log_prior_fraction,
    posterior_cell_counts,
    prior_logit_fraction,
    refine_logit_fraction,
    round_cell_counts,
    safe_log_profile,
)


N_CELLS, N_GENES, N_GROUPS = 600, 300, 4
ONE_EPOCH = dx.TrainSettings(n_epochs=1, progress=False)


@functools.cache
def marker_data(level: float, seed: int = 1) -> dict[str, np.ndarray]:
    """Simulated droplets at contamination `level` (CellBender's model: about the same number of ambient molecules
    in every droplet, and 2000 empty droplets), with group markers absent from the other groups."""
    sim = dx.simulate(
        jr.key(seed), n_cells=N_CELLS, n_genes=N_GENES, n_groups=N_GROUPS, contamination=level,
        de_prob=0.2, de_fac_loc=1.0, n_empty_droplets=2000,
    )
    de = np.asarray(sim.de_factors)
    groups = np.asarray(sim.groups)
    only_here = (de > 1.0) & (np.sum(de != 1.0, axis=0, keepdims=True) == 1)  # up in exactly one group
    marker_of = np.where(only_here.any(axis=0), only_here.argmax(axis=0), -1)
    present = (marker_of[None, :] == -1) | (marker_of[None, :] == np.arange(N_GROUPS)[:, None])
    true = np.asarray(sim.true_counts) * present[groups]
    ambient = np.asarray(sim.ambient_counts)
    counts = true + ambient
    return {
        "counts": counts,
        "true": true,
        "ambient": ambient,
        "empties": np.asarray(sim.empty_counts, dtype=np.float32),
        "fraction": ambient.sum(1) / counts.sum(1),
        "profile": np.asarray(sim.ambient_profile),
        "groups": groups,
        "absent": ~present[groups],  # (n_cells, n_genes): genes the cell's group does not express
    }


@functools.cache
def fitted(level: float) -> tuple[dict[str, np.ndarray], dx.AmbientResult]:
    data = marker_data(level)
    if level > 0:  # CellBender's prior from the empty droplets (all of them: at 30% they overlap small cells)
        count, log_scale = ambient_stage.estimate_ambient_count(data["empties"], max_total=np.inf)
    else:  # no ambient RNA, no empty droplets with counts: the Beta prior
        count, log_scale = None, 0.5
    stage = dx.AmbientRemoval(
        N_GENES, prior_ambient_count=count, prior_log_scale=log_scale, dtype=jnp.float32, key=jr.key(2)
    )
    result = dx.fit_ambient_removal(stage, data["counts"], data["profile"], key=jr.key(3),
                                    settings=dx.TrainSettings(progress=False))
    assert result.train_loss.shape == (300,)  # ambient_default_epochs at 600 cells
    return data, dx.remove_ambient(result.model, data["counts"], data["profile"], integer=False)


def oracle_mse_ratio(data: dict[str, np.ndarray]) -> float:
    """The squared error of the posterior mean that knows the rates (each group's true profile times the cell's
    true total, and each droplet's ambient total times the profile), relative to the raw counts' error.

    No estimator does better on average: given the rates, a count splits binomially, so even the exact posterior
    mean keeps an error of about $\\mu\\lambda / (\\mu + \\lambda)$ per count, which at low contamination is most of
    the raw error $\\lambda + \\lambda^2$ on genes that the cell also expresses.
    """
    true, ambient, groups = data["true"], data["ambient"], data["groups"]
    group_profile = np.stack([true[groups == g].sum(0) / true[groups == g].sum() for g in range(N_GROUPS)])
    cell_rate = group_profile[groups] * true.sum(1, keepdims=True)
    ambient_rate = ambient.sum(1, keepdims=True) * data["profile"][None, :]
    share = cell_rate / np.maximum(cell_rate + ambient_rate, 1e-30)
    return float(np.mean((data["counts"] * share - true) ** 2) / np.mean(ambient**2))


def _rates(getkey, n_cells=7, n_genes=11, dtype=jnp.float64):
    logits = jr.normal(getkey(), (n_cells, n_genes), dtype=dtype)
    profile = jr.uniform(getkey(), (n_genes,), dtype=dtype)
    log_total = jnp.log(jr.uniform(getkey(), (n_cells,), dtype=dtype, minval=100.0, maxval=1000.0))
    logit_f = jr.normal(getkey(), (n_cells,), dtype=dtype) - 2.0
    return log_total, logit_f, jax.nn.log_softmax(logits, axis=-1), safe_log_profile(profile)


# ---- pure functions -------------------------------------------------------------------------------------------


def test_rates_shapes_and_totals(getkey):
    log_total, logit_f, log_cell_profile, log_profile = _rates(getkey)
    log_mu, log_lam = ambient_log_rates(log_total, logit_f, log_cell_profile, log_profile)
    assert log_mu.shape == log_lam.shape == (7, 11)
    f = jax.nn.sigmoid(logit_f)
    total = jnp.exp(log_total)
    # cell part sums to (1 - f) T, ambient part to f T
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_mu), -1), (1 - f) * total, rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_lam), -1), f * total, rtol=1e-10)
    log_f, log_1mf = log_fractions(logit_f)
    np.testing.assert_allclose(log_f, jnp.log(f), rtol=1e-12)
    np.testing.assert_allclose(log_1mf, jnp.log1p(-f), rtol=1e-12)


def test_zero_profile_entries_are_finite(getkey):
    profile = jnp.array([0.0, 0.5, 0.5, 0.0])
    log_profile = safe_log_profile(profile)
    assert jnp.all(jnp.isfinite(log_profile))
    log_mu, log_lam = ambient_log_rates(
        jnp.zeros(2), jnp.zeros(2), jnp.log(jnp.full((2, 4), 0.25)), log_profile
    )
    share = cell_share(log_mu, log_lam)
    np.testing.assert_allclose(share[:, [0, 3]], 1.0)  # no ambient on genes the profile lacks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_posterior_counts_bounded_and_integer(seed):
    key = jr.key(seed)
    k1, k2, k3, k4 = jr.split(key, 4)
    counts = jr.poisson(k1, 3.0, (20, 15)).astype(jnp.float64)
    log_mu = jr.normal(k2, (20, 15), dtype=jnp.float64)
    log_lam = jr.normal(k3, (20, 15), dtype=jnp.float64)
    cells = posterior_cell_counts(counts, log_mu, log_lam)
    # the test's own arithmetic in NumPy (each eager jnp operation at a new shape compiles a program)
    n, mu, lam, c = (np.asarray(a) for a in (counts, log_mu, log_lam, cells))
    assert np.all(c >= 0) and np.all(c <= n)
    np.testing.assert_allclose(c, n * np.exp(mu) / (np.exp(mu) + np.exp(lam)), rtol=1e-12)
    whole = np.asarray(round_cell_counts(counts, cells))
    assert np.all(whole == np.round(whole)) and np.all(whole >= 0) and np.all(whole <= n)
    assert np.max(np.abs(whole - c)) <= 0.5
    # non-integer counts: the cap keeps rounded values below the observed ones
    frac_counts = n + 0.6 * (n > 0) * np.asarray(jr.uniform(k4, counts.shape, dtype=jnp.float64))
    assert np.all(np.asarray(round_cell_counts(jnp.asarray(frac_counts), jnp.asarray(0.999 * frac_counts)))
                  <= frac_counts)
    removed = np.asarray(contamination_fraction(counts, cells))
    assert removed.shape == (20,) and np.all((removed >= 0) & (removed <= 1))
    np.testing.assert_allclose(contamination_fraction(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


def test_gaussian_kl_matches_closed_form(getkey):
    m, lv = jr.normal(getkey(), (5, 3)), jr.normal(getkey(), (5, 3))
    m0, lv0 = jnp.asarray(0.3), jnp.asarray(-0.5)
    kl = gaussian_kl_to_prior(m, lv, m0[None, None], lv0[None, None])
    v, v0 = jnp.exp(lv), jnp.exp(lv0)
    expected = jnp.sum(0.5 * jnp.log(v0 / v) + (v + (m - m0) ** 2) / (2 * v0) - 0.5, axis=-1)
    np.testing.assert_allclose(kl, expected, rtol=1e-10)
    np.testing.assert_allclose(gaussian_kl_to_prior(m, lv, m, lv), 0.0, atol=1e-12)


@pytest.mark.parametrize("true_fraction", [0.0, 0.03, 0.2, 0.6])
def test_em_refinement_recovers_known_fraction(getkey, true_fraction):
    """Counts equal to their expectation under known profiles: EM must find the fraction that made them."""
    n_genes = 50
    cell_profile = jax.nn.softmax(2.0 * jr.normal(getkey(), (3, n_genes)), axis=-1)
    cell_profile = cell_profile.at[:, :10].set(0.0)  # genes the cells lack (as markers of other types)
    cell_profile = cell_profile / jnp.sum(cell_profile, -1, keepdims=True)
    ambient = jax.nn.softmax(jr.normal(getkey(), (n_genes,)))
    counts = 1000.0 * ((1 - true_fraction) * cell_profile + true_fraction * ambient[None, :])
    log_cell_profile = jnp.log(jnp.maximum(cell_profile, 1e-300))
    logit, trace = refine_logit_fraction(
        counts, log_cell_profile, safe_log_profile(ambient), jnp.zeros(3), n_steps=200
    )
    assert trace.shape == (200, 3)
    np.testing.assert_allclose(jax.nn.sigmoid(logit), true_fraction, atol=1e-4)

    def mixture_log_likelihood(f):
        rates = (1 - f)[:, None] * cell_profile + f[:, None] * ambient[None, :]
        return jnp.sum(counts * jnp.log(jnp.maximum(rates, 1e-300)), -1)

    values = jax.vmap(mixture_log_likelihood)(trace)
    assert jnp.all(jnp.diff(values, axis=0) >= -1e-8 * jnp.abs(values[1:]))  # EM never decreases it


def test_log_prior_matches_closed_forms(getkey):
    logit_f = jr.normal(getkey(), (9,), dtype=jnp.float64) - 2.0
    log_total = jnp.log(jr.uniform(getkey(), (9,), dtype=jnp.float64, minval=500.0, maxval=5000.0))
    f, total = jax.nn.sigmoid(logit_f), jnp.exp(log_total)
    p, d0, s = jnp.asarray(0.05), jnp.asarray(120.0), jnp.asarray(0.4)
    # without an ambient count: Beta(1, 1/p - 1) density of f, up to a constant
    beta = log_prior_fraction(logit_f, log_total, p, jnp.asarray(0.0), s)
    expected = scipy.stats.beta.logpdf(np.asarray(f), 1.0, 1.0 / 0.05 - 1.0)
    np.testing.assert_allclose(beta - beta[0], expected - expected[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scipy.stats.beta.mean(1.0, 1.0 / 0.05 - 1.0), 0.05)
    # with one: log-normal density of log(f T) around log d0
    count = log_prior_fraction(logit_f, log_total, p, d0, s)
    expected = scipy.stats.norm.logpdf(np.log(f * total), np.log(120.0), 0.4)
    np.testing.assert_allclose(count - count[0], expected - expected[0], rtol=1e-9, atol=1e-9)
    # the prior's centre: d0 / T, else p
    np.testing.assert_allclose(jax.nn.sigmoid(prior_logit_fraction(log_total, p, d0)), 120.0 / total, rtol=1e-9)
    np.testing.assert_allclose(jax.nn.sigmoid(prior_logit_fraction(log_total, p, jnp.asarray(0.0))), 0.05)
    # gradients stay finite in both branches (the unused branch must not leak NaNs)
    for d in (jnp.asarray(0.0), d0):
        g = jax.grad(lambda u: jnp.sum(log_prior_fraction(u, log_total, p, d, s)))(logit_f)
        assert jnp.all(jnp.isfinite(g))


@pytest.mark.parametrize("prior_count", [0.0, 80.0])
def test_map_em_reaches_the_penalised_optimum(getkey, prior_count):
    """MAP-EM's fixed point zeroes the gradient of (mixture log-likelihood + log prior) in logit f; with the
    Beta prior it is also the closed form f = A / (T + 1/p - 2)."""
    n_genes = 50
    cell_profile = jax.nn.softmax(2.0 * jr.normal(getkey(), (4, n_genes)), axis=-1)
    ambient = jax.nn.softmax(jr.normal(getkey(), (n_genes,)))
    counts = 400.0 * (0.9 * cell_profile + 0.1 * ambient[None, :])
    log_total = jnp.log(jnp.sum(counts, -1))
    p, d0, s = jnp.asarray(0.05), jnp.asarray(prior_count), jnp.asarray(0.3)
    log_prior = lambda u: log_prior_fraction(u, log_total, p, d0, s)
    log_cell = jnp.log(cell_profile)
    logit, _ = refine_logit_fraction(
        counts, log_cell, safe_log_profile(ambient), jnp.zeros(4), n_steps=300, log_prior=log_prior
    )

    def penalised(u):
        f = jax.nn.sigmoid(u)
        rates = (1 - f)[:, None] * cell_profile + f[:, None] * ambient[None, :]
        return jnp.sum(counts * jnp.log(rates)) + jnp.sum(log_prior(u))

    np.testing.assert_allclose(jax.grad(penalised)(logit), 0.0, atol=1e-6)
    f = jax.nn.sigmoid(logit)
    if prior_count == 0.0:
        assert jnp.all(f < 0.1)  # shrunk toward the mode 0
        log_mu, log_lam = ambient_log_rates(jnp.zeros(4), logit, log_cell, safe_log_profile(ambient))
        expected_ambient = jnp.sum(counts * cell_share(log_lam, log_mu), -1)
        np.testing.assert_allclose(f, expected_ambient / (jnp.sum(counts, -1) + 1 / 0.05 - 2), rtol=1e-8)
    else:  # 80 ambient of 400 molecules a priori against 40 in the counts: in between
        assert jnp.all((f > 0.1) & (f < 0.2))


def test_likelihood_gradient_matches_finite_difference(getkey):
    log_total, logit_f, log_cell_profile, log_profile = _rates(getkey)
    counts = jr.poisson(getkey(), 5.0, log_cell_profile.shape).astype(jnp.float64)
    log_theta = jnp.log(jr.uniform(getkey(), (11,), dtype=jnp.float64, minval=1.0, maxval=20.0))

    def objective(logit_f, log_cell_profile):
        log_mu, log_lam = ambient_log_rates(log_total, logit_f, log_cell_profile, log_profile)
        return jnp.sum(ambient_count_log_likelihood(counts, log_mu, log_lam, log_theta))

    grads = jax.grad(objective, argnums=(0, 1))(logit_f, log_cell_profile)
    assert all(jnp.all(jnp.isfinite(g)) for g in grads)
    eps = 1e-6
    for index, (x, g) in enumerate(zip((logit_f, log_cell_profile), grads)):
        v = jr.normal(getkey(), x.shape, dtype=x.dtype)
        v = v / jnp.linalg.norm(v)
        args_plus = [logit_f, log_cell_profile]
        args_minus = [logit_f, log_cell_profile]
        args_plus[index] = x + eps * v
        args_minus[index] = x - eps * v
        fd = (objective(*args_plus) - objective(*args_minus)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(g, v), fd, rtol=1e-6)


# ---- the stage ------------------------------------------------------------------------------------------------


@functools.cache  # immutable arrays and stage: built once for the tests that share their compiled programs
def _small_stage_and_data(dtype=jnp.float64):
    sim = dx.simulate(jr.key(5), n_cells=64, n_genes=40, contamination=0.1)
    stage = dx.AmbientRemoval(40, latent_dim=4, hidden_dim=16, dtype=dtype, key=jr.key(6))
    return stage, sim.counts.astype(dtype), sim.ambient_profile.astype(dtype)


@eqx.filter_jit
def _call(stage, counts, profile, **kwargs):
    return stage(counts, profile, **kwargs)


def test_stage_call_contract_and_shapes():
    stage, counts, profile = _small_stage_and_data()
    out = _call(stage, counts, profile)
    assert out.decontaminated_counts.shape == counts.shape
    assert out.contamination_fraction.shape == out.ambient_fraction.shape == (64,)
    assert out.latent.shape == (64, 4)
    assert jnp.all(out.decontaminated_counts >= 0) and jnp.all(out.decontaminated_counts <= counts)
    assert out["decontaminated_counts"] is out.decontaminated_counts
    sampled = _call(stage, counts, profile, key=jr.key(0))
    assert not np.allclose(np.asarray(sampled.latent), np.asarray(out.latent))
    # `inference` ignores the key and `integer` only rounds the decontaminated counts: one program checks both
    # (one compile of the stage fewer than a call for each).
    whole = _call(stage, counts, profile, key=jr.key(0), inference=True, integer=True)
    assert tree_allclose((whole.latent, whole.ambient_fraction), (out.latent, out.ambient_fraction))
    rounded, n = np.asarray(whole.decontaminated_counts), np.asarray(counts)
    np.testing.assert_array_equal(rounded, np.round(np.asarray(out.decontaminated_counts)))  # nearest whole number
    assert np.all(rounded == np.round(rounded)) and np.all(rounded <= n)
    np.testing.assert_allclose(np.asarray(whole.contamination_fraction), 1 - rounded.sum(1) / n.sum(1), rtol=1e-10)


def test_jit_matches_eager_forward_and_gradient():
    stage, counts, profile = _small_stage_and_data()
    eager = stage(counts, profile)
    jitted = _call(stage, counts, profile)
    assert tree_allclose(eager, jitted, rtol=1e-10, atol=1e-10)

    def loss(s):
        return s.loss((counts, profile), key=jr.key(1))[0]

    value, aux = stage.loss((counts, profile), key=jr.key(1))
    assert value.shape == () and jnp.isfinite(value)
    assert set(aux) == {"reconstruction", "kl_latent", "prior_fraction", "ambient_fraction"}
    g_eager = eqx.filter_grad(loss)(stage)
    g_jit = eqx.filter_jit(eqx.filter_grad(loss))(stage)
    assert tree_allclose(g_eager, g_jit, rtol=1e-8, atol=1e-10)
    leaves = jax.tree_util.tree_leaves(eqx.filter(g_eager, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


def test_float32_flows_through():
    stage, counts, profile = _small_stage_and_data(jnp.float32)
    out = _call(stage, counts, profile)
    assert out.decontaminated_counts.dtype == out.contamination_fraction.dtype == jnp.float32
    loss_fn = lambda s: s.loss((counts, profile), key=jr.key(0))[0]
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(stage)
    assert loss.dtype == jnp.float32
    assert grads.decoder_out.weight.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(grads.decoder_out.weight))


def test_default_epochs_follow_cellbender_with_a_floor_of_steps():
    # CellBender's 150 epochs; at least 1,800 minibatch steps on small sets (at most 300 epochs); 6 million cell
    # passes on large ones.
    expected = {600: 300, 768: 300, 1000: 225, 2000: 150, 5000: 150, 20_000: 150, 40_000: 150, 100_000: 60,
                1_000_000: 6}
    assert {n: ambient_stage.ambient_default_epochs(n) for n in expected} == expected
    assert ambient_stage.ambient_default_epochs(600, batch_size=32) == 150  # 19 steps an epoch
    assert ambient_stage.ambient_default_epochs(1) == 300 and ambient_stage.ambient_default_epochs(10**9) == 1


def test_bad_input():
    stage, counts, profile = _small_stage_and_data()
    with pytest.raises(ValueError, match="counts: expected shape"):
        stage(counts[:, :-1], profile[:-1])  # consistent, but not the model's genes
    with pytest.raises(jaxtyping.TypeCheckError):
        stage(counts, profile[:-1])  # inconsistent n_genes
    with pytest.raises((ValueError, RuntimeError), match="counts: must be finite"):
        _call(stage, counts.at[0, 0].set(-1.0), profile)
    with pytest.raises((ValueError, RuntimeError), match="ambient_profile: must be"):
        _call(stage, counts, jnp.zeros_like(profile))
    # the public entry points check user data before any numerics
    np_counts, np_profile = np.asarray(counts), np.asarray(profile)
    with pytest.raises(ValueError, match="negative"):
        dx.remove_ambient(stage, np.where(np.arange(40) == 3, -1.0, np_counts), np_profile)
    with pytest.raises(ValueError, match="all zeros"):
        dx.remove_ambient(stage, np_counts, np.zeros(40))
    # the prior's settings too, before the compiled (and so check-free) training and inference programs
    wide = eqx.tree_at(lambda s: s.prior_contamination, stage, jnp.asarray(0.6, stage.dtype))
    with pytest.raises(ValueError, match=r"prior_contamination: must be in \(0, 0.5\)"):
        dx.remove_ambient(wide, np_counts, np_profile)
    flat = eqx.tree_at(lambda s: s.prior_log_scale, stage, jnp.asarray(0.0, stage.dtype))
    with pytest.raises(ValueError, match="prior_log_scale: must be > 0"):
        dx.fit_ambient_removal(flat, np_counts, np_profile, key=jr.key(0), settings=ONE_EPOCH)
    with pytest.raises((ValueError, RuntimeError), match="prior_contamination"):
        _call(wide, counts, profile)  # a direct call keeps its in-program check
    with pytest.raises(ValueError, match="one value per gene"):
        dx.fit_ambient_removal(stage, np_counts, np_profile[:10], key=jr.key(0), settings=ONE_EPOCH)
    with pytest.raises(ValueError, match="genes but the model"):
        dx.fit_ambient_removal(stage, np_counts[:, :30], key=jr.key(0), settings=ONE_EPOCH)
    with pytest.raises(ValueError, match="negative value"):
        dx.remove_ambient(stage, np_counts, np.where(np.arange(40) == 0, -0.1, np_profile))
    with pytest.raises(ValueError, match="zero total"):
        dx.remove_ambient(stage, np.zeros((3, 40)), np_profile)
    with pytest.raises(ValueError, match="n_refine_steps"):
        dx.AmbientRemoval(40, n_refine_steps=-1, key=jr.key(0))


# ---- the ambient profile --------------------------------------------------------------------------------------


def _raw_matrix(seed=0):
    """Cells from the simulator plus empty droplets holding a few dozen ambient molecules each."""
    data = marker_data(0.1)
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.normal(np.log(40.0), 0.6, 4000))
    empties = rng.poisson(sizes[:, None] * data["profile"][None, :])
    return sp.csr_matrix(np.concatenate([data["counts"], empties]).astype(np.float32)), data


def test_estimate_ambient_profile_from_empty_droplets():
    raw, data = _raw_matrix()
    cutoff = ambient_stage.empty_droplet_threshold(np.asarray(raw.sum(1)).ravel())
    totals = data["counts"].sum(1)
    assert cutoff < totals.min()  # every cell lies above the cutoff
    profile = dx.estimate_ambient_profile(raw)
    assert profile.shape == (N_GENES,) and profile.dtype == np.float32
    np.testing.assert_allclose(profile.sum(), 1.0, rtol=1e-5)
    truth = data["profile"]
    cosine = profile @ truth / np.linalg.norm(profile) / np.linalg.norm(truth)
    assert cosine > 0.995
    assert 0.5 * np.abs(profile - truth).sum() < 0.05  # total variation distance
    with pytest.raises(ValueError, match="empty droplets"):
        dx.estimate_ambient_profile(raw, max_total=1.0, min_droplets=10_000)


def test_resolve_profile_says_which():
    raw, data = _raw_matrix()
    counts = data["counts"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = ambient_stage.resolve_ambient_profile(counts, data["profile"])  # no warning
    np.testing.assert_allclose(given, data["profile"], rtol=1e-5)
    with pytest.warns(dx.AmbientProfileWarning, match="empty droplets of raw_counts"):
        from_raw = ambient_stage.resolve_ambient_profile(counts, raw_counts=raw)
    np.testing.assert_allclose(from_raw, dx.estimate_ambient_profile(raw), rtol=1e-6)
    with pytest.warns(dx.AmbientProfileWarning, match="pooled counts of the cells"):
        pooled = ambient_stage.resolve_ambient_profile(counts)
    np.testing.assert_allclose(pooled, counts.sum(0) / counts.sum(), rtol=1e-5)


def test_fit_on_sparse_counts_with_profile_from_raw(tmp_path):
    raw, data = _raw_matrix()
    stage = dx.AmbientRemoval(N_GENES, latent_dim=4, hidden_dim=16, dtype=jnp.float32, key=jr.key(0))
    cells = sp.csr_matrix(data["counts"][:200])
    with pytest.warns(dx.AmbientProfileWarning, match="empty droplets"):
        result = dx.fit_ambient_removal(
            stage, cells, raw_counts=raw, key=jr.key(1),
            settings=dx.TrainSettings(n_epochs=2, progress=False, checkpoint_path=tmp_path / "ambient.eqx"),
        )
    assert result.train_loss.shape == (2,) and np.all(np.isfinite(result.train_loss))
    assert (tmp_path / "ambient.eqx").exists()
    # CellBender's prior from the empty droplets (about 40 molecules each), kept by the trained model
    count, log_scale = ambient_stage.estimate_ambient_count(raw)
    assert 30 < count < 50 and 0.4 < log_scale < 0.9, (count, log_scale)
    np.testing.assert_allclose(float(result.model.prior_ambient_count), count, rtol=1e-6)
    assert float(stage.prior_ambient_count) == 0.0  # the input stage is untouched
    with pytest.warns(dx.AmbientProfileWarning, match="empty droplets"):
        out = dx.remove_ambient(result.model, cells, raw_counts=raw, chunk_size=64)
    assert out.decontaminated_counts.shape == (200, N_GENES)
    dense = dx.remove_ambient(result.model, data["counts"][:200], dx.estimate_ambient_profile(raw))
    assert tree_allclose(out, dense, rtol=1e-5, atol=1e-5)


# ---- recovery of known contamination --------------------------------------------------------------------------


# The issue's bounds: per-cell fraction correlation >= 0.8 and MAE <= 0.03; decontaminated counts' error <= 50 %
# of the raw counts' error; genes absent from the cell's group keep <= 30 % of their counts. The error is the
# squared error (what the posterior mean minimises). At 2 % even the posterior mean that knows the true rates
# keeps 59 % of the raw error on this data (`oracle_mse_ratio`: a count that the cell and the ambient both explain
# cannot be split exactly), so there the bound is within 10 % of that oracle instead.
LEVELS = (0.02, 0.1, 0.2, 0.3)


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_recovers_known_contamination(level):
    data, out = fitted(level)
    estimate = np.asarray(out.contamination_fraction)
    truth = data["fraction"]
    correlation = np.corrcoef(estimate, truth)[0, 1]
    mae = np.mean(np.abs(estimate - truth))
    cells = np.asarray(out.decontaminated_counts)
    counts, true = data["counts"], data["true"]
    assert np.all(cells >= 0) and np.all(cells <= counts + 1e-3)
    ratio = np.mean((cells - true) ** 2) / np.mean((counts - true) ** 2)
    oracle = oracle_mse_ratio(data)
    l1_ratio = np.abs(cells - true).sum() / np.abs(counts - true).sum()
    absent = data["absent"]
    kept = (cells * absent).sum() / (counts * absent).sum()
    print(f"level {level}: mean {estimate.mean():.4f} vs {truth.mean():.4f}, correlation {correlation:.3f}, "
          f"MAE {mae:.4f}, MSE ratio {ratio:.3f} (oracle {oracle:.3f}), L1 ratio {l1_ratio:.3f}, "
          f"absent genes keep {kept:.3f}")
    assert correlation >= 0.8, correlation
    assert mae <= 0.03, mae
    assert ratio <= max(0.5, 1.1 * oracle), (ratio, oracle)
    assert oracle <= 0.5 or level < 0.05  # the relaxed bound is only needed at the lowest level
    assert kept <= 0.3, kept


@pytest.mark.slow
def test_zero_contamination_removes_almost_nothing():
    data, out = fitted(0.0)
    removed = 1.0 - float(np.sum(out.decontaminated_counts)) / float(np.sum(data["counts"]))
    print(f"zero contamination: removed {removed:.5f} of the counts")
    assert removed < 0.01, removed


# ---- default simulator data: no gene is absent from any group -------------------------------------------------
#
# Here the fraction is not identifiable from the cells alone (a cell profile that absorbs some ambient RNA fits as
# well as a larger fraction does), so the prior decides. Without empty droplets, the Beta prior's mode 0 keeps
# clean cells intact and under-removes real contamination; with them, CellBender's ambient-count prior sets the
# level. Here the simulator's "fraction" model draws each droplet's ambient count in proportion to its cell's size
# (not CellBender's fixed count), so the per-droplet fractions are not recoverable, only their mean.

DEFAULT_EPOCHS = 30


@functools.cache
def default_data(level: float) -> dict[str, np.ndarray]:
    sim = dx.simulate(jr.key(0), n_cells=400, n_genes=100, n_groups=4, n_batches=2, contamination=level,
                      ambient_model="fraction")
    counts = np.asarray(sim.counts, dtype=np.float32)
    profile = np.asarray(sim.ambient_profile)
    # empty droplets hold about as many ambient molecules as the cells' droplets do
    rng = np.random.default_rng(0)
    typical = max(float(np.median(np.asarray(sim.ambient_counts).sum(1))), 1.0)
    empties = rng.poisson(np.exp(rng.normal(np.log(typical), 0.5, 2000))[:, None] * profile[None, :])
    return {
        "counts": counts, "profile": profile, "fraction": np.asarray(sim.contamination_fraction),
        "groups": np.asarray(sim.groups), "raw": np.concatenate([counts, empties]).astype(np.float32),
    }


@functools.cache
def default_fitted(level: float, with_empties: bool) -> dx.AmbientResult:
    data = default_data(level)
    stage = dx.AmbientRemoval(100, dtype=jnp.float32, key=jr.key(1))
    raw = data["raw"] if with_empties else None
    result = dx.fit_ambient_removal(
        stage, data["counts"], data["profile"], raw_counts=raw, key=jr.key(2),
        settings=dx.TrainSettings(n_epochs=DEFAULT_EPOCHS, progress=False),
    )
    if with_empties:
        assert float(result.model.prior_ambient_count) > 0
    return dx.remove_ambient(result.model, data["counts"], data["profile"])


def _removed(data: dict[str, np.ndarray], out: dx.AmbientResult) -> float:
    return 1.0 - float(np.sum(out.decontaminated_counts)) / float(np.sum(data["counts"]))


def _kmeans_ari(counts: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    logged = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    pcs = PCA(10, random_state=0).fit_transform(logged - logged.mean(0))
    labels = KMeans(4, n_init=10, random_state=0).fit_predict(pcs)
    return float(adjusted_rand_score(groups, labels))


@pytest.mark.slow
def test_default_data_zero_contamination_removes_almost_nothing():
    data = default_data(0.0)
    removed = _removed(data, default_fitted(0.0, False))
    print(f"default data, zero contamination: removed {removed:.5f} of the counts")
    assert removed < 0.01, removed


@pytest.mark.slow
@pytest.mark.parametrize("with_empties", [False, True])
@pytest.mark.parametrize("level", [0.05, 0.1])
def test_default_data_contamination_level(level, with_empties):
    data = default_data(level)
    out = default_fitted(level, with_empties)
    estimate = float(np.mean(out.contamination_fraction))
    truth = float(np.mean(data["fraction"]))
    removed = _removed(data, out)
    ari_raw, ari_clean = _kmeans_ari(data["counts"], data["groups"]), _kmeans_ari(
        np.asarray(out.decontaminated_counts), data["groups"]
    )
    print(f"default data {level} (empties {with_empties}): mean fraction {estimate:.4f} vs {truth:.4f}, "
          f"removed {removed:.4f}; k-means ARI raw {ari_raw:.3f} decontaminated {ari_clean:.3f}")
    assert removed <= 2 * truth, (removed, truth)
    assert ari_clean >= ari_raw - 0.05, (ari_raw, ari_clean)
    if with_empties:
        # CellBender's prior from the empty droplets sets the level, so removal is expected: measured fraction
        # 0.039 / 0.091 and removed 0.036 / 0.083 of the counts for a truth of 0.050 / 0.100 (0.72x / 0.83x).
        assert abs(estimate - truth) <= 0.04, (estimate, truth)
        assert removed >= 0.6 * truth, (removed, truth)
    # Without empty droplets the fraction's prior has its mode at 0 (see `AmbientRemoval`) and this data does not
    # move it (measured fraction 0.0004 / 0.0003, removed 0.0003 of the counts): no removal is expected there, so
    # that case tests only over-removal and clustering, and the lower bounds are the empties case's.
