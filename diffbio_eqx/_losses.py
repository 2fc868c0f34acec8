"""Losses for the embedding and clustering stages, as pure functions (and a small module for the clustering loss).

These depend only on the math layer (`_kmeans`), so stages and the pipeline can both use them.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._kmeans import soft_assign, squared_distances


def umap_log_affinity_logits(
    squared_distance: Float[Array, "*edges"],
    a: Float[ArrayLike, ""],
    b: Float[ArrayLike, ""],
    *,
    eps: float = 1e-3,
) -> Float[Array, "*edges"]:
    """Logits $z = -\\log(a\\,(d^2 + \\epsilon)^{b})$ of UMAP's low-dimensional similarity
    $q = 1 / (1 + a d^{2b}) = \\mathrm{sigmoid}(z)$.

    Working with logits makes both cross-entropy terms stable: $-\\log q = \\mathrm{softplus}(-z)$ and
    $-\\log(1 - q) = \\mathrm{softplus}(z)$. `eps` keeps the logarithm finite for coincident points (umap-learn's
    optimiser adds 0.001 to $d^2$ in its repulsive gradient for the same reason).
    """
    return -(jnp.log(a) + b * jnp.log(squared_distance + eps))


def umap_loss(
    head: Float[Array, "n_edges n_components"],
    tail: Float[Array, "n_edges n_components"],
    negatives: Float[Array, "n_edges n_negatives n_components"],
    a: Float[ArrayLike, ""],
    b: Float[ArrayLike, ""],
    *,
    repulsion_strength: Float[ArrayLike, ""] = 1.0,
    eps: float = 1e-3,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """UMAP's fuzzy-set cross-entropy, estimated on sampled edges with negative sampling.

    With edges `(head, tail)` drawn in proportion to their membership weight $w_{ij}$ and, for each, negative
    partners drawn uniformly from all cells, the cross-entropy
    $$\\sum_{ij} w_{ij} \\log \\frac{w_{ij}}{q_{ij}} + (1 - w_{ij}) \\log \\frac{1 - w_{ij}}{1 - q_{ij}}$$
    is estimated (up to constants, with negative sampling for the repulsive part, as UMAP optimises it) by
    $$\\frac{1}{B (1 + R)} \\Big( \\sum_{e} -\\log q(h_e, t_e)
    + \\gamma \\sum_{e, r} -\\log(1 - q(h_e, n_{er})) \\Big),$$
    the same normalisation as umap-learn's parametric UMAP, $B$ edges, $R$ negatives per edge, $\\gamma$ =
    `repulsion_strength`.

    **Arguments:**

    - `head`, `tail`: `(n_edges, n_components)` embeddings of the endpoints of sampled edges.
    - `negatives`: `(n_edges, n_negatives, n_components)` embeddings of the negative samples of each head.
    - `a`, `b`: the curve parameters (`find_ab_params`).
    - `repulsion_strength`: weight of the repulsive term. (Keyword only argument.)
    - `eps`: added to squared distances inside the logarithm.

    **Returns:** `(loss, {"attraction": ..., "repulsion": ...})` with the two terms' means.
    """
    positive_d2 = jnp.sum((head - tail) ** 2, axis=-1)
    negative_d2 = jnp.sum((head[:, None, :] - negatives) ** 2, axis=-1)
    attraction = jax.nn.softplus(-umap_log_affinity_logits(positive_d2, a, b, eps=eps))
    repulsion = jax.nn.softplus(umap_log_affinity_logits(negative_d2, a, b, eps=eps))
    n_edges, n_negatives = negative_d2.shape
    total = jnp.sum(attraction) + repulsion_strength * jnp.sum(repulsion)
    loss = total / (n_edges * (1 + n_negatives))
    return loss, {"attraction": jnp.mean(attraction), "repulsion": jnp.mean(repulsion)}


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
