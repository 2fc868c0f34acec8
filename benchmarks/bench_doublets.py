"""Doublet detection side by side: our Scrublet and Solo against scanpy.pp.scrublet and scvi-tools SOLO.

    .venv/bin/python benchmarks/bench_doublets.py --sizes 5000 20000 --tools scrublet scanpy
    .venv/bin/python benchmarks/bench_doublets.py --sizes 2000 --tools solo scvi_solo
    .venv/bin/python benchmarks/bench_doublets.py --sizes 700 --tools pbmc68k   # called rates on pbmc68k

Data: `simulate_doublets(jr.key(0), n_cells=n, n_genes=2000, n_groups=8, doublet_rate=0.1)` (10 % doublets, about
1/8 of them homotypic). Each (tool, size) runs in its own child process; time is wall-clock of one call from raw
counts to scores (ours: the first call, compile included, and a second, steady-state call), cells/s from the
steady-state time, peak memory as `_common.peak_since` measures it, AUPRC and AUROC of the scores against the
simulated doublet flags (all doublets, and heterotypic ones against singlets). Solo's times include training the
VAE (ours: `fit_vae`; scvi-tools: `SCVI.train`), both for `--vae-epochs` epochs, then SOLO with its defaults.
Results merge into benchmarks/results/doublets.json (keyed by tool, size and backend).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


RESULTS = _common.ROOT / "benchmarks" / "results" / "doublets.json"


def _data(n_cells: int):
    import jax.random as jr
    import numpy as np

    from diffbio_eqx._simulate._doublets import simulate_doublets

    sim = simulate_doublets(jr.key(0), n_cells=n_cells, n_genes=2000, n_groups=8, doublet_rate=0.1)
    return np.asarray(sim.counts, dtype=np.float32), np.asarray(sim.is_doublet), np.asarray(sim.is_homotypic)


def _quality(scores, truth, homotypic) -> dict:
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.nan_to_num(np.asarray(scores, dtype=float), nan=0.0)
    keep = ~homotypic
    return {"auprc": float(average_precision_score(truth, scores)), "auroc": float(roc_auc_score(truth, scores)),
            "auprc_heterotypic": float(average_precision_score(truth[keep], scores[keep]))}


def _run_scrublet(counts):
    import jax.random as jr

    from diffbio_eqx._doublets._run import run_scrublet

    result = run_scrublet(counts, key=jr.key(0))
    return result.doublet_score, {"called_rate": float(result.predicted_doublet.mean()),
                                  "threshold_method": result.threshold_method}


def _run_scanpy(counts):
    import warnings

    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(counts.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Exact sklearn neighbours: scanpy's default above 8192 points (pynndescent) fails in this environment
        # (`csr_array` has no `getnnz` with the installed scipy), and exact search is what ours does too.
        sc.pp.scrublet(adata, random_state=0, verbose=False, use_approx_neighbors=False)
    return adata.obs["doublet_score"].to_numpy(), {"called_rate": float(adata.obs["predicted_doublet"].mean()),
                                                   "use_approx_neighbors": False}


def _run_solo(counts, vae_epochs: int):
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._doublets._solo import run_solo
    from diffbio_eqx._vae._stage import VAENormalizer, fit_vae

    vae = fit_vae(VAENormalizer(counts.shape[1], key=jr.key(1)), counts, key=jr.key(2),
                  settings=TrainSettings(n_epochs=vae_epochs, progress=False)).model
    result = run_solo(vae, counts, key=jr.key(3), settings=TrainSettings(progress=False))
    return result.doublet_probability, {"called_rate": float((result.doublet_probability > 0.5).mean()),
                                        "solo_epochs": result.fit.n_epochs_run}


def _run_scvi_solo(counts, vae_epochs: int):
    from make_doublet_reference import scvi_solo

    probability, info = scvi_solo(counts, vae_epochs)
    return probability, {"called_rate": float((probability > 0.5).mean()), **info}


def one(tool: str, n_cells: int, vae_epochs: int) -> dict:
    """One (tool, size) measurement in this process."""
    counts, truth, homotypic = _data(n_cells)
    run = {"scrublet": _run_scrublet, "scanpy": _run_scanpy,
           "solo": lambda c: _run_solo(c, vae_epochs), "scvi_solo": lambda c: _run_scvi_solo(c, vae_epochs)}[tool]
    record: dict = {"tool": tool, "n_cells": n_cells, "n_genes": counts.shape[1]}
    if tool == "scrublet":
        start = time.perf_counter()
        run(counts)
        record["first_call_seconds"] = time.perf_counter() - start
    baseline = _common.reset_peak()
    start = time.perf_counter()
    scores, info = run(counts)
    seconds = time.perf_counter() - start
    record.update(peak_since(baseline), seconds=seconds, cells_per_second=n_cells / seconds, **info,
                  **_quality(scores, truth, homotypic))
    return record


def pbmc68k_rates() -> dict:
    """Called doublet rate on pbmc68k (no ground truth): ours and scanpy.pp.scrublet's, same default settings;
    ours also on scanpy's simulated doublets."""
    import warnings

    import jax.random as jr
    import numpy as np
    import scanpy as sc

    import diffbio_eqx as dbx
    from diffbio_eqx._doublets._run import ScrubletSettings, run_scrublet

    adata = dbx.datasets.pbmc68k()
    # dbx.datasets.pbmc68k() returns a CSR matrix with unsorted column indices (flagged as such); scanpy's
    # scrublet mishandles those (values land on other genes), so both tools get the sorted matrix.
    adata.X.sort_indices()
    counts = adata.X
    theirs = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.scrublet(theirs, random_state=0, verbose=False)
    ours = run_scrublet(counts, key=jr.key(0))
    same = run_scrublet(counts, ScrubletSettings(parents=theirs.uns["scrublet"]["doublet_parents"]), key=jr.key(0))
    scanpy_scores = theirs.obs["doublet_score"].to_numpy()
    from scipy.stats import spearmanr

    return {"tool": "pbmc68k", "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
            "scanpy_called_rate": float(theirs.obs["predicted_doublet"].mean()),
            "scanpy_threshold": float(theirs.uns["scrublet"].get("threshold", np.nan)),
            "ours_called_rate": float(ours.predicted_doublet.mean()), "ours_threshold": ours.threshold,
            "ours_threshold_method": ours.threshold_method,
            "ours_same_doublets_called_rate": float(same.predicted_doublet.mean()),
            "ours_same_doublets_threshold": same.threshold,
            "spearman_same_doublets": float(spearmanr(scanpy_scores, same.doublet_score).statistic),
            "spearman_own_doublets": float(spearmanr(scanpy_scores, ours.doublet_score).statistic)}


def peak_since(baseline: dict) -> dict:
    return _common.peak_since(baseline)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--tools", nargs="+", default=["scrublet", "scanpy"])
    parser.add_argument("--vae-epochs", type=int, default=50)
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "N_CELLS"))
    args = parser.parse_args()
    if args.one:
        record = pbmc68k_rates() if args.one[0] == "pbmc68k" else one(args.one[0], int(args.one[1]), args.vae_epochs)
        print("RESULT " + json.dumps(record))
        return
    runs = []
    for n_cells in sorted(args.sizes):
        for tool in args.tools:
            out = subprocess.run([sys.executable, __file__, "--one", tool, str(n_cells), "--vae-epochs",
                                  str(args.vae_epochs)], capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            record = json.loads(lines[-1][len("RESULT "):])
            record["backend"] = _common.environment()["backend"]
            print(json.dumps(record))
            runs.append(record)
    env = _common.environment("scanpy", "scvi-tools", "torch", "scikit-image")
    _common.write_json(RESULTS, {"environment": env,
                                 "runs": _common.merge_runs(RESULTS, runs, ("tool", "n_cells", "backend"))})


if __name__ == "__main__":
    main()
