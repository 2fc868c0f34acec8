"""Cell annotation (issue 18): ours against scikit-learn's LogisticRegression (same features), scvi-tools' SCANVI and
CellAssign, and celltypist.annotate; accuracy, macro-F1, time; CellTypist-mode prediction and scANVI training
throughput.

    .venv/bin/python benchmarks/bench_annotation.py [--sim-cells 10000] [--predict-cells 100000,1000000]
        [--scanvi-speed pbmc68k:10,10000:2,100000:2] [--rounds 3] [--torch-threads N] [--scvi] [--skip-accuracy]
        [--out annotation.json]

The speed figures of issue 18 were made with

    .venv/bin/python benchmarks/bench_annotation.py --scvi --skip-accuracy --predict-cells "" \
        --scanvi-speed 100000:1 --rounds 3 --torch-threads 1 --out annotation_scanvi_speed_100k.json
    PYTHONPATH=/tmp/ctlib .venv/bin/python benchmarks/bench_annotation.py --scvi --skip-accuracy \
        --scanvi-speed "" --out annotation_predict_speed.json

References: scvi-tools 1.4.2 and torch (the bench extra) import without flax through
`make_annotation_reference.import_scvi` (scvi-tools 1.4 imports its JAX training plan whenever optax imports, and
that needs flax; `pip install --dry-run flax` would add flax 0.12.8, orbax and tensorstore to .venv without changing
jax, but is not needed). celltypist is not in .venv (it pins nothing we lack, but pulls requests); it is installed
beside it with `pip install --no-deps --target /tmp/ctlib celltypist==1.7.1 && pip install --target /tmp/ctlib
requests` and put on `PYTHONPATH`. `celltypist.train` fails on scikit-learn >= 1.8, so its model is built from our
fitted coefficients and scaler (`celltypist_model`).

Parts:

- `predict_throughput` (per `--predict-cells` size): CellTypist-mode prediction on simulated sparse counts x 2,000
  genes (a 100k-cell simulated block stacked to 1M, memory-mapped), after compilation, plain (CellTypist's default
  `majority_voting=False`) and with majority voting over given over-clusters; with `--scvi` also
  `celltypist.annotate` (scanpy's normalize_total + log1p first, as its input needs) on the same query and model,
  and the agreement of the labels. celltypist densifies the whole query (`(X - mean) / sd` in float64: 1M x 1,971
  genes would be 15.8 GB), so it is only run up to 200,000 cells.
- `scanvi_throughput` (per `--scanvi-speed` DATA:EPOCHS): our scANVI phase and scvi-tools' `SCANVI.train` on the
  same cells (labels of a random half hidden), the same epochs and batch size (128), both from a VAE / SCVI trained
  one epoch, each in its own process, interleaved over `--rounds` (3); ours called twice per process: the first call
  compiles (reported as `seconds_with_compile` and `compile_seconds`), the second is timed after compilation;
  accuracy on the hidden labels beside every time; ratios as median and range (`_common.ratio_summary`); ours in
  equinox's default error mode (`raise`). Each timed call also records its process CPU seconds (all threads;
  `speedup_cpu_seconds`), a figure less at the mercy of the shared machine's load than the wall clock.
  `--torch-threads` sets torch's threads (default: torch's own, as XLA keeps its own); on the loaded 2-core machine
  torch on two threads ran several times slower than on one.
- `pbmc68k`: scanpy's pbmc68k_reduced (700 cells, 765 genes, 10 bulk_labels types), labels of a random half hidden
  (three splits, tests/annotation_markers.py `annotation_split`); CellTypist mode and scikit-learn's
  `OneVsRestClassifier(LogisticRegression(C=1))` on the same features (CellTypist's), scANVI mode (VAE with its
  defaults, then scANVI), CellAssign (markers from tests/annotation_markers.py; accuracy on all cells). With `--scvi`,
  scvi-tools' SCANVI (SCVI defaults then SCANVI) and CellAssign on the same inputs.
- `simulated`: `dbx.simulate_sparse` groups in two batches; batch 0 labelled, batch 1 the query (CellTypist mode and
  scikit-learn).
"""

import argparse
import functools
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

from _common import environment, median  # noqa: E402
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


def celltypist_model(model: "ct.CellTypistModel"):
    """A `celltypist.models.Model` holding our fitted coefficients and scaler (celltypist.train fails on
    scikit-learn >= 1.8): a fitted-state `LogisticRegression` and `StandardScaler`, as `celltypist.train` saves."""
    from celltypist.models import Model
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=1.0)
    clf.coef_ = np.asarray(model.weights, np.float64)
    clf.intercept_ = np.asarray(model.intercept, np.float64)
    clf.classes_ = np.asarray(model.cell_types, dtype=object)
    clf.n_features_in_ = len(model.genes)
    clf.features = np.asarray(model.genes, dtype=object)
    scaler = StandardScaler()
    scaler.mean_ = np.asarray(model.mean, np.float64)
    scaler.scale_ = np.asarray(model.scale, np.float64)
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = len(model.genes)
    return Model(clf, scaler, {"details": "diffbio_eqx coefficients"})


def celltypist_reference(model, query, genes, over_clusters) -> dict:
    """celltypist.annotate on the same query: scanpy's normalize_total(1e4) + log1p (its input), then
    `annotate(majority_voting=False)` and `annotate(majority_voting=True, over_clustering=given)`, timed."""
    import anndata
    import celltypist
    import scanpy as sc

    reference = celltypist_model(model)
    out = {}
    for voting in (False, True):
        start = time.perf_counter()
        adata = anndata.AnnData(X=query.copy())
        adata.var_names = list(genes)
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        result = celltypist.annotate(adata, model=reference, majority_voting=voting,
                                     over_clustering=over_clusters if voting else None)
        labels = result.predicted_labels["majority_voting" if voting else "predicted_labels"].astype(str).to_numpy()
        seconds = time.perf_counter() - start
        out["majority_voting" if voting else "plain"] = {"seconds": round(seconds, 2),
                                                         "cells_per_minute": round(query.shape[0] / seconds * 60)}
        out["labels_majority" if voting else "labels"] = labels
        del adata, result
    return out


@functools.cache
def simulated_block(n_cells: int):
    return dbx.simulate_sparse(jr.key(2), n_cells=n_cells, n_genes=2000, n_groups=10, n_batches=1)


def stacked(block, n_repeats: int):
    """`block` stacked `n_repeats` times as a CSR matrix whose values and column indices are memory-mapped files
    under the system's temporary folder (1M cells x ~490 non-zeros are 3.9 GB: read from the page cache rather than
    held in this process's memory, which the shared machine does not have to spare)."""
    import tempfile

    import scipy.sparse as sp

    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench_annotation_"))
    nnz, n_rows = block.nnz, block.shape[0]
    data = np.memmap(folder / "data.f32", np.float32, "w+", shape=(nnz * n_repeats,))
    indices = np.memmap(folder / "indices.i32", np.int32, "w+", shape=(nnz * n_repeats,))
    for r in range(n_repeats):
        data[r * nnz : (r + 1) * nnz] = block.data
        indices[r * nnz : (r + 1) * nnz] = block.indices
    data.flush()
    indices.flush()
    indptr = np.concatenate([np.asarray(block.indptr[:-1], np.int64) + r * nnz for r in range(n_repeats)]
                            + [np.asarray([nnz * n_repeats], np.int64)])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n_rows * n_repeats, block.shape[1]), copy=False)
    matrix.has_canonical_format = True  # the block's (simulated, sorted, no duplicates)
    return matrix


def predict_throughput(n_cells: int, n_repeats: int, with_celltypist: bool) -> dict:
    """CellTypist-mode prediction on `n_cells` sparse simulated cells x 2,000 genes (a simulated block of
    `n_cells / n_repeats` cells stacked `n_repeats` times, as simulating 1M cells takes long), after compilation:
    plain (CellTypist's default, `majority_voting=False`) and with majority voting over given over-clusters (each
    simulated group cut at random into 30: CellTypist's Leiden over-clustering is not part of prediction speed).
    With `with_celltypist`, celltypist.annotate on the same query and model, and the agreement of the labels."""
    train = dbx.simulate_sparse(jr.key(1), n_cells=2000, n_genes=2000, n_groups=10, n_batches=1)
    genes = [f"g{i}" for i in range(2000)]
    model = ct.train_celltypist(train.counts, [f"type{g}" for g in train.groups], genes)
    block = simulated_block(n_cells // n_repeats)
    query = block.counts if n_repeats == 1 else stacked(block.counts, n_repeats)
    groups = np.tile(np.asarray(block.groups), n_repeats)
    over_clusters = groups * 30 + np.random.default_rng(0).integers(0, 30, len(groups))
    ct.predict_celltypist(model, query[:20_000], genes)  # compile
    run: dict = {"n_cells": n_cells, "n_genes": 2000, "nnz_per_cell": round(query.nnz / n_cells, 1),
                 "model_genes": len(model.genes)}
    start = time.perf_counter()
    prediction = ct.predict_celltypist(model, query, genes)
    ours = np.asarray(model.cell_types)[np.asarray(prediction.labels)]
    seconds = time.perf_counter() - start
    run["ours"] = {"plain": {"seconds": round(seconds, 2), "cells_per_minute": round(n_cells / seconds * 60)}}
    start = time.perf_counter()
    voted = ct.predict_celltypist(model, query, genes, majority_voting=True, over_clustering=over_clusters)
    ours_majority = np.asarray(model.cell_types)[np.asarray(voted.majority)]
    seconds = time.perf_counter() - start
    run["ours"]["majority_voting"] = {"seconds": round(seconds, 2), "cells_per_minute": round(n_cells / seconds * 60)}
    print(json.dumps(run), flush=True)
    if with_celltypist and n_cells <= 200_000:
        theirs = celltypist_reference(model, query, genes, over_clusters)
        run["agreement_with_celltypist"] = float(np.mean(theirs.pop("labels") == ours))
        run["agreement_with_celltypist_majority"] = float(np.mean(theirs.pop("labels_majority") == ours_majority))
        run["celltypist"] = theirs
        run["speedup"] = round(run["ours"]["plain"]["cells_per_minute"] / theirs["plain"]["cells_per_minute"], 2)
    elif with_celltypist:
        run["celltypist"] = f"not run: it densifies the whole query ({n_cells} x {len(model.genes)} float64)"
    print(json.dumps(run), flush=True)
    return run


def scanvi_data(name: str):
    """`(counts, labels)`: pbmc68k_reduced (bulk_labels) or `dbx.simulate_sparse` (2,000 genes, 10 groups)."""
    if name == "pbmc68k":
        adata = dbx.datasets.pbmc68k()
        return adata.X, adata.obs["bulk_labels"].astype(str).to_numpy()
    n_cells = int(name)
    sim = dbx.simulate_sparse(jr.key(3), n_cells=n_cells, n_genes=2000, n_groups=10, n_batches=1)
    return sim.counts, np.asarray([f"type{g}" for g in sim.groups])


def _scanvi_inputs(path: str):
    """`(counts, labels, known, hidden)` from the file `scanvi_speed` wrote: labels of a random half hidden."""
    import scipy.sparse as sp

    stored = np.load(path, allow_pickle=True)
    counts = sp.csr_matrix((stored["data"], stored["indices"], stored["indptr"]), shape=tuple(stored["shape"]))
    labels = stored["labels"]
    known = labels.astype(object).copy()
    hidden = annotation_split(len(labels), 0)
    known[hidden] = None
    return counts, labels, known, hidden


def _run_scanvi_ours(path: str, epochs: int, batch_size: int, queue) -> None:
    """Child process: our VAE trained one epoch, then the scANVI phase twice on the same inputs: the first call
    compiles (`seconds_with_compile`), the second is timed after compilation (`seconds`); accuracy of the second."""
    counts, labels, known, hidden = _scanvi_inputs(path)
    types = sorted(set(labels))
    vae = fit_vae(VAENormalizer(counts.shape[1], key=jr.key(0)), counts, key=jr.key(1),
                  settings=TrainSettings(n_epochs=1, progress=False))
    model = scanvi_from_vae(vae.model, types, key=jr.key(2))
    codes = label_codes(known, types)
    settings = TrainSettings(n_epochs=epochs, batch_size=batch_size, progress=False)
    start = time.perf_counter()
    fit_scanvi(model, counts, None, codes, key=jr.key(3), settings=settings)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    fitted = fit_scanvi(model, counts, None, codes, key=jr.key(4), settings=settings)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    predicted = np.asarray(types)[np.asarray(scanvi_probabilities(fitted.model, counts)).argmax(1)]
    queue.put({"seconds": seconds, "cpu_seconds": cpu_seconds, "seconds_with_compile": first,
               "compile_seconds": first - seconds,
               "accuracy_hidden": float(np.mean(predicted[hidden] == labels[hidden]))})


def _run_scanvi_scvi(path: str, epochs: int, batch_size: int, torch_threads: int | None, queue) -> None:
    """Child process: scvi-tools' `SCVI` trained one epoch, `SCANVI.from_scvi_model`, then `train(max_epochs,
    batch_size)` timed; accuracy of `predict` on the hidden labels."""
    import anndata
    import pandas as pd
    import torch
    from make_annotation_reference import import_scvi

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    scvi = import_scvi()
    scvi.settings.seed = 0
    counts, labels, known, hidden = _scanvi_inputs(path)
    data = anndata.AnnData(X=counts)
    data.obs["labels"] = pd.Categorical([("Unknown" if k is None else k) for k in known])
    scvi.model.SCVI.setup_anndata(data, labels_key="labels")
    vae = scvi.model.SCVI(data)
    vae.train(max_epochs=1, batch_size=batch_size, enable_progress_bar=False)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train(max_epochs=epochs, batch_size=batch_size, enable_progress_bar=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    predicted = np.asarray(model.predict(data))
    queue.put({"seconds": seconds, "cpu_seconds": cpu_seconds, "torch_threads": torch.get_num_threads(),
               "accuracy_hidden": float(np.mean(predicted[hidden] == labels[hidden]))})


def scanvi_speed(name: str, epochs: int, batch_size: int, with_scvi: bool, rounds: int,
                 torch_threads: int | None) -> dict:
    """scANVI training throughput, ours and scvi-tools' SCANVI on the same data (labels of a random half hidden),
    the same epochs and batch size (both holding out 10 % of the cells), each in its own process, interleaved over
    `rounds`: cells/s = training cells seen (cells x epochs) / seconds of the scANVI phase. Ours after compilation
    and with it (a fresh process each round, so the compile is counted every time); ratios as median and range."""
    import tempfile

    import scipy.sparse as sp
    from _common import in_subprocess, ratio_summary

    # Kept under the temporary folder between runs (simulating 100,000 cells takes minutes).
    path = pathlib.Path(tempfile.gettempdir()) / f"bench_annotation_scanvi_{name}.npz"
    if not path.exists():
        counts, labels = scanvi_data(name)
        counts = sp.csr_matrix(counts)
        np.savez(path, data=counts.data, indices=counts.indices, indptr=counts.indptr,
                 shape=np.asarray(counts.shape), labels=labels)
    labels = np.load(path, allow_pickle=True)["labels"]
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(in_subprocess(_run_scanvi_ours, str(path), epochs, batch_size, env={"EQX_ON_ERROR": "raise"}))
        print(json.dumps({"data": name, "ours": ours[-1]}), flush=True)
        if with_scvi:
            theirs.append(in_subprocess(_run_scanvi_scvi, str(path), epochs, batch_size, torch_threads))
            print(json.dumps({"data": name, "scvi_tools_scanvi": theirs[-1]}), flush=True)
    n = len(labels)
    run: dict = {"data": name, "n_cells": n, "epochs": epochs, "batch_size": batch_size, "rounds": rounds,
                 "cells_per_epoch": n, "ours": ours,
                 "ours_median_cells_per_second": median([n * epochs / r["seconds"] for r in ours]),
                 "ours_median_compile_seconds": median([r["compile_seconds"] for r in ours])}
    if with_scvi:
        run["scvi_tools_scanvi"] = theirs
        run["scvi_median_cells_per_second"] = median([n * epochs / r["seconds"] for r in theirs])
        run["speedup_after_compile"] = ratio_summary([r["seconds"] for r in theirs], [r["seconds"] for r in ours])
        run["speedup_cpu_seconds"] = ratio_summary([r["cpu_seconds"] for r in theirs], [r["cpu_seconds"] for r in ours])
        run["speedup_with_compile"] = ratio_summary([r["seconds"] for r in theirs],
                                                    [r["seconds_with_compile"] for r in ours])
        run["accuracy_hidden_minus_scvi"] = median([a["accuracy_hidden"] - b["accuracy_hidden"]
                                                    for a, b in zip(ours, theirs, strict=True)])
    print(json.dumps({k: v for k, v in run.items() if k not in ("ours", "scvi_tools_scanvi")}), flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sim-cells", type=int, default=10_000)
    parser.add_argument("--predict-cells", default="100000,1000000",
                        help="comma-separated query sizes for the prediction throughput ('' to skip)")
    parser.add_argument("--predict-block", type=int, default=100_000, help="simulated cells stacked to that size")
    parser.add_argument("--scanvi-speed", default="pbmc68k:10,10000:2,100000:2",
                        help="comma-separated DATA:EPOCHS for the scANVI throughput ('' to skip)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the scANVI throughput")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of scvi-tools in the scANVI throughput (default: torch's, as XLA's)")
    parser.add_argument("--scvi", action="store_true",
                        help="also run scvi-tools (SCANVI, CellAssign) and celltypist.annotate beside ours")
    parser.add_argument("--skip-pbmc", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the speed parts")
    parser.add_argument("--out", default="annotation.json", help="file name under benchmarks/results/")
    arguments = parser.parse_args()
    result = {"environment": environment("scikit-learn", "scvi-tools", "celltypist", "torch"),
              "command": " ".join(sys.argv)}
    if arguments.predict_cells:
        result["predict_throughput"] = [
            predict_throughput(int(n), max(1, int(n) // arguments.predict_block), arguments.scvi)
            for n in arguments.predict_cells.split(",")]
    if arguments.scanvi_speed:
        result["scanvi_throughput"] = [
            scanvi_speed(item.split(":")[0], int(item.split(":")[1]), 128, arguments.scvi, arguments.rounds,
                         arguments.torch_threads)
            for item in arguments.scanvi_speed.split(",")]
    if not arguments.skip_accuracy:
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
    out = ROOT / "benchmarks" / "results" / arguments.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
