"""Ligand-receptor scoring against LIANA and the GRN against scikit-learn's GENIE3 / GRNBoost2 regressors.

- `lr`: pbmc68k (scanpy's PBMC 68k reduced, `bulk_labels`, log-normalised), and simulated data at the sizes
  given (Splatter-style counts from `diffbio_eqx.simulate`, genes renamed to genes of LIANA's consensus resource,
  log-normalised): our CellPhoneDB and CellChat (1,000 keyed permutations, vmapped) against `liana.mt.cellphonedb`
  and `liana.mt.cellchat` (same resource, groups, permutation count); time (ours after compilation, compile
  separately), agreement of means / probabilities and of p < 0.05 calls.
- `grn`: `simulate_grn` (1,000 cells, 20 TFs, 200 targets, Hill-function regulation): our additive ridge GRN
  against `GradientBoostingRegressor` with GRNBoost2's settings (arboreto `SGBM_KWARGS`: learning_rate 0.01,
  n_estimators 5000 with arboreto's out-of-bag early-stopping monitor, window 25, max_features 0.1, subsample 0.9,
  importances x n_estimators) and `RandomForestRegressor` with GENIE3's (`RF_KWARGS`: 1,000 trees,
  max_features 'sqrt'), both with arboreto's seed 666: time and AUPRC (random = edge density).
  It also writes `tests/data/communication_grn_reference.json` (the GBM AUPRC the test compares against, and a
  fingerprint of the simulated data), because a 220-regression GBM run is too slow for the test suite.

Writes `benchmarks/results/communication_grn.json`.
Run: `python benchmarks/bench_communication_grn.py [lr|grn ...] [--sizes 10000 100000] [--rf-targets 40]
[--liana-perms-small 1000] [--liana-perms-large 10 30 | -5] [--no-pbmc]`.
"""

import os


os.environ.setdefault("EQX_ON_ERROR", "nan")

import argparse
import json
import pathlib
import sys
import time
import warnings

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import ROOT, environment  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "communication_grn.json"
REFERENCE = ROOT / "tests" / "data" / "communication_grn_reference.json"
GRN_SIM = {"n_cells": 1000, "n_tfs": 20, "n_targets": 200, "seed": 0}


def lognorm(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4).astype(np.float32)


def grn_inputs():
    from diffbio_eqx._simulate._network import simulate_grn

    sim = simulate_grn(**GRN_SIM)
    x = lognorm(sim.counts)
    n_tfs = len(sim.tf_names)
    scored = np.ones_like(sim.adjacency)
    scored[np.arange(n_tfs), np.arange(n_tfs)] = False  # a TF is never its own target
    return sim, x, n_tfs, scored


def fingerprint(counts: np.ndarray) -> list[float]:
    return [float(counts.sum()), float(counts[0].sum()), float(counts[:, -1].sum())]


class EarlyStopMonitor:
    """arboreto's `EarlyStopMonitor`: stop when the mean out-of-bag improvement of the last 25 rounds is < 0."""

    def __init__(self, window_length: int = 25):
        self.window_length = window_length

    def __call__(self, current_round, regressor, _):
        if current_round >= self.window_length - 1:
            low = max(0, current_round - self.window_length + 1)
            return np.mean(regressor.oob_improvement_[low: current_round + 1]) < 0
        return False


def sklearn_importances(x: np.ndarray, n_tfs: int, kind: str, targets: np.ndarray) -> np.ndarray:
    """arboreto's per-target regressions (`infer_partial_network`) with scikit-learn, as (n_tfs, n_genes)."""
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

    out = np.zeros((n_tfs, x.shape[1]))
    for target in targets:
        cols = [i for i in range(n_tfs) if i != target]
        if kind == "gbm":
            model = GradientBoostingRegressor(random_state=666, learning_rate=0.01, n_estimators=5000,
                                              max_features=0.1, subsample=0.9)
            model.fit(x[:, cols], x[:, target], monitor=EarlyStopMonitor())
            out[cols, target] = model.feature_importances_ * len(model.estimators_)
        else:
            model = RandomForestRegressor(random_state=666, n_estimators=1000, max_features="sqrt", n_jobs=1)
            model.fit(x[:, cols], x[:, target])
            out[cols, target] = model.feature_importances_
    return out


def run_grn(rf_targets: int) -> dict:
    import jax
    import jax.numpy as jnp
    from sklearn.metrics import average_precision_score

    from diffbio_eqx._grn._regression import AdditiveGRN, grn_importances

    sim, x, n_tfs, scored = grn_inputs()
    own = jnp.asarray(np.r_[np.arange(n_tfs), -np.ones(x.shape[1] - n_tfs, dtype=int)].astype(np.int32))
    stage, xt, xa = AdditiveGRN(), jnp.asarray(x[:, :n_tfs]), jnp.asarray(x)
    start = time.perf_counter()
    jax.block_until_ready(grn_importances(stage, xt, xa, own))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(5):
        start = time.perf_counter()
        ours = np.asarray(jax.block_until_ready(grn_importances(stage, xt, xa, own)))
        times.append(time.perf_counter() - start)
    truth = sim.adjacency
    auprc = lambda imp, cols=slice(None): float(average_precision_score(truth[:, cols][scored[:, cols]],  # noqa: E731
                                                                        imp[:, cols][scored[:, cols]]))
    start = time.perf_counter()
    gbm = sklearn_importances(x, n_tfs, "gbm", np.arange(x.shape[1]))
    gbm_s = time.perf_counter() - start
    subset = np.arange(n_tfs, n_tfs + rf_targets)
    start = time.perf_counter()
    rf = sklearn_importances(x, n_tfs, "rf", subset)
    rf_s = time.perf_counter() - start
    result = {
        "data": {**GRN_SIM, "n_genes": int(x.shape[1]), "n_true_edges": int(truth.sum()),
                 "model": "SERGIO-style Hill regulation, simulate_grn"},
        "random_auprc": float(truth[scored].mean()),
        "ours": {"method": "additive ridge (hinge basis, 3 knots, ridge 1e-2)", "seconds": min(times),
                 "compile_seconds": compile_s, "auprc": auprc(ours), "auprc_rf_subset": auprc(ours, subset)},
        "gbm_grnboost2_settings": {"seconds": gbm_s, "auprc": auprc(gbm)},
        "rf_genie3_settings": {"seconds_subset": rf_s, "n_targets_subset": rf_targets,
                               "seconds_all_targets_extrapolated": rf_s * x.shape[1] / rf_targets,
                               "auprc_subset": auprc(rf, subset)},
    }
    result["speedup_vs_gbm"] = gbm_s / min(times)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps({
        "made_by": "python benchmarks/bench_communication_grn.py grn", "simulation": GRN_SIM,
        "fingerprint": fingerprint(sim.counts), "gbm_grnboost2_auprc": result["gbm_grnboost2_settings"]["auprc"],
        "random_auprc": result["random_auprc"]}, indent=1) + "\n")
    return result


def pbmc_inputs():
    import scipy.sparse as sp

    import diffbio_eqx as dbx

    adata = dbx.datasets.pbmc68k()
    counts = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(counts / adata.obs["n_counts"].to_numpy()[:, None] * 1e4).astype(np.float32))
    return adata


def simulated_inputs(n_cells: int, resource, n_genes: int = 2000, n_groups: int = 10):
    """Splatter-style counts (`simulate_sparse`: 10x-like depth, about a quarter of the entries non-zero) whose
    genes are every gene of the resource (1,876 for the consensus) plus decoys, in random order, log-normalised;
    the simulated groups are the labels."""
    import anndata as ad
    import jax.random as jr
    import pandas as pd
    import scipy.sparse as sp

    import diffbio_eqx as dbx

    sim = dbx.simulate_sparse(jr.key(0), n_cells=n_cells, n_genes=n_genes, n_groups=n_groups)
    genes = sorted({u for c in pd.concat([resource["ligand"], resource["receptor"]]) for u in c.split("_")})
    names = np.array((genes + [f"DECOY{i}" for i in range(max(0, n_genes - len(genes)))])[:n_genes], dtype=object)
    names = names[np.random.default_rng(0).permutation(n_genes)]
    counts = sim.counts
    totals = np.asarray(counts.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags((1e4 / np.maximum(totals, 1)).astype(np.float32)) @ counts)
    x.data = np.log1p(x.data).astype(np.float32)
    obs = pd.DataFrame({"group": pd.Categorical([f"g{g}" for g in sim.groups])},
                       index=pd.Index([f"c{i}" for i in range(n_cells)]))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(names, dtype=str)))


def _liana_run(adata, method: str, n_perms: int, resource, groupby: str):
    """LIANA's run: its result, wall seconds and process CPU seconds (LIANA runs single-threaded, `n_jobs=1`)."""
    import liana as li

    copy = adata.copy()
    start, cpu = time.perf_counter(), time.process_time()
    getattr(li.mt, method)(copy, groupby=groupby, use_raw=False, n_perms=n_perms, verbose=False, key_added="r",
                           resource=resource, n_jobs=1)
    return copy.uns["r"], time.perf_counter() - start, time.process_time() - cpu


def liana_permutation_cpu(adata, groupby: str, resource, n_perms: int) -> dict:
    """CPU seconds of LIANA's own permutation step alone (`_generate_perms_cube`, the per-group `np.mean` of
    `X[permutation]` that `liana.mt.cellphonedb` runs `n_perms` times, `n_jobs=1`) on the matrix it would use (the
    cells x entity genes of the matched resource, CSR). Times 1,000 / `n_perms` it is a lower bound on LIANA's
    CellPhoneDB with 1,000 permutations: it leaves out its observed statistics, table and p-value steps."""
    from liana.method._pipe_utils._get_mean_perms import _generate_perms_cube

    from diffbio_eqx._communication._resource import index_resource

    index = index_resource(resource, adata.var_names, expressed=np.asarray(abs(adata.X).sum(axis=0)).ravel() != 0)
    x = adata.X[:, np.sort(index.genes)].tocsr()
    labels = adata.obs[groupby].astype("category")
    mask = np.stack([(labels == g).to_numpy() for g in labels.cat.categories], axis=1)
    start, cpu = time.perf_counter(), time.process_time()
    _generate_perms_cube(x, n_perms, mask, 1337, np.mean, 1, False)
    return {"n_perms": n_perms, "n_entity_genes": int(x.shape[1]), "wall_seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def compare_lr_lower_bound(adata, groupby: str, resource, n_perms: int) -> dict:
    """Ours (CellPhoneDB, 1,000 keyed permutations, after compilation) against LIANA's permutation step alone
    (`liana_permutation_cpu`), scaled to 1,000 permutations: a lower bound on LIANA's time and so on the speed-up.
    For sizes where LIANA's whole run with 1,000 permutations does not fit the time on a loaded machine."""
    import os

    load = os.getloadavg()[0]
    ours, ours_s, ours_cpu, first = _time_ours(adata, groupby, "cellphonedb", resource)
    liana = liana_permutation_cpu(adata, groupby, resource, n_perms)
    liana_cpu_1000 = liana["cpu_seconds"] * 1000 / n_perms
    return {
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "n_groups": int(adata.obs[groupby].nunique()),
        "n_interactions_ours": len(ours), "ours_seconds_1000_perms": ours_s, "ours_cpu_seconds_1000_perms": ours_cpu,
        "ours_compile_seconds": first - ours_s, "liana_permutation_step": liana,
        "liana_cpu_seconds_1000_perms_lower_bound": liana_cpu_1000,
        "speedup_cpu_lower_bound": liana_cpu_1000 / ours_cpu,
        "speedup_wall_lower_bound": liana["wall_seconds"] * 1000 / n_perms / ours_s,
        "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
    }


def _time_ours(adata, groupby: str, method: str, resource):
    """Ours with 1,000 keyed permutations: a first call (compiles), then the timed one; returns the table, its wall
    and process CPU seconds, and the first call's seconds."""
    import jax.random as jr

    from diffbio_eqx._communication._table import ligand_receptor_table

    run = lambda: ligand_receptor_table(adata.X, adata.var_names, adata.obs[groupby], resource,  # noqa: E731
                                        method=method, key=jr.key(0), n_perms=1000)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    ours = run()
    return ours, time.perf_counter() - start, time.process_time() - cpu, first


def compare_lr(adata, groupby: str, method: str, resource, liana_perms: tuple[int, ...]) -> dict:
    """Ours (1,000 keyed permutations; compile timed apart) against LIANA on one dataset, timed side by side.

    LIANA runs with each permutation count in `liana_perms`; with one count of 1,000 its time is measured, with two
    smaller counts `a < b` its time for 1,000 is the straight line through both (fixed cost plus `1000 - b` more
    permutations at the measured marginal cost per permutation), marked `liana_time_extrapolated`. Wall and
    process CPU seconds are both kept: on a shared, loaded machine CPU time (ours: all XLA threads; LIANA:
    single-threaded) is the steadier measure, `speedup_cpu`. Agreement is against LIANA's run with the most
    permutations.
    """
    import os

    from scipy.stats import spearmanr

    load = os.getloadavg()[0]
    ours, ours_s, ours_cpu, first = _time_ours(adata, groupby, method, resource)
    wall, cpus = {}, {}
    for perms in liana_perms:
        ref, wall[perms], cpus[perms] = _liana_run(adata, method, perms, resource, groupby)
    top = max(liana_perms)

    def for_1000(times: dict) -> float:
        if len(liana_perms) == 1:
            return times[top] * 1000 / top
        low = min(liana_perms)
        return times[top] + (1000 - top) * (times[top] - times[low]) / (top - low)

    keys = ["source", "target", "ligand_complex", "receptor_complex"]
    merged = ref.merge(ours, on=keys, suffixes=("_liana", ""))
    score, pval = ("lr_means", "cellphone_pvals") if method == "cellphonedb" else ("lr_probs", "cellchat_pvals")
    return {
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "n_groups": int(adata.obs[groupby].nunique()),
        "n_interactions_ours": len(ours), "n_interactions_liana": len(ref),
        "n_matched": len(merged), "ours_seconds_1000_perms": ours_s, "ours_cpu_seconds_1000_perms": ours_cpu,
        "ours_compile_seconds": first - ours_s,
        "liana_seconds_by_perms": {str(k): v for k, v in wall.items()},
        "liana_cpu_seconds_by_perms": {str(k): v for k, v in cpus.items()},
        "liana_seconds_1000_perms": for_1000(wall), "liana_cpu_seconds_1000_perms": for_1000(cpus),
        "liana_time_extrapolated": liana_perms != (1000,),
        "speedup_wall": for_1000(wall) / ours_s, "speedup_cpu": for_1000(cpus) / ours_cpu,
        "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
        "max_abs_score_diff": float(np.max(np.abs(merged[score] - merged[score + "_liana"]))),
        "score_spearman": float(spearmanr(merged[score], merged[score + "_liana"]).statistic),
        "agreement_against_liana_perms": top,
        "p_call_agreement": float(np.mean((merged[pval] < 0.05) == (merged[pval + "_liana"] < 0.05))),
        "max_abs_p_diff_independent_draws": float(np.max(np.abs(merged[pval] - merged[pval + "_liana"]))),
    }


def run_lr(sizes: list[int], liana_perms: dict[str, tuple[int, ...]], pbmc: bool, out: dict, save) -> dict:
    """Fills `out` (the `lr` results) one dataset at a time, calling `save()` after each."""
    import resource as rusage

    import diffbio_eqx as dbx

    resource = dbx.datasets.ligand_receptor_pairs()
    if pbmc:
        out["pbmc68k"] = {m: compare_lr(pbmc_inputs(), "bulk_labels", m, resource, (1000,))
                          for m in ("cellphonedb", "cellchat")}
        print(json.dumps(out["pbmc68k"], indent=1), flush=True)
        save()
    for n_cells in sizes:
        adata = simulated_inputs(n_cells, resource)
        perms = liana_perms["small"] if n_cells <= 20_000 else liana_perms["large"]
        if len(perms) == 1 and perms[0] < 0:  # LIANA's permutation step alone, -perms of them: a lower bound
            row = compare_lr_lower_bound(adata, "group", resource, -perms[0])
        else:
            row = compare_lr(adata, "group", "cellphonedb", resource, perms)
        out[f"simulated_{n_cells}"] = {"cellphonedb": row}
        out[f"simulated_{n_cells}"]["cellphonedb"]["peak_rss_gb_process"] = (
            rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 2**20)
        print(json.dumps(out[f"simulated_{n_cells}"], indent=1), flush=True)
        save()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("parts", nargs="*", default=["lr", "grn"])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--rf-targets", type=int, default=40)
    parser.add_argument("--liana-perms-small", type=int, nargs="+", default=[1000],
                        help="LIANA's permutation counts up to 20k cells (two counts: its 1,000 is extrapolated)")
    parser.add_argument("--liana-perms-large", type=int, nargs="+", default=[10, 30],
                        help="LIANA's permutation counts above 20k cells (two counts: its 1,000 is extrapolated; "
                             "one negative count -k: only LIANA's permutation step, k permutations, a lower bound)")
    parser.add_argument("--no-pbmc", action="store_true", help="leave the pbmc68k rows as they are")
    parser.add_argument("--out", default=RESULTS.name, help="results file name under benchmarks/results")
    args = parser.parse_args()
    path = RESULTS.parent / args.out
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["environment"] = environment("liana", "scikit-learn", "scanpy")

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")

    if "grn" in args.parts:
        results["grn"] = run_grn(args.rf_targets)
        print(json.dumps(results["grn"], indent=1))
        save()
    if "lr" in args.parts:
        perms = {"small": tuple(args.liana_perms_small), "large": tuple(args.liana_perms_large)}
        results["lr"] = results.get("lr", {})
        run_lr(args.sizes, perms, not args.no_pbmc, results["lr"], save)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
