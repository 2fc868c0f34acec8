"""The UMAP graph in pure JAX: exact kNN, smooth-kNN distances, the fuzzy simplicial set, and the `a`, `b` curve.

Nothing here builds an `n_cells x n_cells` matrix: the kNN search runs over memory-bounded blocks of query rows,
and the fuzzy simplicial set is a fixed-size edge list (`2 * n_cells * n_neighbors` slots, unused ones carrying
zero weight), so everything jits and the shapes depend only on `n_cells` and `n_neighbors`.

The numerics follow umap-learn 0.5 (`umap/umap_.py`: `smooth_knn_dist`, `compute_membership_strengths`,
`fuzzy_simplicial_set`, `find_ab_params`); the code is our own.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from .._core._geometry import squared_distances


# umap-learn's constants (umap/umap_.py).
SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3


def _knn_block(
    queries: Float[Array, "n_block n_dims"],
    reference: Float[Array, "n_reference n_dims"],
    n_neighbors: int,
) -> tuple[Int[Array, "n_block n_neighbors"], Float[Array, "n_block n_neighbors"]]:
    # Select with the one-matmul squared distances, then recompute the k chosen distances directly (no
    # cancellation error) and re-sort them, so the distances are as exact as a direct difference.
    _, indices = jax.lax.top_k(-squared_distances(queries, reference), n_neighbors)
    differences = queries[:, None, :] - reference[indices]
    distances = jnp.sqrt(jnp.sum(differences * differences, axis=-1))
    order = jnp.argsort(distances, axis=1, stable=True)
    return jnp.take_along_axis(indices, order, axis=1), jnp.take_along_axis(distances, order, axis=1)


def knn_block_size(n_reference: int, memory_budget: int = 2**24) -> int:
    """Query rows per block so that one block's distance matrix holds at most `memory_budget` elements."""
    return max(1, memory_budget // max(n_reference, 1))


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
      is then its own first neighbour, at distance 0, as in umap-learn).
    - `n_neighbors`: `k` (static), at most `n_reference`.
    - `block_size`: query rows per block (static); default keeps a block under 2**24 distances.

    **Returns:** `(indices, distances)`, each `(n_queries, n_neighbors)`, sorted by increasing distance.
    """
    n_queries, n_reference = queries.shape[0], reference.shape[0]
    if not 1 <= n_neighbors <= n_reference:
        raise ValueError(f"n_neighbors: must be in [1, {n_reference}] (the reference size), got {n_neighbors}")
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims but the reference has {reference.shape[1]}")
    block = min(block_size or knn_block_size(n_reference), n_queries)
    n_blocks = -(-n_queries // block)
    padded = jnp.concatenate(
        [queries, jnp.zeros((n_blocks * block - n_queries, queries.shape[1]), dtype=queries.dtype)]
    )
    indices, distances = jax.lax.map(
        lambda q: _knn_block(q, reference, n_neighbors), padded.reshape(n_blocks, block, queries.shape[1])
    )
    return (
        indices.reshape(n_blocks * block, n_neighbors)[:n_queries],
        distances.reshape(n_blocks * block, n_neighbors)[:n_queries],
    )


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


def _ab_curve(x: Float[Array, " n_points"], params: Float[Array, " 2"]) -> Float[Array, " n_points"]:
    a, b = params[0], params[1]
    positive = x > 0
    power = jnp.where(positive, jnp.exp(2 * b * jnp.log(jnp.where(positive, x, 1))), 0)
    return 1 / (1 + a * power)


def _ab_target(
    spread: Float[Array, ""], min_dist: Float[Array, ""], n_points: int
) -> tuple[Float[Array, " n_points"], Float[Array, " n_points"]]:
    x = jnp.linspace(0, 3 * spread, n_points)
    y = jnp.where(x < min_dist, 1, jnp.exp(-(x - min_dist) / spread))
    return x, y


def find_ab_params(
    spread: Float[ArrayLike, ""] = 1.0,
    min_dist: Float[ArrayLike, ""] = 0.1,
    *,
    n_iter: int = 100,
    n_points: int = 300,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Fit UMAP's low-dimensional similarity curve $1 / (1 + a d^{2b})$ to the offset exponential
    $\\exp(-\\max(d - \\mathrm{min\\_dist}, 0) / \\mathrm{spread})$ on 300 points in $[0, 3\\,\\mathrm{spread}]$.

    The least-squares fit is Levenberg-Marquardt from $(a, b) = (1, 1)$ with a fixed `n_iter` steps (umap-learn
    calls scipy's `curve_fit`, which runs MINPACK's Levenberg-Marquardt from the same start). Pure JAX, so it
    jits, vmaps over `min_dist`/`spread`, and is differentiable through the final iterate.

    **Returns:** `(a, b)` as scalars.
    """
    spread = jnp.asarray(spread)
    min_dist = jnp.asarray(min_dist)
    dtype = jnp.result_type(spread, min_dist, float)
    x, y = _ab_target(spread.astype(dtype), min_dist.astype(dtype), n_points)

    def residual(params: Float[Array, " 2"]) -> Float[Array, " n_points"]:
        return _ab_curve(x, params) - y

    def step(carry, _):
        params, damping = carry
        r = residual(params)
        jacobian = jax.jacfwd(residual)(params)
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ r
        scaled = normal + damping * jnp.diag(jnp.diag(normal))
        proposal = params - jnp.linalg.solve(scaled, gradient)
        better = jnp.sum(residual(proposal) ** 2) < jnp.sum(r**2)
        better = better & jnp.all(jnp.isfinite(proposal))
        params = jnp.where(better, proposal, params)
        damping = jnp.where(better, damping / 3, damping * 2)
        return (params, damping), None

    init = (jnp.ones(2, dtype), jnp.asarray(1e-3, dtype))
    (params, _), _ = jax.lax.scan(step, init, None, length=n_iter)
    return params[0], params[1]


def default_n_epochs(n_cells: int) -> int:
    """umap-learn's default number of epochs: 500 up to 10,000 cells, 200 above."""
    return 500 if n_cells <= 10_000 else 200


def prune_weights(weights: Float[Array, " n_edges"], n_epochs: int) -> Float[Array, " n_edges"]:
    """umap-learn's pruning before optimisation: weights below `max / n_epochs` are set to zero (they would be
    sampled less than once in `n_epochs` epochs; see `default_n_epochs`)."""
    return jnp.where(weights < jnp.max(weights) / n_epochs, 0, weights)
