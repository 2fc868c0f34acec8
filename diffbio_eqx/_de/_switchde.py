"""SwitchDE (Campbell & Yau 2017): sigmoidal expression along pseudotime, one maximum-likelihood fit per gene,
vmapped over genes, with optimistix's solvers.

The model of switchde (R/Bioconductor): a gene's expression $y_i$ in cell $i$ at pseudotime $t_i$ is Gaussian,
$y_i \\sim N(\\mu(t_i), \\sigma^2)$ with the sigmoid $\\mu(t) = 2\\mu_0 / (1 + e^{-k (t - t_0)})$ ($\\mu_0$ the
average level, $k$ the activation strength, $t_0$ the switch time). The test is the likelihood ratio against the
constant model $\\mu(t) = \\mu_0$: $D = 2(\\ell_1 - \\ell_0) \\sim \\chi^2_2$ under the null; $q$-values are
Benjamini-Hochberg. With $\\sigma^2$ profiled out, $\\ell = -\\tfrac n2 (\\log(2\\pi\\,\\mathrm{RSS}/n) + 1)$, so the
fit is a nonlinear least-squares problem (Levenberg-Marquardt) and $p = (\\mathrm{RSS}_1 / \\mathrm{RSS}_0)^{n/2}$.

**Zero-inflated variant**: the latent expression $x_i \\sim N(\\mu(t_i), \\sigma^2)$ is observed as 0 with
probability $e^{-\\lambda x_i^2}$ (switchde's dropout model, fitted there by EM). Its marginal likelihood is in
closed form, $p(y_i = 0) = e^{-\\lambda \\mu^2 / (1 + 2\\lambda\\sigma^2)} / \\sqrt{1 + 2\\lambda\\sigma^2}$ and
$p(y_i) = N(y_i; \\mu, \\sigma^2)(1 - e^{-\\lambda y_i^2})$ otherwise, and it is maximised directly (BFGS) over
$(\\mu_0, k, t_0, \\log\\sigma^2, \\log\\lambda)$; the null model keeps the same dropout with a constant mean. The
same maximum likelihood estimate as EM's fixed point, without switchde's update that halves $k$ where it means to
halve the level ($L = 2\\mu_0$).

Starting points: switchde starts from one point ($\\mu_0$ the mean, $k$ the least-squares slope, $t_0$ the median
pseudotime); here each gene is fitted from a small grid of starts ($t_0$ at pseudotime quantiles, $k$ of the
slope's sign at two sizes) and the best fit is kept, which avoids local optima on genes that switch early or late.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import optimistix as optx
from jaxtyping import Array, Float

from ._markers import benjamini_hochberg


def sigmoid(t: Float[Array, " n_cells"], params: Float[Array, " 3"]) -> Float[Array, " n_cells"]:
    """switchde's mean $2\\mu_0 / (1 + e^{-k(t - t_0)})$ for `params = (mu0, k, t0)`."""
    return 2.0 * params[0] * jax.nn.sigmoid(params[1] * (t - params[2]))


def _starts(y: Float[Array, " n_cells"], t: Float[Array, " n_cells"]) -> Float[Array, "n_starts 3"]:
    """Starting points: $\\mu_0$ the mean, $t_0$ at pseudotime quantiles, $k$ the slope's sign times 2 sizes."""
    tc = t - jnp.mean(t)
    slope = jnp.sum(tc * (y - jnp.mean(y))) / jnp.sum(tc * tc)
    sign = jnp.where(slope >= 0, 1.0, -1.0)
    span = jnp.max(t) - jnp.min(t)
    t0s = jnp.quantile(t, jnp.asarray([0.15, 0.325, 0.5, 0.675, 0.85], t.dtype))
    ks = sign * jnp.asarray([4.0, 16.0], t.dtype) / span
    grid_t0, grid_k = jnp.meshgrid(t0s, ks)
    mu0 = jnp.full(grid_t0.size, jnp.mean(y))
    return jnp.stack([mu0, grid_k.ravel(), grid_t0.ravel()], axis=1)


def fit_sigmoid(
    y: Float[Array, " n_cells"], t: Float[Array, " n_cells"], *, max_steps: int = 200
) -> tuple[Float[Array, " 3"], Float[Array, ""]]:
    """The least-squares sigmoid `(mu0, k, t0)` of one gene (best of the starts) and its residual sum of squares."""
    solver = optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)

    def one(start):
        sol = optx.least_squares(lambda p, _: y - sigmoid(t, p), solver, start, max_steps=max_steps, throw=False)
        return sol.value, jnp.sum((y - sigmoid(t, sol.value)) ** 2)

    params, rss = jax.vmap(one)(_starts(y, t))
    rss = jnp.where(jnp.isnan(rss), jnp.inf, rss)
    best = jnp.argmin(rss)
    return params[best], rss[best]


def zi_log_likelihood(
    params: Float[Array, " 5"], y: Float[Array, " n_cells"], t: Float[Array, " n_cells"], constant: bool = False
) -> Float[Array, ""]:
    """Marginal log-likelihood of the zero-inflated model, `params = (mu0, k, t0, log sigma2, log lambda)` (with
    `constant`, $k$ and $t_0$ are ignored and the mean is $\\mu_0$)."""
    mu = jnp.full_like(t, params[0]) if constant else sigmoid(t, params[:3])
    sigma2, lam = jnp.exp(params[3]), jnp.exp(params[4])
    scale = 1.0 + 2.0 * lam * sigma2
    log_zero = -lam * mu**2 / scale - 0.5 * jnp.log(scale)
    log_normal = -0.5 * (jnp.log(2.0 * jnp.pi * sigma2) + (y - mu) ** 2 / sigma2)
    log_kept = log_normal + jnp.log(-jnp.expm1(-lam * jnp.where(y == 0, 1.0, y) ** 2))
    return jnp.sum(jnp.where(y == 0, log_zero, log_kept))


def fit_zero_inflated(
    y: Float[Array, " n_cells"], t: Float[Array, " n_cells"], start: Float[Array, " 5"], constant: bool,
    *, max_steps: int = 500,
) -> tuple[Float[Array, " 5"], Float[Array, ""]]:
    """BFGS maximum of `zi_log_likelihood` from `start`; returns the parameters and the log-likelihood."""
    solver = optx.BFGS(rtol=1e-10, atol=1e-10)
    loss = lambda p, _: -zi_log_likelihood(p, y, t, constant) / y.shape[0]
    sol = optx.minimise(loss, solver, start, max_steps=max_steps, throw=False)
    return sol.value, zi_log_likelihood(sol.value, y, t, constant)


class SwitchResult(eqx.Module):
    """Per gene: `mu0`, `k`, `t0`, `sigma2` (and `lambda_` for the zero-inflated model, else NaN), the
    log-likelihoods of the sigmoid and constant models, the LRT `statistic`, `pvalue` ($\\chi^2_2$) and `qvalue`
    (BH)."""

    mu0: Float[Array, " n_genes"]
    k: Float[Array, " n_genes"]
    t0: Float[Array, " n_genes"]
    sigma2: Float[Array, " n_genes"]
    lambda_: Float[Array, " n_genes"]
    log_likelihood: Float[Array, " n_genes"]
    null_log_likelihood: Float[Array, " n_genes"]
    statistic: Float[Array, " n_genes"]
    pvalue: Float[Array, " n_genes"]
    qvalue: Float[Array, " n_genes"]


def _gene_gaussian(y, t):
    n = y.shape[0]
    params, rss = fit_sigmoid(y, t)
    rss0 = jnp.sum((y - jnp.mean(y)) ** 2)
    ll = lambda r: -0.5 * n * (jnp.log(2.0 * jnp.pi * r / n) + 1.0)
    return params, rss / n, jnp.asarray(jnp.nan, y.dtype), ll(rss), ll(rss0)


def _gene_zero_inflated(y, t):
    params, rss = fit_sigmoid(y, t)
    log_var = jnp.log(jnp.maximum(rss / y.shape[0], 1e-8))
    alt, ll1 = fit_zero_inflated(y, t, jnp.concatenate([params, jnp.stack([log_var, jnp.zeros_like(log_var)])]),
                                 False)
    mean_nz = jnp.sum(y) / jnp.maximum(jnp.sum(y != 0), 1).astype(y.dtype)
    null_start = jnp.stack([mean_nz, jnp.zeros_like(mean_nz), jnp.zeros_like(mean_nz), log_var,
                            jnp.zeros_like(mean_nz)])
    _, ll0 = fit_zero_inflated(y, t, null_start, True)
    return alt[:3], jnp.exp(alt[3]), jnp.exp(alt[4]), ll1, ll0


@eqx.filter_jit
def switch_de(
    y: Float[Array, "n_cells n_genes"], t: Float[Array, " n_cells"], *, zero_inflated: bool = False
) -> SwitchResult:
    """SwitchDE on every gene (columns of `y`, e.g. log-normalised expression) along pseudotime `t`.

    **Arguments:**

    - `y`: expression, cells by genes.
    - `t`: pseudotime of each cell.
    - `zero_inflated`: fit switchde's dropout model (zeros are dropouts). (Keyword only, static.)
    """
    gene = _gene_zero_inflated if zero_inflated else _gene_gaussian
    params, sigma2, lam, ll1, ll0 = jax.vmap(lambda column: gene(column, t))(y.T)
    statistic = jnp.maximum(2.0 * (ll1 - ll0), 0.0)
    pvalue = jsp.gammaincc(1.0, statistic / 2.0)  # chi-squared survival with 2 df: exp(-D / 2)
    return SwitchResult(mu0=params[:, 0], k=params[:, 1], t0=params[:, 2], sigma2=sigma2, lambda_=lam,
                        log_likelihood=ll1, null_log_likelihood=ll0, statistic=statistic, pvalue=pvalue,
                        qvalue=benjamini_hochberg(pvalue))

