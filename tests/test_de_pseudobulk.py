"""Pseudobulk DESeq2: parity with pydeseq2 on simulated replicate samples (log2 fold changes, p-values, the
genes called at FDR 0.05), recovery of the simulated fold changes, the face's table, and bad input."""

import warnings

import anndata as ad
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import diffbio_eqx as dbx
from diffbio_eqx._de._deseq2 import deseq2, dispersion_loss, size_factors
from diffbio_eqx._simulate._de import simulate_conditions


N_SAMPLES = 8


@pytest.fixture(scope="module")
def simulated():
    data = simulate_conditions(key=jr.key(3), n_genes=400, n_samples=N_SAMPLES, cells_per_sample=40)
    adata = ad.AnnData(X=np.asarray(data.counts, dtype=np.float32))
    adata.obs["sample"] = [f"s{i}" for i in np.asarray(data.sample)]
    adata.obs["condition"] = np.where(np.asarray(data.condition) == 1, "treated", "control")
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    return data, adata


@pytest.fixture(scope="module")
def both(simulated):
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    data, adata = simulated
    ours = dbx.tl.pseudobulk_de(adata, "sample", "condition", reference="control", test="treated",
                                options=dbx.DESeq2Options(refit_cooks=False, cooks_filter=False,
                                                          independent_filter=False))
    counts = jax.ops.segment_sum(data.counts, data.sample, num_segments=N_SAMPLES)
    names = [f"s{i}" for i in range(N_SAMPLES)]
    metadata = pd.DataFrame({"condition": ["control"] * 4 + ["treated"] * 4}, index=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=pd.DataFrame(np.asarray(counts).astype(int), index=names, columns=adata.var_names),
                           metadata=metadata, design="~condition", refit_cooks=False, quiet=True, n_cpus=1)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["condition", "treated", "control"], cooks_filter=False,
                           independent_filter=False, quiet=True, n_cpus=1)
        stats.summary()
    return ours, stats.results_df, dds


def test_pseudobulk_matches_pydeseq2(both):
    ours, theirs, dds = both
    tested = theirs["pvalue"].notna().to_numpy()
    assert np.array_equal(tested, ours["pvalue"].notna().to_numpy())
    lfc_r = np.corrcoef(ours["log2FoldChange"][tested], theirs["log2FoldChange"][tested])[0, 1]
    p_rho = st.spearmanr(ours["pvalue"][tested], theirs["pvalue"][tested])[0]
    calls = (ours["padj"][tested] < 0.05).to_numpy() != (theirs["padj"][tested] < 0.05).to_numpy()
    assert lfc_r >= 0.99 and p_rho >= 0.98 and calls.mean() <= 0.02, (lfc_r, p_rho, calls.mean())
    np.testing.assert_allclose(ours["baseMean"], theirs["baseMean"], rtol=1e-10)
    # tighter than the issue asks: the same fits, not just correlated ones
    np.testing.assert_allclose(ours["log2FoldChange"][tested], theirs["log2FoldChange"][tested], atol=1e-2)


def test_size_factors_and_loss_equal_pydeseq2(simulated, both):
    from pydeseq2.preprocessing import deseq2_norm
    from pydeseq2.utils import fit_alpha_mle, nb_nll

    data, _ = simulated
    counts = np.asarray(jax.ops.segment_sum(data.counts, data.sample, num_segments=N_SAMPLES))
    keep = counts.min(axis=0) > 0
    np.testing.assert_allclose(np.asarray(size_factors(jnp.asarray(counts))), deseq2_norm(counts[:, keep])[1],
                               rtol=1e-12)
    design = np.column_stack([np.ones(N_SAMPLES), np.arange(N_SAMPLES) >= 4]).astype(float)
    y, mu = counts[:, 5], np.maximum(counts[:, 5].mean(), 1.0) * np.ones(N_SAMPLES)
    ours = dispersion_loss(jnp.log(jnp.asarray(0.1)), jnp.asarray(y), jnp.asarray(design), jnp.asarray(mu), None)
    cox_reid = 0.5 * np.linalg.slogdet((design.T * (mu / (1 + 0.1 * mu))) @ design)[1]
    np.testing.assert_allclose(float(ours), nb_nll(y, mu, 0.1) + cox_reid, rtol=1e-12)
    assert fit_alpha_mle is not None


def test_volcano_plot(both, tmp_path):
    assert dbx.pl.volcano(both[0], path=tmp_path / "volcano.png").stat().st_size > 0


def test_pseudobulk_recovers_simulated_fold_changes(simulated, both):
    data, _ = simulated
    ours, _, _ = both
    truth = np.asarray(data.log2_fold_change)
    expressed = (ours["baseMean"] > 20).to_numpy()
    de = expressed & (truth != 0)
    estimate = ours["log2FoldChange"].to_numpy()
    assert np.corrcoef(estimate[de], truth[de])[0, 1] > 0.9
    assert np.median(np.abs(estimate[de] - truth[de])) < 0.3
    called = (ours["padj"] < 0.05).to_numpy()
    assert np.mean(truth[called] != 0) > 0.9  # few false discoveries
    assert np.mean(called[(truth != 0) & expressed]) > 0.6


def test_deseq2_vmaps_over_contrasts(simulated):
    data, _ = simulated
    counts = jax.ops.segment_sum(data.counts, data.sample, num_segments=N_SAMPLES)[:, :60]
    design = jnp.stack([jnp.ones(N_SAMPLES), (jnp.arange(N_SAMPLES) >= 4).astype(counts.dtype)], axis=1)
    contrasts = jnp.asarray([[0.0, 1.0], [0.0, -1.0]])
    out = jax.vmap(lambda c: deseq2(counts, design, c, linear_mu=True).log2_fold_change)(contrasts)
    np.testing.assert_allclose(np.asarray(out[0]), -np.asarray(out[1]), equal_nan=True)


def test_pseudobulk_bad_input(simulated):
    _, adata = simulated
    with pytest.raises(ValueError, match="sample_key"):
        dbx.tl.pseudobulk_de(adata, "nope", "condition", reference="control", test="treated")
    with pytest.raises(ValueError, match="test"):
        dbx.tl.pseudobulk_de(adata, "sample", "condition", reference="control", test="other")
    mixed = adata.copy()
    mixed.obs["condition"] = np.where(np.arange(mixed.n_obs) % 2 == 0, "control", "treated")
    with pytest.raises(ValueError, match="condition_key"):
        dbx.tl.pseudobulk_de(mixed, "sample", "condition", reference="control", test="treated")
    logged = adata.copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(ValueError, match="whole-number"):
        dbx.tl.pseudobulk_de(logged, "sample", "condition", reference="control", test="treated")


@pytest.mark.slow
def test_pseudobulk_defaults_match_pydeseq2_with_outliers():
    """pydeseq2's defaults on both sides (Cook's refit, Cook's filter, independent filtering): 7 control samples
    (replaceable) and 5 treated ones (flagged, not replaced), outlier counts injected in both."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    data = simulate_conditions(key=jr.key(5), n_genes=300, n_samples=14, cells_per_sample=30)
    counts = np.array(jax.ops.segment_sum(data.counts, data.sample, num_segments=14))[:12]
    rng = np.random.default_rng(0)
    genes, samples = rng.choice(300, 20, replace=False), rng.integers(0, 12, 20)
    counts[samples, genes] = counts[samples, genes] * 10 + 50
    counts[:, :3] = 0  # all-zero genes stay NaN
    conditions = np.array(["control"] * 7 + ["treated"] * 5)
    names = [f"s{i}" for i in range(12)]
    adata = ad.AnnData(X=counts.astype(np.float32))
    adata.obs["sample"], adata.obs["condition"] = names, conditions
    adata.var_names = [f"g{i}" for i in range(300)]
    ours = dbx.tl.pseudobulk_de(adata, "sample", "condition", reference="control", test="treated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=pd.DataFrame(counts.astype(int), index=names, columns=adata.var_names),
                           metadata=pd.DataFrame({"condition": conditions}, index=names), design="~condition",
                           quiet=True, n_cpus=1)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["condition", "treated", "control"], quiet=True, n_cpus=1)
        stats.summary()
    theirs = stats.results_df
    assert dds.var["refitted"].sum() > 0 and dds.cooks_outlier().sum() > 0  # both rules are exercised
    for column in ("pvalue", "padj"):  # the same genes flagged (Cook's) and filtered (independent filtering)
        assert np.array_equal(ours[column].isna().to_numpy(), theirs[column].isna().to_numpy()), column
    tested = theirs["pvalue"].notna().to_numpy()
    lfc_r = np.corrcoef(ours["log2FoldChange"][tested], theirs["log2FoldChange"][tested])[0, 1]
    p_rho = st.spearmanr(ours["pvalue"][tested], theirs["pvalue"][tested])[0]
    calls = (ours["padj"].fillna(1.0) < 0.05).to_numpy() != (theirs["padj"].fillna(1.0) < 0.05).to_numpy()
    assert lfc_r >= 0.99 and p_rho >= 0.98 and calls.mean() <= 0.02, (lfc_r, p_rho, calls.mean())
    np.testing.assert_allclose(ours["baseMean"], theirs["baseMean"], rtol=1e-10)  # refitted means included


def test_dispersions_above_ten_with_more_than_ten_samples():
    """pydeseq2 bounds the dispersions by max(max_disp=10, n_samples), not by 10: with 16 samples, genes
    expressed in a few samples only are fitted above 10 on both sides (the gene-wise estimates, equal)."""
    from pydeseq2.dds import DeseqDataSet

    data = simulate_conditions(key=jr.key(7), n_genes=60, n_samples=16, cells_per_sample=20)
    counts = np.array(jax.ops.segment_sum(data.counts, data.sample, num_segments=16))
    counts[:, :4] = 0
    counts[[1, 9], 0], counts[[2], 1], counts[[3, 4, 12], 2], counts[[14], 3] = 4000, 2500, 900, 7000
    conditions = np.array(["control"] * 8 + ["treated"] * 8)
    names = [f"s{i}" for i in range(16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=pd.DataFrame(counts.astype(int), index=names, columns=[f"g{i}" for i in range(60)]),
                           metadata=pd.DataFrame({"condition": conditions}, index=names), design="~condition",
                           refit_cooks=False, quiet=True, n_cpus=1)
        dds.deseq2()
    design = np.column_stack([np.ones(16), (conditions == "treated").astype(float)])
    ours = deseq2(jnp.asarray(counts, jnp.float64), jnp.asarray(design), jnp.asarray([0.0, 1.0]), linear_mu=True,
                  options=dbx.DESeq2Options(refit_cooks=False))
    theirs = np.asarray(dds.var["genewise_dispersions"])[:4]
    assert np.all(theirs > 10.0), theirs
    np.testing.assert_allclose(np.asarray(ours.genewise_dispersions)[:4], theirs, rtol=1e-4)


def test_pseudobulk_runs_in_float64_with_x64_off():
    """JAX's default is float32, where the NB likelihood near the dispersions' floor (1e-8) is rounding noise: the
    face ran in it, fitted most gene-wise dispersions at the floor and its trend turned NaN (adjusted p-values off
    by up to 0.99 from pydeseq2's). It runs in float64 as pydeseq2 does, whatever `jax_enable_x64` says."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    counts = np.random.default_rng(4).poisson(np.geomspace(1, 300, 60)[None, :] * np.ones((6, 1)))
    counts[3:, :20] = counts[3:, :20] * 2  # 20 genes up in the treated samples
    names, conditions = [f"s{i}" for i in range(6)], np.array(["control"] * 3 + ["treated"] * 3)
    adata = ad.AnnData(X=np.repeat(counts, 2, axis=0).astype(np.float32) / 2)  # two cells per sample, half each
    adata.obs["sample"], adata.obs["condition"] = np.repeat(names, 2), np.repeat(conditions, 2)
    adata.var_names = [f"g{i}" for i in range(60)]
    with jax.enable_x64(False):
        ours = dbx.tl.pseudobulk_de(adata, "sample", "condition", reference="control", test="treated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=pd.DataFrame(counts, index=names, columns=adata.var_names),
                           metadata=pd.DataFrame({"condition": conditions}, index=names), design="~condition",
                           quiet=True, n_cpus=1)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["condition", "treated", "control"], quiet=True, n_cpus=1)
        stats.summary()
    for column in ("log2FoldChange", "lfcSE", "pvalue", "padj"):
        np.testing.assert_allclose(ours[column], stats.results_df[column], rtol=1e-4, atol=1e-8, err_msg=column)
