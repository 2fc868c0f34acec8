"""Markers: parity with `scanpy.tl.rank_genes_groups` on pbmc68k (Wilcoxon with and without tie correction,
Welch's t-test, vs rest and vs a reference group), the `uns` layout scanpy's readers take, and the maths'
building blocks against SciPy / statsmodels."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scanpy as sc
import scipy.stats as st
from packaging.version import Version
from statsmodels.stats.multitest import multipletests

import diffbio_eqx as dbx
from diffbio_eqx._de._markers import benjamini_hochberg, group_moments, label_moments, midranks, welch_t_test


# scanpy 1.12 takes the t-tests' group means and variances from `scanpy.get.aggregate`, which sums dense X in X's
# dtype: on pbmc68k's float32 X its p-values then differ from 1.11's float64 statistics (and ours) by up to 2e-5
# relatively. On X in float64 both compute in float64, and ours equal 1.12's to 1e-6 as they equal 1.11's on float32.
SCANPY_T_TEST_SUMS_IN_X_DTYPE = Version(sc.__version__) >= Version("1.12")


@pytest.fixture(scope="module")
def pbmc():
    adata = dbx.datasets.pbmc68k()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _compare(ours: dict, theirs: dict, var_names) -> None:
    groups = theirs["scores"].dtype.names
    assert ours["scores"].dtype.names == groups
    for g in groups:
        # the same gene order (scores tie only where both are equal)
        ours_scores = np.asarray(ours["scores"][g], dtype=np.float64)
        their_scores = np.asarray(theirs["scores"][g], dtype=np.float64)
        np.testing.assert_allclose(ours_scores, their_scores, rtol=1e-6, atol=1e-6)
        index = var_names.get_indexer(theirs["names"][g])
        ours_index = var_names.get_indexer(ours["names"][g])
        by_gene = np.empty(len(var_names)), np.empty(len(var_names))
        for name in ("pvals", "pvals_adj", "logfoldchanges"):
            by_gene[0][ours_index] = ours[name][g]
            by_gene[1][index] = theirs[name][g]
            np.testing.assert_allclose(by_gene[0], by_gene[1], rtol=1e-6, atol=1e-12 if name != "logfoldchanges"
                                       else 1e-6, err_msg=f"{g} {name}")


@pytest.mark.parametrize(
    ("method", "tie_correct", "reference"),
    [("wilcoxon", True, "rest"), ("wilcoxon", False, "rest"), ("t-test", False, "rest"),
     ("wilcoxon", True, "CD14+ Monocyte"), ("t-test", False, "CD14+ Monocyte"),
     ("t-test_overestim_var", False, "rest")],
)
def test_rank_genes_groups_equals_scanpy(pbmc, method, tie_correct, reference):
    ours, theirs = pbmc.copy(), pbmc.copy()
    if method.startswith("t-test") and SCANPY_T_TEST_SUMS_IN_X_DTYPE:
        ours.X = theirs.X = pbmc.X.astype(np.float64)
    dbx.tl.rank_genes_groups(ours, "bulk_labels", method=method, tie_correct=tie_correct, reference=reference)
    with warnings.catch_warnings():  # scanpy divides 0 / 0 for genes constant in both groups
        warnings.simplefilter("ignore", RuntimeWarning)
        sc.tl.rank_genes_groups(theirs, "bulk_labels", method=method, tie_correct=tie_correct, reference=reference)
    _compare(ours.uns["rank_genes_groups"], theirs.uns["rank_genes_groups"], pbmc.var_names)
    assert ours.uns["rank_genes_groups"]["params"] == theirs.uns["rank_genes_groups"]["params"]


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_rank_genes_groups_in_float32_session_equals_scanpy(pbmc, method):
    # users run JAX's default float32; the statistics are float64 there too, as scanpy's, so they meet the same
    # 1e-6 (in float32 the Wilcoxon scores were 3e-6 off, the t-test's 8e-4, the p-values 7e-5); and the packed
    # int64 sort key is not probed with a trial int64 array, which warns there (an error under our filters)
    ours, theirs = pbmc.copy(), pbmc.copy()
    if method == "t-test" and SCANPY_T_TEST_SUMS_IN_X_DTYPE:
        ours.X = theirs.X = pbmc.X.astype(np.float64)
    with jax.enable_x64(False):
        dbx.tl.rank_genes_groups(ours, "bulk_labels", method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sc.tl.rank_genes_groups(theirs, "bulk_labels", method=method)
    ours, theirs = ours.uns["rank_genes_groups"], theirs.uns["rank_genes_groups"]
    _compare(ours, theirs, pbmc.var_names)
    assert ours["pvals"].dtype == theirs["pvals"].dtype  # float64 records, as scanpy's
    assert ours["params"] == theirs["params"]


def test_scanpy_readers_take_our_output(pbmc):
    adata = pbmc.copy()
    dbx.tl.rank_genes_groups(adata, "bulk_labels", groups=["CD19+ B", "CD56+ NK"], method="wilcoxon")
    table = sc.get.rank_genes_groups_df(adata, group="CD19+ B")
    assert list(table.columns[:2]) == ["names", "scores"] and len(table) == pbmc.n_vars
    assert table["names"].iloc[0] in {"CD79A", "CD79B", "MS4A1", "HLA-DQA1", "CD74", "HLA-DRA", "HLA-DQB1",
                                      "TCL1A", "HLA-DPB1", "HLA-DPA1", "CD37"}
    sc.pl.rank_genes_groups(adata, n_genes=3, show=False)


def test_midranks_and_ties_equal_scipy():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 6, 40).astype(np.float64)
    used = rng.random(40) < 0.7
    ranks, ties = midranks(jnp.asarray(values), jnp.asarray(used))
    np.testing.assert_allclose(np.asarray(ranks)[used], st.rankdata(values[used]))
    tc = 1.0 - np.sum(np.asarray(ties)[used] ** 2 - 1.0) / (used.sum() ** 3 - used.sum())
    np.testing.assert_allclose(tc, st.tiecorrect(st.rankdata(values[used])))


def test_label_moments_equal_numpy_float64():
    """The blocked one-pass group moments (groups of 0, 1, 2 and many cells, cells in no group, sizes not a
    multiple of the block) equal NumPy's float64 means and unbiased variances of the float32 squares, and the
    mask products'."""
    rng = np.random.default_rng(2)
    x = np.log1p(rng.poisson(0.7, (203, 7)) * 3.0).astype(np.float32)
    labels = np.concatenate([np.full(150, 0), [1], np.full(2, 3), rng.integers(0, 6, 50)]).astype(np.int32)
    rng.shuffle(labels)  # label 2 may be empty, 4 and 5 are outside the 4 groups
    moments = jax.jit(label_moments, static_argnums=2, static_argnames="block")
    mean, var, n = (np.asarray(v) for v in moments(jnp.asarray(x), jnp.asarray(labels), 4, block=16))
    for g in range(4):
        for row, cells in ((g, labels == g), (4 + g, labels != g)):
            assert n[row] == cells.sum()
            if cells.sum() == 0:
                continue
            expected_mean = x[cells].mean(axis=0, dtype=np.float64)
            expected_var = (x[cells] * x[cells]).mean(axis=0, dtype=np.float64) - expected_mean**2
            if cells.sum() > 1:
                expected_var = expected_var * cells.sum() / (cells.sum() - 1)
            np.testing.assert_allclose(mean[row], expected_mean, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(var[row], expected_var, rtol=1e-11, atol=1e-13)
    masks = np.stack([labels == g for g in range(4)])
    products = jax.jit(group_moments)(jnp.asarray(x), jnp.asarray(np.concatenate([masks, ~masks])))
    for ours, theirs in zip((mean, var, n), products, strict=True):
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-11, atol=1e-13)


def test_welch_and_bh_equal_scipy_statsmodels():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, (30, 5)), rng.normal(0.3, 2.0, (17, 5))
    t, p = welch_t_test(jnp.asarray(a.mean(0)), jnp.asarray(a.var(0, ddof=1)), jnp.asarray(30.0),
                        jnp.asarray(b.mean(0)), jnp.asarray(b.var(0, ddof=1)), jnp.asarray(17.0))
    ref = st.ttest_ind(a, b, equal_var=False)
    np.testing.assert_allclose(np.asarray(t), ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(p), ref.pvalue, rtol=1e-8)
    pvals = rng.random(200) ** 3
    np.testing.assert_allclose(np.asarray(benjamini_hochberg(jnp.asarray(pvals))),
                               multipletests(pvals, method="fdr_bh")[1], rtol=1e-12)
    grad = jax.grad(lambda m: welch_t_test(m, jnp.asarray(1.0), jnp.asarray(10.0), jnp.asarray(0.0),
                                           jnp.asarray(1.0), jnp.asarray(10.0))[0])(jnp.asarray(0.5))
    assert np.isfinite(float(grad)) and float(grad) > 0


def test_bad_input_names_the_field(pbmc):
    with pytest.raises(ValueError, match="groupby"):
        dbx.tl.rank_genes_groups(pbmc.copy(), "no_such_column")
    with pytest.raises(ValueError, match="groups"):
        dbx.tl.rank_genes_groups(pbmc.copy(), "bulk_labels", groups=["not a group"])
    with pytest.raises(ValueError, match="method"):
        dbx.tl.rank_genes_groups(pbmc.copy(), "bulk_labels", method="logistic")
    with pytest.raises(ValueError, match="corr_method"):
        dbx.tl.rank_genes_groups(pbmc.copy(), "bulk_labels", corr_method="holm")


@pytest.mark.parametrize("reference", ["rest", "CD14+ Monocyte"])
def test_n_genes_rankby_abs_and_pts_equal_scanpy(pbmc, reference):
    """scanpy's `n_genes`, `rankby_abs` and `pts` (refused before: a TypeError): the same top genes, and the same
    `pts` / `pts_rest` tables (every compared group, the reference too; `pts_rest` only against the rest)."""
    ours, theirs = pbmc.copy(), pbmc.copy()
    options = {"groups": ["CD19+ B", "CD56+ NK"], "reference": reference, "method": "wilcoxon", "n_genes": 7,
               "rankby_abs": True, "pts": True}
    dbx.tl.rank_genes_groups(ours, "bulk_labels", **options)
    sc.tl.rank_genes_groups(theirs, "bulk_labels", **options)
    ours, theirs = ours.uns["rank_genes_groups"], theirs.uns["rank_genes_groups"]
    assert sorted(ours) == sorted(theirs)
    for group in theirs["names"].dtype.names:
        assert list(ours["names"][group]) == list(theirs["names"][group])
        for field in ("scores", "pvals", "pvals_adj", "logfoldchanges"):
            np.testing.assert_allclose(ours[field][group], theirs[field][group], rtol=1e-5, atol=1e-12)
    for table in ("pts", "pts_rest") if reference == "rest" else ("pts",):
        assert list(ours[table].columns) == list(theirs[table].columns)
        assert ours[table].index.equals(theirs[table].index)
        np.testing.assert_allclose(ours[table].to_numpy(), theirs[table].to_numpy(), rtol=1e-12)


def test_a_string_of_groups_and_use_raw_without_raw_are_refused_as_scanpy(pbmc):
    """scanpy refuses both; before, `groups="12"` ran groups "1" and "2", and `use_raw=True` without `.raw`
    read X."""
    adata = pbmc.copy()
    adata.obs["digits"] = (np.arange(adata.n_obs) % 13).astype(str)
    with pytest.raises(ValueError, match="groups: pass a sequence"):
        dbx.tl.rank_genes_groups(adata, "digits", groups="12")
    with pytest.raises(ValueError, match="Specify a sequence of groups"):
        sc.tl.rank_genes_groups(adata, "digits", groups="12")
    adata.raw = None
    with pytest.raises(ValueError, match="use_raw: True, but adata.raw is not set"):
        dbx.tl.rank_genes_groups(adata, "bulk_labels", use_raw=True)
    with pytest.raises(ValueError, match="adata.raw. is empty"):
        sc.tl.rank_genes_groups(adata, "bulk_labels", use_raw=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'pt'"):
        dbx.tl.rank_genes_groups(adata, "bulk_labels", pt=True)
