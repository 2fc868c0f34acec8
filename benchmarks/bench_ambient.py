"""Ambient RNA removal: diffbio_eqx's `AmbientRemoval` against CellBender (`remove-background --model ambient`).

Both run on the same simulated droplets: cells from `diffbio_eqx.simulate` at a known contamination level
(CellBender's model: about the same number of ambient molecules in every droplet), with each group's markers
absent from the other groups (so the ambient RNA carries genes those groups lack), plus as many empty droplets
holding ambient RNA only (the simulator's `n_empty_droplets`). Both take the ambient profile and the ambient
amount from the empty droplets.

Like for like: CellBender is timed end to end (its process, at `CELLBENDER_EPOCHS`), and so is ours at the same
epochs from a cold start (compile included: `end_to_end_s_at_cellbender_epochs`); our steady per-epoch throughput
at our default epochs is reported beside it, labelled as such. The process runs in equinox's default error mode
unless `EQX_ON_ERROR` says otherwise.

Recorded run: see benchmarks/results/ambient.json (figures quoted in README's Performance section).

Run: `python benchmarks/bench_ambient.py [--no-cellbender] [--cells N ...]` (writes
benchmarks/results/ambient.json).
"""

import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import timeit

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import diffbio_eqx as dx  # noqa: E402
from diffbio_eqx._ambient._stage import ambient_default_epochs  # noqa: E402


N_GENES, N_GROUPS, LEVEL = 300, 4, 0.1
# CellBender runs ~15-30 s per epoch on 1 000-2 000 droplets on the shared 2-core CPU, so its 150 default epochs
# would take about an hour here; it gets fewer (its per-epoch speed is reported, and its accuracy is at these
# epochs). diffbio_eqx uses its default (`ambient_default_epochs`: 150 epochs, up to 300 below 1,400 cells).
CELLBENDER_EPOCHS = 50


def make_droplets(n_cells: int, n_empty: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    sim = dx.simulate(
        jr.key(seed), n_cells=n_cells, n_genes=N_GENES, n_groups=N_GROUPS, contamination=LEVEL,
        de_prob=0.2, de_fac_loc=1.0, n_empty_droplets=n_empty,
    )
    de = np.asarray(sim.de_factors)
    groups = np.asarray(sim.groups)
    only_here = (de > 1.0) & (np.sum(de != 1.0, axis=0, keepdims=True) == 1)
    marker_of = np.where(only_here.any(axis=0), only_here.argmax(axis=0), -1)
    present = (marker_of[None, :] == -1) | (marker_of[None, :] == np.arange(N_GROUPS)[:, None])
    true = np.asarray(sim.true_counts) * present[groups]
    ambient = np.asarray(sim.ambient_counts)
    counts = true + ambient
    empties = np.asarray(sim.empty_counts)
    return {
        "counts": counts.astype(np.float32), "true": true, "fraction": ambient.sum(1) / counts.sum(1),
        "profile": np.asarray(sim.ambient_profile), "absent": ~present[groups],
        "raw": np.concatenate([counts, empties]).astype(np.float32),
    }


def metrics(data: dict[str, np.ndarray], cells: np.ndarray, fraction: np.ndarray) -> dict[str, float]:
    counts, true, absent = data["counts"], data["true"], data["absent"]
    return {
        "fraction_correlation": float(np.corrcoef(fraction, data["fraction"])[0, 1]),
        "fraction_mae": float(np.mean(np.abs(fraction - data["fraction"]))),
        "mse_ratio": float(np.mean((cells - true) ** 2) / np.mean((counts - true) ** 2)),
        "l1_ratio": float(np.abs(cells - true).sum() / np.abs(counts - true).sum()),
        "absent_gene_kept": float((cells * absent).sum() / (counts * absent).sum()),
        "removed_share": float(1.0 - cells.sum() / counts.sum()),
    }


def run_diffbio(data: dict[str, np.ndarray]) -> dict[str, float]:
    n = data["counts"].shape[0]
    stage = dx.AmbientRemoval(N_GENES, dtype=jnp.float32, key=jr.key(1))
    profile = dx.estimate_ambient_profile(data["raw"])

    def train(n_epochs):
        start = time.perf_counter()
        result = dx.fit_ambient_removal(stage, data["counts"], profile, raw_counts=data["raw"], key=jr.key(2),
                                        settings=dx.TrainSettings(n_epochs=n_epochs, progress=False))
        jax.block_until_ready(result.model)
        return result, time.perf_counter() - start

    n_epochs = ambient_default_epochs(n)
    # Cold, as CellBender is timed: CellBender's epochs from the first call, compile included.
    _, cold = train(CELLBENDER_EPOCHS)
    _, one = train(1)  # warm: one epoch and the per-call overhead
    result, full = train(n_epochs)  # warm: the default number of epochs
    per_epoch = (full - one) / (n_epochs - 1)
    infer = lambda: jax.block_until_ready(dx.remove_ambient(result.model, data["counts"], profile))
    start = time.perf_counter()
    out = infer()
    first_call = time.perf_counter() - start
    infer_s = min(timeit.repeat(infer, number=1, repeat=5))
    return {
        "n_epochs": n_epochs,
        "train_s": full,
        "train_compile_s": max(cold - one - per_epoch * (CELLBENDER_EPOCHS - 1), 0.0),
        "end_to_end_s_at_cellbender_epochs": cold,
        "error_mode": os.environ.get("EQX_ON_ERROR", "raise"),
        "train_cells_per_s": n / per_epoch,
        "infer_s": infer_s,
        "infer_compile_s": first_call - infer_s,
        "infer_cells_per_s": n / infer_s,
        **metrics(data, np.asarray(out.decontaminated_counts), np.asarray(out.contamination_fraction)),
    }


def run_cellbender(data: dict[str, np.ndarray]) -> dict[str, object]:
    exe = shutil.which("cellbender") or str(pathlib.Path(sys.executable).parent / "cellbender")
    if not pathlib.Path(exe).exists():
        return {"status": "not installed (pip install cellbender)"}
    import anndata
    import scipy.sparse as sp
    from cellbender.remove_background.downstream import anndata_from_h5

    n = data["counts"].shape[0]
    n_raw = data["raw"].shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        raw = anndata.AnnData(sp.csr_matrix(data["raw"]))
        raw.obs_names = [f"bc{i}" for i in range(n_raw)]
        raw.var_names = [f"gene{i}" for i in range(N_GENES)]
        raw.var["gene_ids"] = raw.var_names.to_numpy()
        raw.var["feature_types"] = "Gene Expression"
        raw.write_h5ad(f"{tmp}/raw.h5ad")
        command = [
            exe, "remove-background", "--input", f"{tmp}/raw.h5ad", "--output", f"{tmp}/out.h5",
            "--model", "ambient", "--epochs", str(CELLBENDER_EPOCHS), "--expected-cells", str(n),
            "--total-droplets-included", str(n + (n_raw - n) // 2), "--cpu-threads", "2",
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return {"status": "timed out after 1200 s", "epochs": CELLBENDER_EPOCHS}
        seconds = time.perf_counter() - start
        log = pathlib.Path(f"{tmp}/out.log").read_text() if pathlib.Path(f"{tmp}/out.log").exists() else ""
        if proc.returncode != 0:
            return {"status": f"failed (exit {proc.returncode})", "stderr_tail": proc.stderr[-2000:]}
        out = anndata_from_h5(f"{tmp}/out.h5")
    index = {name: i for i, name in enumerate(out.obs_names)}
    rows = [index.get(f"bc{i}") for i in range(n)]
    found = np.array([r is not None for r in rows])
    cells = np.zeros_like(data["counts"])
    matrix = out.X.tocsr() if sp.issparse(out.X) else sp.csr_matrix(out.X)
    cells[found] = matrix[[r for r in rows if r is not None]].toarray()
    counts = data["counts"]
    fraction = 1.0 - cells.sum(1) / counts.sum(1)
    return {
        "status": "ok",
        "epochs": CELLBENDER_EPOCHS,
        "total_s": seconds,
        "droplets_per_s_per_epoch": n_raw * CELLBENDER_EPOCHS / seconds,
        "cells_per_s_end_to_end": n / seconds,
        "cells_reported": int(found.sum()),
        **metrics(data, cells, fraction),
        "log_tail": log[-1500:],
    }


def main(out_dir: str | os.PathLike[str] = pathlib.Path(__file__).parent / "results",
         sizes: tuple[int, ...] = (1000,), cellbender: bool = True) -> dict[str, object]:
    import importlib.metadata as md

    results: dict[str, object] = {
        "stage": "ambient",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "backend": jax.default_backend(),
        "versions": {name: md.version(name) for name in ("jax", "equinox", "optax", "torch", "pyro-ppl", "cellbender")
                     if _installed(name)},
        "setup": {"n_genes": N_GENES, "n_groups": N_GROUPS, "contamination": LEVEL,
                  "ambient_model": "count (CellBender's)", "cellbender_epochs": CELLBENDER_EPOCHS,
                  "dtype": "float32",
                  "note": "cells plus as many empty droplets; profile and ambient-count prior from the empties"},
        "runs": [],
    }
    for n in sizes:
        data = make_droplets(n, n_empty=n)
        ours = run_diffbio(data)
        print(f"diffbio_eqx  n={n}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in ours.items()), flush=True)
        theirs = run_cellbender(data) if cellbender else {"skipped": "cellbender=False"}
        print(f"cellbender   n={n}: {theirs}", flush=True)
        results["runs"].append({"n_cells": n, "diffbio_eqx": ours, "cellbender": theirs})
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ambient.json").write_text(json.dumps(results, indent=2))
    return results


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cellbender", action="store_true")
    parser.add_argument("--cells", type=int, nargs="+", default=[1000])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    arguments = parser.parse_args()
    main(arguments.out, tuple(arguments.cells), cellbender=not arguments.no_cellbender)
