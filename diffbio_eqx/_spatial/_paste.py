"""PASTE slice alignment (Zeira et al. 2022, `paste-bio` 1.4.0) with ott-jax's entropic fused Gromov-Wasserstein.

PASTE couples the spots of slice A and slice B with the plan $\\pi$ minimising

$$ (1 - \\alpha) \\langle M, \\pi \\rangle + \\alpha \\sum_{ijkl} (D^A_{ik} - D^B_{jl})^2 \\pi_{ij} \\pi_{kl} $$

over plans with uniform marginals, where $M$ is the KL divergence between the spots' normalised expression
(`paste.helper.kl_divergence_backend` on `X + 0.01`), $D^A, D^B$ the Euclidean distances between spots within each
slice, and $\\alpha = 0.1$. It then stacks B onto A with the Procrustes rotation and translation the plan implies
(`paste.visualization.generalized_procrustes_analysis`). `paste-bio` solves the problem by Frank-Wolfe with exact
(network simplex) linear steps from the product plan $a b^T$; here it is solved by entropic mirror descent (Peyre
et al. 2016) whose linear steps are ott-jax's `Sinkhorn`: each linearisation
`(1 - alpha) / (2 alpha) * M + (the GW gradient) / 2` (ott's `fused_penalty` convention, the gradient direction of
PASTE's objective) is solved from the previous step's dual potentials, which after the first stage converge in a
few Sinkhorn iterations. The cross term `D_A T D_B` of the gradient (two `n^3` products per step) goes through a
rank-128 factorisation of each slice's distance matrix (`distance_factors`, `n^2 r` per step); `rank=0` keeps the
exact distances. The reported objective goes through the same factorisation (`fgw_objective(..., cross=...)`; exact
with `rank=0`, or `fgw_objective` without `cross`).

**The uniform-plan failure and the schedule that avoids it.** From the product plan the GW gradient only sees each
spot's distance to the slice's centre of mass; on slices whose geometry is nearly symmetric, the first linear step
is then (nearly) the product plan again and Frank-Wolfe stops there, returning the uniform plan (PASTE on 5 of 9
DLPFC pairs). Here the first plan is the expression-only optimal transport (Sinkhorn on $M$ alone), which already
breaks the symmetry, and the entropic regularisation then decreases along `epsilons` (default 10, 1, 0.1, 0.01,
0.003 in the cost's units, up to 4 linearisations each), so the plan sharpens without being trapped at the start.
A stage ends early once a warm-started Sinkhorn meets its tolerance at its first check (the plan is a fixed point at
that epsilon; paste-bio's Frank-Wolfe likewise stops when its objective stops moving). The test checks that the
plan's entropy is far below the uniform plan's.

**Why not ott's `GromovWasserstein`.** It fixes epsilon per call and runs each call's first Sinkhorn from zero
potentials, so a schedule of chained calls restarts cold at every stage (on the 2,058-spot pair 19.1 CPU-s against
5.1 for this loop; 8.1 with the last potentials folded into the first linearisation's cost), and with low-rank
distances its `apply_square_cost` rebuilds the `(n, n)` matrix from the factors at every step.

**Partial overlap** follows PASTE2 (Liu et al. 2023, `partial_pairwise_align`, whose solver POT ships as
`partial_fused_gromov_wasserstein`): `overlap` (PASTE2's `s`) is the mass moved between the slices; the rest of each
slice goes to a dummy point of the other at cost 0 (dummy to dummy forbidden), and as PASTE2's `norm=True` each
slice's distances are scaled to the expression cost's maximum. ott's unbalanced GW (`tau < 1`, a KL penalty on the
marginals rather than a mass) is not used. On the simulator's partially overlapping pairs (equal square windows of
one layered tissue) neither PASTE2 nor this solver finds the overlap's position: the shifted full match is as good
geometrically and the x gradient of expression is too weak to tell them apart; the test asks for PASTE2's mapping
accuracy.

The plan is dense `(n_a, n_b)`, as in PASTE (and the spatial distances inside the solver are `(n, n)`); faces keep
its top entries per spot.
"""

import contextlib
import functools as ft
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float
from ott.geometry import geometry
from ott.problems.linear.linear_problem import LinearProblem
from ott.solvers.linear import acceleration, sinkhorn


#: The entropic regularisation at each stage of the mirror descent, in the linearised cost's units (squared spot
#: spacings times mass): from 10, where Sinkhorn converges in a few iterations, to 0.003, a near one-to-one plan.
EPSILONS = (10.0, 1.0, 0.1, 0.01, 0.003)

#: The Sinkhorn iteration from which ott's adaptive momentum (Lehmann et al. 2021) over-relaxes the updates.
MOMENTUM_START = 6

#: Sinkhorn's marginal error is checked every `INNER_ITERATIONS` iterations; a linear step that converges at its
#: first check ends its stage.
INNER_ITERATIONS = 2

# Balanced linear steps in ott's kernel mode (`_sinkhorn_solve`); False: the log domain throughout (read at trace
# time; kept to compare the two: on the 2,058-spot pair 2.15-2.33 against 2.25-2.68 CPU-s, same plan).
_KERNEL_MODE = True

#: PASTE's pseudo-count before normalising expression for the KL cost (`paste.PASTE.pairwise_align`).
PSEUDOCOUNT = 0.01


def kl_expression_cost(
    xa: Float[Array, "n_a n_genes"], xb: Float[Array, "n_b n_genes"]
) -> Float[Array, "n_a n_b"]:
    """PASTE's expression cost: $M_{ij} = KL(\\hat x_i \\| \\hat y_j)$ with $\\hat x = (x + 0.01) / \\sum (x + 0.01)$
    (`paste.helper.kl_divergence_backend`)."""
    pa = xa + PSEUDOCOUNT
    pb = xb + PSEUDOCOUNT
    pa = pa / jnp.sum(pa, axis=1, keepdims=True)
    pb = pb / jnp.sum(pb, axis=1, keepdims=True)
    return jnp.sum(pa * jnp.log(pa), axis=1)[:, None] - pa @ jnp.log(pb).T


def euclidean_distances(points: Float[Array, "n 2"]) -> Float[Array, "n n"]:
    """Pairwise Euclidean distances within a slice (`ot.dist(..., metric="euclidean")`)."""
    sq = jnp.sum(points * points, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2 * points @ points.T
    return jnp.sqrt(jnp.maximum(d2, 0.0))


def fgw_objective(
    plan: Float[Array, "n_a n_b"], cost: Float[Array, "n_a n_b"], ca: Float[Array, "n_a 2"],
    cb: Float[Array, "n_b 2"], alpha: Float[ArrayLike, ""], *, cross: Callable[[Array], Array] | None = None,
) -> Float[Array, ""]:
    """PASTE's objective $(1-\\alpha)\\langle M,\\pi\\rangle + \\alpha \\sum (D^A_{ik}-D^B_{jl})^2 \\pi_{ij}\\pi_{kl}$
    (POT's `gwloss` with the square loss, as `paste-bio` reports `fgw_dist`).

    `cross`: the cross term's `plan -> D_A plan D_B` (`gw_cross`: the solver's factorisation costs `n^2 rank`
    instead of two `n^3` products; on the 2,058-spot pair the exact objective took 1.7 CPU-s, the whole solver
    3.3); `None`: exact."""
    da, db = euclidean_distances(ca), euclidean_distances(cb)
    p, q = jnp.sum(plan, axis=1), jnp.sum(plan, axis=0)
    const = (da * da) @ p[:, None] + ((db * db) @ q)[None, :]
    cross = gw_cross(ca, cb, 0) if cross is None else cross
    quadratic = jnp.sum((const - 2 * cross(plan)) * plan)
    alpha = jnp.asarray(alpha)
    return (1 - alpha) * jnp.sum(cost * plan) + alpha * quadratic


def plan_entropy(plan: Float[Array, "n_a n_b"]) -> Float[Array, ""]:
    """Entropy $-\\sum \\pi \\log \\pi$ of the plan normalised to mass one (the uniform plan has
    $\\log(n_a n_b)$)."""
    p = plan / jnp.sum(plan)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def mapping_accuracy(plan: Float[ArrayLike, "n_a n_b"], labels_a: ArrayLike, labels_b: ArrayLike) -> float:
    """PASTE's layer-mapping accuracy: the share of plan mass between spots of the same label."""
    plan = jnp.asarray(plan)
    same = jnp.asarray(labels_a)[:, None] == jnp.asarray(labels_b)[None, :]
    return float(jnp.sum(jnp.where(same, plan, 0.0)) / jnp.sum(plan))


def procrustes(
    ca: Float[Array, "n_a 2"], cb: Float[Array, "n_b 2"], plan: Float[Array, "n_a n_b"]
) -> tuple[Float[Array, "2 2"], Float[Array, " 2"]]:
    """The rigid transform stacking B onto A under the plan (`generalized_procrustes_analysis`).

    Centres each slice at its plan-weighted mean, `H = Yc^T pi^T Xc`, `R = V U^T` from the SVD of `H`; the sign of
    the last singular vector is flipped when needed so that `R` is a rotation (Kabsch), where PASTE may return a
    reflection.

    **Returns:** `(rotation, translation)` with `aligned_b = cb @ rotation.T + translation` in A's frame.
    """
    mass = jnp.sum(plan)
    ta = jnp.sum(plan, axis=1) @ ca / mass
    tb = jnp.sum(plan, axis=0) @ cb / mass
    h = (cb - tb[None, :]).T @ (plan.T @ (ca - ta[None, :]))
    u, _, vt = jnp.linalg.svd(h)
    sign = jnp.sign(jnp.linalg.det(vt.T @ u.T))
    flip = jnp.diag(jnp.stack([jnp.ones_like(sign), jnp.where(sign == 0, 1.0, sign)]))
    rotation = vt.T @ flip @ u.T
    return rotation, ta - tb @ rotation.T


@contextlib.contextmanager
def _ott_promotion() -> Iterator[None]:
    """ott-jax relies on NumPy's rank and dtype promotion (the test suite raises on both)."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def distance_factors(points: Float[Array, "n 2"], rank: int) -> tuple[Float[Array, "n r"], Float[Array, "r r"]]:
    """A rank-`rank` factorisation `D ~ Q C Q^T` of the slice's Euclidean distance matrix (`Q` orthonormal): the
    range of `rank` evenly strided columns of `D`, refined by two power iterations (Halko et al. 2011), no random
    draw. The distances of points in the plane have fast-decaying spectra (on the simulated 2,000-spot slice the
    rank-100 factorisation is within 0.2 % of `D` in Frobenius norm)."""
    d = euclidean_distances(points)
    index = jnp.linspace(0, points.shape[0] - 1, rank).astype(jnp.int32)
    q = orthonormal_columns(d[:, index])
    for _ in range(2):
        q = orthonormal_columns(d @ q)
    return q, q.T @ d @ q


def orthonormal_columns(y: Float[Array, "n r"], *, block: int = 16) -> Float[Array, "n r"]:
    """An orthonormal basis of `y`'s columns by block Gram-Schmidt with one reorthogonalisation (BCGS2): each block
    of `block` columns is projected off the basis so far twice (matrix products), then orthonormalised column by
    column (CGS2, a `fori_loop`); a column already in the span of the previous ones (to the dtype's precision)
    becomes zero, which leaves `Q Q^T` a projection.

    Not `jnp.linalg.qr`: on CPU it calls LAPACK, whose OpenBLAS threads spin against the other processes on a loaded
    machine: 0.6-1.4 CPU-s per 5,016 x 128 block at load average 14, against 14 ms with `OPENBLAS_NUM_THREADS=1`."""
    tiny = jnp.finfo(y.dtype).eps

    def column(j, q):
        v0 = jax.lax.dynamic_index_in_dim(q, j, axis=1, keepdims=False)
        mask = (jnp.arange(q.shape[1]) < j).astype(q.dtype)
        v = v0
        for _ in range(2):
            v = v - q @ (mask * (q.T @ v))
        norm = jnp.linalg.norm(v)
        keep = norm > tiny * jnp.linalg.norm(v0)
        return q.at[:, j].set(jnp.where(keep, v / jnp.where(keep, norm, 1.0), 0.0))

    blocks = []
    for start in range(0, y.shape[1], block):
        yb = y[:, start:start + block]
        if blocks:
            q = jnp.concatenate(blocks, axis=1)
            for _ in range(2):
                yb = yb - q @ (q.T @ yb)
        blocks.append(jax.lax.fori_loop(0, yb.shape[1], column, yb))
    return jnp.concatenate(blocks, axis=1)


def gw_cross(
    ca: Float[Array, "n_a 2"], cb: Float[Array, "n_b 2"], rank: int
) -> Callable[[Float[Array, "n_a n_b"]], Float[Array, "n_a n_b"]]:
    """The GW gradient's cross term `plan -> D_A plan D_B`: through `distance_factors` of rank `rank` (`n^2 rank`
    work per plan instead of two `n^3` products) when both slices have more than `2 rank` spots, else exact
    (`rank=0`: always exact)."""
    if rank and min(ca.shape[0], cb.shape[0]) > 2 * rank:
        (qa, core_a), (qb, core_b) = distance_factors(ca, rank), distance_factors(cb, rank)
        return lambda plan: qa @ (core_a @ (qa.T @ plan @ qb) @ core_b) @ qb.T
    da, db = euclidean_distances(ca), euclidean_distances(cb)
    return lambda plan: da @ plan @ db


def _extend(cost: Float[Array, "n_a n_b"]) -> Float[Array, "n_a+1 n_b+1"]:
    """PASTE2's dummy point: one extra row and column at cost 0; dummy to dummy forbidden (a cost far above the
    others), so that exactly the overlap's mass moves between real spots."""
    big = 1e3 * (jnp.max(jnp.abs(cost)) + 1.0)
    return jnp.pad(cost, ((0, 1), (0, 1))).at[-1, -1].set(big)


@jax.tree_util.register_pytree_node_class
class _KernelGeometry(geometry.Geometry):
    """ott's `Geometry` from a kernel at one fixed epsilon. Its `apply_kernel(vec, eps)` raises the kernel to the power
    `epsilon / eps` at every Sinkhorn update, `n^2` powers per product even though the two are equal (at 2,058 spots
    28 CPU-ms per iteration against 9 in the log domain); here the kernel is applied as it is."""

    def apply_kernel(self, vec: Array, eps: Float[ArrayLike, ""] | None = None, axis: int = 0) -> Array:
        del eps
        return super().apply_kernel(vec, None, axis)


def _sinkhorn_solve(
    a: Float[Array, " n_a"], b: Float[Array, " n_b"], *, threshold: float, partial: bool
) -> Callable[[Array, Array, tuple[Array, Array]], tuple[Array, tuple[Array, Array], Array]]:
    """The linear step `(cost, epsilon, (f, g)) -> (plan, (f, g), Sinkhorn iterations)`: ott's `Sinkhorn` warm-started
    from the dual potentials `(f, g)`.

    Balanced problems run it in kernel mode (`lse_mode=False`) on `K = exp(-(C - f - g - s) / epsilon)`, the warm
    potentials and each row's minimum `s` folded into the cost, so that no entry of `K` exceeds 1 and the scalings
    start at 1: an iteration is then two matrix-vector products over `K`, where the log domain takes two passes (a
    maximum, then a sum of exponentials) over `f + g - C` per potential (at 5,016 spots 65 CPU-ms per iteration in
    the log domain). Entries far above their row's minimum underflow to 0, harmless unless a whole column does; when
    kernel mode does not converge to finite potentials, the log-domain `Sinkhorn` is run from the same potentials.
    The partial problem (dummy points) stays in the log domain, without momentum."""
    # Lehmann et al.'s adaptive over-relaxation from the 6th iteration (ott's `Momentum(start=6)`): on the 2,058-spot
    # pair 160 Sinkhorn iterations in all instead of 218, same accuracy (0.9845 vs 0.9851) and transform. Not in
    # the partial problem: there the plan's mass missed `overlap` by more than 1 % (test_partial_alignment_vs_paste2).
    momentum = None if partial else acceleration.Momentum(start=MOMENTUM_START, value=1.0)
    options = {"threshold": threshold, "inner_iterations": INNER_ITERATIONS, "momentum": momentum}
    log_solver = sinkhorn.Sinkhorn(**options)
    kernel_solver = sinkhorn.Sinkhorn(**options, lse_mode=False)

    def log_solve(linear, epsilon, init):
        with _ott_promotion():
            geom = geometry.Geometry(cost_matrix=_extend(linear) if partial else linear, epsilon=epsilon)
            out = log_solver(LinearProblem(geom, a=a, b=b), init=init)
        plan = out.matrix[:-1, :-1] if partial else out.matrix
        return plan, (out.f, out.g), jnp.asarray(out.n_iters, jnp.int32)

    def kernel_solve(linear, epsilon, init):
        f, g = init
        shifted = linear - f[:, None] - g[None, :]
        shift = jnp.min(shifted, axis=1)
        kernel = jnp.exp(-(shifted - shift[:, None]) / epsilon)
        with _ott_promotion():
            out = kernel_solver(LinearProblem(_KernelGeometry(kernel_matrix=kernel, epsilon=epsilon), a=a, b=b))
        duals = (f + shift + out.f, g + out.g)
        ok = jnp.asarray(out.converged) & jnp.all(jnp.isfinite(duals[0])) & jnp.all(jnp.isfinite(duals[1]))
        return jax.lax.cond(ok, lambda: (out.matrix, duals, jnp.asarray(out.n_iters, jnp.int32)),
                            lambda: log_solve(linear, epsilon, init))

    return log_solve if partial or not _KERNEL_MODE else kernel_solve


def fused_gw_plan(
    cost: Float[Array, "n_a n_b"], ca: Float[Array, "n_a 2"], cb: Float[Array, "n_b 2"],
    alpha: Float[Array, ""], *, epsilons: tuple[float, ...], n_outer: int, overlap: float = 1.0, rank: int = 128,
    threshold: float = 1e-2, cross: Callable[[Array], Array] | None = None,
) -> Float[Array, "n_a n_b"]:
    """PASTE's (overlap 1) or PASTE2's partial (overlap < 1) fused GW plan by entropic mirror descent (Peyre et al.
    2016) whose linear steps are ott-jax's `Sinkhorn`, along an epsilon schedule (see the module docstring).

    Each step solves entropic OT on the linearisation at the current plan `T`,
    `D_A^2 p_T + D_B^2 q_T - 2 D_A T D_B + (1 - alpha) / (2 alpha) M` (`p_T`, `q_T` the plan's marginals: ott's
    `QuadraticProblem.update_linearization` for the square loss, i.e. POT's `gwggrad` halved over alpha), from the
    previous step's dual potentials (so that after the first stage Sinkhorn converges in about ten iterations).

    **Arguments:**

    - `cost`: the expression cost `(n_a, n_b)` (`kl_expression_cost`).
    - `ca`, `cb`: spot coordinates of the two slices.
    - `alpha`: the weight of the spatial (GW) term, in (0, 1].
    - `epsilons`: the entropic regularisation at each stage (static); `n_outer`: linearisations per stage.
    - `overlap`: PASTE2's `s`, the mass moved between the slices (1: balanced, PASTE; below 1: the rest of each
      slice goes to a dummy point of the other at cost 0, PASTE2's `partial_fused_gromov_wasserstein`).
    - `rank`: the cross term `D_A T D_B` (two `n^3` products) through `distance_factors` of this rank (`n^2 rank`);
      0, or a slice of at most `2 rank` spots, keeps the exact distances.
    - `threshold`: Sinkhorn's marginal error tolerance.
    - `cross`: `gw_cross(ca, cb, rank)` when the caller already has it (then `rank` is not used).
    """
    n_a, n_b = cost.shape
    dtype = cost.dtype
    a = jnp.full((n_a,), 1.0 / n_a, dtype)
    b = jnp.full((n_b,), 1.0 / n_b, dtype)
    partial = overlap < 1.0
    if partial:
        a = jnp.concatenate([a, jnp.full((1,), 1.0 - overlap, dtype)])
        b = jnp.concatenate([b, jnp.full((1,), 1.0 - overlap, dtype)])
    da, db = euclidean_distances(ca), euclidean_distances(cb)
    # PASTE2 (`norm=True`, its default) scales each slice's distances to the expression cost's maximum; PASTE's
    # balanced alignment keeps them in spot units.
    scale_a = jnp.max(cost) / jnp.max(da) if partial else jnp.ones((), dtype)
    scale_b = jnp.max(cost) / jnp.max(db) if partial else jnp.ones((), dtype)
    da, db = da * scale_a, db * scale_b
    da2, db2 = da * da, db * db
    unscaled = gw_cross(ca, cb, rank) if cross is None else cross
    scale = scale_a * scale_b
    penalty = (1 - alpha) / (2 * alpha)
    solve = _sinkhorn_solve(a, b, threshold=threshold, partial=partial)

    def linearise_and_solve(plan, duals, epsilon):
        linear = (da2 @ jnp.sum(plan, axis=1))[:, None] + (db2 @ jnp.sum(plan, axis=0))[None, :] \
            - 2 * scale * unscaled(plan) + penalty * cost
        return solve(linear, epsilon, duals)

    # The first plan: expression-only OT (epsilon 10 % of the cost's standard deviation; 1 % for the partial
    # problem), against PASTE's uniform plan. The first stage blurs it anyway: it only has to break the symmetry.
    plan, duals, _ = solve(cost, (0.01 if partial else 0.1) * jnp.std(cost), (jnp.zeros_like(a), jnp.zeros_like(b)))

    def stage(carry, epsilon):
        # A short schedule, scanned (one compiled stage, not one per epsilon); each stage one scan of up to
        # `n_outer` linearisations.
        def step(carry, _):
            # Convergence check (paste-bio's Frank-Wolfe stops when the objective stops moving): once a warm-started
            # Sinkhorn meets its tolerance within its first check, the plan is a fixed point at this epsilon and
            # the stage's remaining linearisations are skipped.
            plan, duals, done = carry
            plan, duals, n_iters = jax.lax.cond(
                done, lambda plan, duals: (plan, duals, jnp.zeros((), jnp.int32)),
                ft.partial(linearise_and_solve, epsilon=epsilon), plan, duals)
            return (plan, duals, done | (n_iters <= INNER_ITERATIONS)), None

        plan, duals, _ = jax.lax.scan(step, (*carry, jnp.zeros((), bool)), length=n_outer)[0]
        return (plan, duals), None

    (plan, _), _ = jax.lax.scan(stage, (plan, duals), jnp.asarray(epsilons, dtype))
    return plan


class AlignmentResult(eqx.Module):
    """What `pairwise_align` returns.

    - `plan`: `(n_a, n_b)` coupling of A's spots (rows) with B's (columns), mass one (`overlap` when below 1).
    - `rotation`: `(2, 2)`, `translation`: `(2,)`: `aligned_b = coordinates_b @ rotation.T + translation`.
    - `aligned_b`: `(n_b, 2)` B's spots in A's frame.
    - `objective`: PASTE's objective at the plan (`fgw_objective`); `entropy`: `plan_entropy(plan)`.
    """

    plan: Float[Array, "n_a n_b"]
    rotation: Float[Array, "2 2"]
    translation: Float[Array, " 2"]
    aligned_b: Float[Array, "n_b 2"]
    objective: Float[Array, ""]
    entropy: Float[Array, ""]


class PasteAlignment(eqx.Module):
    """PASTE's pairwise alignment settings: `alpha` (array leaf, vmappable), the epsilon schedule, linearisations
    per stage, the overlap fraction (PASTE2's `s`) and the rank of the distance factorisation (static)."""

    alpha: Float[Array, ""]
    epsilons: tuple[float, ...] = eqx.field(static=True)
    n_outer: int = eqx.field(static=True)
    overlap: float = eqx.field(static=True)
    rank: int = eqx.field(static=True)

    def __init__(self, alpha: Float[ArrayLike, ""] = 0.1, *, epsilons: tuple[float, ...] = EPSILONS,
                 n_outer: int = 4, overlap: float = 1.0, rank: int = 128):
        self.alpha = jnp.asarray(alpha, dtype=jnp.zeros(()).dtype)
        self.epsilons, self.n_outer = tuple(float(e) for e in epsilons), int(n_outer)
        self.overlap, self.rank = float(overlap), int(rank)

    def __check_init__(self):
        if not self.epsilons or any(e <= 0 for e in self.epsilons):
            raise ValueError(f"epsilons: need at least one positive value, got {self.epsilons}")
        if self.n_outer < 1:
            raise ValueError(f"n_outer: must be >= 1, got {self.n_outer}")
        if not 0.0 < self.overlap <= 1.0:
            raise ValueError(f"overlap: the share of each slice's mass aligned must be in (0, 1], got {self.overlap}")
        if self.rank < 0:
            raise ValueError(f"rank: must be >= 0 (0: exact distances), got {self.rank}")

    def __call__(
        self, xa: Float[Array, "n_a n_genes"], xb: Float[Array, "n_b n_genes"], ca: Float[Array, "n_a 2"],
        cb: Float[Array, "n_b 2"],
    ) -> AlignmentResult:
        alpha = eqx.error_if(self.alpha, (self.alpha <= 0) | (self.alpha > 1), "alpha: must be in (0, 1]")
        cost = kl_expression_cost(xa, xb)
        cross = gw_cross(ca, cb, self.rank)
        plan = fused_gw_plan(cost, ca, cb, alpha, epsilons=self.epsilons, n_outer=self.n_outer,
                             overlap=self.overlap, cross=cross)
        rotation, translation = procrustes(ca, cb, plan)
        return AlignmentResult(plan, rotation, translation, cb @ rotation.T + translation[None, :],
                               fgw_objective(plan, cost, ca, cb, alpha, cross=cross), plan_entropy(plan))


@eqx.filter_jit
def _align(settings: PasteAlignment, xa: Array, xb: Array, ca: Array, cb: Array) -> AlignmentResult:
    return settings(xa, xb, ca, cb)


def check_alignment_inputs(
    x: ArrayLike, coordinates: ArrayLike, *, field: str, n_genes: int | None = None
) -> tuple[Array, Array]:
    """Expression `(n, n_genes)` (finite, non-negative) and coordinates `(n, 2)` (finite), errors naming `field`."""
    x = jnp.asarray(x)
    c = jnp.asarray(coordinates)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{field}: expression must be (n_spots >= 2, n_genes), got shape {x.shape}")
    if n_genes is not None and x.shape[1] != n_genes:
        raise ValueError(f"{field}: has {x.shape[1]} genes, the first slice has {n_genes}; slices must share genes")
    if c.shape != (x.shape[0], 2):
        raise ValueError(f"{field} coordinates: expected shape ({x.shape[0]}, 2), got {c.shape}")
    if not bool(jnp.all(jnp.isfinite(c))):
        raise ValueError(f"{field} coordinates: contain NaN or infinite values")
    if not bool(jnp.all(jnp.isfinite(x))) or bool(jnp.any(x < 0)):
        raise ValueError(f"{field}: expression must be finite and non-negative")
    dtype = jnp.zeros(()).dtype
    return x.astype(dtype), c.astype(dtype)


def check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha: must be in (0, 1] (0 would drop the spatial term), got {alpha}")


def pairwise_align(
    xa: ArrayLike, xb: ArrayLike, coordinates_a: ArrayLike, coordinates_b: ArrayLike, *, alpha: float = 0.1,
    settings: PasteAlignment | None = None,
) -> AlignmentResult:
    """Align slice B onto slice A as PASTE's `pairwise_align` + `generalized_procrustes_analysis`.

    **Arguments:**

    - `xa`, `xb`: `(n_a, n_genes)`, `(n_b, n_genes)` expression (counts) on the same genes.
    - `coordinates_a`, `coordinates_b`: `(n_a, 2)`, `(n_b, 2)` spot positions.
    - `alpha`: weight of the spatial term, PASTE's default 0.1. (Keyword only argument.)
    - `settings`: a `PasteAlignment` (epsilon schedule, iterations, `overlap`, `rank`); its `alpha` wins when given.

    **Returns:** an `AlignmentResult`.
    """
    settings = PasteAlignment(alpha) if settings is None else settings
    check_alpha(float(settings.alpha))
    xa_, ca = check_alignment_inputs(xa, coordinates_a, field="slice 0")
    xb_, cb = check_alignment_inputs(xb, coordinates_b, field="slice 1", n_genes=xa_.shape[1])
    return _align(settings, xa_, xb_, ca, cb)
