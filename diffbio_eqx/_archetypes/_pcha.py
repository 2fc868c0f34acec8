"""Archetypal analysis by PCHA (Mørup & Hansen 2012), as `py_pcha` 0.1.3 runs it, with a seeded initialisation.

With data $X$ (dims x cells) the archetypes are $XC$ (columns of $C$ on the simplex: convex combinations of
cells) and every cell is $XCS$ with the columns of $S$ on the simplex. PCHA minimises
$\\mathrm{SSE} = \\|X - XCS\\|_F^2$ by alternating projected-gradient steps: 10 steps on $C$, then 10 on $S$, each
step normalising the gradient's component along the simplex (`g - e * sum(g * S, axis=0)`), clipping at 0,
renormalising the columns, and accepting when the SSE does not grow by more than $10^{-9}$ relatively (step
size times 1.2) or halving the step otherwise (py_pcha's `while True` line search, here at most 60 halvings).
$S$ starts from 25 such steps on columns of $-\\log U$ normalised; $C$ from the furthest-sum selection of cells
(py_pcha's `furthest_sum`: one start cell, then `n_archetypes + 10` greedy rounds that each add the cell with
the largest summed distance to the selected ones and, after the first `n_archetypes - 1`, drop the oldest).
The outer loop stops when the SSE changes by less than `conv_crit` relatively, at `max_iter`, or when the
variance explained $(\\mathrm{SST} - \\mathrm{SSE}) / \\mathrm{SST}$ reaches 0.9999. `delta` (py_pcha's relaxed
hull) is 0 here.

Differences from py_pcha: the start cell and $U$ come from a JAX key (py_pcha draws from NumPy's global state,
and its start index `ceil(n * rand)` can fall off the end); arrays not `np.matrix`; the archetypes are not
reordered (py_pcha's final sort keys on the component index, reversing the order); for float64 data S is held
in float32 and its line searches sum each trial's SSE change per cell (float64 sum) rather than the SSE itself, C
taking the SSE afresh in float64 each iteration (`s_update`).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._core._train import supported_compiler_options


def furthest_sum(x: Float[Array, "n_dims n_cells"], n_archetypes: int, start: Int[Array, ""]) -> Int[Array, " k"]:
    """py_pcha's furthest-sum selection of `n_archetypes` cells (columns of `x`) from the cell `start`."""
    norms = jnp.sum(x * x, axis=0)
    dist = lambda j: jnp.sqrt(jnp.maximum(norms - 2.0 * (x[:, j] @ x) + norms[j], 0.0))
    chosen = [start]
    selected = jnp.zeros(x.shape[1], bool).at[start].set(True)
    sum_dist = jnp.zeros(x.shape[1], x.dtype)
    newest = start
    for k in range(1, n_archetypes + 11):
        if k > n_archetypes - 1:
            oldest, chosen = chosen[0], chosen[1:]
            sum_dist = sum_dist - dist(oldest)
            selected = selected.at[oldest].set(False)
        sum_dist = sum_dist + dist(newest)
        newest = jnp.argmax(jnp.where(selected, -jnp.inf, sum_dist))
        chosen.append(newest)
        selected = selected.at[newest].set(True)
    return jnp.stack(chosen)


def _sse(sst, xct_x_or_xc, cross, gram, sst_mat):
    return sst - 2.0 * jnp.sum(xct_x_or_xc * cross) + jnp.sum(gram * sst_mat)


def _add(terms: list) -> Array:
    return functools.reduce(jnp.add, terms)


def _line_search(sse_at, sse_old, mu, first: tuple | None = None):
    """py_pcha's step rule on the step size alone: halve `mu` until the proposal's SSE (`sse_at(mu)` returns it and
    small by-products; `first`, if given, is `sse_at(mu)` already taken) does not exceed `sse_old` by more than 1e-9
    relatively (at most 60 halvings). Returns the accepted step, its SSE and by-products; the next step size is the
    accepted one times 1.2."""
    def cond(state):
        _, sse, _, n = state
        return ~(sse <= sse_old * (1.0 + 1e-9)) & (n < 60)

    def body(state):
        step, _, _, n = state
        step = step / 2.0
        sse, aux = sse_at(step)
        return step, sse, aux, n + 1

    sse, aux = sse_at(mu) if first is None else first
    state = (mu, sse, aux, jnp.asarray(0))
    # the loop only when the first trial fails (most are accepted): XLA copies the loop's operands
    step, sse, aux, _ = jax.lax.cond(cond(state), lambda: jax.lax.while_loop(cond, body, state), lambda: state)
    return step, sse, aux


def _s_direction(rows, b, a, inv_scale) -> list[Array]:
    """py_pcha's S gradient $g = (C^\\top X^\\top X C S - (XC)^\\top X) / (\\mathrm{SST}/n)$ less its simplex
    component per cell, row by row."""
    k = len(rows)
    g = [(_add([a[i, j] * rows[j] for j in range(k)]) - b[i]) * inv_scale for i in range(k)]
    along = _add([g[i] * rows[i] for i in range(k)])
    return [gi - along for gi in g]


def _s_proposal(rows, b, a, inv_scale, m) -> tuple[list[Array], Array]:
    """The unnormalised rows $\\max(S - m\\,d, 0)$ of a step of size `m` along `_s_direction`, and their sum
    per cell."""
    u = [jnp.maximum(r - d * m, 0.0) for r, d in zip(rows, _s_direction(rows, b, a, inv_scale))]
    return u, _add(u)


def _s_change(rows, b, a, inv_scale, m) -> Array:
    """The SSE's change per cell when S's column $s$ moves to $s' = u / T$, the normalised step of size `m`
    (`_s_proposal`): $\\delta \\cdot (A (s' + s) - 2 b)$ with $\\delta = s' - s$ ($A = C^\\top X^\\top X C$,
    $b = (XC)^\\top X$), py_pcha's $\\mathrm{SST} - 2\\langle (XC)^\\top X, S\\rangle +
    \\langle C^\\top X^\\top X C, SS^\\top\\rangle$ differenced, so that its rounding scales with the change, not
    with the SSE: float32 rows then decide py_pcha's $10^{-9}$ relative acceptance as float64 sums do. Written
    times $T^2$ and divided once, as XLA fuses the whole trial into one pass only while no quotient is reused."""
    u, total = _s_proposal(rows, b, a, inv_scale, m)
    k = len(u)
    a_u = [_add([a[i, j] * u[j] for j in range(k)]) for i in range(k)]
    a_s = [_add([a[i, j] * rows[j] for j in range(k)]) for i in range(k)]
    scaled = [(u[i] - total * rows[i]) * (a_u[i] + total * (a_s[i] - 2.0 * b[i])) for i in range(k)]
    return _add(scaled) / (total * total)


def work_dtype(dtype) -> jnp.dtype:
    """S's dtype: float32 for float64 data (its SSE changes still summed in float64), else the data's."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(dtype)


def to_blocks(v: Float[Array, "k n_cells"], block: int, fill: float) -> Float[Array, "n_blocks k block"]:
    """The cells in blocks of `block` (the last padded with `fill`), each block's k rows together."""
    k, n = v.shape
    n_blocks = -(-n // block)
    padded = jnp.pad(v, ((0, 0), (0, n_blocks * block - n)), constant_values=fill)
    return padded.reshape(k, n_blocks, block).transpose(1, 0, 2)


def even_block(n_cells: int, largest: int, multiple: int = 128) -> int:
    """The size of the fewest blocks of at most `largest` cells (rounded up to `multiple`; one block: `n_cells`)
    that hold `n_cells`: equal blocks, so the last is not mostly padding (10,000 cells: 2 x 5,120, not 2 x 8,192)."""
    n_blocks = -(-n_cells // largest)
    if n_blocks == 1:
        return n_cells
    per_block = -(-n_cells // n_blocks)
    return min(largest, -(-per_block // multiple) * multiple)


def from_blocks(v: Float[Array, "n_blocks k block"], n_cells: int) -> Float[Array, "k n_cells"]:
    return v.transpose(1, 0, 2).reshape(v.shape[1], -1)[:, :n_cells]


def _s_column_sums(rows, b, a, inv_scale, m) -> tuple[Array, Array]:
    """Per cell, the S gradient's simplex component (`along`) and the sum of the proposal's entries (`total`) for a
    step of size `m` (`_s_proposal`)."""
    k = len(rows)
    g = [(_add([a[i, j] * rows[j] for j in range(k)]) - b[i]) * inv_scale for i in range(k)]
    along = _add([g[i] * rows[i] for i in range(k)])
    return along, _add([jnp.maximum(rows[i] - (g[i] - along) * m, 0.0) for i in range(k)])


def _s_rows(rows, b, a, inv_scale, m, along, total) -> list[Array]:
    """S's rows after a step of size `m`, given `_s_column_sums`: each row recomputes only its own gradient."""
    k = len(rows)
    g = lambda i: (_add([a[i, j] * rows[j] for j in range(k)]) - b[i]) * inv_scale
    return [jnp.maximum(rows[i] - (g(i) - along) * m, 0.0) / total for i in range(k)]


def s_update(s, xct_x, ct_xt_xc, mu, sst, sse, n_steps: int):
    """`n_steps` projected-gradient steps on S (py_pcha's `S_update`), S held in blocks of cells `(n_blocks, k,
    block)` (`to_blocks`, padded with 1/k) in S's dtype (`work_dtype`; the SSE, `sse` plus the changes, in the
    data's). The per-cell work is memory-bound, so a step is one sweep over the blocks, each block forming its
    new columns and the next step's first line-search trial while it is in cache (`_s_sweep`); only a failed
    first trial costs whole passes (`_s_trial`). `xct_x` `(k, n_cells)`. Returns S, the SSE, the next step size."""
    wd, n = s.dtype, xct_x.shape[1]
    inv_scale = (n / sst).astype(wd)
    b, a = to_blocks(xct_x.astype(wd), s.shape[2], 0.0), ct_xt_xc.astype(wd)
    valid = (jnp.arange(s.shape[0] * s.shape[2]) < n).reshape(s.shape[0], s.shape[2])
    operands = (b, a, inv_scale, valid, sse.dtype)

    def step(state, _):
        s, scratch, sse, m, _, _ = state
        s, scratch, change = _s_sweep(s, scratch, operands, m, m * 1.2)
        trial = lambda mu: (sse + _s_trial(s, operands, mu), ())
        m_next, sse_next, _ = _line_search(trial, sse, m * 1.2, first=(sse + change, ()))
        return (s, scratch, sse_next, m_next, sse, m), None

    m, sse, _ = _line_search(lambda mu: (sse + _s_trial(s, operands, mu), ()), sse, mu)
    scratch = (jnp.zeros(valid.shape, wd),) * 3  # the sweeps' buffers (`_s_sweep`), written before read
    # every sweep in the scan, the last one's line search for a step not taken (its first trial is the sweep's):
    # a sweep after the scan wrote each block through a copy of S
    s, _, _, _, sse, m = jax.lax.scan(step, (s, scratch, sse, m, sse, m), length=n_steps)[0]
    return s, sse, m * 1.2


def _s_trial(s, operands, m) -> Array:
    """The SSE's change (summed in the SSE's dtype) of a step of size `m` from the blocked S, block by block (on
    whole rows, XLA formed the direction's rows as k separate passes over S)."""
    b, a, inv_scale, valid, sum_dtype = operands
    k = s.shape[1]

    def block(j, total):
        change = _s_change([s[j, i] for i in range(k)], [b[j, i] for i in range(k)], a, inv_scale, m.astype(s.dtype))
        return total + jnp.sum(jnp.where(valid[j], change, 0.0).astype(sum_dtype))

    return jax.lax.fori_loop(0, s.shape[0], block, jnp.zeros((), sum_dtype))


def _s_sweep(s, scratch, operands, m, mu_next):
    """S after a step of size `m`, formed block by block in place, with the next step's SSE change at `mu_next`
    (summed over the cells). A block's column sums (`_s_column_sums`) are formed once
    and its rows (and their trial) in the next iteration. The sums and the per-cell changes are written in place
    into buffers of the loop: XLA CPU splits a block's fused loop over threads unless it writes in place, and that
    split cost more than it saved (a step took 0.79 ms on one core, 1.0 ms on two, at 100,000 cells)."""
    b, a, inv_scale, valid, sum_dtype = operands
    wd, n_blocks, k = s.dtype, s.shape[0], s.shape[1]
    m = m.astype(wd)
    rows = lambda v, j: [v[j, i] for i in range(k)]

    def finish(j, s, sums, changes):
        new = _s_rows(rows(s, j), rows(b, j), a, inv_scale, m, sums[0][j], sums[1][j])
        changes = changes.at[j].set(_s_change(new, rows(b, j), a, inv_scale, mu_next.astype(wd)))
        return s.at[j].set(jnp.stack(new)), changes

    def with_sums(j, s, sums):  # each sum written on its own: stacked, XLA formed `along` twice
        along, total = _s_column_sums(rows(s, j), rows(b, j), a, inv_scale, m)
        return sums[0].at[j].set(along), sums[1].at[j].set(total)

    def block(j, state):
        s, sums, changes = state
        s, changes = finish(j - 1, s, sums, changes)
        # read from the written S: reading the block before the write made XLA copy S to keep it (the last
        # iteration forms the last block's sums again, unused: a step after the loop copied S)
        return s, with_sums(jnp.minimum(j, n_blocks - 1), s, sums), changes

    along, total, changes = scratch
    s, sums, changes = jax.lax.fori_loop(1, n_blocks + 1, block, (s, with_sums(0, s, (along, total)), changes))
    # summed as a product with ones: XLA CPU's reduction loop ran 3x slower on 106,496 floats
    masked = jnp.where(valid, changes, 0.0).astype(sum_dtype)
    return s, (*sums, changes), jnp.sum(masked @ jnp.ones(masked.shape[1], sum_dtype))


def _weighted_cells(p: Float[Array, "k m"], rows: Float[Array, "m n_dims_1"],
                    cols: Float[Array, "n_dims_1 m"] | None) -> Float[Array, "k n_dims_1"]:
    """$P X_1$ for the cells `rows` (or, in float64 where given, their `cols`). The product is left as `(k, n_dims
    + 1)`: transposed, XLA folds the transpose into a slower product (at 10,000 cells in float32 82 us against 30);
    float64 over all the cells is faster from the columns (at 100,000 cells 1.0 ms against 1.3)."""
    if cols is not None and rows.dtype == jnp.float64:
        return (cols @ p.T).T
    return p @ rows


def _c_line_search(cells, c, g, xst, sst_mat, mu, sst, sse):
    """py_pcha's line search on C `(k, m)` over the cells it weighs, `cells` `(rows, cols)`: their rows `(m,
    n_dims + 1)` (each with a 1 appended, 0 for padding) and, or None, the same as columns (`_weighted_cells`),
    along the gradient `g`: the proposal $\\max(C - \\mu g, 0)$ with each archetype's weights renormalised (plus eps,
    as py_pcha). One product per trial gives its archetypes $XC$ (as rows) and, from the appended column, the sums
    they are divided by (XLA CPU's reduction loops are slower than the product). Returns the accepted C, its $XC$,
    SSE and the next step size."""
    rows, cols = cells
    eps = jnp.finfo(rows.dtype).eps

    def sse_at(m):
        product = _weighted_cells(jnp.maximum(c - m * g, 0.0), rows, cols)
        totals = product[:, -1] + eps
        xct_new = product[:, :-1] / totals[:, None]
        return _sse(sst, xct_new, xst.T, xct_new @ xct_new.T, sst_mat), (xct_new, totals)

    m, sse, (xct, totals) = _line_search(sse_at, sse, mu)
    return jnp.maximum(c - m * g, 0.0) / totals[:, None], xct.T, sse, m * 1.2


class Candidates(eqx.Module):
    """The cells a C step can move while the residual directions $r$ stay near `r0`: C's gradient is
    $g_{in} = r_i \\cdot x_n - t_i$ ($t_i = r_i \\cdot (XC)_i$), so by Cauchy-Schwarz a cell outside `idx` (all with
    $g^0_{in} \\ge \\theta (1 + \\|x_n\\|)$ for every archetype $i$ and $C_{in} = 0$) keeps $g_{in} \\ge 0$, hence
    $C_{in} = 0$ after the step, while $\\|r_i - r^0_i\\| \\le \\theta$ and $t_i - t^0_i \\le \\theta$. `idx` is padded
    with `n_cells` and marked in `inside`; `rows` holds their rows of the augmented X (`augmented`; zero for
    padding), gathered once per selection; `fits` is False when the cells that can move at `r0` outnumber the
    capacity."""

    idx: Int[Array, " capacity"]
    inside: Bool[Array, " n_cells"]
    rows: Float[Array, "capacity n_dims_1"]
    r0: Float[Array, "n_dims k"]
    t0: Float[Array, " k"]
    theta: Float[Array, ""]
    fits: Bool[Array, ""]


def no_candidates(n_cells: int, n_dims: int, k: int, capacity: int, dtype) -> Candidates:
    """Candidates that never hold (the first C step computes the gradient on all cells)."""
    return Candidates(idx=jnp.full(capacity, n_cells), inside=jnp.zeros(n_cells, bool),
                      rows=jnp.zeros((capacity, n_dims + 1), dtype), r0=jnp.zeros((n_dims, k), dtype),
                      t0=jnp.zeros(k, dtype), theta=jnp.zeros((), dtype), fits=jnp.asarray(False))


def candidates(x1, g, c, r, t, norms, capacity: int, stride: int = 16) -> Candidates:
    """`Candidates` at the residual `r` (gradient `g` `(k, n_cells)`; `x1` the augmented cells as rows): the cells with
    $C_{in} > 0$ or $\\min_i g_{in} / (1 + \\|x_n\\|) < \\theta$, $\\theta$ set by 30 bisections on every
    `stride`-th cell to keep about three quarters of the capacity (`fits` False if the cells exceed it)."""
    n = g.shape[1]
    score = jnp.where(jnp.any(c > 0, axis=0), -jnp.inf, jnp.min(g, axis=0) / (1.0 + norms))
    sample = score[::stride]
    within = lambda th: jnp.sum(sample < th) * stride <= capacity * 3 // 4

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2.0
        return jnp.where(within(mid), mid, lo), jnp.where(within(mid), hi, mid)

    zero = jnp.zeros((), g.dtype)
    theta = jax.lax.fori_loop(0, 30, bisect, (zero, jnp.maximum(jnp.max(sample), zero)))[0]
    mask = score < theta
    fits = (theta > 0) & (jnp.sum(mask) <= capacity)
    idx = jax.lax.cond(fits, lambda: jnp.nonzero(mask, size=capacity, fill_value=n)[0],
                       lambda: jnp.full(capacity, n))
    # gathered as rows of `x1` (gathering columns of `x1.T` took 4x as long) and kept so: transposed, they were
    # copied to and from another layout at every fresh selection
    rows = x1.at[idx].get(mode="fill", fill_value=0)
    return Candidates(idx=idx, inside=mask, rows=rows, r0=r, t0=t, theta=theta, fits=fits)


def _outside_margin(xt1, r, t, norms, inside):
    """$\\min_n \\min_i g_{in} / (1 + \\|x_n\\|)$ over the cells outside `inside`, with C's gradient
    $g_{in} = r_i \\cdot x_n - t_i$ written as sums over the dimensions, so that XLA makes one pass over the
    augmented columns `xt1` (their last row unused; a dot product of `r` and the columns took over twice as long)."""
    n_dims, k = r.shape
    g = [_add([r[d, i] * xt1[d] for d in range(n_dims)]) - t[i] for i in range(k)]
    return jnp.min(jnp.where(inside, jnp.inf, functools.reduce(jnp.minimum, g) / (1.0 + norms)))


def _c_step(data, norms, xst, c, xc, sst_mat, mu, sst, sse, cand: Candidates):
    """One C step (py_pcha's), its line search on the candidate cells only while `cand` holds by its bound. Else
    the gradient on all cells: if it is positive outside the candidates, they still hold, with the bound taken
    afresh at this residual (no new selection); if not, they are chosen anew (or the step runs on all cells).
    `data`: the cells as rows `(n_cells, n_dims + 1)` and as columns `(n_dims + 1, n_cells)`, a 1 appended to each
    cell (`augmented`)."""
    x1, xt1 = data
    capacity = cand.idx.shape[0]
    r = (xc @ sst_mat - xst) / sst
    t = jnp.sum(r * xc, axis=0)
    r1 = jnp.concatenate([r, -t[None, :]])  # the gradient $r \cdot x - t$ as one product with the augmented cells
    drift = jnp.maximum(jnp.max(jnp.sqrt(jnp.sum((r - cand.r0) ** 2, axis=0))), jnp.max(t - cand.t0))
    take = lambda a, cand: a.at[:, cand.idx].get(mode="fill", fill_value=0)
    # the gradient on the candidates as sums over the dimensions (one pass; a dot product took 3x as long), 0 on
    # the padding (its rows are 0)
    grad = lambda cand: jnp.stack([_add([r1[d, i] * cand.rows[:, d] for d in range(r1.shape[0])])
                                   for i in range(r1.shape[1])])

    def on_candidates(cand, g_k):
        ck, xc_new, sse_new, mu_new = _c_line_search((cand.rows, None), take(c, cand), g_k, xst, sst_mat, mu, sst, sse)
        return c.at[:, cand.idx].set(ck, mode="drop"), xc_new, sse_new, mu_new, cand

    def on_all():
        # the margin only where the candidates fit (else they are chosen anew, or the step runs on all cells)
        theta = jax.lax.cond(cand.fits, lambda: _outside_margin(xt1, r, t, norms, cand.inside),
                             lambda: jnp.zeros((), xt1.dtype))
        held = Candidates(idx=cand.idx, inside=cand.inside, rows=cand.rows, r0=r, t0=t, theta=theta, fits=cand.fits)

        def anew():
            g = r1.T @ xt1
            # more cells already weigh in C than the capacity holds (the first iterations): no selection can fit
            crowded = jnp.sum(jnp.any(c > 0, axis=0)) > capacity
            none = Candidates(idx=cand.idx, inside=cand.inside, rows=cand.rows, r0=r, t0=t, theta=theta,
                              fits=jnp.asarray(False))
            new = jax.lax.cond(crowded, lambda: none, lambda: candidates(x1, g, c, r, t, norms, capacity))
            return jax.lax.cond(new.fits, lambda: on_candidates(new, take(g, new)),
                                lambda: (*_c_line_search((x1, xt1), c, g, xst, sst_mat, mu, sst, sse), new))

        return jax.lax.cond(cand.fits & (theta > 0), lambda: on_candidates(held, grad(held)), anew)

    return jax.lax.cond(cand.fits & (drift <= cand.theta), lambda: on_candidates(cand, grad(cand)), on_all)


def c_update(data, norms, xst, sst_mat, sst, state: tuple, n_steps: int):
    """`n_steps` projected-gradient steps on C, held as `(k, n_cells)` (py_pcha's `C_update` with `delta = 0`),
    carrying $XC$ `(n_dims, k)` from step to step as py_pcha does. The gradient
    $(X^\\top X C SS^\\top - X^\\top X S^\\top)/\\mathrm{SST}$ is $X^\\top r - t$ with
    $r = (XC\\,SS^\\top - XS^\\top)/\\mathrm{SST}$ and its simplex component $t = r \\cdot XC$ per archetype;
    it is formed on the `Candidates` cells only while they hold (`_c_step`). `data`: `augmented(x)`. `state`: `(C, XC,
    SSE, step size, Candidates)`, returned after the steps."""

    def step(state, _):
        c, xc, sse, mu, cand = state
        return _c_step(data, norms, xst, c, xc, sst_mat, mu, sst, sse, cand), None

    return jax.lax.scan(step, state, length=n_steps)[0]


def augmented(x: Float[Array, "n_cells n_dims"]) -> tuple[Float[Array, "n_cells n_dims_1"],
                                                          Float[Array, "n_dims_1 n_cells"]]:
    """The cells with a 1 appended, as rows and as columns: one product with them gives the C gradient's offset
    (`_c_step`) or the proposal's column sums (`_c_line_search`) beside the product with X."""
    x1 = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
    return x1, x1.T


class PCHAResult(eqx.Module):
    """`archetypes` `(n_archetypes, n_dims)` ($= C^\\top x$), `weights` `(n_cells, n_archetypes)` ($S^\\top$),
    `c` `(n_cells, n_archetypes)`, `sse`, `variance_explained`, `n_iter`."""

    archetypes: Float[Array, "n_archetypes n_dims"]
    weights: Float[Array, "n_cells n_archetypes"]
    c: Float[Array, "n_cells n_archetypes"]
    sse: Float[Array, ""]
    variance_explained: Float[Array, ""]
    n_iter: Int[Array, ""]


def pcha_from(
    x: Float[Array, "n_cells n_dims"],
    start: Int[Array, ""],
    s0: Float[Array, "n_archetypes n_cells"],
    *,
    conv_crit: float = 1e-6,
    max_iter: int = 500,
    capacity: int | None = None,
    block: int = 8192,
) -> PCHAResult:
    """PCHA from a given furthest-sum start cell and initial S (unnormalised, e.g. `-log U`). `capacity`
    (static): how many cells the C steps may restrict themselves to (`Candidates`; default `n_cells / 16`, at
    least 512); 0 runs every C step on all cells. `block` (static): most cells per block of S (`s_update`;
    `even_block`)."""
    xt = x.T
    s0 = s0.astype(x.dtype)
    n_archetypes = s0.shape[0]
    chosen = furthest_sum(xt, n_archetypes, start)
    c = jax.nn.one_hot(chosen, x.shape[0], dtype=x.dtype)
    xc = xt[:, chosen]
    sst = jnp.sum(x * x)
    s = s0 / jnp.sum(s0, axis=0, keepdims=True)
    xct_x, ct_xt_xc = xc.T @ xt, xc.T @ xc
    sse = _sse(sst, xct_x, s, ct_xt_xc, s @ s.T)
    s = to_blocks(s.astype(work_dtype(x.dtype)), even_block(x.shape[0], block), 1.0 / n_archetypes)
    one = jnp.ones((), x.dtype)
    s, sse, mu_s = s_update(s, xct_x, ct_xt_xc, one, sst, sse, 25)
    norms = jnp.sqrt(jnp.sum(x * x, axis=1))
    n_cells, n_dims = x.shape
    capacity = min(n_cells, max(512, n_cells // 16)) if capacity is None else capacity
    cand = no_candidates(n_cells, n_dims, n_archetypes, capacity, x.dtype)
    x1, xt1 = augmented(x)
    zero_row = jnp.zeros((1, n_archetypes), x.dtype)

    def cond(state):
        sse, d_sse, it = state[3], state[4], state[7]
        return (jnp.abs(d_sse) >= conv_crit * jnp.abs(sse)) & (it < max_iter) & ((sst - sse) / sst < 0.9999)

    def body(state):
        c, xc, s, sse, _, mu_c, mu_s, it, cand = state
        s_x = from_blocks(s, n_cells).astype(x.dtype)
        xst, sst_mat = (xt1 @ s_x.T)[:-1], s_x @ s_x.T
        # C's SSE afresh: S's is its sum of changes, which C's line search must not be compared against
        sse_in = _sse(sst, xc, xst, xc.T @ xc, sst_mat)
        c, xc, sse_c, mu_c, cand = c_update((x1, xt1), norms, xst, sst_mat, sst, (c, xc, sse_in, mu_c, cand), 10)
        s, sse_s, mu_s = s_update(s, jnp.concatenate([xc, zero_row]).T @ xt1, xc.T @ xc, mu_s, sst, sse_c, 10)
        return c, xc, s, sse_s, sse - sse_s, mu_c, mu_s, it + 1, cand

    init = (c, xc, s, sse, jnp.asarray(jnp.inf, x.dtype), one, mu_s, jnp.asarray(0), cand)
    c, xc, s, sse, _, _, _, it, _ = jax.lax.while_loop(cond, body, init)
    return PCHAResult(archetypes=c @ x, weights=from_blocks(s, n_cells).T.astype(x.dtype), c=c.T, sse=sse,
                      variance_explained=(sst - sse) / sst, n_iter=it)


# XLA CPU's YNNPACK/XNNPACK fusions split the per-cell S step into many materialised passes (each row recomputing the
# gradient); without them PCHA ran 1.7x faster at 100k cells (CPU seconds). A preferred vector width of 512 bits makes
# its loops use 8 floats per instruction where they used 4 (an S trial on a block in cache: 6.3 ns a cell vs 8.4).
# Copy insertion by region analysis drops the copies XLA otherwise makes of a conditional's outputs into the loop's
# carry (C and the candidates at every C step): 13 % less time at 100k cells, results bit for bit the same. Fast
# min/max (no NaN propagation through `maximum`/`min`; the faces check their input finite) a further 2-6 %.
# Compile options of this jit only.
XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": "",
               "xla_cpu_prefer_vector_width": 512, "xla_cpu_copy_insertion_use_region_analysis": True,
               "xla_cpu_enable_fast_min_max": True}


def supported_xla_options() -> dict[str, str | int | bool]:
    """Those of `XLA_OPTIONS` that this XLA knows (`supported_compiler_options`), on a CPU backend; none on others."""
    return supported_compiler_options(XLA_OPTIONS) if jax.default_backend() == "cpu" else {}


@functools.cache
def _compiled_pcha():
    return jax.jit(_pcha, static_argnames=("n_archetypes", "conv_crit", "max_iter"),
                   compiler_options=supported_xla_options())


def pcha(
    x: Float[Array, "n_cells n_dims"], n_archetypes: int, *, key: PRNGKeyArray, conv_crit: float = 1e-6,
    max_iter: int = 500,
) -> PCHAResult:
    """Seeded PCHA: the furthest-sum start cell and the initial S drawn from `key`.

    **Arguments:**

    - `x`: cells by dimensions (e.g. a PCA embedding).
    - `n_archetypes`: number of archetypes (static).
    - `key`: PRNG key of the initialisation. (Keyword only argument.)
    - `conv_crit`, `max_iter`: py_pcha's stopping rule (static).
    """
    return _compiled_pcha()(x, n_archetypes, key=key, conv_crit=conv_crit, max_iter=max_iter)


def _pcha(
    x: Float[Array, "n_cells n_dims"], n_archetypes: int, *, key: PRNGKeyArray, conv_crit: float, max_iter: int,
) -> PCHAResult:
    k_start, k_s = jr.split(key)
    start = jr.randint(k_start, (), 0, x.shape[0])
    s0 = -jnp.log(jr.uniform(k_s, (n_archetypes, x.shape[0]), x.dtype, minval=jnp.finfo(x.dtype).tiny))
    return pcha_from(x, start, s0, conv_crit=conv_crit, max_iter=max_iter)
