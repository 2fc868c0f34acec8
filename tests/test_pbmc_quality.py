"""The whole pipeline on real data (pbmc68k with a simulated two-batch split) against the scanpy workflow.

Baseline (computed in the same test): normalize_total, log1p, PCA 50, harmonypy, then Leiden over a grid of
resolutions (its best ARI against `bulk_labels`). Ours: the trained pipeline's corrected embeddings, clustered
by soft k-means over a grid of cluster counts (its best ARI), the same best-of-grid protocol on both sides.
Integration is scored by scib-metrics' Benchmarker on both embeddings in one call.
"""

import warnings

import jax
import jax.random as jr
import numpy as np
import pytest

import diffbio_eqx as dbx


@pytest.fixture(scope="module")
def pbmc():
    adata = dbx.datasets.add_simulated_batches(dbx.datasets.pbmc68k(), seed=0)
    arrays = dbx.io.from_anndata(adata, batch_key="batch")
    data = {"counts": arrays.counts, "batch_labels": arrays.batch_labels}
    pipeline = dbx.create_single_cell_pipeline(
        n_genes=adata.n_vars, n_clusters=10, n_batches=2, latent_dim=10, hidden_dims=(128,),
        batch_correction_clusters=None, key=jr.key(0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dbx.AmbientProfileWarning)
        # 100 VAE epochs, as the main job uses: scVI's heuristic (400 epochs for 700 cells) overfits this small set,
        # in scvi-tools as in ours (see tests/test_vae.py).
        fitted = dbx.fit_pipeline(pipeline, data, key=jr.key(1), vae_epochs=100, progress=False)
        out = dbx.run_pipeline(fitted.pipeline, data, key=jr.key(2))
    return adata, fitted, out


def _scanpy_baseline(adata):
    import harmonypy
    import scanpy as sc

    baseline = adata.copy()
    sc.pp.normalize_total(baseline, target_sum=1e4)
    sc.pp.log1p(baseline)
    sc.pp.pca(baseline, n_comps=50, random_state=0)
    corrected = np.asarray(harmonypy.run_harmony(baseline.obsm["X_pca"], baseline.obs, "batch",
                                                 random_state=0).Z_corr)
    if corrected.shape[0] != baseline.n_obs:
        corrected = corrected.T
    baseline.obsm["X_harmony"] = corrected
    return baseline


@pytest.mark.slow
def test_cluster_ari_at_least_scanpy_leiden_at_its_best(pbmc):
    import scanpy as sc

    adata, _, out = pbmc
    labels = adata.obs["bulk_labels"].to_numpy()
    baseline = _scanpy_baseline(adata)
    sc.pp.neighbors(baseline, use_rep="X_harmony", random_state=0)
    leiden = []
    for resolution in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0):
        sc.tl.leiden(baseline, resolution=resolution, key_added="leiden", flavor="igraph", n_iterations=2,
                     random_state=0)
        leiden.append(dbx.adjusted_rand_index(labels, baseline.obs["leiden"].to_numpy()))
    corrected = out["corrected_embeddings"]
    ours = []
    for n_clusters in range(4, 13):
        stage = dbx.SoftKMeans(np.zeros((n_clusters, corrected.shape[1])), temperature=0.1)
        clustering = dbx.fit_soft_kmeans(stage, corrected, key=jr.key(n_clusters)).model
        ours.append(dbx.adjusted_rand_index(labels, np.asarray(clustering.hard_assign(corrected))))
    print(f"best ARI: ours {max(ours):.3f} (k = {4 + int(np.argmax(ours))}), "
          f"scanpy Leiden {max(leiden):.3f}")
    assert max(ours) >= max(leiden)


@pytest.mark.slow
def test_scib_total_at_least_the_scanpy_harmonypy_baseline(pbmc):
    from scib_metrics.benchmark import Benchmarker

    adata, _, out = pbmc
    baseline = _scanpy_baseline(adata)
    baseline.obsm["X_diffbio_corrected"] = np.asarray(out["corrected_embeddings"], dtype=np.float32)
    baseline.obsm["X_harmony"] = baseline.obsm["X_harmony"].astype(np.float32)
    baseline.obsm["X_pca"] = baseline.obsm["X_pca"].astype(np.float32)
    bench = Benchmarker(baseline, batch_key="batch", label_key="bulk_labels",
                        embedding_obsm_keys=["X_harmony", "X_diffbio_corrected"],
                        pre_integrated_embedding_obsm_key="X_pca",
                        n_jobs=1)
    # scib-metrics is written for JAX's defaults (float32, standard promotion), not this suite's settings.
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        bench.benchmark()
    results = bench.get_results(min_max_scale=False)
    total = results["Total"]
    print(results.T)
    assert float(total["X_diffbio_corrected"]) >= float(total["X_harmony"])
