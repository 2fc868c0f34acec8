"""A weighted cell graph as an edge list, and the sparse operations the trajectory operators share.

Nothing here builds an `n_cells x n_cells` matrix: a matrix is its non-zeros `(heads, tails, weights)`, and a
matrix-vector product is one gather and one `segment_sum`, so memory is `O(n_edges)`.
"""

import warnings
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
        if coo.shape[0] != coo.shape[1]:
            raise ValueError(f"graph: expected a square cells x cells matrix, got shape {coo.shape}")
        if coo.nnz and (not np.all(np.isfinite(coo.data)) or np.any(coo.data < 0)):
            raise ValueError("graph: weights must be finite and non-negative")
        dtype = jnp.zeros(()).dtype
        return CellGraph(jnp.asarray(coo.row, jnp.int32), jnp.asarray(coo.col, jnp.int32),
                         jnp.asarray(coo.data, dtype), int(coo.shape[0]))
    raise ValueError(f"graph: expected a NeighborGraph, FuzzyGraph, CellGraph or SciPy sparse matrix, "
                     f"got {type(graph).__name__}")


def connected_components(graph: CellGraph) -> Int[Array, " n_cells"]:
    """Component labels of the undirected graph of the edges with positive weight: each cell gets the smallest cell
    index of its component (min-label propagation with pointer jumping, a `while_loop` until nothing changes)."""
    n = graph.n_cells
    live = graph.weights > 0
    big = jnp.asarray(n, graph.heads.dtype)

    def step(labels: Int[Array, " n_cells"]) -> Int[Array, " n_cells"]:
        via_tail = jax.ops.segment_min(jnp.where(live, labels[graph.tails], big), graph.heads, num_segments=n)
        via_head = jax.ops.segment_min(jnp.where(live, labels[graph.heads], big), graph.tails, num_segments=n)
        labels = jnp.minimum(labels, jnp.minimum(via_tail, via_head))
        return labels[labels]  # pointer jumping

    def body(carry: tuple[Int[Array, " n_cells"], Int[Array, " n_cells"]]) -> tuple[Array, Array]:
        _, labels = carry
        return labels, step(labels)

    def changed(carry: tuple[Int[Array, " n_cells"], Int[Array, " n_cells"]]) -> Array:
        old, new = carry
        return jnp.any(old != new)

    start = jnp.arange(n, dtype=graph.heads.dtype)
    return jax.lax.while_loop(changed, body, (start, step(start)))[1]


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
