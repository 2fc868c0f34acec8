"""UMAP's cross-entropy between the fuzzy graph and the embedding, as pure functions."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


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
