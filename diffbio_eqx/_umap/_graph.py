"""UMAP's own parts of the graph: the `a`, `b` curve, the epochs heuristic and the pruning of weak edges.

The kNN graph and its fuzzy simplicial set are shared by every neighbour-based operator and live in
`diffbio_eqx._core._neighbors`. The numerics follow umap-learn 0.5 (`umap/umap_.py`: `find_ab_params`, the epochs
and pruning in `simplicial_set_embedding`); the code is our own.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


def _ab_curve(x: Float[Array, " n_points"], params: Float[Array, " 2"]) -> Float[Array, " n_points"]:
    a, b = params[0], params[1]
    positive = x > 0
    power = jnp.where(positive, jnp.exp(2 * b * jnp.log(jnp.where(positive, x, 1))), 0)
    return 1 / (1 + a * power)


def _ab_target(
    spread: Float[Array, ""], min_dist: Float[Array, ""], n_points: int
) -> tuple[Float[Array, " n_points"], Float[Array, " n_points"]]:
    x = jnp.linspace(0, 3 * spread, n_points)
    y = jnp.where(x < min_dist, 1, jnp.exp(-(x - min_dist) / spread))
    return x, y


def find_ab_params(
    spread: Float[ArrayLike, ""] = 1.0,
    min_dist: Float[ArrayLike, ""] = 0.1,
    *,
    n_iter: int = 100,
    n_points: int = 300,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Fit UMAP's low-dimensional similarity curve $1 / (1 + a d^{2b})$ to the offset exponential
    $\\exp(-\\max(d - \\mathrm{min\\_dist}, 0) / \\mathrm{spread})$ on 300 points in $[0, 3\\,\\mathrm{spread}]$.

    The least-squares fit is Levenberg-Marquardt from $(a, b) = (1, 1)$ with a fixed `n_iter` steps (umap-learn
    calls scipy's `curve_fit`, which runs MINPACK's Levenberg-Marquardt from the same start). Pure JAX, so it
    jits, vmaps over `min_dist`/`spread`, and is differentiable through the final iterate.

    **Returns:** `(a, b)` as scalars.
    """
    spread = jnp.asarray(spread)
    min_dist = jnp.asarray(min_dist)
    dtype = jnp.result_type(spread, min_dist, float)
    x, y = _ab_target(spread.astype(dtype), min_dist.astype(dtype), n_points)

    def residual(params: Float[Array, " 2"]) -> Float[Array, " n_points"]:
        return _ab_curve(x, params) - y

    def step(carry, _):
        params, damping = carry
        r = residual(params)
        jacobian = jax.jacfwd(residual)(params)
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ r
        scaled = normal + damping * jnp.diag(jnp.diag(normal))
        proposal = params - jnp.linalg.solve(scaled, gradient)
        better = jnp.sum(residual(proposal) ** 2) < jnp.sum(r**2)
        better = better & jnp.all(jnp.isfinite(proposal))
        params = jnp.where(better, proposal, params)
        damping = jnp.where(better, damping / 3, damping * 2)
        return (params, damping), None

    init = (jnp.ones(2, dtype), jnp.asarray(1e-3, dtype))
    (params, _), _ = jax.lax.scan(step, init, None, length=n_iter)
    return params[0], params[1]


def umap_default_epochs(n_cells: int) -> int:
    """umap-learn's default number of epochs: 500 up to 10,000 cells, 200 above."""
    return 500 if n_cells <= 10_000 else 200


def prune_weights(weights: Float[Array, " n_edges"], n_epochs: int) -> Float[Array, " n_edges"]:
    """umap-learn's pruning before optimisation: weights below `max / n_epochs` are set to zero (they would be
    sampled less than once in `n_epochs` epochs; see `umap_default_epochs`)."""
    return jnp.where(weights < jnp.max(weights) / n_epochs, 0, weights)
