"""Per-target regression on transcription factors, all targets at once: an additive (GAM) ridge analogue of GENIE3.

GENIE3 and GRNBoost2 (arboreto) fit, for every target gene, a tree ensemble predicting it from the TFs (the
target itself left out when it is a TF) and score edge TF -> target by the variance the TF's splits explain.
Here each target is an additive model $y_t \\approx \\sum_j f_{jt}(x_j)$ with $f_{jt}$ piecewise linear (a hinge
basis $[x, (x - q_1)_+, \\ldots]$ at the TF's quantiles, columns standardised), fitted by ridge regression, and
the importance of TF $j$ for target $t$ is the variance of its partial fit, $\\mathrm{Var}_\\text{cells}(f_{jt}(x_j))$,
with $y_t$ standardised: the share of the target's variance the TF explains, comparable across targets (as
GENIE3's variance reductions are). SERGIO/BEELINE simulate production rates as sums of Hill functions of the
regulators, which this additive model represents.

All targets share one Gram matrix: one Cholesky factorisation gives every target's fit; a target that is itself a
TF drops its own block exactly through the block inverse ($w_{-B} = w_{-B} - M_{-B,B} M_{BB}^{-1} w_B$ with
$M = (G + \\lambda n I)^{-1}$), `vmap`ped over targets. Everything is differentiable in the data and in $\\lambda$.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._stage import AbstractStage


def hinge_basis(x: Float[Array, "n_cells n_tfs"], n_knots: int) -> Float[Array, "n_cells n_tfs n_basis"]:
    """`[x, (x - q_1)_+, ..., (x - q_k)_+]` per TF with knots at its `k` inner quantiles, columns standardised."""
    qs = jnp.arange(1, n_knots + 1, dtype=x.dtype) / (n_knots + 1)
    knots = jnp.quantile(x, qs, axis=0)  # (n_knots, n_tfs)
    basis = jnp.concatenate([x[..., None], jax.nn.relu(x[..., None] - knots.T[None])], axis=-1)
    basis = basis - jnp.mean(basis, axis=0, keepdims=True)
    scale = jnp.sqrt(jnp.mean(basis**2, axis=0, keepdims=True))
    return jnp.where(scale > 1e-6, basis / jnp.maximum(scale, 1e-6), 0.0)


def standardise(y: Float[Array, "n_cells n_targets"]) -> Float[Array, "n_cells n_targets"]:
    """Centre each target and scale it to unit variance (constant targets become zero)."""
    y = y - jnp.mean(y, axis=0, keepdims=True)
    scale = jnp.sqrt(jnp.mean(y**2, axis=0, keepdims=True))
    return jnp.where(scale > 1e-12, y / jnp.maximum(scale, 1e-12), 0.0)


def additive_importances(
    basis: Float[Array, "n_cells n_tfs n_basis"], y: Float[Array, "n_cells n_targets"],
    own_tf: Int[Array, " n_targets"], ridge: Float[Array, ""],
) -> Float[Array, "n_tfs n_targets"]:
    """Variance of each TF's partial fit in each target's ridge-fitted additive model.

    `own_tf[t]` is the TF position of target `t` when the target is itself a TF (its block is left out), else -1.
    """
    n_cells, n_tfs, k = basis.shape
    phi = basis.reshape(n_cells, n_tfs * k)
    gram = phi.T @ phi / n_cells
    factor = jax.scipy.linalg.cho_factor(gram + ridge * jnp.eye(n_tfs * k, dtype=gram.dtype))
    inverse = jax.scipy.linalg.cho_solve(factor, jnp.eye(n_tfs * k, dtype=gram.dtype))
    weights = inverse @ (phi.T @ y / n_cells)  # (n_tfs * k, n_targets)

    def drop_own(w: Array, tf: Array) -> Array:
        block = jnp.maximum(tf, 0) * k + jnp.arange(k, dtype=tf.dtype)
        corrected = w - inverse[:, block] @ jnp.linalg.solve(inverse[block][:, block], w[block])
        corrected = corrected.at[block].set(0.0)
        return jnp.where(tf >= 0, corrected, w)

    weights = jax.vmap(drop_own, in_axes=(1, 0), out_axes=1)(weights, own_tf).reshape(n_tfs, k, -1)
    blocks = gram.reshape(n_tfs, k, n_tfs, k)[jnp.arange(n_tfs), :, jnp.arange(n_tfs), :]  # (n_tfs, k, k)
    return jnp.maximum(jnp.einsum("jat,jab,jbt->jt", weights, blocks, weights), 0.0)


class AdditiveGRN(AbstractStage):
    """GENIE3-style TF -> target importances from additive ridge regressions (see the module docstring).

    Called on `x_tfs` `(n_cells, n_tfs)` and `y` `(n_cells, n_targets)` (log-normalised expression) with
    `own_tf` `(n_targets,)` (the TF position of a target that is a TF, else -1); returns `(n_tfs, n_targets)`
    importances. `ridge` is an array leaf (differentiable); `n_knots` fixes the basis size.
    """

    ridge: Float[Array, ""]
    n_knots: int = eqx.field(static=True)

    def __init__(self, *, ridge: Float[ArrayLike, ""] = 1e-2, n_knots: int = 3):
        """**Arguments:**

        - `ridge`: the ridge penalty, relative to the standardised basis (must be > 0).
        - `n_knots`: hinge knots per TF, at its inner quantiles (0 gives a linear model).
        """
        self.ridge = jnp.asarray(ridge)
        self.n_knots = n_knots

    def __check_init__(self):
        if self.n_knots < 0:
            raise ValueError("n_knots must be >= 0")

    def __call__(self, x_tfs: Float[Array, "n_cells n_tfs"], y: Float[Array, "n_cells n_targets"],
                 own_tf: Int[Array, " n_targets"], *, key: PRNGKeyArray | None = None, inference: bool = False
                 ) -> Float[Array, "n_tfs n_targets"]:
        del key, inference
        ridge = eqx.error_if(self.ridge, self.ridge <= 0, "ridge must be > 0").astype(x_tfs.dtype)
        return additive_importances(hinge_basis(x_tfs, self.n_knots), standardise(y), own_tf, ridge)


@eqx.filter_jit
def grn_importances(stage: AdditiveGRN, x_tfs: Float[Array, "n_cells n_tfs"], y: Float[Array, "n_cells n_targets"],
                    own_tf: Int[Array, " n_targets"]) -> Float[Array, "n_tfs n_targets"]:
    """`stage(x_tfs, y, own_tf)` under one `eqx.filter_jit`."""
    return stage(x_tfs, y, own_tf)
