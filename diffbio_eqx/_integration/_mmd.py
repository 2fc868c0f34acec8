"""trVAE's multi-scale RBF maximum mean discrepancy (Lotfollahi et al. 2020), unbiased, between every pair of batches.

trVAE (scArches' `trvae/losses.py`) sums `mmd_loss_calc(x_i, x_j)` over pairs of conditions, each a biased
(V-statistic) MMD whose kernel is $k(x, y) = \\sum_a \\exp(-\\|x - y\\|^2 / (2 a))$ over the nineteen bandwidths
`TRVAE_BANDWIDTHS`. Here the same kernel and pair sum, with three changes the issue asks for:

- every pair of batches $a < b$ (trVAE's first release compared condition $j$ with $j + 1$ only);
- the unbiased estimator (Gretton et al. 2012, U-statistic), which drops the $k(x_i, x_i)$ terms, so two
  samples of one distribution score about zero whatever their sizes;
- one kernel matrix for the whole minibatch with per-batch weights $1 / (n_a (n_a - 1))$ and $1 / (n_a n_b)$
  (the batch sizes counted in the minibatch), instead of zero-padded per-batch blocks: unbalanced batches are
  weighted correctly, and a pair with a batch of fewer than two cells in the minibatch is left out.

$$\\mathrm{MMD}^2_u(a, b) = \\frac{\\sum_{i \\ne j \\in a} k_{ij}}{n_a (n_a - 1)}
 + \\frac{\\sum_{i \\ne j \\in b} k_{ij}}{n_b (n_b - 1)} - 2 \\frac{\\sum_{i \\in a, j \\in b} k_{ij}}{n_a n_b}$$
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int


#: trVAE's kernel bandwidths $a$ (variances: $k = \sum_a \exp(-d^2 / (2a))$), from scArches' `mmd_loss_calc`.
TRVAE_BANDWIDTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
                    1e3, 1e4, 1e5, 1e6)


def multiscale_rbf_kernel(
    x: Float[Array, "n_x n_dims"], y: Float[Array, "n_y n_dims"], bandwidths: Float[ArrayLike, " n_scales"]
) -> Float[Array, "n_x n_y"]:
    """$k(x, y) = \\sum_a \\exp(-\\|x - y\\|^2 / (2 a))$ (trVAE's `gaussian_kernel_matrix`)."""
    alphas = jnp.asarray(bandwidths, dtype=x.dtype)
    squared = jnp.sum(x**2, axis=-1)[:, None] + jnp.sum(y**2, axis=-1)[None, :] - 2.0 * (x @ y.T)
    squared = jnp.maximum(squared, 0.0)
    return jnp.sum(jnp.exp(-squared[None, :, :] / (2.0 * alphas[:, None, None])), axis=0)


def pairwise_batch_mmd(
    x: Float[Array, "n_cells n_dims"],
    batch_labels: Int[Array, " n_cells"],
    bandwidths: Float[ArrayLike, " n_scales"],
    *,
    n_batches: int,
) -> Float[Array, "n_batches n_batches"]:
    """The unbiased multi-scale RBF $\\mathrm{MMD}^2_u(a, b)$ for every pair of batches, from one kernel matrix.

    **Arguments:**

    - `x`: `(n_cells, n_dims)` points (a latent, or the first decoder layer's activations).
    - `batch_labels`: `(n_cells,)` integer batch codes in `[0, n_batches)`.
    - `bandwidths`: `(n_scales,)` kernel variances (trVAE's: `TRVAE_BANDWIDTHS`).
    - `n_batches`: number of batches (static). (Keyword only argument.)

    **Returns:** `(n_batches, n_batches)` symmetric; the diagonal and every entry involving a batch with fewer
    than two cells are zero.
    """
    onehot = jax.nn.one_hot(batch_labels, n_batches, dtype=x.dtype)
    kernel = multiscale_rbf_kernel(x, x, bandwidths)
    kernel = kernel * (1.0 - jnp.eye(x.shape[0], dtype=x.dtype))  # U-statistic: no k(x_i, x_i)
    sums = onehot.T @ kernel @ onehot  # (n_batches, n_batches): S_ab = sum_{i in a, j in b} k_ij
    sizes = jnp.sum(onehot, axis=0)
    valid = sizes >= 2
    safe = jnp.where(valid, sizes, 2.0)
    within = jnp.diagonal(sums) / (safe * (safe - 1.0))
    cross = sums / (safe[:, None] * safe[None, :])
    mmd = within[:, None] + within[None, :] - 2.0 * cross
    keep = valid[:, None] & valid[None, :] & ~jnp.eye(n_batches, dtype=bool)
    return jnp.where(keep, mmd, 0.0)


def batch_mmd_penalty(
    x: Float[Array, "n_cells n_dims"],
    batch_labels: Int[Array, " n_cells"],
    bandwidths: Float[ArrayLike, " n_scales"],
    *,
    n_batches: int,
) -> Float[Array, ""]:
    """trVAE's MMD loss (before its weight `beta`): $\\sum_{a < b} \\mathrm{MMD}^2_u(a, b)$ over the pairs of
    batches that have at least two cells each in `x` (see `pairwise_batch_mmd`)."""
    return 0.5 * jnp.sum(pairwise_batch_mmd(x, batch_labels, bandwidths, n_batches=n_batches))
