"""The shared neighbour graph: exact kNN in blocks, and UMAP's fuzzy simplicial set as the connectivities.

Every operator that needs neighbours (UMAP now; doublets, imputation, pseudotime, communication next) takes a
`NeighborGraph` from `neighbor_graph`. Nothing here builds an `n_cells x n_cells` matrix: the kNN search runs over
memory-bounded blocks of query rows, and the fuzzy simplicial set is a fixed-size edge list
(`2 * n_cells * n_neighbors` slots, unused ones carrying zero weight), so everything jits and the shapes depend
only on `n_cells` and `n_neighbors`.

The connectivities are scanpy's default (`scanpy.pp.neighbors(method="umap")` writes them as
`obsp["connectivities"]`); the numerics follow umap-learn 0.5 (`umap/umap_.py`: `smooth_knn_dist`,
`compute_membership_strengths`, `fuzzy_simplicial_set`); the code is our own.
"""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._geometry import squared_distances
from ._validate import check_embedding


#: The kNN backends `neighbor_graph` knows (an approximate one is planned for large data).
NEIGHBOR_METHODS = ("exact",)

# umap-learn's constants (umap/umap_.py).
SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3


def _knn_block(
    queries: Float[Array, "n_block n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    self_index: Int[Array, " n_block"] | None = None,
) -> tuple[Int[Array, "n_block n_neighbors"], Float[Array, "n_block n_neighbors"]]:
    # Select with the one-matmul squared distances, then recompute the k chosen distances directly (no
    # cancellation error) and re-sort them, so the distances are as exact as a direct difference.
    scores = -squared_distances(queries, reference)
    if self_index is not None:  # a cell is its own first neighbour, even among exact duplicates
        columns = jnp.arange(reference.shape[0], dtype=self_index.dtype)
        scores = jnp.where(columns[None, :] == self_index[:, None], jnp.inf, scores)
    _, indices = jax.lax.top_k(scores, n_neighbors)
    differences = queries[:, None, :] - reference[indices]
    distances = jnp.sqrt(jnp.sum(differences * differences, axis=-1))
    order = jnp.argsort(distances, axis=1, stable=True)
    return jnp.take_along_axis(indices, order, axis=1), jnp.take_along_axis(distances, order, axis=1)


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
) -> tuple[Int[Array, "n_queries n_neighbors"], Float[Array, "n_queries n_neighbors"]]:
    n_queries, n_dims = queries.shape
    block = min(block_size or knn_block_size(reference.shape[0]), n_queries)
    n_blocks = -(-n_queries // block)
    padded = jnp.concatenate([queries, jnp.zeros((n_blocks * block - n_queries, n_dims), dtype=queries.dtype)])
    blocks = padded.reshape(n_blocks, block, n_dims)
    if self_first:
        rows = jnp.arange(n_blocks * block, dtype=jnp.int32).reshape(n_blocks, block)
        indices, distances = jax.lax.map(lambda b: _knn_block(b[0], reference, n_neighbors, b[1]), (blocks, rows))
    else:
        indices, distances = jax.lax.map(lambda b: _knn_block(b, reference, n_neighbors), blocks)
    return (
        indices.reshape(n_blocks * block, n_neighbors)[:n_queries],
        distances.reshape(n_blocks * block, n_neighbors)[:n_queries],
    )


def exact_knn(
    queries: Float[Array, "n_queries n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
    *,
    block_size: int | None = None,
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

    **Returns:** `(indices, distances)`, each `(n_queries, n_neighbors)`, sorted by increasing distance (ties in
    index order).
    """
    _check_knn_shapes(queries, reference, n_neighbors)
    return _blocked_knn(queries, reference, n_neighbors, block_size, self_first=False)


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


@eqx.filter_jit
def _exact_neighbor_graph(
    x: Float[Array, "n_cells n_dims"],
    n_neighbors: int,
    set_op_mix_ratio: Float[Array, ""],
    local_connectivity: Float[Array, ""],
    block_size: int | None,
) -> NeighborGraph:
    x = eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), "x: contains non-finite values (NaN or inf)")
    indices, distances = _blocked_knn(x, x, n_neighbors, block_size, self_first=True)
    connectivities = fuzzy_simplicial_set(
        indices, distances, set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity
    )
    return NeighborGraph(indices, distances, connectivities)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def neighbor_graph(
    x: ArrayLike,
    n_neighbors: int = 15,
    *,
    method: str = "exact",
    set_op_mix_ratio: Float[ArrayLike, ""] = 1.0,
    local_connectivity: Float[ArrayLike, ""] = 1.0,
    block_size: int | None = None,
) -> NeighborGraph:
    """The kNN graph of `x` and its UMAP connectivities (scanpy's `pp.neighbors(method="umap")`), under one jit.

    **Arguments:**

    - `x`: `(n_cells, n_dims)` cells in some representation (PCs, a latent space); finite.
    - `n_neighbors`: `k` (static), counting the cell itself, in `[2, n_cells - 1]` (scanpy's default 15).
    - `method`: the kNN backend; only `"exact"` (blocked brute force, `exact_knn`) for now. (Keyword only
      argument.)
    - `set_op_mix_ratio`, `local_connectivity`: see `fuzzy_simplicial_set` (umap-learn's and scanpy's defaults
      1, 1); array leaves, so changing them does not compile again.
    - `block_size`: query rows per kNN block (static); bounds memory at `block_size * n_cells` distances.

    **Returns:** a `NeighborGraph`. Ties are broken by cell index, and each cell comes first in its own row even
    when other cells are exact duplicates of it.
    """
    if method not in NEIGHBOR_METHODS:
        raise ValueError(f"method: unknown kNN method {method!r}; choose one of {NEIGHBOR_METHODS}")
    x = jnp.asarray(check_embedding(x, field="x"))
    n_cells = x.shape[0]
    if not _is_integer(n_neighbors) or not 2 <= n_neighbors < n_cells:
        raise ValueError(
            f"n_neighbors: must be an integer in [2, n_cells - 1] = [2, {n_cells - 1}] (it counts the cell itself), "
            f"got {n_neighbors!r}"
        )
    if block_size is not None and (not _is_integer(block_size) or block_size < 1):
        raise ValueError(f"block_size: must be a positive integer or None, got {block_size!r}")
    return _exact_neighbor_graph(
        x, int(n_neighbors), jnp.asarray(set_op_mix_ratio), jnp.asarray(local_connectivity),
        None if block_size is None else int(block_size),
    )
