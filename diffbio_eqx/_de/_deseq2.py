"""Pseudobulk differential expression as DESeq2 runs it in `pydeseq2` (0.5), every per-gene fit vmapped over genes.

The steps and their defaults follow `pydeseq2.dds.DeseqDataSet.deseq2` and `pydeseq2.ds.DeseqStats`:

1. **Size factors** by median of ratios:
   $s_j = \\exp \\mathrm{median}_g (\\log y_{jg} - \\overline{\\log y_{\\cdot g}})$
   over genes with no zero count.
2. **Rough dispersions** $\\min(\\alpha_\\text{rde}, \\alpha_\\text{mom})$ clipped to $[10^{-8}, 10]$; the means
   $\\hat\\mu$ from a linear regression of $y / s$ on the design when the design has as many distinct rows as
   columns (else the IRLS fit at the rough dispersions), floored at `min_mu = 0.5`.
3. **Gene-wise dispersions**: the minimiser in $\\log \\alpha \\in [\\log 10^{-8}, \\log 10]$ of the NB negative
   log-likelihood plus the Cox-Reid term $\\tfrac12 \\log\\det(X^\\top W X)$, $W = \\mu / (1 + \\mu\\alpha)$.
   pydeseq2 runs L-BFGS-B from the rough estimate, which stays there when the gradient is below its tolerance
   (often at the lower bound, where the loss is flat); here the same stop, else a 96-point grid in $\\log\\alpha$
   picks the basin and safeguarded Newton steps polish it (the same minimiser where the loss has one minimum).
4. **Trend** $\\alpha(\\bar\\mu) = a_0 + a_1 / \\bar\\mu$: a gamma GLM with identity link on the gene-wise
   dispersions (Fisher scoring), refitted after dropping genes whose ratio to the curve is below $10^{-4}$ or at
   least 15, until the coefficients change by less than $10^{-6}$ in squared log; the trimmed mean if a
   coefficient falls to $10^{-10}$.
5. **Prior width** $\\sigma^2 = \\max(\\mathrm{MAD}(r)^2 - \\psi_1((m - p)/2), 0.25)$ of the log residuals of genes
   with $\\alpha \\ge 100 \\cdot 10^{-8}$; **MAP** dispersions add $(\\log\\alpha - \\log\\alpha_\\text{trend})^2 /
   (2\\sigma^2)$; genes above the trend by more than $2\\,\\mathrm{MAD}$ keep their gene-wise dispersion.
6. **NB GLM** by IRLS (ridge $10^{-6}$, start from the least-squares fit of $\\log(y/s + 0.1)$, stop when the
   deviance changes by less than $10^{-8}$ relatively), the **Wald test** of a contrast
   ($\\mathrm{SE}^2 = c^\\top H M H c$, $H = (M + 10^{-6} I)^{-1}$, $M = X^\\top W X$) and **Benjamini-Hochberg**.

Not done here: pydeseq2's Cooks-distance outlier refit and flagging (it only replaces counts with 7 or more
replicates per condition) and the independent filtering of `DeseqStats(independent_filter=True)`; compare with
`cooks_filter=False, independent_filter=False` (and `refit_cooks=False`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
from jaxtyping import Array, Bool, Float


MIN_DISP, MAX_DISP, MIN_MU = 1e-8, 10.0, 0.5
_GRID = 96


def size_factors(counts: Float[Array, "n_samples n_genes"]) -> Float[Array, " n_samples"]:
    """Median-of-ratios size factors (pydeseq2's `deseq2_norm`), over the genes without a zero count."""
    log_counts = jnp.log(counts)
    logmeans = jnp.mean(log_counts, axis=0)
    ratios = jnp.where(jnp.isfinite(logmeans)[None, :], log_counts - logmeans[None, :], jnp.nan)
    return jnp.exp(jnp.nanmedian(ratios, axis=1))


def nb_nll(
    counts: Float[Array, " n_samples"], mu: Float[Array, " n_samples"], alpha: Float[Array, ""]
) -> Float[Array, ""]:
    """pydeseq2's `nb_nll`: the NB negative log-likelihood with variance $\\mu + \\alpha\\mu^2$, summed."""
    inv = 1.0 / alpha
    logbinom = jsp.gammaln(counts + inv) - jsp.gammaln(counts + 1.0) - jsp.gammaln(inv)
    return counts.shape[0] * inv * jnp.log(alpha) + jnp.sum(
        -logbinom + (counts + inv) * jnp.log(inv + mu) - counts * jnp.log(mu))


def dispersion_loss(
    log_alpha: Float[Array, ""],
    counts: Float[Array, " n_samples"],
    design: Float[Array, "n_samples n_vars"],
    mu: Float[Array, " n_samples"],
    prior: tuple[Float[Array, ""], Float[Array, ""]] | None,
) -> Float[Array, ""]:
    """NB negative log-likelihood + Cox-Reid $\\tfrac12\\log\\det X^\\top W X$ (+ the log-normal prior
    `(centre, variance)` for MAP), as pydeseq2's `fit_alpha_mle` loss."""
    alpha = jnp.exp(log_alpha)
    w = mu / (1.0 + mu * alpha)
    loss = nb_nll(counts, mu, alpha) + 0.5 * jnp.linalg.slogdet((design.T * w[None, :]) @ design)[1]
    if prior is not None:
        loss = loss + (log_alpha - prior[0]) ** 2 / (2.0 * prior[1])
    return loss


def minimise_log_dispersion(loss, start: Float[Array, ""]) -> Float[Array, ""]:
    """The minimiser of a 1-D `loss(log_alpha)` on $[\\log 10^{-8}, \\log 10]$ from `start`, as L-BFGS-B finds it.

    L-BFGS-B stops at once where the projected gradient at the start is at most `pgtol = 1e-5` (pydeseq2's
    gene-wise fit starts at the rough estimate, often the lower bound, where the loss is flat); otherwise the best
    point of a 96-point grid picks the basin and Newton steps kept inside its neighbouring grid cells polish it
    (halving a step that does not descend).
    """
    dtype = start.dtype
    lo, hi = jnp.log(jnp.asarray(MIN_DISP, dtype)), jnp.log(jnp.asarray(MAX_DISP, dtype))
    grad, hess = jax.grad(loss), jax.grad(jax.grad(loss))
    x0 = jnp.clip(start, lo, hi)
    stuck = jnp.abs(jnp.clip(x0 - grad(x0), lo, hi) - x0) <= 1e-5
    grid = jnp.linspace(lo, hi, _GRID)
    values = jax.vmap(loss)(grid)
    best = jnp.argmin(jnp.where(jnp.isnan(values), jnp.inf, values))
    step = grid[1] - grid[0]
    left, right = jnp.maximum(grid[best] - step, lo), jnp.minimum(grid[best] + step, hi)

    def newton(x, _):
        g, h = grad(x), hess(x)
        target = jnp.clip(jnp.where(h > 0, x - g / h, x - jnp.sign(g) * step / 4.0), left, right)
        better = loss(target) <= loss(x)
        return jnp.where(better, target, 0.5 * (x + target)), None

    x = jax.lax.scan(newton, grid[best], length=30)[0]
    return jnp.where(stuck, x0, jnp.where(loss(x) <= values[best], x, grid[best]))


def _least_squares(design: Float[Array, "n_samples n_vars"], y: Float[Array, "n_samples n_genes"]):
    return jnp.linalg.lstsq(design, y)[0]


def rough_dispersions(
    normed: Float[Array, "n_samples n_genes"], design: Float[Array, "n_samples n_vars"], sf: Float[Array, " n_samples"]
) -> Float[Array, " n_genes"]:
    """pydeseq2's `_fit_MoM_dispersions`: $\\min(\\alpha_\\text{rde}, \\alpha_\\text{mom})$ clipped."""
    m, p = design.shape
    y_hat = jnp.maximum(design @ _least_squares(design, normed), 1.0)
    rde = jnp.maximum(jnp.sum(((normed - y_hat) ** 2 - y_hat) / ((m - p) * y_hat**2), axis=0), 0.0)
    mean = jnp.mean(normed, axis=0)
    var = jnp.var(normed, axis=0, ddof=1)
    mde = jnp.nan_to_num((var - jnp.mean(1.0 / sf) * mean) / mean**2)
    return jnp.clip(jnp.minimum(rde, mde), MIN_DISP, MAX_DISP)


def irls(
    counts: Float[Array, " n_samples"],
    sf: Float[Array, " n_samples"],
    design: Float[Array, "n_samples n_vars"],
    disp: Float[Array, ""],
    *,
    max_iter: int = 250,
    beta_tol: float = 1e-8,
) -> tuple[Float[Array, " n_vars"], Float[Array, " n_samples"]]:
    """pydeseq2's `irls_solver` (without its L-BFGS-B fallback, betas clipped to $\\pm 30$ instead): the NB GLM
    coefficients (natural log) and the floored means $\\max(s e^{X\\beta}, 0.5)$."""
    p = design.shape[1]
    ridge = 1e-6 * jnp.eye(p, dtype=counts.dtype)
    beta0 = jnp.linalg.lstsq(design, jnp.log(counts / sf + 0.1))[0]

    def mean(beta):
        return jnp.maximum(sf * jnp.exp(design @ beta), MIN_MU)

    def step(state, _):
        beta, dev, done = state
        mu = mean(beta)
        w = mu / (1.0 + mu * disp)
        z = jnp.log(mu / sf) + (counts - mu) / mu
        new = jnp.clip(jnp.linalg.solve((design.T * w[None, :]) @ design + ridge, design.T @ (w * z)), -30.0, 30.0)
        new_dev = -2.0 * nb_nll(counts, mean(new), disp)
        converged = jnp.abs(new_dev - dev) / (jnp.abs(new_dev) + 0.1) <= beta_tol
        beta = jnp.where(done, beta, new)
        return (beta, jnp.where(done, dev, new_dev), done | converged), None

    init = (beta0, jnp.asarray(1000.0, counts.dtype), jnp.asarray(False))
    beta = jax.lax.scan(step, init, length=max_iter)[0][0]
    return beta, mean(beta)


def gamma_trend(
    dispersions: Float[Array, " n_genes"], normed_means: Float[Array, " n_genes"], usable: Bool[Array, " n_genes"]
) -> tuple[Float[Array, " 2"], Bool[Array, ""]]:
    """pydeseq2's parametric trend $a_0 + a_1/\\bar\\mu$ with its refit-after-dropping loop; returns the
    coefficients and whether the fit held (else the caller uses the mean trend)."""
    x = jnp.stack([jnp.ones_like(normed_means), 1.0 / normed_means], axis=1)
    x = jnp.where(usable[:, None], x, 1.0)

    def fit(mask):
        def scoring(c, _):
            mu = x @ c
            w = jnp.where(mask, 1.0 / mu**2, 0.0)
            return jnp.maximum(jnp.linalg.solve((x.T * w[None, :]) @ x, x.T @ (w * dispersions)), 1e-12), None

        return jax.lax.scan(scoring, jnp.ones(2, dispersions.dtype), length=60)[0]

    def outer(state, _):
        coeffs, old, mask, done, ok = state
        new = fit(mask)
        ratio = dispersions / (x @ new)
        go_on = jnp.all(new > 1e-10) & (jnp.sum(jnp.log(jnp.abs(new / coeffs)) ** 2) >= 1e-6)
        new_mask = mask & ~((ratio < 1e-4) | (ratio >= 15.0))
        keep = done
        return (jnp.where(keep, coeffs, new), jnp.where(keep, old, coeffs), jnp.where(keep, mask, new_mask),
                done | ~go_on, jnp.where(keep, ok, ok & jnp.all(new > 1e-10))), None

    ones = jnp.ones(2, dispersions.dtype)
    init = (ones, 0.1 * ones, usable, jnp.asarray(False), jnp.asarray(True))
    coeffs, _, _, _, ok = jax.lax.scan(outer, init, length=30)[0]
    return coeffs, ok


def trimmed_mean(values: Float[Array, " n"], mask: Bool[Array, " n"], proportion: float) -> Float[Array, ""]:
    """`scipy.stats.trim_mean(values[mask], proportion)`."""
    n = jnp.sum(mask)
    s = jnp.sort(jnp.where(mask, values, jnp.inf))
    cut = jnp.floor(proportion * n.astype(values.dtype)).astype(n.dtype)
    idx = jnp.arange(values.shape[0])
    keep = (idx >= cut) & (idx < n - cut)
    return jnp.sum(jnp.where(keep, s, 0.0)) / jnp.sum(keep).astype(values.dtype)


class DESeq2Result(eqx.Module):
    """Per gene (NaN for all-zero genes): `base_mean`, `log2_fold_change`, `lfc_se` (log2), `stat`, `pvalue`,
    `padj` (BH over the tested genes), the dispersions of each stage and the natural-log coefficients; per sample
    the size factors; the trend coefficients $(a_0, a_1)$ and the prior variance."""

    base_mean: Float[Array, " n_genes"]
    log2_fold_change: Float[Array, " n_genes"]
    lfc_se: Float[Array, " n_genes"]
    stat: Float[Array, " n_genes"]
    pvalue: Float[Array, " n_genes"]
    padj: Float[Array, " n_genes"]
    genewise_dispersions: Float[Array, " n_genes"]
    fitted_dispersions: Float[Array, " n_genes"]
    dispersions: Float[Array, " n_genes"]
    coefficients: Float[Array, "n_genes n_vars"]
    size_factors: Float[Array, " n_samples"]
    trend: Float[Array, " 2"]
    prior_disp_var: Float[Array, ""]


def masked_benjamini_hochberg(pvals: Float[Array, " n"]) -> Float[Array, " n"]:
    """BH over the non-NaN p-values (`scipy.stats.false_discovery_control` on them); NaN stays NaN."""
    valid = ~jnp.isnan(pvals)
    n = jnp.sum(valid).astype(pvals.dtype)
    order = jnp.argsort(jnp.where(valid, pvals, jnp.inf))
    ranked = jnp.where(valid, pvals, jnp.inf)[order] * n / jnp.arange(1, pvals.shape[0] + 1, dtype=pvals.dtype)
    adjusted = jnp.minimum(jax.lax.cummin(ranked[::-1])[::-1], 1.0)
    return jnp.where(valid, jnp.zeros_like(pvals).at[order].set(adjusted), jnp.nan)


def _dispersion_fits(counts, design, fitted_mu, start, prior=None):
    """Gene-wise (or, with `prior=(log centres, variance)`, MAP) dispersions from `start` (log), one vmapped
    1-D fit per gene."""
    def one(y, mu, x0, centre):
        loss = lambda la: dispersion_loss(la, y, design, mu, None if prior is None else (centre, prior[1]))
        return jnp.exp(minimise_log_dispersion(loss, x0))

    centres = start if prior is None else prior[0]
    return jnp.clip(jax.vmap(one)(counts.T, fitted_mu.T, start, centres), MIN_DISP, MAX_DISP)


def _shrunk_dispersions(gw, base_mean, nonzero, n_samples: int, n_vars: int):
    """Trend, prior variance and the MAP prior centres (pydeseq2's `fit_dispersion_trend` / `_prior`)."""
    coeffs, ok = gamma_trend(gw, base_mean, nonzero)
    mean_trend = trimmed_mean(gw, nonzero & (gw > 10.0 * MIN_DISP), 0.001)
    fitted = jnp.where(ok, coeffs[0] + coeffs[1] / base_mean, mean_trend)
    residual = jnp.log(gw) - jnp.log(fitted)
    above = nonzero & (gw >= 100.0 * MIN_DISP)
    centre = jnp.nanmedian(jnp.where(above, residual, jnp.nan))
    mad = jnp.nanmedian(jnp.where(above, jnp.abs(residual - centre), jnp.nan)) / 0.6744897501960817
    squared_logres = mad**2
    trigamma = jsp.polygamma(1, jnp.asarray((n_samples - n_vars) / 2.0, gw.dtype))
    prior_var = jnp.maximum(squared_logres - trigamma, 0.25)
    trend = jnp.where(ok, coeffs, jnp.stack([mean_trend, jnp.zeros_like(mean_trend)]))
    return fitted, squared_logres, prior_var, trend


def wald_test(
    beta: Float[Array, " n_vars"],
    mu: Float[Array, " n_samples"],
    design: Float[Array, "n_samples n_vars"],
    disp: Float[Array, ""],
    contrast: Float[Array, " n_vars"],
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """pydeseq2's `wald_test` (two-sided, null 0): `(pvalue, stat, se)`, natural-log scale."""
    w = mu / (1.0 + mu * disp)
    m = (design.T * w[None, :]) @ design
    hc = jnp.linalg.inv(m + 1e-6 * jnp.eye(design.shape[1], dtype=mu.dtype)) @ contrast
    se = jnp.sqrt(hc @ m @ hc)
    stat = contrast @ beta / se
    return 2.0 * jsp.ndtr(-jnp.abs(stat)), stat, se


@eqx.filter_jit
def deseq2(
    counts: Float[Array, "n_samples n_genes"],
    design: Float[Array, "n_samples n_vars"],
    contrast: Float[Array, " n_vars"],
    *,
    linear_mu: bool,
) -> DESeq2Result:
    """DESeq2 on a samples-by-genes count matrix, as pydeseq2 with `refit_cooks=False` and `DeseqStats(...,
    cooks_filter=False, independent_filter=False)`.

    **Arguments:**

    - `counts`: whole-number counts per sample (pseudobulk sums), at least one gene without zeros.
    - `design`: the design matrix (intercept column included), full column rank, more rows than columns.
    - `contrast`: the contrast vector over the design's columns.
    - `linear_mu`: the design has as many distinct rows as columns (pydeseq2 then starts from a linear
      regression, else from an IRLS fit). (Keyword only, static.)
    """
    n_samples, n_vars = design.shape
    sf = size_factors(counts)
    normed = counts / sf[:, None]
    base_mean = jnp.mean(normed, axis=0)
    nonzero = jnp.any(counts > 0, axis=0)
    safe = jnp.where(nonzero[None, :], counts, 1.0)  # all-zero genes are fitted on ones, then reported as NaN
    normed_safe = safe / sf[:, None]
    rough = rough_dispersions(normed_safe, design, sf)
    if linear_mu:
        mu_hat = jnp.maximum(sf[:, None] * (design @ _least_squares(design, normed_safe)), MIN_MU)
    else:
        mu_hat = jax.vmap(lambda y, a: irls(y, sf, design, a)[1], out_axes=1)(safe.T, rough)
    gw = _dispersion_fits(safe, design, mu_hat, jnp.log(rough))
    fitted, squared_logres, prior_var, trend = _shrunk_dispersions(
        gw, jnp.where(nonzero, base_mean, 1.0), nonzero, n_samples, n_vars)
    map_disp = _dispersion_fits(safe, design, mu_hat, jnp.log(fitted), prior=(jnp.log(fitted), prior_var))
    disp = jnp.where(jnp.log(gw) > jnp.log(fitted) + 2.0 * jnp.sqrt(squared_logres), gw, map_disp)
    beta = jax.vmap(lambda y, a: irls(y, sf, design, a)[0])(safe.T, disp)
    mu = sf[None, :] * jnp.exp(beta @ design.T)
    pvalue, stat, se = jax.vmap(lambda b, m, a: wald_test(b, m, design, a, contrast))(beta, mu, disp)
    nan = jnp.asarray(jnp.nan, counts.dtype)
    hide = lambda v: jnp.where(nonzero, v, nan)
    pvalue = hide(pvalue)
    return DESeq2Result(
        base_mean=base_mean, log2_fold_change=hide(beta @ contrast / jnp.log(2.0)), lfc_se=hide(se / jnp.log(2.0)),
        stat=hide(stat), pvalue=pvalue, padj=masked_benjamini_hochberg(pvalue), genewise_dispersions=hide(gw),
        fitted_dispersions=hide(fitted), dispersions=hide(disp), coefficients=jnp.where(nonzero[:, None], beta, nan),
        size_factors=sf, trend=trend, prior_disp_var=prior_var,
    )
