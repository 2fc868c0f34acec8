"""Soft k-means clustering as a stage with learnable centroids and temperature."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._validate import check_embedding, check_n_clusters
from ._kmeans import (
    annealing_schedule,
    free_energy,
    hard_assign,
    kmeans_plus_plus,
    soft_assign,
    soft_kmeans,
)
from ._loss import clustering_compactness_loss


@eqx.filter_jit
def _fit_centroids(
    x: Float[Array, "n_cells n_dims"],
    temperature: Float[Array, ""],
    start_temperature: Float[Array, ""] | None,
    *,
    n_clusters: int,
    n_iter: int,
    key: PRNGKeyArray,
) -> Float[Array, "n_clusters n_dims"]:
    init = kmeans_plus_plus(x, n_clusters, key=key)
    schedule = temperature
    if start_temperature is not None:
        schedule = annealing_schedule(start_temperature, temperature, n_iter, n_hold=n_iter // 4)
    return soft_kmeans(x, init, schedule, n_iter=n_iter).centroids


class SoftKMeans(eqx.Module):
    """Soft cluster assignments $r_{ik} = \\mathrm{softmax}_k(-\\|x_i - c_k\\|^2 / T)$ with learnable centroids $c$
    and temperature $T$ (both array leaves: differentiable, vmappable, trainable).

    Calling the stage returns the `(n_cells, n_clusters)` responsibilities; `hard_assign` the nearest centroid.
    Build it from data with `SoftKMeans.from_data` (k-means++ then soft k-means), or from given centroids.
    """

    centroids: Float[Array, "n_clusters n_dims"]
    temperature: Float[Array, ""]

    def __init__(self, centroids: Float[ArrayLike, "n_clusters n_dims"], *, temperature: Float[ArrayLike, ""] = 1.0):
        """**Arguments:**

        - `centroids`: initial centroids, shape `(n_clusters, n_dims)`.
        - `temperature`: soft-assignment temperature, in squared-distance units (must be > 0).
        """
        self.centroids = jnp.asarray(centroids)
        self.temperature = jnp.asarray(temperature, dtype=self.centroids.dtype)

    def __check_init__(self):
        if self.centroids.ndim != 2 or self.centroids.shape[0] < 1:
            raise ValueError(f"centroids: expected shape (n_clusters >= 1, n_dims), got {self.centroids.shape}")

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def from_data(
        cls,
        x: ArrayLike,
        n_clusters: int,
        *,
        key: PRNGKeyArray,
        temperature: Float[ArrayLike, ""] = 1.0,
        start_temperature: Float[ArrayLike, ""] | None = None,
        n_iter: int = 100,
    ) -> "SoftKMeans":
        """Initialise by k-means++ on `x`, then run `n_iter` soft k-means iterations.

        **Arguments:**

        - `x`: `(n_cells, n_dims)` cells (e.g. corrected embeddings).
        - `n_clusters`: number of clusters, `1 <= n_clusters <= n_cells`.
        - `key`: PRNG key for k-means++. (Keyword only argument.)
        - `temperature`: the stage's temperature (and the final one of the fit).
        - `start_temperature`: if given, anneal geometrically from it down to `temperature` (holding the last
          quarter of the iterations at `temperature`).
        - `n_iter`: soft k-means iterations.
        """
        x = jnp.asarray(check_embedding(x))
        check_n_clusters(x.shape[0], n_clusters)
        temperature = jnp.asarray(temperature, dtype=x.dtype)
        start = None if start_temperature is None else jnp.asarray(start_temperature, dtype=x.dtype)
        centroids = _fit_centroids(x, temperature, start, n_clusters=n_clusters, n_iter=n_iter, key=key)
        return cls(centroids, temperature=temperature)

    def _checked_temperature(self) -> Float[Array, ""]:
        return eqx.error_if(self.temperature, self.temperature <= 0, "temperature must be > 0")

    def __call__(
        self, x: Float[Array, "n_cells n_dims"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_clusters"]:
        """Responsibilities of each cell for each cluster (rows on the simplex). `key`, `inference` are ignored."""
        del key, inference
        return soft_assign(x, self.centroids, self._checked_temperature())

    def hard_assign(self, x: Float[Array, "n_cells n_dims"]) -> Int[Array, " n_cells"]:
        """Nearest-centroid labels."""
        return hard_assign(x, self.centroids)

    def objective(self, x: Float[Array, "n_cells n_dims"]) -> Float[Array, ""]:
        """The soft k-means free energy at the stage's centroids and temperature (`free_energy`)."""
        return free_energy(x, self.centroids, self._checked_temperature())

    def loss(
        self,
        x: Float[Array, "n_cells n_dims"],
        *,
        key: PRNGKeyArray | None = None,
        separation_weight: Float[ArrayLike, ""] = 1.0,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """`clustering_compactness_loss` of `x` under this stage's centroids and temperature."""
        del key
        return clustering_compactness_loss(x, self.centroids, self._checked_temperature(), separation_weight)
