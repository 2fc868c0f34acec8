"""Cell annotation (issue 18): ours against scikit-learn's LogisticRegression (same features) and scvi-tools'
SCANVI and CellAssign; accuracy, macro-F1, time; CellTypist-mode prediction throughput.

    .venv/bin/python benchmarks/bench_annotation.py [--sim-cells 10000] [--predict-cells 200000] [--scvi]

Writes benchmarks/results/annotation.json. Parts:

- `pbmc68k`: scanpy's pbmc68k_reduced (700 cells, 765 genes, 10 bulk_labels types), labels of a random half hidden
  (three splits, tests/annotation_markers.py `annotation_split`); CellTypist mode and scikit-learn's
  `OneVsRestClassifier(LogisticRegression(C=1))` on the same features (CellTypist's), scANVI mode (VAE with its
  defaults, then scANVI), CellAssign (markers from tests/annotation_markers.py; accuracy on all cells). With `--scvi`,
  scvi-tools' SCANVI (SCVI defaults then SCANVI) and CellAssign on the same inputs.
- `simulated`: `dbx.simulate_sparse` groups in two batches; batch 0 labelled, batch 1 the query (CellTypist mode and
  scikit-learn).
- `predict_throughput`: CellTypist-mode prediction on `--predict-cells` simulated cells x 2,000 genes (sparse),
  cells per minute, after compilation.
"""

import argparse
import json
import pathlib
import sys
import time

import jax.random as jr
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import environment  # noqa: E402
from annotation_markers import PBMC68K_MARKERS, annotation_split, marker_matrix  # noqa: E402

import diffbio_eqx as dbx  # noqa: E402
from diffbio_eqx._annotation import _celltypist as ct  # noqa: E402
from diffbio_eqx._annotation._cellassign import (  # noqa: E402
    cellassign_data,
    cellassign_probabilities,
    fit_cellassign,
    init_cellassign,
)
from diffbio_eqx._annotation._scanvi import (  # noqa: E402
    fit_scanvi,
    label_codes,
    scanvi_from_vae,
    scanvi_probabilities,
)
from diffbio_eqx._core._train import TrainSettings  # noqa: E402
from diffbio_eqx._vae._stage import VAENormalizer, fit_vae  # noqa: E402


QUIET = TrainSettings(progress=False)


def scores(truth: np.ndarray, predicted: np.ndarray, seconds: float) -> dict[str, float]:
    return {"accuracy": float(np.mean(truth == predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro")), "seconds": round(seconds, 2)}


def features(train, test):
    """CellTypist's features with NumPy (log1p per 10k, expressed genes, scaled, clipped at 10)."""
    x, xt = (ct._host_log_normalized(c) for c in (train, test))
    keep = np.count_nonzero(x, axis=0) > 0
    x, xt = x[:, keep], xt[:, keep]
    mean, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1
    return np.minimum((x - mean) / sd, 10), np.minimum((xt - mean) / sd, 10)


def celltypist_vs_sklearn(counts, labels, genes, train, test) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    model = ct.train_celltypist(counts[train], labels[train], genes)
    ours = np.asarray(model.cell_types)[np.asarray(ct.predict_celltypist(model, counts[test], genes).labels)]
    ours_time = time.perf_counter() - start
    start = time.perf_counter()
    x, xt = features(counts[train], counts[test])
    theirs = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000)).fit(x, labels[train]).predict(xt)
    return {"celltypist_mode": scores(labels[test], ours, ours_time),
            "sklearn_logistic_regression": scores(labels[test], theirs, time.perf_counter() - start)}


def scanvi_ours(counts, labels, hidden, seed) -> dict[str, float]:
    types = sorted(set(labels))
    start = time.perf_counter()
    vae = fit_vae(VAENormalizer(counts.shape[1], key=jr.key(seed)), counts, key=jr.key(seed + 1), settings=QUIET)
    known = labels.astype(object).copy()
    known[hidden] = None
    fitted = fit_scanvi(scanvi_from_vae(vae.model, types, key=jr.key(seed + 2)), counts, None,
                        label_codes(known, types), key=jr.key(seed + 3), settings=QUIET)
    predicted = np.asarray(types)[np.asarray(scanvi_probabilities(fitted.model, counts)).argmax(1)]
    return scores(labels[hidden], predicted[hidden], time.perf_counter() - start)


def cellassign_ours(counts, labels, genes, seed) -> dict[str, float]:
    start = time.perf_counter()
    data = cellassign_data(counts, genes, marker_matrix(PBMC68K_MARKERS))
    fitted = fit_cellassign(init_cellassign(data, key=jr.key(seed)), data, key=jr.key(seed + 10), settings=QUIET)
    predicted = np.asarray(data.cell_types)[np.asarray(cellassign_probabilities(fitted.model, data)).argmax(1)]
    return scores(labels, predicted, time.perf_counter() - start)


def scvi_tools(adata, labels, hidden, seed) -> dict[str, dict[str, float]]:
    from make_annotation_reference import cellassign, scanvi_accuracy

    start = time.perf_counter()
    accuracy = scanvi_accuracy(adata, hidden, seed)
    scanvi = {"accuracy": accuracy, "seconds": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    accuracy, _ = cellassign(adata, seed)
    return {"scvi_tools_scanvi": scanvi,
            "scvi_tools_cellassign": {"accuracy": accuracy, "seconds": round(time.perf_counter() - start, 2)}}


def pbmc68k(with_scvi: bool) -> list[dict]:
    adata = dbx.datasets.pbmc68k()
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    runs = []
    for seed in range(3):
        hidden = annotation_split(adata.n_obs, seed)
        known = np.setdiff1d(np.arange(adata.n_obs), hidden)
        run = {"split": seed, **celltypist_vs_sklearn(adata.X, labels, adata.var_names, known, hidden)}
        run["scanvi_mode"] = scanvi_ours(adata.X, labels, hidden, seed)
        run["cellassign_mode_all_cells"] = cellassign_ours(adata.X, labels, adata.var_names, seed)
        if with_scvi:
            run.update(scvi_tools(adata, labels, hidden, seed))
        print(json.dumps(run), flush=True)
        runs.append(run)
    return runs


def simulated(n_cells: int) -> dict:
    sim = dbx.simulate_sparse(jr.key(0), n_cells=n_cells, n_genes=2000, n_groups=10, n_batches=2)
    labels = np.asarray([f"type{g}" for g in sim.groups])
    genes = [f"g{i}" for i in range(2000)]
    train, test = np.flatnonzero(sim.batches == 0), np.flatnonzero(sim.batches == 1)
    run = {"n_cells": n_cells, **celltypist_vs_sklearn(sim.counts, labels, genes, train, test)}
    print(json.dumps(run), flush=True)
    return run


def predict_throughput(n_cells: int) -> dict:
    train = dbx.simulate_sparse(jr.key(1), n_cells=2000, n_genes=2000, n_groups=10, n_batches=1)
    genes = [f"g{i}" for i in range(2000)]
    model = ct.train_celltypist(train.counts, [f"type{g}" for g in train.groups], genes)
    query = dbx.simulate_sparse(jr.key(2), n_cells=n_cells, n_genes=2000, n_groups=10, n_batches=1).counts
    ct.predict_celltypist(model, query[:20_000], genes)  # compile
    start = time.perf_counter()
    prediction = ct.predict_celltypist(model, query, genes, chunk_size=20_000)
    np.asarray(prediction.labels)
    seconds = time.perf_counter() - start
    run = {"n_cells": n_cells, "n_genes": 2000, "seconds": round(seconds, 2),
           "cells_per_minute": round(n_cells / seconds * 60)}
    print(json.dumps(run), flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sim-cells", type=int, default=10_000)
    parser.add_argument("--predict-cells", type=int, default=200_000)
    parser.add_argument("--scvi", action="store_true", help="also run scvi-tools' SCANVI and CellAssign")
    parser.add_argument("--skip-pbmc", action="store_true")
    arguments = parser.parse_args()
    result = {"environment": environment("scikit-learn", "scvi-tools"), "command": " ".join(sys.argv)}
    result["predict_throughput"] = predict_throughput(arguments.predict_cells)
    result["simulated"] = simulated(arguments.sim_cells)
    if not arguments.skip_pbmc:
        result["pbmc68k"] = pbmc68k(arguments.scvi)
    reference = ROOT / "tests" / "data" / "annotation_reference.npz"
    if reference.exists():
        stored = np.load(reference)
        result["scvi_tools_reference_pbmc68k"] = {
            "scanvi_accuracy": stored["scanvi_accuracy"].tolist(),
            "cellassign_accuracy": stored["cellassign_accuracy"].tolist(),
            "made_by": "benchmarks/make_annotation_reference.py (scvi-tools defaults)"}
    out = ROOT / "benchmarks" / "results" / "annotation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
