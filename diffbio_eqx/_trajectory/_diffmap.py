"""Diffusion maps and diffusion pseudotime (DPT), faithful to scanpy 1.x (`scanpy/tools/_dpt.py` and
`scanpy/neighbors/__init__.py`: `compute_transitions`, `compute_eigen`, `_get_dpt_row`, `_set_pseudotime`).

The kernel is the neighbour graph's connectivities `K` (scanpy's `obsp["connectivities"]`, UMAP's fuzzy union by
default). Density normalisation (Coifman & Lafon) gives $K' = D^{-1} K D^{-1}$ with $D = \\mathrm{diag}(K 1)$,
and the symmetric transition matrix is $T_s = Z^{-1} K' Z^{-1}$ with $Z = \\mathrm{diag}(\\sqrt{K' 1})$. The
diffusion map is the top `n_comps` eigenpairs $(\\lambda_k, \\psi_k)$ of $T_s$ (scanpy stores the eigenvectors of
$T_s$ themselves as `obsm["X_diffmap"]`, not the right eigenvectors of $T$). The DPT distance from the root $r$ is

$$d(r, i)^2 = \\sum_{k: \\lambda_k < 0.9994} \\Big(\\frac{\\lambda_k}{1 - \\lambda_k}\\Big)^2
(\\psi_{rk} - \\psi_{ik})^2
+ \\sum_{k: \\lambda_k \\geq 0.9994} (\\psi_{rk} - \\psi_{ik})^2,$$

the geometric series $\\sum_{t \\geq 1} \\lambda^t$ over the non-stationary components; the (near-)stationary ones
cannot be summed and enter unweighted, exactly as scanpy does. Cells outside the root's connected component get
`inf`; pseudotime is the distance divided by its largest finite value.

The eigenproblem is solved by Chebyshev-filtered subspace iteration (Zhou & Saad 2007; `filtered_subspace_eigh`)
on the sparse operator: a block of `n_comps + guard` vectors (rounded up to a multiple of 8) is multiplied by a
Chebyshev polynomial of $T_s$ that damps the spectrum below the block's smallest Ritz value (the spectrum lies in
$[-1, 1]$ and the top eigenvalue is 1), then orthonormalised and projected (Rayleigh-Ritz), until the residuals
are below `tol`. The start block is the Ritz vectors of the operator on a coarse space (`coarse_start`: the top
eigenvector's pieces over ~256 connected Voronoi cells of the graph, `nearest_seed_labels`; the small dense problem
solved by the same iteration), which already holds the smooth top eigenvectors roughly, so the filter needs about
40 % fewer products than from a random block (a `CellGraph` starts from a random block).
Products go through the padded-row layout (`PaddedGraph`: gathers, and a scatter of the long rows' tail rows;
a `CellGraph` works too, by `segment_sum`); the filter and the iterations' Rayleigh-Ritz steps run in float32 by
default, the final Rayleigh-Ritz step in the graph's dtype; memory is
`O(n_edges + n_cells * n_block)`. Only tiny graphs (`5 * n_comps >= n_cells`) use a dense `eigh`. scanpy uses
ARPACK (`eigsh`, "LM"): the top eigenvalues of $T_s$ are the ones of largest magnitude unless the graph is
nearly bipartite, which a kNN graph is not.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._graph import (
    CellGraph,
    PaddedGraph,
    TailRows,
    as_padded_graph,
    connected_components,
    host_components,
    host_csr,
    matvec,
    nearest_seed_labels,
    padded_affine,
    padded_matvec,
    padded_row_sums,
    row_sums,
    scale_entries,
    scale_padded,
    warn_if_disconnected,
)


#: scanpy's cut between the (near-)stationary components and the others (`_get_dpt_row`, float32 precision).
STATIONARY_THRESHOLD = 0.9994


def diffusion_operator(graph: CellGraph, *, density_normalize: bool = True) -> CellGraph:
    """scanpy's `transitions_sym`: $Z^{-1} D^{-1} K D^{-1} Z^{-1}$ on the same edges as `graph` (the kernel `K`)."""
    if density_normalize:
        inverse = 1 / row_sums(graph)  # K is symmetric: row sums are scanpy's column sums
        graph = scale_entries(graph, inverse, inverse)
    inverse = 1 / jnp.sqrt(row_sums(graph))
    return scale_entries(graph, inverse, inverse)


def padded_diffusion_operator(graph: PaddedGraph, *, density_normalize: bool = True
                              ) -> tuple[PaddedGraph, Float[Array, " n_cells"]]:
    """`diffusion_operator` for a `PaddedGraph` kernel (same slots), and $\\sqrt{K' 1}$: the operator's top
    eigenvector (eigenvalue 1), unnormalised."""
    if density_normalize:
        inverse = 1 / padded_row_sums(graph)
        graph = scale_padded(graph, inverse, inverse)
    root = jnp.sqrt(padded_row_sums(graph))
    return scale_padded(graph, 1 / root, 1 / root), root


class DiffusionMap(eqx.Module):
    """The top eigenpairs of the symmetric transition matrix, eigenvalues decreasing.

    - `eigenvalues`: `(n_comps,)`; scanpy's `uns["diffmap_evals"]`.
    - `eigenvectors`: `(n_cells, n_comps)`; scanpy's `obsm["X_diffmap"]` (each column's sign fixed so that its
      entries sum to a non-negative number; scanpy leaves ARPACK's arbitrary signs).
    - `n_iter`: filtered subspace iterations (0 for the dense solve); each applies the operator at most
      `degree + 1` times to the block.
    - `residual`: the largest residual norm $\\|T_s \\psi_k - \\lambda_k \\psi_k\\|$ of the `n_comps` pairs.
    """

    eigenvalues: Float[Array, " n_comps"]
    eigenvectors: Float[Array, "n_cells n_comps"]
    n_iter: Int[Array, ""]
    residual: Float[Array, ""]


class EigenSettings(eqx.Module):
    """The filtered subspace iteration's settings (all static; see `filtered_subspace_eigh`).

    - `guard`: extra block columns beyond `n_comps` (they widen the gap the filter damps; default 8); the block is
      then rounded up to a multiple of 8 columns (XLA vectorises 8 float32 lanes: a 24-column product costs about
      60 % of a 23-column one).
    - `degree`: Chebyshev degree of the full-width iterations (default 16).
    - `narrow_degree`: the longest last pass (default 48): the block iterates at full width until the predicted
      degree to `tol` (`_next_degree`) is at most this, then one pass of that degree filters the wanted columns.
    - `max_iter`: iteration cap (default 200).
    - `tol`: stop once every wanted residual norm is at most `tol` (unit eigenvectors; default 1e-5: eigenvalues
      then agree with ARPACK's to ~1e-8), or at most
      10 epsilon of the filter's dtype when that is larger (a float32 filter cannot go below ~1.5e-7).
    - `filter_dtype`: dtype of the filter's products and of the iterations' Rayleigh-Ritz steps ("float32"
      default: half the memory traffic; the final Rayleigh-Ritz step, its product and the residuals are in the
      operator's dtype), or None for the operator's.
    """

    guard: int = eqx.field(static=True, default=8)
    degree: int = eqx.field(static=True, default=16)
    narrow_degree: int = eqx.field(static=True, default=48)
    max_iter: int = eqx.field(static=True, default=200)
    tol: float = eqx.field(static=True, default=1e-5)
    filter_dtype: str | None = eqx.field(static=True, default="float32")


def _dense_operator(operator: CellGraph) -> Float[Array, "n_cells n_cells"]:
    n = operator.n_cells
    return jnp.zeros((n, n), operator.weights.dtype).at[operator.heads, operator.tails].add(operator.weights)


#: `affine(v, scale, shift)` = `scale * (A @ v) + shift` for an operator `A` (None: scale 1, shift 0), so that an
#: implementation can fuse the axpy into the product (`padded_affine`).
Affine = Callable[[Array, Any, Any], Array]


def affine_of(apply: Callable[[Array], Array]) -> Affine:
    """The `Affine` form of a plain product `apply(v) = A @ v` (the axpy unfused)."""

    def affine(v: Array, scale: Any, shift: Any) -> Array:
        out = apply(v)
        out = out if scale is None else scale * out
        return out if shift is None else out + shift

    return affine


def chebyshev_filter(
    affine: Affine, x: Float[Array, "n_cells n_block"], *, degree: int | Int[Array, ""],
    lower: Float[ArrayLike, ""], cut: Float[ArrayLike, ""], top: Float[ArrayLike, ""],
) -> tuple[Float[Array, "n_cells n_block"], Float[Array, "n_cells n_block"]]:
    """$p(A) x$ for the degree-`degree` Chebyshev polynomial of the first kind mapped onto `[lower, cut]` (where it
    stays within $\\pm 1 / |T(t_{top})|$) and scaled to $p(\\mathrm{top}) = 1$: components above `cut` grow
    relative to the ones in `[lower, cut]` (Zhou & Saad 2007, the scaled three-term recurrence). `affine` is the
    operator in `Affine` form: each step is one call, $a A y_k - a c\\, y_k - \\sigma\\sigma' y_{k-1}$, so a
    fused implementation reads the block once per step. `degree` >= 1 may be traced. Also returns $A x$,
    recovered from the first step (unused, it costs nothing under jit)."""
    lower, cut, top = (jnp.asarray(value, x.dtype) for value in (lower, cut, top))
    half = (cut - lower) / 2
    centre = (cut + lower) / 2
    sigma1 = half / (top - centre)
    first = sigma1 / half
    y = affine(x, first, -(first * centre) * x)

    def step(_: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        previous, current, sigma = carry
        sigma2 = jnp.asarray(1 / (2 / sigma1 - sigma))
        scale = 2 * sigma2 / half
        following = affine(current, scale, -(scale * centre) * current - (sigma * sigma2) * previous)
        return current, following, sigma2

    return jax.lax.fori_loop(0, degree - 1, step, (x, y, sigma1))[1], y / first + centre * x


class _SubspaceState(eqx.Module):
    x: Float[Array, "n_cells n_block"]
    values: Float[Array, " n_block"]
    residual: Float[Array, ""]
    n_iter: Int[Array, ""]


def _next_degree(residual: Float[Array, ""], previous: Float[Array, ""], degree: Int[Array, ""],
                 values: Float[Array, " n_block"], n_wanted: int, tol: float, most: int) -> Int[Array, ""]:
    """The next filter's degree to reach `tol` from `residual` (at most `most`, at least 2): at the slower of two
    rates, the last filter's observed one (the log of its residual drop `previous / residual` over its `degree`)
    and the Chebyshev bound's for the new Ritz `values` (a component below the cut `values[-1]` shrinks against
    the slowest wanted one, at `t = values[n_wanted - 1]` mapped onto the filter's `[-1, cut]`, by
    $1 / T_d(t) \\leq 2 e^{-d \\operatorname{acosh} t}$), with two products to spare. The bound alone errs short
    from a rough block (its Ritz values are off); the observed rate errs long once the cut has risen since."""
    values = values.astype(residual.dtype)  # the last pass may be in a wider dtype than the one before
    cut = jnp.clip(values[-1], -1 + 1e-3, 1 - 1e-7)
    t = (2 * values[n_wanted - 1] - cut + 1) / (cut + 1)
    rate = jnp.minimum(jnp.log(previous.astype(residual.dtype) / residual) / degree.astype(residual.dtype),
                       jnp.arccosh(jnp.maximum(t, 1 + 1e-7)))
    needed = jnp.log(2 * residual / tol) / jnp.maximum(rate, 1e-3) + 2
    return jnp.clip(jnp.ceil(needed), 2, most).astype(degree.dtype)


def orthonormalize(y: Float[Array, "n_cells n_block"], *, passes: int = 2) -> Float[Array, "n_cells n_block"]:
    """An orthonormal basis of the columns of `y` by SVQB `passes` times (Stathopoulos & Wu 2002: the
    eigendecomposition of the Gram matrix with unit diagonal; directions below epsilon times the largest are dropped
    as zero columns): one `n x b` Gram product and one `n x b` by `b x b` product a pass, the column scaling folded
    into the small matrices (XLA's Householder QR on CPU is ~100x slower). Two passes for a filtered block; one
    for nearly orthonormal columns (e.g. float32 Ritz vectors in float64: a pass leaves an error of about epsilon
    times the condition number squared, here about 1)."""
    for _ in range(passes):
        gram = y.T @ y
        norms = jnp.sqrt(jnp.diagonal(gram))
        inverse = jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 0)
        values, vectors = jnp.linalg.eigh(gram * inverse[:, None] * inverse[None, :])
        floor = jnp.finfo(y.dtype).eps * jnp.max(values)
        kept = jnp.where(values > floor, 1 / jnp.sqrt(jnp.maximum(values, floor)), 0)
        y = y @ (inverse[:, None] * vectors * kept[None, :])
    return y


def _rayleigh_ritz(apply: Callable[[Array], Array], y: Float[Array, "n_cells n_block"], n_wanted: int,
                   n_iter: Int[Array, ""], *, passes: int = 2) -> _SubspaceState:
    q = orthonormalize(y, passes=passes)
    aq = apply(q)
    h = q.T @ aq
    values, vectors = jnp.linalg.eigh((h + h.T) / 2)
    values, vectors = values[::-1], vectors[:, ::-1]
    x, ax = q @ vectors, aq @ vectors
    residuals = jnp.linalg.norm(ax[:, :n_wanted] - x[:, :n_wanted] * values[None, :n_wanted], axis=0)
    return _SubspaceState(x, values, jnp.max(residuals), n_iter)


def filtered_subspace_eigh(
    apply: Callable[[Array], Array], start: Float[Array, "n_cells n_block"], n_wanted: int, *,
    settings: EigenSettings, filter_affine: Affine | None = None, start_values: Float[Array, " n_block"] | None = None,
) -> _SubspaceState:
    """The top `n_wanted` eigenpairs of a symmetric operator with spectrum in `[-1, 1]` (a normalised diffusion
    operator, top eigenvalue 1) by Chebyshev-filtered subspace iteration (Zhou & Saad 2007): filter the block
    with the degree-`settings.degree` Chebyshev polynomial damping `[-1, c]`, `c` the smallest Ritz value of the
    block, then Rayleigh-Ritz; until the wanted residual norms are at most `settings.tol`.

    Once the predicted degree to `tol` (`_next_degree`) is at most `settings.narrow_degree`, the last pass, of that
    degree, filters only the top `n_wanted` Ritz vectors (rounded up to 8 columns, at most the block), still
    damping below the whole block's cut `c`, and its Rayleigh-Ritz step is the final one: the guard columns only
    widened the gap, and after Rayleigh-Ritz on the whole block the wanted vectors' error lies almost all below
    `c`, so the narrow block converges at the full block's rate with a third fewer column products (100k cells:
    one full pass from the coarse start, then 29 products on 16 columns reach 8.2e-6, where two full passes and
    11 narrow products reached 9.2e-6).

    `filter_affine` (default `apply`'s `affine_of`) is the operator, in `Affine` form, that the filter and the
    iterations' Rayleigh-Ritz steps use (e.g. a float32 copy, in `settings.filter_dtype`); the final Rayleigh-Ritz
    step, which gives the eigenpairs and the residual, uses `apply` (in `start`'s dtype).

    `start_values`: the Rayleigh quotients of `start`'s columns where these are (nearly) orthonormal Ritz vectors
    already (`coarse_start`'s); the Rayleigh-Ritz step on the start is then skipped, the start's residual (for
    the first `_next_degree`) taken from the first filter's first product."""
    filter_affine = affine_of(apply) if filter_affine is None else filter_affine

    def filter_apply(v: Array) -> Array:
        return filter_affine(v, None, None)

    dtype = start.dtype
    work = jnp.dtype(settings.filter_dtype or dtype)
    low = jnp.asarray(-1.0, work)
    tol = max(settings.tol, 10 * float(jnp.finfo(work).eps))

    def filtered(x: Array, degree: Array, smallest: Array) -> Array:
        cut = jnp.clip(smallest.astype(work), low + 1e-3, 1 - 1e-7)
        return chebyshev_filter(filter_affine, x.astype(work), degree=degree, lower=low, cut=cut,
                                top=jnp.asarray(1, work))[0]

    def next_degree(new: _SubspaceState, previous: Array, degree: Array, most: int) -> Array:
        return _next_degree(new.residual, previous, degree, new.values, n_wanted, tol, most)

    def body(carry: tuple[_SubspaceState, Array]) -> tuple[_SubspaceState, Array]:
        state, _ = carry  # full-width passes filter at the full degree
        new = _rayleigh_ritz(filter_apply, filtered(state.x, most, state.values[-1]), n_wanted, state.n_iter + 1)
        return new, next_degree(new, state.residual, most, settings.narrow_degree + 1)

    def unfinished(carry: tuple[_SubspaceState, Array]) -> Array:
        return (carry[0].n_iter < settings.max_iter) & (carry[0].residual > tol)

    def full_width(carry: tuple[_SubspaceState, Array]) -> Array:
        return unfinished(carry) & (carry[1] > settings.narrow_degree)

    most = jnp.asarray(settings.degree)
    if start_values is None:
        carry = (_rayleigh_ritz(filter_apply, start.astype(work), n_wanted, jnp.asarray(0)),
                 jnp.asarray(settings.narrow_degree + 1))  # at least one full-width pass
    else:
        x, values = start.astype(work), start_values.astype(work)
        cut = jnp.clip(values[-1], low + 1e-3, 1 - 1e-7)
        y, ax = chebyshev_filter(filter_affine, x, degree=most, lower=low, cut=cut, top=jnp.asarray(1, work))
        residual = jnp.max(jnp.linalg.norm(ax[:, :n_wanted] - x[:, :n_wanted] * values[None, :n_wanted], axis=0))
        new = _rayleigh_ritz(filter_apply, y, n_wanted, jnp.asarray(1))
        carry = (new, next_degree(new, residual, most, settings.narrow_degree + 1))
    state, degree = jax.lax.while_loop(full_width, body, carry)
    n_final = min(-(-n_wanted // 8) * 8, start.shape[1])
    x = state.x[:, :n_final]
    more = state.residual > tol
    y = jax.lax.cond(more, lambda: filtered(x, degree, state.values[-1]), lambda: x)
    last = _rayleigh_ritz(apply, y.astype(dtype), n_wanted, state.n_iter + more.astype(state.n_iter.dtype))

    def narrow(carry: tuple[_SubspaceState, Array]) -> tuple[_SubspaceState, Array]:
        # rarely needed: the estimate erred; plain iterations on the narrow block, which has no guard
        state, degree = carry
        new = _rayleigh_ritz(apply, filtered(state.x, degree, state.values[-1]).astype(dtype), n_wanted,
                             state.n_iter + 1)
        return new, next_degree(new, state.residual, degree, settings.narrow_degree)

    return jax.lax.while_loop(unfinished, narrow, (last, next_degree(last, state.residual, degree,
                                                                      settings.narrow_degree)))[0]


#: the coarse start's seeds (`coarse_start`): at most this many Voronoi cells (and at most a quarter of the cells).
#: At 100k cells (block 24, tol 1e-5) the filter needs ~48 products from 128 cells, ~44 from 256, ~41 from 512,
#: ~74 from a random block.
COARSE_SEEDS = 256

#: the coarse eigenproblem's solver: a start needs no more (the prolonged vectors' own error is ~0.25). A dense
#: `eigh` of its size would call LAPACK, whose OpenBLAS threads then spin for ~50 ms of CPU beside XLA's.
COARSE_SETTINGS = EigenSettings(tol=1e-3, max_iter=50, filter_dtype=None)

#: the coarse start's random part (per column, relative): keeps the block's rank when the coarse space misses a
#: direction (a component without a seed); the filter removes it as fast as the coarse start's own error. It is a
#: random `(NOISE_ROWS, n_block)` block tiled down the rows: only its rank matters, and drawing all
#: `n_cells x n_block` normals cost ~90 ms of CPU at 100k cells (threefry), a tenth of the whole solve.
START_NOISE = 1e-3
NOISE_ROWS = 4096


def coarse_start(
    operator: PaddedGraph, top: Float[Array, " n_cells"], labels: Int[Array, " n_cells"], n_coarse: int,
    n_block: int, *, key: PRNGKeyArray,
) -> tuple[Float[Array, "n_cells n_block"], Float[Array, " n_block"]]:
    """The top `n_block` Ritz vectors (unit columns) and Ritz values of the symmetric `operator` $A$ (spectrum in
    `[-1, 1]`) in the span of $u_a = \\mathrm{top} \\odot 1_{\\mathrm{labels} = a}$, `a < n_coarse`: the Galerkin matrix
    $C_{ab} = u_a^T A u_b$ by one scatter over the slots, $M = \\mathrm{diag}(u_a^T u_a)$, and the top eigenvectors
    of $M^{-1/2} C M^{-1/2}$ (empty labels drop out) by `filtered_subspace_eigh` (`COARSE_SETTINGS`, dense
    products, a random start from `key`; `2 * (n_block + 8) <= n_coarse`).

    With `top` the top eigenvector ($\\sqrt{K' 1}$) and `labels` connected aggregates (`nearest_seed_labels`), the
    span holds the top eigenvector exactly, and the next ones (smooth over the graph) nearly: a start for
    `filtered_subspace_eigh` far closer than a random block (100k cells: residual norms ~0.25 instead of ~1 and
    with no rough part, so ~44 filter products instead of ~74; see `COARSE_SEEDS`)."""
    size = n_coarse
    tail = operator.overflow
    entries = operator.weights * top[:, None] * top[operator.indices]
    tail_entries = tail.weights * top[tail.owners][:, None] * top[tail.indices]
    at = labels[:, None] * size + labels[operator.indices]
    tail_at = labels[tail.owners][:, None] * size + labels[tail.indices]
    galerkin = (jnp.zeros(size * size, entries.dtype).at[at.ravel()].add(entries.ravel(), mode="promise_in_bounds")
                .at[tail_at.ravel()].add(tail_entries.ravel(), mode="promise_in_bounds")).reshape(size, size)
    mass = jax.ops.segment_sum(top * top, labels, num_segments=size)
    scale = jnp.where(mass > 0, 1 / jnp.sqrt(jnp.where(mass > 0, mass, 1)), 0)
    coarse = galerkin * scale[:, None] * scale[None, :]
    start = jr.normal(key, (size, n_block + COARSE_SETTINGS.guard), coarse.dtype)
    state = filtered_subspace_eigh(ft.partial(jnp.matmul, coarse), start, n_block, settings=COARSE_SETTINGS)
    return top[:, None] * (state.x[:, :n_block] * scale[:, None])[labels], state.values[:n_block]


def _start_block(operator: PaddedGraph, top: Float[Array, " n_cells"], n_block: int, key: PRNGKeyArray
                 ) -> tuple[Float[Array, "n_cells n_block"], Float[Array, " n_block"] | None]:
    """`coarse_start` (in `operator`'s dtype) on `COARSE_SEEDS` Voronoi cells (at most a quarter of the cells) plus
    `START_NOISE` of a tiled random block (`NOISE_ROWS`), in the default float dtype, and its Ritz values; a random
    block (no values) where the graph is too small for that many cells (fewer than ~`8 * (n_block + 8)` rows)."""
    n = operator.indices.shape[0]
    dtype = jnp.result_type(float)
    n_seeds = min(COARSE_SEEDS, n // 4)
    if n_seeds + 1 < 2 * (n_block + COARSE_SETTINGS.guard):
        return jr.normal(key, (n, n_block), dtype), None
    coarse_key, noise_key = jr.split(key)
    labels = nearest_seed_labels(operator, n_seeds)
    block, values = coarse_start(operator, top.astype(operator.weights.dtype), labels, n_seeds + 1, n_block,
                                 key=coarse_key)
    noise = jr.normal(noise_key, (min(n, NOISE_ROWS), n_block), dtype)
    noise = jnp.tile(noise, (-(-n // noise.shape[0]), 1))[:n]
    return block.astype(dtype) + START_NOISE / np.sqrt(n) * noise, values


def _random_block(key: PRNGKeyArray, n: int, n_block: int) -> tuple[Float[Array, "n_cells n_block"], None]:
    return jr.normal(key, (n, n_block), jnp.result_type(float)), None


def diffusion_map(
    graph: CellGraph | PaddedGraph, *, n_comps: int = 15, density_normalize: bool = True,
    settings: EigenSettings = EigenSettings(), key: PRNGKeyArray,
) -> DiffusionMap:
    """The diffusion map of a symmetric kernel graph (pure; see the module docstring).

    **Arguments:**

    - `graph`: the kernel `K` (symmetric non-negative weights), e.g. the UMAP connectivities, as an edge list
      (`CellGraph`) or padded rows (`PaddedGraph`, from `padded_rows`: faster products).
    - `n_comps`: number of eigenpairs (static; scanpy's `tl.diffmap` default 15, at most `n_cells - 1`).
      (Keyword only argument.)
    - `density_normalize`: scanpy's Coifman-Lafon density normalisation (default True, as scanpy).
    - `settings`: the eigensolver's `EigenSettings`.
    - `key`: draws the random start block (scanpy draws ARPACK's start vector with `random_state=0`); for a
      `PaddedGraph`, only a `START_NOISE` part of it beside the `coarse_start` on its Voronoi cells.

    **Returns:** a `DiffusionMap`.
    """
    n_block = -(-(n_comps + settings.guard) // 8) * 8
    if isinstance(graph, PaddedGraph):
        padded, top = padded_diffusion_operator(graph, density_normalize=density_normalize)
        n = padded.indices.shape[0]
        operator: PaddedGraph | CellGraph = padded
        apply = ft.partial(padded_matvec, padded)
        filter_operator = _cast(padded, settings.filter_dtype)
        filter_affine: Affine = ft.partial(padded_affine, filter_operator)
        start = ft.partial(_start_block, filter_operator, top, n_block, key)
    else:
        operator = diffusion_operator(graph, density_normalize=density_normalize)
        n = operator.n_cells
        apply = ft.partial(matvec, operator)
        filter_affine = affine_of(ft.partial(matvec, _cast(operator, settings.filter_dtype)))
        start = ft.partial(_random_block, key, n, n_block)
    if 5 * n_comps < n and 2 * n_block <= n:
        block, block_values = start()
        state = filtered_subspace_eigh(apply, block, n_comps, settings=settings, filter_affine=filter_affine,
                                       start_values=block_values)
        values, vectors = state.values[:n_comps], state.x[:, :n_comps]
        n_iter, residual = state.n_iter, state.residual
    else:  # tiny graphs: a dense eigh
        dense = _dense_operator(operator if isinstance(operator, CellGraph) else _padded_edges(operator))
        values, vectors = jnp.linalg.eigh(dense)
        values, vectors = values[::-1][:n_comps], vectors[:, ::-1][:, :n_comps]
        n_iter, residual = jnp.asarray(0), jnp.asarray(0.0, values.dtype)
    if isinstance(operator, PaddedGraph):  # rows back to cells
        vectors = jnp.zeros_like(vectors).at[operator.order].set(vectors)
    order = jnp.argsort(-values)
    values, vectors = values[order], vectors[:, order]
    signs = jnp.where(jnp.sum(vectors, axis=0) < 0, -1.0, 1.0).astype(vectors.dtype)
    return DiffusionMap(values, vectors * signs[None, :], jnp.asarray(n_iter), residual)


def _cast(graph: Any, dtype: str | None) -> Any:
    """`graph` (a `PaddedGraph` or `CellGraph`) with its weights in `dtype` (None: unchanged)."""
    if dtype is None:
        return graph
    if isinstance(graph, CellGraph):
        return CellGraph(graph.heads, graph.tails, graph.weights.astype(dtype), graph.n_cells)
    tail = graph.overflow
    return PaddedGraph(graph.indices, graph.weights.astype(dtype),
                       TailRows(tail.indices, tail.weights.astype(dtype), tail.owners), graph.order)


def _padded_edges(graph: PaddedGraph) -> CellGraph:
    n, width = graph.indices.shape
    heads = jnp.repeat(jnp.arange(n, dtype=graph.indices.dtype), width)
    tail = graph.overflow
    return CellGraph(jnp.concatenate([heads, jnp.repeat(tail.owners, width)]),
                     jnp.concatenate([graph.indices.ravel(), tail.indices.ravel()]),
                     jnp.concatenate([graph.weights.ravel(), tail.weights.ravel()]), n)


def dpt_distances(
    eigenvalues: Float[Array, " n_dcs"], eigenvectors: Float[Array, "n_cells n_dcs"], root: Int[ArrayLike, ""],
    components: Int[Array, " n_cells"] | None = None,
) -> Float[Array, " n_cells"]:
    """scanpy's DPT distance of every cell from `root` (`_get_dpt_row`; see the module docstring); `inf` for cells
    whose `components` label differs from the root's."""
    weight = jnp.where(eigenvalues < STATIONARY_THRESHOLD, eigenvalues / (1 - eigenvalues), 1)
    difference = (eigenvectors[root][None, :] - eigenvectors) * weight[None, :]
    distance = jnp.sqrt(jnp.sum(difference * difference, axis=1))
    if components is not None:
        distance = jnp.where(components == components[root], distance, jnp.inf)
    return distance


def dpt_pseudotime(distances: Float[Array, " n_cells"]) -> Float[Array, " n_cells"]:
    """scanpy's `_set_pseudotime`: distances over their largest finite value."""
    return distances / jnp.max(jnp.where(jnp.isfinite(distances), distances, 0))


class DPTResult(eqx.Module):
    """Diffusion pseudotime from a root cell.

    - `pseudotime`: `(n_cells,)` in `[0, 1]` (`inf` outside the root's component); scanpy's
      `obs["dpt_pseudotime"]`.
    - `diffmap`: the `DiffusionMap` it used (all `n_comps` components; the distance uses the first `n_dcs`).
    - `components`: `(n_cells,)` connected-component labels (the smallest cell index in each).
    """

    pseudotime: Float[Array, " n_cells"]
    diffmap: DiffusionMap
    components: Int[Array, " n_cells"]


@eqx.filter_jit
def _dpt(graph: PaddedGraph, components: Int[Array, " n_cells"], root: Int[Array, ""], n_dcs: int, n_comps: int,
         settings: EigenSettings, key: PRNGKeyArray) -> DPTResult:
    diffmap = diffusion_map(graph, n_comps=n_comps, settings=settings, key=key)
    return _dpt_from(diffmap, components, root, n_dcs)


@eqx.filter_jit
def _dpt_from(diffmap: DiffusionMap, components: Int[Array, " n_cells"], root: Int[Array, ""], n_dcs: int
              ) -> DPTResult:
    distances = dpt_distances(diffmap.eigenvalues[:n_dcs], diffmap.eigenvectors[:, :n_dcs], root, components)
    return DPTResult(dpt_pseudotime(distances), diffmap, components)


@eqx.filter_jit
def _components(graph: CellGraph) -> Int[Array, " n_cells"]:
    return connected_components(graph)


def diffusion_pseudotime(
    graph: object, root: Any, *, n_dcs: int = 10, n_comps: int = 15, settings: EigenSettings = EigenSettings(),
    key: PRNGKeyArray,
) -> DPTResult:
    """scanpy's `tl.diffmap` + `tl.dpt` (`n_branchings=0`) on a neighbour graph, under one jit.

    **Arguments:**

    - `graph`: a `NeighborGraph` (its connectivities are the kernel), a `FuzzyGraph`, a `CellGraph`, or a SciPy
      sparse matrix such as scanpy's `obsp["connectivities"]` (symmetric; it is laid out as padded rows once).
    - `root`: index of the root cell (scanpy's `uns["iroot"]`).
    - `n_dcs`: diffusion components in the distance (scanpy's `tl.dpt` default 10). (Keyword only argument.)
    - `n_comps`: components computed (scanpy's `tl.diffmap` default 15); `n_dcs <= n_comps`.
    - `settings`: the eigensolver's `EigenSettings`.
    - `key`: the eigensolver's random start block.

    **Returns:** a `DPTResult`. Warns (`DisconnectedGraphWarning`, naming the components) when the graph is
    disconnected; cells outside the root's component then get pseudotime `inf`, as in scanpy.
    """
    matrix = host_csr(graph)
    cells = as_padded_graph(matrix)
    n = cells.indices.shape[0]
    index = _check_root(root, n)
    if not 1 <= n_comps < n:
        raise ValueError(f"n_comps: must be in [1, n_cells - 1] = [1, {n - 1}], got {n_comps}")
    if not 1 <= n_dcs <= n_comps:
        raise ValueError(f"n_dcs: must be in [1, n_comps] = [1, {n_comps}], got {n_dcs}")
    components = host_components(matrix, np.asarray(cells.order))
    warn_if_disconnected(components)
    return _dpt(cells, jnp.asarray(components), jnp.asarray(index), int(n_dcs), int(n_comps), settings, key)


def _check_root(root: Any, n_cells: int) -> int:
    index = np.asarray(root)
    if index.shape != () or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"root: expected an integer cell index, got {root!r}")
    if not 0 <= int(index) < n_cells:
        raise ValueError(f"root: cell index {int(index)} is out of range for {n_cells} cells")
    return int(index)


def pseudotime_from_diffmap(graph: object, diffmap: DiffusionMap, root: Any, *, n_dcs: int = 10) -> DPTResult:
    """DPT from a diffusion map computed before (scanpy's `tl.dpt` after `tl.diffmap`: it reuses
    `obsm["X_diffmap"]` and `uns["diffmap_evals"]`, the first `n_dcs` of them); `graph` gives the connected
    components (cells outside the root's get `inf`, as in `diffusion_pseudotime`)."""
    matrix = host_csr(graph)
    n, n_comps = diffmap.eigenvectors.shape
    if matrix.shape[0] != n or diffmap.eigenvalues.shape != (n_comps,):
        raise ValueError(f"diffmap: {n} x {n_comps} eigenvectors and {diffmap.eigenvalues.shape[0]} eigenvalues "
                         f"do not fit a graph of {matrix.shape[0]} cells")
    if not 1 <= n_dcs <= n_comps:  # scanpy: "Compute diffmap/spectrum with more components first."
        raise ValueError(f"n_dcs: the diffusion map has {n_comps} components, so n_dcs must be in [1, {n_comps}], "
                         f"got {n_dcs}; compute the diffusion map with more components first")
    components = host_components(matrix)
    warn_if_disconnected(components)
    return _dpt_from(diffmap, jnp.asarray(components), jnp.asarray(_check_root(root, n)), int(n_dcs))


@eqx.filter_jit
def _diffusion_map(graph: PaddedGraph, n_comps: int, settings: EigenSettings, key: PRNGKeyArray) -> DiffusionMap:
    return diffusion_map(graph, n_comps=n_comps, settings=settings, key=key)


def compute_diffusion_map(graph: object, *, n_comps: int = 15, settings: EigenSettings = EigenSettings(),
                          key: PRNGKeyArray) -> DiffusionMap:
    """scanpy's `tl.diffmap` on a neighbour graph (any form `diffusion_pseudotime` takes), under one jit; warns
    when the graph is disconnected."""
    matrix = host_csr(graph)
    cells = as_padded_graph(matrix)
    n = cells.indices.shape[0]
    if not 1 <= n_comps < n:
        raise ValueError(f"n_comps: must be in [1, n_cells - 1] = [1, {n - 1}], got {n_comps}")
    warn_if_disconnected(host_components(matrix, np.asarray(cells.order)))
    return _diffusion_map(cells, int(n_comps), settings, key)
