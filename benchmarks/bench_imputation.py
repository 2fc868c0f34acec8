"""Imputation: our MAGIC against magic-impute (solver="exact", same settings), the VAE's and the masked-gene
transformer's denoised expression, judged by molecular cross-validation; and the transformer's training speed.

Every (dataset, method) pair runs in its own subprocess, so peak memory (VmHWM above the process baseline after
the data are loaded) and time belong to that method alone. Each method denoises the training half of a binomial
molecule split (90 %, Open Problems' split) and is scored against the other half (`molecular_cross_validation`):
Open Problems' normalised MSE, the Poisson loss, Batson's depth-matched MSE, and the untreated baseline's.

- `magic`: `diffbio_eqx.magic` (exact PCA, blocked exact kNN, sparse operator, gene blocks), Open Problems' MAGIC
  preprocessing (unit library size, sqrt; squared and times the library after).
- `magic-impute`: `magic.MAGIC(solver="exact")` 3.0.0, same preprocessing and settings (knn 5, knn_max 15, decay 1,
  t 3, n_pca 100).
- `vae`: `fit_vae` (scVI defaults; epochs for about 200,000 cell visits, 3 to 200) and its expected counts
  (`normalized / target library * library`).
- `transformer`: `fit_masked_gene_transformer` (defaults; epochs for about 100,000 cell visits, 2 to 200),
  `denoise`.

Datasets: `pbmc68k` (700 cells x 765 genes, restored counts), `sim10k` / `sim50k` (`simulate_sparse`, 2,000 genes,
one batch). `--speed`: the transformer's training throughput on 2,000 genes (cells per second over timed epochs
after one compiling epoch).

Run: `python benchmarks/bench_imputation.py [--datasets pbmc68k sim10k] [--methods magic magic-impute vae
transformer] [--speed]` (merges into benchmarks/results/imputation.json).
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

from _common import environment, merge_runs, peak_since, reset_peak, write_json  # noqa: E402


RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "imputation.json"
DATASETS = {"pbmc68k": 700, "sim10k": 10_000, "sim50k": 50_000}
METHODS = ("magic", "magic-impute", "vae", "transformer")


def load(dataset: str):
    import jax.random as jr
    import scipy.sparse as sp

    import diffbio_eqx as dx

    if dataset == "pbmc68k":
        from diffbio_eqx.datasets import pbmc68k

        return sp.csr_matrix(pbmc68k().X, dtype=np.float32)
    sim = dx.simulate_sparse(jr.key(0), n_cells=DATASETS[dataset], n_genes=2000, n_batches=1, lib_loc=7.0)
    counts = sim.counts
    keep = np.asarray(counts.sum(axis=1)).ravel() > 0
    return sp.csr_matrix(counts[keep], dtype=np.float32)


def magic_impute_denoiser(train):
    import magic

    from diffbio_eqx._imputation._magic import library_size_normalize

    scaled, library = library_size_normalize(train, rescale=None)
    operator = magic.MAGIC(knn=5, knn_max=15, decay=1, t=3, n_pca=100, solver="exact", random_state=0, verbose=0)
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


def worker(dataset: str, method: str) -> dict:
    import jax.random as jr

    from diffbio_eqx._imputation import magic_denoiser, molecular_cross_validation

    counts = load(dataset)
    denoisers = {"magic": magic_denoiser(), "magic-impute": magic_impute_denoiser, "vae": vae_denoiser,
                 "transformer": transformer_denoiser}
    timing = {}

    def timed(train):
        if method == "magic":  # a first call compiles; the figures are a second, steady-state call's
            start = time.perf_counter()
            denoisers[method](train)
            timing["seconds_first_call"] = time.perf_counter() - start
        baseline = reset_peak()
        start = time.perf_counter()
        out = denoisers[method](train)
        timing["seconds"] = time.perf_counter() - start
        timing.update(peak_since(baseline))
        return out

    scores = molecular_cross_validation(counts, timed, key=jr.key(0))
    return {"dataset": dataset, "method": method, "n_cells": counts.shape[0], "n_genes": counts.shape[1],
            "load_average": list(os.getloadavg()), **timing,
            "mse": scores.mse, "poisson": scores.poisson, "matched_mse": scores.matched_mse,
            "baseline_mse": scores.baseline_mse, "baseline_poisson": scores.baseline_poisson,
            "baseline_matched_mse": scores.baseline_matched_mse}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["pbmc68k", "sim10k"], choices=list(DATASETS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("DATASET", "METHOD"))
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(speed() if args.worker[1] == "speed" else worker(*args.worker)))
        return
    jobs = [(d, m) for d in args.datasets for m in args.methods] + ([("speed", "speed")] if args.speed else [])
    runs = []
    for dataset, method in jobs:
        done = subprocess.run([sys.executable, __file__, "--worker", dataset, method], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{dataset} {method}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        run = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps(run), flush=True)
        runs.append(run)
        record = {"environment": environment("magic-impute", "graphtools", "scikit-learn"),
                  "runs": merge_runs(RESULTS, runs, ("dataset", "method"))}
        write_json(RESULTS, record)


if __name__ == "__main__":
    main()
