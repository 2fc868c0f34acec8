"""Scrublet end to end on raw counts, as `scanpy.pp.scrublet` runs it: preparation (`_preprocess`), the JAX
core (`_scrublet`), the threshold (`_threshold`), batch by batch when batches are given."""

import dataclasses
from typing import Any

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.sparse as sp
from jaxtyping import PRNGKeyArray

from .._core._neighbors import ivf_n_lists
from .._core._validate import _format_indices
from ._ivf import IVF_PROBE_FRACTION, KNN_METHODS, ivf_neighbor_counts, probe_count, select_knn_method
from ._preprocess import PreparedCounts, prepare_counts
from ._scrublet import (
    Scrublet,
    ScrubletScores,
    adjusted_neighbors,
    default_neighbors,
    scrublet_from_counts,
    scrublet_from_neighbor_counts,
    scrublet_manifold,
    threaded_hard_neighbor_counts,
)
from ._threshold import automatic_threshold


@dataclasses.dataclass(frozen=True)
class ScrubletSettings:
    """Scrublet's settings, scanpy's defaults. `threshold=None`: automatic (`_threshold.automatic_threshold`);
    `temperature > 0`: soft neighbour counts (differentiable variant); `parents`: given doublet parent pairs
    (indices into the cells that pass `filter_cells(min_genes=3)`) instead of drawing them; `knn_method`: the
    neighbour search over observed and simulated cells, `"exact"`, `"ivf"` (the inverted-file search, `_ivf`) or
    `"auto"` (the IVF from `_ivf.SCRUBLET_IVF_MIN_POINTS` points; scanpy switches to pynndescent at 8,192);
    `ivf_probe_fraction`: the share of the IVF's lists each point searches (more: closer to exact, slower)."""

    sim_doublet_ratio: float = 2.0
    expected_doublet_rate: float = 0.05
    stdev_doublet_rate: float = 0.02
    n_neighbors: int | None = None
    n_prin_comps: int = 30
    threshold: float | None = None
    temperature: float = 0.0
    parents: Any = None
    knn_method: str = "auto"
    ivf_probe_fraction: float = IVF_PROBE_FRACTION


@dataclasses.dataclass(frozen=True)
class ScrubletResult:
    """Scrublet on one batch. `doublet_score`, `predicted_doublet`: `(n_cells,)` (NaN / False for cells scanpy's
    `filter_cells(min_genes=3)` drops); `scores_sim`: the simulated doublets' scores; `threshold` and
    `threshold_method` (`"user"`, `"minimum"` as Scrublet, or the `"otsu"` fallback); `parents`: `(n_sim, 2)`;
    `n_neighbors` and `n_neighbors_adjusted`; `genes`: the highly variable genes' column indices;
    `doublet_errors`: the scores' standard errors; `knn_method`: the search used (`"exact"` or `"ivf"`)."""

    doublet_score: np.ndarray
    predicted_doublet: np.ndarray
    doublet_errors: np.ndarray
    scores_sim: np.ndarray
    threshold: float
    threshold_method: str
    parents: np.ndarray
    n_neighbors: int
    n_neighbors_adjusted: int
    genes: np.ndarray
    knn_method: str


def check_scrublet_input(counts: Any, settings: ScrubletSettings, field: str = "counts") -> sp.csr_matrix:
    """Bad input, named: empty or all-zero cells, a threshold outside [0, 1], rates outside (0, 1)."""
    # a copy with sorted column indices, no repeated entries and no stored zeros, whatever flags the input carries
    matrix: Any = sp.csr_matrix(counts, copy=True)
    if matrix.ndim == 2:
        if not _canonical(matrix):
            matrix.has_sorted_indices = False  # makes sum_duplicates sort the indices instead of trusting the flag
            matrix.sum_duplicates()
        matrix.eliminate_zeros()
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise ValueError(f"{field}: needs at least 2 cells, got shape {matrix.shape}")
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    if not np.all(np.isfinite(totals)) or np.any(matrix.data < 0):
        raise ValueError(f"{field}: must be finite, non-negative raw counts")
    if np.any(totals == 0):
        raise ValueError(f"{field}: cells {_format_indices(np.flatnonzero(totals == 0))} have no counts "
                         "(all zero); remove empty droplets first")
    if settings.threshold is not None and not 0.0 <= settings.threshold <= 1.0:
        raise ValueError(f"threshold: Scrublet's scores lie in [0, 1], got {settings.threshold}")
    for name in ("expected_doublet_rate", "stdev_doublet_rate"):
        if not 0.0 < getattr(settings, name) < 1.0:
            raise ValueError(f"{name}: must be in (0, 1), got {getattr(settings, name)}")
    if settings.knn_method not in KNN_METHODS:
        raise ValueError(f"knn_method: must be one of {KNN_METHODS}, got {settings.knn_method!r}")
    if not 0.0 < settings.ivf_probe_fraction <= 1.0:
        raise ValueError(f"ivf_probe_fraction: must be in (0, 1], got {settings.ivf_probe_fraction}")
    if settings.sim_doublet_ratio <= 0:
        raise ValueError(f"sim_doublet_ratio: must be > 0, got {settings.sim_doublet_ratio}")
    return matrix


def _canonical(matrix: sp.csr_matrix) -> bool:
    """Whether every row's column indices strictly increase (sorted, no repeats), read from the indices
    themselves in one vectorised pass rather than from the flags the input carries."""
    indices, indptr = matrix.indices, matrix.indptr
    increasing = np.diff(indices) > 0
    boundaries = indptr[1:-1]
    increasing[boundaries[(boundaries > 0) & (boundaries < indices.size)] - 1] = True  # a new row may restart
    return bool(np.all(increasing))


def _check_neighbors(n_neighbors: int, n_obs: int, field: str) -> None:
    if not 1 <= n_neighbors < n_obs:
        raise ValueError(f"n_neighbors: {n_neighbors} needs more cells than neighbours, but {field} has "
                         f"{n_obs} cells left after Scrublet's filter_cells(min_genes=3)")


def run_scrublet(counts: Any, settings: ScrubletSettings = ScrubletSettings(), *, key: PRNGKeyArray,
                 field: str = "counts") -> ScrubletResult:
    """Scrublet on one sample of raw counts `(n_cells, n_genes)`; `key` draws the simulated doublets' parents."""
    matrix: Any = check_scrublet_input(counts, settings, field)
    seed = int(jr.randint(key, (), 0, 2**31 - 1))
    parents = None if settings.parents is None else np.asarray(settings.parents)
    prepared = prepare_counts(matrix, sim_doublet_ratio=settings.sim_doublet_ratio, seed=seed, parents=parents)
    n_obs = prepared.raw.shape[0]
    n_neighbors = default_neighbors(n_obs) if settings.n_neighbors is None else int(settings.n_neighbors)
    _check_neighbors(n_neighbors, n_obs, field)
    model = Scrublet(n_neighbors, n_prin_comps=settings.n_prin_comps,
                     expected_doublet_rate=settings.expected_doublet_rate,
                     stdev_doublet_rate=settings.stdev_doublet_rate, temperature=settings.temperature)
    knn_method = select_knn_method(settings.knn_method, n_obs + prepared.parents.shape[0], settings.temperature)
    scores = _scores(model, prepared, knn_method, settings.ivf_probe_fraction, key=jr.fold_in(key, 1))
    scores_obs, scores_sim = np.asarray(scores.scores_obs, np.float64), np.asarray(scores.scores_sim, np.float64)
    if settings.threshold is None:
        threshold, threshold_method = automatic_threshold(scores_sim)
    else:
        threshold, threshold_method = float(settings.threshold), "user"
    score = np.full(matrix.shape[0], np.nan)
    score[prepared.kept_cells] = scores_obs
    errors = np.full(matrix.shape[0], np.nan)
    errors[prepared.kept_cells] = np.asarray(scores.errors_obs, np.float64)
    return ScrubletResult(score, np.nan_to_num(score, nan=-np.inf) > threshold, errors, scores_sim, threshold,
                          threshold_method, prepared.parents, n_neighbors, scores.n_neighbors_adjusted, prepared.genes,
                          knn_method)


def _scores(model: Scrublet, prepared: PreparedCounts, method: str, probe_fraction: float, *, key: PRNGKeyArray
            ) -> ScrubletScores:
    """The JAX core on the prepared counts: one jit with the exact search, or the manifold, the IVF counts
    (`key`: its k-means) and the scores in three steps."""
    raw, parents = jnp.asarray(prepared.raw), jnp.asarray(prepared.parents, jnp.int32)
    if method == "exact" and float(model.temperature) > 0:  # soft counts: the one jit
        return scrublet_from_counts(model, raw, parents)
    manifold_obs, manifold_sim = scrublet_manifold(model, raw, parents)
    n_obs, n_sim = manifold_obs.shape[0], manifold_sim.shape[0]
    is_sim = jnp.arange(n_obs + n_sim) >= n_obs
    if method == "exact":  # the counting search's rows from host threads (`threaded_hard_neighbor_counts`)
        counts = threaded_hard_neighbor_counts(jnp.concatenate([manifold_obs, manifold_sim]), is_sim,
                                               adjusted_neighbors(model.n_neighbors, n_obs, n_sim))
        return scrublet_from_neighbor_counts(model, counts, manifold_obs, manifold_sim)
    n_probe = probe_count(ivf_n_lists(n_obs + n_sim), probe_fraction)
    counts = ivf_neighbor_counts(jnp.concatenate([manifold_obs, manifold_sim]), is_sim,
                                 adjusted_neighbors(model.n_neighbors, n_obs, n_sim), key=key, n_probe=n_probe)
    return scrublet_from_neighbor_counts(model, counts, manifold_obs, manifold_sim)


def run_scrublet_batched(counts: Any, batches: np.ndarray, settings: ScrubletSettings = ScrubletSettings(), *,
                         key: PRNGKeyArray) -> dict[Any, tuple[np.ndarray, ScrubletResult]]:
    """Scrublet within each batch, as scanpy's `batch_key` does: `{batch: (cell_indices, result)}`."""
    matrix: Any = sp.csr_matrix(counts)
    labels, sizes = np.unique(batches, return_counts=True)
    if np.any(sizes < 2):
        raise ValueError(f"batch_key: batch {labels[sizes < 2][0]!r} has {int(sizes[sizes < 2][0])} cell; "
                         "Scrublet scores each batch on its own and needs at least 2 cells per batch")
    if settings.parents is not None:
        raise ValueError("parents: given doublet parents are for a single batch, not with batch_key")
    out = {}
    for label, batch_key in zip(labels, jr.split(key, len(labels))):
        cells = np.flatnonzero(batches == label)
        out[label] = (cells, run_scrublet(matrix[cells], settings, key=batch_key, field=f"counts of batch {label!r}"))
    return out
