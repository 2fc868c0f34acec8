"""A weighted cell graph as an edge list, and the sparse operations the trajectory operators share.

Nothing here builds an `n_cells x n_cells` matrix: a matrix is its non-zeros `(heads, tails, weights)`, and a
matrix-vector product is one gather and one `segment_sum`, so memory is `O(n_edges)`. For repeated products with
one matrix (the diffusion map's eigensolver), `PaddedGraph` holds the same non-zeros as padded rows: a product is
then a gather and a sum over a fixed number of slots per row, with no scatter.
"""

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._core._neighbors import FuzzyGraph, NeighborGraph


class CellGraph(eqx.Module):
    """A sparse `(n_cells, n_cells)` matrix as its non-zeros: entry `(heads[e], tails[e])` is `weights[e]`.

    Unused slots may carry weight 0. `n_cells` is static (it fixes shapes).
    """

    heads: Int[Array, " n_edges"]
    tails: Int[Array, " n_edges"]
    weights: Float[Array, " n_edges"]
    n_cells: int = eqx.field(static=True)


def matvec(graph: CellGraph, v: Float[Array, " n_cells *batch"]) -> Float[Array, " n_cells *batch"]:
    """`W @ v` for the sparse `W` of `graph` (one gather, one `segment_sum`)."""
    w = graph.weights.reshape(graph.weights.shape + (1,) * (v.ndim - 1))
    return jax.ops.segment_sum(w * v[graph.tails], graph.heads, num_segments=graph.n_cells)


def rmatvec(graph: CellGraph, v: Float[Array, " n_cells *batch"]) -> Float[Array, " n_cells *batch"]:
    """`W.T @ v`."""
    w = graph.weights.reshape(graph.weights.shape + (1,) * (v.ndim - 1))
    return jax.ops.segment_sum(w * v[graph.heads], graph.tails, num_segments=graph.n_cells)


def row_sums(graph: CellGraph) -> Float[Array, " n_cells"]:
    """`W @ 1`."""
    return jax.ops.segment_sum(graph.weights, graph.heads, num_segments=graph.n_cells)


def scale_entries(graph: CellGraph, left: Float[Array, " n_cells"], right: Float[Array, " n_cells"]) -> CellGraph:
    """`diag(left) W diag(right)` on the same edges."""
    return CellGraph(graph.heads, graph.tails, graph.weights * left[graph.heads] * right[graph.tails], graph.n_cells)


class TailRows(eqx.Module):
    """The non-zeros of the long rows beyond their first `width`, as padded rows of the same width: tail row `t`
    belongs to row `owners[t]` (sorted), entry `(owners[t], indices[t, s])` = `weights[t, s]`; unused slots point
    at the owner with weight 0."""

    indices: Int[Array, "n_tail width"]
    weights: Float[Array, "n_tail width"]
    owners: Int[Array, " n_tail"]


class PaddedGraph(eqx.Module):
    """A sparse `(n_cells, n_cells)` matrix as padded rows (ELL, Bell & Garland 2009): each row's first `width`
    non-zeros, entry `(i, indices[i, s])` = `weights[i, s]` (unused slots point at row `i` itself with weight 0),
    and the rest of the longer rows cut into tail rows of the same width (`overflow`, a `TailRows`).

    A product is `sum_s weights[:, s] * v[indices[:, s]]` (gathers only) plus the tail rows' products added to
    their owners (a scatter of whole rows, not of single entries). The rows may be a permutation of the cells
    (`order[r]` is the cell in row `r`; `padded_rows(reorder=True)` picks the reverse Cuthill-McKee order, which
    keeps each row's neighbours close in memory): products then act on vectors in that order.
    """

    indices: Int[Array, "n_cells width"]
    weights: Float[Array, "n_cells width"]
    overflow: TailRows
    order: Int[Array, " n_cells"]


#: `padded_rows`' default width: this quantile of the row lengths (the longer rows spill into tail rows). UMAP
#: rows are skewed (100k cells, 15 neighbours: min 14, median 18, 75 % 23, 95 % 41, max 200 non-zeros): the median
#: pads 1.3 slots per non-zero (0.75: 1.4, 0.95: 2.0), and with the gathers fused into one loop a product ran
#: ~12 % faster at 0.5 than at 0.75 (16 filter steps of 24 float32 columns, 3 interleaved rounds; 0.1-0.4 no better).
PADDED_WIDTH_QUANTILE = 0.5


def padded_rows(graph: CellGraph, *, width: int | None = None, reorder: bool = False) -> PaddedGraph:
    """The non-zeros of `graph` (a concrete `CellGraph`, outside jit) as a `PaddedGraph`; zero weights are dropped.

    `width` (default: the `PADDED_WIDTH_QUANTILE` quantile of the row lengths, at least 1) fixes the padded rows;
    entries beyond it go to tail rows. `reorder`: lay the rows out in SciPy's reverse Cuthill-McKee order of the
    (symmetric) graph."""
    matrix = _edge_csr(graph)
    return _csr_padded(matrix, width, matrix.dtype, reorder)


def _edge_csr(graph: CellGraph) -> Any:
    import scipy.sparse as sp

    n = graph.n_cells
    weights = np.asarray(graph.weights)
    keep = weights != 0
    return sp.csr_matrix((weights[keep], (np.asarray(graph.heads)[keep], np.asarray(graph.tails)[keep])),
                         shape=(n, n))


def _csr_padded(matrix: Any, width: int | None, dtype: Any, reorder: bool) -> PaddedGraph:
    n = matrix.shape[0]
    order = np.arange(n, dtype=np.int32)
    if reorder and n:
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        order = reverse_cuthill_mckee(matrix, symmetric_mode=True).astype(np.int32)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(n, dtype=np.int32)
        matrix = matrix[order]  # rows in the new order; columns relabelled below (their order within a row is free)
        matrix.indices = inverse[matrix.indices]
    lengths = np.diff(matrix.indptr)
    if width is None:
        width = max(1, int(np.ceil(np.quantile(lengths, PADDED_WIDTH_QUANTILE)))) if n else 1
    rows = np.arange(n, dtype=np.int32)
    indices, values = _row_slots(matrix, rows, np.zeros(n, np.int32), width, dtype)
    extra = np.maximum(lengths - 1, 0) // width  # tail rows per row
    owners = np.repeat(rows, extra)
    chunk = 1 + np.arange(owners.size) - np.repeat(np.cumsum(extra) - extra, extra)  # a tail row's place in its row
    tail_indices, tail_values = _row_slots(matrix, owners, chunk * width, width, dtype)
    overflow = TailRows(jnp.asarray(tail_indices), jnp.asarray(tail_values), jnp.asarray(owners))
    return PaddedGraph(jnp.asarray(indices), jnp.asarray(values), overflow, jnp.asarray(order))


def _row_slots(matrix: Any, rows: Int[np.ndarray, " m"], offsets: Int[np.ndarray, " m"], width: int, dtype: Any
               ) -> tuple[Int[np.ndarray, "m width"], Float[np.ndarray, "m width"]]:
    """Entries `offsets[r], ..., offsets[r] + width - 1` of CSR row `rows[r]` as padded slots (past the row's end:
    the row itself with weight 0), read as one `(m, width)` gather (int32 positions: half the memory traffic)."""
    slots = np.arange(width, dtype=np.int32)
    starts = (matrix.indptr[:-1][rows] + offsets).astype(np.int32)
    valid = slots[None, :] < (matrix.indptr[1:][rows] - starts)[:, None]
    positions = np.minimum(starts[:, None] + slots[None, :], max(matrix.nnz - 1, 0))
    stored, data = (matrix.indices, matrix.data) if matrix.nnz else (np.zeros(1, np.int32), np.zeros(1, dtype))
    indices = np.where(valid, stored[positions], rows[:, None]).astype(np.int32, copy=False)
    values = np.where(valid, data[positions], 0).astype(dtype, copy=False)
    return indices, values


def _row_products(indices: Int[Array, "n_rows width"], weights: Float[Array, "n_rows width"],
                  v: Float[Array, " n_cells *batch"]) -> Float[Array, " n_rows *batch"]:
    # the slots' indices are in range by construction (`padded_rows`): gathers without clamping or wrapping of
    # negative indices (~10 % of a product's CPU time at 100k cells)
    shape = (-1,) + (1,) * (v.ndim - 1)

    def term(s: int) -> Array:
        rows = v.at[indices[:, s]].get(mode="promise_in_bounds", wrap_negative_indices=False)
        return weights[:, s].reshape(shape) * rows

    total = term(0)
    for s in range(1, weights.shape[1]):  # static width: XLA fuses the slots' gathers into one loop
        total = total + term(s)
    return total


def padded_matvec(graph: PaddedGraph, v: Float[Array, " n_cells *batch"]) -> Float[Array, " n_cells *batch"]:
    """`W @ v` for the `PaddedGraph` `W`: one gather per slot (no scatter) plus the tail rows added to their owners.
    (A block of 8k columns in float32 runs about twice as fast per column as one of 8k - 1: XLA vectorises the
    columns.)"""
    return padded_affine(graph, v, None, None)


def padded_affine(graph: PaddedGraph, v: Float[Array, " n_cells *batch"], scale: Float[ArrayLike, ""] | None,
                  shift: Float[Array, " n_cells *batch"] | None) -> Float[Array, " n_cells *batch"]:
    """`scale * (W @ v) + shift` (None: 1 and 0) for the `PaddedGraph` `W`, the axpy fused into the product's
    gather loop (the tail rows are scaled and added last): a Chebyshev filter step then costs one product, not a
    product plus passes over the block (~25 % of a step at 100k cells, 24 float32 columns)."""
    total: Array = _row_products(graph.indices, graph.weights.astype(v.dtype), v)
    if scale is not None:
        total = jnp.asarray(scale) * total
    if shift is not None:
        total = total + shift
    tail = graph.overflow
    if tail.weights.shape[0]:
        extra = _row_products(tail.indices, tail.weights.astype(v.dtype), v)
        extra = extra if scale is None else jnp.asarray(scale) * extra
        total = total.at[tail.owners].add(extra, indices_are_sorted=True, mode="promise_in_bounds")
    return total


def padded_row_sums(graph: PaddedGraph) -> Float[Array, " n_cells"]:
    """`W @ 1` for a `PaddedGraph`."""
    tail = graph.overflow
    return jnp.sum(graph.weights, axis=1).at[tail.owners].add(jnp.sum(tail.weights, axis=1), indices_are_sorted=True)


def scale_padded(graph: PaddedGraph, left: Float[Array, " n_cells"], right: Float[Array, " n_cells"]
                 ) -> PaddedGraph:
    """`diag(left) W diag(right)` on the same slots."""
    weights = graph.weights * left[:, None] * right[graph.indices]
    tail = graph.overflow
    tail = TailRows(tail.indices, tail.weights * left[tail.owners][:, None] * right[tail.indices], tail.owners)
    return PaddedGraph(graph.indices, weights, tail, graph.order)


def host_csr(graph: "CellGraph | NeighborGraph | FuzzyGraph | object") -> Any:
    """The kernel of `graph` (any form `as_cell_graph` takes, checked as it checks them) as a SciPy CSR matrix on
    the host, zero weights dropped; a SciPy matrix's rows are read directly."""
    import scipy.sparse as sp

    if not sp.issparse(graph):
        return _edge_csr(as_cell_graph(graph))
    matrix: Any = sp.csr_matrix(graph)
    _check_scipy(matrix)
    matrix = sp.csr_matrix(matrix, dtype=jnp.zeros(()).dtype)
    matrix.eliminate_zeros()
    return matrix


def as_padded_graph(matrix: Any, *, reorder: bool = True) -> PaddedGraph:
    """The `host_csr` matrix `matrix` as a `PaddedGraph` (default width; reverse Cuthill-McKee rows when
    `reorder`)."""
    return _csr_padded(matrix, None, matrix.dtype, reorder)


def host_components(matrix: Any, order: Int[np.ndarray, " n_cells"] | None = None) -> Int[np.ndarray, " n_cells"]:
    """Connected-component labels of the graph of a symmetric `host_csr` matrix, each the smallest cell index of its
    component: SciPy's strongly connected components, which for a symmetric matrix are the connected ones (the
    undirected search would first add the transpose; JAX's label propagation takes ~5x longer at 100k cells).

    Given `order`, SciPy's reverse Cuthill-McKee order of `matrix` (a `PaddedGraph`'s `order`), they are read from
    it instead (3-4x faster at 100k cells): that order is one breadth-first search per component, so each component
    is one run of it, and a run ends at position `p` exactly where no cell up to `p` has a neighbour after `p`."""
    if order is None:
        from scipy.sparse.csgraph import connected_components

        _, labels = connected_components(matrix, directed=True, connection="strong")
        _, first = np.unique(labels, return_index=True)
        return first[labels].astype(np.int32)
    n = matrix.shape[0]
    position = np.empty(n, np.int32)
    position[order] = np.arange(n, dtype=np.int32)
    reach = position.copy()  # the farthest position among a cell and its neighbours
    filled = np.flatnonzero(np.diff(matrix.indptr))
    if filled.size:
        farthest = np.maximum.reduceat(position[matrix.indices], matrix.indptr[filled])
        reach[filled] = np.maximum(reach[filled], farthest)
    ends = np.maximum.accumulate(reach[order]) == np.arange(n)
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    run = np.cumsum(np.concatenate([[0], ends[:-1]]))  # component of each position
    return np.minimum.reduceat(order, starts)[run][position].astype(np.int32)


def _check_scipy(matrix: Any) -> None:
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"graph: expected a square cells x cells matrix, got shape {matrix.shape}")
    if matrix.nnz and (not np.all(np.isfinite(matrix.data)) or np.any(matrix.data < 0)):
        raise ValueError("graph: weights must be finite and non-negative")


def as_cell_graph(graph: "CellGraph | NeighborGraph | FuzzyGraph | object") -> CellGraph:
    """A `CellGraph` from our `NeighborGraph` / `FuzzyGraph` (its connectivities), a SciPy sparse matrix (e.g.
    scanpy's `obsp["connectivities"]`) or a `CellGraph`."""
    if isinstance(graph, CellGraph):
        return graph
    if isinstance(graph, NeighborGraph):
        graph = graph.connectivities
    if isinstance(graph, FuzzyGraph):
        return CellGraph(graph.heads, graph.tails, graph.weights, int(graph.sigma.shape[0]))
    import scipy.sparse as sp

    if sp.issparse(graph):
        coo: Any = sp.coo_matrix(graph)
        _check_scipy(coo)
        dtype = jnp.zeros(()).dtype
        return CellGraph(jnp.asarray(coo.row, jnp.int32), jnp.asarray(coo.col, jnp.int32),
                         jnp.asarray(coo.data, dtype), int(coo.shape[0]))
    raise ValueError(f"graph: expected a NeighborGraph, FuzzyGraph, CellGraph or SciPy sparse matrix, "
                     f"got {type(graph).__name__}")


def until_unchanged(step: Callable[[Array], Array], start: Array) -> Array:
    """`step` applied from `start` until it changes nothing (a `while_loop`; `step` must reach a fixed point)."""

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        return carry[1], step(carry[1])

    def changed(carry: tuple[Array, Array]) -> Array:
        return jnp.any(carry[0] != carry[1])

    return jax.lax.while_loop(changed, body, (start, step(start)))[1]


def propagate_min_labels(neighbour_min: Callable[[Array], Array], n: int, dtype: Any) -> Int[Array, " n"]:
    """Min-label propagation with pointer jumping until nothing changes: every vertex ends with the smallest vertex
    index of its connected component. `neighbour_min(labels)[i]` is the smallest label over vertex `i`'s neighbours
    (`n` where it has none); the graph must be undirected (each edge seen from both ends)."""

    def step(labels: Int[Array, " n"]) -> Int[Array, " n"]:
        labels = jnp.minimum(labels, neighbour_min(labels))
        return labels[labels]  # pointer jumping

    return until_unchanged(step, jnp.arange(n, dtype=dtype))


def nearest_seed_labels(graph: PaddedGraph, n_seeds: int) -> Int[Array, " n_cells"]:
    """The graph's Voronoi cells: each row labelled with its nearest seed in hops along the padded rows' slots
    (breadth-first spreading of the labels, ties to the larger label), so every label's rows are connected. Seed `k`
    is row `k * (n // n_seeds)` (spread along the graph when the rows are in reverse Cuthill-McKee order); rows that
    no seed reaches get `n_seeds` (a component without a seed; the tail rows' entries are not followed, as their
    scatter would cost three times the rest, so a row reached only through them too). `0 < n_seeds <= n_cells`."""
    n = graph.indices.shape[0]
    stride = n // n_seeds
    rows = jnp.arange(n, dtype=graph.indices.dtype)

    def spread(labels: Int[Array, " n_cells"]) -> Int[Array, " n_cells"]:
        return jnp.where(labels < 0, jnp.max(labels[graph.indices], axis=1), labels)

    seeds = jnp.where((rows % stride == 0) & (rows < stride * n_seeds), rows // stride, -1)
    labels = until_unchanged(spread, seeds)
    return jnp.where(labels < 0, n_seeds, labels)


def connected_components(graph: CellGraph) -> Int[Array, " n_cells"]:
    """Component labels of the undirected graph of the edges with positive weight: each cell gets the smallest cell
    index of its component (`propagate_min_labels` over both ends of every edge)."""
    n = graph.n_cells
    live = graph.weights > 0
    big = jnp.asarray(n, graph.heads.dtype)

    def neighbour_min(labels: Int[Array, " n_cells"]) -> Int[Array, " n_cells"]:
        via_tail = jax.ops.segment_min(jnp.where(live, labels[graph.tails], big), graph.heads, num_segments=n)
        via_head = jax.ops.segment_min(jnp.where(live, labels[graph.heads], big), graph.tails, num_segments=n)
        return jnp.minimum(via_tail, via_head)

    return propagate_min_labels(neighbour_min, n, graph.heads.dtype)


def warn_if_disconnected(labels: Int[ArrayLike, " n_cells"], *, field: str = "graph") -> int:
    """Warn, naming the components (their sizes and first cells), when the graph has more than one; returns the
    number of components."""
    labels = np.asarray(labels)
    roots, sizes = np.unique(labels, return_counts=True)
    if len(roots) > 1:
        order = np.argsort(-sizes)
        shown = "; ".join(f"component {k} ({int(sizes[i])} cells, from cell {int(roots[i])})"
                          for k, i in enumerate(order[:10]))
        more = f"; ... ({len(roots)} in all)" if len(roots) > 10 else ""
        warnings.warn(f"{field}: the neighbour graph is disconnected into {len(roots)} components: {shown}{more}",
                      DisconnectedGraphWarning, stacklevel=3)
    return len(roots)


class DisconnectedGraphWarning(UserWarning):
    """The cell graph has several connected components; distances across them are infinite."""
