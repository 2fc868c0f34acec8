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


#: Stored entries per pass where a whole-matrix temporary would be large (its pages, first touched, cost more than
#: the arithmetic on them).
CHUNK_ENTRIES = 1 << 21

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


# Row and column sums as SciPy's sparse products with a vector of ones: each adds a row's or a column's entries
# in storage order, as `np.bincount` with weights does (the same bits), 5-9x sooner at 20,000 x 2,000. The genes
# that `filter_genes` drops stay in the matrix (SciPy's column indexing copies every entry) and weigh 0 in the row
# sums: adding `+0.0` leaves a partial sum as it is, so the totals are those of the filtered matrix, bit for bit.


def _row_sums(x: Any, columns: np.ndarray | None = None) -> np.ndarray:
    """Each row's sum over the columns that `columns` (a boolean mask) keeps; all columns by default."""
    return x @ (np.ones(x.shape[1]) if columns is None else columns.astype(np.float64))


def _mean_var(x: Any, in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Column means and unbiased variances (scanpy's `_get_mean_var`, R convention), float64. `in_place`: square
    the float64 entries of `x` where they lie (a caller's temporary) rather than in a new array."""
    n = x.shape[0]
    x = sp.csr_matrix(x, dtype=np.float64)
    ones = np.ones(n, dtype=np.float64)
    mean = (ones @ x) / n
    squares = np.square(x.data, out=x.data if in_place else None)
    mean_sq = (ones @ sp.csr_matrix((squares, x.indices, x.indptr), shape=x.shape)) / n
    var = mean_sq - mean**2
    return mean, var * (n / (n - 1)) if n > 1 else var


def median_normalized(x: Any, columns: np.ndarray | None = None) -> sp.csr_matrix:
    """`scanpy.pp.normalize_total(target_sum=None)` of `x[:, columns]`, float64: rows scaled to the median of the
    non-zero totals (rows summing to zero left at zero); the other columns are scaled along (and not used after)."""
    data = x.data.astype(np.float64)  # the result's entries, scaled in place below
    totals = _row_sums(sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape), columns)
    scale = float(np.median(totals[totals > 0])) / (totals + (totals == 0))
    for first, last in _row_chunks(x.indptr):  # one scale per stored entry, a chunk of rows at a time
        start, stop = x.indptr[first], x.indptr[last]
        data[start:stop] *= np.repeat(scale[first:last], np.diff(x.indptr[first:last + 1]))
    return sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape)


def _row_chunks(indptr: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive row ranges `(first, last)` covering every row, of about `CHUNK_ENTRIES` stored entries each."""
    n_rows = indptr.size - 1
    cuts = np.searchsorted(indptr, np.arange(CHUNK_ENTRIES, indptr[-1], CHUNK_ENTRIES), side="right") - 1
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 0, n_rows), [n_rows]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def highly_variable_seurat(normalized: sp.csr_matrix, genes: np.ndarray | None = None, in_place: bool = False
                           ) -> np.ndarray:
    """`scanpy.pp.highly_variable_genes(flavor="seurat")` on `log1p(normalized[:, genes])`: the boolean mask over
    `genes` (indices; all columns by default). `in_place`: `normalized`'s entries may be overwritten.

    Means and dispersions come from the normalised (not logged) values, dispersion = variance / mean, logged;
    genes are binned by `log1p(mean)` into 20 equal-width bins and the log dispersion z-scored within its bin (a
    bin with a single gene gets mean 0 and scale its own dispersion, as scanpy does).
    """
    mean, var = _mean_var(normalized, in_place=in_place)
    if genes is not None:
        mean, var = mean[genes], var[genes]
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


def filter_masks(counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """scanpy's `filter_genes(min_cells=3)` then `filter_cells(min_genes=3)`: `(gene_mask, cell_mask)`.

    `counts`: CSR without explicit zeros or repeated entries (`_run.check_scrublet_input` makes it so)."""
    matrix: Any = sp.csr_matrix(counts)
    n_cells, n_genes = matrix.shape
    cells_per_gene = np.zeros(n_genes, dtype=np.int64)
    for start in range(0, matrix.nnz, CHUNK_ENTRIES):  # bincount copies its input as int64: by chunks
        cells_per_gene += np.bincount(matrix.indices[start:start + CHUNK_ENTRIES], minlength=n_genes)
    keep_gene = cells_per_gene >= 3
    genes_per_cell = np.diff(matrix.indptr)
    if not keep_gene.all():  # less each cell's entries in the dropped genes (few: found, then counted)
        dropped = np.flatnonzero(~keep_gene[matrix.indices])
        genes_per_cell = genes_per_cell - np.bincount(np.searchsorted(matrix.indptr, dropped, side="right") - 1,
                                                      minlength=n_cells)
    return keep_gene, genes_per_cell >= 3


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
    matrix: Any = sp.csr_matrix(counts)
    keep_gene, cells = filter_masks(matrix)
    kept = matrix if cells.all() else matrix[cells]
    genes = np.flatnonzero(keep_gene)
    hvg = genes[highly_variable_seurat(median_normalized(kept, keep_gene), genes, in_place=True)]
    raw = kept[:, hvg].toarray().astype(np.float32)
    if parents is None:
        parents = doublet_pairs(raw.shape[0], int(raw.shape[0] * sim_doublet_ratio), np.random.default_rng(seed))
    return PreparedCounts(raw, cells, hvg, np.asarray(parents))
