import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import log_normalized_pca
from sklearn.manifold import trustworthiness
from sklearn.neighbors import NearestNeighbors

import diffbio_eqx as dx
from diffbio_eqx import datasets
from diffbio_eqx._core import _neighbors as neighbors
from diffbio_eqx._umap import _graph as umap_graph_math


@pytest.fixture(scope="module")
def pbmc_pcs():
    adata = datasets.pbmc68k()
    return log_normalized_pca(adata.X.toarray(), 50).astype(np.float64)


@pytest.fixture(scope="module")
def simulated_pcs():
    sim = dx.simulate(jr.key(0), n_cells=1500, n_genes=400, n_groups=6)
    return log_normalized_pca(np.asarray(sim.counts), 30).astype(np.float64)


def _import_umap():
    with warnings.catch_warnings():  # umap-learn warns on import that TensorFlow is absent
        warnings.simplefilter("ignore")
        import umap
        import umap.umap_
    return umap


def _sklearn_knn(x, k=15):
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return indices, distances


def _knn_sets(x, k, queries=None):
    index = NearestNeighbors(n_neighbors=k + 1).fit(x)
    rows = np.arange(len(x)) if queries is None else queries
    found = index.kneighbors(x[rows], return_distance=False)
    # drop the cell itself
    return np.array([[j for j in row if j != i][:k] for i, row in zip(rows, found)])


def knn_preservation(x, z, k=15, rows=None):
    """Mean share of each cell's k nearest neighbours in `x` that are among its k nearest in `z`."""
    high, low = _knn_sets(x, k, rows), _knn_sets(z, k, rows)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(high, low)]))


def test_exact_knn_matches_sklearn(pbmc_pcs, getkey):
    x = jnp.asarray(pbmc_pcs)
    indices, distances = neighbors.exact_knn(x, x, 15, block_size=64)  # 700 = 10 full blocks + a padded one
    ref_indices, ref_distances = _sklearn_knn(pbmc_pcs)
    assert indices.shape == distances.shape == (700, 15)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-10, atol=1e-5)  # sklearn's self-distance ~1e-6
    queries = jr.normal(getkey(), (37, 50))
    q_indices, q_distances = neighbors.exact_knn(queries, x, 5)
    ref_d, ref_i = NearestNeighbors(n_neighbors=5).fit(pbmc_pcs).kneighbors(np.asarray(queries))
    np.testing.assert_array_equal(q_indices, ref_i)
    np.testing.assert_allclose(q_distances, ref_d, rtol=1e-8)
    with pytest.raises(ValueError, match="n_neighbors"):
        neighbors.exact_knn(queries, queries, 38)
    with pytest.raises(jaxtyping.TypeCheckError):
        neighbors.exact_knn(queries, x[:, :3], 5)


@pytest.mark.parametrize("spread,min_dist", [(1.0, 0.1), (1.0, 0.5), (2.0, 0.01), (0.5, 0.0), (1.5, 1.0)])
def test_find_ab_params_matches_umap_learn(spread, min_dist):
    a_ref, b_ref = _import_umap().umap_.find_ab_params(spread, min_dist)
    a, b = umap_graph_math.find_ab_params(spread, min_dist)
    np.testing.assert_allclose([float(a), float(b)], [a_ref, b_ref], rtol=1e-4)


def _graph_matrix(graph, n):
    return sp.coo_matrix(
        (np.asarray(graph.weights), (np.asarray(graph.heads), np.asarray(graph.tails))), shape=(n, n)
    ).tocsr()


@pytest.mark.parametrize("data", ["pbmc", "simulated", "duplicates"])
@pytest.mark.parametrize("set_op_mix_ratio,local_connectivity", [(1.0, 1.0), (0.5, 1.5), (0.0, 2.0)])
def test_fuzzy_simplicial_set_matches_umap_learn(
    data, set_op_mix_ratio, local_connectivity, pbmc_pcs, simulated_pcs
):
    fuzzy_simplicial_set = _import_umap().umap_.fuzzy_simplicial_set
    x = {"pbmc": pbmc_pcs, "simulated": simulated_pcs[:800], "duplicates": None}[data]
    if x is None:  # repeated cells give zero distances (umap-learn's rho branches for few non-zero neighbours)
        x = np.repeat(simulated_pcs[:100], 3, axis=0)[:250]
    indices, distances = neighbors.exact_knn(jnp.asarray(x), jnp.asarray(x), 15)
    graph = neighbors.fuzzy_simplicial_set(
        indices, distances, set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, sigma, rho = fuzzy_simplicial_set(
            x, 15, None, "euclidean", knn_indices=np.asarray(indices), knn_dists=np.asarray(distances),
            set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity,
        )
    np.testing.assert_allclose(graph.rho, rho, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(graph.sigma, sigma, atol=1e-4, rtol=1e-4)
    n = len(x)
    ours = _graph_matrix(graph, n)
    assert graph.weights.shape == (2 * n * 15,)
    assert abs(ours - reference.tocsr()).max() <= 1e-4
    assert abs(ours - ours.T).max() <= 1e-12  # symmetric, each pair listed once per orientation
    # No edge slot is listed twice with a non-zero weight.
    live = np.asarray(graph.weights) > 0
    pairs = np.asarray(graph.heads)[live].astype(np.int64) * n + np.asarray(graph.tails)[live]
    assert len(np.unique(pairs)) == len(pairs)


def test_smooth_knn_dist_calibrates_to_log2_k(simulated_pcs):
    x = jnp.asarray(simulated_pcs[:500])
    _, distances = neighbors.exact_knn(x, x, 15)
    sigma, rho = neighbors.smooth_knn_dist(distances, 15.0)
    distances, sigma, rho = np.asarray(distances), np.asarray(sigma), np.asarray(rho)
    psum = np.sum(np.exp(-np.maximum(distances[:, 1:] - rho[:, None], 0) / sigma[:, None]), axis=1)
    np.testing.assert_allclose(psum, np.log2(15), atol=1e-4)
    np.testing.assert_allclose(rho, distances[:, 1])  # local_connectivity 1: nearest non-self neighbour


def test_umap_loss_matches_formula(getkey):
    a, b = umap_graph_math.find_ab_params(1.0, 0.1)
    head, tail = jr.normal(getkey(), (64, 2)), jr.normal(getkey(), (64, 2))
    negatives = jr.normal(getkey(), (64, 5, 2))
    umap_loss = eqx.filter_jit(dx.umap_loss)  # eager, each of its operations would compile on its own
    loss, aux = umap_loss(head, tail, negatives, a, b, eps=1e-3)
    a_, b_ = float(a), float(b)

    def q(d2):
        return 1 / (1 + a_ * (d2 + 1e-3) ** b_)

    head_, tail_, negatives_ = np.asarray(head), np.asarray(tail), np.asarray(negatives)
    d_pos = np.sum((head_ - tail_) ** 2, -1)
    d_neg = np.sum((head_[:, None] - negatives_) ** 2, -1)
    expected = (np.sum(-np.log(q(d_pos))) + np.sum(-np.log(1 - q(d_neg)))) / (64 * 6)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(aux["attraction"], np.mean(-np.log(q(d_pos))), rtol=1e-10)
    # Stable for coincident and far-apart points, with finite gradients.
    far = umap_loss(head, head, jnp.asarray(np.broadcast_to(head_[:, None], (64, 5, 2))), a, b)[0]
    assert np.isfinite(float(far))
    grads = jax.jit(jax.grad(lambda h: dx.umap_loss(h, h * 1e6, h[:, None] + 0 * negatives, a, b)[0]))(head)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_parametric_umap_stage_contract(getkey):
    x = jr.normal(getkey(), (120, 8))
    model = dx.ParametricUMAP(8, key=getkey(), n_neighbors=10)
    assert model.encoder.depth == 3 and model.encoder.width_size == 100
    z = eqx.filter_jit(lambda m, v: m(v))(model, x)
    assert z.shape == (120, 2)
    np.testing.assert_allclose(model.embed(x, chunk_size=7), z, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dimensions"):
        model.embed(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        model.embed(np.full((5, 8), np.nan))
    with pytest.raises(ValueError, match="n_neighbors"):
        dx.ParametricUMAP(8, key=getkey(), n_neighbors=1)
    fitted = dx.fit_umap(model, x, key=getkey(), settings=dx.TrainSettings(n_epochs=2, batch_size=64, progress=False))
    assert fitted.train_loss.shape == (2,)
    np.testing.assert_array_equal(fitted.embedding, fitted.model.embed(x))  # no refinement by default
    with pytest.raises(ValueError, match="refine_steps"):
        dx.fit_umap(model, x, key=getkey(), refine_steps=-1)
    assert np.all(np.isfinite(np.asarray(fitted.train_loss)))
    # Only the encoder trains: a, b and the graph settings are untouched.
    assert float(fitted.model.a) == float(model.a) and float(fitted.model.b) == float(model.b)
    assert not bool(eqx.tree_equal(fitted.model.encoder, model.encoder))
    graph = model.graph(x)
    assert graph.weights.shape == (2 * 120 * 10,)
    edges = (jnp.asarray(np.asarray(graph.heads)[:32]), jnp.asarray(np.asarray(graph.tails)[:32]))
    loss, aux = eqx.filter_jit(lambda m, e, k: m.loss(e, key=k, x=x, rho=graph.rho))(model, edges, getkey())
    assert set(aux) == {"attraction", "repulsion"} and np.isfinite(float(loss))
    with pytest.raises(ValueError, match="x: ParametricUMAP.loss needs the cells"):
        model.loss(edges, key=getkey())
    # The old method still works, with a DeprecationWarning, and gives the same result as `fit_umap`.
    key = getkey()
    with pytest.warns(DeprecationWarning, match="fit_umap"):
        old = model.fit(x, key=key, n_epochs=1, batch_size=64, progress=False)
    new = dx.fit_umap(model, x, key=key, settings=dx.TrainSettings(n_epochs=1, batch_size=64, progress=False))
    assert bool(eqx.tree_equal(old, new))


def test_parametric_umap_float32():
    with jax.enable_x64(False):
        x = jr.normal(jr.key(0), (150, 6))
        model = dx.ParametricUMAP(6, key=jr.key(1), n_neighbors=10)
        fitted = dx.fit_umap(model, x, key=jr.key(2),
                             settings=dx.TrainSettings(n_epochs=2, batch_size=128, progress=False))
        z = fitted.model.embed(x)
        assert z.dtype == jnp.float32 and fitted.graph.weights.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(z)))


def assert_close_to_umap_learn(x, *, n_epochs, seed=0, input_noise=0.0):
    umap = _import_umap()
    n = len(x)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held_out, train = np.sort(order[: n // 5]), np.sort(order[n // 5 :])
    x_train = x[train]
    indices, distances = _sklearn_knn(x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = umap.UMAP(random_state=seed, precomputed_knn=(indices, distances, None)).fit_transform(x_train)
    model = dx.ParametricUMAP(x.shape[1], key=jr.key(seed), input_noise=input_noise)
    settings = dx.TrainSettings(n_epochs=n_epochs, batch_size=512, progress=False)
    fitted = dx.fit_umap(model, jnp.asarray(x_train), key=jr.key(seed + 1), settings=settings)
    ours = np.asarray(fitted.model.embed(x_train))
    ref_preservation, our_preservation = knn_preservation(x_train, reference), knn_preservation(x_train, ours)
    ref_trust = trustworthiness(x_train, reference, n_neighbors=15)
    our_trust = trustworthiness(x_train, ours, n_neighbors=15)
    held_out_z = np.asarray(fitted.model.embed(x[held_out]))
    # Held-out cells as a dataset of their own, against an equally large subset of training cells measured the
    # same way (neighbours within the subset), so the only difference is whether the encoder saw the cells.
    # (Averaged over 5 such subsets.)
    held_out_preservation = knn_preservation(x[held_out], held_out_z)
    subsets = [np.sort(rng.choice(len(train), size=len(held_out), replace=False)) for _ in range(5)]
    train_subset_preservation = float(np.mean([knn_preservation(x_train[s], ours[s]) for s in subsets]))
    # Stricter: neighbours among all cells, in the data and in the (training + embedded held-out) map.
    z_all = np.empty((n, 2))
    z_all[train], z_all[held_out] = ours, held_out_z
    among_all_held_out = knn_preservation(x, z_all, rows=held_out)
    among_all_train = knn_preservation(x, z_all, rows=train)
    figures = dict(
        ours=our_preservation, umap_learn=ref_preservation, our_trust=our_trust, umap_trust=ref_trust,
        held_out=held_out_preservation, train_subset=train_subset_preservation,
        among_all_held_out=among_all_held_out, among_all_train=among_all_train,
    )
    print(figures)
    assert our_preservation >= 0.9 * ref_preservation, figures
    assert our_trust >= ref_trust - 0.03, figures
    assert held_out_preservation >= 0.8 * train_subset_preservation, figures
    assert among_all_held_out >= 0.6 * among_all_train, figures


@pytest.mark.slow
def test_embedding_quality_pbmc68k(pbmc_pcs):
    assert_close_to_umap_learn(pbmc_pcs, n_epochs=30)


@pytest.mark.slow
def test_embedding_quality_simulated(simulated_pcs):
    assert_close_to_umap_learn(simulated_pcs, n_epochs=50)


def test_refinement_batch_grows_with_the_cells_above_50k():
    """Edges per refinement step: 16,384 up to 50,000 cells (the size the default was measured at), then in
    proportion to the cells, in multiples of 4,096, so each cell gets as many edge and negative touches per Adam
    step at 200k as at 50k."""
    from diffbio_eqx._umap._stage import refine_batch_size

    assert refine_batch_size(1_500) == refine_batch_size(50_000) == 16_384
    assert refine_batch_size(200_000) == 65_536
    assert refine_batch_size(1_000_000) == 327_680
    size = refine_batch_size(60_000)
    assert size % 4096 == 0 and 16_384 * 60_000 / 50_000 <= size < 16_384 * 60_000 / 50_000 + 4096
    sizes = [refine_batch_size(n) for n in range(40_000, 400_000, 7_919)]
    assert sizes == sorted(sizes)


@pytest.mark.slow  # two encoder fits and the refinement's compile: ~30 s on a quiet machine
def test_refinement_improves_the_fit_cells_and_leaves_the_encoder(simulated_pcs):
    """`refine_steps` moves the training cells' own coordinates by non-parametric UMAP from the encoder's output:
    a short (3-epoch) encoder fit leaves room, and the refined map keeps more of each cell's 15 neighbours; the
    encoder (what embeds new cells) is the same with or without refinement."""
    x = jnp.asarray(simulated_pcs)
    model = dx.ParametricUMAP(x.shape[1], key=jr.key(0))
    settings = dx.TrainSettings(n_epochs=3, batch_size=512, progress=False)
    plain = dx.fit_umap(model, x, key=jr.key(1), settings=settings)
    refined = dx.fit_umap(model, x, key=jr.key(1), settings=settings, graph=plain.graph, refine_steps=300)
    assert bool(eqx.tree_equal(plain.model, refined.model))
    np.testing.assert_array_equal(plain.embedding, plain.model.embed(x))
    assert refined.embedding.shape == (x.shape[0], 2) and bool(jnp.all(jnp.isfinite(refined.embedding)))
    before = knn_preservation(simulated_pcs, np.asarray(plain.embedding))
    after = knn_preservation(simulated_pcs, np.asarray(refined.embedding))
    print({"encoder": before, "refined": after})
    assert after >= before + 0.02
