"""What differentiability buys: end-to-end training against stage-wise fitting, on the same data and budget.

Recipes (each on the same cells, the same VAE epochs, the same key):

- (a) `stagewise`: `fit_pipeline` as today (VAE, Harmony when there are batches, Gaussian mixture); held-out
  accuracy by naming each cluster after the majority label of its training cells.
- (b) `e2e_unsupervised`: (a) then `fine_tune_epochs` end to end on VAE loss + clustering compactness.
- (c) `e2e_supervised`: (a) then fine-tuned end to end with the cell-type cross-entropy through
  `cluster_assignments` on the training cells (the other cells labelled -1: they still train the VAE);
  prediction: the argmax of `cluster_assignments` (cluster k = type k).
- (d) `stagewise_logreg`: (a)'s frozen corrected latent + scikit-learn logistic regression on the training cells
  (the fair baseline for (c) and (e)).
- (e) `gated_head`: (a)'s VAE with a hard-concrete soft gene gate in front of the encoder and a linear head on
  the latent, trained together (VAE loss + cross-entropy + L0 penalty); `head` is the same without the gate.

Data: simulated (Splatter-style, sparse DE, two batches, known groups), pbmc68k (scanpy's reduced set, 10
`bulk_labels`, one batch) and the two-real-batch composite of pbmc68k and celltypist's sample
(`sample_cell_by_gene.csv`, 559 cells without labels, 764 shared genes; pass `--celltypist-sample PATH`, or it is
found in an installed `celltypist`). Each dataset over `--splits` random 50/50 label splits.

Scores: held-out accuracy and macro-F1, ARI/NMI of the recipe's partition against the labels (all labelled
cells), scib-metrics bio (mean of `silhouette_label` and `clisi_knn`) and batch (mean of `ilisi_knn` and, where
labelled cells sit in several batches, `silhouette_batch`) on the recipe's embedding, training seconds.

Then the vmapped study: the stage-wise pipeline on the simulated data over Harmony theta x clustering temperature
x 8 seeds in one compiled call, against a Python loop over the same grid.

Run: `python benchmarks/study_end_to_end.py` (writes benchmarks/results/end_to_end.json and end_to_end.md);
`--quick` for a smoke run.
"""

import argparse
import importlib.util
import json
import pathlib
import sys
import time
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scib_metrics
from scib_metrics.nearest_neighbors import NeighborsResults
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, adjusted_rand_score, f1_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

import diffbio_eqx as dbx
from diffbio_eqx._core._train import TrainSettings
from diffbio_eqx._pipeline._supervised import GatedClassifier, fit_gated_classifier
from diffbio_eqx._pipeline._sweep import _sweep_compiled


RESULTS = pathlib.Path(__file__).parent / "results"
RECIPES = ("stagewise", "e2e_unsupervised", "e2e_supervised", "stagewise_logreg", "head", "gated_head")


# ---- data -------------------------------------------------------------------------------------------------------

def simulated(seed: int = 0) -> dict:
    """Six groups with sparse, weak DE (2 % of genes) in two batches, shallow libraries: hard enough that the
    recipes differ."""
    sim = dbx.simulate(jr.key(seed), n_cells=1200, n_genes=500, n_groups=6, n_batches=2, de_prob=0.05,
                       de_fac_loc=0.5, lib_loc=7.0, batch_fac_scale=0.3)
    return {"name": "simulated", "counts": np.asarray(sim.counts, np.float32),
            "batches": np.asarray(sim.batches, np.int32), "labels": np.asarray(sim.groups, np.int32)}


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float32)


def pbmc68k() -> dict:
    adata = dbx.datasets.pbmc68k()
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy().astype(np.int32)
    return {"name": "pbmc68k", "counts": _dense(adata.X),
            "batches": np.zeros(adata.n_obs, np.int32), "labels": labels}


def _celltypist_sample(path: str | None) -> pathlib.Path | None:
    if path is not None:
        return pathlib.Path(path)
    spec = importlib.util.find_spec("celltypist")
    if spec is None or spec.origin is None:
        return None
    found = pathlib.Path(spec.origin).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    return found if found.is_file() else None


def composite(path: pathlib.Path) -> dict:
    """pbmc68k (batch 0, labelled) + celltypist's sample (batch 1, unlabelled: -1) on their shared genes."""
    import pandas as pd

    adata = dbx.datasets.pbmc68k()
    sample = pd.read_csv(path, index_col=0)
    genes = [g for g in adata.var_names if g in set(sample.columns)]
    first = _dense(adata[:, genes].X)
    second = sample[genes].to_numpy(np.float32)
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy().astype(np.int32)
    return {"name": "pbmc68k+celltypist", "counts": np.concatenate([first, second]), "genes": genes,
            "batches": np.repeat(np.array([0, 1], np.int32), [first.shape[0], second.shape[0]]),
            "labels": np.concatenate([labels, np.full(second.shape[0], -1, np.int32)])}


# ---- scores -----------------------------------------------------------------------------------------------------

def _neighbors(x: np.ndarray, k: int = 30) -> NeighborsResults:
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def scib_scores(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict[str, float | None]:
    known = labels >= 0
    x, y = np.asarray(embedding, np.float32), labels
    bio = np.mean([scib_metrics.silhouette_label(x[known], y[known]),
                   scib_metrics.clisi_knn(_neighbors(x[known]), y[known])])
    if np.unique(batches).size < 2:
        return {"scib_bio": float(bio), "scib_batch": None}
    batch = [scib_metrics.ilisi_knn(_neighbors(x), batches)]
    if np.unique(batches[known]).size > 1:
        batch.append(scib_metrics.silhouette_batch(x[known], y[known], batches[known]))
    return {"scib_bio": float(bio), "scib_batch": float(np.mean(batch))}


def scores(predicted: np.ndarray, partition: np.ndarray, embedding: np.ndarray, data: dict, test: np.ndarray,
           seconds: float) -> dict:
    labels, known = data["labels"], data["labels"] >= 0
    return {"accuracy": float(accuracy_score(labels[test], predicted[test])),
            "macro_f1": float(f1_score(labels[test], predicted[test], average="macro")),
            "ari": float(adjusted_rand_score(labels[known], partition[known])),
            "nmi": float(normalized_mutual_info_score(labels[known], partition[known])),
            **scib_scores(embedding, labels, data["batches"]), "seconds": seconds}


def _majority_names(clusters: np.ndarray, labels: np.ndarray, train: np.ndarray, n_clusters: int) -> np.ndarray:
    """Each cluster named after the majority label of its training cells (the overall majority if it has none)."""
    fallback = np.bincount(labels[train]).argmax()
    names = np.full(n_clusters, fallback)
    for k in range(n_clusters):
        here = labels[train & (clusters == k)]
        if here.size:
            names[k] = np.bincount(here).argmax()
    return names[clusters]


# ---- recipes ----------------------------------------------------------------------------------------------------

def _pipeline(data: dict, n_types: int, seed: int) -> dbx.SingleCellPipeline:
    n_batches = int(data["batches"].max()) + 1
    return dbx.create_single_cell_pipeline(
        key=jr.key(seed), n_genes=data["counts"].shape[1], n_clusters=n_types, n_batches=n_batches,
        latent_dim=10, hidden_dims=(128,), batch_correction_clusters=None, enable_ambient_removal=False,
        enable_dim_reduction=False, enable_batch_correction=n_batches > 1)


def run_split(data: dict, split: int, epochs: dict, verbose: bool) -> dict:
    labels, known = data["labels"], data["labels"] >= 0
    n_types = int(labels.max()) + 1
    rng = np.random.default_rng(split)
    train = known & (rng.random(labels.shape[0]) < 0.5)
    test = known & ~train
    inputs = {"counts": data["counts"], "batch_labels": data["batches"]}
    common: dict[str, Any] = dict(vae_epochs=epochs["vae"], progress=False)
    key = jr.key(100 + split)
    results: dict[str, dict] = {}

    def run(pipeline):
        return dbx.run_pipeline(pipeline, inputs, key=jr.key(1))

    started = time.perf_counter()
    base = dbx.fit_pipeline(_pipeline(data, n_types, split), inputs, key=key, **common).pipeline
    base_seconds = time.perf_counter() - started
    out = run(base)
    clusters = np.asarray(out.cluster_assignments).argmax(1)
    corrected = np.asarray(out.corrected_embeddings)
    results["stagewise"] = scores(_majority_names(clusters, labels, train, n_types), clusters, corrected, data, test,
                                  base_seconds)

    started = time.perf_counter()
    regression = LogisticRegression(max_iter=1000).fit(corrected[train], labels[train])
    predicted = regression.predict(corrected)
    results["stagewise_logreg"] = scores(predicted, predicted, corrected, data, test,
                                         base_seconds + time.perf_counter() - started)

    started = time.perf_counter()
    tuned = dbx.fit_pipeline(_pipeline(data, n_types, split), inputs, key=key, fine_tune_epochs=epochs["fine_tune"],
                             **common).pipeline
    seconds = time.perf_counter() - started
    out = run(tuned)
    clusters = np.asarray(out.cluster_assignments).argmax(1)
    results["e2e_unsupervised"] = scores(_majority_names(clusters, labels, train, n_types), clusters,
                                         np.asarray(out.corrected_embeddings), data, test, seconds)

    started = time.perf_counter()
    tuned = dbx.fit_pipeline(_pipeline(data, n_types, split), inputs, key=key, fine_tune_epochs=epochs["fine_tune"],
                             cell_type_labels=np.where(train, labels, -1),
                             fine_tune_weights=dbx.PipelineLossWeights(supervised=epochs["supervised_weight"]),
                             **common).pipeline
    seconds = time.perf_counter() - started
    out = run(tuned)
    clusters = np.asarray(out.cluster_assignments).argmax(1)
    results["e2e_supervised"] = scores(clusters, clusters, np.asarray(out.corrected_embeddings), data, test, seconds)

    for name, gate in (("head", False), ("gated_head", True)):
        started = time.perf_counter()
        model = GatedClassifier(base.vae_normalizer, n_types, key=jr.fold_in(key, 7), gate=gate)
        fitted = fit_gated_classifier(model, data["counts"], data["batches"], np.where(train, labels, -1),
                                      key=jr.fold_in(key, 8),
                                      settings=TrainSettings(n_epochs=epochs["fine_tune"], progress=False),
                                      supervised_weight=epochs["supervised_weight"])
        seconds = base_seconds + time.perf_counter() - started
        model = fitted.model
        latent = model.latent(data["counts"], data["batches"])
        predicted = np.asarray(model.predict(data["counts"], data["batches"]))
        results[name] = scores(predicted, predicted, np.asarray(latent), data, test, seconds)
        if gate:
            results[name]["open_gates"] = int(np.sum(np.asarray(model.gate()) > 0))
    if verbose:
        for name, row in results.items():
            print(f"  {data['name']} split {split} {name:18s} acc {row['accuracy']:.3f} F1 {row['macro_f1']:.3f} "
                  f"ARI {row['ari']:.3f} bio {row['scib_bio']:.3f} {row['seconds']:.1f}s", flush=True)
    return results


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for recipe in RECIPES:
        rows = [run[recipe] for run in runs]
        summary[recipe] = {}
        for metric in rows[0]:
            values = [row[metric] for row in rows if row[metric] is not None]
            summary[recipe][metric] = (None if not values else
                                       {"mean": float(np.mean(values)), "sd": float(np.std(values)), "n": len(values)})
    return summary


# ---- the vmapped study ------------------------------------------------------------------------------------------

def vmapped_study(data: dict, vae_epochs: int, thetas: list[float], temperatures: list[float], n_seeds: int) -> dict:
    """The stage-wise pipeline over theta x temperature x seeds: one compiled, vmapped call against a loop."""
    n_types = int(data["labels"].max()) + 1
    inputs = {"counts": data["counts"], "batch_labels": data["batches"]}
    fitted = dbx.fit_pipeline(_pipeline(data, n_types, 0), inputs, key=jr.key(0), vae_epochs=vae_epochs,
                              progress=False).pipeline
    pipeline = eqx.tree_at(lambda p: p.harmony_reference, fitted, None, is_leaf=lambda node: node is None)
    counts, batches = jnp.asarray(data["counts"]), jnp.asarray(data["batches"])
    profile = jnp.full(counts.shape[1], 1.0 / counts.shape[1], counts.dtype)
    theta, temperature = jnp.asarray(thetas, counts.dtype), jnp.asarray(temperatures, counts.dtype)
    keys = jr.split(jr.key(5), n_seeds)

    @eqx.filter_jit
    def grid(pipeline, keys):
        def one(key):
            out = _sweep_compiled(pipeline, counts, profile, batches, key, theta, temperature)
            probabilities = out.cluster_assignments
            entropy = -jnp.mean(jnp.sum(probabilities * jnp.log(jnp.clip(probabilities, 1e-30)), axis=-1), axis=-1)
            return probabilities.argmax(-1), out.corrected_embeddings, entropy
        return jax.vmap(one)(keys)

    started = time.perf_counter()
    clusters, embeddings, entropy = jax.block_until_ready(grid(pipeline, keys))
    vmapped_first = time.perf_counter() - started
    started = time.perf_counter()
    clusters, embeddings, entropy = jax.block_until_ready(grid(pipeline, keys))
    vmapped = time.perf_counter() - started

    def loop():
        out = []
        for s in range(n_seeds):
            for t in theta:
                for u in temperature:
                    result = _sweep_compiled(pipeline, counts, profile, batches, keys[s], t[None], u[None])
                    out.append(result.cluster_assignments.argmax(-1))
        return jax.block_until_ready(out)

    started = time.perf_counter()
    loop()
    loop_first = time.perf_counter() - started
    started = time.perf_counter()
    loop()
    looped = time.perf_counter() - started
    labels, batches_np = data["labels"], data["batches"]
    # (seeds, theta, temperature, cells, ...)
    clusters, embeddings, entropy = np.asarray(clusters), np.asarray(embeddings), np.asarray(entropy)
    table = []
    for i, t in enumerate(thetas):
        for j, u in enumerate(temperatures):
            ari = [adjusted_rand_score(labels, clusters[s, i, j]) for s in range(n_seeds)]
            nmi = [normalized_mutual_info_score(labels, clusters[s, i, j]) for s in range(n_seeds)]
            ilisi = [scib_metrics.ilisi_knn(_neighbors(embeddings[s, i, j]), batches_np) for s in range(n_seeds)]
            table.append({"theta": t, "temperature": u, "ari_mean": float(np.mean(ari)), "ari_sd": float(np.std(ari)),
                          "nmi_mean": float(np.mean(nmi)), "ilisi_mean": float(np.mean(ilisi)),
                          "ilisi_sd": float(np.std(ilisi)),
                          "assignment_entropy": float(np.mean(entropy[:, i, j]))})
    n_runs = len(thetas) * len(temperatures) * n_seeds
    return {"n_runs": n_runs, "n_cells": int(counts.shape[0]), "device": str(jax.devices()[0]),
            "vmapped_seconds_first_call": vmapped_first, "vmapped_seconds": vmapped,
            "loop_seconds_first_call": loop_first, "loop_seconds": looped, "grid": table}


# ---- table ------------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value['mean']:.3f} ± {value['sd']:.3f}"


def markdown(record: dict) -> str:
    lines = []
    for name, dataset in record["datasets"].items():
        lines += [f"**{name}** ({dataset['n_cells']} cells, {dataset['n_splits']} label splits; mean ± sd over splits)",
                  "", "| recipe | held-out accuracy | macro-F1 | ARI | NMI | scib bio | scib batch | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for recipe in RECIPES:
            row = dataset["summary"][recipe]
            lines.append(f"| {recipe} | " + " | ".join(
                _cell(row[m]) for m in ("accuracy", "macro_f1", "ari", "nmi", "scib_bio", "scib_batch")
            ) + f" | {row['seconds']['mean']:.0f} |")
        lines.append("")
    sweep = record.get("vmapped")
    if sweep:
        lines += [f"**vmapped study** ({sweep['n_runs']} pipeline runs on {sweep['n_cells']} simulated cells, "
                  f"{sweep['device']}): one compiled call {sweep['vmapped_seconds']:.1f} s "
                  f"(first call with compilation {sweep['vmapped_seconds_first_call']:.1f} s) against a Python loop "
                  f"{sweep['loop_seconds']:.1f} s (first {sweep['loop_seconds_first_call']:.1f} s)", "",
                  "| theta | temperature | ARI (mean ± sd over seeds) | NMI | iLISI (mean ± sd) | assignment entropy |",
                  "|---|---|---|---|---|---|"]
        for row in sweep["grid"]:
            lines.append(f"| {row['theta']} | {row['temperature']} | {row['ari_mean']:.3f} ± {row['ari_sd']:.3f} | "
                         f"{row['nmi_mean']:.3f} | {row['ilisi_mean']:.3f} ± {row['ilisi_sd']:.3f} | "
                         f"{row['assignment_entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="End-to-end training against stage-wise fitting.")
    parser.add_argument("--quick", action="store_true", help="smoke run: one split, few epochs, a small grid")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--vae-epochs", type=int, default=100)
    parser.add_argument("--fine-tune-epochs", type=int, default=50)
    parser.add_argument("--supervised-weight", type=float, default=10.0)
    parser.add_argument("--datasets", default="simulated,pbmc68k,composite")
    parser.add_argument("--celltypist-sample", default=None, help="path of celltypist's sample_cell_by_gene.csv")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "end_to_end.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    epochs = {"vae": 10 if args.quick else args.vae_epochs, "fine_tune": 5 if args.quick else args.fine_tune_epochs,
              "supervised_weight": args.supervised_weight}
    n_splits = 1 if args.quick else args.splits
    loaders = {"simulated": simulated, "pbmc68k": pbmc68k}
    sample = _celltypist_sample(args.celltypist_sample)
    if sample is not None:
        loaders["composite"] = lambda: composite(sample)
    wanted = [name for name in args.datasets.split(",") if name in loaders]
    if "composite" in args.datasets and "composite" not in loaders:
        print("composite skipped: celltypist's sample not found (pass --celltypist-sample)", file=sys.stderr)
    started = time.perf_counter()
    record: dict = {"benchmark": "end_to_end", "epochs": epochs, "device": str(jax.devices()[0]), "datasets": {}}
    for name in wanted:
        data = loaders[name]()
        runs = [run_split(data, split, epochs, verbose=True) for split in range(n_splits)]
        record["datasets"][data["name"]] = {"n_cells": int(data["counts"].shape[0]), "n_splits": n_splits,
                                            "summary": summarise(runs), "runs": runs}
    if not args.no_sweep:
        thetas, temperatures, seeds = ([1.0, 2.0], [0.5, 1.0], 2) if args.quick else ([0.5, 1.0, 2.0, 4.0],
                                                                                       [0.5, 1.0, 2.0], 8)
        record["vmapped"] = vmapped_study(simulated(), epochs["vae"], thetas, temperatures, seeds)
    record["seconds_total"] = time.perf_counter() - started
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    table = markdown(record)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"total {record['seconds_total']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
