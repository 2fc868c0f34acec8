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

7. **Cook's distances** $D = \\frac{(y - \\mu)^2}{(\\mu + \\alpha_\\text{rob}\\mu^2)\\,p}\\,\\frac{h}{(1-h)^2}$ with
   the GLM's hat diagonals $h$ and pydeseq2's trimmed-moment dispersion $\\alpha_\\text{rob}$ (floored at 0.04);
   the cutoff is the 0.99 quantile of $F(p, m - p)$.
8. **Outlier refit** (`refit_cooks=True`, pydeseq2's `refit`): in samples whose design row has at least
   `min_replicates = 7` replicates, counts above the cutoff become $\\lfloor s_j \\cdot \\mathrm{trim}_{0.2}(y/s)
   \\rfloor$, and the genes with a replaced count are refitted (gene-wise and MAP dispersions, LFCs) with the
   same size factors, trend and prior; genes all zero after replacement get LFC 0 and p-value 1.
9. **Cook's filter** (`cooks_filter=True`): p-values of genes with a Cook's distance above the cutoff in a sample
   of a design row with 3 or more replicates (refitted genes: only in non-replaceable samples) become NaN, unless 3
   or more samples count more than the sample of largest distance.
10. **Independent filtering** (`independent_filter=True`, `DeseqStats._independent_filtering`): BH over the genes
   with `baseMean` at least each of 50 quantiles from the share of zero means to 0.95; pydeseq2's lowess
   (`frac=1/5`, 3 robust passes) of the rejections at `alpha` against the quantile; the first quantile whose
   rejections exceed the lowess maximum minus the residuals' RMS (the lowest if at most 10 rejections).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._core._loop import iterate
from ._markers import benjamini_hochberg


MIN_DISP, MAX_DISP, MIN_MU = 1e-8, 10.0, 0.5


def max_dispersion(n_samples: int) -> float:
    """The dispersions' upper bound pydeseq2 enforces: `max(max_disp, n_samples)` (`DeseqDataSet.max_disp`)."""
    return max(MAX_DISP, float(n_samples))
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


def _logdet_spd(m: Float[Array, "p p"]) -> Float[Array, ""]:
    """$\\log\\det m$ of a symmetric positive definite matrix: in closed form up to 2 x 2 (the usual pseudobulk
    designs; XLA's batched LU of tiny matrices cost most of the dispersion fits), else by Cholesky."""
    if m.shape[0] == 1:
        return jnp.log(m[0, 0])
    if m.shape[0] == 2:
        return jnp.log(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(m))))


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
    loss = nb_nll(counts, mu, alpha) + 0.5 * _logdet_spd((design.T * w[None, :]) @ design)
    if prior is not None:
        loss = loss + (log_alpha - prior[0]) ** 2 / (2.0 * prior[1])
    return loss


def minimise_log_dispersion(loss, start: Float[Array, ""], max_disp: float = MAX_DISP) -> Float[Array, ""]:
    """The minimiser of a 1-D `loss(log_alpha)` on $[\\log 10^{-8}, \\log$ `max_disp`$]$ from `start`, as L-BFGS-B
    finds it.

    L-BFGS-B stops at once where the projected gradient at the start is at most `pgtol = 1e-5` (pydeseq2's
    gene-wise fit starts at the rough estimate, often the lower bound, where the loss is flat); otherwise the best
    point of a 96-point grid picks the basin and Newton steps kept inside its neighbouring grid cells polish it
    (halving a step that does not descend).
    """
    dtype = start.dtype
    lo, hi = jnp.log(jnp.asarray(MIN_DISP, dtype)), jnp.log(jnp.asarray(max_disp, dtype))
    grad, hess = jax.grad(loss), jax.grad(jax.grad(loss))
    x0 = jnp.clip(start, lo, hi)
    stuck = jnp.abs(jnp.clip(x0 - grad(x0), lo, hi) - x0) <= 1e-5
    grid = jnp.linspace(lo, hi, _GRID)
    values = jax.vmap(loss)(grid)
    best = jnp.argmin(jnp.where(jnp.isnan(values), jnp.inf, values))
    step = grid[1] - grid[0]
    left, right = jnp.maximum(grid[best] - step, lo), jnp.minimum(grid[best] + step, hi)

    def newton(state, _):
        x, _ = state
        g, h = grad(x), hess(x)
        target = jnp.clip(jnp.where(h > 0, x - g / h, x - jnp.sign(g) * step / 4.0), left, right)
        better = loss(target) <= loss(x)
        new = jnp.where(better, target, 0.5 * (x + target))
        return (new, jnp.abs(new - x)), None

    # up to 30 steps, stopping once a step moves log(alpha) by at most 1e-12 (Newton's fixed point, to rounding)
    start_state = (grid[best], jnp.asarray(jnp.inf, dtype))
    (x, _), _, _ = iterate(newton, start_state, lambda s: s[1] <= 1e-12, max_steps=30, early_exit=True)
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
    return jnp.clip(jnp.minimum(rde, mde), MIN_DISP, max_dispersion(m))


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
        beta, dev, _ = state
        mu = mean(beta)
        w = mu / (1.0 + mu * disp)
        z = jnp.log(mu / sf) + (counts - mu) / mu
        new = jnp.clip(jnp.linalg.solve((design.T * w[None, :]) @ design + ridge, design.T @ (w * z)), -30.0, 30.0)
        new_dev = -2.0 * nb_nll(counts, mean(new), disp)
        return (new, new_dev, jnp.abs(new_dev - dev) / (jnp.abs(new_dev) + 0.1) <= beta_tol), None

    init = (beta0, jnp.asarray(1000.0, counts.dtype), jnp.asarray(False))
    (beta, _, _), _, _ = iterate(step, init, lambda s: s[2], max_steps=max_iter, early_exit=True)
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


def _dispersion_fits(counts, design, fitted_mu, start, prior=None):
    """Gene-wise (or, with `prior=(log centres, variance)`, MAP) dispersions from `start` (log), one vmapped
    1-D fit per gene."""
    def one(y, mu, x0, centre):
        loss = lambda la: dispersion_loss(la, y, design, mu, None if prior is None else (centre, prior[1]))
        return jnp.exp(minimise_log_dispersion(loss, x0, max_disp))

    max_disp = max_dispersion(counts.shape[0])
    centres = start if prior is None else prior[0]
    return jnp.clip(jax.vmap(one)(counts.T, fitted_mu.T, start, centres), MIN_DISP, max_disp)


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


def hat_diagonals(
    beta: Float[Array, " n_vars"], sf: Float[Array, " n_samples"], design: Float[Array, "n_samples n_vars"],
    disp: Float[Array, ""],
) -> Float[Array, " n_samples"]:
    """pydeseq2's `irls_solver` leverages: $\\mathrm{diag}(W^{1/2} X (X^\\top W X + 10^{-6} I)^{-1} X^\\top W^{1/2})$
    at the fitted (floored) means."""
    mu = jnp.maximum(sf * jnp.exp(design @ beta), MIN_MU)
    w = mu / (1.0 + mu * disp)
    inv = jnp.linalg.inv((design.T * w[None, :]) @ design + 1e-6 * jnp.eye(design.shape[1], dtype=mu.dtype))
    return jnp.einsum("ij,jk,ik->i", design, inv, design) * w


def _replicates(design: Float[Array, "n_samples n_vars"]) -> Int[Array, " n_samples"]:
    """How many samples share each sample's design row (pydeseq2's `n_or_more_replicates` counts)."""
    return jnp.sum(jnp.all(design[:, None, :] == design[None, :, :], axis=-1), axis=1)


def _masked_trimmed_mean(values: Float[Array, "n_samples n_genes"], mask: Bool[Array, " n_samples"],
                         proportion: Float[Array, ""]) -> Float[Array, " n_genes"]:
    """pydeseq2's `trimmed_mean(values[mask], trim=proportion, axis=0)` (cut $\\lfloor n\\,p \\rfloor$ each end)."""
    n = jnp.sum(mask)
    s = jnp.sort(jnp.where(mask[:, None], values, jnp.inf), axis=0)
    cut = jnp.floor(n.astype(values.dtype) * proportion).astype(n.dtype)
    idx = jnp.arange(values.shape[0])
    keep = ((idx >= cut) & (idx < n - cut))[:, None]
    return jnp.sum(jnp.where(keep, s, 0.0), axis=0) / jnp.sum(keep).astype(values.dtype)


def robust_dispersions(normed: Float[Array, "n_samples n_genes"], design: Float[Array, "n_samples n_vars"]
                       ) -> Float[Array, " n_genes"]:
    """pydeseq2's `robust_method_of_moments_disp`: $\\max((v - m)/m^2, 0.04)$ with $v$ the largest trimmed variance
    over the design rows with 3 or more replicates (`trimmed_cell_variance`; all samples with `trimmed_variance`
    when there is none) and $m$ the mean."""
    same = jnp.all(design[:, None, :] == design[None, :, :], axis=-1)
    dtype = normed.dtype
    n_rep = jnp.sum(same, axis=1).astype(dtype)
    bin_ = jnp.where(n_rep >= 23.5, 2, jnp.where(n_rep >= 3.5, 1, 0))
    ratio = jnp.asarray([1 / 3, 1 / 4, 1 / 8], dtype)[bin_]
    scale = jnp.asarray([2.04, 1.86, 1.51], dtype)[bin_]

    def cell(member, r, c):  # the trimmed variance of one sample's design row
        centre = _masked_trimmed_mean(normed, member, r)
        return c * _masked_trimmed_mean((normed - centre[None, :]) ** 2, member, r)

    per_cell = jax.vmap(cell)(same, ratio, scale)
    three = n_rep >= 3
    everyone = jnp.ones(normed.shape[0], bool)
    overall = cell(everyone, jnp.asarray(0.125, dtype), jnp.asarray(1.51, dtype))
    v = jnp.where(jnp.any(three), jnp.max(jnp.where(three[:, None], per_cell, -jnp.inf), axis=0), overall)
    m = jnp.mean(normed, axis=0)
    return jnp.maximum((v - m) / m**2, 0.04)


def cooks_distances(
    counts: Float[Array, "n_samples n_genes"], sf: Float[Array, " n_samples"], design: Float[Array, "n_samples n_vars"],
    beta: Float[Array, "n_genes n_vars"], disp: Float[Array, " n_genes"],
) -> Float[Array, "n_samples n_genes"]:
    """pydeseq2's `calculate_cooks`: $(y - \\mu)^2 / ((\\mu + \\alpha_\\text{rob}\\mu^2) p) \\cdot h / (1 - h)^2$ with
    the unfloored GLM means $\\mu = s e^{X\\beta}$."""
    mu = sf[:, None] * jnp.exp(design @ beta.T)
    h = jax.vmap(lambda b, a: hat_diagonals(b, sf, design, a), out_axes=1)(beta, disp)
    robust = robust_dispersions(counts / sf[:, None], design)
    return (counts - mu) ** 2 / (mu + robust[None, :] * mu**2) / design.shape[1] * h / (1.0 - h) ** 2


def lowess(features: Float[Array, " n"], targets: Float[Array, " n"], frac: float = 2.0 / 3.0, n_iter: int = 3
           ) -> Float[Array, " n"]:
    """pydeseq2's `utils.lowess` (robust locally weighted linear regression, tricube weights, bisquare
    robustness from the median absolute residual), as it computes it."""
    n = features.shape[0]
    r = int(np.ceil(frac * n))
    h = jnp.maximum(jnp.sort(jnp.abs(features[None, :] - features[:, None]), axis=1)[:, r], 1e-12)
    w = jnp.clip(jnp.abs(jnp.nan_to_num((features[:, None] - features[None, :]) / h[None, :])), 0.0, 1.0)
    w = (1.0 - w**3) ** 3

    def fit(i, delta):
        weights = delta * w[:, i]
        b = jnp.stack([jnp.sum(weights * targets), jnp.sum(weights * targets * features)])
        a = jnp.stack([jnp.stack([jnp.sum(weights), jnp.sum(weights * features)]),
                       jnp.stack([jnp.sum(weights * features), jnp.sum(weights * features**2)])])
        coef = jnp.linalg.lstsq(a, b)[0]
        return coef[0] + coef[1] * features[i]

    def robust_pass(delta, _):
        yest = jax.vmap(fit, in_axes=(0, None))(jnp.arange(n), delta)
        residuals = targets - yest
        s = jnp.median(jnp.abs(residuals))
        d = jnp.where(s == 0, (jnp.abs(residuals) > 0).astype(targets.dtype),
                      jnp.clip(residuals / (6.0 * jnp.where(s == 0, 1.0, s)), -1.0, 1.0))
        return (1.0 - d**2) ** 2, yest

    _, fits = jax.lax.scan(robust_pass, jnp.ones(n, targets.dtype), length=n_iter)
    return fits[-1]


def independent_filtering(
    pvalue: Float[Array, " n_genes"], base_mean: Float[Array, " n_genes"], alpha: float = 0.05
) -> Float[Array, " n_genes"]:
    """pydeseq2's `DeseqStats._independent_filtering`: adjusted p-values after dropping the genes whose
    `base_mean` is below the chosen quantile (NaN for them)."""
    dtype = pvalue.dtype
    lower = jnp.mean(base_mean == 0)
    upper = jnp.where(lower < 0.95, 0.95, 1.0)
    theta = jnp.linspace(lower.astype(dtype), upper.astype(dtype), 50)
    cutoffs = jnp.quantile(base_mean, theta)
    valid = ~jnp.isnan(pvalue)
    adjusted = jax.vmap(lambda c: benjamini_hochberg(jnp.where((base_mean >= c) & valid, pvalue, jnp.nan)))(
        cutoffs)
    num_rej = jnp.sum(adjusted < alpha, axis=1).astype(dtype)
    smooth = lowess(theta, num_rej, frac=1 / 5)
    positive = num_rej > 0
    rms = jnp.sqrt(jnp.sum(jnp.where(positive, (num_rej - smooth) ** 2, 0.0)) / jnp.sum(positive).astype(dtype))
    above = num_rej > jnp.max(smooth) - rms
    j = jnp.where((jnp.max(num_rej) <= 10) | ~jnp.any(above), 0, jnp.argmax(above))
    return adjusted[j]


def _genewise(safe, sf, design, linear_mu: bool):
    """Rough dispersions, the means they start from, gene-wise dispersions (steps 2-3)."""
    normed = safe / sf[:, None]
    rough = rough_dispersions(normed, design, sf)
    if linear_mu:
        mu_hat = jnp.maximum(sf[:, None] * (design @ _least_squares(design, normed)), MIN_MU)
    else:
        mu_hat = jax.vmap(lambda y, a: irls(y, sf, design, a)[1], out_axes=1)(safe.T, rough)
    return mu_hat, _dispersion_fits(safe, design, mu_hat, jnp.log(rough))


def _map_and_lfc(safe, sf, design, mu_hat, gw, fitted, prior_var, squared_logres):
    """MAP dispersions (gene-wise kept above the trend by 2 MAD) and the NB GLM coefficients (steps 5-6)."""
    map_disp = _dispersion_fits(safe, design, mu_hat, jnp.log(fitted), prior=(jnp.log(fitted), prior_var))
    disp = jnp.where(jnp.log(gw) > jnp.log(fitted) + 2.0 * jnp.sqrt(squared_logres), gw, map_disp)
    return disp, jax.vmap(lambda y, a: irls(y, sf, design, a)[0])(safe.T, disp)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DESeq2Options:
    """pydeseq2's switches, with its defaults (`DeseqDataSet(refit_cooks, min_replicates)`,
    `DeseqStats(alpha, cooks_filter, independent_filter)`).

    - `refit_cooks` (True): replace Cook's outliers in design rows with `min_replicates` (7) or more samples and
      refit those genes.
    - `cooks_filter` (True): NaN p-values for genes with a remaining Cook's outlier.
    - `independent_filter` (True): filter on the mean of normalised counts to maximise rejections at `alpha`
      (0.05); off: BH over all tested genes.
    """

    refit_cooks: bool = True
    cooks_filter: bool = True
    independent_filter: bool = True
    alpha: float = 0.05
    min_replicates: int = 7


def _cooks_outliers(counts, cooks, refitted, replaceable, n_rep, cutoff) -> Bool[Array, " n_genes"]:
    """pydeseq2's `cooks_outlier`: a remaining Cook's distance above the cutoff in a row with 3 or more samples
    (refitted genes count 0 in replaceable rows), unless 3 or more samples have more counts than the outlier."""
    flagged = jnp.where(refitted[None, :] & replaceable[:, None], 0.0, cooks)
    outlier = jnp.any((n_rep >= 3)[:, None] & (flagged > cutoff), axis=0)
    top = jnp.take_along_axis(counts, jnp.argmax(jnp.where(jnp.isnan(cooks), -jnp.inf, cooks), axis=0)[None], 0)
    return outlier & (jnp.sum(counts > top, axis=0) < 3)


@eqx.filter_jit
def deseq2(
    counts: Float[Array, "n_samples n_genes"],
    design: Float[Array, "n_samples n_vars"],
    contrast: Float[Array, " n_vars"],
    *,
    linear_mu: bool,
    options: DESeq2Options = DESeq2Options(),
) -> DESeq2Result:
    """DESeq2 on a samples-by-genes count matrix, as pydeseq2's `DeseqDataSet` then `DeseqStats` (Wald test of
    `contrast`), with `options` (`DESeq2Options`: pydeseq2's defaults).

    **Arguments:**

    - `counts`: whole-number counts per sample (pseudobulk sums), at least one gene without zeros.
    - `design`: the design matrix (intercept column included), full column rank, more rows than columns.
    - `contrast`: the contrast vector over the design's columns.
    - `linear_mu`: the design has as many distinct rows as columns (pydeseq2 then starts from a linear
      regression, else from an IRLS fit). (Keyword only, static, as `options`.)
    """
    import scipy.stats  # the F quantile of the static shape, once at trace time

    n_samples, n_vars = design.shape
    cutoff = float(scipy.stats.f.ppf(0.99, n_vars, n_samples - n_vars))
    sf = size_factors(counts)
    base_mean = jnp.mean(counts / sf[:, None], axis=0)
    nonzero = jnp.any(counts > 0, axis=0)
    safe = jnp.where(nonzero[None, :], counts, 1.0)  # all-zero genes are fitted on ones, then reported as NaN
    mu_hat, gw = _genewise(safe, sf, design, linear_mu)
    fitted, squared_logres, prior_var, trend = _shrunk_dispersions(
        gw, jnp.where(nonzero, base_mean, 1.0), nonzero, n_samples, n_vars)
    disp, beta = _map_and_lfc(safe, sf, design, mu_hat, gw, fitted, prior_var, squared_logres)
    cooks = jnp.where(nonzero[None, :], cooks_distances(safe, sf, design, beta, disp), jnp.nan)
    n_rep = _replicates(design)
    replaceable = n_rep >= options.min_replicates
    new_zero = refitted = jnp.zeros_like(nonzero)
    if options.refit_cooks:
        outliers = cooks > cutoff
        replaced = jnp.any(outliers, axis=0) & jnp.any(replaceable)
        trimmed = _masked_trimmed_mean(counts / sf[:, None], jnp.ones(n_samples, bool), jnp.asarray(0.2, sf.dtype))
        replacement = jnp.floor(trimmed[None, :] * sf[:, None])
        new_counts = jnp.where(replaced[None, :] & replaceable[:, None] & outliers, replacement, counts)
        new_zero = replaced & jnp.all(new_counts == 0, axis=0)
        refitted = replaced & ~new_zero
        new_safe = jnp.where(refitted[None, :], new_counts, safe)
        new_mean = jnp.mean(new_counts / sf[:, None], axis=0)

        def refit(_):  # pydeseq2's `_refit_without_outliers`: the trend and prior variance are kept
            r_mu_hat, r_gw = _genewise(new_safe, sf, design, linear_mu)
            r_fitted = trend[0] + trend[1] / jnp.where(refitted, new_mean, 1.0)
            r_disp, r_beta = _map_and_lfc(new_safe, sf, design, r_mu_hat, r_gw, r_fitted, prior_var, squared_logres)
            return (jnp.where(refitted, r_gw, gw), jnp.where(refitted, r_fitted, fitted),
                    jnp.where(refitted, r_disp, disp), jnp.where(refitted[:, None], r_beta, beta))

        gw, fitted, disp, beta = jax.lax.cond(jnp.any(refitted), refit, lambda _: (gw, fitted, disp, beta), None)
        beta = jnp.where(new_zero[:, None], 0.0, beta)
        base_mean = jnp.where(refitted, new_mean, jnp.where(new_zero, 0.0, base_mean))
    mu = sf[None, :] * jnp.exp(beta @ design.T)
    pvalue, stat, se = jax.vmap(lambda b, m, a: wald_test(b, m, design, a, contrast))(beta, mu, disp)
    pvalue, stat, se = (jnp.where(new_zero, fill, v) for v, fill in ((pvalue, 1.0), (stat, 0.0), (se, 0.0)))
    nan = jnp.asarray(jnp.nan, counts.dtype)
    hide = lambda v: jnp.where(nonzero, v, nan)
    pvalue = hide(pvalue)
    if options.cooks_filter:
        pvalue = jnp.where(_cooks_outliers(counts, cooks, refitted, replaceable, n_rep, cutoff), nan, pvalue)
    padj = (independent_filtering(pvalue, base_mean, options.alpha) if options.independent_filter
            else benjamini_hochberg(pvalue))
    return DESeq2Result(
        base_mean=base_mean, log2_fold_change=hide(beta @ contrast / jnp.log(2.0)), lfc_se=hide(se / jnp.log(2.0)),
        stat=hide(stat), pvalue=pvalue, padj=padj, genewise_dispersions=hide(gw),
        fitted_dispersions=hide(fitted), dispersions=hide(disp), coefficients=jnp.where(nonzero[:, None], beta, nan),
        size_factors=sf, trend=trend, prior_disp_var=prior_var,
    )
