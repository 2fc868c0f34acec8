"""Soft k-means as composable pure functions.

Entropy-regularised (soft) k-means alternates responsibilities $r_{ik} = \\mathrm{softmax}_k(-\\|x_i - c_k\\|^2 / T)$
and centroid updates $c_k = \\sum_i r_{ik} x_i / \\sum_i r_{ik}$. At a fixed temperature $T$ each step does not
increase the free energy

$$F(c; T) = -T \\sum_i \\log \\sum_k \\exp(-\\|x_i - c_k\\|^2 / T),$$

which tends to the k-means inertia as $T \\to 0$. Every function here is differentiable in the data, the
centroids and the temperature, and can be `jax.vmap`-ed over temperatures and keys.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._core._geometry import squared_distances
from .._core._loop import chunk_start, iterate, row_chunks
from .._core._validate import check_n_clusters, check_positive, check_whole


def soft_assign(
    x: Float[Array, "n_cells n_dims"],
    centroids: Float[Array, "n_clusters n_dims"],
    temperature: Float[ArrayLike, ""],
) -> Float[Array, "n_cells n_clusters"]:
    """Responsibilities $\\mathrm{softmax}_k(-\\|x_i - c_k\\|^2 / T)$; each row lies on the simplex."""
    return jax.nn.softmax(-squared_distances(x, centroids) / temperature, axis=-1)


def hard_assign(
    x: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"]
) -> Int[Array, " n_cells"]:
    """Index of each cell's nearest centroid (the $T \\to 0$ limit of `soft_assign`)."""
    return jnp.argmin(squared_distances(x, centroids), axis=1)


def inertia(x: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"]) -> Float[Array, ""]:
    """k-means inertia: the sum over cells of the squared distance to the nearest centroid (scikit-learn's)."""
    return jnp.sum(jnp.min(squared_distances(x, centroids), axis=1))


def update_centroids(
    x: Float[Array, "n_cells n_dims"], resp: Float[Array, "n_cells n_clusters"]
) -> Float[Array, "n_clusters n_dims"]:
    """Responsibility-weighted means $c_k = \\sum_i r_{ik} x_i / \\sum_i r_{ik}$ (guarded against empty clusters)."""
    mass = jnp.sum(resp, axis=0)[:, None]
    return (resp.T @ x) / jnp.maximum(mass, jnp.finfo(x.dtype).tiny)


def free_energy(
    x: Float[Array, "n_cells n_dims"],
    centroids: Float[Array, "n_clusters n_dims"],
    temperature: Float[ArrayLike, ""],
) -> Float[Array, ""]:
    """The soft k-means objective $F(c; T) = -T \\sum_i \\log \\sum_k \\exp(-\\|x_i - c_k\\|^2 / T)$.

    Equals $\\sum_{ik} r_{ik} d_{ik} + T \\sum_{ik} r_{ik} \\log r_{ik}$ at the optimal responsibilities, and
    tends to `inertia` as $T \\to 0$.
    """
    temperature = jnp.asarray(temperature)
    return -temperature * jnp.sum(jax.nn.logsumexp(-squared_distances(x, centroids) / temperature, axis=1))


def kmeans_plus_plus(
    x: Float[Array, "n_cells n_dims"], n_clusters: int, *, key: PRNGKeyArray, n_local_trials: int | None = None
) -> Float[Array, "n_clusters n_dims"]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), greedy with scikit-learn's local trials by default.

    The first centroid is a uniformly drawn cell; each next one is the best (lowest potential) of
    `n_local_trials` cells drawn with probability proportional to the squared distance to the nearest centroid
    so far. `n_local_trials=1` is the plain k-means++ draw (as harmonypy and R harmony seed their clusters).

    **Arguments:**

    - `x`: shape `(n_cells, n_dims)`.
    - `n_clusters`: number of centroids (static).
    - `key`: PRNG key. (Keyword only argument.)
    - `n_local_trials`: candidates per step; default `2 + floor(log(n_clusters))` as in scikit-learn, 1 for the
      plain draw.

    **Returns:** the initial centroids, shape `(n_clusters, n_dims)` (rows of `x`).
    """
    # sizes are static, so this runs (once, at trace time) under jit too: more centroids than cells would repeat
    # cells silently
    check_n_clusters(x.shape[0], check_whole(n_clusters, "n_clusters"))
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    check_whole(n_local_trials, "n_local_trials")
    first_key, loop_key = jr.split(key)
    n_cells = x.shape[0]
    first = jr.randint(first_key, (), 0, n_cells)
    closest = squared_distances(x, x[first][None, :])[:, 0]
    centroids = jnp.zeros((n_clusters, x.shape[1]), dtype=x.dtype).at[0].set(x[first])

    def step(carry, inputs):
        centroids, closest = carry
        index, step_key = inputs
        total = jnp.sum(closest)
        # Uniform draws when every cell already coincides with a centroid (duplicated data).
        probabilities = jnp.where(total > 0, closest / jnp.where(total > 0, total, 1), 1.0 / n_cells)
        candidates = jr.choice(step_key, n_cells, (n_local_trials,), replace=True, p=probabilities)
        candidate_distances = jnp.minimum(closest[None, :], squared_distances(x[candidates], x))
        best = jnp.argmin(jnp.sum(candidate_distances, axis=1))
        centroids = centroids.at[index].set(x[candidates[best]])
        return (centroids, candidate_distances[best]), None

    indices = jnp.arange(1, n_clusters)
    (centroids, _), _ = jax.lax.scan(step, (centroids, closest), (indices, jr.split(loop_key, n_clusters - 1)))
    return centroids


ROW_CHUNK = 4096  # rows per chunk of `nearest_centroid` (keeps an (chunk, n_clusters) tile in cache)


def nearest_centroid(
    x: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"]
) -> Int[Array, " n_cells"]:
    """`hard_assign` (first on ties) in row chunks: no `(n_cells, n_clusters)` matrix, no variadic argmin."""
    n_cells = x.shape[0]
    n_clusters = centroids.shape[0]
    half_sq = 0.5 * jnp.sum(centroids * centroids, axis=1)[None, :]
    iota = jnp.arange(n_clusters, dtype=jnp.int32)[None, :]
    n_chunks, chunk = row_chunks(n_cells, ROW_CHUNK)

    def body(assign, i):
        start, _ = chunk_start(i, n_cells, chunk)
        # argmin of |c|^2 / 2 - x.c, as a min and a masked min (XLA's variadic argmin is slow on CPU)
        score = half_sq - jax.lax.dynamic_slice_in_dim(x, start, chunk) @ centroids.T
        best = jnp.min(score, axis=1, keepdims=True)
        nearest = jnp.min(jnp.where(score <= best, iota, n_clusters), axis=1)
        return jax.lax.dynamic_update_slice_in_dim(assign, nearest, start, 0), None

    assign, _ = jax.lax.scan(body, jnp.zeros((n_cells,), jnp.int32), jnp.arange(n_chunks, dtype=jnp.int32))
    return assign


def lloyd(
    x: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"], *, n_iter: int,
    tol: float = 1e-6,
) -> Float[Array, "n_clusters n_dims"]:
    """Up to `n_iter` hard k-means (Lloyd) rounds from `centroids`, stopping once the centroids move less than
    `tol` (Frobenius norm), as harmonypy's initialisation; an empty cluster keeps its centroid.

    An early-exit loop (`diffbio_eqx._core._loop.iterate`): hard assignments carry no useful gradient, and no
    reverse-mode gradient flows through it.
    """
    n_clusters = centroids.shape[0]
    ones = jnp.ones((x.shape[0],), x.dtype)

    def step(state, _):
        c, _ = state
        assign = nearest_centroid(x, c)
        sums = jax.ops.segment_sum(x, assign, n_clusters)
        counts = jax.ops.segment_sum(ones, assign, n_clusters)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)
        return (new, jnp.sqrt(jnp.sum((new - c) ** 2))), None

    init = (centroids, jnp.asarray(jnp.inf, x.dtype))
    (centroids, _), _, _ = iterate(step, init, lambda state: state[1] < tol, max_steps=n_iter, early_exit=True)
    return centroids


def annealing_schedule(
    start: Float[ArrayLike, ""], stop: Float[ArrayLike, ""], n_iter: int, *, n_hold: int = 0
) -> Float[Array, " n_iter"]:
    """A geometric temperature schedule from `start` to `stop` over `n_iter - n_hold` steps, then `n_hold`
    steps at `stop` (so the last iterations converge at the final temperature).

    !!! info
        Start below the first critical temperature of deterministic annealing, $2 \\lambda_{max}$ (twice the
        largest eigenvalue of the data covariance): above it every centroid moves to the data mean, and
        coincident centroids never separate again as the temperature falls.
    """
    if n_iter < 1 or not 0 <= n_hold < n_iter:
        raise ValueError(f"n_iter: need n_iter >= 1 and 0 <= n_hold < n_iter, got {n_iter}, {n_hold}")
    start, stop = jnp.asarray(start), jnp.asarray(stop)
    fraction = jnp.linspace(0, 1, n_iter - n_hold, dtype=jnp.result_type(start, stop))
    decay = jnp.exp(jnp.log(start) + fraction * (jnp.log(stop) - jnp.log(start)))
    return jnp.concatenate([decay, jnp.broadcast_to(stop, (n_hold,)).astype(decay.dtype)])


class SoftKMeansResult(eqx.Module):
    """What `soft_kmeans` returns.

    - `centroids`: `(n_clusters, n_dims)` final centroids.
    - `objective`: `(n_iter,)` free energy after each iteration, at that iteration's temperature.
    - `n_steps`: number of updates applied before the state froze (equals `n_iter` if never converged).
    - `converged`: whether the relative change of the objective fell below `tol` at the final temperature.
    """

    centroids: Float[Array, "n_clusters n_dims"]
    objective: Float[Array, " n_iter"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]


class _SoftKMeansState(eqx.Module):
    centroids: Float[Array, "n_clusters n_dims"]
    objective: Float[Array, ""]
    converged: Bool[Array, ""]


def _soft_kmeans_step(
    state: _SoftKMeansState,
    temperatures: tuple[Float[Array, ""], Float[Array, ""]],
    *,
    x: Float[Array, "n_cells n_dims"],
    tol: float,
) -> tuple[_SoftKMeansState, Float[Array, ""]]:
    temperature, next_temperature = temperatures
    centroids = update_centroids(x, soft_assign(x, state.centroids, temperature))
    objective = free_energy(x, centroids, temperature)
    before = free_energy(x, state.centroids, temperature)
    # Only a state at its final temperature may freeze, so an annealing schedule always runs to the end.
    settled = jnp.abs(before - objective) <= tol * jnp.abs(objective)
    converged = settled & (next_temperature == temperature)
    return _SoftKMeansState(centroids, objective, converged), objective


def soft_kmeans(
    x: Float[Array, "n_cells n_dims"],
    init: Float[Array, "n_clusters n_dims"],
    temperature: Float[ArrayLike, ""] | Float[Array, " n_iter"],
    *,
    n_iter: int,
    tol: float = 1e-7,
) -> SoftKMeansResult:
    """Soft k-means from `init` as a fixed-length `lax.scan` that freezes once converged (`_core._loop.iterate`).

    **Arguments:**

    - `x`: shape `(n_cells, n_dims)`.
    - `init`: initial centroids, shape `(n_clusters, n_dims)` (e.g. from `kmeans_plus_plus`).
    - `temperature`: a scalar, or an annealing schedule of shape `(n_iter,)` (see `annealing_schedule`).
    - `n_iter`: number of iterations (static). (Keyword only argument.)
    - `tol`: relative change of the objective below which the state freezes (at the final temperature).

    **Returns:** a `SoftKMeansResult` with the centroids and the per-iteration objective trace.

    Differentiable in `x`, `init` and `temperature`; vmappable over temperatures and initialisations.
    """
    check_whole(n_iter, "n_iter")
    check_positive(temperature, "temperature")  # T = 0 divides by zero (NaN centroids); T < 0 favours far ones
    temperatures = jnp.broadcast_to(jnp.asarray(temperature, dtype=x.dtype), (n_iter,))
    next_temperatures = jnp.concatenate([temperatures[1:], temperatures[-1:]])
    init_objective = free_energy(x, init, temperatures[0])
    state = _SoftKMeansState(init, init_objective, jnp.array(False))
    step = lambda s, t: _soft_kmeans_step(s, t, x=x, tol=tol)
    final, trace, n_steps = iterate(step, state, lambda s: s.converged, max_steps=n_iter,
                                    xs=(temperatures, next_temperatures), frozen=lambda s: s.objective)
    return SoftKMeansResult(final.centroids, trace, n_steps, final.converged)
