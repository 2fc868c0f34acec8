"""Soft k-means clustering as a stage with learnable centroids and temperature, and `fit_soft_kmeans`."""

import warnings

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult
from .._core._validate import check_embedding, check_n_clusters, check_positive, check_whole
from ._kmeans import (
    SoftKMeansResult,
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
) -> tuple[SoftKMeansResult, Float[Array, " n_iter"]]:
    init = kmeans_plus_plus(x, n_clusters, key=key)
    schedule = jnp.broadcast_to(temperature, (n_iter,))
    if start_temperature is not None:
        schedule = annealing_schedule(start_temperature, temperature, n_iter, n_hold=n_iter // 4)
    return soft_kmeans(x, init, schedule, n_iter=n_iter), schedule


class SoftKMeans(AbstractTrainableStage):
    """Soft cluster assignments $r_{ik} = \\mathrm{softmax}_k(-\\|x_i - c_k\\|^2 / T)$ with learnable centroids $c$
    and temperature $T$ (both array leaves: differentiable, vmappable, trainable).

    Calling the stage returns the `(n_cells, n_clusters)` responsibilities; `hard_assign` the nearest centroid.
    Fit it to data with `fit_soft_kmeans` (k-means++ then soft k-means), or build it from given centroids.
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
        """Deprecated: use `fit_soft_kmeans(SoftKMeans(placeholder_centroids, temperature=...), x, key=...).model`."""
        warnings.warn("SoftKMeans.from_data is deprecated; use fit_soft_kmeans(stage, x, key=...).model",
                      DeprecationWarning, stacklevel=2)
        x = jnp.asarray(check_embedding(x))
        check_n_clusters(x.shape[0], n_clusters)
        stage = cls(jnp.zeros((n_clusters, x.shape[1]), x.dtype), temperature=jnp.asarray(temperature, x.dtype))
        return fit_soft_kmeans(stage, x, key=key, start_temperature=start_temperature, n_iter=n_iter).model

    def _checked_temperature(self, check: bool = True) -> Float[Array, ""]:
        # `check=False` (static): the caller checked the temperature on the host (the in-program check's host
        # callback keeps a program out of JAX's persistent compilation cache).
        if not check:
            return self.temperature
        return eqx.error_if(self.temperature, self.temperature <= 0, "temperature must be > 0")

    def __call__(
        self, x: Float[Array, "n_cells n_dims"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_clusters"]:
        """Responsibilities of each cell for each cluster (rows on the simplex). `key`, `inference` are ignored."""
        del key, inference
        return self._assign(x)

    def _assign(self, x: Float[Array, "n_cells n_dims"], *, check: bool = True) -> Float[Array, "n_cells n_clusters"]:
        return soft_assign(x, self.centroids, self._checked_temperature(check))

    def hard_assign(self, x: Float[Array, "n_cells n_dims"]) -> Int[Array, " n_cells"]:
        """Nearest-centroid labels."""
        return hard_assign(x, self.centroids)

    def objective(self, x: Float[Array, "n_cells n_dims"]) -> Float[Array, ""]:
        """The soft k-means free energy at the stage's centroids and temperature (`free_energy`)."""
        return free_energy(x, self.centroids, self._checked_temperature())

    def loss(
        self,
        batch: tuple[Float[Array, "n_cells n_dims"]],
        /,
        *,
        key: PRNGKeyArray,
        separation_weight: Float[ArrayLike, ""] = 1.0,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """`clustering_compactness_loss` of the cells `batch = (x,)` under this stage's centroids and temperature
        (deterministic: `key` is ignored)."""
        del key
        (x,) = batch
        return clustering_compactness_loss(x, self.centroids, self._checked_temperature(), separation_weight)


def fit_soft_kmeans(
    stage: SoftKMeans,
    x: Float[ArrayLike, "n_cells n_dims"],
    *,
    key: PRNGKeyArray,
    start_temperature: Float[ArrayLike, ""] | None = None,
    n_iter: int = 100,
) -> FitResult:
    """Fit a `SoftKMeans` stage to `x`: k-means++ seeding on `x`, then `n_iter` soft k-means iterations.

    The stage fixes the number of clusters and the (final) temperature; its centroids are replaced.

    **Arguments:**

    - `stage`: a `SoftKMeans` whose `(n_clusters, n_dims)` centroids set the shape (their values are not used).
    - `x`: `(n_cells, n_dims)` cells (e.g. corrected embeddings), `n_clusters <= n_cells`.
    - `key`: PRNG key for k-means++. (Keyword only argument.)
    - `start_temperature`: if given, anneal geometrically from it down to the stage's temperature (holding the
      last quarter of the iterations there).
    - `n_iter`: soft k-means iterations.

    **Returns:** a `FitResult`: `model` the fitted stage; `train_loss` the free energy after each iteration (at
    that iteration's temperature); `train_aux["temperature"]` the schedule; `n_epochs_run` the iterations applied
    before the state froze; `stopped_early` whether it converged; `validation_loss` is NaN.
    """
    n_clusters, n_dims = stage.centroids.shape
    x = jnp.asarray(check_embedding(x, n_dims=n_dims))
    check_n_clusters(x.shape[0], n_clusters)
    check_whole(n_iter, "n_iter")
    check_positive(stage.temperature, "temperature")
    temperature = jnp.asarray(stage.temperature, dtype=x.dtype)
    start = None if start_temperature is None else jnp.asarray(start_temperature, dtype=x.dtype)
    result, schedule = _fit_centroids(x, temperature, start, n_clusters=n_clusters, n_iter=n_iter, key=key)
    n_steps = int(result.n_steps)
    return FitResult(
        model=SoftKMeans(result.centroids, temperature=temperature),
        train_loss=result.objective,
        validation_loss=jnp.full((n_iter,), jnp.nan, x.dtype),
        train_aux={"temperature": schedule},
        n_epochs_run=n_steps,
        best_epoch=max(n_steps - 1, 0),
        stopped_early=bool(result.converged),
    )
