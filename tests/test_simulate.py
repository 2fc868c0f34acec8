import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import knn_batch_purity, log_normalized_pca
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import diffbio_eqx as dbx


# `simulate` compiles once per static configuration and per set of arguments given (~10 CPU-s each: its gamma and
# Poisson samplers), so the droplet tests share two signatures, as `_droplets` writes them: the continuous settings
# change as traced values. The checks run in NumPy (an eager jnp operation compiles at every new shape).
N_CELLS, N_GENES, N_EMPTY = 500, 300, 400


def _droplets(key, *, contamination=0.0, doublet_rate=0.0, ambient_model="count"):
    """500 cells x 300 genes; the count model with 400 empty droplets, the fraction model with the default none."""
    if ambient_model == "count":
        return dbx.simulate(key, n_cells=N_CELLS, n_genes=N_GENES, contamination=contamination,
                            doublet_rate=doublet_rate, ambient_model="count", n_empty_droplets=N_EMPTY)
    return dbx.simulate(key, n_cells=N_CELLS, n_genes=N_GENES, contamination=contamination,
                        doublet_rate=doublet_rate, ambient_model=ambient_model)


@pytest.mark.parametrize("seed", [0, 1])
def test_groups_are_recoverable(seed):
    data = dbx.simulate(jr.key(seed))
    assert data.counts.shape == (1000, 500)
    pcs = log_normalized_pca(np.asarray(data.counts))
    labels = KMeans(5, n_init=10, random_state=0).fit_predict(pcs)
    assert adjusted_rand_score(np.asarray(data.groups), labels) >= 0.9


def test_counts_are_whole_and_decompose():
    data = _droplets(jr.key(2), contamination=0.1, doublet_rate=0.1)
    counts = np.asarray(data.counts)
    np.testing.assert_array_equal(counts, np.rint(counts))
    assert counts.min() >= 0
    np.testing.assert_array_equal(counts, np.asarray(data.true_counts) + np.asarray(data.ambient_counts))
    np.testing.assert_allclose(np.sum(np.asarray(data.ambient_profile)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("model", ["count", "fraction"])
@pytest.mark.parametrize("level", [0.02, 0.1, 0.3])
def test_reported_contamination_is_the_realised_one(level, model):
    data = _droplets(jr.key(3), contamination=level, ambient_model=model)
    realised = np.asarray(data.ambient_counts).sum(1) / np.asarray(data.counts).sum(1)
    np.testing.assert_allclose(np.asarray(data.contamination_fraction), realised, rtol=1e-10)
    assert abs(realised.mean() - level) < 0.25 * level + 0.005
    assert np.std(realised) > 0  # per-cell fractions vary


def test_ambient_models_and_empty_droplets():
    """CellBender's model: every droplet holds about the same number of ambient molecules as an empty droplet,
    so small cells are more contaminated; the fraction model scales the ambient counts with the cell."""
    level = 0.1
    by_count = _droplets(jr.key(7), contamination=level)
    by_fraction = _droplets(jr.key(7), contamination=level, ambient_model="fraction")
    typical = level / (1 - level) * np.exp(8.0)  # the simulator's default lib_loc
    ambient_total = np.asarray(by_count.ambient_counts).sum(1)
    empty_total = np.asarray(by_count.empty_counts).sum(1)
    assert by_count.empty_counts.shape == (N_EMPTY, N_GENES) and by_fraction.empty_counts.shape == (0, N_GENES)
    for totals in (ambient_total, empty_total):  # log-normal around d0 with scale 0.2 (plus Poisson noise)
        assert abs(np.median(totals) / typical - 1) < 0.05
        assert 0.15 < np.std(np.log(totals)) < 0.25
    # the empty droplets follow the ambient profile (total variation distance)
    pooled = np.asarray(by_count.empty_counts).sum(0)
    assert 0.5 * np.abs(pooled / pooled.sum() - np.asarray(by_count.ambient_profile)).sum() < 0.05
    cell_total = np.asarray(by_count.true_counts).sum(1)
    count_fraction = np.asarray(by_count.contamination_fraction)
    assert np.corrcoef(np.log(cell_total), np.log(ambient_total))[0, 1] < 0.2  # independent of the cell's size
    assert np.corrcoef(np.log(cell_total), count_fraction)[0, 1] < -0.6  # so small cells are more contaminated
    fraction_cell_total = np.asarray(by_fraction.true_counts).sum(1)
    share = np.asarray(by_fraction.contamination_fraction)
    assert abs(np.corrcoef(np.log(fraction_cell_total), share)[0, 1]) < 0.2  # a share, whatever the cell's size
    with pytest.raises(ValueError, match="ambient_model"):
        dbx.simulate(jr.key(7), n_cells=10, n_genes=10, ambient_model="share")


def test_no_contamination_means_no_ambient_counts():
    data = _droplets(jr.key(4), contamination=0.0)
    assert np.sum(np.asarray(data.ambient_counts)) == 0.0 and np.sum(np.asarray(data.empty_counts)) == 0.0
    np.testing.assert_array_equal(data.counts, data.true_counts)


def test_given_ambient_profile_is_used():
    profile = np.zeros(100)
    profile[:5] = 1.0
    data = dbx.simulate(jr.key(5), n_cells=200, n_genes=100, contamination=0.2, ambient_profile=profile)
    ambient = np.asarray(data.ambient_counts)
    assert np.sum(ambient[:, 5:]) == 0.0
    assert np.sum(ambient[:, :5]) > 0.0


def test_batch_effect_is_visible():
    data = dbx.simulate(jr.key(6), n_batches=2)
    batches = np.asarray(data.batches)
    pcs = log_normalized_pca(np.asarray(data.counts))
    purity = knn_batch_purity(pcs, batches)
    chance = float(np.sum((np.bincount(batches) / len(batches)) ** 2))  # same-batch share at random
    assert purity > chance + 0.25, (purity, chance)
    # Groups stay recoverable despite the batch effect.
    labels = KMeans(5, n_init=10, random_state=0).fit_predict(pcs)
    assert adjusted_rand_score(np.asarray(data.groups), labels) >= 0.9


def test_doublets_add_a_second_cell():
    data = _droplets(jr.key(7), doublet_rate=0.2)
    flags = np.asarray(data.is_doublet)
    assert 0.15 < flags.mean() < 0.25
    totals = np.asarray(data.counts).sum(1)
    assert np.median(totals[flags]) > 1.5 * np.median(totals[~flags])


def test_jit_and_vmap_over_keys_and_levels():
    # One vmapped program over keys and levels together: the first two share a level, the first and last a key.
    key_a, key_b = jr.split(jr.key(8))
    keys = jnp.stack([key_a, key_b, key_a])
    levels = jnp.array([0.05, 0.05, 0.3])
    batched = jax.vmap(lambda k, c: _droplets(k, contamination=c))(keys, levels)
    assert batched.counts.shape == (3, N_CELLS, N_GENES) and batched.empty_counts.shape == (3, N_EMPTY, N_GENES)
    single = _droplets(key_b, contamination=0.05)  # same signature unbatched: no compile of its own here
    counts = np.asarray(batched.counts)
    np.testing.assert_array_equal(counts[1], np.asarray(single.counts))
    assert not np.array_equal(counts[0], counts[1])  # different keys, different draws
    means = np.asarray(batched.contamination_fraction).mean(axis=1)
    assert means[0] < means[2]


def test_float32_by_default():
    with jax.enable_x64(False):
        data = dbx.simulate(jr.key(9), n_cells=20, n_genes=10)
        assert data.counts.dtype == jnp.float32


SIMULATION_CASES = [
    (dict(de_prob=-0.5), r"de_prob: must be in \[0, 1\], got -0.5"),
    (dict(doublet_rate=1.5), r"doublet_rate: must be in \[0, 1\], got 1.5"),
    (dict(contamination=float("nan")), r"contamination: must be in \[0, 1\], got nan"),
    (dict(mean_shape=-1.0), r"mean_shape: must be finite and > 0, got -1.0"),
    (dict(lib_loc=100.0), r"lib_loc: must be finite and <= 20"),
    (dict(n_groups=0), r"n_groups: must be a whole number >= 1, got 0"),
    (dict(ambient_profile=np.zeros(20), contamination=0.1),
     r"ambient_profile: expected 20 finite, non-negative values with some mass"),
]


@pytest.mark.parametrize("settings, message", SIMULATION_CASES)
def test_simulation_settings_that_would_give_nonsense_are_named(settings, message):
    """Before: counts of -1 (a negative shape), inf library sizes, or a raw gather error (no groups)."""
    with pytest.raises(ValueError, match=f"^{message}"):
        dbx.simulate(jr.key(0), **{"n_cells": 30, "n_genes": 20, **settings})


def test_traced_simulator_settings_still_pass_the_checks():
    """The checks read concrete values only: a vmap over a setting (or over keys) runs as before. (The suite's type
    checker refuses a tracer for a setting annotated `float`, as it did before the checks.)"""
    rates = jax.vmap(lambda r: dbx.simulate_time_course(jr.key(0), r, n_days=2, n_cells_per_day=5,
                                                        n_genes=4).growth_rate)(jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    assert rates.shape == (2, 10)
    x = jax.vmap(lambda k: dbx.simulate_branching(k, 20, n_genes=6).x)(jr.split(jr.key(0), 2))
    assert x.shape == (2, 20, 6)
