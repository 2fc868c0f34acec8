"""Trajectories: our DPT vs `scanpy.tl.diffmap` + `scanpy.tl.dpt`, our absorption probabilities vs a direct SciPy
sparse solve of the same system (CellRank is not installed here: its PETSc/SLEPc stack does not build), and our
transport maps vs wot 1.0.8 (`OTModel`, default solver) per pair of time points.

- `dpt`: `simulate_branching(n)` (50 genes), one neighbour graph built once and shared by both (15 neighbours:
  `dbx`'s IVF kNN search, `neighbor_graph(method="ivf")`, and UMAP connectivities, written as scanpy's
  `obsp`/`uns["neighbors"]`; not timed); timed from the same `obsp["connectivities"]`: scanpy `tl.diffmap` +
  `tl.dpt` (its transitions, ARPACK `eigsh`, the DPT row) vs `diffusion_pseudotime` (the padded-row layout,
  components, operator, Chebyshev-filtered subspace iteration, the DPT row; compiled first), `--rounds`
  interleaved rounds (scanpy first in each); the ratio is the median of the per-round ratios, with the range.
  Agreement: Spearman of the pseudotimes, largest eigenvalue difference.
- `fates`: the same graph, CellRank's connectivity kernel, the 30 highest-time cells of each true fate as terminal
  states; ours (Neumann-preconditioned GMRES, tol 1e-6, compiled first) vs `scipy.sparse.linalg.spsolve` (SuperLU) of
  `(I - Q) X = R`; agreement: max absolute difference of the probabilities.
- `ot`: `simulate_time_course` with `n/2` cells at each of days 0 and 1 (60 genes), wot's defaults (local PCA 30,
  epsilon 0.05, lambda1 1, lambda2 50, growth_iters 1); ours compiled first (ott's kernel-mode Sinkhorn with
  over-relaxation 1.8, threshold 1e-5). Timed: wot `compute_transport_map(0, 1)` (its PCA, cost and solve) vs our
  `transport_maps` (the same steps). Agreement: Pearson r of the maps.

Everything runs in float64 (scanpy's eigsh, SciPy and wot do). Memory: each stage's peak resident set above its
start (`_common.peak_since`), in this process, sizes ascending.

Run: `python benchmarks/bench_trajectory.py [--dpt 10000] [--ot 2000 10000] [--rounds 3] [--no-fates]
[--graph-cache DIR]` (merges into benchmarks/results/trajectory.json).
"""

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import environment, median, merge_runs, peak_since, ratio_summary, reset_peak, write_json  # noqa: E402


RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "trajectory.json"


def _measure(fn):
    baseline = reset_peak()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, peak_since(baseline)["peak_bytes"]


def _branching_adata(n_cells: int, cache: pathlib.Path | None = None):
    import anndata as ad
    import jax.random as jr
    import scipy.sparse as sp

    from diffbio_eqx._core._neighbors import neighbor_graph
    from diffbio_eqx._faces import graph_matrices
    from diffbio_eqx._simulate._trajectory import simulate_branching

    sim = simulate_branching(jr.key(0), n_cells)
    adata = ad.AnnData(np.asarray(sim.x, np.float32))
    # one graph for both, built once (not timed): our IVF kNN + UMAP connectivities in scanpy's layout (scanpy's
    # own pp.neighbors goes through pynndescent above 4,096 cells, which fails on this SciPy's sparse arrays)
    cached = None if cache is None else cache / f"conn_{n_cells}.npz"
    if cached is not None and cached.is_file():  # the same graph, built earlier by this function (IVF is slow here)
        connectivities = sp.load_npz(cached).tocsr()
        distances_file = cache / f"dist_{n_cells}.npz"
        # scanpy's diffmap/dpt read only the connectivities (the distances only fix `knn`): an older cache without
        # them stands in the connectivities' pattern
        distances = sp.load_npz(distances_file).tocsr() if distances_file.is_file() else connectivities.copy()
    else:
        distances, connectivities = graph_matrices(neighbor_graph(sim.x, 15, method="ivf"))
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            sp.save_npz(cached, connectivities)
            sp.save_npz(cache / f"dist_{n_cells}.npz", distances)
    adata.obsp["distances"], adata.obsp["connectivities"] = distances, connectivities
    adata.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                              "params": {"n_neighbors": 15, "method": "umap"}}
    adata.uns["iroot"] = 0
    return sim, adata


def bench_dpt(sim, adata, rounds: int) -> dict:
    import jax.random as jr
    import scanpy as sc
    from scipy.stats import spearmanr

    from diffbio_eqx._trajectory import diffusion_pseudotime

    conn = adata.obsp["connectivities"]

    def scanpy_run():
        sc.tl.diffmap(adata)
        sc.tl.dpt(adata)
        return adata.obs["dpt_pseudotime"].to_numpy()

    def ours_run():
        result = diffusion_pseudotime(conn, 0, key=jr.key(0))
        return np.asarray(result.pseudotime), result

    ours_run()  # compile
    times_ref, times_ours, peaks_ref, peaks_ours = [], [], [], []
    for _ in range(rounds):  # interleaved: both see the same load
        ref, t, m = _measure(scanpy_run)
        times_ref.append(t)
        peaks_ref.append(m)
        (ours, result), t, m = _measure(ours_run)
        times_ours.append(t)
        peaks_ours.append(m)
    truth = np.asarray(sim.pseudotime)
    n_cells = len(truth)
    ratios = ratio_summary(times_ref, times_ours)
    evals = np.asarray(result.diffmap.eigenvalues)
    return {"stage": "dpt", "n_cells": n_cells, "ours_seconds": median(times_ours),
            "reference_seconds": median(times_ref), "speedup": ratios["median"], "speedup_range": [ratios["min"],
            ratios["max"]], "ours_seconds_per_round": times_ours, "reference_seconds_per_round": times_ref,
            "ours_peak_bytes": max(peaks_ours), "reference_peak_bytes": max(peaks_ref),
            "spearman_vs_scanpy": float(spearmanr(ours, ref)[0]),
            "max_eigenvalue_diff_vs_scanpy": float(np.abs(evals - adata.uns["diffmap_evals"]).max()),
            "eigensolver_iterations": int(result.diffmap.n_iter),
            "eigensolver_residual": float(result.diffmap.residual),
            "spearman_vs_truth": float(spearmanr(ours, truth)[0]),
            "scanpy_spearman_vs_truth": float(spearmanr(ref, truth)[0]),
            "graph": "IVF kNN (neighbor_graph method='ivf'), 15 neighbours, UMAP connectivities; built once, untimed",
            "reference": "scanpy tl.diffmap+tl.dpt"}


def bench_fates(sim, adata) -> dict:
    import jax
    import jax.numpy as jnp
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    from diffbio_eqx._trajectory import absorption
    from diffbio_eqx._trajectory._fate import connectivity_transitions
    from diffbio_eqx._trajectory._graph import as_cell_graph

    conn = adata.obsp["connectivities"]
    truth = np.asarray(sim.pseudotime)
    n_cells = len(truth)
    fate = np.asarray(sim.fate)
    terminal = np.full(n_cells, -1, np.int32)
    for k in range(3):
        cells = np.flatnonzero(fate == k)
        terminal[cells[np.argsort(-truth[cells])[:30]]] = k
    transitions = connectivity_transitions(as_cell_graph(conn))
    solve = jax.jit(lambda t, labels: absorption(t, labels, n_states=3))
    solve(transitions, jnp.asarray(terminal)).probabilities.block_until_ready()
    result, t_ours, m_ours = _measure(lambda: jax.block_until_ready(solve(transitions, jnp.asarray(terminal))))
    matrix = sp.csr_matrix((np.asarray(transitions.weights), (np.asarray(transitions.heads),
                                                              np.asarray(transitions.tails))), shape=(n_cells,) * 2)
    transient, absorbing = np.flatnonzero(terminal < 0), np.flatnonzero(terminal >= 0)

    def scipy_run():
        q = matrix[transient][:, transient]
        r = matrix[transient][:, absorbing] @ np.eye(3)[terminal[absorbing]]
        return spl.spsolve((sp.identity(len(transient)) - q).tocsc(), r)

    expected, t_ref, m_ref = _measure(scipy_run)
    past = np.asarray(sim.past_branch)
    probabilities = np.asarray(result.probabilities)
    return {"stage": "fates", "n_cells": n_cells, "ours_seconds": t_ours, "reference_seconds": t_ref,
            "speedup": t_ref / t_ours, "ours_peak_bytes": m_ours, "reference_peak_bytes": m_ref,
            "max_abs_diff_vs_scipy": float(np.abs(probabilities[transient] - expected).max()),
            "fate_accuracy_past_branch": float(np.mean(probabilities[past].argmax(1) == fate[past])),
            "reference": "scipy.sparse.linalg.spsolve (SuperLU)"}


def bench_ot(n_cells: int) -> dict:
    import anndata as ad
    import jax.numpy as jnp
    import jax.random as jr
    import pandas as pd
    import wot
    from scipy.stats import pearsonr

    from diffbio_eqx._simulate._trajectory import simulate_time_course
    from diffbio_eqx._trajectory import transport_maps

    per_day = n_cells // 2
    tc = simulate_time_course(jr.key(0), jnp.array([2.5, 1.0, 0.4]), n_days=2, n_cells_per_day=per_day,
                              n_genes=60)
    x, day = np.asarray(tc.x), np.asarray(tc.day)
    adata = ad.AnnData(x, obs=pd.DataFrame({"day": day}, index=[f"c{i}" for i in range(len(day))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = wot.ot.OTModel(adata, day_field="day")
        ref, t_ref, m_ref = _measure(lambda: model.compute_transport_map(0, 1))
    transport_maps(x, day)  # compile
    ours, t_ours, m_ours = _measure(lambda: np.asarray(transport_maps(x, day)[(0.0, 1.0)].tmap))
    rate = np.asarray(tc.growth_rate)[day == 0]
    return {"stage": "ot", "n_cells": n_cells, "cells_per_time_point": per_day, "ours_seconds": t_ours,
            "reference_seconds": t_ref, "speedup": t_ref / t_ours, "ours_peak_bytes": m_ours,
            "reference_peak_bytes": m_ref,
            "pearson_tmap_vs_wot": float(pearsonr(ours.ravel(), np.asarray(ref.X).ravel())[0]),
            "growth_pearson_vs_truth": float(pearsonr(ours.sum(1), rate)[0]),
            "reference": "wot 1.0.8 OTModel.compute_transport_map (duality-gap solver)"}


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 as scanpy's eigsh, SciPy and wot
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpt", type=int, nargs="*", default=[10_000])
    parser.add_argument("--ot", type=int, nargs="*", default=[2_000, 10_000])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved DPT rounds")
    parser.add_argument("--no-fates", action="store_true", help="DPT only at the --dpt sizes")
    parser.add_argument("--graph-cache", type=pathlib.Path, default=None,
                        help="reuse (or save) the IVF graph as DIR/conn_<n>.npz (untimed either way)")
    args = parser.parse_args()
    env = environment("scanpy", "wot", "ott-jax", "scipy")
    for n in sorted(args.dpt):
        sim, adata = _branching_adata(n, args.graph_cache)
        _save(env, [bench_dpt(sim, adata, args.rounds)])
        if not args.no_fates:
            _save(env, [bench_fates(sim, adata)])
    for n in sorted(args.ot):
        _save(env, [bench_ot(n)])


def _save(env: dict, runs: list[dict]) -> None:
    """Merge the runs into the JSON at once (a long session keeps what finished)."""
    for run in runs:
        print(run, flush=True)
    write_json(RESULTS, {"environment": env, "runs": merge_runs(RESULTS, runs, ("stage", "n_cells"))})


if __name__ == "__main__":
    main()
