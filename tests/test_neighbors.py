"""The shared neighbour graph (`neighbor_graph`): exact kNN against brute force, blocks, connectivities against
scanpy, the approximate backends (pynndescent's recall, approximate top-k, the automatic choice), bad input."""

import warnings

import anndata as ad
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import log_normalized_pca, tree_allclose, tree_identical

import diffbio_eqx as dx
from diffbio_eqx._core import _neighbors
from diffbio_eqx._core._neighbors import exact_knn


def _data(seed: int, n_cells: int = 120, n_dims: int = 6, n_duplicates: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n_cells, n_dims))
    if n_duplicates:  # exact copies of earlier cells: distance 0 ties with the cell itself
        x[-n_duplicates:] = x[:n_duplicates]
    return x


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Direct pairwise distances in float64; the cell itself first, other ties in index order."""
    distances = np.sqrt(np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1))
    ranked = distances.copy()
    np.fill_diagonal(ranked, -1.0)
    indices = np.argsort(ranked, axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(distances, indices, axis=1)


def _connectivity_matrix(graph: dx.NeighborGraph) -> sp.csr_matrix:
    c = graph.connectivities
    n = graph.indices.shape[0]
    matrix = sp.coo_matrix((np.asarray(c.weights), (np.asarray(c.heads), np.asarray(c.tails))), shape=(n, n))
    matrix = matrix.tocsr()
    matrix.eliminate_zeros()
    return matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_duplicates", [0, 10, 40])
def test_neighbor_graph_equals_brute_force_with_ties_to_self(seed, n_duplicates):
    x = _data(seed, n_duplicates=n_duplicates)
    x[5] = x[6] = x[7] = x[4]  # four identical cells: each must still come first in its own row
    graph = dx.neighbor_graph(x, 10)
    indices, distances = _brute_force(x, 10)
    assert graph.indices.shape == graph.distances.shape == (120, 10)
    np.testing.assert_array_equal(graph.indices[:, 0], np.arange(120))
    np.testing.assert_array_equal(graph.indices, indices)
    np.testing.assert_allclose(graph.distances, distances, rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(np.asarray(graph.distances), axis=1) >= 0)


def test_exact_knn_of_queries_against_a_reference_equals_brute_force(getkey):
    reference = _data(3, n_cells=90)
    queries = np.asarray(jr.normal(getkey(), (23, 6)))
    indices, distances = exact_knn(jnp.asarray(queries), jnp.asarray(reference), 7, block_size=5)
    direct = np.sqrt(np.sum((queries[:, None, :] - reference[None, :, :]) ** 2, axis=-1))
    expected = np.argsort(direct, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, np.take_along_axis(direct, expected, axis=1), rtol=1e-12)


# Augmented score rows of width 8 (padded), 8 (none), 104; 1,201 reference cells: the grouped top-k, whose last
# group of 32 is completed by never-chosen reference rows.
@pytest.mark.parametrize("n_dims,n_reference", [(6, 300), (7, 300), (100, 300), (6, 1201)])
def test_fast_exact_knn_equals_brute_force(getkey, n_dims, n_reference):
    reference = np.random.default_rng(5).normal(size=(n_reference, n_dims))
    queries = np.asarray(jr.normal(getkey(), (41, n_dims)))
    indices, distances = exact_knn(jnp.asarray(queries), jnp.asarray(reference), 9, block_size=8, fast=True)
    direct = np.sqrt(np.sum((queries[:, None, :] - reference[None, :, :]) ** 2, axis=-1))
    expected = np.argsort(direct, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, np.take_along_axis(direct, expected, axis=1), rtol=1e-12)


def _expected_knn(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    direct = np.sqrt(np.sum((queries[:, None, :] - reference[None, :, :]) ** 2, axis=-1))
    expected = np.argsort(direct, axis=1, kind="stable")[:, :k]
    return expected, np.take_along_axis(direct, expected, axis=1)


# Candidates of 22 (2.5 x 9) from 20 (all of them), 300 (top-k over rows) and 4,000 reference cells (grouped top-k,
# 4 * 22 * 32 = 2,816 or more); 100 dims: MAGIC's PCs.
@pytest.mark.parametrize("n_dims,n_reference", [(6, 20), (6, 300), (100, 300), (7, 4000), (100, 4000)])
def test_screened_exact_knn_equals_brute_force(getkey, n_dims, n_reference):
    reference = np.random.default_rng(6).normal(size=(n_reference, n_dims)) * np.linspace(3, 0.1, n_dims)
    queries = np.concatenate([np.asarray(jr.normal(getkey(), (40, n_dims))), reference[:9]])
    indices, distances = exact_knn(jnp.asarray(queries), jnp.asarray(reference), 9, block_size=8, screened=True)
    expected, expected_distances = _expected_knn(queries, reference, 9)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-12)


@pytest.mark.parametrize("n_tied_queries", [3, 13])
def test_screened_exact_knn_searches_again_where_it_cannot_certify(n_tied_queries):
    # 200 copies of one point: queries near it see 200 equal scores, so no bound can separate the 9th from the
    # 22nd candidate. 3 such rows in a block of 16 are searched again alone, 13 (more than SCREEN_RETRIES) make
    # the whole block be searched again; either way the result is the brute force's, ties in index order.
    rng = np.random.default_rng(7)
    reference = np.concatenate([rng.normal(size=(3800, 5)), np.ones((200, 5))])
    reference = reference[rng.permutation(4000)]
    tied = 1 + 0.01 * rng.normal(size=(n_tied_queries, 5))
    queries = np.concatenate([tied, rng.normal(size=(16 - n_tied_queries, 5))])
    screen = _neighbors._screen_rows(jnp.asarray(queries), jnp.asarray(reference))
    certified = _neighbors._screened_block(jnp.asarray(queries), jnp.asarray(reference), 9, screen)[2]
    np.testing.assert_array_equal(certified, np.arange(16) >= n_tied_queries)  # the fallback is exercised
    indices, distances = exact_knn(jnp.asarray(queries), jnp.asarray(reference), 9, block_size=16, screened=True)
    expected, expected_distances = _expected_knn(queries, reference, 9)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-12)


def test_screen_bounds_every_score_from_above():
    # The bfloat16 product of `_screen_rows` is an upper bound on 2 q.r - |r|^2, for small and large norms.
    rng = np.random.default_rng(8)
    reference = rng.normal(size=(500, 50)) * np.logspace(-3, 3, 500)[:, None]
    queries = rng.normal(size=(60, 50)) * np.logspace(-3, 3, 60)[:, None]
    wide = _neighbors._screen_rows(jnp.asarray(queries), jnp.asarray(reference))
    upper = np.asarray(jax.lax.dot_general(*wide, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    scores = 2 * queries @ reference.T - np.sum(reference**2, axis=1)
    assert np.all(upper[:, :500] >= scores)
    assert np.all(upper[:, 500:] == -np.inf)  # the rows completing the last group of 32 are never chosen


@pytest.mark.parametrize("block_size", [1, 7, 64, 120])
def test_blocked_equals_unblocked(block_size):
    x = _data(4, n_duplicates=12)
    blocked, whole = dx.neighbor_graph(x, 15, block_size=block_size), dx.neighbor_graph(x, 15)
    np.testing.assert_array_equal(blocked.indices, whole.indices)
    np.testing.assert_array_equal(blocked.connectivities.heads, whole.connectivities.heads)
    # The same neighbours; distances agree to the last bits (XLA may sum the coordinates in another order).
    assert tree_allclose(blocked, whole, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("set_op_mix_ratio,local_connectivity", [(1.0, 1.0), (0.5, 1.5), (0.0, 2.0)])
def test_connectivities_are_symmetric_in_the_unit_interval(set_op_mix_ratio, local_connectivity):
    x = _data(5, n_cells=200, n_duplicates=20)
    graph = dx.neighbor_graph(
        x, 15, set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity
    )
    matrix = _connectivity_matrix(graph)
    assert abs(matrix - matrix.T).max() == 0
    assert matrix.nnz > 0 and np.all(matrix.data > 0) and np.all(matrix.data <= 1)
    assert matrix.diagonal().max() == 0
    # Every kNN edge that survives the set operation is in the matrix; with the union, every one does.
    rows = np.repeat(np.arange(200), 14)
    knn_edges = np.asarray(matrix[rows, np.asarray(graph.indices)[:, 1:].reshape(-1)]).reshape(-1)
    if set_op_mix_ratio == 1.0:
        assert np.all(knn_edges > 0)


@pytest.fixture(scope="module")
def pcs():
    sim = dx.simulate(jr.key(0), n_cells=400, n_genes=200, n_groups=4)
    return log_normalized_pca(np.asarray(sim.counts), 20)


@pytest.mark.parametrize("n_neighbors", [5, 15, 30])
def test_connectivities_and_distances_match_scanpy(pcs, n_neighbors):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import scanpy as sc

        adata = ad.AnnData(pcs.astype(np.float64))
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X", method="umap")
    graph = dx.neighbor_graph(pcs, n_neighbors)
    ours = _connectivity_matrix(graph)
    reference = adata.obsp["connectivities"].tocsr()
    assert abs(ours - reference).max() <= 5e-5  # umap-learn works in float32, to a bisection tolerance of 1e-5
    assert (ours != 0).sum() == (reference != 0).sum()
    distances = adata.obsp["distances"].tocsr()
    np.testing.assert_array_equal(np.sort(distances.indices.reshape(-1, n_neighbors - 1), axis=1),
                                  np.sort(np.asarray(graph.indices)[:, 1:], axis=1))
    np.testing.assert_allclose(np.sort(distances.data.reshape(-1, n_neighbors - 1), axis=1),
                               np.asarray(graph.distances)[:, 1:], rtol=1e-5, atol=1e-6)


def test_the_graph_follows_a_continuous_setting_under_vmap_without_recompiling(monkeypatch):
    x = jnp.asarray(_data(6))
    ratios = jnp.asarray([1.0, 0.25])
    stacked = jax.vmap(lambda r: dx.neighbor_graph(x, 8, set_op_mix_ratio=r))(ratios)
    for i, ratio in enumerate([1.0, 0.25]):
        one = dx.neighbor_graph(x, 8, set_op_mix_ratio=ratio)
        np.testing.assert_allclose(stacked.connectivities.weights[i], one.connectivities.weights, rtol=1e-12)
    original = _neighbors._exact_neighbor_graph
    monkeypatch.setattr(_neighbors, "_exact_neighbor_graph",
                        eqx.filter_jit(eqx.debug.assert_max_traces(original.__wrapped__, max_traces=1)))
    for ratio, connectivity in ((1.0, 1.0), (0.5, 1.5), (0.1, 2.0)):
        dx.neighbor_graph(x, 8, set_op_mix_ratio=ratio, local_connectivity=connectivity)


def test_bad_input_names_the_field():
    x = _data(7, n_cells=20)
    for n_neighbors in (20, 25, 1, 0):
        with pytest.raises(ValueError, match="n_neighbors"):
            dx.neighbor_graph(x, n_neighbors)
    with pytest.raises(ValueError, match="method: unknown kNN method 'faiss'"):
        dx.neighbor_graph(x, 5, method="faiss")
    with pytest.raises(ValueError, match="block_size"):
        dx.neighbor_graph(x, 5, block_size=0)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"x: .*non-finite.*cell 3"):
        dx.neighbor_graph(bad, 5)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        dx.neighbor_graph(x[0], 5)
    # Inside the caller's jit the value check runs in the compiled graph.
    with pytest.raises((ValueError, RuntimeError), match="x: contains non-finite"):
        jax.jit(lambda v: dx.neighbor_graph(v, 5).distances)(jnp.asarray(bad))


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each cell's exact k neighbours (itself included) that `found` lists."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def _clustered_pcs(n_cells: int, n_dims: int = 30, seed: int = 0) -> np.ndarray:
    """Simulated PCs: 12 Gaussian groups of different spreads (what a kNN search meets in a PCA of cells)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(12, n_dims))
    groups = rng.integers(0, 12, n_cells)
    scales = rng.uniform(0.5, 1.5, 12)[groups, None] / np.arange(1, n_dims + 1) ** 0.3
    return (centres[groups] + scales * rng.normal(size=(n_cells, n_dims))).astype(np.float32)


@pytest.fixture(scope="module")
def approximate_graphs():
    """pynndescent (its first call compiles numba, ~45-60 s: the only real pynndescent run of the suite) and the
    exact graph of 2,000 simulated cells."""
    x = _clustered_pcs(2000)
    return x, dx.neighbor_graph(x, 15, method="pynndescent"), dx.neighbor_graph(x, 15, method="exact")


@pytest.mark.slow  # pynndescent's numba compile, about a minute (make test-slow)
def test_pynndescent_recall_against_exact(approximate_graphs):
    x, approximate, exact = approximate_graphs
    indices = np.asarray(approximate.indices)
    np.testing.assert_array_equal(indices[:, 0], np.arange(x.shape[0]))  # each cell first in its own row
    assert all(len(set(row)) == 15 for row in indices)
    assert np.all(np.diff(np.asarray(approximate.distances, dtype=float), axis=1) >= 0)
    assert _recall(indices, np.asarray(exact.indices)) >= 0.95
    # Its distances are recomputed from x as the exact search does them.
    direct = np.sqrt(np.sum((x[:, None, :] - x[indices]) ** 2, axis=-1))
    np.testing.assert_allclose(approximate.distances, direct, rtol=1e-5, atol=1e-5)


def test_the_same_neighbours_give_the_same_graph_whatever_the_backend(monkeypatch):
    """pynndescent's lists (here the exact ones, shuffled, with the cell itself somewhere in its row) go through
    the same distances and connectivities as the exact search: the graphs are identical."""
    x = _data(8, n_cells=150)
    exact = dx.neighbor_graph(x, 10, method="exact")
    shuffled = np.random.default_rng(0).permuted(np.asarray(exact.indices), axis=1)

    def fake_pynndescent(data, n_neighbors, *, seed):
        assert data.shape == x.shape and n_neighbors == 10 and seed == 0
        return _neighbors._self_first(shuffled)[0]

    monkeypatch.setattr(_neighbors, "pynndescent_knn", fake_pynndescent)
    assert tree_identical(dx.neighbor_graph(x, 10, method="pynndescent"), exact)


def test_self_first_repairs_rows():
    found = np.asarray([[3, 0, 1], [1, 2, 0], [0, 1, 3], [-1, 2, 3]])  # self second, first, missing; unfilled
    indices, unfilled = _neighbors._self_first(found)
    np.testing.assert_array_equal(indices, [[0, 3, 1], [1, 2, 0], [2, 0, 1], [3, -1, 2]])
    np.testing.assert_array_equal(unfilled, [False, False, False, True])


def test_auto_picks_the_backend_by_size_and_device(monkeypatch):
    small, large = _neighbors.EXACT_MAX_CELLS - 1, _neighbors.EXACT_MAX_CELLS
    huge = _neighbors.IVF_MIN_CELLS
    assert _neighbors.select_neighbor_method(small, backend="gpu") == "exact"
    assert _neighbors.select_neighbor_method(huge - 1, backend="cpu") == "exact"
    assert _neighbors.select_neighbor_method(huge, backend="cpu") == "ivf"
    assert _neighbors.select_neighbor_method(huge, backend="cpu", traced=True) == "exact"
    for accelerator in ("gpu", "tpu"):
        assert _neighbors.select_neighbor_method(large, backend=accelerator) == "approx_top_k"
        assert _neighbors.select_neighbor_method(large, backend=accelerator, traced=True) == "approx_top_k"
    # neighbor_graph follows the choice: above the (lowered) cut, CPU cells go to the IVF, traced ones not.
    calls = []

    def spy(data, n_neighbors, *, key, **settings):
        calls.append(data.shape)
        return dx.neighbor_graph(data, n_neighbors, method="exact")

    monkeypatch.setattr(_neighbors, "ivf_neighbor_graph", spy)
    monkeypatch.setattr(_neighbors, "EXACT_MAX_CELLS", 100)
    monkeypatch.setattr(_neighbors, "IVF_MIN_CELLS", 110)
    x = _data(9, n_cells=120)
    expected = "approx_top_k" if jax.default_backend() in ("gpu", "tpu") else "ivf"
    assert _neighbors.select_neighbor_method(120) == expected
    auto = dx.neighbor_graph(x, 8)
    assert calls == ([(120, 6)] if expected == "ivf" else [])
    assert tree_identical(auto, dx.neighbor_graph(x, 8, method="exact"))
    jax.jit(lambda v: dx.neighbor_graph(v, 8).indices)(jnp.asarray(x))
    assert len(calls) == (1 if expected == "ivf" else 0)


def test_forced_backends():
    x = _clustered_pcs(300, n_dims=10, seed=1)
    exact = np.asarray(dx.neighbor_graph(x, 15, method="exact").indices)
    approximate = jax.jit(lambda v: dx.neighbor_graph(v, 15, method="approx_top_k"))(jnp.asarray(x))
    np.testing.assert_array_equal(approximate.indices[:, 0], np.arange(300))
    assert _recall(np.asarray(approximate.indices), exact) >= 0.95
    with pytest.raises(ValueError, match="method: 'pynndescent' runs on host arrays"):
        jax.jit(lambda v: dx.neighbor_graph(v, 15, method="pynndescent").indices)(jnp.asarray(x))
    with pytest.raises(ValueError, match="method: 'ivf' reads its lists' sizes back to the host"):
        jax.jit(lambda v: dx.neighbor_graph(v, 15, method="ivf").indices)(jnp.asarray(x))


@pytest.fixture(scope="module")
def ivf_graphs():
    """The IVF graph (defaults: 55 lists, 16 probed) and the exact one of 3,000 simulated cells."""
    x = _clustered_pcs(3000)
    return x, dx.neighbor_graph(x, 15, method="ivf"), dx.neighbor_graph(x, 15, method="exact")


def _check_rows(x: np.ndarray, graph: dx.NeighborGraph) -> np.ndarray:
    indices = np.asarray(graph.indices)
    np.testing.assert_array_equal(indices[:, 0], np.arange(x.shape[0]))  # each cell first in its own row
    assert all(len(set(row)) == indices.shape[1] for row in indices)  # no cell twice
    assert np.all(np.diff(np.asarray(graph.distances, dtype=float), axis=1) >= 0)
    direct = np.sqrt(np.sum((x[:, None, :] - x[indices]) ** 2, axis=-1))
    np.testing.assert_allclose(graph.distances, direct, rtol=1e-5, atol=1e-5)
    return indices


def test_ivf_recall_against_exact(ivf_graphs):
    x, approximate, exact = ivf_graphs
    exact_indices = np.asarray(exact.indices)
    assert _recall(_check_rows(x, approximate), exact_indices) >= 0.95
    # The connectivities are the same function of the lists: where the rows agree, so do sigma and rho.
    same = np.all(np.asarray(approximate.indices) == exact_indices, axis=1)
    assert same.mean() > 0.8
    np.testing.assert_allclose(np.asarray(approximate.connectivities.sigma)[same],
                               np.asarray(exact.connectivities.sigma)[same], rtol=1e-5)


def test_ivf_probing_every_list_is_exact():
    x = _data(10, n_cells=200)
    exact = dx.neighbor_graph(x, 12, method="exact")
    every = _neighbors.ivf_neighbor_graph(jnp.asarray(x), 12, key=jr.key(0), n_lists=8, n_probe=8)
    np.testing.assert_array_equal(every.indices, exact.indices)
    assert tree_allclose(every, exact, rtol=1e-5, atol=1e-6)
    # 100 lists of ~2 cells and 1 probe: too few cells for 12 neighbours, so each list probes its nearest lists
    # until it has them; every row still holds distinct cells, itself first, and most true neighbours.
    coarse = _neighbors.ivf_neighbor_graph(jnp.asarray(x), 12, key=jr.key(1), n_lists=100, n_probe=1)
    assert _recall(_check_rows(x, coarse), np.asarray(exact.indices)) >= 0.3
    for bad in ({"n_probe": 9}, {"n_probe": 0}, {"n_lists": 0}, {"n_lists": 201}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _neighbors.ivf_neighbor_graph(jnp.asarray(x), 12, key=jr.key(0), **{"n_lists": 8, **bad})
