"""The shared neighbour graph: exact kNN in blocks, and UMAP's fuzzy simplicial set as the connectivities.

Every operator that needs neighbours (UMAP now; doublets, imputation, pseudotime, communication next) takes a
`NeighborGraph` from `neighbor_graph`. Nothing here builds an `n_cells x n_cells` matrix: the kNN search runs over
memory-bounded blocks of query rows, and the fuzzy simplicial set is a fixed-size edge list
(`2 * n_cells * n_neighbors` slots, unused ones carrying zero weight), so everything jits and the shapes depend
only on `n_cells` and `n_neighbors`.

Three kNN backends sit behind `neighbor_graph(method=...)`; whichever finds the neighbours, the distances are
recomputed from `x` the same way and the same jitted `fuzzy_simplicial_set` follows, so equal neighbour lists
give identical graphs:

- `"exact"`: blocked brute force (`exact_knn`), O(n^2) work; what scanpy does below 8,192 cells (Euclidean).
  `exact_knn(screened=True)` (MAGIC's search) finds candidates by a bfloat16 product that bounds every score from
  above and certifies each row exactly in float32 (`_screened_block`): the same neighbours for a third of the
  product's cost where bfloat16 products are fast (`bf16_products_pay`).
- `"ivf"`: an inverted-file index in JAX (`ivf_knn`, `ivf_neighbor_graph`; faiss's `IndexIVFFlat`): k-means into
  `sqrt(n)` lists, each cell compared exactly with the cells of the 16 lists nearest its own, O(n^1.5) work; runs
  on any device with no compile outside XLA's (recall@15 0.99+ on 100k simulated PCs).
- `"pynndescent"`: nearest-neighbour descent (Dong et al. 2011) through the `pynndescent` package on the host,
  outside jit, with umap-learn's and scanpy's settings (`n_trees = min(64, 5 + round(sqrt(n) / 20))`,
  `n_iters = max(5, round(log2(n)))`, `max_candidates = 60`): the field's standard on CPU, what scanpy and
  umap-learn use above that size. Chosen over faiss because it is what the reference tools run (same graph
  quality by construction), it is pure Python + numba (no compiled wheels per platform), and it was already
  installed with umap-learn and scanpy.
- `"approx_top_k"`: the blocked search with `jax.lax.approx_max_k` (recall target 0.95) in place of the exact
  top-k: the accelerators' approximate top-k (fast on TPU; XLA lowers it to an exact top-k on CPU and GPU), so it
  jits and stays on the device.

`"auto"` (the default) picks by size and device (`select_neighbor_method`): exact below 8,192 cells, then
approximate top-k on GPU/TPU; on CPU exact below 20,000 cells and the IVF above. pynndescent is never picked
automatically (its numba code compiles for 45-60 s in every new process) but can be forced.

The connectivities are scanpy's default (`scanpy.pp.neighbors(method="umap")` writes them as
`obsp["connectivities"]`); the numerics follow umap-learn 0.5 (`umap/umap_.py`: `smooth_knn_dist`,
`compute_membership_strengths`, `fuzzy_simplicial_set`); the code is our own.
"""

import functools
import math
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, BFloat16, Bool, Float, Int, PRNGKeyArray

from ._geometry import squared_distances
from ._validate import _is_traced, check_embedding


#: The kNN backends `neighbor_graph` knows; `"auto"` picks one of the others (`select_neighbor_method`).
NEIGHBOR_METHODS = ("auto", "exact", "ivf", "pynndescent", "approx_top_k")

#: `method="auto"` searches exactly below this many cells (scanpy's cut for Euclidean kNN: `n_obs < 8192`).
EXACT_MAX_CELLS = 8192

#: On CPU, `method="auto"` keeps the exact search below this many cells and uses the inverted-file search
#: (`"ivf"`) from here on: below it the exact search's quadratic work costs about what the IVF's k-means and its
#: extra JAX compiles cost (2-core CPU: 30k cells exact 26 s, IVF 18 s with its compiles, 3 s without).
IVF_MIN_CELLS = 20_000

#: `jax.lax.approx_max_k`'s recall target for `method="approx_top_k"` (JAX's default).
APPROX_RECALL_TARGET = 0.95

# umap-learn's constants (umap/umap_.py).
SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3


def _sorted_neighbors(
    queries: Float[Array, "n_block n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    indices: Int[Array, "n_block n_neighbors"],
) -> tuple[Int[Array, "n_block n_neighbors"], Float[Array, "n_block n_neighbors"]]:
    """The chosen neighbours' distances, computed directly (no cancellation error), and the rows re-sorted by
    them (stable: a row's first column stays first among equal distances). Every backend ends here."""
    differences = queries[:, None, :] - reference[indices]
    distances = jnp.sqrt(jnp.sum(differences * differences, axis=-1))
    order = jnp.argsort(distances, axis=1, stable=True)
    return jnp.take_along_axis(indices, order, axis=1), jnp.take_along_axis(distances, order, axis=1)


#: Reference points per group in the two-stage exact top-k (`_grouped_top_k`).
KNN_GROUP = 32


def _grouped_top_k(scores: Float[Array, "n_block n_reference"], k: int) -> Int[Array, "n_block k"]:
    """`jax.lax.top_k(scores, k)[1]`, the same indices, without a top-k over whole rows (XLA's CPU top-k sorts
    each row). The columns form contiguous groups of `KNN_GROUP`; the `k` groups with the largest maxima hold
    every one of the `k` largest scores (fewer than `k` groups hold a score above the `k`-th, and among groups tied
    at it the lower-indexed win, as lower columns win ties in `top_k`), so a top-k over the group maxima and one
    over those groups' `k * KNN_GROUP` columns, kept in column order, give the same result."""
    n_block, n = scores.shape
    n_groups = -(-n // KNN_GROUP)
    padded = jnp.pad(scores, ((0, 0), (0, n_groups * KNN_GROUP - n)), constant_values=-jnp.inf)
    grouped = padded.reshape(n_block, n_groups, KNN_GROUP)
    groups = jnp.sort(jax.lax.top_k(jnp.max(grouped, axis=2), k)[1], axis=1)  # column order
    candidates = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(n_block, k * KNN_GROUP)
    chosen = jax.lax.top_k(candidates, k)[1]
    return jnp.take_along_axis(groups, chosen // KNN_GROUP, axis=1) * KNN_GROUP + chosen % KNN_GROUP


def _knn_scores(
    queries: Float[Array, "n_block n_dims"], reference: Float[Array, "n_reference n_dims"], fast: bool
) -> Float[Array, "n_block n_reference"]:
    """Scores whose row order is nearest first: `-|q - r|^2` from one product, clipped at 0; `fast`: `2 q.r -
    |r|^2` (`|q|^2` less that), the same ranking up to rounding, about 2.5x cheaper on CPU (XLA's fused loop with
    both norms broadcast is slow); either way the chosen neighbours' distances are recomputed exactly after."""
    if fast:
        return 2 * (queries @ reference.T) - jnp.sum(reference * reference, axis=1)[None, :]
    return -squared_distances(queries, reference)


#: `fast` scores come from one product of augmented rows, `[q, 1, 0...] . [2 r, -|r|^2, 0...]`, whose width is
#: padded to a multiple of this (no pass over the scores after the product: 0.9x the search's CPU at 50,000 x 100).
FAST_SCORE_WIDTH_QUANTUM = 8


def _fast_score_rows(
    queries: Float[Array, "n_queries n_dims"], reference: Float[Array, "n_reference n_dims"]
) -> tuple[Float[Array, "n_queries n_wide"], Float[Array, "n_columns n_wide"]]:
    """Rows whose products are the `fast` scores: `[q, 1, 0...] . [2 r, -|r|^2, 0...] = 2 q.r - |r|^2`. The
    reference gets `[0, -inf, 0...]` rows up to a multiple of `KNN_GROUP` (`n_columns`): their scores are `-inf`,
    never chosen, and `_grouped_top_k` then needs no padded copy of the scores (on 50,000 x 50,000, padding the
    ragged last group cost 0.27x the search's CPU)."""
    n_dims = queries.shape[1]
    pad = -(n_dims + 1) % FAST_SCORE_WIDTH_QUANTUM
    norms = jnp.sum(reference * reference, axis=1, keepdims=True)
    wide_queries = jnp.concatenate(
        [queries, jnp.ones((queries.shape[0], 1), queries.dtype), jnp.zeros((queries.shape[0], pad), queries.dtype)],
        axis=1)
    wide_reference = jnp.concatenate(
        [2 * reference, -norms, jnp.zeros((reference.shape[0], pad), reference.dtype)], axis=1)
    n_extra = -reference.shape[0] % KNN_GROUP
    never = jnp.zeros((n_extra, wide_reference.shape[1]), reference.dtype).at[:, n_dims].set(-jnp.inf)
    return wide_queries, jnp.concatenate([wide_reference, never])


def _knn_block(
    queries: Float[Array, "n_block n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    self_index: Int[Array, " n_block"] | None = None,
    approximate: bool = False,
    fast: bool = False,
    wide: tuple[Float[Array, "n_block n_wide"], Float[Array, "n_columns n_wide"]] | None = None,
) -> tuple[Int[Array, "n_block n_neighbors"], Float[Array, "n_block n_neighbors"]]:
    # Select with the one-matmul scores, then recompute the k chosen distances directly and re-sort. `wide`: the
    # block's and the reference's `_fast_score_rows`, whose product is the fast scores.
    scores = wide[0] @ wide[1].T if wide is not None else _knn_scores(queries, reference, fast)
    if self_index is not None:  # a cell is its own first neighbour, even among exact duplicates
        columns = jnp.arange(reference.shape[0], dtype=self_index.dtype)
        scores = jnp.where(columns[None, :] == self_index[:, None], jnp.inf, scores)
    if approximate:
        _, indices = jax.lax.approx_max_k(scores, n_neighbors, recall_target=APPROX_RECALL_TARGET)
    elif reference.shape[0] >= 4 * n_neighbors * KNN_GROUP:
        indices = _grouped_top_k(scores, n_neighbors)
    else:
        _, indices = jax.lax.top_k(scores, n_neighbors)
    return _sorted_neighbors(queries, reference, indices)


#: bfloat16's unit roundoff (8 significant bits).
BF16_UNIT_ROUNDOFF = 2.0**-8

#: The screen's bound on `|2 q.r - 2 bf16(q).bf16(r)|` as a multiple of `|q| |r|`: `2 (2u + u^2)` from rounding
#: each coordinate, times 1.25 to cover the bound's own bfloat16 rounding and the float32 accumulation.
SCREEN_BOUND = 1.25 * 2 * (2 * BF16_UNIT_ROUNDOFF + BF16_UNIT_ROUNDOFF**2)

#: The screen's allowance for `|r|^2`, split into two bfloat16 parts, and for the accumulation's rounding.
SCREEN_NORM_BOUND = 2.0**-12

#: Candidates per requested neighbour that the screen keeps for the float32 re-ranking. On 50,000 simulated cells
#: x 100 PCs (MAGIC's PCs of median-scaled counts), 32 candidates certified the 16 nearest for 99.8 % of cells (28:
#: 95.8 %, 40: all of 3,000 checked); on the PCs of unit-scaled counts (Open Problems' MAGIC) 32 certified 97-98 %,
#: 40 all of 5,000 checked, and the search took 3.1-3.2 s against 3.2-3.4 s for 32 (2 threads).
SCREEN_CANDIDATES_PER_NEIGHBOR = 2.5

#: Rows of a block the screen could not certify that are searched again in float32 (more: the whole block).
SCREEN_RETRIES = 8


@functools.cache
def bf16_products_pay() -> bool:
    """Whether bfloat16 products (float32 accumulation) beat float32 ones on the default device: on CPUs with
    AVX512-BF16 or AMX (3x on a Sapphire Rapids core: 404 vs 135 GMAC/s) and on accelerators; elsewhere XLA
    emulates them and the screen would cost more than it saves."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as info:
            flags = set(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _screen_rows(
    queries: Float[Array, "n_queries n_dims"], reference: Float[Array, "n_reference n_dims"]
) -> tuple[BFloat16[Array, "n_queries n_wide"], BFloat16[Array, "n_columns n_wide"]]:
    """bfloat16 rows whose float32-accumulated product bounds every fast score from above:
    `[q, 1, 1, c|q|, 1] . [2 r, -hi, -lo, |r|, e |r|^2] >= 2 q.r - |r|^2`, with `hi + lo` the norm to 2^-16 and
    `c`, `e` the rounding bounds (`SCREEN_BOUND`, `SCREEN_NORM_BOUND`). Reference rows up to a multiple of
    `KNN_GROUP` score `-inf`, as in `_fast_score_rows`."""
    n_queries, n_dims = queries.shape
    pad = -(n_dims + 4) % FAST_SCORE_WIDTH_QUANTUM
    bf16 = jnp.bfloat16
    norms = jnp.sum(reference * reference, axis=1, keepdims=True)
    hi = norms.astype(bf16).astype(norms.dtype)
    ones = jnp.ones((n_queries, 1), queries.dtype)
    query_norms = jnp.sqrt(jnp.sum(queries * queries, axis=1, keepdims=True))
    wide_queries = jnp.concatenate(
        [queries, ones, ones, SCREEN_BOUND * query_norms, ones, jnp.zeros((n_queries, pad), queries.dtype)], axis=1)
    wide_reference = jnp.concatenate(
        [2 * reference, -hi, hi - norms, jnp.sqrt(norms), SCREEN_NORM_BOUND * norms,
         jnp.zeros((reference.shape[0], pad), reference.dtype)], axis=1)
    never = jnp.zeros((-reference.shape[0] % KNN_GROUP, wide_reference.shape[1]), reference.dtype)
    never = never.at[:, n_dims].set(-jnp.inf)
    return wide_queries.astype(bf16), jnp.concatenate([wide_reference, never]).astype(bf16)


def _screened_block(
    queries: Float[Array, "n_block n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    screen: tuple[BFloat16[Array, "n_block n_wide"], BFloat16[Array, "n_columns n_wide"]],
) -> tuple[Int[Array, "n_block n_neighbors"], Float[Array, "n_block n_neighbors"], Bool[Array, " n_block"]]:
    """The exact neighbours of a block from bfloat16 upper bounds: keep the `m` best bounds, measure those
    candidates' distances in float32, and certify each row: every cell left out has a bound, hence a score, below
    the `n_neighbors`-th candidate's. Returns which rows are certified."""
    upper = jax.lax.dot_general(screen[0], screen[1], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    m = min(int(SCREEN_CANDIDATES_PER_NEIGHBOR * n_neighbors), reference.shape[0])
    if reference.shape[0] >= 4 * m * KNN_GROUP:
        candidates = _grouped_top_k(upper, m)
    else:
        candidates = jax.lax.top_k(upper, m)[1]
    kept_bound = jnp.min(jnp.take_along_axis(upper, candidates, axis=1), axis=1).astype(queries.dtype)
    candidates = jnp.sort(candidates, axis=1)  # ties go to the lower index, as in `top_k` over whole rows
    differences = queries[:, None, :] - reference[candidates]
    squared = jnp.sum(differences * differences, axis=-1)
    neg_squared, chosen = jax.lax.top_k(-squared, n_neighbors)
    query_squared = jnp.sum(queries * queries, axis=1)
    kth_score = query_squared + neg_squared[:, -1]  # |q|^2 - d_k^2 = 2 q.r_k - |r_k|^2
    margin = SCREEN_NORM_BOUND * (query_squared - neg_squared[:, -1])
    certified = kept_bound < kth_score - margin if m < reference.shape[0] else jnp.ones(queries.shape[0], bool)
    return jnp.take_along_axis(candidates, chosen, axis=1), jnp.sqrt(-neg_squared), certified


def knn_block_size(n_reference: int, memory_budget: int = 2**24) -> int:
    """Query rows per block so that one block's distance matrix holds at most `memory_budget` elements."""
    return max(1, memory_budget // max(n_reference, 1))


def _check_knn_shapes(queries: Array, reference: Array, n_neighbors: int) -> None:
    n_reference = reference.shape[0]
    if not 1 <= n_neighbors <= n_reference:
        raise ValueError(f"n_neighbors: must be in [1, {n_reference}] (the reference size), got {n_neighbors}")
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims but the reference has {reference.shape[1]}")


def _blocked_knn(
    queries: Float[Array, "n_queries n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    block_size: int | None,
    self_first: bool,
    approximate: bool = False,
    fast: bool = False,
    screened: bool = False,
) -> tuple[Int[Array, "n_queries n_neighbors"], Float[Array, "n_queries n_neighbors"]]:
    n_queries, n_dims = queries.shape
    block = min(block_size or knn_block_size(reference.shape[0]), n_queries)
    n_blocks = -(-n_queries // block)
    padded = jnp.concatenate([queries, jnp.zeros((n_blocks * block - n_queries, n_dims), dtype=queries.dtype)])
    blocks = padded.reshape(n_blocks, block, n_dims)
    if screened and not self_first:
        indices, distances = _screened_knn(blocks, reference, n_neighbors, n_queries)
    elif fast and not self_first:  # the scores straight out of one product (`_fast_score_rows`)
        wide_queries, wide_reference = _fast_score_rows(blocks.reshape(n_blocks * block, n_dims), reference)
        wide_blocks = wide_queries.reshape(n_blocks, block, -1)
        indices, distances = jax.lax.map(
            lambda b: _knn_block(b[0], reference, n_neighbors, None, approximate, fast, (b[1], wide_reference)),
            (blocks, wide_blocks))
    elif self_first:
        rows = jnp.arange(n_blocks * block, dtype=jnp.int32).reshape(n_blocks, block)
        indices, distances = jax.lax.map(
            lambda b: _knn_block(b[0], reference, n_neighbors, b[1], approximate, fast), (blocks, rows)
        )
    else:
        indices, distances = jax.lax.map(
            lambda b: _knn_block(b, reference, n_neighbors, None, approximate, fast), blocks)
    return (
        indices.reshape(n_blocks * block, n_neighbors)[:n_queries],
        distances.reshape(n_blocks * block, n_neighbors)[:n_queries],
    )


def _screened_knn(
    blocks: Float[Array, "n_blocks n_block n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    n_queries: int,
) -> tuple[Int[Array, "n_blocks n_block n_neighbors"], Float[Array, "n_blocks n_block n_neighbors"]]:
    """`_screened_block` over the blocks; the rows the screen cannot certify are searched again in float32 (the
    whole block where more than `SCREEN_RETRIES` are)."""
    n_blocks, block, n_dims = blocks.shape
    rows = blocks.reshape(n_blocks * block, n_dims)
    screen_queries, screen_reference = _screen_rows(rows, reference)
    wide_queries, wide_reference = _fast_score_rows(rows, reference)
    padding = (jnp.arange(n_blocks * block) >= n_queries).reshape(n_blocks, block)

    def search(b: tuple) -> tuple[Array, Array]:
        queries, screen, wide, pad = b
        indices, distances, certified = _screened_block(queries, reference, n_neighbors, (screen, screen_reference))
        failed = ~(certified | pad)

        def retry() -> tuple[Array, Array]:  # the few rows not certified, in float32
            redo = jnp.nonzero(failed, size=SCREEN_RETRIES, fill_value=queries.shape[0])[0]  # the fill is dropped
            again = _knn_block(queries[redo], reference, n_neighbors, fast=True, wide=(wide[redo], wide_reference))
            return indices.at[redo].set(again[0], mode="drop"), distances.at[redo].set(again[1], mode="drop")

        def whole_block() -> tuple[Array, Array]:
            return _knn_block(queries, reference, n_neighbors, fast=True, wide=(wide, wide_reference))

        n_failed = jnp.sum(failed)
        branch = jnp.where(n_failed > SCREEN_RETRIES, 2, jnp.where(n_failed > 0, 1, 0))
        return jax.lax.switch(branch, [lambda: (indices, distances), retry, whole_block])

    shaped = (screen_queries.reshape(n_blocks, block, -1), wide_queries.reshape(n_blocks, block, -1))
    return jax.lax.map(search, (blocks, *shaped, padding))


def exact_knn(
    queries: Float[Array, "n_queries n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    *,
    block_size: int | None = None,
    fast: bool = False,
    screened: bool = False,
) -> tuple[Int[Array, "n_queries n_neighbors"], Float[Array, "n_queries n_neighbors"]]:
    """Exact Euclidean k nearest neighbours by blocked brute force.

    Query rows are processed `block_size` at a time with `lax.map`, each block computing its
    `(block_size, n_reference)` squared distances and keeping the `n_neighbors` smallest with `lax.top_k`, so
    peak memory is `block_size * n_reference` elements whatever the number of queries.

    **Arguments:**

    - `queries`: shape `(n_queries, n_dims)`.
    - `reference`: shape `(n_reference, n_dims)`; pass the same array as `queries` for a kNN graph (each cell
      is then its own first neighbour, at distance 0, as in umap-learn; `neighbor_graph` also guarantees it when
      cells are duplicated).
    - `n_neighbors`: `k` (static), at most `n_reference`.
    - `block_size`: query rows per block (static); default keeps a block under 2**24 distances.
    - `fast`: rank candidates by `2 q.r - |r|^2` instead of the clipped squared distance (`_knn_scores`): the
      same neighbours but where two lie within float32 rounding of each other, about twice as fast on CPU (the
      scores come straight out of one product of augmented rows, `_fast_score_rows`).
    - `screened`: find the candidates by a bfloat16 product of rows that bound every score from above
      (`_screen_rows`), then measure the `2.5 * n_neighbors` best candidates' distances in float32 and certify
      each row (no cell left out can score above the `n_neighbors`-th); rows not certified are searched again
      with `fast`. The same neighbours as `fast` (but where two lie within float32 rounding of
      each other), about twice as fast where `bf16_products_pay()`.

    **Returns:** `(indices, distances)`, each `(n_queries, n_neighbors)`, sorted by increasing distance (ties in
    index order).
    """
    _check_knn_shapes(queries, reference, n_neighbors)
    return _blocked_knn(
        queries, reference, n_neighbors, block_size, self_first=False, fast=fast, screened=screened)


def _local_rho(
    distances: Float[Array, "n_cells n_neighbors"], local_connectivity: Float[Array, ""]
) -> Float[Array, " n_cells"]:
    """Distance to the `local_connectivity`-th nearest non-zero neighbour, interpolated (umap-learn's rho)."""
    n_neighbors = distances.shape[1]
    positive = distances > 0
    n_positive = jnp.sum(positive, axis=1)
    n_zero = n_neighbors - n_positive  # rows are sorted, so the non-zero distances form the tail
    index = jnp.floor(local_connectivity).astype(n_zero.dtype)
    interpolation = (local_connectivity - jnp.floor(local_connectivity)).astype(distances.dtype)

    def nonzero(m: Int[Array, ""]) -> Float[Array, " n_cells"]:
        column = jnp.clip(n_zero + m, 0, n_neighbors - 1)
        return jnp.take_along_axis(distances, column[:, None], axis=1)[:, 0]

    below, above = nonzero(index - 1), nonzero(index)
    step = jnp.where(interpolation > SMOOTH_K_TOLERANCE, interpolation * (above - below), 0)
    rho_enough = jnp.where(index > 0, below + step, interpolation * nonzero(jnp.zeros_like(index)))
    rho_few = jnp.max(jnp.where(positive, distances, 0), axis=1)
    enough = n_positive.astype(distances.dtype) >= local_connectivity
    return jnp.where(enough, rho_enough, jnp.where(n_positive > 0, rho_few, 0))


class _BisectionState(eqx.Module):
    lo: Float[Array, " n_cells"]
    hi: Float[Array, " n_cells"]
    mid: Float[Array, " n_cells"]
    done: Bool[Array, " n_cells"]


def smooth_knn_dist(
    distances: Float[Array, "n_cells n_neighbors"],
    k: Float[ArrayLike, ""],
    *,
    n_iter: int = 64,
    local_connectivity: Float[ArrayLike, ""] = 1.0,
    bandwidth: Float[ArrayLike, ""] = 1.0,
) -> tuple[Float[Array, " n_cells"], Float[Array, " n_cells"]]:
    """Per-cell kernel widths: `rho` (distance to the nearest neighbour(s)) and `sigma` with
    $\\sum_{j \\geq 1} \\exp(-\\max(d_{ij} - \\rho_i, 0) / \\sigma_i) = \\log_2(k) \\cdot \\mathrm{bandwidth}$.

    `sigma` is found by bisection with a fixed `n_iter` steps (a row stops moving once within umap-learn's
    tolerance 1e-5 of the target, as umap-learn breaks out of its loop), then floored at 1e-3 times the mean
    neighbour distance (the row's when `rho > 0`, all rows' otherwise).

    **Arguments:**

    - `distances`: `(n_cells, n_neighbors)` sorted kNN distances, the first column the cell itself.
    - `k`: the neighbourhood size to calibrate for (umap-learn passes `n_neighbors`).
    - `n_iter`: bisection steps (static). (Keyword only argument.)
    - `local_connectivity`: how many nearest neighbours are assumed fully connected (may be fractional).
    - `bandwidth`: scales the target.

    **Returns:** `(sigma, rho)`, each `(n_cells,)`.
    """
    dtype = distances.dtype
    local_connectivity = jnp.asarray(local_connectivity, dtype=dtype)
    target = jnp.log2(jnp.asarray(k, dtype=dtype)) * jnp.asarray(bandwidth, dtype=dtype)
    rho = _local_rho(distances, local_connectivity)
    shifted = distances[:, 1:] - rho[:, None]

    def step(state: _BisectionState, _: None) -> tuple[_BisectionState, None]:
        psum = jnp.sum(jnp.where(shifted > 0, jnp.exp(-shifted / state.mid[:, None]), 1), axis=1)
        done = state.done | (jnp.abs(psum - target) < SMOOTH_K_TOLERANCE)
        too_wide = psum > target
        hi = jnp.where(too_wide, state.mid, state.hi)
        lo = jnp.where(too_wide, state.lo, state.mid)
        mid = jnp.where(too_wide | jnp.isfinite(hi), (lo + hi) / 2, state.mid * 2)
        new = _BisectionState(lo, hi, mid, done)
        return jtu.tree_map(lambda old, nw: jnp.where(done, old, nw), state, new), None

    n_cells = distances.shape[0]
    init = _BisectionState(
        jnp.zeros(n_cells, dtype), jnp.full(n_cells, jnp.inf, dtype), jnp.ones(n_cells, dtype),
        jnp.zeros(n_cells, bool),
    )
    final, _ = jax.lax.scan(step, init, None, length=n_iter)
    row_floor = MIN_K_DIST_SCALE * jnp.mean(distances, axis=1)
    global_floor = MIN_K_DIST_SCALE * jnp.mean(distances)
    sigma = jnp.maximum(final.mid, jnp.where(rho > 0, row_floor, global_floor))
    return sigma, rho


def membership_strengths(
    knn_indices: Int[Array, "n_cells n_neighbors"],
    knn_distances: Float[Array, "n_cells n_neighbors"],
    sigma: Float[Array, " n_cells"],
    rho: Float[Array, " n_cells"],
) -> Float[Array, "n_cells n_neighbors"]:
    """Directed memberships $w_{ij} = \\exp(-\\max(d_{ij} - \\rho_i, 0) / \\sigma_i)$, 0 for a cell's own entry."""
    shifted = knn_distances - rho[:, None]
    safe_sigma = jnp.where(sigma == 0, 1, sigma)[:, None]
    strength = jnp.where((shifted <= 0) | (sigma[:, None] == 0), 1, jnp.exp(-shifted / safe_sigma))
    is_self = knn_indices == jnp.arange(knn_indices.shape[0], dtype=knn_indices.dtype)[:, None]
    return jnp.where(is_self, 0, strength)


class FuzzyGraph(eqx.Module):
    """The symmetric fuzzy simplicial set as a fixed-size edge list.

    Both orientations of every edge are listed (as in umap-learn's symmetric sparse matrix, whose non-zeros
    UMAP optimises). Slots `[0, n*k)` hold each cell's kNN edges `(i, knn[i, j])`; slots `[n*k, 2*n*k)` hold their
    reverses, with weight 0 where the reverse edge is already one of the other cell's kNN edges.

    - `heads`, `tails`: `(n_edges,)` cell indices, `n_edges = 2 * n_cells * n_neighbors`.
    - `weights`: `(n_edges,)` membership strengths after the fuzzy union (0 for unused slots).
    - `sigma`, `rho`: `(n_cells,)` the smooth-kNN kernel widths.
    """

    heads: Int[Array, " n_edges"]
    tails: Int[Array, " n_edges"]
    weights: Float[Array, " n_edges"]
    sigma: Float[Array, " n_cells"]
    rho: Float[Array, " n_cells"]


def fuzzy_simplicial_set(
    knn_indices: Int[Array, "n_cells n_neighbors"],
    knn_distances: Float[Array, "n_cells n_neighbors"],
    *,
    set_op_mix_ratio: Float[ArrayLike, ""] = 1.0,
    local_connectivity: Float[ArrayLike, ""] = 1.0,
    n_iter: int = 64,
) -> FuzzyGraph:
    """UMAP's fuzzy simplicial set from a kNN graph, as an edge list (never an `n x n` matrix).

    Local memberships from `smooth_knn_dist` and `membership_strengths` are combined with
    $w = \\lambda (w_{ij} + w_{ji} - w_{ij} w_{ji}) + (1 - \\lambda) w_{ij} w_{ji}$, with
    $\\lambda$ = `set_op_mix_ratio` (1: fuzzy union; 0: fuzzy intersection).

    **Arguments:**

    - `knn_indices`, `knn_distances`: `(n_cells, n_neighbors)` from `exact_knn(x, x, n_neighbors)` (each row
      starts with the cell itself).
    - `set_op_mix_ratio`: union/intersection mix. (Keyword only argument.)
    - `local_connectivity`: see `smooth_knn_dist`.
    - `n_iter`: bisection steps for `sigma`.

    **Returns:** a `FuzzyGraph`.
    """
    n_cells, n_neighbors = knn_indices.shape
    sigma, rho = smooth_knn_dist(
        knn_distances, float(n_neighbors), n_iter=n_iter, local_connectivity=local_connectivity
    )
    strength = membership_strengths(knn_indices, knn_distances, sigma, rho)
    rows = jnp.broadcast_to(jnp.arange(n_cells, dtype=knn_indices.dtype)[:, None], knn_indices.shape)
    # For each directed edge i -> j, find i among j's neighbours: that gives w_ji (0 if absent).
    matches = knn_indices[knn_indices] == rows[:, :, None]  # (n_cells, n_neighbors, n_neighbors)
    reverse = jnp.sum(jnp.where(matches, strength[knn_indices], 0), axis=2)
    has_reverse = jnp.any(matches, axis=2)
    mix = jnp.asarray(set_op_mix_ratio, dtype=strength.dtype)
    product = strength * reverse
    union = mix * (strength + reverse - product) + (1 - mix) * product
    heads = jnp.concatenate([rows.reshape(-1), knn_indices.reshape(-1)])
    tails = jnp.concatenate([knn_indices.reshape(-1), rows.reshape(-1)])
    weights = jnp.concatenate([union.reshape(-1), jnp.where(has_reverse, 0, union).reshape(-1)])
    return FuzzyGraph(heads, tails, weights, sigma, rho)




class NeighborGraph(eqx.Module):
    """Each cell's `n_neighbors` nearest neighbours and the symmetric connectivities built on them.

    What `scanpy.pp.neighbors` computes, without any `n_cells x n_cells` matrix:

    - `indices`: `(n_cells, n_neighbors)` neighbour indices sorted by distance; column 0 is the cell itself (so
      `n_neighbors` counts the cell, as in scanpy and umap-learn).
    - `distances`: `(n_cells, n_neighbors)` Euclidean distances (column 0 is 0); scanpy's `obsp["distances"]`
      holds columns 1 onwards.
    - `connectivities`: a `FuzzyGraph`, UMAP's fuzzy simplicial set as a symmetric edge list (`heads`, `tails`,
      `weights`, plus the kernel widths `sigma`, `rho`); scanpy's `obsp["connectivities"]`.
    """

    indices: Int[Array, "n_cells n_neighbors"]
    distances: Float[Array, "n_cells n_neighbors"]
    connectivities: FuzzyGraph


def _connect(
    indices: Int[Array, "n_cells n_neighbors"],
    distances: Float[Array, "n_cells n_neighbors"],
    set_op_mix_ratio: Float[Array, ""],
    local_connectivity: Float[Array, ""],
) -> NeighborGraph:
    connectivities = fuzzy_simplicial_set(
        indices, distances, set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity
    )
    return NeighborGraph(indices, distances, connectivities)


@eqx.filter_jit
def _exact_neighbor_graph(
    x: Float[Array, "n_cells n_dims"],
    n_neighbors: int,
    set_op_mix_ratio: Float[Array, ""],
    local_connectivity: Float[Array, ""],
    block_size: int | None,
    approximate: bool = False,
    check: bool = True,
) -> NeighborGraph:
    """The graph from the blocked search on the device: exact top-k, or `approx_max_k` with `approximate`.
    `check` (static): test `x`'s values in the compiled graph, for a traced `x` (a concrete one was checked on the
    host); `eqx.error_if`'s host callback keeps a program out of JAX's persistent compilation cache."""
    if check:
        x = eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), "x: contains non-finite values (NaN or inf)")
    indices, distances = _blocked_knn(x, x, n_neighbors, block_size, self_first=True, approximate=approximate)
    return _connect(indices, distances, set_op_mix_ratio, local_connectivity)


@eqx.filter_jit
def _neighbor_graph_from_indices(
    x: Float[Array, "n_cells n_dims"],
    indices: Int[Array, "n_cells n_neighbors"],
    set_op_mix_ratio: Float[Array, ""],
    local_connectivity: Float[Array, ""],
    block_size: int,
) -> NeighborGraph:
    """The graph from neighbour lists found elsewhere (each row starting with its cell): distances recomputed and
    rows sorted as the blocked search does (`_sorted_neighbors`, in blocks of rows), then the same connectivities."""
    n_cells, n_neighbors = indices.shape
    block = min(block_size, n_cells)
    n_blocks = -(-n_cells // block)
    padding = n_blocks * block - n_cells
    padded_x = jnp.concatenate([x, jnp.zeros((padding, x.shape[1]), x.dtype)]).reshape(n_blocks, block, -1)
    padded_indices = jnp.concatenate([indices, jnp.zeros((padding, n_neighbors), indices.dtype)])
    sorted_indices, distances = jax.lax.map(
        lambda b: _sorted_neighbors(b[0], x, b[1]), (padded_x, padded_indices.reshape(n_blocks, block, n_neighbors))
    )
    sorted_indices = sorted_indices.reshape(-1, n_neighbors)[:n_cells]
    distances = distances.reshape(-1, n_neighbors)[:n_cells]
    return _connect(sorted_indices, distances, set_op_mix_ratio, local_connectivity)


#: `method="ivf"`: lists probed per query (the nearest centroids to the query's own list's, that list first).
IVF_N_PROBE = 16
#: `method="ivf"`: query rows per search step (the cells of one list, taken this many at a time).
IVF_QUERY_CHUNK = 64
#: `method="ivf"`: k-means runs on this many cells per list (at most all cells), for this many Lloyd steps.
IVF_SAMPLE_PER_LIST = 40
IVF_KMEANS_STEPS = 10


def ivf_n_lists(n_cells: int) -> int:
    """The number of inverted lists for `n_cells`: `round(sqrt(n_cells))`, faiss's rule of thumb (Jegou et al.)."""
    return max(1, int(round(math.sqrt(n_cells))))


@eqx.filter_jit
def _ivf_partition(
    x: Float[Array, "n_cells n_dims"], key: PRNGKeyArray, n_lists: int, n_sample: int, n_steps: int
) -> tuple[Float[Array, "n_lists n_dims"], Int[Array, " n_cells"], Int[Array, " n_lists"]]:
    """Coarse k-means (Lloyd from `n_lists` random cells of a random sample of `n_sample` cells; an empty list
    keeps its centroid), then every cell's nearest centroid (in blocks) and the list sizes."""
    sample = x[jr.choice(key, x.shape[0], (n_sample,), replace=False)]

    def lloyd(centroids: Array, _: None) -> tuple[Array, None]:
        nearest = jnp.argmin(squared_distances(sample, centroids), axis=1)
        sums = jax.ops.segment_sum(sample, nearest, n_lists)
        counts = jax.ops.segment_sum(jnp.ones(n_sample, x.dtype), nearest, n_lists)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids), None

    centroids, _ = jax.lax.scan(lloyd, sample[:n_lists], None, length=n_steps)
    block = knn_block_size(n_lists)
    n_blocks = -(-x.shape[0] // block)
    padded = jnp.concatenate([x, jnp.zeros((n_blocks * block - x.shape[0], x.shape[1]), x.dtype)])
    nearest = jax.lax.map(lambda b: jnp.argmin(squared_distances(b, centroids), axis=1).astype(jnp.int32),
                          padded.reshape(n_blocks, block, -1))
    assignment = nearest.reshape(-1)[: x.shape[0]]
    return centroids, assignment, jnp.bincount(assignment, length=n_lists).astype(jnp.int32)


class _IVFIndex(eqx.Module):
    """The cells sorted by list (`order`: sorted position -> cell), each list's `start` and `size` in that order,
    and each list's probe order (`probes`: its nearest lists by centroid, itself first)."""

    sorted_x: Float[Array, "n_cells n_dims"]
    order: Int[Array, " n_cells"]
    starts: Int[Array, " n_lists"]
    sizes: Int[Array, " n_lists"]
    probes: Int[Array, "n_lists n_probe"]


def _ivf_probes(centroids: np.ndarray, sizes: np.ndarray, n_probe: int, n_neighbors: int) -> np.ndarray:
    """Each list's `n_probe` nearest lists by centroid distance, itself first (host, `n_lists^2`); more probes
    where needed so that every list's probed lists hold at least `n_neighbors` cells."""
    c = centroids.astype(np.float64)
    distances = np.sum(c * c, axis=1)[:, None] + np.sum(c * c, axis=1)[None, :] - 2 * c @ c.T
    np.fill_diagonal(distances, -np.inf)
    ranked = np.argsort(distances, axis=1, kind="stable")
    held = np.cumsum(sizes[ranked], axis=1)
    needed = int(np.max(np.argmax(held >= n_neighbors, axis=1))) + 1  # the cells number at least n_neighbors
    return ranked[:, : max(n_probe, needed)].astype(np.int32)


def _ivf_chunk(
    index: _IVFIndex, chunk: Int[Array, ""], chunk_ends: Int[Array, " n_lists"], n_neighbors: int, n_rows: int,
    n_candidates: int,
) -> tuple[Int[Array, " n_rows"], Int[Array, "n_rows n_neighbors"], Float[Array, "n_rows n_neighbors"]]:
    """One step: up to `n_rows` cells of one list against the first `n_candidates` cells of its probed lists.
    Returns the queries' sorted positions (`n_cells` for padding rows), their neighbours' sorted positions and
    distances."""
    n_cells, n_lists = index.order.shape[0], index.sizes.shape[0]
    n_chunks_of = -(-index.sizes // n_rows)
    own = jnp.searchsorted(chunk_ends, chunk, side="right", method="compare_all").astype(jnp.int32)
    real = own < n_lists
    own = jnp.minimum(own, n_lists - 1)
    local = (chunk - (chunk_ends[own] - n_chunks_of[own])) * n_rows + jnp.arange(n_rows, dtype=jnp.int32)
    rows = jnp.clip(index.starts[own] + local, 0, n_cells - 1)
    probed = index.probes[own]
    probed_ends = jnp.cumsum(index.sizes[probed], dtype=jnp.int32)
    slot = jnp.arange(n_candidates, dtype=jnp.int32)
    which = jnp.searchsorted(probed_ends, slot, side="right", method="compare_all").astype(jnp.int32)
    filled = which < probed.shape[0]
    which = jnp.minimum(which, probed.shape[0] - 1)
    start_of = index.starts[probed[which]] - (probed_ends[which] - index.sizes[probed[which]])
    candidates = jnp.clip(start_of + slot, 0, n_cells - 1)
    queries = index.sorted_x[rows]
    scores = jnp.where(filled[None, :], -squared_distances(queries, index.sorted_x[candidates]), -jnp.inf)
    is_self = (candidates[None, :] == rows[:, None]) & filled[None, :]
    scores = jnp.where(is_self, jnp.inf, scores)  # each cell first in its own row
    _, best = jax.lax.top_k(scores, n_neighbors)
    neighbours, distances = _sorted_neighbors(queries, index.sorted_x, candidates[best])
    return jnp.where(real & (local < index.sizes[own]), rows, n_cells), neighbours, distances


@eqx.filter_jit
def _ivf_search(
    x: Float[Array, "n_cells n_dims"],
    assignment: Int[Array, " n_cells"],
    sizes: Int[Array, " n_lists"],
    probes: Int[Array, "n_lists n_probe"],
    shape: tuple[int, int, int],
) -> tuple[Int[Array, "n_cells n_neighbors"], Float[Array, "n_cells n_neighbors"]]:
    """The inverted-file search's `(indices, distances)`; `shape` is `(n_neighbors, rows per step, candidates per
    step)`, all static."""
    n_neighbors, n_rows, n_candidates = shape
    n_cells = x.shape[0]
    index, chunk_ends, n_chunks = _ivf_sorted_index(x, assignment, sizes, probes, n_rows)
    rows, neighbours, distances = jax.lax.map(
        lambda c: _ivf_chunk(index, c, chunk_ends, n_neighbors, n_rows, n_candidates),
        jnp.arange(n_chunks, dtype=jnp.int32),
    )
    # Back from sorted positions to cells: row r of the output is cell order[r]'s.
    cells = jnp.where(rows < n_cells, index.order[jnp.minimum(rows, n_cells - 1)], n_cells).reshape(-1)
    indices = jnp.zeros((n_cells, n_neighbors), jnp.int32).at[cells].set(
        index.order[neighbours.reshape(-1, n_neighbors)], mode="drop")
    distances = jnp.zeros((n_cells, n_neighbors), x.dtype).at[cells].set(
        distances.reshape(-1, n_neighbors), mode="drop")
    return indices, distances


_connect_jit = eqx.filter_jit(_connect)


def ivf_neighbor_graph(
    x: Float[Array, "n_cells n_dims"],
    n_neighbors: int,
    *,
    key: PRNGKeyArray,
    n_probe: int = IVF_N_PROBE,
    n_lists: int | None = None,
    set_op_mix_ratio: Float[ArrayLike, ""] = 1.0,
    local_connectivity: Float[ArrayLike, ""] = 1.0,
) -> NeighborGraph:
    """The approximate kNN graph: the inverted-file search (`ivf_knn`, same arguments), then UMAP's fuzzy
    simplicial set on it (`set_op_mix_ratio`, `local_connectivity`: see `fuzzy_simplicial_set`).

    **Returns:** a `NeighborGraph`, rows sorted by distance (recomputed from `x` as every backend does).
    """
    indices, distances = ivf_knn(x, n_neighbors, key=key, n_probe=n_probe, n_lists=n_lists)
    return _connect_jit(indices, distances, jnp.asarray(set_op_mix_ratio), jnp.asarray(local_connectivity))


def ivf_knn(
    x: Float[Array, "n_cells n_dims"],
    n_neighbors: int,
    *,
    key: PRNGKeyArray,
    n_probe: int = IVF_N_PROBE,
    n_lists: int | None = None,
) -> tuple[Int[Array, "n_cells n_neighbors"], Float[Array, "n_cells n_neighbors"]]:
    """Each cell's approximate `n_neighbors` nearest cells by an inverted-file index (IVF; Jegou, Douze & Schmid
    2011, faiss's `IndexIVFFlat`), in JAX: jits, runs on any device, no compile outside XLA's.

    1. Partition: coarse k-means into `n_lists` lists (default `ivf_n_lists`: `round(sqrt(n_cells))`), fitted by
       `IVF_KMEANS_STEPS` Lloyd steps on `IVF_SAMPLE_PER_LIST` cells per list; every cell joins its nearest
       centroid's list.
    2. Search: the cells of each list, `IVF_QUERY_CHUNK` at a time, are compared exactly (one matrix product and
       a top-k) with every cell of the `n_probe` lists whose centroids are nearest their own list's (their own
       first), at most `n_probe * ceil(n_cells / n_lists)` candidates and never fewer than the largest list, so a
       cell's own list is always searched in full and each cell comes first in its own row.

    Work is about `n_probe / n_lists` of the exact search's. The sizes of the lists fix the candidate budget, so
    the partition is read back to the host between the two jitted steps: call it outside jit.

    **Arguments:**

    - `x`: `(n_cells, n_dims)` concrete cells, finite.
    - `n_neighbors`: `k`, counting the cell itself.
    - `key`: draws the k-means sample and its starting centroids. (Keyword only argument.)
    - `n_probe`: lists searched per cell (default 16); `n_probe = n_lists` is the exact search.
    - `n_lists`: the number of lists.

    **Returns:** `(indices, distances)`, each `(n_cells, n_neighbors)`, rows sorted by distance (recomputed from
    `x` as every backend does), column 0 the cell itself. `ivf_neighbor_graph` adds UMAP's connectivities.
    """
    x = jnp.asarray(x)
    n_cells = x.shape[0]
    n_lists = ivf_n_lists(n_cells) if n_lists is None else n_lists
    if not _is_integer(n_lists) or not 1 <= n_lists <= n_cells:
        raise ValueError(f"n_lists: must be an integer in [1, n_cells = {n_cells}], got {n_lists!r}")
    if n_probe == IVF_N_PROBE and _is_integer(n_lists):  # the default, on data with fewer lists: all of them
        n_probe = min(n_probe, n_lists)
    if not _is_integer(n_probe) or not 1 <= n_probe <= n_lists:
        raise ValueError(f"n_probe: must be an integer in [1, n_lists = {n_lists}], got {n_probe!r}")
    x = eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), "x: contains non-finite values (NaN or inf)")
    assignment, sizes, probes, n_rows, n_candidates = _ivf_plan(x, key, int(n_lists), int(n_probe),
                                                                int(n_neighbors))
    return _ivf_search(x, assignment, sizes, probes, (int(n_neighbors), n_rows, n_candidates))


def _ivf_plan(
    x: Float[Array, "n_cells n_dims"], key: PRNGKeyArray, n_lists: int, n_probe: int, n_neighbors: int,
    quantum: int = 1,
) -> tuple[Int[Array, " n_cells"], Int[Array, " n_lists"], Int[Array, "n_lists n_probe"], int, int]:
    """Partition `x`, pick each list's probes and size the search on the host: `(assignment, sizes, probes,
    rows per step, candidates per step)`. The candidates are at least the largest list and `n_probe` average
    lists, and every probed cell where more probes were needed to reach `n_neighbors`; rounded up to a multiple
    of `quantum` (so data of similar size can share one compilation), at most `n_cells`."""
    n_cells = x.shape[0]
    n_sample = min(n_cells, IVF_SAMPLE_PER_LIST * n_lists)
    centroids, assignment, sizes = _ivf_partition(x, key, n_lists, n_sample, IVF_KMEANS_STEPS)
    host_sizes = np.asarray(sizes)
    probes = _ivf_probes(np.asarray(centroids), host_sizes, n_probe, n_neighbors)
    largest = int(host_sizes.max())
    needed = int(np.max(np.sum(host_sizes[probes], axis=1))) if probes.shape[1] > n_probe else 0
    n_candidates = max(largest, needed, n_probe * -(-n_cells // n_lists))
    n_candidates = min(n_cells, -(-n_candidates // quantum) * quantum)
    return assignment, sizes, jnp.asarray(probes), min(IVF_QUERY_CHUNK, largest), n_candidates


def _ivf_sorted_index(
    x: Float[Array, "n_cells n_dims"], assignment: Int[Array, " n_cells"], sizes: Int[Array, " n_lists"],
    probes: Int[Array, "n_lists n_probe"], n_rows: int,
) -> tuple[_IVFIndex, Int[Array, " n_lists"], int]:
    """The index with the cells sorted by list, each list's last step, and the number of steps of `n_rows`
    query rows (the sum over lists of `ceil(size / n_rows)`, at most)."""
    order = jnp.argsort(assignment, stable=True).astype(jnp.int32)
    index = _IVFIndex(x[order], order, jnp.cumsum(sizes, dtype=jnp.int32) - sizes, sizes, probes)
    chunk_ends = jnp.cumsum(-(-sizes // n_rows), dtype=jnp.int32)
    return index, chunk_ends, x.shape[0] // n_rows + sizes.shape[0]


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def select_neighbor_method(n_cells: int, *, backend: str | None = None, traced: bool = False) -> str:
    """The kNN backend `neighbor_graph(method="auto")` uses.

    - `"exact"` below `EXACT_MAX_CELLS` (8,192) cells, as scanpy (brute force is both exact and quick there);
    - above it, `"approx_top_k"` on an accelerator (`backend` `"gpu"`, `"cuda"`, `"rocm"` or `"tpu"`), where the
      blocked search runs at the chip's matmul speed and stays on the device;
    - on CPU, `"exact"` below `IVF_MIN_CELLS` (20,000: below that the IVF's k-means and compiles cost about
      what they save) and `"ivf"` from there on, unless the cells are a JAX tracer (`traced`: the caller is
      inside `jit`, and the IVF reads its lists' sizes back to the host), where `"exact"` is the only choice.

    **Arguments:**

    - `n_cells`: the number of cells.
    - `backend`: JAX's backend name; default `jax.default_backend()`. (Keyword only argument.)
    - `traced`: whether the cells are traced.
    """
    if n_cells < EXACT_MAX_CELLS:
        return "exact"
    backend = jax.default_backend() if backend is None else backend
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return "approx_top_k"
    return "exact" if traced or n_cells < IVF_MIN_CELLS else "ivf"


def pynndescent_settings(n_cells: int) -> dict[str, int]:
    """umap-learn's NN-descent settings for `n_cells` (`umap_.nearest_neighbors`; scanpy copies them):
    `n_trees = min(64, 5 + round(sqrt(n) / 20))`, `n_iters = max(5, round(log2(n)))`, `max_candidates = 60`."""
    return {"n_trees": min(64, 5 + int(round(n_cells**0.5 / 20.0))),
            "n_iters": max(5, int(round(math.log2(n_cells)))), "max_candidates": 60}


def _self_first(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with each cell first and its other neighbours after, in their order (a cell missing from its own
    row takes the place of its farthest neighbour); also the rows pynndescent left unfilled (index -1)."""
    n_cells, n_neighbors = indices.shape
    rows = np.arange(n_cells, dtype=indices.dtype)[:, None]
    unfilled = np.any(indices < 0, axis=1)
    is_self = indices == rows
    others = np.take_along_axis(indices, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, : n_neighbors - 1]
    return np.concatenate([rows, others], axis=1), unfilled


def pynndescent_knn(x: np.ndarray, n_neighbors: int, *, seed: int = 0) -> np.ndarray:
    """The approximate kNN of `x` among itself by pynndescent's `NNDescent`, with umap-learn's settings
    (`pynndescent_settings`), on the host with all cores; each row starts with its own cell.

    **Arguments:**

    - `x`: `(n_cells, n_dims)` host array (run outside jit).
    - `n_neighbors`: `k`, counting the cell itself.
    - `seed`: pynndescent's `random_state` (its random projection trees). (Keyword only argument.)

    **Returns:** `(n_cells, n_neighbors)` int32 indices, not yet sorted by distance.
    """
    from pynndescent import NNDescent  # imports numba (seconds): only when this backend runs

    # A writable copy: numba compiles read-only arrays (what np.asarray of a JAX array gives) as another type,
    # which would compile pynndescent a second time in a process that already ran it on writable ones.
    data = np.array(x, dtype=np.float32, order="C", copy=True)
    settings = pynndescent_settings(x.shape[0])
    search = NNDescent(data, n_neighbors=n_neighbors, metric="euclidean", random_state=seed, low_memory=True,
                       n_jobs=-1, verbose=False, compressed=False, n_trees=settings["n_trees"],
                       n_iters=settings["n_iters"], max_candidates=settings["max_candidates"])
    graph = search.neighbor_graph
    assert graph is not None  # built at construction for the indexed data
    found = graph[0]
    indices, unfilled = _self_first(np.asarray(found).astype(np.int32))
    if np.any(unfilled):  # rows pynndescent could not fill (tiny or degenerate data): search them exactly
        rows = np.flatnonzero(unfilled).astype(np.int32)
        exact, _ = _knn_block(jnp.asarray(data[rows]), jnp.asarray(data), n_neighbors, jnp.asarray(rows))
        indices[rows] = np.asarray(exact)
    return indices


def neighbor_graph(
    x: ArrayLike,
    n_neighbors: int = 15,
    *,
    method: str = "auto",
    set_op_mix_ratio: Float[ArrayLike, ""] = 1.0,
    local_connectivity: Float[ArrayLike, ""] = 1.0,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
) -> NeighborGraph:
    """The kNN graph of `x` and its UMAP connectivities (scanpy's `pp.neighbors(method="umap")`).

    **Arguments:**

    - `x`: `(n_cells, n_dims)` cells in some representation (PCs, a latent space); finite.
    - `n_neighbors`: `k` (static), counting the cell itself, in `[2, n_cells - 1]` (scanpy's default 15).
    - `method`: the kNN backend (Keyword only argument.):
        - `"auto"` (default): `select_neighbor_method`: exact below 8,192 cells, then `"approx_top_k"` on a GPU or
          TPU; on CPU exact below 20,000 cells and `"ivf"` above (`"exact"` when `x` is traced);
        - `"exact"`: blocked brute force (`exact_knn`) under one jit;
        - `"ivf"`: the inverted-file search in JAX with its defaults (`ivf_neighbor_graph`); needs a concrete `x`;
        - `"pynndescent"`: NN-descent on the host with umap-learn's settings (`pynndescent_knn`), outside jit;
          needs a concrete `x`;
        - `"approx_top_k"`: the blocked search with `jax.lax.approx_max_k` (recall target 0.95) under one jit.
    - `set_op_mix_ratio`, `local_connectivity`: see `fuzzy_simplicial_set` (umap-learn's and scanpy's defaults
      1, 1); array leaves, so changing them does not compile again.
    - `block_size`: query rows per kNN block (static); bounds memory at `block_size * n_cells` distances.
    - `key`: seeds pynndescent's random projection trees and the IVF's k-means; None: a fixed seed, so results
      repeat. Unused by the other backends.

    **Returns:** a `NeighborGraph`. Whatever the backend, the distances are recomputed from `x` and each row sorted
    by them, and the connectivities are the same jitted function of the neighbour lists: two backends that find
    the same neighbours give the same graph. Ties are broken by cell index (exact search), and each cell comes
    first in its own row even when other cells are exact duplicates of it.
    """
    if method not in NEIGHBOR_METHODS:
        raise ValueError(f"method: unknown kNN method {method!r}; choose one of {NEIGHBOR_METHODS}")
    traced = _is_traced(x)
    x = jnp.asarray(check_embedding(x, field="x"))
    n_cells = x.shape[0]
    if not _is_integer(n_neighbors) or not 2 <= n_neighbors < n_cells:
        raise ValueError(
            f"n_neighbors: must be an integer in [2, n_cells - 1] = [2, {n_cells - 1}] (it counts the cell itself), "
            f"got {n_neighbors!r}"
        )
    if block_size is not None and (not _is_integer(block_size) or block_size < 1):
        raise ValueError(f"block_size: must be a positive integer or None, got {block_size!r}")
    if method == "auto":
        method = select_neighbor_method(n_cells, traced=traced)
    # (a traced mix ratio, under jit or vmap, is the caller's to check)
    if not _is_traced(set_op_mix_ratio) and not 0 <= float(np.asarray(set_op_mix_ratio)) <= 1:
        raise ValueError(f"set_op_mix_ratio: must be in [0, 1] (0 intersection, 1 union), got {set_op_mix_ratio!r}")
    mix, connectivity = jnp.asarray(set_op_mix_ratio), jnp.asarray(local_connectivity)
    if method == "ivf":
        if traced:
            raise ValueError("method: 'ivf' reads its lists' sizes back to the host; x is traced here (call "
                             "neighbor_graph outside jit, or choose 'exact' or 'approx_top_k')")
        return ivf_neighbor_graph(x, int(n_neighbors), key=jr.key(0) if key is None else key,
                                  set_op_mix_ratio=mix, local_connectivity=connectivity)
    if method == "pynndescent":
        if traced:
            raise ValueError("method: 'pynndescent' runs on host arrays, outside jit; x is traced here (call "
                             "neighbor_graph outside jit, or choose 'exact' or 'approx_top_k')")
        seed = 0 if key is None else int(jr.randint(key, (), 0, 2**31 - 1))
        indices = pynndescent_knn(np.asarray(x), int(n_neighbors), seed=seed)
        block = knn_block_size(int(n_neighbors) * x.shape[1]) if block_size is None else int(block_size)
        return _neighbor_graph_from_indices(x, jnp.asarray(indices), mix, connectivity, block)
    return _exact_neighbor_graph(
        x, int(n_neighbors), mix, connectivity, None if block_size is None else int(block_size),
        approximate=method == "approx_top_k", check=traced,
    )
