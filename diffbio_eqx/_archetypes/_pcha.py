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
reordered (py_pcha's final sort keys on the component index, reversing the order).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray


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


def _line_search(sse_at, sse_old, mu):
    """py_pcha's step rule on the step size alone: halve `mu` until the proposal's SSE (`sse_at(mu)` returns it and
    small by-products) does not exceed `sse_old` by more than 1e-9 relatively (at most 60 halvings). Returns the
    accepted step, its SSE and by-products; the next step size is the accepted one times 1.2."""
    def cond(state):
        _, sse, _, n = state
        return ~(sse <= sse_old * (1.0 + 1e-9)) & (n < 60)

    def body(state):
        step, _, _, n = state
        step = step / 2.0
        sse, aux = sse_at(step)
        return step, sse, aux, n + 1

    sse, aux = sse_at(mu)
    step, sse, aux, _ = jax.lax.while_loop(cond, body, (mu, sse, aux, jnp.asarray(0)))
    return step, sse, aux


def _s_step(rows, xct_x, ct_xt_xc, scale, m) -> list[Array]:
    """The rows of S after one projected-gradient step of size `m`: py_pcha's
    $g = (C^\\top X^\\top X C S - (XC)^\\top X) / (\\mathrm{SST}/n)$ less its simplex component per cell, clipped at 0,
    each cell renormalised. Written row by row (k is small; each row its own array) so that XLA fuses it with its
    consumer into one vectorised pass over the cells, with no matrix product."""
    k = len(rows)
    g = [(_add([ct_xt_xc[i, j] * rows[j] for j in range(k)]) - xct_x[i]) / scale for i in range(k)]
    along = _add([g[i] * rows[i] for i in range(k)])
    u = [jnp.maximum(rows[i] - (g[i] - along) * m, 0.0) for i in range(k)]
    total = _add(u)
    return [ui / total for ui in u]


def _s_sse(rows: list[Array], xct_x, ct_xt_xc, sst):
    """SSE of S's rows: $\\mathrm{SST} + \\sum_n (s_n^\\top C^\\top X^\\top X C s_n - 2 ((XC)^\\top X)_n \\cdot s_n)$,
    py_pcha's $\\mathrm{SST} - 2\\langle (XC)^\\top X, S\\rangle + \\langle C^\\top X^\\top X C, SS^\\top\\rangle$
    summed per cell (one fused reduction)."""
    k = len(rows)
    per_cell = _add([rows[i] * (_add([ct_xt_xc[i, j] * rows[j] for j in range(k)]) - 2.0 * xct_x[i])
                     for i in range(k)])
    return sst + jnp.sum(per_cell)


def s_update(s, xct_x, ct_xt_xc, mu, sst, sse, n_steps: int):
    """`n_steps` projected-gradient steps on S `(k, n_cells)` (py_pcha's `S_update`). S is held as k separate
    rows (XLA CPU's fusions with a stacked `(k, n)` output or row slices of it ran 3-10x slower); each
    line-search trial is one fused pass that forms the proposal's rows and their SSE."""
    scale = sst / s.shape[1]
    b = [xct_x[i] for i in range(s.shape[0])]

    def step(state, _):
        rows, sse, mu = state

        def sse_at(m):
            new = _s_step(list(rows), b, ct_xt_xc, scale, m)
            return _s_sse(new, b, ct_xt_xc, sst), tuple(new)

        m, sse, rows = _line_search(sse_at, sse, mu)
        return (rows, sse, m * 1.2), None

    rows, sse, mu = jax.lax.scan(step, (tuple(s[i] for i in range(s.shape[0])), sse, mu), length=n_steps)[0]
    return jnp.stack(rows), sse, mu


def _c_line_search(xt, c, g, xst, sst_mat, mu, sst, sse):
    """py_pcha's line search on C `(k, m)` over the columns `xt` `(n_dims, m)` it weighs, along the gradient `g`:
    the proposal $\\max(C - \\mu g, 0)$ with each archetype's weights renormalised (plus eps, as py_pcha), its
    archetypes $XC$ one product per trial. Returns the accepted C, its $XC$, SSE and the next step size."""
    eps = jnp.finfo(xt.dtype).eps

    def propose(m):
        u = jnp.maximum(c - m * g, 0.0)
        return u / (jnp.sum(u, axis=1, keepdims=True) + eps)

    def sse_at(m):
        xc_new = xt @ propose(m).T
        return _sse(sst, xc_new, xst, xc_new.T @ xc_new, sst_mat), xc_new

    m, sse, xc = _line_search(sse_at, sse, mu)
    return propose(m), xc, sse, m * 1.2


def c_update(xt, xst, c, xc, sst_mat, mu, sst, sse, n_steps: int):
    """`n_steps` projected-gradient steps on C, held as `(k, n_cells)` (py_pcha's `C_update` with `delta = 0`),
    carrying $XC$ `(n_dims, k)` from step to step as py_pcha does. The gradient
    $(X^\\top X C SS^\\top - X^\\top X S^\\top)/\\mathrm{SST}$ is $X^\\top r$ with
    $r = (XC\\,SS^\\top - XS^\\top)/\\mathrm{SST}$ (one product with $X$),
    and its simplex component $\\sum_n g \\circ C$ is $r \\cdot XC$ per archetype (no pass)."""

    def step(state, _):
        c, xc, sse, mu = state
        r = (xc @ sst_mat - xst) / sst
        g = r.T @ xt - jnp.sum(r * xc, axis=0)[:, None]
        return _c_line_search(xt, c, g, xst, sst_mat, mu, sst, sse), None

    return jax.lax.scan(step, (c, xc, sse, mu), length=n_steps)[0]


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
) -> PCHAResult:
    """PCHA from a given furthest-sum start cell and initial S (unnormalised, e.g. `-log U`)."""
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
    one = jnp.ones((), x.dtype)
    s, sse, mu_s = s_update(s, xct_x, ct_xt_xc, one, sst, sse, 25)

    def cond(state):
        sse, d_sse, it = state[3], state[4], state[7]
        return (jnp.abs(d_sse) >= conv_crit * jnp.abs(sse)) & (it < max_iter) & ((sst - sse) / sst < 0.9999)

    def body(state):
        c, xc, s, sse, _, mu_c, mu_s, it = state
        c, xc, sse_c, mu_c = c_update(xt, xt @ s.T, c, xc, s @ s.T, mu_c, sst, sse, 10)
        s, sse_s, mu_s = s_update(s, xc.T @ xt, xc.T @ xc, mu_s, sst, sse_c, 10)
        return c, xc, s, sse_s, sse - sse_s, mu_c, mu_s, it + 1

    init = (c, xc, s, sse, jnp.asarray(jnp.inf, x.dtype), one, mu_s, jnp.asarray(0))
    c, xc, s, sse, _, _, _, it = jax.lax.while_loop(cond, body, init)
    return PCHAResult(archetypes=c @ x, weights=s.T, c=c.T, sse=sse, variance_explained=(sst - sse) / sst,
                      n_iter=it)


# XLA CPU's YNNPACK/XNNPACK fusions split the per-cell S step into many materialised passes (each row recomputing the
# gradient); without them PCHA ran 1.7x faster at 100k cells (CPU seconds). Compile options of this jit only.
XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": ""}


@functools.cache
def supported_xla_options() -> dict[str, str]:
    """`XLA_OPTIONS` on a CPU backend whose XLA knows them (they are experimental: other jaxlib releases may not),
    else none; checked once by compiling a one-operation program with them."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.negative, compiler_options=XLA_OPTIONS).lower(jnp.zeros(())).compile()
    except Exception:  # an unknown option is rejected at compilation, by a jaxlib-specific error type
        return {}
    return XLA_OPTIONS


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
