"""MAGIC (parity with magic-impute 3.0.0 on pbmc68k), molecular cross-validation, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import magic as magic_impute
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import procrustes

import diffbio_eqx as dx
from diffbio_eqx._imputation import _magic as _magic_module
from diffbio_eqx._imputation._magic import (
    Magic,
    disparity_trace,
    library_size_normalize,
    magic,
    magic_operator,
    resolve_knn_method,
    select_t,
)
from diffbio_eqx._imputation._mcv import (
    expected_log1p_normalized,
    magic_denoiser,
    molecular_cross_validation,
    split_molecules,
)
from diffbio_eqx.datasets import pbmc68k


def _median_gene_r(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(0)
    b = b - b.mean(0)
    r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return float(np.median(r))


@pytest.fixture(scope="module")
def pbmc_sqrt():
    counts = pbmc68k().X.toarray()
    counts = counts[:, counts.sum(0) > 0]
    normalized, _ = library_size_normalize(counts)
    return np.sqrt(normalized).astype(np.float64), counts


@pytest.fixture(scope="module")
def reference(pbmc_sqrt):
    x, _ = pbmc_sqrt
    operator = magic_impute.MAGIC(t=3, solver="exact", random_state=0, verbose=0)
    return operator, operator.fit_transform(x)


def test_magic_parity_same_pca(pbmc_sqrt, reference):
    x, _ = pbmc_sqrt
    operator, expected = reference
    ours = magic(x, Magic(normalize=False), representation=operator.graph.data_nu)
    assert ours.t == 3 and ours.imputed.shape == expected.shape
    assert _median_gene_r(ours.imputed, expected) >= 0.99
    # Entry for entry except a few cells whose 16th neighbour is a near-tie (float32 PCs here, float64 there).
    error = np.abs(ours.imputed - expected)
    assert np.median(error) < 1e-5 and np.quantile(error, 0.99) < 1e-3 * np.abs(expected).max()
    # The diffusion operator itself: same entries as graphtools' row-stochastic diff_op on nearly all rows.
    op = ours.operator
    p = sp.coo_matrix((np.asarray(op.weights), (np.asarray(op.heads), np.asarray(op.tails))), shape=(x.shape[0],) * 2)
    difference = abs(p.tocsr() - operator.graph.diff_op)
    assert np.mean(np.asarray(difference.max(axis=1).todense()).ravel() < 1e-5) > 0.95


def test_magic_own_pca_close_to_reference(pbmc_sqrt, reference):
    x, _ = pbmc_sqrt
    ours = magic(x, Magic(normalize=False))  # our randomized PCA (the same algorithm, our own random draw)
    assert _median_gene_r(ours.imputed, reference[1]) >= 0.99


def test_randomized_pca_is_scikit_learns(pbmc_sqrt):
    from scipy.linalg import lu
    from sklearn.decomposition import PCA

    m = np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_magic_module._lu_normalize(jnp.asarray(m))), lu(m, permute_l=True)[0],
                               rtol=1e-4, atol=1e-4)
    x = pbmc_sqrt[0][:, :400]  # 700 cells x 400 genes: not transposed (700 x 765 is, and is covered below)
    for data in (x, x[:, :300].T.copy()):  # cells >= genes, and fewer cells than genes (scikit-learn transposes)
        ours = np.asarray(_magic_module.randomized_pca(data.astype(np.float32), 20, key=jr.key(3)))
        exact = PCA(20, svd_solver="full").fit_transform(data)
        theirs = PCA(20, svd_solver="randomized", random_state=0).fit_transform(data)
        # The leading components are the exact ones up to sign, as scikit-learn's randomized ones are.
        for got in (ours, theirs):
            r = np.abs(np.sum(got * exact, axis=0)) / np.linalg.norm(got, axis=0) / np.linalg.norm(exact, axis=0)
            assert np.all(r[:10] > 0.999), r
        np.testing.assert_allclose(np.linalg.norm(ours, axis=0), np.linalg.norm(theirs, axis=0), rtol=2e-2)
    with pytest.raises(ValueError, match="^power_iteration_normalizer:"):
        _magic_module.randomized_pca(x, 5, key=jr.key(0), power_iteration_normalizer="Cholesky")


def test_magic_genes_subset_and_counts_path(pbmc_sqrt):
    x, counts = pbmc_sqrt
    names = [f"g{i}" for i in range(x.shape[1])]
    full = magic(counts)  # normalise + sqrt inside, as the tutorial does
    np.testing.assert_allclose(magic(x, Magic(normalize=False)).imputed, full.imputed, rtol=1e-4, atol=1e-4)
    chosen = magic(sp.csr_matrix(counts), genes=["g3", "g10"], gene_names=names, block_size=1)
    np.testing.assert_allclose(chosen.imputed, full.imputed[:, [3, 10]], rtol=1e-4, atol=1e-5)


def test_auto_t_follows_magic_rule(pbmc_sqrt):
    x, _ = pbmc_sqrt
    x = x[:, :300]  # at most 500 genes: no gene subsample, so the choice is deterministic
    operator = magic_impute.MAGIC(t="auto", solver="exact", random_state=0, verbose=0).fit(x)
    ours = magic(x, Magic(normalize=False, t="auto"), representation=operator.graph.data_nu)
    # magic-impute's own loop: diffuse, Procrustes disparity, stop one step after it falls below 1e-3.
    p, data, errors = operator.graph.diff_op, x, []
    for _ in range(20):
        new = p @ data
        errors.append(procrustes(data, new)[2])
        data = new
    np.testing.assert_allclose(ours.disparities, errors, rtol=1e-3, atol=1e-6)
    expected_t = next(i + 2 for i, e in enumerate(errors) if e < 1e-3)
    assert ours.t == expected_t == select_t(np.asarray(errors))
    expected = operator.transform(x)
    assert _median_gene_r(ours.imputed, expected) >= 0.99


@pytest.fixture(scope="module")
def small():
    sim = dx.simulate(jr.key(1), n_cells=300, n_genes=80, n_groups=3, lib_loc=6.0)
    return np.asarray(sim.counts, dtype=np.float32), np.asarray(sim.groups)


def test_stage_jit_matches_host_path_and_vmaps_over_decay(small):
    counts, _ = small
    host = magic(counts, Magic(n_pca=20)).imputed
    stage = Magic(n_pca=20)
    device = eqx.filter_jit(lambda s, x: s(x))(stage, jnp.asarray(counts))
    np.testing.assert_allclose(np.asarray(device), host, rtol=1e-3, atol=1e-4)
    stages = eqx.filter_vmap(lambda d: Magic(n_pca=20, decay=d))(jnp.asarray([1.0, 2.0, 40.0]))
    outs = eqx.filter_vmap(lambda s, x: s(x), in_axes=(eqx.if_array(0), None))(stages, jnp.asarray(counts))
    assert outs.shape == (3, *counts.shape)
    np.testing.assert_allclose(np.asarray(outs[0]), host, rtol=1e-3, atol=1e-4)
    grad = jax.grad(lambda d: jnp.sum(Magic(n_pca=20, decay=d)(jnp.asarray(counts)) ** 2))(jnp.asarray(1.0))
    assert np.isfinite(float(grad)) and float(grad) != 0.0


def test_stage_auto_t_matches_host_path(small):
    counts, _ = small
    host = magic(counts, Magic(n_pca=20, t="auto"))
    device = Magic(n_pca=20, t="auto")(jnp.asarray(counts))
    np.testing.assert_allclose(np.asarray(device), host.imputed, rtol=1e-3, atol=1e-4)
    x = np.sqrt(library_size_normalize(counts)[0])
    trace = disparity_trace(magic_operator(np.asarray(host.representation)), jnp.asarray(x), 20)
    np.testing.assert_allclose(np.asarray(trace), host.disparities, rtol=1e-4, atol=1e-7)


def test_split_molecules_is_binomial(getkey):
    counts = np.random.default_rng(0).poisson(3.0, size=(400, 50)).astype(np.float32)
    train, test = split_molecules(sp.csr_matrix(counts), key=getkey(), train_fraction=0.7)
    np.testing.assert_array_equal((train + test).toarray(), counts)
    assert abs(train.sum() / counts.sum() - 0.7) < 0.01
    dense_train, _ = split_molecules(counts, key=getkey(), train_fraction=0.5)
    assert np.all(dense_train <= counts) and np.all(dense_train == np.round(dense_train))


def _group_mean_denoiser(groups):
    def denoise(train):
        train = train.toarray() if sp.issparse(train) else np.asarray(train)
        library = train.sum(1, keepdims=True)
        profiles = np.stack([train[groups == g].sum(0) / train[groups == g].sum() for g in np.unique(groups)])
        return profiles[np.searchsorted(np.unique(groups), groups)] * library

    return denoise


def test_mcv_ranks_good_denoisers_above_the_baseline(small, getkey):
    counts, groups = small
    key = getkey()
    # The simulated groups' pooled profiles (a known-good denoiser): far better Poisson loss than the raw half.
    oracle = molecular_cross_validation(counts, _group_mean_denoiser(groups), key=key)
    assert oracle.poisson < 0.9 * oracle.baseline_poisson
    ours = molecular_cross_validation(counts, magic_denoiser(Magic(n_pca=20, t=1)), key=key)
    assert ours.poisson < ours.baseline_poisson and ours.matched_mse < ours.baseline_matched_mse
    flat = molecular_cross_validation(counts, lambda t: np.ones(t.shape) * float(t.sum()) / t.size, key=key)
    assert flat.poisson > oracle.poisson and flat.matched_mse > ours.matched_mse


def test_mcv_magic_matches_magic_impute_on_pbmc(getkey):
    counts = pbmc68k().X
    key = getkey()

    def reference_denoiser(train):
        scaled, library = library_size_normalize(train, rescale=None)
        y = magic_impute.MAGIC(solver="exact", random_state=0, verbose=0).fit_transform(
            np.sqrt(scaled.toarray()).astype(np.float64)
        )
        return np.square(y) * library[:, None]

    ours = molecular_cross_validation(counts, magic_denoiser(), key=key)
    theirs = molecular_cross_validation(counts, reference_denoiser, key=key)
    assert ours.mse < ours.baseline_mse and ours.poisson < ours.baseline_poisson
    assert abs(ours.mse - theirs.mse) <= 0.01 * theirs.mse
    assert abs(ours.poisson - theirs.poisson) <= 0.01 * theirs.poisson


def test_magic_ivf_search_agrees_with_exact(monkeypatch):
    # PC-like cells in 8 groups and genes smooth in them: forced to the IVF (26 lists of ~25 cells, 16 probed), the
    # operator and the imputed genes match the exact search's.
    rng = np.random.default_rng(0)
    rep = (rng.normal(scale=3.0, size=(8, 10))[rng.integers(0, 8, 700)] + rng.normal(size=(700, 10))).astype(np.float32)
    data = np.exp(rep[:, :5] @ rng.normal(size=(5, 30)) / 4 + rng.normal(scale=0.5, size=(700, 30))).astype(np.float32)
    calls = []
    searched = _magic_module.ivf_knn
    monkeypatch.setattr(_magic_module, "ivf_knn", lambda *a, **k: calls.append(a[1]) or searched(*a, **k))
    exact = magic(data, Magic(normalize=False, knn_method="exact"), representation=rep)
    assert not calls
    ivf = magic(data, Magic(normalize=False, knn_method="ivf"), representation=rep)
    assert calls == [16]
    assert _median_gene_r(ivf.imputed, exact.imputed) >= 0.99
    edges = [set(zip(np.asarray(o.operator.heads).tolist(), np.asarray(o.operator.tails).tolist()))
             for o in (exact, ivf)]
    assert len(edges[0] & edges[1]) >= 0.95 * len(edges[0])
    # "auto" (the default): the exact search below 20,000 cells, the IVF from there on (on CPU, as neighbor_graph).
    assert resolve_knn_method("auto", 19_999) == "exact"
    assert resolve_knn_method("auto", 20_000) == ("ivf" if jax.default_backend() == "cpu" else "exact")
    with pytest.raises(ValueError, match="^knn_method:"):
        Magic(knn_method="annoy")


def test_expected_log1p_normalized_is_the_binomial_expectation():
    from scipy.stats import binom

    rng = np.random.default_rng(1)
    denoised = rng.gamma(0.5, 2.0, size=(3, 30))
    denoised[:, 0] = 40.0  # a large share: its expected test count is past the cut-off (the Taylor branch)
    totals = np.array([60.0, 900.0, 0.0])
    got = np.asarray(expected_log1p_normalized(jnp.asarray(denoised, jnp.float32), jnp.asarray(totals), 1e4))
    want = np.zeros_like(got)
    for i, total in enumerate(totals[:2].astype(int)):
        y = np.arange(total + 1)[:, None]
        share = denoised[i] / denoised[i].sum()
        want[i] = np.sum(binom.pmf(y, total, share[None, :]) * np.log1p(1e4 * y / total), axis=0)
    assert totals[1] * denoised[1, 0] / denoised[1].sum() > 30
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_expected_mse_ranks_the_true_means_first(getkey):
    # Poisson counts from known means: the true means must beat the untreated half. Open Problems' normalised MSE
    # (log1p of a mean against log1p of a 10 % draw) ranks them below it; its expectation under the means does not.
    rng = np.random.default_rng(0)
    profiles = rng.gamma(0.3, 1.0, size=(4, 200))
    profiles /= profiles.sum(1, keepdims=True)
    means = profiles[rng.integers(0, 4, 400)] * np.exp(rng.normal(np.log(800), 0.3, 400))[:, None]
    counts = rng.poisson(means).astype(np.float32)
    truth = molecular_cross_validation(counts, lambda train: 0.9 * means, key=getkey())
    assert truth.mse > truth.baseline_mse  # the artefact
    assert truth.expected_mse < 0.95 * truth.baseline_expected_mse
    assert truth.poisson < truth.baseline_poisson and truth.matched_mse < truth.baseline_matched_mse


def test_bad_input_names_the_field(small):
    counts, _ = small
    with pytest.raises(ValueError, match="^t:"):
        Magic(t=0)
    with pytest.raises(ValueError, match="^t:"):
        Magic(t=-2)
    with pytest.raises(ValueError, match="^knn:"):
        magic(counts[:6], Magic(knn=5))
    with pytest.raises(ValueError, match="^knn:"):
        Magic(knn=5)(jnp.asarray(counts[:6]))
    with pytest.raises(ValueError, match="^genes:.*nope"):
        magic(counts, genes=["nope"], gene_names=[f"g{i}" for i in range(counts.shape[1])])
    with pytest.raises(ValueError, match="^genes:"):
        magic(counts, genes=[counts.shape[1]])
    negative = counts.copy()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="^counts:"):
        magic(negative)
    with pytest.raises(ValueError, match="^counts:"):
        split_molecules(negative, key=jr.key(0))
    with pytest.raises(ValueError, match="^train_fraction:"):
        split_molecules(counts, key=jr.key(0), train_fraction=1.0)
    with pytest.raises(ValueError, match="^key:"):
        magic(np.ones((50, 600), np.float32) + np.arange(600, dtype=np.float32), Magic(t="auto", n_pca=5))
