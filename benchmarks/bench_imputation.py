"""Imputation: our MAGIC against magic-impute (solver="exact", same settings), the VAE's and the masked-gene
transformer's denoised expression, judged by molecular cross-validation; and the transformer's training speed.

Every (dataset, method) pair runs in its own subprocess, so peak memory (VmHWM above the process baseline after
the data are loaded) and time belong to that method alone. Each method denoises the training half of a binomial
molecule split (90 %, Open Problems' split) and is scored against the other half (`molecular_cross_validation`):
Open Problems' normalised MSE, the Poisson loss, Batson's depth-matched MSE, and the untreated baseline's.

- `magic`: `diffbio_eqx.magic` (the data once as a dense float32 device array, scikit-learn's randomized PCA as
  graphtools runs it, blocked exact kNN, sparse operator, cache-sized gene blocks), Open Problems' MAGIC
  preprocessing (unit library size, sqrt; squared and times the library after).
- `magic-impute`: `magic.MAGIC(solver="exact")` 3.0.0, same preprocessing and settings (knn 5, knn_max 15, decay 1,
  t 3, n_pca 100).
- `vae`: `fit_vae` (scVI defaults; epochs for about 200,000 cell visits, 3 to 200) and its expected counts
  (`normalized / target library * library`).
- `transformer`: `fit_masked_gene_transformer` (defaults; epochs for about 100,000 cell visits, 2 to 200),
  `denoise`.

Datasets: `pbmc68k` (700 cells x 765 genes, restored counts), `sim10k` / `sim20k` / `sim50k` (`simulate_sparse`,
2,000 genes, one batch). `--speed`: the transformer's training throughput on 2,000 genes (cells per second over
timed epochs after one compiling epoch). `--rounds N`: the (dataset, method) jobs run N times, interleaved (round 1
of every method, then round 2, ...), each in a fresh process; the record keeps every round and a summary with the
median and range of magic-impute's time over ours (`ratio_summary`), per dataset. Each worker runs under
`--timeout` seconds. `magic` is our MAGIC with its default exact kNN, `magic-ivf` the same with the
inverted-file search (`Magic(knn_method="ivf")`, `ivf_knn`); magic-impute's graphtools runs scikit-learn's
`NearestNeighbors(algorithm="auto")`, brute force on 100 PCs (exact). magic-impute gets `n_jobs=-1` (both
cores, as JAX uses).

`--agreement N`: our MAGIC with the exact kNN against the IVF on N simulated cells (same PCs): the median (and
5th percentile) over genes of the Pearson r between the two imputed matrices, and each side's time.

Run: `python benchmarks/bench_imputation.py [--datasets pbmc68k sim10k] [--methods magic magic-impute vae
transformer] [--rounds 3] [--speed] [--agreement 20000]` (merges into benchmarks/results/imputation.json).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    environment,
    merge_runs,
    peak_since,
    process_peak_bytes,
    ratio_summary,
    reset_peak,
    write_json,
)


RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "imputation.json"
DATASETS = {"pbmc68k": 700, "sim10k": 10_000, "sim20k": 20_000, "sim50k": 50_000}
METHODS = ("magic", "magic-ivf", "magic-impute", "vae", "transformer")
#: Simulated counts are drawn once and kept here (BENCH_IMPUTATION_CACHE overrides).
CACHE = pathlib.Path(os.environ.get("BENCH_IMPUTATION_CACHE", "/tmp/diffbio_bench_imputation"))


def load(dataset: str):
    import jax.random as jr
    import scipy.sparse as sp

    import diffbio_eqx as dx

    if dataset == "pbmc68k":
        from diffbio_eqx.datasets import pbmc68k

        return sp.csr_matrix(pbmc68k().X, dtype=np.float32)
    cached = CACHE / f"{dataset}.npz"
    if cached.is_file():  # the same simulated counts for every worker, drawn once
        return sp.csr_matrix(sp.load_npz(cached), dtype=np.float32)
    sim = dx.simulate_sparse(jr.key(0), n_cells=DATASETS[dataset], n_genes=2000, n_batches=1, lib_loc=7.0)
    counts = sim.counts
    keep = np.asarray(counts.sum(axis=1)).ravel() > 0
    counts = sp.csr_matrix(counts[keep], dtype=np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    sp.save_npz(cached, counts)
    return counts


def magic_impute_denoiser(train):
    import magic

    from diffbio_eqx._imputation._magic import library_size_normalize

    scaled, library = library_size_normalize(train, rescale=None)
    operator = magic.MAGIC(knn=5, knn_max=15, decay=1, t=3, n_pca=100, solver="exact", random_state=0, verbose=0,
                           n_jobs=-1)
    imputed = operator.fit_transform(np.sqrt(scaled.toarray()).astype(np.float64))
    return np.square(imputed) * library[:, None]


def vae_denoiser(train):
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._vae._stage import VAENormalizer, fit_vae, vae_transform

    epochs = int(np.clip(round(200_000 / train.shape[0]), 3, 200))
    model = VAENormalizer(train.shape[1], key=jr.key(0))
    fitted = fit_vae(model, train, key=jr.key(1), settings=TrainSettings(n_epochs=epochs, progress=False))
    out = vae_transform(fitted.model, train)
    target = float(np.asarray(fitted.model.target_library_size))
    return np.asarray(out.normalized) / target * np.asarray(out.library_size)[:, None]


def transformer_denoiser(train):
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._imputation import MaskedGeneTransformer, denoise, fit_masked_gene_transformer

    epochs = int(np.clip(round(100_000 / train.shape[0]), 2, 200))
    model = MaskedGeneTransformer(train.shape[1], key=jr.key(0))
    fitted = fit_masked_gene_transformer(model, train, key=jr.key(1),
                                         settings=TrainSettings(n_epochs=epochs, progress=False))
    return denoise(fitted.model, train)


def worker(dataset: str, method: str, *, scores_too: bool = True, warmup: bool = True) -> dict:
    """One (dataset, method) run. `warmup`: our MAGIC is called once before the timed call (its compiles), and the
    figures are the steady-state call's; without it the timed call includes the compiles. `scores_too`: the
    denoiser runs on the training half and is scored (MCV); without it, it runs on all the counts, timed only."""
    import jax.random as jr

    from diffbio_eqx._imputation import magic_denoiser, molecular_cross_validation
    from diffbio_eqx._imputation._magic import Magic, resolve_knn_method

    counts = load(dataset)
    denoisers = {"magic": magic_denoiser(), "magic-ivf": magic_denoiser(Magic(knn_method="ivf")),
                 "magic-impute": magic_impute_denoiser, "vae": vae_denoiser, "transformer": transformer_denoiser}
    ours = method in ("magic", "magic-ivf")
    timing = {}

    def timed(train):
        if ours and warmup:  # a first call compiles; the figures are a second, steady-state call's
            start, cpu_start = time.perf_counter(), time.process_time()
            denoisers[method](train)
            timing["seconds_first_call"] = time.perf_counter() - start
            timing["cpu_seconds_first_call"] = time.process_time() - cpu_start
        baseline = reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = denoisers[method](train)
        timing["seconds"] = time.perf_counter() - start
        timing["cpu_seconds"] = time.process_time() - cpu_start  # all threads of this process
        timing.update(peak_since(baseline))
        if ours and not warmup:
            timing["seconds_first_call"] = timing["seconds"]
            timing["cpu_seconds_first_call"] = timing["cpu_seconds"]
        return out

    chosen = "ivf" if method == "magic-ivf" else Magic().knn_method
    extra: dict = {"knn_method": resolve_knn_method(chosen, counts.shape[0])} if ours else {}
    extra["warmup"] = warmup and ours
    common = {"dataset": dataset, "method": method, "n_cells": counts.shape[0], "n_genes": counts.shape[1]}
    if not scores_too:
        timed(counts)
        return {**common, "scored": False, "load_average": list(os.getloadavg()), **timing, **extra,
                "process_peak_bytes": process_peak_bytes()}
    scores = molecular_cross_validation(counts, timed, key=jr.key(0))
    return {**common, "load_average": list(os.getloadavg()), **timing, **extra,
            "process_peak_bytes": process_peak_bytes(), "mse": scores.mse, "poisson": scores.poisson,
            "matched_mse": scores.matched_mse,
            "expected_mse": scores.expected_mse, "baseline_mse": scores.baseline_mse,
            "baseline_poisson": scores.baseline_poisson, "baseline_matched_mse": scores.baseline_matched_mse,
            "baseline_expected_mse": scores.baseline_expected_mse}


def agreement(n_cells: int) -> dict:
    """Our MAGIC with the exact kNN and with the IVF on the same simulated cells and PCs: per-gene Pearson r."""
    import jax.random as jr

    import diffbio_eqx as dx
    from diffbio_eqx._imputation._magic import Magic, magic

    counts = dx.simulate_sparse(jr.key(0), n_cells=n_cells, n_genes=2000, n_batches=1, lib_loc=7.0).counts
    counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0]
    pcs = magic(counts, Magic(), genes=[0]).representation  # the same PCs for both searches
    runs = {}
    for method in ("ivf", "exact", "ivf"):  # the first IVF call compiles; the second is timed
        start = time.perf_counter()
        runs[method] = magic(counts, Magic(knn_method=method), representation=pcs)
        seconds = time.perf_counter() - start
        runs[method + "_seconds"] = seconds
    a, b = runs["exact"].imputed.astype(np.float64), runs["ivf"].imputed.astype(np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    varying = ((a * a).sum(0) > 0) & ((b * b).sum(0) > 0)  # genes with no counts stay constant (r undefined)
    a, b = a[:, varying], b[:, varying]
    r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    exact_rows = np.asarray(runs["exact"].operator.tails)
    return {"dataset": f"sim{n_cells // 1000}k", "method": "magic-ivf-vs-exact", "n_cells": int(counts.shape[0]),
            "n_genes": int(counts.shape[1]), "n_genes_varying": int(varying.sum()),
            "median_gene_r": float(np.median(r)),
            "gene_r_5th_percentile": float(np.quantile(r, 0.05)), "min_gene_r": float(np.min(r)),
            "exact_seconds": runs["exact_seconds"], "ivf_seconds": runs["ivf_seconds"],
            "n_edges": int(exact_rows.size), "load_average": list(os.getloadavg())}


def speed(n_cells: int = 4096, n_genes: int = 2000, n_epochs: int = 3) -> dict:
    import jax.random as jr

    import diffbio_eqx as dx
    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._imputation import MaskedGeneTransformer, fit_masked_gene_transformer

    counts = dx.simulate_sparse(jr.key(1), n_cells=n_cells, n_genes=n_genes, n_batches=1).counts
    model = MaskedGeneTransformer(n_genes, key=jr.key(0))
    settings = TrainSettings(n_epochs=1, progress=False)
    fit_masked_gene_transformer(model, counts, key=jr.key(1), settings=settings)  # compiles
    start = time.perf_counter()
    fit_masked_gene_transformer(model, counts, key=jr.key(2), settings=TrainSettings(n_epochs=n_epochs,
                                                                                    progress=False))
    seconds = time.perf_counter() - start
    return {"dataset": f"speed{n_genes}", "method": "transformer-speed", "n_cells": n_cells, "n_genes": n_genes,
            "n_epochs": n_epochs, "seconds": seconds, "cells_per_second": n_cells * n_epochs / seconds,
            "batch_size": 128, "dim": int(model.latents.shape[1]), "n_latents": int(model.latents.shape[0]),
            "load_average": list(os.getloadavg())}


def run_worker(dataset: str, method: str, timeout: float, flags: list[str]) -> dict | None:
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", dataset, method, *flags], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{dataset} {method}: over the {timeout:.0f} s timeout", flush=True)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(f"{dataset} {method}: failed\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def summaries(runs: list[dict]) -> list[dict]:
    """Per dataset and MAGIC of ours (exact or IVF kNN) with interleaved rounds beside magic-impute's: its time
    over ours, median and range, and both peaks."""
    out = []
    for dataset in sorted({r["dataset"] for r in runs if "round" in r}):
        theirs = {r["round"]: r for r in runs
                  if r["dataset"] == dataset and r["method"] == "magic-impute" and "round" in r}
        for method in ("magic", "magic-ivf"):
            ours = {r["round"]: r for r in runs if r["dataset"] == dataset and r["method"] == method and "round" in r}
            rounds = sorted(set(ours) & set(theirs))
            if not rounds:
                continue
            peer = [theirs[i]["seconds"] for i in rounds]
            out.append({"dataset": dataset, "method": f"{method}-vs-magic-impute", "rounds": rounds,
                        "speed_ratio": ratio_summary(peer, [ours[i]["seconds"] for i in rounds]),
                        "speed_ratio_with_compile": ratio_summary(
                            peer, [ours[i]["seconds_first_call"] for i in rounds]),
                        "peak_bytes_ours": [ours[i]["peak_bytes"] for i in rounds],
                        "peak_bytes_theirs": [theirs[i]["peak_bytes"] for i in rounds],
                        "process_peak_bytes_ours": [ours[i].get("process_peak_bytes") for i in rounds],
                        "process_peak_bytes_theirs": [theirs[i].get("process_peak_bytes") for i in rounds]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["pbmc68k", "sim10k"], choices=list(DATASETS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--agreement", type=int, default=0, metavar="N_CELLS")
    parser.add_argument("--no-scores", action="store_true", help="time the denoisers on all counts, no MCV")
    parser.add_argument("--no-warmup", action="store_true", help="time our MAGIC's first call (compiles included)")
    parser.add_argument("--worker", nargs=2, metavar=("DATASET", "METHOD"))
    args = parser.parse_args()
    if args.worker:
        dataset, method = args.worker
        result = speed() if method == "speed" else agreement(int(dataset)) if method == "agreement" else worker(
            dataset, method, scores_too=not args.no_scores, warmup=not args.no_warmup)
        print("RESULT " + json.dumps(result))
        return
    jobs = [(str(args.agreement), "agreement")] if args.agreement else []
    for i in range(args.rounds):
        jobs += [(d, m, i + 1) for d in args.datasets for m in args.methods]  # type: ignore[misc]
    jobs += [("speed", "speed")] if args.speed else []
    runs = []
    for job in jobs:
        flags = (["--no-scores"] if args.no_scores else []) + (["--no-warmup"] if args.no_warmup else [])
        run = run_worker(job[0], job[1], args.timeout, flags)
        if run is None:
            continue
        if args.rounds > 1 and len(job) == 3:
            run["round"] = job[2]
        print(json.dumps(run), flush=True)
        runs.append(run)
        merged = merge_runs(RESULTS, runs, ("dataset", "method", "round"))
        merged = [r for r in merged if not r["method"].endswith("-vs-magic-impute")]
        record = {"environment": environment("magic-impute", "graphtools", "scikit-learn"),
                  "runs": merged + summaries(merged)}
        write_json(RESULTS, record)


if __name__ == "__main__":
    main()
