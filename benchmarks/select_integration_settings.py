"""Choose the main job's integration settings on simulated data, never on pbmc68k's labels (issue 24, part 3).

Simulated counts shaped like pbmc68k_reduced (700 cells x 765 genes, 10 unbalanced groups, two batches with
Splatter's batch factors) are fitted with the job's settings (`diffbio_eqx._job._settings`: latent 10, two hidden
layers of 128 (one layer until 2026-12-03: `base` in the results written before then, `one_layer` after), Harmony's
own K, scVI's epoch heuristic capped at 100) and with one change at a time: latent size,
Harmony's theta, VAE epochs and the KL warm-up. UMAP and clustering are off: they do not touch the corrected
embedding. Each seed's embeddings, and scanpy + harmonypy on the same counts, are scored in one scib-metrics
Benchmarker call (label key: the simulated groups).

    python benchmarks/select_integration_settings.py --seeds 0 1 [--candidates base latent_30 ...]
    python benchmarks/select_integration_settings.py --batches job --seeds 0 1 --candidates base epochs_200
    python benchmarks/select_integration_settings.py --batches pbmc_vae --seeds 0 1 --candidates base epochs_200

Writes benchmarks/results/integration_settings.json: per seed and candidate, the scib totals, and per candidate
the mean total minus harmonypy's. `--batches job` (written to integration_settings_job_batches.json) simulates
the groups in one batch and then splits the cells into two batches exactly as the job splits pbmc68k
(`datasets.add_simulated_batches`: a random split, gene-wise effects exp(N(0, 0.4)) by Poisson resampling of
batch 1's counts), so the batch effect the settings are chosen on is the one they are scored on, instead of
Splatter's batch factors (`batch_fac_scale` 0.3 applied to both batches' means, which harmonypy corrects much
less well than pbmc68k's split: 0.41 vs 0.73). `--batches pbmc_vae` (integration_settings_pbmc_vae.json) also
takes the biology from pbmc68k without its labels: a VAE (the job's latent 10, hidden 128, 100 epochs) is fitted
to pbmc68k's counts, every cell's counts are redrawn from it (a posterior draw of its latent, decoded, times its
own library size, negative binomial with the fitted dispersions), the groups to score against are Leiden's
communities (resolution 1.0, scanpy's) of the posterior means, and the cells are then split as the job splits
pbmc68k.
"""

import argparse
import json
import pathlib
import time
import warnings
from typing import Any

import numpy as np
from _common import ROOT, environment


# One change at a time from the job's settings; each entry: (config changes, fit_pipeline setting changes).
CANDIDATES: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "latent_20": ({"latent_dim": 20}, {}),
    "latent_30": ({"latent_dim": 30}, {}),
    "theta_1": ({"harmony_theta": 1.0}, {}),
    "theta_4": ({"harmony_theta": 4.0}, {}),
    "classic": ({"harmony_preset": "classic"}, {}),
    "epochs_200": ({}, {"vae_epochs": 200}),
    "epochs_50": ({}, {"vae_epochs": 50}),
    "epochs_400": ({}, {"vae_epochs": 400}),  # scVI's heuristic uncapped (700 cells)
    "no_ambient": ({"enable_ambient_removal": False}, {}),
    "hidden_256": ({"hidden_dims": (256,)}, {}),
    "two_layers": ({"hidden_dims": (128, 128)}, {}),  # the job's default since 2026-12-03 (was one layer)
    "one_layer": ({"hidden_dims": (128,)}, {}),  # scVI's default depth; the job's until 2026-12-03
    "zinb": ({"likelihood": "zinb"}, {}),
    "layer_norm": ({"use_layer_norm": True}, {}),
    "sigma_0.2": ({"harmony_sigma": 0.2}, {}),
    "mmd": ({"batch_correction": "mmd"}, {}),
    "adversarial": ({"batch_correction": "adversarial"}, {}),
}


DATA_NOTES = {
    "splatter": "dbx.simulate: 700 cells x 765 genes, 10 groups, 2 batches, batch_fac_scale 0.3, contamination 0.05",
    "job": "dbx.simulate: 700 cells x 765 genes, 10 groups, one batch, contamination 0.05; then "
           "datasets.add_simulated_batches(seed=seed): the job's two-batch split of pbmc68k",
    "pbmc_vae": "pbmc68k's counts redrawn from a VAE fitted to them (latent 10, 100 epochs); groups: Leiden "
                "(resolution 1.0) of its posterior means; then datasets.add_simulated_batches(seed=seed)",
}


def pbmc_vae_counts(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts redrawn from a VAE fitted to pbmc68k (no labels used) and the generator's own groups."""
    import jax.numpy as jnp
    import jax.random as jr
    import scipy.sparse as sp

    import diffbio_eqx as dbx
    from diffbio_eqx import datasets
    from diffbio_eqx._clustering._communities import connectivity_matrix, leiden
    from diffbio_eqx._core._neighbors import neighbor_graph

    counts = np.asarray(sp.csr_matrix(datasets.pbmc68k().X).toarray(), np.float32)
    vae = dbx.VAENormalizer(counts.shape[1], latent_dim=10, hidden_dims=(128,), key=jr.key(1000 + seed))
    vae = dbx.fit_vae(vae, counts, key=jr.key(2000 + seed),
                      settings=dbx.TrainSettings(n_epochs=100, progress=False)).model
    out = vae(jnp.asarray(counts), key=jr.key(3000 + seed), inference=True)
    mean = np.asarray(out.normalized, np.float64) / float(vae.target_library_size) * counts.sum(1, keepdims=True)
    assert vae.log_inverse_dispersion is not None
    theta = np.exp(np.asarray(vae.log_inverse_dispersion[0], np.float64))
    rng = np.random.default_rng(seed)
    redrawn = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    graph = neighbor_graph(jnp.asarray(out.latent), 15).connectivities
    return redrawn, leiden(connectivity_matrix(graph), resolution=1.0, seed=seed)


def simulated(seed: int, batches: str = "splatter"):
    """700 x 765 simulated counts, 10 groups, two batches: Splatter's batch factors (`"splatter"`) or the job's
    split of pbmc68k (`"job"`: one-batch counts, then `datasets.add_simulated_batches` with the job's seed)."""
    import anndata as ad
    import jax.random as jr
    import pandas as pd
    import scipy.sparse as sp

    import diffbio_eqx as dbx
    from diffbio_eqx import datasets

    job = batches != "splatter"
    if batches == "pbmc_vae":
        counts, groups = pbmc_vae_counts(seed)
        obs = pd.DataFrame({"group": pd.Categorical([f"g{g}" for g in groups])})
    else:
        sim = dbx.simulate(jr.key(seed), n_cells=700, n_genes=765, n_groups=10, n_batches=1 if job else 2,
                           contamination=0.05, batch_fac_scale=0.3)
        counts, groups = np.asarray(sim.counts, np.float32), np.asarray(sim.groups)
        obs = pd.DataFrame({"group": pd.Categorical([f"g{g}" for g in groups])})
        if not job:
            obs["batch"] = [f"batch{b}" for b in np.asarray(sim.batches)]
    adata = ad.AnnData(sp.csr_matrix(counts) if job else counts, obs=obs)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"gene{j}" for j in range(adata.n_vars)]
    if job:
        adata = datasets.add_simulated_batches(adata, seed=seed)
        adata.X = np.asarray(sp.csr_matrix(adata.X).toarray(), np.float32)
    return adata


def corrected_embedding(adata, config_changes: dict, fit_changes: dict, seed: int) -> np.ndarray:
    import jax.random as jr

    import diffbio_eqx as dbx
    from diffbio_eqx import _job, io

    arrays = io.from_anndata(adata, batch_key="batch")
    config, _ = _job._settings(adata, arrays, None)
    config = config.replace(enable_dim_reduction=False, enable_clustering=False, **config_changes)
    epochs: dict[str, Any] = dict(_job._epochs(adata.n_obs, dict(fit_changes))[0])
    annotated, _ = dbx.fit_anndata(adata, batch_key="batch", key=jr.key(seed), config=config, progress=False,
                                   **epochs)
    return np.asarray(annotated.obsm["X_diffbio_corrected"], np.float32)


def score(adata, embeddings: dict[str, np.ndarray], label_key: str) -> dict[str, dict[str, float]]:
    from bench_quality import _scanpy_baseline
    from scib_metrics.benchmark import Benchmarker

    baseline = _scanpy_baseline(adata)
    for name, embedding in embeddings.items():
        baseline.obsm[name] = embedding
    bench = Benchmarker(baseline, batch_key="batch", label_key=label_key,
                        embedding_obsm_keys=["X_harmony", *embeddings], pre_integrated_embedding_obsm_key="X_pca",
                        n_jobs=1)
    bench.benchmark()
    results = bench.get_results(min_max_scale=False)
    return {name: {row: float(results.loc[name, row]) for row in ("Total", "Batch correction", "Bio conservation")}
            for name in ["X_harmony", *embeddings]}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--batches", choices=("splatter", "job", "pbmc_vae"), default="splatter",
                        help="Splatter's batch factors, the job's split of pbmc68k, or that split of counts "
                             "redrawn from a VAE fitted to pbmc68k")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    arguments = parser.parse_args()
    suffix = {"splatter": "", "job": "_job_batches", "pbmc_vae": "_pbmc_vae"}[arguments.batches]
    out = arguments.out or ROOT / "benchmarks" / "results" / f"integration_settings{suffix}.json"
    runs = {}
    for seed in arguments.seeds:
        adata = simulated(seed, arguments.batches)
        embeddings, seconds = {}, {}
        for name in arguments.candidates:
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                embeddings[name] = corrected_embedding(adata, *CANDIDATES[name], seed=seed)
            seconds[name] = time.perf_counter() - started
            print(seed, name, f"{seconds[name]:.0f} s", flush=True)
        runs[seed] = {"scores": score(adata, embeddings, "group"), "fit_seconds": seconds}
        print(seed, json.dumps(runs[seed]["scores"]), flush=True)
    gain = {name: float(np.mean([run["scores"][name]["Total"] - run["scores"]["X_harmony"]["Total"]
                                 for run in runs.values()])) for name in arguments.candidates}
    record = {"benchmark": "integration settings on simulated data (issue 24 part 3)",
              "data": DATA_NOTES[arguments.batches],
              "candidates": {name: {"config": CANDIDATES[name][0], "fit": CANDIDATES[name][1]}
                             for name in arguments.candidates},
              "environment": environment("scanpy", "harmonypy", "scib-metrics"),
              "runs": runs, "mean_total_minus_harmonypy": gain}
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(gain, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
