"""The Harmony stage: batch correction of an embedding, wrapping `diffbio_eqx._harmony.harmony`."""

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._math import PRESETS, HarmonyResult, harmony


class Harmony(eqx.Module):
    """Harmony batch correction (Harmony 2 numerics, matching harmonypy 2.1) of a whole dataset at once.

    The continuous settings (`theta`, `sigma`, `lamb`, `alpha`, the tolerances and the pruning cutoff) are array
    leaves: a stack of stages built with `eqx.filter_vmap` sweeps them in one compiled call, and gradients flow
    to them. `lamb < 0` selects Harmony 2's dynamic ridge penalty `alpha * E`. Shape-fixing settings (number of
    clusters, rounds, block size, levels per covariate) are static.
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
    n_batches: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        *,
        preset: Literal["harmony2", "classic"] = "harmony2",
        theta: Float[ArrayLike, "*theta_shape"] | None = None,
        sigma: Float[ArrayLike, ""] | None = None,
        lamb: Float[ArrayLike, "*lamb_shape"] | None = None,
        alpha: Float[ArrayLike, ""] | None = None,
        n_clusters: int | None = None,
        max_iter_harmony: int | None = None,
        max_iter_kmeans: int | None = None,
        epsilon_cluster: Float[ArrayLike, ""] | None = None,
        epsilon_harmony: Float[ArrayLike, ""] | None = None,
        block_size: float | None = None,
        batch_prop_cutoff: Float[ArrayLike, ""] | None = None,
        n_batches: int | tuple[int, ...] | None = None,
    ):
        """**Arguments:** as `diffbio_eqx.harmony` (all keyword only): `preset` (`"harmony2"` or `"classic"`)
        supplies every setting not given; `lamb=None` means Harmony 2's dynamic penalty (stored as -1);
        `n_clusters=None` means `min(round(n_cells / 30), 100)` at call time; `n_batches` (levels per covariate)
        is inferred from the labels when None.
        """
        settings = PRESETS[preset]
        pick = lambda value, default: default if value is None else value
        lamb = pick(lamb, settings.lamb)
        self.theta = jnp.asarray(pick(theta, settings.theta))
        self.sigma = jnp.asarray(pick(sigma, settings.sigma))
        self.lamb = jnp.asarray(-1.0 if lamb is None else lamb)
        self.alpha = jnp.asarray(pick(alpha, settings.alpha))
        self.epsilon_cluster = jnp.asarray(pick(epsilon_cluster, settings.epsilon_cluster))
        self.epsilon_harmony = jnp.asarray(pick(epsilon_harmony, settings.epsilon_harmony))
        self.batch_prop_cutoff = jnp.asarray(pick(batch_prop_cutoff, settings.batch_prop_cutoff))
        self.n_clusters = n_clusters
        self.max_iter_harmony = int(pick(max_iter_harmony, settings.max_iter_harmony))
        self.max_iter_kmeans = int(pick(max_iter_kmeans, settings.max_iter_kmeans))
        self.block_size = float(pick(block_size, settings.block_size))
        self.n_batches = (n_batches,) if isinstance(n_batches, int) else n_batches

    def __check_init__(self):
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters: must be >= 1, got {self.n_clusters}")
        if self.max_iter_harmony < 1 or self.max_iter_kmeans < 1:
            raise ValueError("max_iter_harmony and max_iter_kmeans must be >= 1")
        if not 0 < self.block_size <= 1:
            raise ValueError(f"block_size: must be in (0, 1], got {self.block_size}")

    def run(
        self,
        x: Float[ArrayLike, "n_cells n_dims"],
        batch_labels: Int[ArrayLike, "n_cells *n_covariates"],
        *,
        key: PRNGKeyArray,
        init_centroids: Float[ArrayLike, "n_clusters n_dims"] | None = None,
        inference: bool = False,
    ) -> HarmonyResult:
        """Run Harmony and return the full `HarmonyResult` (corrected cells, R, centroids, ridge coefficients,
        objective trace). `inference=True` uses the early-exit `while_loop` variant (same numerics, no reverse-mode
        gradients)."""
        return harmony(
            x,
            batch_labels,
            key=key,
            theta=self.theta,
            sigma=self.sigma,
            lamb=self.lamb,
            alpha=self.alpha,
            n_clusters=self.n_clusters,
            max_iter_harmony=self.max_iter_harmony,
            max_iter_kmeans=self.max_iter_kmeans,
            epsilon_cluster=self.epsilon_cluster,
            epsilon_harmony=self.epsilon_harmony,
            block_size=self.block_size,
            batch_prop_cutoff=self.batch_prop_cutoff,
            n_batches=self.n_batches,
            init_centroids=init_centroids,
            early_exit=inference,
        )

    def __call__(
        self,
        x: Float[ArrayLike, "n_cells n_dims"],
        batch_labels: Int[ArrayLike, "n_cells *n_covariates"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> Float[Array, "n_cells n_dims"]:
        """Batch-corrected embedding `(n_cells, n_dims)`.

        **Arguments:**

        - `x`: `(n_cells, n_dims)` embedding (PCs or a latent space).
        - `batch_labels`: `(n_cells,)` or `(n_cells, n_covariates)` integer codes.
        - `key`: PRNG key for the initialisation and block shuffles (required). (Keyword only argument.)
        - `inference`: use the early-exit loop (faster once converged; not reverse-mode differentiable).
        """
        if key is None:
            raise ValueError("Harmony needs `key` (k-means++ initialisation and block shuffles)")
        return self.run(x, batch_labels, key=key, inference=inference).z_corr

    def loss(
        self,
        x: Float[ArrayLike, "n_cells n_dims"],
        batch_labels: Int[ArrayLike, "n_cells *n_covariates"],
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """The Harmony objective after the last clustering round (k-means error + entropy + diversity
        cross-entropy, scaled by `2000 / n_cells`), differentiable through the whole loop with respect to `x` and
        the array settings; `aux` holds the initial objective, the rounds run and whether it converged."""
        result = self.run(x, batch_labels, key=key)
        aux = {
            "initial_objective": result.initial_objective,
            "n_rounds": result.n_rounds,
            "converged": result.converged,
        }
        return result.objective[-1], aux
