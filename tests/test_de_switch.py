"""SwitchDE: recovery of simulated switch times and strengths, uniform null p-values, the maximum likelihood
estimates equal to SciPy's optimiser on the same likelihood, the zero-inflated variant, and the face."""

import anndata as ad
import jax
import jax.random as jr
import numpy as np
import pytest
import scipy.optimize as so
import scipy.stats as st

import diffbio_eqx as dbx
from diffbio_eqx._de._switchde import sigmoid, switch_de, zi_log_likelihood
from diffbio_eqx._simulate._de import simulate_switch_genes


@pytest.fixture(scope="module")
def gaussian():
    data = simulate_switch_genes(key=jr.key(1), n_cells=300, n_switch=30, n_null=80)
    return data, switch_de(data.counts, data.pseudotime)


@pytest.fixture(scope="module")
def zero_inflated():
    data = simulate_switch_genes(key=jr.key(2), n_cells=300, n_switch=20, n_null=40, dropout_lambda=0.01)
    return data, switch_de(data.counts, data.pseudotime, zero_inflated=True)


def _relative_errors(data, result):
    switch = np.asarray(data.is_switch)
    rel = lambda ours, truth: np.median(np.abs(np.asarray(ours)[switch] - np.asarray(truth)[switch])
                                        / np.abs(np.asarray(truth)[switch]))
    return rel(result.t0, data.t0), rel(result.k, data.k)


def test_switch_times_and_strengths_recovered(gaussian):
    t0_error, k_error = _relative_errors(*gaussian)
    assert t0_error <= 0.10 and k_error <= 0.10, (t0_error, k_error)
    data, result = gaussian
    assert np.all(np.asarray(result.qvalue)[np.asarray(data.is_switch)] < 1e-6)


def test_null_pvalues_uniform(gaussian):
    data, result = gaussian
    null = np.asarray(result.pvalue)[~np.asarray(data.is_switch)]
    assert st.kstest(null, "uniform").pvalue > 0.01


def test_mles_equal_scipy_least_squares(gaussian):
    data, result = gaussian
    y, t = np.asarray(data.counts), np.asarray(data.pseudotime)
    curve = jax.jit(sigmoid)  # one compiled call per evaluation, not one dispatch per operation
    for gene in range(0, 30, 6):
        ours = np.array([result.mu0[gene], result.k[gene], result.t0[gene]])
        residual = lambda p, gene=gene: y[:, gene] - np.asarray(curve(t, p))
        theirs = so.least_squares(residual, ours * 1.05, method="lm", xtol=1e-14, ftol=1e-14, gtol=1e-14).x
        np.testing.assert_allclose(ours, theirs, rtol=1e-4)
        np.testing.assert_allclose(float(result.sigma2[gene]), np.mean(residual(theirs) ** 2), rtol=1e-4)


def test_zero_inflated_recovers_and_matches_scipy(zero_inflated):
    data, result = zero_inflated
    t0_error, k_error = _relative_errors(data, result)
    assert t0_error <= 0.10 and k_error <= 0.15, (t0_error, k_error)
    assert st.kstest(np.asarray(result.pvalue)[~np.asarray(data.is_switch)], "uniform").pvalue > 0.01
    np.testing.assert_allclose(np.median(np.asarray(result.lambda_)), 0.01, rtol=0.2)
    y, t = np.asarray(data.counts), np.asarray(data.pseudotime)
    likelihood = jax.jit(zi_log_likelihood)  # Nelder-Mead calls it thousands of times
    for gene in (0, 7, 14):
        ours = np.array([result.mu0[gene], result.k[gene], result.t0[gene], np.log(result.sigma2[gene]),
                         np.log(result.lambda_[gene])])
        y_gene = y[:, gene]
        loss = lambda p, y_gene=y_gene: -float(likelihood(p, y_gene, t))
        theirs = so.minimize(loss, ours + 0.02, method="Nelder-Mead",
                             options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 40000}).x
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_switch_de_face():
    data = simulate_switch_genes(key=jr.key(4), n_cells=120, n_switch=3, n_null=3)
    adata = ad.AnnData(X=np.asarray(data.counts, dtype=np.float32))
    adata.obs["dpt_pseudotime"] = np.asarray(data.pseudotime)
    table = dbx.tl.switch_de(adata, pseudotime_key="dpt_pseudotime")
    assert list(table.columns) == ["pval", "qval", "mu0", "k", "t0"]
    assert (table["qval"].iloc[:3] < 1e-3).all()
    assert "switch_de" in adata.uns and "switch_de_t0" in adata.var
    with pytest.raises(ValueError, match="pseudotime_key"):
        dbx.tl.switch_de(adata, pseudotime_key="missing")


def test_switch_de_face_in_float32_session(zero_inflated):
    # users run JAX's default float32; there BFGS stopped short on the zero-inflated likelihood (p-values off by up
    # to 0.5 and the null's not uniform), so the face fits in float64 as switchde does
    data, result = zero_inflated
    adata = ad.AnnData(X=np.asarray(data.counts))
    adata.obs["dpt_pseudotime"] = np.asarray(data.pseudotime)
    with jax.enable_x64(False):
        table = dbx.tl.switch_de(adata, zero_inflated=True)
    np.testing.assert_allclose(table["pval"], np.asarray(result.pvalue), rtol=1e-6, atol=1e-9)
    assert st.kstest(table["pval"].to_numpy()[~np.asarray(data.is_switch)], "uniform").pvalue > 0.01
