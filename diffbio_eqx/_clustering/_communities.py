"""Communities of the shared neighbour graph: Leiden through igraph, as `scanpy.tl.leiden(flavor="igraph")` runs it.

The communities initialise the Gaussian mixture (`_gmm`) and propose its number of components when the user
gives none. Graph partitioning is combinatorial (no gradient to lose), so it runs on the host in igraph's C core:
the graph is built from the symmetric connectivities exactly as scanpy builds it (every non-zero of the matrix
an edge, weights on), the objective is modularity, `n_iterations` 2, and igraph's random generator is seeded
from a NumPy `RandomState(seed)` as scanpy's `random_state` does; the global generator is restored afterwards.
"""

import contextlib
import random
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .._core._neighbors import FuzzyGraph


if TYPE_CHECKING:
    import igraph


class _SeededIgraphRandom:
    """igraph's random-number interface over a NumPy `RandomState` (what scanpy passes to igraph)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.RandomState(seed)

    def getrandbits(self, k: int) -> int:
        return int(self._rng.tomaxint()) & ((1 << k) - 1)

    def randint(self, a: int, b: int) -> int:
        return int(self._rng.randint(a, b + 1))

    def random(self) -> float:
        return float(self._rng.random_sample())

    def gauss(self, mu: float, sigma: float) -> float:
        return float(self._rng.normal(mu, sigma))


@contextlib.contextmanager
def _igraph_seeded(seed: int) -> Iterator[None]:
    import igraph

    igraph.set_random_number_generator(_SeededIgraphRandom(seed))
    try:
        yield
    finally:
        igraph.set_random_number_generator(random)


def connectivity_matrix(graph: FuzzyGraph) -> sp.csr_matrix:
    """The fuzzy graph's edge list as scanpy's symmetric `obsp["connectivities"]` (a SciPy CSR matrix)."""
    n_cells = graph.sigma.shape[0]
    weights = np.asarray(graph.weights, dtype=np.float64)
    keep = weights > 0
    matrix = sp.csr_matrix(
        (weights[keep], (np.asarray(graph.heads)[keep], np.asarray(graph.tails)[keep])), shape=(n_cells, n_cells)
    )
    matrix.sum_duplicates()
    return matrix


def _igraph() -> ModuleType:
    try:
        import igraph
    except ImportError as error:  # pragma: no cover - igraph is a dependency
        raise ImportError("graph-initialised clustering needs igraph: pip install igraph") from error
    return igraph


def igraph_graph(adjacency: sp.spmatrix | sp.sparray) -> "igraph.Graph":
    """The weighted undirected igraph graph of a symmetric adjacency matrix, built as scanpy builds it (every
    non-zero an edge, row by row): built once, Leiden runs on it at several resolutions or seeds."""
    igraph = _igraph()
    matrix = sp.csr_matrix(adjacency)
    matrix.sum_duplicates()
    sources, targets = matrix.nonzero()
    graph = igraph.Graph(directed=False)
    graph.add_vertices(len(matrix.indptr) - 1)
    graph.add_edges(list(zip(sources.tolist(), targets.tolist())))
    # Row by row, as `matrix.nonzero()` lists them (canonical CSR: sorted, no duplicates), minus explicit zeros.
    graph.es["weight"] = matrix.data[matrix.data != 0]
    return graph


def leiden(adjacency: "sp.spmatrix | sp.sparray | igraph.Graph", *, resolution: float = 1.0, seed: int = 0,
           n_iterations: int = 2) -> np.ndarray:
    """Leiden communities (modularity, weighted) of a symmetric adjacency matrix (or its `igraph_graph`), numbered
    0.. by igraph.

    The same graph, objective and seeding as `scanpy.tl.leiden(adata, resolution, flavor="igraph",
    n_iterations=2, random_state=seed)`, so the partitions are identical.
    """
    graph = igraph_graph(adjacency) if isinstance(adjacency, sp.spmatrix | sp.sparray | np.ndarray) else adjacency
    with _igraph_seeded(seed):
        partition = graph.community_leiden(objective_function="modularity", weights="weight",
                                           resolution=resolution, n_iterations=n_iterations)
    return np.asarray(partition.membership, dtype=np.int32)


def leiden_with_k(adjacency: sp.spmatrix | sp.sparray, n_communities: int, *, seed: int = 0,
                  n_iterations: int = 2, max_tries: int = 12) -> tuple[np.ndarray, float]:
    """Leiden at the resolution that gives `n_communities` communities (bisection on a log scale), or, when no
    resolution gives exactly that many, the partition with the fewest communities above it.

    **Returns:** `(labels, resolution)`.
    """
    graph = igraph_graph(adjacency)
    low, high = 0.01, 10.0
    best: tuple[np.ndarray, float] | None = None
    for _ in range(max_tries):
        resolution = float(np.sqrt(low * high))
        labels = leiden(graph, resolution=resolution, seed=seed, n_iterations=n_iterations)
        found = int(labels.max()) + 1
        if found == n_communities:
            return labels, resolution
        if found > n_communities:
            high = resolution
            if best is None or found < int(best[0].max()) + 1:
                best = (labels, resolution)
        else:
            low = resolution
    if best is None:
        best = (leiden(graph, resolution=high, seed=seed, n_iterations=n_iterations), high)
    return best
