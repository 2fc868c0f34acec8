"""Distances shared by the neighbour graph, k-means, Harmony and UMAP."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def squared_distances(
    x: Float[Array, "n_cells n_dims"], y: Float[Array, "n_clusters n_dims"]
) -> Float[Array, "n_cells n_clusters"]:
    """Squared Euclidean distances between the rows of `x` and the rows of `y`, clipped at zero.

    Uses $\\|x\\|^2 + \\|y\\|^2 - 2 x \\cdot y$, so it costs one matrix product.
    """
    cross = x @ y.T
    norms_x = jnp.sum(x * x, axis=1)
    norms_y = jnp.sum(y * y, axis=1)
    return jnp.maximum(norms_x[:, None] + norms_y[None, :] - 2 * cross, 0)
