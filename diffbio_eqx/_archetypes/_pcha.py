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


def _line_search(propose, sse_old, mu):
    """py_pcha's step rule: halve `mu` until `propose(mu)` does not raise the SSE by more than 1e-9 relatively,
    then grow it by 1.2 (at most 60 halvings)."""
    def cond(state):
        _, sse, _, n = state
        return ~(sse <= sse_old * (1.0 + 1e-9)) & (n < 60)

    def body(state):
        _, _, step, n = state
        step = step / 2.0
        value, sse = propose(step)
        return value, sse, step, n + 1

    value, sse = propose(mu)
    value, sse, mu, _ = jax.lax.while_loop(cond, body, (value, sse, mu, jnp.asarray(0)))
    return value, sse, mu * 1.2


def s_update(s, xct_x, ct_xt_xc, mu, sst, sse, n_steps: int):
    """`n_steps` projected-gradient steps on S (py_pcha's `S_update`)."""
    n_cells = s.shape[1]

    def step(state, _):
        s, sse, mu = state
        g = (ct_xt_xc @ s - xct_x) / (sst / n_cells)
        g = g - jnp.sum(g * s, axis=0, keepdims=True)

        def propose(m):
            new = jnp.maximum(s - g * m, 0.0)
            new = new / jnp.sum(new, axis=0, keepdims=True)
            return new, _sse(sst, xct_x, new, ct_xt_xc, new @ new.T)

        s, sse, mu = _line_search(propose, sse, mu)
        return (s, sse, mu), None

    return jax.lax.scan(step, (s, sse, mu), length=n_steps)[0]


def c_update(x, xst, c, sst_mat, mu, sst, sse, n_steps: int):
    """`n_steps` projected-gradient steps on C (py_pcha's `C_update` with `delta = 0`)."""
    xt_xst = x.T @ xst
    eps = jnp.finfo(x.dtype).eps

    def step(state, _):
        c, sse, mu = state
        xc = x @ c
        g = (x.T @ (xc @ sst_mat) - xt_xst) / sst
        g = g - jnp.sum(g * c, axis=0, keepdims=True)

        def propose(m):
            new = jnp.maximum(c - m * g, 0.0)
            new = new / (jnp.sum(new, axis=0, keepdims=True) + eps)
            xc_new = x @ new
            return new, _sse(sst, xc_new, xst, xc_new.T @ xc_new, sst_mat)

        c, sse, mu = _line_search(propose, sse, mu)
        return (c, sse, mu), None

    return jax.lax.scan(step, (c, sse, mu), length=n_steps)[0]


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
    c = jax.nn.one_hot(furthest_sum(xt, n_archetypes, start), x.shape[0], dtype=x.dtype).T
    sst = jnp.sum(x * x)
    s = s0 / jnp.sum(s0, axis=0, keepdims=True)
    xc = xt @ c
    xct_x, ct_xt_xc = xc.T @ xt, xc.T @ xc
    sse = _sse(sst, xct_x, s, ct_xt_xc, s @ s.T)
    one = jnp.ones((), x.dtype)
    s, sse, mu_s = s_update(s, xct_x, ct_xt_xc, one, sst, sse, 25)

    def cond(state):
        _, _, sse, d_sse, _, _, it = state
        return (jnp.abs(d_sse) >= conv_crit * jnp.abs(sse)) & (it < max_iter) & ((sst - sse) / sst < 0.9999)

    def body(state):
        c, s, sse, _, mu_c, mu_s, it = state
        c, sse_c, mu_c = c_update(xt, xt @ s.T, c, s @ s.T, mu_c, sst, sse, 10)
        xc = xt @ c
        s, sse_s, mu_s = s_update(s, xc.T @ xt, xc.T @ xc, mu_s, sst, sse_c, 10)
        return c, s, sse_s, sse - sse_s, mu_c, mu_s, it + 1

    init = (c, s, sse, jnp.asarray(jnp.inf, x.dtype), one, mu_s, jnp.asarray(0))
    c, s, sse, _, _, _, it = jax.lax.while_loop(cond, body, init)
    return PCHAResult(archetypes=c.T @ x, weights=s.T, c=c, sse=sse, variance_explained=(sst - sse) / sst,
                      n_iter=it)


@eqx.filter_jit
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
    k_start, k_s = jr.split(key)
    start = jr.randint(k_start, (), 0, x.shape[0])
    s0 = -jnp.log(jr.uniform(k_s, (n_archetypes, x.shape[0]), x.dtype, minval=jnp.finfo(x.dtype).tiny))
    return pcha_from(x, start, s0, conv_crit=conv_crit, max_iter=max_iter)
