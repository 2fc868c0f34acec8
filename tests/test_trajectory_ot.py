"""Waddington-OT transport maps (ott-jax Sinkhorn) against wot 1.0.8 on the same cost and settings, growth and
interpolation against the simulated time course, and bad input (issue 17)."""

import anndata as ad
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import wot  # noqa: E402  (test extra; never skipped)
from ott.geometry import pointcloud
from ott.tools import sinkhorn_divergence
from scipy.stats import pearsonr

from diffbio_eqx._simulate._trajectory import simulate_time_course
from diffbio_eqx._trajectory import (
    OTSettings,
    interpolate,
    pull_back,
    push_forward,
    transport_map,
    transport_maps,
    wot_cost,
)
from diffbio_eqx._trajectory._transport import median


@pytest.fixture(scope="module")
def course():
    tc = simulate_time_course(jr.key(0), jnp.array([2.5, 1.0, 0.4]), n_cells_per_day=250, n_genes=60)
    return np.asarray(tc.x), np.asarray(tc.day), np.asarray(tc.growth_rate), np.asarray(tc.fate)


@pytest.fixture(scope="module")
def maps(course):
    x, day, _, _ = course
    return transport_maps(x, day, pairs=[(0.0, 1.0), (0.0, 2.0)])


def test_cost_matches_wot(course):
    x, day, _, _ = course
    x0, x1 = x[day == 0], x[day == 1]
    p0, p1, pca, _ = wot.ot.compute_pca(x0, x1, 30)
    expected = wot.ot.OTModel.compute_default_cost_matrix(p0, p1, np.diag(pca.singular_values_))
    ours = np.asarray(wot_cost(jnp.asarray(x0), jnp.asarray(x1)))
    # wot's sklearn PCA is randomised (the noise PCs differ slightly); the leading structure is the same
    assert pearsonr(ours.ravel(), expected.ravel())[0] > 0.999
    np.testing.assert_allclose(np.median(ours), 1.0)


def test_transport_map_matches_wot_on_same_cost(course):
    x, day, _, _ = course
    x0, x1 = jnp.asarray(x[day == 0]), jnp.asarray(x[day == 1])
    cost = np.asarray(wot_cost(x0, x1))
    growth = np.ones(x0.shape[0])
    expected = wot.ot.optimal_transport_duality_gap(
        cost, growth, lambda1=1.0, lambda2=50.0, epsilon=0.05, batch_size=5, tolerance=1e-8, tau=10000,
        epsilon0=1.0, max_iter=1e7)
    ours = np.asarray(transport_map(x0, x1, jnp.asarray(growth), jnp.asarray(1.0), OTSettings()).tmap)
    assert pearsonr(ours.ravel(), expected.ravel())[0] >= 0.99
    np.testing.assert_allclose(ours.sum(axis=1), expected.sum(axis=1), rtol=1e-3)


def test_kernel_mode_and_momentum_reach_the_log_domain_fixed_point(course):
    x, day, _, _ = course
    x0, x1 = jnp.asarray(x[day == 0]), jnp.asarray(x[day == 1])
    growth, dt = jnp.ones(x0.shape[0]), jnp.asarray(1.0)
    fast = transport_map(x0, x1, growth, dt, OTSettings())  # kernel mode, over-relaxation 1.8
    plain = transport_map(x0, x1, growth, dt, OTSettings(lse_mode=True, momentum=1.0))  # ott's default Sinkhorn
    assert bool(np.all(np.asarray(fast.converged)))
    np.testing.assert_allclose(np.asarray(fast.tmap), np.asarray(plain.tmap), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n", [1, 1000, 1001])
def test_median_is_numpy_median(n):
    values = np.abs(np.random.default_rng(n).normal(size=(n, 1)))
    values[0] = 0.0
    assert float(median(jnp.asarray(values))) == np.median(values)
    assert float(median(jnp.asarray(values, jnp.float32))) == np.median(values.astype(np.float32))


def test_transport_maps_match_wot_model(course, maps):
    x, day, _, _ = course
    adata = ad.AnnData(x, obs=pd.DataFrame({"day": day}, index=[f"c{i}" for i in range(len(day))]))
    expected = wot.ot.OTModel(adata, day_field="day").compute_transport_map(0, 1)
    ours = maps[(0.0, 1.0)]
    assert pearsonr(np.asarray(ours.tmap).ravel(), np.asarray(expected.X).ravel())[0] >= 0.99
    assert pearsonr(np.asarray(ours.growth[-1]), expected.obs["g1"].to_numpy())[0] >= 0.99


def test_learned_growth_tracks_simulated_rates(course, maps):
    _, day, rate, _ = course
    learned = np.asarray(maps[(0.0, 1.0)].growth[-1])
    assert pearsonr(learned, rate[day == 0])[0] >= 0.8


def _divergence(x: np.ndarray, y: np.ndarray) -> float:
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):  # ott's own code needs them
        value, _ = sinkhorn_divergence.sinkhorn_divergence(pointcloud.PointCloud, jnp.asarray(x), jnp.asarray(y),
                                                           epsilon=0.1)
    return float(value)


def test_interpolation_beats_baselines(course):
    x, day, rate, _ = course
    x0, x1, x2 = x[day == 0], x[day == 1], x[day == 2]
    tmap = transport_maps(x, day, growth_prior=rate, pairs=[(0.0, 2.0)])[(0.0, 2.0)].tmap  # day 1 held out
    ours = np.asarray(interpolate(jnp.asarray(x0), jnp.asarray(x2), tmap, 0.5, size=500, weighting="growth",
                                  key=jr.key(0)))
    shifted_means = x0 + 0.5 * (x2.mean(0) - x0.mean(0))
    rng = np.random.default_rng(0)
    independent = 0.5 * x0[rng.integers(0, len(x0), 500)] + 0.5 * x2[rng.integers(0, len(x2), 500)]
    d_ours = _divergence(ours, x1)
    assert d_ours < _divergence(shifted_means, x1)
    assert d_ours < _divergence(independent, x1)
    # wot's own rule draws pairs in day 2's mixture of fates; still a valid sample of the coupling
    wot_rule = interpolate(jnp.asarray(x0), jnp.asarray(x2), tmap, 0.5, size=500, key=jr.key(0))
    assert wot_rule.shape == (500, x.shape[1]) and np.all(np.isfinite(np.asarray(wot_rule)))


def test_ancestors_and_descendants(course):
    x, day, rate, fate = course
    tmap = transport_maps(x, day, growth_prior=rate, pairs=[(0.0, 1.0)])[(0.0, 1.0)].tmap
    fate0, fate1 = fate[day == 0], fate[day == 1]
    for k in range(3):
        target = jnp.asarray((fate1 == k).astype(float))
        ancestors = np.asarray(pull_back(tmap, target / target.sum()))
        assert ancestors[fate0 == k].sum() > 0.9
        source = jnp.asarray((fate0 == k).astype(float))
        descendants = np.asarray(push_forward(tmap, source / source.sum()))
        assert descendants[fate1 == k].sum() > 0.9
        np.testing.assert_allclose(descendants.sum(), 1.0)


def test_transport_bad_input(course):
    x, day, _, _ = course
    with pytest.raises(ValueError, match="time: needs at least two time points"):
        transport_maps(x, np.zeros(len(x)))
    with pytest.raises(ValueError, match="time: expected one value per cell"):
        transport_maps(x, day[:10])
    with pytest.raises(ValueError, match="growth_prior"):
        transport_maps(x, day, growth_prior=-np.ones(len(x)))
    with pytest.raises(ValueError, match=r"pairs: \(1.0, 0.0\)"):
        transport_maps(x, day, pairs=[(1.0, 0.0)])
    with pytest.raises(ValueError, match="epsilon: must be a positive number"):
        OTSettings(epsilon=0.0)
    with pytest.raises(ValueError, match=r"momentum: must be in \[1, 2\)"):
        OTSettings(momentum=2.5)
