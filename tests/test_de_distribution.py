"""Differential distributions: the KS statistic equal to SciPy's on 100 random pairs, the smooth version's
limit and gradient, permutation p-values, scDD's pattern classes on simulated genes, the face."""

import anndata as ad
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats as st

import diffbio_eqx as dbx
from diffbio_eqx._de._distribution import (
    PATTERNS,
    correctly_rounded_divide,
    differential_distribution,
    ks_permutation_test,
    ks_statistic,
    smooth_ks_statistic,
)
from diffbio_eqx._simulate._de import simulate_distributions


def test_ks_statistic_equals_scipy_on_100_pairs():
    rng = np.random.default_rng(0)
    statistic = jax.jit(ks_statistic)  # one compilation: every pair padded to 120 values, the padding unused
    for i in range(100):
        size_a, size_b = rng.integers(1, 60, 2)
        if i % 2:  # ties within and across samples
            a = rng.integers(0, 6, size_a).astype(float)
            b = rng.integers(0, 8, size_b).astype(float)
        else:
            a, b = rng.normal(size=size_a), rng.normal(0.3, 1.5, size_b)
        values = np.concatenate([a, b, np.zeros(120 - size_a - size_b)])
        first = np.arange(120) < size_a
        used = np.arange(120) < size_a + size_b
        ours = float(statistic(jnp.asarray(values), jnp.asarray(first), jnp.asarray(used)))
        assert ours == st.ks_2samp(a, b).statistic, (i, ours, st.ks_2samp(a, b).statistic)
    large = rng.normal(size=(10_050,)), rng.normal(size=(20,))  # SciPy's asymptotic branch: D unsnapped
    values = np.concatenate(large)
    assert float(statistic(jnp.asarray(values), jnp.asarray(np.arange(values.size) < 10_050))) == \
        st.ks_2samp(*large).statistic


def test_division_rounds_as_numpy():
    divide = jax.jit(correctly_rounded_divide)  # as the library runs it: inside a compiled program
    for n in (3, 29, 31, 97, 1000):
        counts = np.arange(n + 1, dtype=np.float64)
        assert np.array_equal(np.asarray(divide(jnp.asarray(counts), jnp.asarray(float(n)))), counts / n)


def test_smooth_ks_tends_to_ks_and_has_gradients():
    rng = np.random.default_rng(1)
    values = jnp.asarray(rng.normal(size=80))
    first = jnp.asarray(np.arange(80) < 35)
    # compiled programs, not one compilation per eager operation
    exact = float(jax.jit(ks_statistic)(values, first))
    smooth_ks = jax.jit(smooth_ks_statistic)  # bandwidth and temperature traced: one compilation for both calls
    smooth = float(smooth_ks(values, first, jnp.asarray(1e-4), jnp.asarray(1e-4)))
    assert abs(smooth - exact) < 0.02
    grad = jax.jit(jax.grad(lambda v: smooth_ks_statistic(v, first, jnp.asarray(0.2), jnp.asarray(0.05))))(values)
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)
    by_bandwidth = jax.jit(jax.vmap(lambda h: smooth_ks_statistic(values, first, h, jnp.asarray(0.05))))(
        jnp.asarray([0.01, 0.1, 1.0]))
    assert by_bandwidth.shape == (3,)


def test_permutation_pvalues(getkey):
    rng = np.random.default_rng(2)
    same = rng.normal(size=200)
    first = jnp.asarray(np.arange(200) < 100)
    test = jax.jit(ks_permutation_test, static_argnames="n_permutations")  # one compilation for both calls
    _, p_null = test(jnp.asarray(same), first, key=getkey(), n_permutations=500)
    shifted = jnp.asarray(same + np.where(np.arange(200) < 100, 1.0, 0.0))
    stat, p_shift = test(shifted, first, key=getkey(), n_permutations=500)
    assert float(p_null) > 0.01 and float(p_shift) == pytest.approx(1 / 501)
    assert float(stat) == float(jax.jit(ks_statistic)(shifted, first))


@pytest.fixture(scope="module")
def classified():
    data = simulate_distributions(key=jr.key(0), n_cells=400, genes_per_pattern=20)
    return data, differential_distribution(data.x, data.first, key=jr.key(1), n_permutations=300)


def test_patterns_recovered(classified):
    data, result = classified
    accuracy = np.mean(np.asarray(result.pattern) == np.asarray(data.pattern))
    assert accuracy >= 0.8, accuracy
    for code in range(5):  # every class is found
        assert np.mean(np.asarray(result.pattern)[np.asarray(data.pattern) == code] == code) >= 0.6, PATTERNS[code]


def test_differential_distribution_face(getkey):
    data = simulate_distributions(key=jr.key(5), n_cells=120, genes_per_pattern=2)
    adata = ad.AnnData(X=np.asarray(data.x, dtype=np.float32))
    adata.obs["condition"] = np.where(np.asarray(data.first), "a", "b")
    table = dbx.tl.differential_distribution(adata, "condition", first="a", key=getkey(), n_permutations=100)
    assert list(table.columns) == ["statistic", "pvalue", "qvalue", "pattern", "n_modes_first", "n_modes_rest"]
    assert set(table["pattern"].cat.categories) == set(PATTERNS)
    with pytest.raises(ValueError, match="condition_key"):
        dbx.tl.differential_distribution(adata, "missing", first="a", key=getkey())
    with pytest.raises(ValueError, match="first"):
        dbx.tl.differential_distribution(adata, "condition", first="zzz", key=getkey())


def test_face_in_float32_session_equals_float64_and_scipy():
    # users run JAX's default float32: the face computes in float64 there too, so its statistic is SciPy's exactly
    # (in float32 it was rounded off SciPy's); before, two relabellings with the same KS statistic also gave it an
    # ulp apart there, so ties were dropped and every p-value came out low (by up to 0.06)
    data = simulate_distributions(key=jr.key(5), n_cells=200, genes_per_pattern=1)
    adata = ad.AnnData(X=np.asarray(data.x, dtype=np.float32))
    adata.obs["condition"] = np.where(np.asarray(data.first), "a", "b")
    tables = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            tables.append(dbx.tl.differential_distribution(adata.copy(), "condition", first="a", key=jr.key(0),
                                                           n_permutations=200))
    for column in ("statistic", "pvalue", "qvalue", "pattern", "n_modes_first", "n_modes_rest"):
        assert (tables[0][column] == tables[1][column]).all(), column
    x, first = np.asarray(data.x, dtype=np.float32), np.asarray(data.first)
    scipy_statistic = [st.ks_2samp(x[first, g], x[~first, g]).statistic for g in range(x.shape[1])]
    assert tables[0]["statistic"].tolist() == scipy_statistic
