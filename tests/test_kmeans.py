import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
import pytest
from helpers import log_normalized_pca
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import diffbio_eqx as dx
from diffbio_eqx._clustering import _kmeans as kmeans_math, _loss as clustering_loss
from diffbio_eqx._core._geometry import squared_distances


# The library's entry points run eagerly (an eager `lax.scan` or `while_loop` compiles anew on every call, an eager
# operation once per shape); the tests call them through `jit`, so each shape and setting compiles once.
soft_kmeans = jax.jit(dx.soft_kmeans, static_argnames=("n_iter", "tol"))
kmeans_plus_plus = jax.jit(dx.kmeans_plus_plus, static_argnames=("n_clusters", "n_local_trials"))
annealing_schedule = jax.jit(kmeans_math.annealing_schedule, static_argnames=("n_iter", "n_hold"))
lloyd = jax.jit(kmeans_math.lloyd, static_argnames=("n_iter", "tol"))
soft_assign = jax.jit(kmeans_math.soft_assign)
hard_assign = jax.jit(kmeans_math.hard_assign)
free_energy = jax.jit(kmeans_math.free_energy)
inertia = jax.jit(kmeans_math.inertia)
update_centroids = jax.jit(kmeans_math.update_centroids)
compactness_loss = jax.jit(clustering_loss.clustering_compactness_loss)


@pytest.fixture(scope="module")
def simulated_counts():
    sim = dx.simulate(jr.key(0), n_cells=600, n_genes=300, n_groups=5)
    return np.asarray(sim.counts), np.asarray(sim.groups)


@pytest.fixture(scope="module")
def simulated(simulated_counts):
    counts, groups = simulated_counts
    return jnp.asarray(log_normalized_pca(counts, 20)), groups


def _per_cell_scale(x):
    # Mean squared distance to the data mean / 10: a natural unit for temperatures on this data.
    x = np.asarray(x)
    return float(np.mean(np.sum((x - x.mean(0, keepdims=True)) ** 2, axis=1))) / 10


def test_squared_distances_matches_scipy(getkey):
    x = jr.normal(getkey(), (30, 4))
    y = jr.normal(getkey(), (7, 4))
    d = squared_distances(x, y)
    assert d.shape == (30, 7)
    np.testing.assert_allclose(d, cdist(np.asarray(x), np.asarray(y), "sqeuclidean"), rtol=1e-10, atol=1e-12)
    with pytest.raises(jaxtyping.TypeCheckError):
        squared_distances(x, jr.normal(getkey(), (7, 3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_assign_properties(seed):
    kx, kc, kp = jr.split(jr.key(seed), 3)
    x = jr.normal(kx, (50, 3))
    c = jr.normal(kc, (4, 3))
    r = np.asarray(soft_assign(x, c, 0.7))
    assert r.shape == (50, 4)
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=1e-12)
    assert np.all(r >= 0)
    perm = np.asarray(jr.permutation(kp, 50))
    np.testing.assert_allclose(soft_assign(jnp.asarray(np.asarray(x)[perm]), c, 0.7), r[perm], rtol=1e-12)
    cluster_perm = np.array([2, 0, 3, 1])
    c_perm = jnp.asarray(np.asarray(c)[cluster_perm])
    np.testing.assert_allclose(soft_assign(x, c_perm, 0.7), r[:, cluster_perm], rtol=1e-12)
    # Free energy: invariant to relabelling, and equal to its two-term form at the optimal responsibilities.
    f = free_energy(x, c, 0.7)
    np.testing.assert_allclose(free_energy(x, c_perm, 0.7), f, rtol=1e-12)
    two_term = np.sum(r * cdist(np.asarray(x), np.asarray(c), "sqeuclidean")) + 0.7 * np.sum(r * np.log(r))
    np.testing.assert_allclose(f, two_term, rtol=1e-10)
    # T -> 0 gives hard assignments and the inertia.
    np.testing.assert_array_equal(np.argmax(soft_assign(x, c, 1e-6), 1), hard_assign(x, c))
    np.testing.assert_allclose(free_energy(x, c, 1e-9), inertia(x, c), rtol=1e-6)


def test_update_centroids_is_weighted_mean(getkey):
    x = jr.normal(getkey(), (40, 3))
    labels = jr.randint(getkey(), (40,), 0, 3)
    c = update_centroids(x, jnp.asarray(np.eye(3)[np.asarray(labels)]))
    xs, labels = np.asarray(x), np.asarray(labels)
    for k in range(3):
        np.testing.assert_allclose(c[k], xs[labels == k].mean(0), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_trace_never_increases(simulated, seed):
    x, _ = simulated
    init = kmeans_plus_plus(x, 6, key=jr.key(seed))
    result = soft_kmeans(x, init, _per_cell_scale(x) * 0.3, n_iter=30, tol=0.0)
    trace = np.asarray(result.objective)
    assert trace.shape == (30,)
    assert np.all(np.diff(trace) <= 1e-9 * np.abs(trace[1:]))
    assert float(free_energy(x, result.centroids, _per_cell_scale(x) * 0.3)) == pytest.approx(trace[-1])


def test_kmeans_plus_plus(simulated):
    x, _ = simulated
    xs = np.asarray(x)
    plus, uniform = [], []
    for seed in range(5):
        init = kmeans_plus_plus(x, 8, key=jr.key(seed))
        assert init.shape == (8, 20)
        rows = np.argmin(cdist(np.asarray(init), xs), axis=1)
        np.testing.assert_array_equal(np.asarray(init), xs[rows])  # centroids are cells
        assert len(set(rows.tolist())) == 8
        plus.append(float(inertia(x, init)))
        uniform_rows = np.asarray(jax.jit(jr.choice, static_argnums=(1, 2, 3))(jr.key(seed), 600, (8,), False))
        uniform.append(float(inertia(x, jnp.asarray(xs[uniform_rows]))))
    assert np.mean(plus) < np.mean(uniform)


@pytest.mark.parametrize("seed", [0, 1])
def test_low_temperature_matches_sklearn_inertia(simulated, seed):
    x, _ = simulated
    for n_clusters in (5, 12):
        init = kmeans_plus_plus(x, n_clusters, key=jr.key(seed))
        reference = KMeans(n_clusters, init=np.asarray(init), n_init=1, max_iter=300, tol=0).fit(np.asarray(x))
        temperature = _per_cell_scale(x) * 1e-3
        ours = soft_kmeans(x, init, temperature, n_iter=100)
        ratio = float(inertia(x, ours.centroids)) / reference.inertia_
        assert ratio <= 1.01, ratio
        # Annealed from a moderate temperature, too.
        schedule = annealing_schedule(_per_cell_scale(x), temperature, 100, n_hold=25)
        annealed = soft_kmeans(x, init, schedule, n_iter=100)
        assert float(inertia(x, annealed.centroids)) / reference.inertia_ <= 1.01


@pytest.mark.parametrize("seed", [0, 1])
def test_cold_limit_is_lloyd_labels_and_centroids_match_sklearn(simulated, seed):
    """From the same start, soft k-means near T = 0 is Lloyd's algorithm: sklearn's labels and centroids exactly.

    Measured: at T = 1e-5 of the per-cell scale (and colder) every label agrees and centroids agree to 2e-15. At
    1e-4 of it one case of eight (seed 1, 12 clusters, on jax 0.12's draw of the simulated counts without XLA's
    backend optimisation) split a near-tied cell and ended at another fixed point (16 labels differ; 3e-5 agrees);
    at 1e-3, 12 clusters still differ on 1% of the cells (soft assignments), which the inertia test allows.
    """
    x, _ = simulated
    xs = np.asarray(x)
    for n_clusters in (5, 12):
        init = kmeans_plus_plus(x, n_clusters, key=jr.key(seed))
        reference = KMeans(n_clusters, init=np.asarray(init), n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(xs)
        ours = soft_kmeans(x, init, _per_cell_scale(x) * 1e-5, n_iter=100)
        labels = np.argmin(cdist(xs, np.asarray(ours.centroids), "sqeuclidean"), axis=1)
        np.testing.assert_array_equal(labels, reference.labels_)
        np.testing.assert_allclose(ours.centroids, reference.cluster_centers_, rtol=0, atol=1e-10)
        assert bool(ours.converged) and float(inertia(x, ours.centroids)) == pytest.approx(
            reference.inertia_, rel=1e-12)


def test_stage_ari_against_simulated_groups(simulated):
    x, groups = simulated
    unfitted = dx.SoftKMeans(jnp.zeros((5, x.shape[1])), temperature=_per_cell_scale(x) * 0.01)
    fitted = dx.fit_soft_kmeans(unfitted, x, key=jr.key(3))
    stage = fitted.model
    labels = np.asarray(stage.hard_assign(x))
    ari = adjusted_rand_score(groups, labels)
    assert ari >= 0.9, ari
    assert fitted.train_loss.shape == (100,) and fitted.train_aux["temperature"].shape == (100,)
    assert np.all(np.isnan(np.asarray(fitted.validation_loss)))
    np.testing.assert_allclose(fitted.train_loss[-1], stage.objective(x), rtol=1e-10)
    assert stage.temperature == unfitted.temperature and stage.centroids.shape == unfitted.centroids.shape
    annealed = dx.fit_soft_kmeans(unfitted, x, key=jr.key(3), start_temperature=_per_cell_scale(x)).model
    assert adjusted_rand_score(groups, np.asarray(annealed.hard_assign(x))) >= 0.9
    resp = stage(x)
    assert resp.shape == (600, 5)
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=1e-12)


def _directional_fd(f, p, v, eps=1e-5):
    """Central difference of `f` at `p` along `v`, the points formed in NumPy."""
    p, v = np.asarray(p), np.asarray(v)
    return (float(f(jnp.asarray(p + eps * v))) - float(f(jnp.asarray(p - eps * v)))) / (2 * eps)


def test_gradients_flow_to_centroids_and_temperature(simulated, getkey):
    x, _ = simulated
    x = jnp.asarray(np.asarray(x)[:200])
    stage = dx.SoftKMeans(kmeans_plus_plus(x, 4, key=getkey()), temperature=_per_cell_scale(x))
    weights = jr.normal(getkey(), (200, 4))

    @eqx.filter_jit
    def loss(s):
        return jnp.sum(weights * s(x)) + s.loss((x,), key=jr.key(0))[0]

    grads = eqx.filter_jit(eqx.filter_grad(loss))(stage)
    assert abs(float(grads.temperature)) > 0
    assert np.linalg.norm(np.asarray(grads.centroids)) > 0
    v = np.asarray(jr.normal(getkey(), stage.centroids.shape))
    v = v / np.linalg.norm(v)
    fd = _directional_fd(lambda c: loss(eqx.tree_at(lambda s: s.centroids, stage, c)), stage.centroids, v)
    np.testing.assert_allclose(np.vdot(np.asarray(grads.centroids), v), fd, rtol=1e-6)
    fd_t = _directional_fd(lambda t: loss(eqx.tree_at(lambda s: s.temperature, stage, t)), stage.temperature, 1.0)
    np.testing.assert_allclose(grads.temperature, fd_t, rtol=1e-6)

    # Through the whole soft k-means iteration, in the initial centroids and the temperature.
    init = stage.centroids

    @jax.jit
    def through(c, t):
        return kmeans_math.free_energy(x, dx.soft_kmeans(x, c, t, n_iter=5, tol=0.0).centroids, t)

    g_c, g_t = jax.jit(jax.grad(through, argnums=(0, 1)))(init, stage.temperature)
    fd = _directional_fd(lambda c: through(c, stage.temperature), init, v)
    np.testing.assert_allclose(np.vdot(np.asarray(g_c), v), fd, rtol=1e-5)
    fd_t = _directional_fd(lambda t: through(init, t), stage.temperature, 1.0)
    np.testing.assert_allclose(g_t, fd_t, rtol=1e-5)


def test_vmap_over_temperatures_and_keys_equals_loop_without_recompiles(simulated):
    x, _ = simulated
    x = jnp.asarray(np.asarray(x)[:300])
    init = kmeans_plus_plus(x, 4, key=jr.key(0))
    scale = _per_cell_scale(x)
    temperatures = jnp.asarray(np.array([0.01, 0.1, 1.0, 3.0]) * scale)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(t):
        return dx.soft_kmeans(x, init, t, n_iter=20)

    loop = [run(t) for t in temperatures]  # one trace for all temperatures
    swept = jax.jit(jax.vmap(lambda t: dx.soft_kmeans(x, init, t, n_iter=20)))(temperatures)
    assert swept.centroids.shape == (4, 4, 20)
    for i, single in enumerate(loop):
        assert bool(eqx.tree_equal(jax.tree.map(lambda a: a[i], swept), single, rtol=1e-10, atol=1e-10))

    keys = jr.split(jr.key(1), 3)
    by_key = jax.jit(jax.vmap(lambda k: dx.kmeans_plus_plus(x, 4, key=k)))(keys)
    for i in range(3):
        np.testing.assert_allclose(by_key[i], kmeans_plus_plus(x, 4, key=keys[i]))

    stages = eqx.filter_vmap(lambda t: dx.SoftKMeans(init, temperature=t))(temperatures)
    outs = eqx.filter_vmap(lambda s: s(x), in_axes=eqx.if_array(0))(stages)
    assert outs.shape == (4, 300, 4)
    np.testing.assert_allclose(outs[2], dx.SoftKMeans(init, temperature=temperatures[2])(x), rtol=1e-12)


def test_error_paths(getkey):
    x = jr.normal(getkey(), (10, 2))
    with pytest.raises(ValueError, match="n_clusters"):
        dx.fit_soft_kmeans(dx.SoftKMeans(jnp.zeros((11, 2))), x, key=getkey())
    with pytest.raises(ValueError, match="n_clusters"):
        dx.fit_soft_kmeans(dx.SoftKMeans(jnp.zeros((0, 2))), x, key=getkey())
    with pytest.raises(ValueError, match="non-finite"):
        dx.fit_soft_kmeans(dx.SoftKMeans(x[:2]), x.at[3, 1].set(jnp.nan), key=getkey())
    with pytest.raises(ValueError, match="dimensions"):
        dx.fit_soft_kmeans(dx.SoftKMeans(jnp.zeros((2, 3))), x, key=getkey())
    bad = dx.SoftKMeans(x[:3], temperature=-1.0)
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        jax.jit(lambda s: s(x))(bad)
    stacked = eqx.filter_vmap(lambda t: dx.SoftKMeans(x[:3], temperature=t))(jnp.asarray([1.0, -1.0]))
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        eqx.filter_vmap(lambda s: s(x), in_axes=eqx.if_array(0))(stacked)
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        dx.ClusteringCompactnessLoss(temperature=0.0)(x, x[:3])


def test_float32_flows_through(simulated_counts):
    counts, _ = simulated_counts
    with jax.enable_x64(False):
        x = jnp.asarray(log_normalized_pca(counts[:300], 10), dtype=jnp.float32)
        temperature = _per_cell_scale(x) * 0.01
        stage = dx.fit_soft_kmeans(dx.SoftKMeans(x[:3], temperature=temperature), x, key=jr.key(1)).model
        assert stage.centroids.dtype == jnp.float32
        assert stage.temperature.dtype == jnp.float32
        assert stage(x).dtype == jnp.float32
        assert stage.loss((x,), key=jr.key(0))[0].dtype == jnp.float32
        init = kmeans_plus_plus(x, 3, key=jr.key(1))
        reference = KMeans(3, init=np.asarray(init), n_init=1, max_iter=300, tol=0).fit(np.asarray(x))
        assert float(inertia(x, stage.centroids)) <= 1.01 * reference.inertia_


def test_clustering_compactness_loss_matches_formula(getkey):
    x = jr.normal(getkey(), (60, 3))
    c = jr.normal(getkey(), (4, 3))
    loss, aux = compactness_loss(x, c, 0.5, 0.3)
    xs, cs = np.asarray(x), np.asarray(c)
    d = cdist(xs, cs, "sqeuclidean")
    r = np.exp(-d / 0.5)
    r /= r.sum(1, keepdims=True)
    s = np.mean(np.sum((xs - xs.mean(0)) ** 2, 1))
    compactness = np.mean(np.sum(r * d, 1)) / s
    dc = cdist(cs, cs, "sqeuclidean")
    separation = np.sum((1 - np.eye(4)) / (1 + dc / s)) / 12
    np.testing.assert_allclose(aux["compactness"], compactness, rtol=1e-10)
    np.testing.assert_allclose(aux["separation"], separation, rtol=1e-10)
    np.testing.assert_allclose(loss, compactness + 0.3 * separation, rtol=1e-10)
    module = dx.ClusteringCompactnessLoss(temperature=0.5, separation_weight=0.3)
    np.testing.assert_allclose(module(x, c)[0], loss, rtol=1e-12)
    # Scale-free, and spreading the centroids lowers the separation term.
    np.testing.assert_allclose(compactness_loss(jnp.asarray(3 * xs), jnp.asarray(3 * cs), 4.5, 0.3)[0], loss,
                               rtol=1e-10)
    assert compactness_loss(x, jnp.asarray(2 * cs), 0.5, 0.3)[1]["separation"] < aux["separation"]
    assert float(compactness_loss(x, jnp.asarray(cs[:1]), 0.5, 0.3)[1]["separation"]) == 0.0
    v = np.asarray(jr.normal(getkey(), c.shape))
    v = v / np.linalg.norm(v)
    grad = jax.jit(jax.grad(lambda cc: clustering_loss.clustering_compactness_loss(x, cc, 0.5, 0.3)[0]))(c)
    fd = _directional_fd(lambda cc: compactness_loss(x, cc, 0.5, 0.3)[0], c, v)
    np.testing.assert_allclose(np.vdot(np.asarray(grad), v), fd, rtol=1e-6)


def test_from_data_is_a_deprecated_alias_of_fit_soft_kmeans(simulated):
    x, _ = simulated
    with pytest.warns(DeprecationWarning, match="fit_soft_kmeans"):
        old = dx.SoftKMeans.from_data(x, 4, key=jr.key(2), temperature=0.5, n_iter=20)
    new = dx.fit_soft_kmeans(dx.SoftKMeans(x[:4], temperature=0.5), x, key=jr.key(2), n_iter=20).model
    assert bool(eqx.tree_equal(old, new))


@pytest.mark.parametrize("seed", [0, 1])
def test_lloyd_matches_sklearn_from_the_same_start(simulated, seed):
    nearest_centroid = jax.jit(kmeans_math.nearest_centroid)

    x, _ = simulated
    init = kmeans_plus_plus(x, 6, key=jr.key(seed), n_local_trials=1)
    ours = lloyd(x, init, n_iter=300, tol=0.0)
    reference = KMeans(6, init=np.asarray(init), n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(np.asarray(x))
    np.testing.assert_allclose(ours, reference.cluster_centers_, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(nearest_centroid(x, ours), hard_assign(x, ours))
    # A tolerance stops it early; one round is one Lloyd step.
    one = lloyd(x, init, n_iter=1)
    assigned = jnp.asarray(np.eye(6)[np.asarray(hard_assign(x, init))])
    np.testing.assert_allclose(one, update_centroids(x, assigned), rtol=1e-12)


def _counting_step(state, x):
    value, count = state
    new = value * 0.5 + x
    return (new, count + 1), new


@pytest.mark.parametrize("max_steps", [1, 3, 12])
def test_loop_scan_and_while_agree(max_steps):
    from diffbio_eqx._core._loop import iterate

    xs = jnp.ones((max_steps,), dtype=jnp.float64)
    init = (jnp.asarray(10.0), jnp.asarray(0))
    converged = lambda s: jnp.abs(s[0] - 2.0) < 0.3
    frozen = lambda s: s[0]
    runs = jax.jit(lambda init, xs: [
        iterate(_counting_step, init, converged, max_steps=max_steps, xs=xs, frozen=frozen, early_exit=e)
        for e in (False, True)])(init, xs)
    assert bool(eqx.tree_equal(runs[0], runs[1]))
    final, trace, n_steps = runs[0]
    # 10 -> 6 -> 4 -> 3 -> 2.5 -> 2.25 (converged after 5 steps)
    assert int(n_steps) == min(5, max_steps) == int(final[1])
    assert trace.shape == (max_steps,)
    np.testing.assert_allclose(trace[int(n_steps):], final[0])


def test_loop_fixed_length_is_differentiable_and_vmaps():
    from diffbio_eqx._core._loop import iterate

    def run(a):
        step = lambda s, _: (s * a, s * a)
        final, trace, n = iterate(step, jnp.asarray(1.0), lambda s: s < 0.1, max_steps=8, frozen=lambda s: s)
        return final, n

    # a^k until a^k < 0.1: a = 0.5 stops after 4 steps (0.0625).
    np.testing.assert_allclose(jax.jit(jax.grad(lambda a: run(a)[0]))(0.5), 4 * 0.5**3, rtol=1e-12)
    finals, counts = jax.jit(jax.vmap(run))(jnp.asarray([0.5, 0.9]))
    np.testing.assert_array_equal(counts, [4, 8])
    np.testing.assert_allclose(finals, [0.5**4, 0.9**8], rtol=1e-12)
