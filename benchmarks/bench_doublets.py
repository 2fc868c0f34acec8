"""Doublet detection side by side: our Scrublet and Solo against scanpy.pp.scrublet and scvi-tools SOLO.

    .venv/bin/python benchmarks/bench_doublets.py --sizes 5000 20000 --tools scrublet scanpy
    .venv/bin/python benchmarks/bench_doublets.py --sizes 2000 --tools solo scvi_solo
    .venv/bin/python benchmarks/bench_doublets.py --sizes 700 --tools pbmc68k   # called rates on pbmc68k
    .venv/bin/python benchmarks/bench_doublets.py --sizes 5000 20000 --tools ivf_vs_exact --rounds 1
    .venv/bin/python benchmarks/bench_doublets.py --sizes 20000 --tools scrublet scanpy scanpy_default

Tools: `scrublet` (ours, default settings: the IVF kNN from 15,000 points), `scanpy` (`scanpy.pp.scrublet` with
exact sklearn neighbours, `use_approx_neighbors=False`), `scanpy_default` (its defaults: pynndescent above 8,192
points, run through `_scanpy_getnnz_shim` and, like ours, timed on a second call after a first one on 3,000 cells
that compiles numba), `solo`, `scvi_solo`, `ivf_vs_exact` (ours with the IVF against ours exact on the same doublets).

Data: `_simulated(n)`: `2n` singlets from `simulate_sparse` (8 groups, 2,000 genes, chunked: the dense
`simulate_doublets` needs over 13 GB at 20k cells), droplet `i` singlet `i` plus, with probability 0.1, a random
singlet of the other half (about 1/8 of the doublets homotypic). `--rounds` rounds (default 3), each running every
tool once in its own child process, in turn (interleaved); time is wall-clock of one call from raw counts to
scores (ours: the first call, compile included, and a second, steady-state call), cells/s from the steady-state
time, the ratio peer / ours per round (median and range, `_common.ratio_summary`), peak memory as
`_common.peak_since` measures it, AUPRC and AUROC of the scores against the simulated doublet flags (all
doublets, and heterotypic ones against singlets). Solo's times include training the VAE (ours: `fit_vae`;
scvi-tools: `SCVI.train`), both for `--vae-epochs` epochs, then SOLO with its defaults; ours, like our Scrublet, is
timed on a second call after a first one (compilation included) on the same droplets, and both calls are compared
with SOLO's single call (`time_ratio_vs_scvi_solo` and `..._first_call`).
Results merge into benchmarks/results/doublets.json (keyed by tool, size and backend).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


RESULTS = _common.ROOT / "benchmarks" / "results" / "doublets.json"


def _data(n_cells: int):
    """`_simulated(n_cells)`, cached in the system's temporary folder (the 20k simulation takes a minute)."""
    import tempfile

    import numpy as np
    import scipy.sparse as sp

    path = pathlib.Path(tempfile.gettempdir()) / f"diffbio_bench_doublets_{n_cells}"
    if not path.with_suffix(".npz").exists():
        counts, truth, homotypic = _simulated(n_cells)
        sp.save_npz(path.with_suffix(".counts.npz"), counts)
        np.savez(path.with_suffix(".npz"), truth=truth, homotypic=homotypic)
    flags = np.load(path.with_suffix(".npz"))
    return sp.load_npz(path.with_suffix(".counts.npz")).astype(np.float32), flags["truth"], flags["homotypic"]


def _simulated(n_cells: int):
    """`n_cells` droplets, 10 % doublets, from `simulate_sparse` (chunked, so 100k cells fit in memory; the dense
    `simulate_doublets` needs over 13 GB at 20k): `2 * n_cells` singlets, droplet `i` is singlet `i` plus, for a
    doublet, a random singlet of the other half (as `simulate_doublets` pairs them); homotypic when both share a
    group. Returns `(counts CSR float32, is_doublet, is_homotypic)`."""
    import jax.random as jr
    import numpy as np
    import scipy.sparse as sp

    from diffbio_eqx._simulate._scale import simulate_sparse

    base = simulate_sparse(jr.key(0), n_cells=2 * n_cells, n_genes=2000, n_groups=8, n_batches=1, lib_loc=8.0)
    rng = np.random.default_rng(0)
    is_doublet = rng.random(n_cells) < 0.1
    partner = n_cells + rng.integers(0, n_cells, n_cells)
    second = sp.diags(is_doublet.astype(np.float32)) @ base.counts[partner]
    counts = sp.csr_matrix(base.counts[:n_cells] + second, dtype=np.float32)
    homotypic = is_doublet & (base.groups[:n_cells] == base.groups[partner])
    return counts, is_doublet, homotypic


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
                                  "threshold_method": result.threshold_method, "knn_method": result.knn_method}


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


def _scanpy_getnnz_shim() -> None:
    """scanpy 1.11.5's default kNN above 8,192 points (pynndescent's transformer) returns a `csr_array`, and
    scanpy then calls `getnnz`, which SciPy 1.17's sparse arrays no longer have: this hands scanpy's
    `_ind_dist_shortcut` the same entries as a `csr_matrix`. A compatibility fix, not a change of its search."""
    import scanpy.neighbors._common as common
    import scipy.sparse as sp

    original = common._ind_dist_shortcut
    if getattr(original, "shimmed", False):
        return

    def shortcut(d):
        return original(sp.csr_matrix(d))

    shortcut.shimmed = True  # type: ignore[attr-defined]
    common._ind_dist_shortcut = shortcut


def _run_scanpy_default(counts):
    """`scanpy.pp.scrublet` with its defaults: exact below 8,192 points, pynndescent above (`_scanpy_getnnz_shim`)."""
    import warnings

    import anndata as ad
    import scanpy as sc

    _scanpy_getnnz_shim()
    adata = ad.AnnData(counts.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.scrublet(adata, random_state=0, verbose=False)
    return adata.obs["doublet_score"].to_numpy(), {"called_rate": float(adata.obs["predicted_doublet"].mean()),
                                                   "use_approx_neighbors": None}


def ivf_vs_exact(n_cells: int) -> dict:
    """Our Scrublet with the IVF and with the exact kNN on the same droplets and the same simulated doublets (same
    key): score Spearman, share of identical scores, AUPRC of each, called-doublet agreement, first-call times."""
    import jax.random as jr
    import numpy as np

    from diffbio_eqx._doublets._run import ScrubletSettings, run_scrublet

    counts, truth, homotypic = _data(n_cells)
    results, seconds = {}, {}
    for method in ("ivf", "exact"):
        start = time.perf_counter()
        results[method] = run_scrublet(counts, ScrubletSettings(knn_method=method), key=jr.key(0))
        seconds[method] = time.perf_counter() - start
    ivf, exact = results["ivf"], results["exact"]
    # The scores take one value per neighbour count; rounding drops the last-bit differences of two jits, which
    # would otherwise break their many ties at random.
    ivf_score, exact_score = np.round(ivf.doublet_score, 6), np.round(exact.doublet_score, 6)
    quality = {method: _quality(r.doublet_score, truth, homotypic) for method, r in results.items()}
    return {"tool": "scrublet_ivf_vs_exact", "n_cells": n_cells, "n_points": int(ivf.parents.shape[0]
                                                                             + np.isfinite(ivf.doublet_score).sum()),
            "k_adj": ivf.n_neighbors_adjusted, "spearman": _spearman(ivf_score, exact_score),
            "identical_score_share": float(np.mean(ivf_score == exact_score)),
            "identical_sim_score_share": float(np.mean(np.round(ivf.scores_sim, 6) == np.round(exact.scores_sim, 6))),
            "called_agreement": float(np.mean(ivf.predicted_doublet == exact.predicted_doublet)),
            "called_rate": {"ivf": float(ivf.predicted_doublet.mean()), "exact": float(exact.predicted_doublet.mean())},
            "threshold": {"ivf": ivf.threshold, "exact": exact.threshold},
            "auprc": {m: q["auprc"] for m, q in quality.items()},
            "auprc_difference": quality["ivf"]["auprc"] - quality["exact"]["auprc"],
            "auroc": {m: q["auroc"] for m, q in quality.items()},
            "first_call_seconds_with_compile": seconds, "load_average": list(os.getloadavg())}


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
    run = {"scrublet": _run_scrublet, "scanpy": _run_scanpy, "scanpy_default": _run_scanpy_default,
           "solo": lambda c: _run_solo(c, vae_epochs), "scvi_solo": lambda c: _run_scvi_solo(c, vae_epochs)}[tool]
    record: dict = {"tool": tool, "n_cells": n_cells, "n_genes": counts.shape[1]}
    if tool in WARMED:
        # scanpy's first call compiles numba code on 3,000 cells (9,000 points: above scanpy_default's 8,192-point
        # cut for pynndescent); ours runs its first call, compilation included, on the data itself
        warm = counts[:SCANPY_WARMUP_CELLS] if tool.startswith("scanpy") else counts
        start = time.perf_counter()
        run(warm)
        record["first_call_seconds"] = time.perf_counter() - start
        record["first_call_cells"] = warm.shape[0]
    baseline = _common.reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    scores, info = run(counts)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    record.update(peak_since(baseline), seconds=seconds, cpu_seconds=cpu_seconds, cells_per_second=n_cells / seconds,
                  **info,
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
    counts: Any = adata.X
    counts.sort_indices()
    theirs = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.scrublet(theirs, random_state=0, verbose=False)
    ours = run_scrublet(counts, key=jr.key(0))
    same = run_scrublet(counts, ScrubletSettings(parents=theirs.uns["scrublet"]["doublet_parents"]), key=jr.key(0))
    scanpy_scores = theirs.obs["doublet_score"].to_numpy()
    return {"tool": "pbmc68k", "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
            "scanpy_called_rate": float(theirs.obs["predicted_doublet"].mean()),
            "scanpy_threshold": float(theirs.uns["scrublet"].get("threshold", np.nan)),
            "ours_called_rate": float(ours.predicted_doublet.mean()), "ours_threshold": ours.threshold,
            "ours_threshold_method": ours.threshold_method,
            "ours_same_doublets_called_rate": float(same.predicted_doublet.mean()),
            "ours_same_doublets_threshold": same.threshold,
            "spearman_same_doublets": _spearman(scanpy_scores, same.doublet_score),
            "spearman_own_doublets": _spearman(scanpy_scores, ours.doublet_score)}


def _spearman(a: Any, b: Any) -> float:
    from scipy.stats import spearmanr

    result: Any = spearmanr(a, b)
    return float(result[0])


def peak_since(baseline: dict) -> dict:
    return _common.peak_since(baseline)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--tools", nargs="+", default=["scrublet", "scanpy"])
    parser.add_argument("--vae-epochs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "N_CELLS"))
    parser.add_argument("--results", default=str(RESULTS), help="the JSON the runs merge into (gpu.sh: its OUT)")
    args = parser.parse_args()
    if args.one:
        tool, n_cells = args.one[0], int(args.one[1])
        special = {"pbmc68k": pbmc68k_rates, "ivf_vs_exact": lambda: ivf_vs_exact(n_cells)}
        record = special[tool]() if tool in special else one(tool, n_cells, args.vae_epochs)
        print("RESULT " + json.dumps(record))
        return
    for n_cells in sorted(args.sizes):
        interleaved(n_cells, args.tools, args.rounds, args.vae_epochs, pathlib.Path(args.results))


def save(runs: list[dict], results: pathlib.Path = RESULTS) -> None:
    """Merge `runs` into `results` (benchmarks/results/doublets.json; keyed by tool, size and backend)."""
    env = _common.environment("scanpy", "scvi-tools", "torch", "scikit-image")
    _common.write_json(results, {"environment": env,
                                 "runs": _common.merge_runs(results, runs, ("tool", "n_cells", "backend"))})


#: Which references each of our tools is timed against.
PEERS = {"scrublet": ("scanpy", "scanpy_default"), "solo": ("scvi_solo",)}
#: Cells of scanpy's warm-up call (numba's compilation: pynndescent's, and from scanpy 1.12 fast-array-utils').
SCANPY_WARMUP_CELLS = 3000
#: Tools timed on a second call in the same process after a first one (compilation: JAX's, numba's). scanpy 1.12
#: compiles numba code on its first call even with exact neighbours (9.8 s of a 2,000-cell call on Python 3.12);
#: 1.11 compiled nothing there, so its warm-up costs it nothing.
WARMED = ("scrublet", "solo", "scanpy", "scanpy_default")
#: (ours, peer) pairs where the peer compiles little, so our first call (compilation included) is compared too.
FIRST_CALL_PAIRS = (("scrublet", "scanpy"), ("solo", "scvi_solo"))


def _child(tool: str, n_cells: int, vae_epochs: int) -> dict | None:
    out = subprocess.run([sys.executable, __file__, "--one", tool, str(n_cells), "--vae-epochs", str(vae_epochs)],
                         capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def interleaved(n_cells: int, tools: list[str], rounds: int, vae_epochs: int,
                results: pathlib.Path = RESULTS) -> list[dict]:
    """`rounds` rounds, each running every tool once in its own child process, in turn; one record per tool (the
    median round's, with every round's seconds and peak) and, for each of ours with its peers, the time ratio
    (peer / ours per round: median and range) and the machine's load average before and after. The summary so
    far is saved after every round (`save`), so a run cut short keeps its finished rounds."""
    load_before = os.getloadavg()
    per_tool: dict[str, list[dict]] = {tool: [] for tool in tools}
    summary: list[dict] = []
    for _ in range(rounds):
        for tool in tools:
            record = _child(tool, n_cells, vae_epochs)
            if record is not None:
                print(json.dumps(record), flush=True)
                per_tool[tool].append(record)
        summary = summarize(per_tool, list(load_before), list(os.getloadavg()))
        save(summary, results)
    return summary


def summarize(per_tool: dict[str, list[dict]], load_before: list[float], load_after: list[float]) -> list[dict]:
    """One record per tool from its rounds' records (`interleaved`)."""
    out = []
    for tool, records in per_tool.items():
        if not records:
            continue
        seconds = [r.get("seconds", 0.0) for r in records]  # the pbmc68k record has no time
        chosen = dict(sorted(records, key=lambda r: r.get("seconds", 0.0))[len(records) // 2])
        chosen.update(seconds_rounds=seconds, peak_bytes_rounds=[r.get("peak_bytes") for r in records],
                      backend=_common.environment()["backend"], n_rounds=len(records),
                      load_average_before=load_before, load_average_after=load_after)
        if tool in WARMED:
            chosen["first_call_seconds_rounds"] = [r["first_call_seconds"] for r in records]
        for peer in PEERS.get(tool, ()):
            paired = min(len(records), len(per_tool.get(peer, [])))  # the rounds where both ran
            if not paired:
                continue
            theirs = [r["seconds"] for r in per_tool[peer][:paired]]
            chosen["time_ratio_vs_" + peer] = _common.ratio_summary(theirs, seconds[:paired])
            if (tool, peer) in FIRST_CALL_PAIRS:
                chosen[f"time_ratio_vs_{peer}_first_call"] = _common.ratio_summary(
                    theirs, chosen["first_call_seconds_rounds"][:paired])
        out.append(chosen)
    return out


if __name__ == "__main__":
    main()
