"""The Gaussian mixture clustering stage (issue 24): EM equal to scikit-learn's from the same start, Leiden
communities equal to scanpy's, the number of clusters chosen by silhouette or by stability, unbalanced groups
recovered (where soft k-means fails), jit / vmap / grad, and bad input named."""

import anndata as ad
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import diffbio_eqx as dbx
from diffbio_eqx._clustering import _gmm
from diffbio_eqx._clustering._communities import connectivity_matrix, igraph_graph, leiden, leiden_with_k
from diffbio_eqx._clustering._mixture_stage import (
    STABILITY_RESOLUTIONS,
    STABLE_EM_STEPS,
    _chosen_communities,
    _jackknife_error,
    partition_stability,
    select_n_clusters,
    stable_resolution,
)


# Unbalanced groups: 20x between the largest and the smallest, different spreads.
SIZES = [1000, 400, 200, 100, 50]


@pytest.fixture(scope="module")
def unbalanced():
    x, y = make_blobs(SIZES, n_features=6, cluster_std=[1.0, 0.6, 1.5, 0.4, 0.8], center_box=(-7, 7),
                      random_state=3)
    return x.astype(np.float64), y


def _sklearn_from(x, init: _gmm.MixtureParameters, n_iter: int) -> SkGaussianMixture:
    reference = SkGaussianMixture(
        len(init.log_weights), covariance_type="diag", max_iter=n_iter, tol=0.0, reg_covar=_gmm.REG_COVAR,
        weights_init=np.exp(np.asarray(init.log_weights)), means_init=np.asarray(init.means),
        precisions_init=1.0 / np.asarray(init.variances), random_state=0,
    )
    with pytest.warns(Warning):  # scikit-learn warns that tol=0 never "converged"
        return reference.fit(x)


def test_em_equals_scikit_learn_from_the_same_start(unbalanced):
    x, y = unbalanced
    xj = jnp.asarray(x)  # float64: the suite runs with x64 on (conftest)
    init = _gmm.parameters_from_labels(xj, jnp.asarray(y), len(SIZES))
    # Perturb the start so EM has work to do.
    init = _gmm.MixtureParameters(init.log_weights, init.means + 0.5, init.variances * 2.0)
    fit = _gmm.expectation_maximisation(xj, init, n_iter=8, tol=-1.0)
    reference = _sklearn_from(x, init, 8)
    np.testing.assert_allclose(fit.params.means, reference.means_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.params.variances, reference.covariances_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.exp(fit.params.log_weights), reference.weights_, rtol=1e-9)
    assert float(_gmm.mixture_log_likelihood(xj, fit.params)) == pytest.approx(reference.score(x), rel=1e-10)
    assert float(_gmm.bayesian_information_criterion(xj, fit.params)) == pytest.approx(reference.bic(x),
                                                                                        rel=1e-10)
    np.testing.assert_array_equal(_gmm.hard_labels(xj, fit.params), reference.predict(x))
    # Each EM step does not decrease the log-likelihood.
    assert np.all(np.diff(np.asarray(fit.log_likelihood)) >= -1e-12)


def test_leiden_communities_equal_scanpys():
    import scanpy as sc

    x = np.asarray(sc.datasets.pbmc68k_reduced().obsm["X_pca"][:, :20], np.float32)
    graph = dbx.neighbor_graph(x, 15).connectivities
    ours = leiden(connectivity_matrix(graph), resolution=0.8, seed=3)
    reference = ad.AnnData(np.zeros((x.shape[0], 1), np.float32))
    reference.obsp["connectivities"] = connectivity_matrix(graph)
    reference.uns["neighbors"] = {"connectivities_key": "connectivities", "params": {"method": "umap"}}
    sc.tl.leiden(reference, resolution=0.8, flavor="igraph", n_iterations=2, random_state=3)
    assert dbx.adjusted_rand_index(reference.obs["leiden"].to_numpy(), ours) == 1.0
    # The igraph graph built once and reused gives the same partitions as one built per call.
    built = igraph_graph(connectivity_matrix(graph))
    for resolution, seed in [(0.8, 3), (0.5, 0), (0.8, 3)]:
        np.testing.assert_array_equal(leiden(built, resolution=resolution, seed=seed),
                                      leiden(connectivity_matrix(graph), resolution=resolution, seed=seed))
    labels, resolution = leiden_with_k(connectivity_matrix(graph), 7, seed=3)
    assert labels.max() + 1 == 7 and 0.01 < resolution < 10


def test_the_mixture_recovers_unbalanced_groups_where_soft_kmeans_does_not(unbalanced):
    x, y = unbalanced
    x = jnp.asarray(x, jnp.float32)
    stage = dbx.GaussianMixture(np.zeros((len(SIZES), x.shape[1]), np.float32))
    fitted = dbx.fit_gaussian_mixture(stage, x, key=jr.key(0))
    mixture_ari = dbx.adjusted_rand_index(y, np.asarray(fitted.model.hard_assign(x)))
    kmeans = dbx.fit_soft_kmeans(dbx.SoftKMeans(np.zeros((len(SIZES), x.shape[1]), np.float32)), x, key=jr.key(0))
    kmeans_ari = dbx.adjusted_rand_index(y, np.asarray(kmeans.model.hard_assign(x)))
    assert mixture_ari >= 0.98
    assert mixture_ari >= kmeans_ari
    # Weights follow the group sizes.
    np.testing.assert_allclose(np.sort(np.exp(np.asarray(fitted.model.log_weights))),
                               np.sort(np.asarray(SIZES) / sum(SIZES)), atol=0.01)
    # Restarts are chosen by log-likelihood.
    finals = [float(curve[-1]) for name, curve in fitted.train_aux.items() if name.startswith("restart_")]
    assert len(finals) == 3 and float(fitted.train_loss[-1]) == pytest.approx(min(finals))


def test_the_number_of_clusters_is_chosen_by_silhouette(unbalanced):
    x, y = unbalanced
    x = jnp.asarray(x, jnp.float32)
    n_clusters, widths = select_n_clusters(x, seed=0)
    assert n_clusters == len(SIZES)
    assert set(widths) == set(STABILITY_RESOLUTIONS) and all(-1 <= w <= 1 for w in widths.values())
    assert max(widths.values()) >= 0.6  # "reasonable structure" (Kaufman & Rousseeuw) on well-separated groups
    fitted = dbx.fit_gaussian_mixture(None, x, key=jr.key(1))
    assert fitted.model.n_clusters == len(SIZES)
    assert dbx.adjusted_rand_index(y, np.asarray(fitted.model.hard_assign(x))) >= 0.98
    # With k chosen, the fit is one start (the chosen communities' M-step) and at most STABLE_EM_STEPS EM steps.
    assert list(fitted.train_aux) == ["restart_0"] and 1 <= fitted.n_epochs_run <= STABLE_EM_STEPS
    seed = int(jr.randint(jr.key(1), (), 0, 2**31 - 1))
    communities, widths_at_seed = _chosen_communities(x, seed=seed, n_neighbors=15, min_size=10)
    assert communities is not None and int(communities.max()) + 1 == len(SIZES)
    start = _gmm.parameters_from_labels(x, jnp.asarray(communities), len(SIZES))
    np.testing.assert_array_equal(np.asarray(fitted.model.hard_assign(x)), np.asarray(_gmm.hard_labels(
        x, _gmm.expectation_maximisation(x, start, n_iter=STABLE_EM_STEPS).params)))
    # The chosen partition is the widest-silhouette one among every resolution's Leiden seeds (no community here
    # is under 10 cells, so the kept communities are the whole partition).
    assert communities.min() == 0
    assert dbx.silhouette_width(x, communities) == pytest.approx(max(widths_at_seed.values()))
    # On structureless data every partition scores "no substantial structure" (below 0.25).
    noise = np.random.default_rng(0).normal(size=(600, 6)).astype(np.float32)
    _, noise_widths = select_n_clusters(noise, seed=0)
    assert np.nanmax(list(noise_widths.values())) < 0.25


def test_silhouette_width_equals_scikit_learns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)) + np.repeat(np.eye(4)[:3] * 3, 100, axis=0)
    labels = np.repeat([0, 1, 2], 100)
    labels[:5] = 7  # a small cluster beside the three
    labels[-1] = 9  # a cell alone in its cluster scores 0, as in scikit-learn
    assert dbx.silhouette_width(x, labels) == pytest.approx(silhouette_score(x, labels), abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        dbx.silhouette_width(x, np.zeros(300))


def test_the_number_of_clusters_by_stability(unbalanced):
    x, y = unbalanced
    x = jnp.asarray(x, jnp.float32)
    n_clusters, stability = select_n_clusters(x, seed=0, rule="stability")
    assert n_clusters == len(SIZES)
    assert set(stability) == set(STABILITY_RESOLUTIONS) and all(0 <= s <= 1 for s in stability.values())
    assert max(stability.values()) >= 0.99
    fitted = dbx.fit_gaussian_mixture(None, x, key=jr.key(1), k_rule="stability")
    assert fitted.model.n_clusters == len(SIZES)
    assert dbx.adjusted_rand_index(y, np.asarray(fitted.model.hard_assign(x))) >= 0.98
    # On structureless data the partitions are not reproducible (one community at low resolution scores NaN).
    noise = np.random.default_rng(0).normal(size=(600, 6)).astype(np.float32)
    noise_stability = partition_stability(noise, seed=0)
    assert np.nanmax(list(noise_stability.values())) < 0.6
    assert np.isnan(noise_stability[0.25])
    with pytest.raises(ValueError, match="rule"):
        select_n_clusters(x, rule="bic")


def _pairwise(values: np.ndarray) -> np.ndarray:
    """A symmetric pairwise matrix (NaN diagonal) from its upper triangle, row by row."""
    n = int((1 + np.sqrt(1 + 8 * values.size)) / 2)
    matrix = np.full((n, n), np.nan)
    matrix[np.triu_indices(n, 1)] = values
    matrix.T[np.triu_indices(n, 1)] = values
    return matrix


def test_stable_resolution_and_its_finer_tie_break():
    rng = np.random.default_rng(0)
    coarse = _pairwise(0.97 + 0.02 * rng.standard_normal(15))
    # The jackknife error equals the spread of the explicit leave-one-subsample-out means.
    left_out = np.array([np.nanmean(np.delete(np.delete(coarse, i, 0), i, 1)) for i in range(6)])
    assert _jackknife_error(coarse) == pytest.approx(np.sqrt(5 / 6 * np.sum((left_out - np.mean(left_out)) ** 2)))
    gap = _pairwise(0.002 + 0.05 * rng.standard_normal(15))
    assert 0 < np.nanmean(gap) < _jackknife_error(gap)
    tied = coarse - gap  # lower by less than the error of the difference
    worse = coarse - 0.1  # lower, with no error at all
    flat = np.full((6, 6), np.nan)  # one community in every subsample
    finer = {"tie_break": "finer", "tolerance": 0.0}  # within one standard error only
    assert stable_resolution({0.25: coarse, 0.5: tied, 1.0: worse, 1.5: flat}, **finer) == 0.5
    near = coarse - 0.02  # lower by more than its error (none) but less than a 0.03 tolerance
    assert stable_resolution({0.25: coarse, 0.75: near, 1.0: worse}, **finer) == 0.25
    assert stable_resolution({0.25: coarse, 0.75: near, 1.0: worse}, tie_break="finer", tolerance=0.03) == 0.75
    assert stable_resolution({0.25: coarse, 1.0: worse}, **finer) == 0.25
    assert stable_resolution({0.25: flat}, **finer) is None
    # The default: the most stable (`STABILITY_TIE_BREAK`); a tolerance alone ignores the standard error.
    assert stable_resolution({0.25: coarse, 0.5: tied, 1.0: worse}) == 0.25
    half_gap = float(np.nanmean(gap)) / 2
    assert stable_resolution({0.25: coarse, 0.5: tied}, tie_break="finer", tolerance=half_gap) == 0.5
    assert stable_resolution({0.25: coarse, 0.5: tied}, tie_break="finer", tolerance=half_gap,
                             standard_error=False) == 0.25
    with pytest.raises(ValueError, match="tie_break"):
        stable_resolution({0.25: coarse}, tie_break="coarser")


def test_jit_vmap_over_temperature_and_grad(unbalanced):
    x, y = unbalanced
    x = jnp.asarray(x, jnp.float32)
    stage = dbx.fit_gaussian_mixture(dbx.GaussianMixture(jnp.zeros((5, 6))), x, key=jr.key(0)).model
    temperatures = jnp.asarray([0.25, 1.0, 4.0], jnp.float32)
    resp = jax.vmap(lambda t: eqx_call(stage, x, t))(temperatures)
    assert resp.shape == (3, x.shape[0], 5)
    np.testing.assert_allclose(resp.sum(-1), 1.0, rtol=1e-5)
    entropy = -(resp * jnp.log(jnp.clip(resp, 1e-30))).sum(-1).mean(-1)
    assert entropy[0] <= entropy[1] <= entropy[2]
    loss_grad = jax.grad(lambda s: s.loss((x,), key=jr.key(0))[0])(stage)
    assert bool(jnp.all(jnp.isfinite(loss_grad.means))) and float(jnp.abs(loss_grad.means).max()) < 1e-2
    # At the EM fixed point the likelihood's gradient in the means vanishes; moved away, it does not.
    moved = jax.grad(lambda s: s.loss((x,), key=jr.key(0))[0])(
        dbx.GaussianMixture(stage.means + 1.0, variances=stage.variances, log_weights=stage.log_weights))
    assert float(jnp.abs(moved.means).max()) > 0.1


def eqx_call(stage, x, temperature):
    import equinox as eqx

    return eqx.tree_at(lambda s: s.temperature, stage, temperature)(x)


def test_bad_input_is_named():
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    stage = dbx.GaussianMixture(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="init: unknown initialisation 'random'"):
        dbx.fit_gaussian_mixture(stage, x, key=jr.key(0), init="random")
    with pytest.raises(ValueError, match="k_rule: unknown rule for the number of clusters 'bic'"):
        dbx.fit_gaussian_mixture(None, x, key=jr.key(0), k_rule="bic")
    with pytest.raises(ValueError, match="n_starts: must be a whole number >= 1"):
        dbx.silhouette_partition(x, n_starts=0)
    with pytest.raises(ValueError, match="x: 3 non-finite value"):
        dbx.silhouette_partition(np.where(np.arange(30)[:, None] == 4, np.nan, x))
    with pytest.raises(ValueError, match="n_restarts: must be a whole number >= 1"):
        dbx.fit_gaussian_mixture(stage, x, key=jr.key(0), n_restarts=0)
    with pytest.raises(ValueError, match="n_clusters: asked for 40 clusters but there are only 30 cells"):
        dbx.fit_gaussian_mixture(dbx.GaussianMixture(np.zeros((40, 3), np.float32)), x, key=jr.key(0))
    with pytest.raises(ValueError, match="x: has 2 dimensions, expected 3"):
        dbx.fit_gaussian_mixture(stage, x[:, :2], key=jr.key(0))
    with pytest.raises(ValueError, match="variances: expected shape"):
        dbx.GaussianMixture(np.zeros((4, 3)), variances=np.ones((3, 3)))
    # Under the suite's type checking the Literal annotation refuses it first; without it, __post_init__ does.
    with pytest.raises((TypeError, ValueError), match="clustering_method"):
        dbx.SingleCellPipelineConfig(clustering_method="leiden")
    with pytest.raises(ValueError, match="n_clusters: must be a positive integer or None"):
        dbx.SingleCellPipelineConfig(n_clusters=0)


@pytest.fixture(scope="module")
def unbalanced_counts():
    """Simulated counts with five groups whose sizes span 20x (800 ... 40 cells), two batches; 20 % DE genes
    (Splatter's 10 % leaves the small groups inseparable at 300 genes)."""
    sim = dbx.simulate(jr.key(5), n_cells=4000, n_genes=300, n_groups=5, n_batches=2, de_prob=0.2)
    groups = np.asarray(sim.groups)
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(groups == g), size, replace=False)
                                   for g, size in enumerate([800, 320, 160, 80, 40])]))
    return np.asarray(sim.counts)[keep], np.asarray(sim.batches)[keep], groups[keep]


def test_the_pipeline_chooses_k_and_recovers_unbalanced_groups(unbalanced_counts, tmp_path):
    counts, batches, groups = unbalanced_counts
    config = dbx.SingleCellPipelineConfig(n_genes=counts.shape[1], n_clusters=None, n_batches=2, latent_dim=10,
                                          hidden_dims=(128,), batch_correction_clusters=None,
                                          enable_ambient_removal=False, enable_dim_reduction=False)
    data = {"counts": counts, "batch_labels": batches}
    fitted = dbx.fit_pipeline(dbx.SingleCellPipeline(config, key=jr.key(0)), data, key=jr.key(1),
                              vae_epochs=60, progress=False)
    pipeline = fitted.pipeline
    assert isinstance(pipeline.clustering, dbx.GaussianMixture)
    # The most stable Leiden resolution (0.25) merges the 40-cell group into the 80-cell one (modularity's
    # resolution limit); the groups are still recovered at ARI >= 0.9.
    assert pipeline.config.n_clusters == pipeline.clustering.n_clusters
    assert pipeline.clustering.n_clusters in (4, 5)
    out = dbx.run_pipeline(pipeline, data, key=jr.key(2))
    labels = np.asarray(out["cluster_assignments"]).argmax(1)
    assert dbx.adjusted_rand_index(groups, labels) >= 0.9
    # The chosen number of clusters survives saving and loading.
    dbx.save_pipeline(tmp_path / "p.eqx", pipeline)
    loaded = dbx.load_pipeline(tmp_path / "p.eqx")
    assert loaded.config.n_clusters == pipeline.clustering.n_clusters
    np.testing.assert_array_equal(np.asarray(dbx.run_pipeline(loaded, data, key=jr.key(2))["cluster_assignments"]),
                                  np.asarray(out["cluster_assignments"]))


def test_the_face_writes_clusters_probabilities_and_settings(unbalanced):
    x, y = unbalanced
    adata = ad.AnnData(np.zeros((x.shape[0], 1), np.float32), obsm={"X_pca": x.astype(np.float32)})
    model = dbx.tl.gaussian_mixture(adata, use_rep="X_pca", key=jr.key(0))
    assert model.n_clusters == len(SIZES)
    assert dbx.adjusted_rand_index(y, adata.obs["diffbio_cluster"].to_numpy()) >= 0.98
    np.testing.assert_allclose(adata.obsm["diffbio_cluster_probabilities"].sum(1), 1.0, rtol=1e-5)
    assert adata.uns["diffbio_gaussian_mixture"]["params"]["n_clusters"] == len(SIZES)
