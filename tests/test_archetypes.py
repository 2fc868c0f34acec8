"""Archetypal analysis: PCHA parity with py_pcha from the same initialisation (furthest-sum cells, variance
explained), recovery of simulated archetypes, the face and bad input."""

import anndata as ad
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import diffbio_eqx as dbx
from diffbio_eqx._archetypes._pcha import even_block, furthest_sum, pcha, pcha_from
from diffbio_eqx._simulate._de import simulate_archetypes


@pytest.fixture(scope="module")
def simulated():
    return simulate_archetypes(key=jr.key(0), n_cells=400, n_dims=8, n_archetypes=3, concentration=0.3)


@pytest.fixture(scope="module")
def fitted(simulated):
    """PCHA with the first key `getkey` gives: fitted once, for the recovery and the encoder tests."""
    return pcha(simulated.x, 3, key=jr.split(jr.key(0), 1000)[0])


def _py_pcha():
    np.mat = np.asmatrix  # py_pcha 0.1.3 calls np.mat, removed in NumPy 2 (shim for the reference only)
    from py_pcha import PCHA
    from py_pcha.furthest_sum import furthest_sum as reference_furthest_sum

    return PCHA, reference_furthest_sum


def test_pcha_equals_py_pcha_from_the_same_initialisation(simulated):
    import py_pcha  # noqa: F401  (test extra: a missing reference fails, it does not skip)
    reference, reference_furthest_sum = _py_pcha()
    x = np.asarray(simulated.x)
    for seed in (0, 1):
        np.random.seed(seed)
        _, _, _, _, theirs = reference(x.T, 3)
        np.random.seed(seed)  # the same draws py_pcha made: its start cell, then its initial S
        start = int(np.ceil(x.shape[0] * np.random.rand()))
        s0 = -np.log(np.random.random((3, x.shape[0])))
        assert list(np.asarray(furthest_sum(jnp.asarray(x.T), 3, jnp.asarray(start)))) == \
            [int(i) for i in reference_furthest_sum(x.T, 3, [start])]
        ours = pcha_from(jnp.asarray(x), jnp.asarray(start), jnp.asarray(s0))
        assert abs(float(ours.variance_explained) - theirs) <= 0.005 * theirs
        # float32, the dtype `dbx.tl.archetypes` runs in by default (py_pcha always computes in float64)
        ours32 = pcha_from(jnp.asarray(x, jnp.float32), jnp.asarray(start), jnp.asarray(s0, jnp.float32))
        assert ours32.weights.dtype == jnp.float32
        assert abs(float(ours32.variance_explained) - theirs) <= 0.005 * theirs


def test_even_block_holds_the_cells_in_the_fewest_near_equal_blocks():
    for n_cells in (1, 100, 8192, 8193, 10_000, 100_000, 1_000_000):
        block = even_block(n_cells, 8192)
        n_blocks = -(-n_cells // block)
        assert block <= 8192 and n_blocks == -(-n_cells // 8192)  # the fewest blocks of at most 8,192 cells
        assert block == n_cells or block % 128 == 0
        assert n_blocks * block - n_cells < 128 * n_blocks  # padding under one multiple of 128 per block


def test_c_steps_on_candidate_cells_equal_steps_on_all_cells():
    """C steps restricted to the `Candidates` cells (capacity 60 of 600; on Gaussian data most of the 600 steps
    run restricted) give PCHA's result on all cells."""
    x = jr.normal(jr.key(5), (600, 8))
    s0 = -jnp.log(jr.uniform(jr.key(3), (4, 600), minval=1e-12))
    restricted = pcha_from(x, jnp.asarray(7), s0, capacity=60, max_iter=60)
    dense = pcha_from(x, jnp.asarray(7), s0, capacity=0, max_iter=60)
    assert int(restricted.n_iter) == int(dense.n_iter) == 60
    assert abs(float(restricted.variance_explained) - float(dense.variance_explained)) < 1e-9
    np.testing.assert_allclose(restricted.c, dense.c, atol=1e-8)
    np.testing.assert_allclose(restricted.weights, dense.weights, atol=1e-8)


def test_pcha_recovers_simulated_archetypes(simulated, fitted):
    result = fitted
    found, truth = np.asarray(result.archetypes), np.asarray(simulated.archetypes)
    distances = np.linalg.norm(found[:, None] - truth[None], axis=2)
    rows, cols = linear_sum_assignment(distances)
    spread = np.sqrt(np.sum(np.var(np.asarray(simulated.x), axis=0)))
    assert distances[rows, cols].max() < 0.1 * spread
    weights = np.asarray(result.weights)
    assert np.allclose(weights.sum(axis=1), 1.0) and weights.min() >= 0.0
    c = np.asarray(result.c)
    assert np.allclose(c.sum(axis=0), 1.0, atol=1e-9) and c.min() >= 0.0  # archetypes in the convex hull
    assert float(result.variance_explained) > 0.99


def test_archetypes_face(simulated, getkey, tmp_path):
    adata = ad.AnnData(X=np.asarray(simulated.x, dtype=np.float32))
    dbx.tl.archetypes(adata, 3, key=getkey(), use_rep="X")
    assert adata.obsm["X_archetypes"].shape == (400, 3)
    assert adata.uns["archetypes"]["archetypes"].shape == (3, 8)
    assert adata.uns["archetypes"]["variance_explained"] > 0.99
    adata.obs["kind"] = np.where(np.asarray(simulated.weights)[:, 0] > 0.5, "near A1", "other")
    assert dbx.pl.archetype_simplex(adata, "kind", path=tmp_path / "simplex.png").stat().st_size > 0
    with pytest.raises(ValueError, match="n_archetypes"):
        dbx.tl.archetypes(adata, 0, key=getkey(), use_rep="X")
    with pytest.raises(ValueError, match="n_archetypes"):
        dbx.tl.archetypes(adata[:3].copy(), 4, key=getkey(), use_rep="X")


def test_encoder_learns_pcha_weights(simulated, fitted, getkey):
    from diffbio_eqx._archetypes._encoder import ArchetypeEncoder, fit_archetype_encoder
    from diffbio_eqx._core._train import TrainSettings

    result = fitted
    getkey()  # the key `fitted` used: the encoder's keys as before
    encoder = ArchetypeEncoder(result.archetypes, key=getkey(), width=32)
    fitted = fit_archetype_encoder(encoder, simulated.x, key=getkey(), settings=TrainSettings(n_epochs=150))
    weights = np.asarray(fitted.model(simulated.x))
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert float(fitted.train_loss[-1]) < 0.2 * float(fitted.train_loss[0])
    assert np.median(np.abs(weights - np.asarray(result.weights)).sum(axis=1)) < 0.2
    assert np.allclose(np.asarray(fitted.model.archetypes), np.asarray(result.archetypes))  # held fixed
