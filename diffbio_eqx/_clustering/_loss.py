"""The clustering stage's training loss (compactness and separation), as a pure function and a small module."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._core._geometry import squared_distances
from ._kmeans import soft_assign


def clustering_compactness_loss(
    x: Float[Array, "n_cells n_dims"],
    centroids: Float[Array, "n_clusters n_dims"],
    temperature: Float[ArrayLike, ""],
    separation_weight: Float[ArrayLike, ""] = 1.0,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Assignment-weighted within-cluster squared error plus a centroid separation penalty, both scale-free.

    $$L = \\frac{1}{s} \\frac{1}{n} \\sum_{ik} r_{ik} \\|x_i - c_k\\|^2
    + \\lambda \\frac{1}{K(K-1)} \\sum_{k \\neq l} \\frac{1}{1 + \\|c_k - c_l\\|^2 / s},$$
    with $r = $ `soft_assign(x, centroids, temperature)`, $s$ the mean squared distance of the cells to their
    mean (the data's total variance, so the loss does not depend on the data's scale) and $\\lambda$ =
    `separation_weight`. The separation term is bounded, in $(0, 1]$, and falls as centroids move apart; with one
    cluster it is 0.

    **Returns:** `(loss, {"compactness": ..., "separation": ...})`.
    """
    resp = soft_assign(x, centroids, temperature)
    centered = x - jnp.mean(x, axis=0, keepdims=True)
    scale = jnp.maximum(jnp.mean(jnp.sum(centered * centered, axis=1)), jnp.finfo(x.dtype).tiny)
    compactness = jnp.mean(jnp.sum(resp * squared_distances(x, centroids), axis=1)) / scale
    n_clusters = centroids.shape[0]
    if n_clusters > 1:
        off_diagonal = 1 - jnp.eye(n_clusters, dtype=x.dtype)
        closeness = 1 / (1 + squared_distances(centroids, centroids) / scale)
        separation = jnp.sum(off_diagonal * closeness) / (n_clusters * (n_clusters - 1))
    else:
        separation = jnp.zeros((), x.dtype)
    loss = compactness + separation_weight * separation
    return loss, {"compactness": compactness, "separation": separation}


class ClusteringCompactnessLoss(eqx.Module):
    """`clustering_compactness_loss` with its hyperparameters held as array leaves (vmappable, differentiable).

    Call as `loss_module(x, centroids) -> (loss, aux)`.
    """

    temperature: Float[Array, ""]
    separation_weight: Float[Array, ""]

    def __init__(self, *, temperature: Float[ArrayLike, ""] = 1.0, separation_weight: Float[ArrayLike, ""] = 1.0):
        """**Arguments:**

        - `temperature`: soft-assignment temperature (in squared-distance units).
        - `separation_weight`: weight $\\lambda$ of the centroid separation term.
        """
        self.temperature = jnp.asarray(temperature)
        self.separation_weight = jnp.asarray(separation_weight)

    def __call__(
        self, x: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"]
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        temperature = eqx.error_if(self.temperature, self.temperature <= 0, "temperature must be > 0")
        return clustering_compactness_loss(x, centroids, temperature, self.separation_weight)
