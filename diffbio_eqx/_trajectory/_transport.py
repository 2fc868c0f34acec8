"""Waddington-OT transport maps between consecutive time points, faithful to wot 1.0.8 (`wot/ot/ot_model.py`
`compute_single_transport_map` / `compute_default_cost_matrix`, `wot/ot/optimal_transport.py`
`compute_transport_matrix` / `optimal_transport_duality_gap`, `wot/ot/util.py` `compute_pca` /
`interpolate_with_ot`, `wot/tmap/transport_map_model.py` `push_forward` / `pull_back`), with ott-jax's Sinkhorn.

**Cost.** wot's local PCA of the two time points together: genes centred, then (because sklearn's PCA is fitted
on the transpose) each cell centred across genes; the top `local_pca` (30) principal scores; squared Euclidean
distances between the two sets, divided by their median. With fewer genes than `local_pca`, wot skips the PCA and
so do we.

**Unbalanced entropic OT.** wot solves Chizat's scaling problem with reference measures $dx = 1/I$, $dy = 1/J$,
source masses $p = G$ (the growth prior $g^{\\Delta t}$), target masses $q = \\bar G$, entropy $\\varepsilon$
(0.05), marginal KL weights $\\lambda_1$ (1) and $\\lambda_2$ (50): its fixed point is
$a = (p / K(b\\,dy))^{\\lambda_1/(\\lambda_1+\\varepsilon)}$,
$b = (q / K^T(a\\,dx))^{\\lambda_2/(\\lambda_2+\\varepsilon)}$,
coupling $\\pi = (a\\,dx) K (b\\,dy)$, and it returns $I \\pi$. ott-jax's unbalanced Sinkhorn has the fixed point
$u = (\\alpha / K v)^{\\tau_a}$, $P = u K v$; the two coincide with $\\tau_a = \\lambda_1/(\\lambda_1+\\varepsilon)$,
$\\tau_b = \\lambda_2/(\\lambda_2+\\varepsilon)$, $\\alpha = p\\,dx^{1/\\tau_a}$, $\\beta = q\\,dy^{1/\\tau_b}$, so
we solve ott's problem and return $I P$ (the problem is strictly convex: one fixed point). wot anneals
$\\varepsilon$ from 1 and stops on a duality gap of 1e-8; ott runs at $\\varepsilon$ directly and stops on its
marginal error (`threshold`).

**Speed.** As wot, the iterations run in kernel (scaling) mode on the precomputed Gibbs kernel
$K = e^{-C/\\varepsilon}$: each half-step is one matrix-vector product (ott's log-domain half-step takes an
`exp` per entry, about 25x slower on CPU). ott's `Geometry.apply_kernel` raises the kernel to the powers
`inv_scale_cost` and `epsilon / eps` on every call (for its epsilon schedules); `_GibbsKernel` applies it as
it is. ott's over-relaxation (`acceleration.Momentum`, `momentum` 1.8 by default; 1 is plain Sinkhorn)
reaches the same fixed point in about a quarter of the iterations. The cost's median is an exact order
statistic found by bisection on the floats' bit patterns (`jnp.median` sorts the `n0 * n1` entries).
Kernel mode needs every row and column of $K$ to keep a positive entry ($C/\\varepsilon$ below ~700 in
float64, ~87 in float32); the solve reports a failure otherwise, and `lse_mode=True` runs ott's log-domain
iterations instead.

**Growth.** `growth_iters` rounds (wot's default 1): the first uses the prior, each next one the previous map's
row sums; learned growth is the final map's row sums to the power $1/\\Delta t$ (wot's `g{n}` columns).
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

from .._core._geometry import squared_distances
from .._core._validate import check_embedding, check_positive, check_whole, checked_by


class OTSettings(eqx.Module):
    """wot's transport settings.

    - `epsilon`: entropic regularisation (wot 0.05).
    - `lambda1`, `lambda2`: source and target marginal penalties (wot 1 and 50).
    - `threshold`: ott's Sinkhorn stopping threshold on the marginal error (1e-5: reachable in float32 too).
    - `momentum`: ott's over-relaxation weight (1.8; 1 is plain Sinkhorn; the fixed point is the same).
    - `lse_mode`: ott's log-domain iterations instead of kernel mode (False, as wot's scaling algorithm).

    They are static Python floats, not array leaves: ott-jax's `LinearProblem` branches in Python on
    `tau_a == 1.0` (balanced or not), and its taus come from `epsilon` and the lambdas, so ott cannot take them
    traced. A new value compiles again.
    """

    epsilon: float = eqx.field(static=True, default=0.05)
    lambda1: float = eqx.field(static=True, default=1.0)
    lambda2: float = eqx.field(static=True, default=50.0)
    threshold: float = eqx.field(static=True, default=1e-5)
    momentum: float = eqx.field(static=True, default=1.8)
    lse_mode: bool = eqx.field(static=True, default=False)

    def __check_init__(self) -> None:
        for name in ("epsilon", "lambda1", "lambda2", "threshold", "momentum"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        if not 1 <= self.momentum < 2:
            raise ValueError(f"momentum: must be in [1, 2), got {self.momentum!r}")


@jax.tree_util.register_pytree_node_class
class _GibbsKernel(geometry.Geometry):
    """ott's `Geometry` on a precomputed kernel, applied by one matrix product (ott's own `apply_kernel` first
    raises the whole kernel to the powers `inv_scale_cost` and `epsilon / eps`; with no epsilon schedule and no
    cost scaling both are 1)."""

    @property
    def kernel_matrix(self) -> Any:
        return self._kernel_matrix

    def apply_kernel(self, vec: Any, eps: Any = None, axis: int = 0) -> Any:
        del eps
        kernel: Any = self._kernel_matrix
        return jnp.dot(kernel if axis == 1 else kernel.T, vec)


def median(x: Float[Array, "..."]) -> Float[Array, ""]:
    """`jnp.median` of non-negative values without sorting: the two middle order statistics by bisection on the
    floats' bit patterns (monotone for non-negative floats), one counting pass per bit."""
    flat = x.reshape(-1)
    n = flat.shape[0]
    bits_dtype = jnp.int64 if flat.dtype == jnp.float64 else jnp.int32
    bits = jax.lax.bitcast_convert_type(flat, bits_dtype)
    ranks = jnp.asarray([(n - 1) // 2, n // 2], bits_dtype)

    def step(_: Int[Array, ""], bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        low, high = bounds  # the answer lies in (low, high]
        middle = low + (high - low) // 2
        count = jnp.sum(bits[None, :] <= middle[:, None], axis=1, dtype=bits_dtype)
        below = count <= ranks
        return jnp.where(below, middle, low), jnp.where(below, high, middle)

    start = (jnp.full((2,), -1, bits_dtype), jnp.full((2,), jnp.max(bits), bits_dtype))
    _, high = jax.lax.fori_loop(0, 8 * bits.dtype.itemsize + 1, step, start)
    return jnp.mean(jax.lax.bitcast_convert_type(high, flat.dtype))


def local_pca(x0: Float[Array, "n0 n_genes"], x1: Float[Array, "n1 n_genes"], n_pcs: int
              ) -> tuple[Float[Array, "n0 n_pcs"], Float[Array, "n1 n_pcs"]]:
    """wot's `compute_pca` followed by the scaling by the singular values: the principal scores of the two time
    points together (genes centred, then cells centred), `n_pcs` at most the number of cells."""
    x = jnp.concatenate([x0, x1])
    x = x - jnp.mean(x, axis=0, keepdims=True)
    x = x - jnp.mean(x, axis=1, keepdims=True)
    n_pcs = min(n_pcs, x.shape[0])
    if x.shape[1] <= x.shape[0]:  # genes x genes eigenproblem
        _, vectors = jnp.linalg.eigh(x.T @ x)
        scores = x @ vectors[:, ::-1][:, :n_pcs]
    else:
        u, s, _ = jnp.linalg.svd(x, full_matrices=False)
        scores = u[:, :n_pcs] * s[None, :n_pcs]
    return scores[: x0.shape[0]], scores[x0.shape[0]:]


def wot_cost(x0: Float[Array, "n0 n_genes"], x1: Float[Array, "n1 n_genes"], *, n_pcs: int = 30
             ) -> Float[Array, "n0 n1"]:
    """wot's default cost: squared distances in the local PCA (none when `n_pcs` is 0 or above the number of
    genes, as wot) divided by their median."""
    if 0 < n_pcs <= x0.shape[1]:
        x0, x1 = local_pca(x0, x1, n_pcs)
    cost = squared_distances(x0, x1)
    return cost / median(cost)


def unbalanced_transport(cost: Float[Array, "n0 n1"], growth: Float[Array, " n0"], settings: OTSettings, *,
                         max_iter: int = 5000) -> tuple[Float[Array, "n0 n1"], Array]:
    """One wot transport map (`optimal_transport_duality_gap` with `G = growth`) solved by ott-jax's Sinkhorn.

    **Returns:** `(tmap, converged)`: the `(n0, n1)` map on wot's scale (row sums about the growth over the
    interval) and whether Sinkhorn met its threshold.
    """
    n0, n1 = cost.shape
    eps = settings.epsilon
    tau_a = settings.lambda1 / (settings.lambda1 + eps)
    tau_b = settings.lambda2 / (settings.lambda2 + eps)
    a = growth * (1.0 / n0) ** (1.0 / tau_a)
    b = jnp.full((n1,), jnp.mean(growth), cost.dtype) * (1.0 / n1) ** (1.0 / tau_b)
    if settings.lse_mode:
        geom = geometry.Geometry(cost_matrix=cost, epsilon=eps)
    else:
        geom = _GibbsKernel(kernel_matrix=jnp.exp(-cost / eps), epsilon=eps)
    problem = linear_problem.LinearProblem(geom, a=a, b=b, tau_a=tau_a, tau_b=tau_b)
    solver = sinkhorn.Sinkhorn(threshold=settings.threshold, max_iterations=max_iter, lse_mode=settings.lse_mode,
                               momentum=acceleration.Momentum(value=settings.momentum))
    # ott-jax relies on NumPy's implicit rank and dtype promotion internally; allow them for its code only
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        out = solver(problem)
    return n0 * out.matrix, jnp.asarray(out.converged)


class TransportMap(eqx.Module):
    """A transport map from time `t0` to `t1`.

    - `tmap`: `(n0, n1)`, wot's scale.
    - `growth`: `(n_growth_iters + 1, n0)` wot's `g0, g1, ...`: the growth rate per unit time used in each round,
      then the learned one (row sums to the power `1 / dt`).
    - `converged`: `(n_growth_iters,)` whether each Sinkhorn solve met its threshold.
    """

    tmap: Float[Array, "n0 n1"]
    growth: Float[Array, "n_rounds n0"]
    converged: Array


def _check_transport(arguments: dict[str, Any]) -> None:
    """Cells, growth and interval of `transport_map` (a NaN cell, a growth rate <= 0 or dt <= 0 gave a map of NaN
    rows); a traced array gets its shape checks only."""
    x0 = check_embedding(arguments["x0"], field="x0")
    check_embedding(arguments["x1"], field="x1", n_dims=x0.shape[1])
    growth = arguments["growth_prior"]
    if getattr(growth, "shape", None) != (x0.shape[0],):
        raise ValueError(f"growth_prior: expected one rate per x0 cell, shape ({x0.shape[0]},), got "
                         f"{getattr(growth, 'shape', type(growth).__name__)}")
    check_positive(growth, "growth_prior")
    check_positive(arguments["dt"], "dt")
    check_whole(arguments["n_pcs"], "n_pcs")
    check_whole(arguments["growth_iters"], "growth_iters")


@checked_by(_check_transport)
@eqx.filter_jit
def transport_map(
    x0: Float[Array, "n0 n_genes"], x1: Float[Array, "n1 n_genes"], growth_prior: Float[Array, " n0"],
    dt: Float[Array, ""], settings: OTSettings, *, n_pcs: int = 30, growth_iters: int = 1,
) -> TransportMap:
    """wot's `OTModel.compute_transport_map(t0, t1)` between the cells of two time points.

    **Arguments:**

    - `x0`, `x1`: expression of the cells at `t0` and `t1` (the same genes).
    - `growth_prior`: `(n0,)` per-unit-time growth rates of the `t0` cells (wot's `cell_growth_rate`; ones when
      unknown); the first round uses `growth_prior ** dt`.
    - `dt`: `t1 - t0`.
    - `settings`: `OTSettings` (wot's epsilon, lambda1, lambda2).
    - `n_pcs`: wot's `local_pca` (30; static). (Keyword only argument.) `growth_iters`: wot's `growth_iters` (1).

    **Returns:** a `TransportMap`.
    """
    cost = wot_cost(x0, x1, n_pcs=n_pcs)

    def round_(g: Float[Array, " n0"], _: None) -> tuple[Array, tuple[Array, Array, Array]]:
        tmap, converged = unbalanced_transport(cost, g, settings)
        return jnp.sum(tmap, axis=1), (g, converged, tmap)

    g_final, (used, converged, tmaps) = jax.lax.scan(round_, growth_prior**dt, None, length=growth_iters)
    growth = jnp.concatenate([used, g_final[None]]) ** (1.0 / dt)
    return TransportMap(tmaps[-1], growth, converged)


def push_forward(tmap: Float[Array, "n0 n1"], population: Float[Array, " n0"]) -> Float[Array, " n1"]:
    """wot's `push_forward` (normalised): the descendants at `t1` of a distribution over the `t0` cells."""
    p = population @ tmap
    return p / jnp.sum(p)


def pull_back(tmap: Float[Array, "n0 n1"], population: Float[Array, " n1"]) -> Float[Array, " n0"]:
    """wot's `pull_back` (normalised): the ancestors at `t0` of a distribution over the `t1` cells."""
    p = tmap @ population
    return p / jnp.sum(p)


def interpolate(
    x0: Float[Array, "n0 n_dims"], x1: Float[Array, "n1 n_dims"], tmap: Float[Array, "n0 n1"],
    fraction: Float[Array, ""] | float, *, size: int, weighting: str = "wot", key: PRNGKeyArray,
) -> Float[Array, "size n_dims"]:
    """Cells at `fraction` of the way from `t0` to `t1`: `size` pairs `(i, j)` drawn from the transport map, each
    giving the point `(1 - fraction) x0[i] + fraction x1[j]`.

    `weighting` (static) picks the pair probabilities:

    - `"wot"`: wot's `interpolate_with_ot`, proportional to `tmap[i, j] / colsum_j ** (1 - fraction)`;
    - `"growth"`: proportional to `tmap[i, j] / rowsum_i ** (1 - fraction)`: cell `i`'s lineage has grown by
      `rowsum_i ** fraction` at `fraction` of the interval (exponential growth), so the mixture of fates matches
      the intermediate time. With wot's strong target marginal the column sums are nearly uniform, so wot's rule
      gives the mixture of `t1`.
    """
    if weighting == "wot":
        weights = tmap / (jnp.sum(tmap, axis=0) ** (1.0 - fraction))[None, :]
    elif weighting == "growth":
        weights = tmap / (jnp.sum(tmap, axis=1) ** (1.0 - fraction))[:, None]
    else:
        raise ValueError(f"weighting: expected 'wot' or 'growth', got {weighting!r}")
    flat = weights.reshape(-1)
    pairs: Int[Array, " size"] = jr.choice(key, flat.shape[0], (size,), p=flat / jnp.sum(flat))
    n1 = tmap.shape[1]
    return (1 - fraction) * x0[pairs // n1] + fraction * x1[pairs % n1]
