"""Batch correction beside Harmony (issue 19): the VAE alone, Harmony on its latent, trVAE's MMD, the adversarial
(WGAN-GP) corrector and scanpy's PCA + harmonypy, scored with scib-metrics' Benchmarker.

Data: two Splatter-style simulations (`diffbio_eqx.simulate`: 6 cell types, 3 and 6 batches with unbalanced
sizes, one cell type missing from the last batch) and pbmc68k with a simulated two-batch split
(`datasets.add_simulated_batches`). For each data set and method: every scib metric, the batch-correction and
bio-conservation totals and the total (`get_results(min_max_scale=False)`), the fit time, and for the simulations
the purity of the missing type's neighbourhoods (share of each of its cells' 15 nearest neighbours, in the
embedding, that are of its type). Speed: seconds per epoch of each corrector against the plain VAE on the same
data (3,000 cells x 2,000 genes, a second, compiled run of three epochs).

    python benchmarks/bench_integration.py [--cells 1000] [--epochs 60] [--seed 0] [--quick]

Writes benchmarks/results/integration.json and benchmarks/results/integration.png.
"""

import argparse
import json
import time
import warnings

import numpy as np
from _common import ROOT, environment


METHODS = ("VAE", "Harmony (VAE latent)", "MMD", "adversarial", "harmonypy (PCA)")


def simulated(n_batches: int, n_cells: int, n_genes: int, seed: int) -> dict:
    """Splatter-style counts, unbalanced batches (sizes falling linearly to a quarter), type 5 absent from the
    last batch."""
    import jax.random as jr

    from diffbio_eqx._simulate._simulate import simulate

    pool = int(n_cells * 2.2)
    sim = simulate(jr.key(seed), n_cells=pool, n_genes=n_genes, n_groups=6, n_batches=n_batches,
                   batch_fac_scale=0.4, de_prob=0.15)
    batches, groups = np.asarray(sim.batches), np.asarray(sim.groups)
    rng = np.random.default_rng(seed)
    keep_share = np.linspace(1.0, 0.25, n_batches)
    keep = rng.random(pool) < keep_share[batches]
    keep &= ~((batches == n_batches - 1) & (groups == 5))
    index = np.flatnonzero(keep)[:n_cells]
    counts = np.asarray(sim.counts)[index].astype(np.float32)
    alive = counts.sum(axis=1) > 0
    index = index[alive]
    return {"name": f"simulated, {n_batches} batches", "counts": counts[alive], "batches": batches[index],
            "labels": groups[index], "missing_type": 5,
            "batch_sizes": np.bincount(batches[index], minlength=n_batches).tolist()}


def pbmc(seed: int) -> dict:
    import scipy.sparse as sp

    from diffbio_eqx import datasets

    adata = datasets.add_simulated_batches(datasets.pbmc68k(), seed=seed)
    counts = np.asarray(sp.csr_matrix(adata.X).toarray(), np.float32)
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    batches = adata.obs["batch"].cat.codes.to_numpy()
    return {"name": "pbmc68k, simulated two-batch split", "counts": counts, "batches": batches, "labels": labels,
            "missing_type": None, "batch_sizes": np.bincount(batches).tolist()}


def _vae(data: dict, seed: int):
    import jax.random as jr

    from diffbio_eqx._vae._stage import VAENormalizer

    n_batches = int(data["batches"].max()) + 1
    return VAENormalizer(data["counts"].shape[1], n_batches, latent_dim=10, key=jr.key(seed))


def embeddings(data: dict, n_epochs: int, seed: int, options: dict) -> tuple[dict, dict]:
    """Every method's embedding of `data` and its fit time (seconds, compilation included)."""
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._harmony._stage import Harmony
    from diffbio_eqx._integration._adversarial import fit_adversarial_vae
    from diffbio_eqx._integration._mmd_vae import fit_mmd_vae
    from diffbio_eqx._vae._stage import fit_vae, vae_latent

    counts, batches = data["counts"], data["batches"]
    settings = TrainSettings(n_epochs=n_epochs, progress=False)
    key = jr.key(seed + 1)
    out, seconds = {}, {}

    start = time.perf_counter()
    plain = fit_vae(_vae(data, seed), counts, batches, key=key, settings=settings).model
    out["VAE"] = np.asarray(vae_latent(plain, counts, batches))
    seconds["VAE"] = time.perf_counter() - start
    start = time.perf_counter()
    out["Harmony (VAE latent)"] = np.asarray(Harmony().run(out["VAE"], batches, key=key).z_corr)
    seconds["Harmony (VAE latent)"] = seconds["VAE"] + time.perf_counter() - start
    start = time.perf_counter()
    mmd = fit_mmd_vae(_vae(data, seed), counts, batches, key=key, settings=settings, **options["mmd"]).model
    out["MMD"] = np.asarray(vae_latent(mmd, counts, batches))
    seconds["MMD"] = time.perf_counter() - start
    start = time.perf_counter()
    adversarial = fit_adversarial_vae(_vae(data, seed), counts, batches, key=key, settings=settings,
                                      **options["adversarial"])
    out["adversarial"] = np.asarray(vae_latent(adversarial.model, counts, batches))
    seconds["adversarial"] = time.perf_counter() - start
    start = time.perf_counter()
    pca, corrected = _harmonypy(counts, batches)
    out["harmonypy (PCA)"], out["PCA"] = corrected, pca
    seconds["harmonypy (PCA)"] = time.perf_counter() - start
    return out, seconds


def _harmonypy(counts: np.ndarray, batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import anndata as ad
    import harmonypy
    import pandas as pd
    import scanpy as sc

    adata = ad.AnnData(counts.copy(), obs=pd.DataFrame({"batch": batches.astype(str)}))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=0)
    pca = np.asarray(adata.obsm["X_pca"], np.float32)
    corrected = np.asarray(harmonypy.run_harmony(pca, adata.obs, "batch", random_state=0).Z_corr)
    return pca, (corrected if corrected.shape[0] == pca.shape[0] else corrected.T).astype(np.float32)


def scib(data: dict, out: dict) -> dict:
    import anndata as ad
    import pandas as pd
    from scib_metrics.benchmark import Benchmarker

    adata = ad.AnnData(np.zeros((data["counts"].shape[0], 1), np.float32),
                       obs=pd.DataFrame({"batch": pd.Categorical(data["batches"].astype(str)),
                                         "label": pd.Categorical(data["labels"].astype(str))}))
    keys = {}
    for i, method in enumerate((*METHODS, "PCA")):
        keys[method] = f"X_{i}"
        adata.obsm[keys[method]] = np.array(out[method], np.float32)  # writable: scib centres in place
    bench = Benchmarker(adata, batch_key="batch", label_key="label", embedding_obsm_keys=[keys[m] for m in METHODS],
                        pre_integrated_embedding_obsm_key=keys["PCA"], n_jobs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    return {method: {str(column): float(table.loc[keys[method], column]) for column in table.columns}
            for method in METHODS}


def missing_purity(x: np.ndarray, labels: np.ndarray, missing: int, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    cells = np.flatnonzero(labels == missing)
    index = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[cells], return_distance=False)[:, 1:]
    return float(np.mean(labels[index] == missing))


def speed(data: dict, n_epochs: int, seed: int, options: dict) -> dict:
    """Seconds per epoch of a compiled run (each fit is run twice; the second is timed)."""
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._integration._adversarial import fit_adversarial_vae
    from diffbio_eqx._integration._mmd_vae import fit_mmd_vae
    from diffbio_eqx._vae._stage import fit_vae

    counts, batches = data["counts"], data["batches"]
    settings = TrainSettings(n_epochs=n_epochs, progress=False, validation_fraction=0.0)
    fits = {"VAE": lambda: fit_vae(_vae(data, seed), counts, batches, key=jr.key(0), settings=settings),
            "MMD": lambda: fit_mmd_vae(_vae(data, seed), counts, batches, key=jr.key(0), settings=settings,
                                       **options["mmd"]),
            "adversarial": lambda: fit_adversarial_vae(_vae(data, seed), counts, batches, key=jr.key(0),
                                                       settings=settings, **options["adversarial"])}
    per_epoch = {}
    for name, run in fits.items():
        run()
        start = time.perf_counter()
        run()
        per_epoch[name] = (time.perf_counter() - start) / n_epochs
    return {"seconds_per_epoch": per_epoch,
            "speed_vs_vae": {name: per_epoch["VAE"] / value for name, value in per_epoch.items()}}


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        scores = results[name]["scib"]
        for method in METHODS:
            ax.scatter(scores[method]["Batch correction"], scores[method]["Bio conservation"], label=method)
        ax.set_xlabel("batch correction")
        ax.set_ylabel("bio conservation")
        ax.set_title(name, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the 3-batch simulation, no pbmc68k")
    parser.add_argument("--sets", nargs="+", choices=("sim3", "sim6", "pbmc"), default=None,
                        help="the data sets to run (default: all three; --quick: sim3)")
    parser.add_argument("--mmd-beta", type=float, default=1.0)
    parser.add_argument("--mmd-on", default="latent")
    parser.add_argument("--adversarial-weight", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "integration.json"))
    arguments = parser.parse_args()
    options = {"mmd": {"beta": arguments.mmd_beta, "mmd_on": arguments.mmd_on},
               "adversarial": {"adversarial_weight": arguments.adversarial_weight}}
    chosen = arguments.sets or (["sim3"] if arguments.quick else ["sim3", "sim6", "pbmc"])
    makers = {"sim3": lambda: simulated(3, arguments.cells, arguments.genes, arguments.seed),
              "sim6": lambda: simulated(6, arguments.cells, arguments.genes, arguments.seed),
              "pbmc": lambda: pbmc(arguments.seed)}
    sets = [makers[name]() for name in chosen]
    results = {}
    for data in sets:
        started = time.perf_counter()
        out, seconds = embeddings(data, arguments.epochs, arguments.seed, options)
        print("  fit seconds", {m: round(s, 1) for m, s in seconds.items()}, flush=True)
        scores = scib(data, out)
        record = {"n_cells": int(data["counts"].shape[0]), "n_genes": int(data["counts"].shape[1]),
                  "batch_sizes": data["batch_sizes"], "fit_seconds": seconds, "scib": scores}
        if data["missing_type"] is not None:
            record["missing_type_purity"] = {m: missing_purity(out[m], data["labels"], data["missing_type"])
                                             for m in METHODS}
        record["seconds"] = time.perf_counter() - started
        results[data["name"]] = record
        print(data["name"], json.dumps({m: {k: round(v, 3) for k, v in s.items() if k in
                                            ("Batch correction", "Bio conservation", "Total")}
                                        for m, s in scores.items()}), flush=True)
        if "missing_type_purity" in record:
            print("  missing-type purity", {m: round(v, 3) for m, v in record["missing_type_purity"].items()})
        _write(arguments, options, results, None)  # after every data set, so a cut-short run keeps what it did
    # Speed on the pipeline's default gene count (2000 genes, 3000 cells): the per-step cost that matters.
    timing = speed(simulated(3, 3000, 2000, arguments.seed), 3, arguments.seed, options)
    print("speed", timing, flush=True)
    _write(arguments, options, results, timing)
    return 0


def _write(arguments: argparse.Namespace, options: dict, results: dict, timing: dict | None) -> None:
    record = {"benchmark": "integration", "settings": vars(arguments) | {"options": options},
              "environment": environment("scanpy", "harmonypy", "scib-metrics"), "results": results,
              "speed": timing}
    with open(arguments.out, "w") as handle:
        json.dump(record, handle, indent=1)
    plot(results, str(arguments.out).replace(".json", ".png"))


if __name__ == "__main__":
    raise SystemExit(main())
