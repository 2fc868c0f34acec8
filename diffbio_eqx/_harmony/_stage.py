"""The Harmony stage: Harmony's settings as one module, the compiled loop that runs them, and `harmony()`.

`Harmony` holds every setting (presets are resolved once, in its constructor); `harmony_core` runs the algorithm
of `diffbio_eqx._harmony._math` from a `Harmony` under one `eqx.filter_jit`; `harmony(x, labels, key=...,
**settings)` is `Harmony(**settings).run(x, labels, key=...)`.
"""

import dataclasses
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._clustering._kmeans import kmeans_plus_plus, lloyd
from .._core._loop import iterate
from .._core._stage import AbstractStage
from .._core._validate import _is_traced, check_batch_labels, check_embedding, check_n_clusters
from ._math import (
    PRESETS,
    BatchDesign,
    HarmonyPreset,
    HarmonyResult,
    _ClusterStats,
    batch_design,
    block_layout,
    cold_start,
    cosine_normalize,
    default_n_clusters,
    harmony_objective_terms,
    map_to_reference,
    moe_ridge_correct,
    per_level,
    shuffle_strides,
    shuffled_order,
    update_r,
)


_SETTINGS = tuple(field.name for field in dataclasses.fields(HarmonyPreset))
_SCALARS = ("sigma", "alpha", "epsilon_cluster", "epsilon_harmony", "batch_prop_cutoff")


def _as_float(value: ArrayLike) -> Array:
    value = jnp.asarray(value)
    return value if jnp.issubdtype(value.dtype, jnp.inexact) else value.astype(float)


class Harmony(AbstractStage):
    """Harmony batch correction (Harmony 2 numerics, matching harmonypy 2.1) of a whole dataset at once.

    The module is Harmony's settings, as an optimistix solver is its own: `harmony(x, labels, key=key, **settings)`
    is `Harmony(**settings).run(x, labels, key=key)`. The continuous settings (`theta`, `sigma`, `lamb`, `alpha`,
    the tolerances and the pruning cutoff) are array leaves: a stack of stages built with `eqx.filter_vmap` sweeps
    them in one compiled call, and gradients flow to them. `lamb < 0` selects Harmony 2's dynamic ridge penalty
    `alpha * E`. Shape-fixing settings (number of clusters, rounds, block size, levels per covariate) are static.

    Harmony is not trained: it runs on the whole dataset. Its objective after the last clustering round,
    `run(...).objective[-1]`, is differentiable through the whole loop in `x` and the array settings.
    """

    theta: Float[Array, "*theta_shape"]
    sigma: Float[Array, ""]
    lamb: Float[Array, "*lamb_shape"]
    alpha: Float[Array, ""]
    epsilon_cluster: Float[Array, ""]
    epsilon_harmony: Float[Array, ""]
    batch_prop_cutoff: Float[Array, ""]
    n_clusters: int | None = eqx.field(static=True)
    max_iter_harmony: int = eqx.field(static=True)
    max_iter_kmeans: int = eqx.field(static=True)
    block_size: float = eqx.field(static=True)
    n_batches: int | tuple[int, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        *,
        preset: Literal["harmony2", "classic"] = "harmony2",
        n_clusters: int | None = None,
        n_batches: int | tuple[int, ...] | None = None,
        **settings: Any,
    ):
        """**Arguments:** (all keyword only)

        - `preset`: `"harmony2"` (default: theta 2, sigma 0.1, dynamic lamb with alpha 0.2, 10 outer and 4
          clustering rounds, epsilons 1e-3 / 1e-2) or `"classic"` (Harmony 1: lamb 1, 20 clustering rounds,
          epsilons 1e-5 / 1e-4). It supplies every setting not given (or given as None).
        - `n_clusters`: number of clusters; None means `min(round(n_cells / 30), 100)` at run time.
        - `n_batches`: levels per covariate (an int applies to every covariate); None infers `max + 1` from
          concrete labels (required when the labels are traced, inside `jit`/`vmap`).
        - `theta`: diversity penalty, one value or one per covariate.
        - `sigma`: soft-clustering bandwidth (> 0).
        - `lamb`: ridge penalty, one value or one per covariate; a negative value (stored for None under
          `"harmony2"`) selects Harmony 2's dynamic `alpha * E_kb`.
        - `alpha`: the dynamic penalty's factor.
        - `max_iter_harmony`, `max_iter_kmeans`: outer rounds and clustering rounds per outer round.
        - `epsilon_cluster`, `epsilon_harmony`: convergence tolerances (`-inf` runs every round).
        - `block_size`: share of the cells updated per block (`ceil(1 / block_size)` blocks per round).
        - `batch_prop_cutoff`: a batch holding at most this share of its cells in a cluster is not corrected there.
        """
        if preset not in PRESETS:
            raise ValueError(f"preset: must be one of {sorted(PRESETS)}, got {preset!r}")
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"Harmony: unknown setting(s) {unknown}; the settings are {list(_SETTINGS)}")
        value = {name: getattr(PRESETS[preset], name) for name in _SETTINGS}
        value.update({name: v for name, v in settings.items() if v is not None})
        self.theta = _as_float(value["theta"])
        self.sigma = _as_float(value["sigma"])
        self.lamb = _as_float(-1.0 if value["lamb"] is None else value["lamb"])
        self.alpha = _as_float(value["alpha"])
        self.epsilon_cluster = _as_float(value["epsilon_cluster"])
        self.epsilon_harmony = _as_float(value["epsilon_harmony"])
        self.batch_prop_cutoff = _as_float(value["batch_prop_cutoff"])
        for name, count in (("n_clusters", n_clusters), ("max_iter_harmony", value["max_iter_harmony"]),
                            ("max_iter_kmeans", value["max_iter_kmeans"])):
            if count is not None and (isinstance(count, bool) or int(count) != count):
                raise ValueError(f"{name}: must be a whole number, got {count!r}")  # not cut to one silently
        self.n_clusters = None if n_clusters is None else int(n_clusters)
        self.max_iter_harmony = int(value["max_iter_harmony"])
        self.max_iter_kmeans = int(value["max_iter_kmeans"])
        self.block_size = float(value["block_size"])
        self.n_batches = n_batches if n_batches is None or isinstance(n_batches, int) else tuple(n_batches)

    def __check_init__(self):
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters: must be >= 1, got {self.n_clusters}")
        if self.max_iter_harmony < 1 or self.max_iter_kmeans < 1:
            raise ValueError("max_iter_harmony and max_iter_kmeans must be >= 1")
        if not 0 < self.block_size <= 1:
            raise ValueError(f"block_size: must be in (0, 1], got {self.block_size}")
        for name in _SCALARS:
            if jnp.ndim(getattr(self, name)) != 0:
                raise ValueError(f"{name}: expected a scalar, got shape {jnp.shape(getattr(self, name))}")
        for name in ("theta", "lamb"):
            if jnp.ndim(getattr(self, name)) > 1:
                raise ValueError(f"{name}: expected one value or one per covariate, got shape "
                                 f"{jnp.shape(getattr(self, name))}")
        # Concrete values only (traced ones, under vmap or jit, are the caller's): NaN would correct every cell to NaN.
        for name, lowest in (("theta", 0.0), ("sigma", None), ("lamb", None), ("alpha", 0.0)):
            value = getattr(self, name)
            if _is_traced(value):
                continue
            array = np.asarray(value)
            if np.any(np.isnan(array)) or (lowest is not None and np.any(array < lowest)):
                raise ValueError(f"{name}: must be a number{f' >= {lowest:g}' if lowest is not None else ''}, "
                                 f"got {array.tolist()}")
        if not _is_traced(self.sigma) and not float(self.sigma) > 0:
            raise ValueError(f"sigma: must be > 0, got {float(self.sigma)}")

    def run(
        self,
        x: Float[ArrayLike, "n_cells n_dims"],
        batch_labels: Int[ArrayLike, " n_cells *n_covariates"],
        *,
        key: PRNGKeyArray,
        init_centroids: Float[ArrayLike, "n_clusters n_dims"] | None = None,
        inference: bool = False,
    ) -> HarmonyResult:
        """Run Harmony and return the full `HarmonyResult` (corrected cells, R, centroids, ridge coefficients,
        objective trace).

        **Arguments:**

        - `x`: `(n_cells, n_dims)` embedding (PCs or a latent space).
        - `batch_labels`: `(n_cells,)` integer batch codes, or `(n_cells, n_covariates)` for several covariates.
        - `key`: PRNG key for the k-means++ initialisation and the block shuffles. (Keyword only argument.)
        - `init_centroids`: `(n_clusters, n_dims)` initial centroids (scaled to unit length), instead of k-means++.
        - `inference`: run the loops as `lax.while_loop`s that stop at convergence (same numerics, less work once
          converged, not reverse-mode differentiable).

        !!! info
            Compiled with `eqx.filter_jit`; continuous settings are traced arrays, so changing theta, sigma, lamb,
            alpha or the tolerances never recompiles, and `jax.vmap` over them (or over keys) works. The boundary
            checks read concrete data on the host; under your own `jit`/`vmap` only shapes are checked here and NaN
            input, labels out of range or sigma <= 0 raise through `eqx.error_if` in the program (left out when the
            host checked everything: its host callback would keep the program out of JAX's persistent cache).
        """
        x, labels, init_centroids, shapes = _prepare(self, x, batch_labels, init_centroids)
        check = not _host_checked_sigma(self.sigma) or _is_traced(x) or _is_traced(labels)
        settings = jtu.tree_map(lambda leaf: jnp.asarray(leaf, x.dtype), self)
        return _harmony_jit(settings, x, labels, init_centroids, key=key, shapes=shapes, early_exit=inference,
                            check=check)

    def __call__(
        self,
        x: Float[ArrayLike, "n_cells n_dims"],
        batch_labels: Int[ArrayLike, " n_cells *n_covariates"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> Float[Array, "n_cells n_dims"]:
        """Batch-corrected embedding `(n_cells, n_dims)` (`run(...).z_corr`).

        **Arguments:**

        - `x`: `(n_cells, n_dims)` embedding (PCs or a latent space).
        - `batch_labels`: `(n_cells,)` or `(n_cells, n_covariates)` integer codes.
        - `key`: PRNG key for the initialisation and block shuffles (required). (Keyword only argument.)
        - `inference`: use the early-exit loop (faster once converged; not reverse-mode differentiable).
        """
        if key is None:
            raise ValueError("Harmony needs `key` (k-means++ initialisation and block shuffles)")
        return self.run(x, batch_labels, key=key, inference=inference).z_corr


def harmony(
    x: Float[ArrayLike, "n_cells n_dims"],
    batch_labels: Int[ArrayLike, " n_cells *n_covariates"],
    *,
    key: PRNGKeyArray,
    init_centroids: Float[ArrayLike, "n_clusters n_dims"] | None = None,
    early_exit: bool = False,
    **settings: Any,
) -> HarmonyResult:
    """Harmony batch correction of an embedding: `Harmony(**settings).run(x, batch_labels, key=key, ...)`.

    Uses the **Harmony 2 diversity penalty** `theta_b log((2 E_kb + 1) / (O_kb + E_kb + 1))` added to the
    log-responsibilities (R harmony >= 1.0 and harmonypy 2.x; Harmony 1 used `theta log((E + 1) / (O + 1))`),
    and the Harmony 2 ridge penalty `alpha * E_kb` unless `lamb` is given. See `diffbio_eqx._harmony._math` for
    the exact numerics.

    **Arguments:**

    - `x`: `(n_cells, n_dims)` embedding (PCs).
    - `batch_labels`: `(n_cells,)` integer batch codes, or `(n_cells, n_covariates)` for several covariates.
    - `key`: PRNG key for the k-means++ initialisation and the block shuffles. (Keyword only argument.)
    - `init_centroids`: `(n_clusters, n_dims)` initial centroids (scaled to unit length), instead of k-means++.
    - `early_exit`: run the loops as `lax.while_loop`s that stop at convergence (same numerics, less work once
      converged, not reverse-mode differentiable).
    - `settings`: `Harmony`'s keywords: `preset`, `theta`, `sigma`, `lamb`, `alpha`, `n_clusters`,
      `max_iter_harmony`, `max_iter_kmeans`, `epsilon_cluster`, `epsilon_harmony`, `block_size`,
      `batch_prop_cutoff`, `n_batches` (see `Harmony.__init__`).

    **Returns:** a `HarmonyResult`.
    """
    return Harmony(**settings).run(x, batch_labels, key=key, init_centroids=init_centroids, inference=early_exit)


# ---------------------------------------------------------------------------------------------------------------
# Boundary checks


class _Shapes(NamedTuple):
    n_batches: tuple[int, ...]
    n_clusters: int
    segments: tuple[int, ...] | None  # level sizes of the first covariate, when the labels are concrete


def _checked_embedding(x, *, field: str, n_dims: int | None = None) -> Array:
    # `check_embedding` reads concrete data only; under jit/vmap check shapes here.
    if not _is_traced(x):
        return jnp.asarray(check_embedding(x, field=field, n_dims=n_dims))
    if x.ndim != 2 or (n_dims is not None and x.shape[1] != n_dims):
        raise ValueError(f"{field}: expected shape (n_cells, {n_dims or 'n_dims'}), got {x.shape}")
    return x


def _checked_labels(labels, n_cells: int, n_batches, *, field: str) -> Array:
    if not _is_traced(labels):
        labels = jnp.asarray(check_batch_labels(labels, n_cells, n_batches=n_batches, field=field))
    if labels.ndim not in (1, 2) or labels.shape[0] != n_cells:
        raise ValueError(f"{field}: expected shape ({n_cells},) or ({n_cells}, n_covariates), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{field}: expected integer codes, got dtype {labels.dtype}")
    return labels if labels.ndim == 2 else labels[:, None]


def _host_checked_sigma(sigma: Any) -> bool:
    """True when `sigma` is concrete and was checked here (> 0, else a `ValueError`); False when it is traced."""
    if _is_traced(sigma):
        return False
    if not float(sigma) > 0:
        raise ValueError(f"sigma: must be > 0, got {float(sigma)}")
    return True


def _resolve_n_batches(n_batches: int | tuple[int, ...] | None, labels: Array) -> tuple[int, ...]:
    n_covariates = labels.shape[1]
    if n_batches is None:
        if _is_traced(labels):
            raise ValueError("n_batches: required when batch_labels is traced (inside jit/vmap)")
        n_batches = tuple(int(m) + 1 for m in np.asarray(labels).max(axis=0))
    elif isinstance(n_batches, int):
        n_batches = (n_batches,) * n_covariates
    n_batches = tuple(int(n) for n in n_batches)
    if len(n_batches) != n_covariates:
        raise ValueError(f"n_batches: {len(n_batches)} values for {n_covariates} covariate(s)")
    return n_batches


def _prepare(
    stage: Harmony, x, batch_labels, init_centroids
) -> tuple[Array, Array, Array | None, _Shapes]:
    """Check the inputs against the settings; resolve the shapes the settings leave open."""
    x = _checked_embedding(x, field="x")
    n_cells, n_dims = x.shape
    labels = _checked_labels(batch_labels, n_cells, stage.n_batches, field="batch_labels")
    n_covariates = labels.shape[1]
    n_batches = _resolve_n_batches(stage.n_batches, labels)
    segments = None
    if not _is_traced(labels):
        segments = tuple(int(c) for c in np.bincount(np.asarray(labels[:, 0]), minlength=n_batches[0]))
    n_clusters = default_n_clusters(n_cells) if stage.n_clusters is None else stage.n_clusters
    check_n_clusters(n_cells, n_clusters)
    for name in ("theta", "lamb"):
        shape = jnp.shape(getattr(stage, name))
        if len(shape) == 1 and shape[0] not in (1, n_covariates):
            raise ValueError(f"{name}: expected one value or one per covariate ({n_covariates}), got shape {shape}")
    if init_centroids is not None:
        init_centroids = _checked_embedding(init_centroids, field="init_centroids", n_dims=n_dims)
        if init_centroids.shape != (n_clusters, n_dims):
            raise ValueError(f"init_centroids: expected shape ({n_clusters}, {n_dims}), got {init_centroids.shape}")
    return x, labels, init_centroids, _Shapes(n_batches, n_clusters, segments)


# ---------------------------------------------------------------------------------------------------------------
# The loop


class _Data(eqx.Module):
    x: Float[Array, "n_cells n_dims"]
    design: BatchDesign
    base_order: Int[Array, " n_cells"]


class _State(eqx.Module):
    z_corr: Float[Array, "n_cells n_dims"]
    centroids: Float[Array, "n_clusters n_dims"]
    r: Float[Array, "n_cells n_clusters"]
    mass: Float[Array, " n_clusters"]
    batch_coef: Float[Array, "n_clusters n_levels n_dims"]
    objective: Float[Array, ""]
    initial_objective: Float[Array, ""]
    n_rounds: Int[Array, ""]
    converged: Bool[Array, ""]


class _KMeansState(eqx.Module):
    stats: _ClusterStats
    window: Float[Array, "4"]  # the last four objective values
    n_run: Int[Array, ""]
    done: Bool[Array, ""]


def _objective(stats: _ClusterStats, kmeans_error, entropy, data: _Data, params: Harmony) -> Float[Array, ""]:
    return harmony_objective_terms(kmeans_error, entropy, stats.mass, stats.observed, data.design.prior,
                                   params.theta, params.sigma, data.x.shape[0])


def _kmeans_step(
    state: _KMeansState, key: PRNGKeyArray, *, z, centroids, data: _Data, params: Harmony, layout: np.ndarray
) -> tuple[_KMeansState, Float[Array, ""]]:
    n_cells = z.shape[0]
    order = shuffled_order(data.base_order, shuffle_strides(n_cells), key)
    stats, kmeans_error, entropy = update_r(
        state.stats, z, centroids, data.design.phi, data.design.prior, params.theta, params.sigma, order, layout
    )
    objective = _objective(stats, kmeans_error, entropy, data, params)
    window = jnp.concatenate([state.window[1:], objective[None]])
    old, new = jnp.sum(window[:3]), jnp.sum(window[1:])
    # harmonypy tests only from the fifth round of an outer round on (`i > window_size`).
    done = (state.n_run >= 4) & (jnp.abs(old - new) / jnp.abs(old) < params.epsilon_cluster)
    return _KMeansState(stats, window, state.n_run + 1, done), objective


def _cluster(
    state: _State, key: PRNGKeyArray, data: _Data, params: Harmony, layout: np.ndarray, *, early_exit: bool
) -> tuple[_ClusterStats, Float[Array, " n_kmeans"], Int[Array, ""], Float[Array, ""]]:
    """Cold start, then up to `max_iter_kmeans` clustering rounds with the centroids held fixed; returns the
    stats, the objective trace, the rounds run and the cold-start objective."""
    z_corr, centroids = state.z_corr, state.centroids
    stats, kmeans_error, entropy = cold_start(z_corr, centroids, data.design.phi, params.sigma, state.r)
    cold_objective = _objective(stats, kmeans_error, entropy, data, params)
    dtype = z_corr.dtype
    init = _KMeansState(stats, jnp.zeros((4,), dtype), jnp.zeros((), jnp.int32), jnp.asarray(False))
    step = lambda s, k: _kmeans_step(s, k, z=z_corr, centroids=centroids, data=data, params=params, layout=layout)
    final, trace, n_run = iterate(step, init, lambda s: s.done, max_steps=params.max_iter_kmeans,
                                  xs=jr.split(key, params.max_iter_kmeans), frozen=lambda s: s.window[-1],
                                  early_exit=early_exit)
    return final.stats, trace, n_run, cold_objective


def _outer_round(
    state: _State, key: PRNGKeyArray, *, data: _Data, params: Harmony, layout: np.ndarray, early_exit: bool
) -> tuple[_State, tuple[Float[Array, ""], Float[Array, " n_kmeans"], Int[Array, ""]]]:
    stats, trace, n_run, cold_objective = _cluster(state, key, data, params, layout, early_exit=early_exit)
    previous = jnp.where(state.n_rounds == 0, cold_objective, state.objective)
    initial = jnp.where(state.n_rounds == 0, cold_objective, state.initial_objective)
    objective = trace[-1]
    z_corr, centroids, batch_coef = moe_ridge_correct(
        data.x, stats, data.design, state.centroids, params.lamb, params.alpha, params.batch_prop_cutoff
    )
    converged = (previous - objective) / jnp.abs(previous) < params.epsilon_harmony
    new = _State(z_corr, centroids, stats.r, stats.mass, batch_coef, objective, initial, state.n_rounds + 1,
                 converged)
    return new, (objective, trace, n_run)


def _frozen_round(state: _State, max_iter_kmeans: int):
    trace = jnp.full((max_iter_kmeans,), state.objective)
    return state.objective, trace, jnp.zeros((), jnp.int32)


def _init_state(data: _Data, centroids: Float[Array, "n_clusters n_dims"]) -> _State:
    x = data.x
    n_cells, n_dims = x.shape
    n_clusters = centroids.shape[0]
    dtype = x.dtype
    n_levels = data.design.phi.shape[1]
    nan = jnp.asarray(jnp.nan, dtype)
    return _State(
        z_corr=x,
        centroids=centroids,
        r=jnp.zeros((n_cells, n_clusters), dtype),
        mass=jnp.zeros((n_clusters,), dtype),
        batch_coef=jnp.zeros((n_clusters, n_levels, n_dims), dtype),
        objective=nan,
        initial_objective=nan,
        n_rounds=jnp.zeros((), jnp.int32),
        converged=jnp.asarray(False),
    )


def _result(state: _State, trace, params: Harmony, n_batches: tuple[int, ...]) -> HarmonyResult:
    objective, objective_kmeans, kmeans_rounds = trace
    return HarmonyResult(
        z_corr=state.z_corr,
        r=state.r,
        centroids=state.centroids,
        ridge_coefficients=state.batch_coef,
        cluster_sizes=state.mass,
        cluster_sums=state.r.T @ state.z_corr,
        objective=objective,
        initial_objective=state.initial_objective,
        objective_kmeans=objective_kmeans,
        kmeans_rounds=kmeans_rounds,
        n_rounds=state.n_rounds,
        converged=state.converged,
        sigma=params.sigma,
        n_batches=n_batches,
    )


def initial_centroids(
    x: Float[Array, "n_cells n_dims"], n_clusters: int, *, key: PRNGKeyArray, n_iter: int = 25, tol: float = 1e-6
) -> Float[Array, "n_clusters n_dims"]:
    """Harmony's initial centroids, as harmonypy and R harmony: plain k-means++ seeding (`kmeans_plus_plus` with
    one trial) and up to `n_iter` Lloyd rounds (until the centroids move less than `tol`) on the cosine-normalised
    cells; no gradient flows through them."""
    z = jax.lax.stop_gradient(cosine_normalize(x))
    return lloyd(z, kmeans_plus_plus(z, n_clusters, key=key, n_local_trials=1), n_iter=n_iter, tol=tol)


def _check_values(
    x: Float[Array, "n_cells n_dims"], batch_labels: Int[Array, "n_cells n_covariates"], sigma: Float[Array, ""],
    n_batches: tuple[int, ...],
) -> Float[Array, ""]:
    # The checks ride on the scalar sigma, which every step uses: with EQX_ON_ERROR=nan no copy of x is made.
    limits = jnp.asarray(n_batches, dtype=batch_labels.dtype)[None, :]
    sigma = eqx.error_if(sigma, ~jnp.all(jnp.isfinite(x)), "harmony: x contains NaN or Inf")
    sigma = eqx.error_if(
        sigma, jnp.any((batch_labels < 0) | (batch_labels >= limits)), "harmony: batch_labels out of range"
    )
    return eqx.error_if(sigma, ~(sigma > 0), "harmony: sigma must be > 0")


def harmony_core(
    params: Harmony,
    x: Float[Array, "n_cells n_dims"],
    batch_labels: Int[Array, "n_cells n_covariates"],
    init_centroids: Float[Array, "n_clusters n_dims"] | None,
    *,
    key: PRNGKeyArray,
    shapes: _Shapes,
    early_exit: bool = False,
    check: bool = True,
) -> HarmonyResult:
    """The traced body of `Harmony.run` (no input validation beyond `eqx.error_if` value checks; call it inside
    your own `jit`/`vmap` when you have already checked the data). `params`' float leaves are arrays of `x`'s
    dtype; `shapes` holds the levels per covariate, the number of clusters and (static, from concrete labels)
    the level sizes of the first covariate. `check` (static): the in-program value checks (`Harmony.run` leaves
    them out when it checked concrete inputs on the host)."""
    dtype = x.dtype
    n_cells = x.shape[0]
    n_batches = shapes.n_batches
    sigma = _check_values(x, batch_labels, params.sigma, n_batches) if check else params.sigma
    params = eqx.tree_at(
        lambda p: (p.theta, p.sigma, p.lamb),
        params,
        (per_level(params.theta, n_batches), sigma, per_level(params.lamb, n_batches)),
    )
    init_key, order_key, loop_key = jr.split(key, 3)
    if init_centroids is None:
        init_centroids = initial_centroids(x, shapes.n_clusters, key=init_key)
    centroids = cosine_normalize(init_centroids.astype(dtype))
    design = batch_design(batch_labels, n_batches, dtype, shapes.segments)
    data = _Data(x, design, jr.permutation(order_key, n_cells))
    layout = block_layout(n_cells, params.block_size)
    step = lambda s, k: _outer_round(s, k, data=data, params=params, layout=layout, early_exit=early_exit)
    state, trace, _ = iterate(step, _init_state(data, centroids), lambda s: s.converged,
                              max_steps=params.max_iter_harmony, xs=jr.split(loop_key, params.max_iter_harmony),
                              frozen=lambda s: _frozen_round(s, params.max_iter_kmeans), early_exit=early_exit)
    return _result(state, trace, params, n_batches)


_harmony_jit = eqx.filter_jit(harmony_core)


# ---------------------------------------------------------------------------------------------------------------
# Correcting new cells


def harmony_transform(
    result: HarmonyResult,
    new_x: Float[ArrayLike, "n_new n_dims"],
    new_batch_labels: Int[ArrayLike, " n_new *n_covariates"],
) -> Float[Array, "n_new n_dims"]:
    """Correct new cells from batches seen in training with the stored centroids and ridge coefficients.

    New cells are soft-assigned to the final centroids (no diversity penalty: the new cells do not move the
    clusters) and corrected with each cluster's stored batch coefficients:
    `z = x - sum_k R_ik W_k[batch_i]`. Cells of batch levels the reference did not correct in a cluster get no
    correction from it. For batches unseen in training, a Symphony-style mapping would fit new coefficients from
    `cluster_sizes` / `cluster_sums`; that is not done here.

    **Arguments:**

    - `result`: a `HarmonyResult` (e.g. from `Harmony.run`).
    - `new_x`: `(n_new, n_dims)` new cells in the same embedding (e.g. projected on the same PCs).
    - `new_batch_labels`: `(n_new,)` or `(n_new, n_covariates)` codes of batches seen in training.

    **Returns:** `(n_new, n_dims)` corrected cells.
    """
    n_dims = result.centroids.shape[1]
    x = _checked_embedding(new_x, field="new_x", n_dims=n_dims)
    labels = _checked_labels(new_batch_labels, x.shape[0], result.n_batches, field="new_batch_labels")
    if labels.shape[1] != len(result.n_batches):
        raise ValueError(
            f"new_batch_labels: {labels.shape[1]} covariate(s), the model has {len(result.n_batches)}"
        )
    return _transform(result, x, labels)


@eqx.filter_jit
def _transform(
    result: HarmonyResult, x: Float[Array, "n_new n_dims"], labels: Int[Array, "n_new n_covariates"]
) -> Float[Array, "n_new n_dims"]:
    return map_to_reference(x, labels, result.centroids, result.ridge_coefficients, result.sigma,
                            n_batches=result.n_batches)
