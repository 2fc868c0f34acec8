"""Differential expression and archetypes (issue 22) against their reference tools, same CPU, one run.

- markers: `dbx.tl.rank_genes_groups` vs `scanpy.tl.rank_genes_groups` (Wilcoxon with tie correction, t-test),
  10 groups vs rest on log1p(normalize_total) of simulated counts; agreement = max |score difference| / max
  |score| and max relative p-value difference.
- pseudobulk: `deseq2` vs pydeseq2, both at pydeseq2's defaults (Cook's refit, Cook's filter, independent
  filtering), on 16 simulated replicate samples (8 per condition, so outliers are replaced) summed from the cells,
  with outlier counts injected in 5 % of genes; agreement = Pearson r of log2 fold changes, Spearman of p-values,
  share of genes whose FDR-0.05 call differs, genes whose p-value / padj NaN (Cook's flag / filtered) differs.
- KS: our vmapped `ks_statistic` over genes vs a loop of `scipy.stats.ks_2samp`; agreement = genes whose
  statistic differs (exact comparison).
- PCHA: ours vs py_pcha (np.mat shimmed here) from the same initialisation on a 20-dim PCA of the cells with 5
  archetypes; agreement = difference in variance explained. Two rows: `dtype` float64 (both tools on the float64
  PCs) and float32 (both given the PCs as float32, ours with JAX's x64 off, as `dbx.tl.archetypes` runs by default:
  ours computes in float32, py_pcha upcasts to float64 as it always does).

Times are warm (ours compiled by a first call, whose extra time is reported as compile_s); ours and the reference
are timed in interleaved rounds (`--rounds`, default 3): `ours_s` / `reference_s` are the medians and `speedup` the
median of the per-round ratios, with its range in `speedup_rounds`. x64 on; float64 throughout except
PCHA's float32 row.

Usage: `python benchmarks/bench_de.py [--cells 10000] [--genes 2000] [--rounds 3] [--out benchmarks/results]`.
"""

import argparse
import functools
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats as st  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import environment, median, merge_runs, ratio_summary, simulated_counts, write_json  # noqa: E402


ROUNDS = 3


def _interleaved(ours: Callable[[], Any], reference: Callable[[], Any]) -> tuple[Any, Any, dict]:
    """Ours compiled by one call, then `ROUNDS` rounds of ours and the reference one after the other; the last
    outputs and the timing fields of a record."""
    start = time.perf_counter()
    jax.block_until_ready(ours())
    first = time.perf_counter() - start
    ours_times, reference_times = [], []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        out = jax.block_until_ready(ours())
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = reference()
        reference_times.append(time.perf_counter() - start)
        print(f"  round {len(ours_times)}: ours {ours_times[-1]:.3f} s, reference {reference_times[-1]:.3f} s",
              flush=True)
    summary = ratio_summary(reference_times, ours_times)
    return out, theirs, {"ours_s": median(ours_times), "compile_s": max(first - min(ours_times), 0.0),
                         "reference_s": median(reference_times), "speedup": summary["median"],
                         "speedup_rounds": summary, "ours_rounds_s": ours_times,
                         "reference_rounds_s": reference_times, "load_average": list(os.getloadavg())}


def bench_markers(n_cells: int, n_genes: int, methods=("wilcoxon", "t-test")) -> list[dict]:
    import anndata as ad
    import scanpy as sc

    import diffbio_eqx as dbx

    counts, groups, _ = simulated_counts(n_cells, n_genes=n_genes)
    adata = ad.AnnData(X=counts)
    del counts
    adata.obs["group"] = pd.Categorical([f"g{g}" for g in groups])
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    rows = []
    for method in methods:  # both only read X and write uns: they share X (memory at 100k cells)
        ours = ad.AnnData(X=adata.X, obs=adata.obs.copy(), uns={"log1p": dict(adata.uns["log1p"])})
        theirs = ad.AnnData(X=adata.X, obs=adata.obs.copy(), uns={"log1p": dict(adata.uns["log1p"])})
        _, _, timing = _interleaved(
            lambda: dbx.tl.rank_genes_groups(ours, "group", method=method, tie_correct=True),  # noqa: B023
            lambda: sc.tl.rank_genes_groups(theirs, "group", method=method, tie_correct=True))  # noqa: B023
        a, b = ours.uns["rank_genes_groups"], theirs.uns["rank_genes_groups"]
        score_diff = max(np.max(np.abs(a["scores"][g].astype(float) - b["scores"][g])) for g in b["scores"].dtype.names)
        rel_p = max(np.max(np.abs(np.sort(a["pvals"][g]) - np.sort(b["pvals"][g])) / np.maximum(np.sort(b["pvals"][g]),
                                                                                               1e-300))
                    for g in b["pvals"].dtype.names)
        rows.append({"task": f"markers_{method}", "n_cells": n_cells, "n_genes": n_genes, **timing,
                     "max_abs_score_diff": float(score_diff), "max_rel_pvalue_diff": float(rel_p)})
        print(rows[-1], flush=True)
    return rows


def bench_pseudobulk(n_cells: int, n_genes: int) -> dict:
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    from diffbio_eqx._de._deseq2 import deseq2
    from diffbio_eqx._simulate._de import simulate_conditions

    n_samples = 16
    # above 20M cell x gene values the cells are drawn in gene blocks (independent keys; genes are independent in
    # the model, libraries too apart from their sum) and summed per block: the cell-level draw of 100k cells x
    # 2,000 genes at once peaked at 16 GB
    n_blocks = next(b for b in range(max(1, -(-n_cells * n_genes // (2 * 10**7))), n_genes + 1) if n_genes % b == 0)
    blocks = []
    for i in range(n_blocks):
        data = simulate_conditions(key=jr.key(0) if n_blocks == 1 else jr.fold_in(jr.key(0), i),
                                   n_genes=n_genes // n_blocks, n_samples=n_samples,
                                   cells_per_sample=n_cells // n_samples)
        blocks.append(np.array(jax.ops.segment_sum(data.counts, data.sample, num_segments=n_samples)))
        del data
    counts = np.concatenate(blocks, axis=1)
    rng = np.random.default_rng(0)
    genes, samples = rng.choice(n_genes, n_genes // 20, replace=False), rng.integers(0, n_samples, n_genes // 20)
    counts[samples, genes] = counts[samples, genes] * 10 + 50  # outliers for Cook's distance
    design = np.column_stack([np.ones(n_samples), np.arange(n_samples) >= n_samples // 2]).astype(float)
    names = [f"s{i}" for i in range(n_samples)]

    def reference():
        dds = DeseqDataSet(counts=pd.DataFrame(counts.astype(int), index=names,
                                               columns=[f"g{i}" for i in range(n_genes)]),
                           metadata=pd.DataFrame({"condition": ["a"] * (n_samples // 2) + ["b"] * (n_samples // 2)},
                                                 index=names),
                           design="~condition", quiet=True, n_cpus=1)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["condition", "b", "a"], quiet=True, n_cpus=1)
        stats.summary()
        return dds, stats

    result, (dds, stats), timing = _interleaved(
        lambda: deseq2(jnp.asarray(counts), jnp.asarray(design), jnp.asarray([0.0, 1.0]), linear_mu=True),
        reference)
    res = stats.results_df
    ok = res["pvalue"].notna().to_numpy() & ~np.isnan(np.asarray(result.pvalue))
    lfc, p, padj = (np.asarray(v)[ok] for v in (result.log2_fold_change, result.pvalue, result.padj))
    row = {"task": "pseudobulk_deseq2", "n_cells": n_cells, "n_genes": n_genes, "n_samples": n_samples,
           "simulated_gene_blocks": n_blocks, "defaults": "refit_cooks, cooks_filter, independent_filter", **timing,
           "genes_refitted": int(dds.var["refitted"].sum()), "cooks_flagged": int(dds.cooks_outlier().sum()),
           "pvalue_nan_differs": int(np.sum(np.isnan(np.asarray(result.pvalue)) != res["pvalue"].isna().to_numpy())),
           "padj_nan_differs": int(np.sum(np.isnan(np.asarray(result.padj)) != res["padj"].isna().to_numpy())),
           "lfc_pearson": float(np.corrcoef(lfc, res["log2FoldChange"].to_numpy()[ok])[0, 1]),
           "pvalue_spearman": float(st.spearmanr(p, res["pvalue"].to_numpy()[ok])[0]),
           "fdr05_call_disagreement": float(np.mean((np.nan_to_num(padj, nan=1.0) < 0.05)
                                                   != (res["padj"].fillna(1.0).to_numpy()[ok] < 0.05)))}
    print(row, flush=True)
    return row


def bench_ks(n_cells: int, n_genes: int) -> dict:
    from diffbio_eqx._de._distribution import ks_statistic

    rng = np.random.default_rng(0)
    x = np.round(rng.gamma(1.0, 2.0, (n_cells, n_genes)), 1)  # ties, as in expression data
    first = np.arange(n_cells) < n_cells // 3
    # genes in blocks of `batch` (all at once up to 20M values): the vmapped sort's temporaries stay ~1 GB
    batch = next(b for b in range(min(n_genes, max(1, 2 * 10**7 // n_cells)), 0, -1) if n_genes % b == 0)
    block = jax.vmap(ks_statistic, in_axes=(1, None))
    fn = jax.jit(lambda v, f: jax.lax.map(
        lambda start: block(jax.lax.dynamic_slice_in_dim(v, start, batch, axis=1), f),
        jnp.arange(0, n_genes, batch)).reshape(-1))
    ours, theirs, timing = _interleaved(
        lambda: fn(jnp.asarray(x), jnp.asarray(first)),
        lambda: np.array([st.ks_2samp(x[first, g], x[~first, g]).statistic for g in range(n_genes)]))
    row = {"task": "ks_statistic", "n_cells": n_cells, "n_genes": n_genes, "gene_batch": batch, **timing,
           "genes_not_exactly_equal": int(np.sum(np.asarray(ours) != theirs))}
    print(row, flush=True)
    return row


@functools.cache
def _pcha_input(n_cells: int) -> np.ndarray:
    """A 20-dim PCA (float64) of the 500 most variable genes of log-normalised simulated counts."""
    counts, _, _ = simulated_counts(n_cells, n_genes=2000, n_groups=5)
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    centred = logged - logged.mean(axis=0)
    u, s, _ = np.linalg.svd(centred[:, np.argsort(-centred.var(axis=0))[:500]], full_matrices=False)
    return u[:, :20] * s[:20]


def bench_pcha(n_cells: int, dtype: str = "float64", n_archetypes: int = 5) -> dict:
    np.mat = np.asmatrix  # py_pcha 0.1.3 needs it under NumPy 2 (shim for the reference only)
    from py_pcha import PCHA

    from diffbio_eqx._archetypes._pcha import pcha_from, supported_xla_options

    x = _pcha_input(n_cells).astype(dtype)
    np.random.seed(0)  # py_pcha's draws, taken in its order, as our initialisation
    first = int(np.ceil(n_cells * np.random.rand()))
    s0 = -np.log(np.random.random((n_archetypes, n_cells))).astype(dtype)
    fn = jax.jit(pcha_from, compiler_options=supported_xla_options())  # as `pcha` compiles it

    def reference():
        np.random.seed(0)
        return PCHA(x.T, n_archetypes)[4]

    def ours():
        # float32 as a user runs it, JAX's x64 off (this script turns it on for the float64 rows)
        with jax.enable_x64(dtype == "float64"):
            return fn(jnp.asarray(x), jnp.asarray(first), jnp.asarray(s0))

    result, theirs, timing = _interleaved(ours, reference)
    row = {"task": "pcha", "dtype": dtype, "n_cells": n_cells, "n_genes": 2000, "n_dims": 20,
           "n_archetypes": n_archetypes, **timing,
           "variance_explained": float(result.variance_explained), "reference_variance_explained": float(theirs),
           "n_iter": int(result.n_iter)}
    print(row, flush=True)
    return row


def main() -> None:
    global ROUNDS
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", default=["markers", "pseudobulk", "ks", "pcha"])
    parser.add_argument("--marker-methods", nargs="*", default=["wilcoxon", "t-test"])
    parser.add_argument("--pcha-dtypes", nargs="*", default=["float64", "float32"])
    args = parser.parse_args()
    ROUNDS = args.rounds
    path = args.out / "de.json"
    sections = {"markers": lambda: bench_markers(args.cells, args.genes, args.marker_methods),
                "pseudobulk": lambda: [bench_pseudobulk(args.cells, args.genes)],
                "ks": lambda: [bench_ks(args.cells, args.genes)],
                "pcha": lambda: [bench_pcha(args.cells, dtype) for dtype in args.pcha_dtypes]}
    for name in args.only:  # written after each section, merged with the runs of other sizes already there
        runs = merge_runs(path, sections[name](), ("task", "n_cells", "n_genes", "dtype"))
        write_json(path, {"environment": environment("scanpy", "pydeseq2", "scipy", "py_pcha"), "runs": runs})


if __name__ == "__main__":
    main()
