"""Scrublet's neighbour counts by the package's inverted-file search (`_core._neighbors.ivf_neighbor_graph`).

`scanpy.pp.scrublet` (scanpy 1.11.5, `preprocessing/_scrublet/core.py`, `_nearest_neighbor_classifier`) finds the
`k_adj` neighbours of every observed and simulated point with `Neighbors.compute_neighbors(transformer=None)`:
exact brute force (sklearn) below 8,192 points and pynndescent's approximate `PyNNDescentTransformer` (umap-learn's
settings) from there on, i.e. already for 2,731 cells at `sim_doublet_ratio` 2. (Its docstring says "annoy" for
`use_approx_neighbors`; the code uses pynndescent.) Here, from `SCRUBLET_IVF_MIN_POINTS` points on, the exact
blocked search (`_scrublet.hard_neighbor_counts`) gives way to the IVF: the points are split by coarse k-means into
`sqrt(n_points)` lists and each point is compared exactly with the points of the lists whose centroids lie
nearest its own list's (its own list in full; a quarter of the lists by default, `IVF_PROBE_FRACTION`, at least
16). The index is built over all observed and simulated points and every one of them is a query (the simulated
points' scores set the threshold), so the query set is the indexed set and `_neighbors`' partition, probe order and
search step (`_ivf_plan`, `_ivf_sorted_index`, `_ivf_chunk`) are reused as they are; only the end differs: each step
keeps the number of simulated points among its rows' `k_adj - 1` nearest others, not the neighbour lists, and no
fuzzy graph is built. Scores from the IVF's counts are compared with the exact ones in
benchmarks/results/doublets.json (`scrublet_ivf_vs_exact`).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._core._neighbors import IVF_N_PROBE, _ivf_chunk, _ivf_plan, _ivf_sorted_index, ivf_n_lists


#: `knn_method="auto"`: Scrublet searches its observed + simulated points exactly below this many points and by the
#: IVF from here on. Scrublet's manifold is 30 z-scored PCs, mostly noise within a cell type, and its `k_adj` is
#: large, so each point's neighbours spread over many lists: the IVF needs a quarter of the lists (AUPRC 0.806 vs
#: 0.816 exact at 20,000 cells), so its work grows as `n^2 / 4`, like the exact search's `n^2`. Since the exact
#: counts stopped using a top-k over each row (`_counts`), they cost no more than the IVF's: at 60,000 points and
#: `k_adj` 213, 9.1-9.4 CPU-seconds exact against 10.3 for the IVF (second calls, 2-core CPU at load 15-18). So
#: `"auto"` searches exactly up to a million points; the IVF stays available (`knn_method="ivf"`).
SCRUBLET_IVF_MIN_POINTS = 1_000_000

#: `ScrubletSettings.ivf_probe_fraction`'s default: the share of the lists each point searches (at least 16).
IVF_PROBE_FRACTION = 0.25

#: `ScrubletSettings.knn_method`'s choices.
KNN_METHODS = ("auto", "exact", "ivf")

#: The IVF's candidate count is rounded up to a multiple of this, so data of similar size reuse one compilation.
CANDIDATE_QUANTUM = 256


def select_knn_method(method: str, n_points: int, temperature: float) -> str:
    """The kNN search Scrublet runs: `"exact"` or `"ivf"` (`method="auto"`: the IVF from
    `SCRUBLET_IVF_MIN_POINTS` points; soft counts (`temperature > 0`) always search exactly)."""
    if method not in KNN_METHODS:
        raise ValueError(f"knn_method: must be one of {KNN_METHODS}, got {method!r}")
    if temperature > 0:
        if method == "ivf":
            raise ValueError("knn_method: 'ivf' gives hard counts only; soft counts (temperature > 0) search exactly")
        return "exact"
    if method == "auto":
        return "ivf" if n_points >= SCRUBLET_IVF_MIN_POINTS else "exact"
    return method


def probe_count(n_lists: int, fraction: float) -> int:
    """Lists each point searches: `ceil(fraction * n_lists)`, at least `IVF_N_PROBE` (16), at most `n_lists`."""
    return min(n_lists, max(IVF_N_PROBE, math.ceil(fraction * n_lists)))


def ivf_neighbor_counts(
    manifold: Float[Array, "n_points n_pcs"], is_sim: Bool[Array, " n_points"], k_adj: int, *, key: PRNGKeyArray,
    n_probe: int | None = None,
) -> Float[Array, " n_points"]:
    """How many of each point's `k_adj - 1` nearest other points are simulated doublets, by the IVF search (module
    docstring): the same count as `_scrublet.hard_neighbor_counts` wherever the IVF finds the exact neighbours.

    **Arguments:**

    - `manifold`: `(n_points, n_pcs)` concrete coordinates of the observed and simulated points (call outside jit:
      the lists' sizes are read back to the host to size the search, as `ivf_neighbor_graph` does).
    - `is_sim`: `(n_points,)` which points are simulated doublets.
    - `k_adj`: neighbours counting the point itself, at most `n_points`.
    - `key`: draws the k-means sample and its starting centroids. (Keyword only argument.)
    - `n_probe`: lists searched per point; default `probe_count(n_lists, IVF_PROBE_FRACTION)`.
    """
    manifold = jnp.asarray(manifold)
    n_points = manifold.shape[0]
    if not 1 <= k_adj <= n_points:
        raise ValueError(f"k_adj: must be in [1, {n_points}] (the number of points), got {k_adj}")
    n_lists = ivf_n_lists(n_points)
    n_probe = probe_count(n_lists, IVF_PROBE_FRACTION) if n_probe is None else min(int(n_probe), n_lists)
    assignment, sizes, probes, n_rows, n_candidates = _ivf_plan(manifold, key, n_lists, n_probe, int(k_adj),
                                                                CANDIDATE_QUANTUM)
    return _ivf_counts(manifold, jnp.asarray(is_sim), assignment, sizes, probes, (int(k_adj), n_rows, n_candidates))


@eqx.filter_jit
def _ivf_counts(
    manifold: Float[Array, "n_points n_pcs"],
    is_sim: Bool[Array, " n_points"],
    assignment: Int[Array, " n_points"],
    sizes: Int[Array, " n_lists"],
    probes: Int[Array, "n_lists n_probe"],
    shape: tuple[int, int, int],
) -> Float[Array, " n_points"]:
    """The search of `_neighbors._ivf_search`, keeping per query row the simulated points among its `k_adj`
    nearest, the row itself left out; `shape` is `(k_adj, rows per step, candidates per step)`, all static."""
    k_adj, n_rows, n_candidates = shape
    n_points = manifold.shape[0]
    index, chunk_ends, n_chunks = _ivf_sorted_index(manifold, assignment, sizes, probes, n_rows)
    sorted_sim = is_sim[index.order]

    def count(chunk: Array) -> tuple[Array, Array]:
        rows, neighbours, _ = _ivf_chunk(index, chunk, chunk_ends, k_adj, n_rows, n_candidates)
        others = neighbours != rows[:, None]
        return rows, jnp.sum(sorted_sim[neighbours] & others, axis=1)

    rows, counts = jax.lax.map(count, jnp.arange(n_chunks, dtype=jnp.int32))
    rows = rows.reshape(-1)
    points = jnp.where(rows < n_points, index.order[jnp.minimum(rows, n_points - 1)], n_points)
    return jnp.zeros(n_points, manifold.dtype).at[points].set(counts.reshape(-1).astype(manifold.dtype),
                                                               mode="drop")
