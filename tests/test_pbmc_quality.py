"""The whole pipeline on real data (pbmc68k with a simulated two-batch split) against the scanpy workflow, over seeds.

Baseline (computed once and shared): normalize_total, log1p, PCA 50, harmonypy, then Leiden over a grid of
resolutions (its best ARI against `bulk_labels`). Ours: the pipeline trained from each of `SEEDS`' keys, its
corrected embeddings clustered by soft k-means over a grid of cluster counts (its best ARI), the same best-of-grid
protocol on both sides. Integration is scored by scib-metrics' Benchmarker on every embedding in one call.

Training is where the randomness is (the scanpy workflow varies little with its seeds), and one training seed with
zero margin decided nothing (issue 27), so both tests compare the median over our seeds with the baseline, with a
stated margin, and print the per-seed figures.
"""

import warnings

import jax
import jax.random as jr
import numpy as np
import pytest

import diffbio_eqx as dbx


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def adata():
    return dbx.datasets.add_simulated_batches(dbx.datasets.pbmc68k(), seed=0)


@pytest.fixture(scope="module")
def ours(adata):
    """Corrected embeddings of the pipeline trained from each seed: `{seed: (n_cells, latent_dim) array}`."""
    arrays = dbx.io.from_anndata(adata, batch_key="batch")
    data = {"counts": arrays.counts, "batch_labels": arrays.batch_labels}
    corrected = {}
    for seed in SEEDS:
        pipeline = dbx.create_single_cell_pipeline(
            n_genes=adata.n_vars, n_clusters=10, n_batches=2, latent_dim=10, hidden_dims=(128, 128),  # the job's
            batch_correction_clusters=None, key=jr.key(3 * seed),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dbx.AmbientProfileWarning)
            # 100 VAE epochs, as the main job uses: scVI's heuristic (400 epochs for 700 cells) overfits this small
            # set, in scvi-tools as in ours (see tests/test_vae.py). The UMAP stage is trained last, on the
            # corrected latent, and nothing here reads it: one epoch keeps its cost out of the seed study.
            fitted = dbx.fit_pipeline(pipeline, data, key=jr.key(3 * seed + 1), vae_epochs=100, umap_epochs=1,
                                      progress=False)
            out = dbx.run_pipeline(fitted.pipeline, data, key=jr.key(3 * seed + 2))
        corrected[seed] = out["corrected_embeddings"]
    return corrected


@pytest.fixture(scope="module")
def baseline(adata):
    """The scanpy workflow: normalisation, PCA and harmonypy (`obsm["X_harmony"]`)."""
    import harmonypy
    import scanpy as sc

    baseline = adata.copy()
    sc.pp.normalize_total(baseline, target_sum=1e4)
    sc.pp.log1p(baseline)
    sc.pp.pca(baseline, n_comps=50, random_state=0)
    baseline.obsm["X_pca"] = baseline.obsm["X_pca"].astype(np.float32)
    corrected = np.asarray(harmonypy.run_harmony(baseline.obsm["X_pca"], baseline.obs, "batch", random_state=0,
                                                 verbose=False).Z_corr)
    if corrected.shape[0] != baseline.n_obs:
        corrected = corrected.T
    baseline.obsm["X_harmony"] = corrected.astype(np.float32)
    return baseline


def _leiden_best_ari(baseline) -> float:
    import scanpy as sc

    view = baseline.copy()
    sc.pp.neighbors(view, use_rep="X_harmony", random_state=0)
    labels = view.obs["bulk_labels"].to_numpy()
    scores = []
    for resolution in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0):
        sc.tl.leiden(view, resolution=resolution, key_added="leiden", flavor="igraph", n_iterations=2,
                     random_state=0)
        scores.append(dbx.adjusted_rand_index(labels, view.obs["leiden"].to_numpy()))
    return max(scores)


def _soft_kmeans_best_ari(corrected, labels: np.ndarray, seed: int) -> float:
    scores = []
    for n_clusters in range(4, 13):
        stage = dbx.SoftKMeans(np.zeros((n_clusters, corrected.shape[1])), temperature=0.1)
        clustering = dbx.fit_soft_kmeans(stage, corrected, key=jr.key(100 * seed + n_clusters)).model
        scores.append(dbx.adjusted_rand_index(labels, np.asarray(clustering.hard_assign(corrected))))
    return max(scores)


# Measured (CPU, seeds 0-2, two hidden layers as the main job since 2026-12-03, AMD EPYC): best ARI ours 0.604,
# 0.611, 0.629 vs scanpy Leiden's 0.532, so ours must be ahead by ARI_MARGIN; scib total ours 0.7420, 0.7527,
# 0.7552 vs scanpy + harmonypy's 0.7299 (+0.012, +0.023, +0.025; with one hidden layer it was +0.001 to +0.006).
# Issue 24 asks for +0.02 (met by the median here and by the main job over 5 seeds, +0.026, README); the test
# holds SCIB_MARGIN, 0.005 below it, because float rounding differs between CPUs and moves these totals by a few
# thousandths.
ARI_MARGIN = 0.05
SCIB_MARGIN = 0.015


@pytest.mark.slow
def test_cluster_ari_median_over_seeds_vs_scanpy_leiden(adata, ours, baseline):
    labels = adata.obs["bulk_labels"].to_numpy()
    theirs = _leiden_best_ari(baseline)
    mine = [_soft_kmeans_best_ari(ours[seed], labels, seed) for seed in SEEDS]
    print(f"best ARI, ours per seed {SEEDS}: {np.round(mine, 3)}; scanpy Leiden {theirs:.3f}")
    assert np.median(mine) >= theirs + ARI_MARGIN, (mine, theirs)


@pytest.mark.slow
def test_scib_total_median_over_seeds_vs_scanpy_harmonypy(ours, baseline):
    from scib_metrics.benchmark import Benchmarker

    scored = baseline.copy()
    for seed in SEEDS:
        scored.obsm[f"X_diffbio_{seed}"] = np.array(ours[seed], dtype=np.float32)  # writeable: KMeans centres it
    keys = ["X_harmony"] + [f"X_diffbio_{seed}" for seed in SEEDS]
    bench = Benchmarker(scored, batch_key="batch", label_key="bulk_labels", embedding_obsm_keys=keys,
                        pre_integrated_embedding_obsm_key="X_pca", n_jobs=1)
    # scib-metrics is written for JAX's defaults (float32, standard promotion), not this suite's settings.
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        bench.benchmark()
    results = bench.get_results(min_max_scale=False)
    total = results["Total"]
    print(results.T)
    mine = [float(total[f"X_diffbio_{seed}"]) for seed in SEEDS]
    theirs = float(total["X_harmony"])
    print(f"scib total, ours per seed {SEEDS}: {np.round(mine, 4)}; scanpy + harmonypy {theirs:.4f}")
    assert np.median(mine) >= theirs + SCIB_MARGIN, (mine, theirs)
