"""Scrublet's host-side preparation of the counts, as `scanpy.pp.scrublet` does it (scanpy 1.11,
`scanpy/preprocessing/_scrublet/__init__.py`, `_run_scrublet`):

1. `filter_genes(min_cells=3)`, then `filter_cells(min_genes=3)`;
2. `normalize_total` (to the median of the non-zero totals), `log1p` on a copy, `highly_variable_genes` (flavor
   `"seurat"`: mean in (0.0125, 3), normalised dispersion in (0.5, inf), 20 mean bins), keep those genes;
3. draw the simulated doublets' parent pairs (random pairs of observed cells, `sim_doublet_ratio` times the
   number of cells).

This is data preparation (sparse, host, NumPy/SciPy/pandas, each step one pass over the stored entries), like
reading a file. The rest runs in one jit (`_scrublet.scrublet_from_counts`): `normalize_total(target_sum=1e6)` of
the observed cells over the kept genes, the numerical core (z-scoring, PCA, the simulated doublets' coordinates from
their parents', kNN, the Bayesian score).
"""

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


#: scanpy.pp.highly_variable_genes' default cut-offs (flavor "seurat").
HVG_MIN_MEAN, HVG_MAX_MEAN, HVG_MIN_DISP, HVG_N_BINS = 0.0125, 3.0, 0.5, 20


@dataclasses.dataclass(frozen=True)
class PreparedCounts:
    """Observed cells' raw counts over the kept genes and the simulated doublets' parents, ready for the JAX core.

    - `raw`: `(n_kept_cells, n_hvg)` float32, dense raw counts of the highly variable genes.
    - `kept_cells`: `(n_cells,)` bool, the cells that passed `filter_cells(min_genes=3)`.
    - `genes`: indices (into the input's genes) of the highly variable genes used.
    - `parents`: `(n_sim, 2)` indices (into the kept cells) of each simulated doublet's parents.
    """

    raw: np.ndarray
    kept_cells: np.ndarray
    genes: np.ndarray
    parents: np.ndarray


def _row_ids(x: Any) -> np.ndarray:
    return np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))


def _row_sums(x: Any) -> np.ndarray:
    return np.bincount(_row_ids(x), weights=x.data, minlength=x.shape[0])


def _mean_var(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Column means and unbiased variances (scanpy's `_get_mean_var`, R convention), float64."""
    n = x.shape[0]
    data = x.data.astype(np.float64)
    mean = np.bincount(x.indices, weights=data, minlength=x.shape[1]) / n
    mean_sq = np.bincount(x.indices, weights=data * data, minlength=x.shape[1]) / n
    var = mean_sq - mean**2
    return mean, var * (n / (n - 1)) if n > 1 else var


def _scale_rows(x: Any, target: np.ndarray | float) -> sp.csr_matrix:
    """`normalize_total`: each row scaled to `target` (rows summing to zero are left at zero)."""
    totals = _row_sums(x)
    totals = totals + (totals == 0)
    scale = np.broadcast_to(np.asarray(target / totals, dtype=np.float64), (x.shape[0],))
    return sp.csr_matrix((x.data * np.repeat(scale, np.diff(x.indptr)), x.indices, x.indptr), shape=x.shape)


def median_normalized(x: Any) -> sp.csr_matrix:
    """`scanpy.pp.normalize_total(target_sum=None)`: rows scaled to the median of the non-zero totals."""
    totals = _row_sums(x)
    return _scale_rows(x, float(np.median(totals[totals > 0])))


def highly_variable_seurat(normalized: sp.csr_matrix) -> np.ndarray:
    """`scanpy.pp.highly_variable_genes(flavor="seurat")` on `log1p(normalized)`: the boolean gene mask.

    Means and dispersions come from the normalised (not logged) values, dispersion = variance / mean, logged;
    genes are binned by `log1p(mean)` into 20 equal-width bins and the log dispersion z-scored within its bin (a
    bin with a single gene gets mean 0 and scale its own dispersion, as scanpy does).
    """
    mean, var = _mean_var(normalized)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    frame = pd.DataFrame({"means": mean, "dispersions": dispersion})
    frame["mean_bin"] = pd.cut(frame["means"], bins=HVG_N_BINS)
    stats: Any = frame.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[frame["mean_bin"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = (frame["dispersions"].to_numpy() - per_gene["avg"].to_numpy()) / per_gene["dev"].to_numpy()
    norm = np.nan_to_num(norm)
    return np.asarray((mean > HVG_MIN_MEAN) & (mean < HVG_MAX_MEAN) & (norm > HVG_MIN_DISP) & (norm < np.inf))


def filter_counts(counts: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """scanpy's `filter_genes(min_cells=3)` then `filter_cells(min_genes=3)`: `(kept, cell_mask, gene_index)`.

    `counts`: CSR without explicit zeros or repeated entries (`_run.check_scrublet_input` makes it so)."""
    matrix: Any = sp.csr_matrix(counts)
    keep_gene = np.bincount(matrix.indices, minlength=matrix.shape[1]) >= 3
    genes = np.flatnonzero(keep_gene)
    cells = np.bincount(_row_ids(matrix), weights=keep_gene[matrix.indices], minlength=matrix.shape[0]) >= 3
    kept = matrix[cells] if genes.size == matrix.shape[1] else matrix[cells][:, genes]
    return sp.csr_matrix(kept), cells, genes


def doublet_pairs(n_cells: int, n_sim: int, rng: np.random.Generator) -> np.ndarray:
    """`(n_sim, 2)` parent indices drawn without repeating an ordered pair, as Scrublet's `sample_comb` does
    (uniform over the `n_cells**2` ordered pairs; a cell may pair with itself)."""
    flat = rng.choice(n_cells * n_cells, size=n_sim, replace=False) if n_cells * n_cells < 2**26 else (
        np.unique(rng.integers(0, n_cells * n_cells, size=int(n_sim * 1.01) + 16))[:n_sim]
    )
    return np.stack(np.unravel_index(rng.permutation(flat)[:n_sim], (n_cells, n_cells)), axis=1)


def prepare_counts(counts: Any, *, sim_doublet_ratio: float, seed: int, parents: np.ndarray | None = None,
                   ) -> PreparedCounts:
    """Steps 1-3 of the module docstring on one batch of raw counts.

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` raw counts, CSR without explicit zeros or repeated entries.
    - `sim_doublet_ratio`: simulated doublets per observed cell (`int(n_kept * ratio)` are drawn).
    - `seed`: seeds NumPy's generator for the pairs. (Keyword only argument.)
    - `parents`: `(n_sim, 2)` given parent pairs (indices into the kept cells) instead of drawing them, e.g. to
      compare with another tool on the same simulated doublets.
    """
    kept: Any
    kept, cells, genes = filter_counts(sp.csr_matrix(counts, dtype=np.float64))
    hvg = np.flatnonzero(highly_variable_seurat(median_normalized(kept)))
    raw = kept[:, hvg].toarray().astype(np.float32)
    if parents is None:
        parents = doublet_pairs(raw.shape[0], int(raw.shape[0] * sim_doublet_ratio), np.random.default_rng(seed))
    return PreparedCounts(raw, cells, genes[hvg], np.asarray(parents))
