"""Batch correction beside Harmony (issue 19): the VAE alone, Harmony on its latent, trVAE's MMD, the adversarial
(WGAN-GP) corrector and scanpy's PCA + harmonypy, scored with scib-metrics' Benchmarker.

Data: two Splatter-style simulations (`diffbio_eqx.simulate`: 6 cell types, 3 and 6 batches with unbalanced
sizes, one cell type missing from the last batch) and pbmc68k with a simulated two-batch split
(`datasets.add_simulated_batches`). For each data set and method: every scib metric, the batch-correction and
bio-conservation totals and the total (`get_results(min_max_scale=False)`), the fit time, and for the simulations
the purity of the missing type's neighbourhoods (share of each of its cells' 15 nearest neighbours, in the
embedding, that are of its type). Every trained method runs with each of `--seeds` (training seeds; the data
are fixed by `--data-seed`), and one Benchmarker per data set scores every method and seed at once; the summary
gives mean and sd over the seeds and, per seed, whether each corrector's total beats harmonypy's and its bio
conservation is at least the VAE's (same seed) minus 0.02.

Speed (`--speed`): seconds per epoch of each corrector against the plain VAE on the same data, epochs and batch
size (3,000 cells x 2,000 genes, `--speed-epochs` epochs): after one warm-up (compiling) fit of each, the three
fits are repeated `--speed-repeats` times in turn (VAE, MMD, adversarial, VAE, ...) in one process, and the ratio
is taken within each round; median and range over the rounds. Written to integration_speed.json.

    python benchmarks/bench_integration.py [--cells 1000] [--epochs 60] [--seeds 0 1 2] [--quick] [--no-scib]
    python benchmarks/bench_integration.py --speed --no-scib

Writes benchmarks/results/integration.json and benchmarks/results/integration.png (and integration_speed.json).
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


SEEDED = ("VAE", "Harmony (VAE latent)", "MMD", "adversarial")
CORRECTORS = ("MMD", "adversarial")


def embeddings(data: dict, n_epochs: int, seed: int, options: dict) -> tuple[dict, dict]:
    """The trained methods' embeddings of `data` for one training seed and their fit times (seconds,
    compilation included on the first seed)."""
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


def scib(data: dict, out: dict[str, np.ndarray], pca: np.ndarray) -> dict:
    """scib-metrics' Benchmarker over every embedding in `out` at once (one neighbour graph per embedding, one
    PCA reference), `get_results(min_max_scale=False)`: `{name: {metric: value}}`."""
    import anndata as ad
    import pandas as pd
    from scib_metrics.benchmark import Benchmarker

    adata = ad.AnnData(np.zeros((data["counts"].shape[0], 1), np.float32),
                       obs=pd.DataFrame({"batch": pd.Categorical(data["batches"].astype(str)),
                                         "label": pd.Categorical(data["labels"].astype(str))}))
    keys = {name: f"X_{i}" for i, name in enumerate(out)}
    for name, key in keys.items():
        adata.obsm[key] = np.array(out[name], np.float32)  # writable: scib centres in place
    adata.obsm["X_pca_reference"] = np.array(pca, np.float32)
    bench = Benchmarker(adata, batch_key="batch", label_key="label", embedding_obsm_keys=list(keys.values()),
                        pre_integrated_embedding_obsm_key="X_pca_reference", n_jobs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    return {name: {str(column): float(table.loc[key, column]) for column in table.columns}
            for name, key in keys.items()}


def summarise(scores: dict[str, dict[str, dict]], seeds: list[int]) -> dict:
    """Mean and sd over the seeds of each method's totals, and per seed whether each corrector's total beats
    harmonypy's and its bio conservation is at least the VAE's of the same seed minus 0.02."""
    columns = ("Batch correction", "Bio conservation", "Total")
    harmonypy = scores["harmonypy (PCA)"]
    summary: dict = {"mean_sd": {}, "goals": {}}
    for method in SEEDED:
        values = {c: [scores[method][str(s)][c] for s in seeds] for c in columns}
        summary["mean_sd"][method] = {c: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1
                                          else 0.0} for c, v in values.items()}
    summary["mean_sd"]["harmonypy (PCA)"] = {c: {"mean": harmonypy[c], "sd": 0.0} for c in columns}
    for method in CORRECTORS:
        per_seed = {str(s): {"total_beats_harmonypy": scores[method][str(s)]["Total"] >= harmonypy["Total"],
                             "bio_kept": scores[method][str(s)]["Bio conservation"]
                             >= scores["VAE"][str(s)]["Bio conservation"] - 0.02} for s in seeds}
        summary["goals"][method] = {"per_seed": per_seed,
                                    "every_seed": all(v["total_beats_harmonypy"] and v["bio_kept"]
                                                      for v in per_seed.values())}
    return summary


def missing_purity(x: np.ndarray, labels: np.ndarray, missing: int, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    cells = np.flatnonzero(labels == missing)
    index = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[cells], return_distance=False)[:, 1:]
    return float(np.mean(labels[index] == missing))


def speed(data: dict, n_epochs: int, seed: int, options: dict, repeats: int) -> dict:
    """Seconds per epoch of the plain VAE, MMD and adversarial fits on the same data, epochs and batch size: one
    warm-up (compiling) fit each, then `repeats` rounds of the three in turn; the ratio to the VAE is taken within
    each round (adjacent runs see about the same machine load). Wall time and this process's CPU time (all its
    threads: less sensitive to other processes on a shared machine) are both recorded."""
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._integration._adversarial import fit_adversarial_vae
    from diffbio_eqx._integration._mmd_vae import fit_mmd_vae
    from diffbio_eqx._vae._stage import fit_vae

    counts, batches = data["counts"], data["batches"]
    settings = TrainSettings(n_epochs=n_epochs, batch_size=128, progress=False, validation_fraction=0.0)
    fits = {"VAE": lambda: fit_vae(_vae(data, seed), counts, batches, key=jr.key(0), settings=settings),
            "MMD": lambda: fit_mmd_vae(_vae(data, seed), counts, batches, key=jr.key(0), settings=settings,
                                       **options["mmd"]),
            "adversarial": lambda: fit_adversarial_vae(_vae(data, seed), counts, batches, key=jr.key(0),
                                                       settings=settings, **options["adversarial"])}
    for run in fits.values():
        run()
    per_epoch: dict[str, list[float]] = {name: [] for name in fits}
    cpu_per_epoch: dict[str, list[float]] = {name: [] for name in fits}
    for _ in range(repeats):
        for name, run in fits.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            per_epoch[name].append((time.perf_counter() - start) / n_epochs)
            cpu_per_epoch[name].append((time.process_time() - cpu_start) / n_epochs)

    def ratios(seconds: dict[str, list[float]]) -> dict:
        out = {}
        for name, times in seconds.items():
            if name != "VAE":
                r = [v / t for v, t in zip(seconds["VAE"], times)]
                out[name] = {"median": float(np.median(r)), "min": float(np.min(r)), "max": float(np.max(r)),
                             "per_round": r}
        return out

    wall, cpu = ratios(per_epoch), ratios(cpu_per_epoch)
    return {"seconds_per_epoch": per_epoch, "cpu_seconds_per_epoch": cpu_per_epoch,
            "speed_vs_vae": wall, "cpu_speed_vs_vae": cpu,
            "goal_0.7x_met_by_median": {name: bool(r["median"] >= 0.7) for name, r in wall.items()},
            "goal_0.7x_met_by_cpu_median": {name: bool(r["median"] >= 0.7) for name, r in cpu.items()}}


def plot(results: dict, path) -> None:
    """Bio conservation against batch correction: one point per method and seed (seeded methods), data sets side
    by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        scores = results[name]["scib"]
        for i, method in enumerate(METHODS):
            runs = list(scores[method].values()) if method in SEEDED else [scores[method]]
            ax.scatter([r["Batch correction"] for r in runs], [r["Bio conservation"] for r in runs],
                       label=method, color=f"C{i}", alpha=0.8)
        ax.set_xlabel("batch correction")
        ax.set_ylabel("bio conservation")
        ax.set_title(f"{name} ({len(results[name]['seeds'])} seeds)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the 3-batch simulation, no pbmc68k")
    parser.add_argument("--sets", nargs="+", choices=("sim3", "sim6", "pbmc"), default=None,
                        help="the data sets to run (default: all three; --quick: sim3)")
    parser.add_argument("--no-scib", action="store_true", help="skip the scib runs (e.g. with --speed)")
    parser.add_argument("--speed", action="store_true", help="the interleaved speed measurement")
    parser.add_argument("--speed-epochs", type=int, default=8)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--mmd-beta", type=float, default=1.0)
    parser.add_argument("--mmd-on", default="latent")
    parser.add_argument("--adversarial-weight", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "integration.json"))
    arguments = parser.parse_args()
    options = {"mmd": {"beta": arguments.mmd_beta, "mmd_on": arguments.mmd_on},
               "adversarial": {"adversarial_weight": arguments.adversarial_weight}}
    chosen = arguments.sets or (["sim3"] if arguments.quick else ["sim3", "sim6", "pbmc"])
    makers = {"sim3": lambda: simulated(3, arguments.cells, arguments.genes, arguments.data_seed),
              "sim6": lambda: simulated(6, arguments.cells, arguments.genes, arguments.data_seed),
              "pbmc": lambda: pbmc(arguments.data_seed)}
    results = {}
    for name in [] if arguments.no_scib else chosen:
        data = makers[name]()
        started = time.perf_counter()
        pca, corrected = _harmonypy(data["counts"], data["batches"])
        out = {"harmonypy (PCA)": corrected}
        fit_seconds: dict = {"harmonypy (PCA)": time.perf_counter() - started}
        for seed in arguments.seeds:
            seeded, seconds = embeddings(data, arguments.epochs, seed, options)
            print(f"  {data['name']} seed {seed} fit seconds", {m: round(s, 1) for m, s in seconds.items()},
                  flush=True)
            out.update({f"{method} | seed {seed}": x for method, x in seeded.items()})
            for method, value in seconds.items():
                fit_seconds.setdefault(method, {})[str(seed)] = value
        flat = scib(data, out, pca)
        scores = {"harmonypy (PCA)": flat["harmonypy (PCA)"]}
        for method in SEEDED:
            scores[method] = {str(s): flat[f"{method} | seed {s}"] for s in arguments.seeds}
        record = {"n_cells": int(data["counts"].shape[0]), "n_genes": int(data["counts"].shape[1]),
                  "batch_sizes": data["batch_sizes"], "seeds": list(arguments.seeds), "fit_seconds": fit_seconds,
                  "scib": scores, "summary": summarise(scores, arguments.seeds)}
        if data["missing_type"] is not None:
            purity = {name: missing_purity(x, data["labels"], data["missing_type"]) for name, x in out.items()}
            record["missing_type_purity"] = {"harmonypy (PCA)": purity["harmonypy (PCA)"]} | {
                method: {str(s): purity[f"{method} | seed {s}"] for s in arguments.seeds} for method in SEEDED}
        record["seconds"] = time.perf_counter() - started
        results[data["name"]] = record
        print(data["name"], json.dumps({m: {c: f"{v['mean']:.3f} +- {v['sd']:.3f}" for c, v in cols.items()}
                                        for m, cols in record["summary"]["mean_sd"].items()}), flush=True)
        print("  goals", json.dumps({m: g["every_seed"] for m, g in record["summary"]["goals"].items()}),
              flush=True)
        _write(arguments, options, results)  # after every data set, so a cut-short run keeps what it did
    if arguments.speed:
        # The pipeline's default gene count (2000 genes, 3000 cells): the per-step cost that matters.
        timing = speed(simulated(3, 3000, 2000, arguments.data_seed), arguments.speed_epochs, 0, options,
                       arguments.speed_repeats)
        print("speed", json.dumps(timing["speed_vs_vae"]), flush=True)
        record = {"benchmark": "integration speed",
                  "data": "simulated 3 batches, 3000 cells x 2000 genes (bench_integration.simulated), batch size 128",
                  "method": speed.__doc__, "settings": vars(arguments),
                  "environment": environment(), **timing}
        with open(str(arguments.out).replace(".json", "_speed.json"), "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


def _write(arguments: argparse.Namespace, options: dict, results: dict) -> None:
    record = {"benchmark": "integration", "settings": vars(arguments) | {"options": options},
              "environment": environment("scanpy", "harmonypy", "scib-metrics"), "results": results}
    with open(arguments.out, "w") as handle:
        json.dump(record, handle, indent=1)
    plot(results, str(arguments.out).replace(".json", ".png"))


if __name__ == "__main__":
    raise SystemExit(main())
