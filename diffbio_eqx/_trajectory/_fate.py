"""Fate probabilities as absorption probabilities of a random walk on the cell graph, faithful to CellRank 2
(`cellrank/kernels/_connectivity_kernel.py`, `_pseudotime_kernel.py`, `kernels/utils/_pseudotime_scheme.py`, and
the estimators' `compute_fate_probabilities` / absorption times).

**Transition matrix.** CellRank's `ConnectivityKernel`: the connectivities `K`, density-normalised
$D^{-1} K D^{-1}$ ($D$ = degrees, as scanpy) and row-normalised. CellRank's `PseudotimeKernel` (Palantir / VIA)
instead biases `K` towards increasing pseudotime before row normalisation (no density normalisation):

- `"hard"` (CellRank's default, Palantir): of each cell's neighbours, the `min(30, floor(frac_to_keep * n_row))`
  with the largest connectivity are kept, the others only if their pseudotime is not smaller than the cell's;
- `"soft"` (VIA): an edge to a neighbour `dt` behind in pseudotime is multiplied by $2 / (1 + e^{b\\,dt})^{1/\\nu}$.

**Absorption.** With the terminal-state cells absorbing and the others transient, the fate probabilities solve
$(I - Q) X = R$ ($Q$ the transient block, $R$ the transient-to-terminal block summed per terminal state), and the
mean times to absorption $(I - Q) m = 1$. We solve the equivalent full system $(I - P) x = b$ with
$P = \\mathrm{diag}(t)\\, T$ ($t$ the transient indicator; absorbing rows reduce to $x_i = b_i$), one column at a
time, on the sparse operator, never a dense matrix.

**Solver and tolerance, as CellRank.** CellRank's default (`compute_fate_probabilities(solver="gmres",
use_petsc=True, tol=1e-6)`, `_utils/_linear_solver.py`) is PETSc's KSP GMRES (restart 30) with PETSc's default
left preconditioner (ILU(0) on one process); PETSc stops when the *preconditioned* residual has decreased by
`rtol = tol` relative to the preconditioned right-hand side, $\\|M^{-1}(b - A x)\\| \\leq
\\mathrm{tol}\\,\\|M^{-1} b\\|$, per column. An unpreconditioned relative residual of 1e-6 is not enough for
1e-5 accuracy: the mean absorption times reach thousands of steps, so $\\|(I - P)^{-1}\\|$ does too (SciPy's GMRES
on a 10k-cell graph at `rtol` 1e-6: 1.7e-4 max error; with an ILU(0)-like `spilu` preconditioner, still 1.5e-4).
ILU(0) is a sequential triangular factorisation; we precondition instead with the truncated Neumann series of
$(I - P)^{-1}$, $M^{-1} = \\sum_{k=0}^{p} P^k$ (`degree` $p$ = 16 walk steps, matrix-vector products only), so
the left-preconditioned operator is $M^{-1}(I - P) = I - P^{p+1}$, and solve
$(I - P^{p+1}) x = M^{-1} b$ with restarted GMRES (`jax.scipy.sparse.linalg.gmres`, restart 30) to the relative
tolerance `tol` on that preconditioned residual. The preconditioned operator's condition number is about
$p + 1$ times smaller, which brings the error within 1e-5 of a direct solve at `tol` 1e-6. GMRES runs under
`lax.custom_linear_solve`, so the result is differentiable in the transition weights (implicit
differentiation: one more solve with the transpose).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import gmres
from jaxtyping import Array, Float, Int

from ._graph import CellGraph, connected_components, matvec, row_sums


def row_normalize(graph: CellGraph) -> CellGraph:
    """Divide each row by its sum (rows summing to 0 stay 0)."""
    total = row_sums(graph)
    total = jnp.where(total > 0, total, 1)
    return CellGraph(graph.heads, graph.tails, graph.weights / total[graph.heads], graph.n_cells)


def connectivity_transitions(graph: CellGraph, *, density_normalize: bool = True) -> CellGraph:
    """CellRank's `ConnectivityKernel.compute_transition_matrix(density_normalize=True)`."""
    w = graph.weights
    if density_normalize:
        density = row_sums(graph)
        w = w / (density[graph.heads] * density[graph.tails])
    return row_normalize(CellGraph(graph.heads, graph.tails, w, graph.n_cells))


def _row_ranks(graph: CellGraph) -> tuple[Int[Array, " n_edges"], Int[Array, " n_edges"]]:
    """Each edge's rank among its row's edges by decreasing weight, and its row's number of non-zero edges."""
    order = jnp.lexsort((-graph.weights, graph.heads))
    n_row = jax.ops.segment_sum((graph.weights > 0).astype(jnp.int32), graph.heads, num_segments=graph.n_cells)
    all_row = jax.ops.segment_sum(jnp.ones_like(graph.heads), graph.heads, num_segments=graph.n_cells)
    row_start = jnp.cumsum(all_row) - all_row
    sorted_rank = jnp.arange(order.shape[0], dtype=graph.heads.dtype) - row_start[graph.heads[order]]
    return jnp.zeros_like(sorted_rank).at[order].set(sorted_rank), n_row[graph.heads]


def pseudotime_transitions(
    graph: CellGraph, pseudotime: Float[Array, " n_cells"], *, scheme: str = "hard",
    frac_to_keep: Float[Array, ""] | float = 0.3, b: Float[Array, ""] | float = 10.0,
    nu: Float[Array, ""] | float = 0.5,
) -> CellGraph:
    """CellRank's `PseudotimeKernel.compute_transition_matrix` (see the module docstring); `scheme` is static."""
    behind = pseudotime[graph.heads] - pseudotime[graph.tails]  # > 0: the neighbour lies in the past
    if scheme == "soft":
        factor = jnp.where(behind > 0, 2.0 / (1.0 + jnp.exp(b * behind)) ** (1.0 / nu), 1.0)
        weights = graph.weights * factor
    elif scheme == "hard":
        rank, n_row = _row_ranks(graph)
        fraction = jnp.asarray(frac_to_keep, graph.weights.dtype)
        k_keep = jnp.minimum(30, jnp.floor(n_row.astype(graph.weights.dtype) * fraction).astype(n_row.dtype))
        weights = jnp.where((rank < k_keep) | (behind <= 0), graph.weights, 0)
    else:
        raise ValueError(f"scheme: expected 'hard' or 'soft', got {scheme!r}")
    return row_normalize(CellGraph(graph.heads, graph.tails, weights, graph.n_cells))


class Absorption(eqx.Module):
    """Absorption of the random walk in the terminal states.

    - `probabilities`: `(n_cells, n_states)`; row `i` is the probability that the walk from `i` is absorbed in each
      terminal state (CellRank's fate probabilities; terminal cells have probability 1 for their own state).
    - `mean_time`: `(n_cells,)` expected number of steps to absorption (0 on terminal cells).
    - `residual`: `(n_states + 1,)` relative preconditioned residual norms
      $\\|M^{-1}(b - A x)\\| / \\|M^{-1} b\\|$ of the solves (fates, then the times); the solver stops when each
      is below `tol`.
    """

    probabilities: Float[Array, "n_cells n_states"]
    mean_time: Float[Array, " n_cells"]
    residual: Float[Array, " n_solves"]


def absorption(
    transitions: CellGraph, terminal: Int[Array, " n_cells"], *, n_states: int, tol: float = 1e-6,
    max_iter: int | None = None, degree: int = 16, restart: int = 30,
) -> Absorption:
    """Absorption probabilities and mean absorption times (pure; see the module docstring).

    **Arguments:**

    - `transitions`: the row-stochastic transition matrix `T`.
    - `terminal`: `(n_cells,)` the terminal state of each terminal cell in `[0, n_states)`, -1 for transient ones.
    - `n_states`: number of terminal states (static). (Keyword only argument.)
    - `tol`: relative tolerance on the preconditioned residual, per column (CellRank's and PETSc's `rtol`, 1e-6).
    - `max_iter`: cap on GMRES restarts (default `n_cells // restart + 10`).
    - `degree`: the Neumann preconditioner's degree `p` (static, 16; 0 is no preconditioner).
    - `restart`: GMRES's Krylov dimension per restart (static; PETSc's default 30).

    **Returns:** an `Absorption`.
    """
    if degree < 0 or restart < 1:
        raise ValueError(f"degree: must be >= 0 and restart >= 1, got {degree} and {restart}")
    dtype = transitions.weights.dtype
    transient = (terminal < 0).astype(dtype)

    def walk(x: Float[Array, " n_cells"]) -> Float[Array, " n_cells"]:
        return transient * matvec(transitions, x)

    def precondition(v: Float[Array, " n_cells"]) -> Float[Array, " n_cells"]:
        # Horner: y <- v + P y, p times, gives sum_{k<=p} P^k v
        return jax.lax.fori_loop(0, degree, lambda _, y: v + walk(y), v)

    def operator(x: Float[Array, " n_cells"]) -> Float[Array, " n_cells"]:
        # M^-1 (I - P) x = x - P^{p+1} x (the series telescopes)
        return x - jax.lax.fori_loop(0, degree + 1, lambda _, y: walk(y), x)

    # Write x = x0 + y with x0 the known absorbing values: y solves the same system with a right-hand side that is
    # zero on the absorbing rows.
    known = jnp.concatenate([jax.nn.one_hot(terminal, n_states, dtype=dtype),
                             jnp.zeros((transitions.n_cells, 1), dtype)], axis=1).T
    rhs = jnp.concatenate([transient[:, None] * matvec(transitions, known[:n_states].T), transient[:, None]], axis=1).T
    n_restarts = max_iter or transitions.n_cells // restart + 10

    def solve(x0: Float[Array, " n_cells"], b: Float[Array, " n_cells"]) -> tuple[Array, Array]:
        mb = precondition(b)
        y, _ = gmres(operator, mb, tol=tol, atol=0.0, restart=restart, maxiter=n_restarts)
        residual = jnp.linalg.norm(operator(y) - mb) / jnp.maximum(jnp.linalg.norm(mb), jnp.finfo(dtype).tiny)
        return x0 + y, residual

    solutions, residual = jax.vmap(solve)(known, rhs)
    return Absorption(solutions[:n_states].T, solutions[n_states], residual)


class FateResult(eqx.Module):
    """Fate probabilities towards named terminal states.

    - `probabilities`: `(n_cells, n_states)` absorption probabilities (CellRank's fate probabilities).
    - `mean_time`: `(n_cells,)` mean number of steps to absorption.
    - `residual`: relative preconditioned residuals of the GMRES solves (fates, then the times).
    - `terminal`: `(n_cells,)` the terminal state of each terminal cell, -1 elsewhere.
    - `names`: the terminal states' names (static).
    """

    probabilities: Float[Array, "n_cells n_states"]
    mean_time: Float[Array, " n_cells"]
    residual: Float[Array, " n_solves"]
    terminal: Int[Array, " n_cells"]
    names: tuple[str, ...] = eqx.field(static=True)


@eqx.filter_jit
def _fates(graph: CellGraph, terminal: Int[Array, " n_cells"], pseudotime: Float[Array, " n_cells"] | None,
           scheme: str, n_states: int, tol: float) -> Absorption:
    if pseudotime is None:
        transitions = connectivity_transitions(graph)
    else:
        transitions = pseudotime_transitions(graph, pseudotime, scheme=scheme)
    return absorption(transitions, terminal, n_states=n_states, tol=tol)


@eqx.filter_jit
def _top_pseudotime_groups(graph: CellGraph, pseudotime: Float[Array, " n_cells"], cut: Float[Array, ""]
                           ) -> Int[Array, " n_cells"]:
    top = pseudotime >= cut
    inside = CellGraph(graph.heads, graph.tails, jnp.where(top[graph.heads] & top[graph.tails], graph.weights, 0),
                       graph.n_cells)
    return jnp.where(top, connected_components(inside), -1)
