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
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._core._geometry import squared_distances


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
    return -temperature * jnp.sum(jax.nn.logsumexp(-squared_distances(x, centroids) / temperature, axis=1))


def kmeans_plus_plus(
    x: Float[Array, "n_cells n_dims"], n_clusters: int, *, key: PRNGKeyArray, n_local_trials: int | None = None
) -> Float[Array, "n_clusters n_dims"]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with scikit-learn's local trials).

    The first centroid is a uniformly drawn cell; each next one is the best (lowest potential) of
    `n_local_trials` cells drawn with probability proportional to the squared distance to the nearest centroid
    so far.

    **Arguments:**

    - `x`: shape `(n_cells, n_dims)`.
    - `n_clusters`: number of centroids (static).
    - `key`: PRNG key. (Keyword only argument.)
    - `n_local_trials`: candidates per step; default `2 + floor(log(n_clusters))` as in scikit-learn.

    **Returns:** the initial centroids, shape `(n_clusters, n_dims)` (rows of `x`).
    """
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
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
    n_steps: Int[Array, ""]
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
    new = _SoftKMeansState(centroids, objective, state.n_steps + 1, converged)
    new = jtu.tree_map(lambda old, nw: jnp.where(state.converged, old, nw), state, new)
    return new, new.objective


def soft_kmeans(
    x: Float[Array, "n_cells n_dims"],
    init: Float[Array, "n_clusters n_dims"],
    temperature: Float[ArrayLike, ""] | Float[Array, " n_iter"],
    *,
    n_iter: int,
    tol: float = 1e-7,
) -> SoftKMeansResult:
    """Soft k-means from `init` as a fixed-length `lax.scan` that freezes once converged.

    **Arguments:**

    - `x`: shape `(n_cells, n_dims)`.
    - `init`: initial centroids, shape `(n_clusters, n_dims)` (e.g. from `kmeans_plus_plus`).
    - `temperature`: a scalar, or an annealing schedule of shape `(n_iter,)` (see `annealing_schedule`).
    - `n_iter`: number of iterations (static). (Keyword only argument.)
    - `tol`: relative change of the objective below which the state freezes (at the final temperature).

    **Returns:** a `SoftKMeansResult` with the centroids and the per-iteration objective trace.

    Differentiable in `x`, `init` and `temperature`; vmappable over temperatures and initialisations.
    """
    temperatures = jnp.broadcast_to(jnp.asarray(temperature, dtype=x.dtype), (n_iter,))
    next_temperatures = jnp.concatenate([temperatures[1:], temperatures[-1:]])
    init_objective = free_energy(x, init, temperatures[0])
    state = _SoftKMeansState(init, init_objective, jnp.array(0), jnp.array(False))
    step = lambda s, t: _soft_kmeans_step(s, t, x=x, tol=tol)
    final, trace = jax.lax.scan(step, state, (temperatures, next_temperatures))
    return SoftKMeansResult(final.centroids, trace, final.n_steps, final.converged)
