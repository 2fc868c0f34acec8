"""Ambient RNA removal maths (CellBender's "ambient" model, Fleming et al. 2023), as pure functions.

Each droplet's counts are a cell's counts plus ambient RNA (free-floating transcripts from lysed cells):

$$x_{ng} \\sim \\mathrm{NB}\\big(\\mu_{ng} + \\lambda_{ng},\\ \\theta_g\\big), \\qquad
\\mu_{ng} = (1 - f_n)\\,T_n\\,\\chi_g(z_n), \\qquad \\lambda_{ng} = f_n\\,T_n\\,a_g,$$

where $T_n$ is the droplet's observed total, $f_n$ its ambient (contamination) fraction, $\\chi(z_n) =
\\mathrm{softmax}(\\mathrm{decoder}(z_n))$ the cell's expression profile, and $a$ the ambient profile. In
CellBender's words, $(1 - f_n) T_n$ is the efficiency times the cell size and $f_n T_n$ the ambient size; with
the total observed, efficiency and cell size are one scale. Every rate is handled in log space.

The fraction's prior (`log_prior_fraction`) is CellBender's: the ambient count $f_n T_n$ is log-normal around
the typical empty droplet's total; without empty droplets, a Beta prior with mode 0.

Given the rates, the cell's share of an observed count is the thinning posterior mean
$\\mathbb{E}[c_{ng} \\mid x_{ng}] = x_{ng}\\,\\mu_{ng} / (\\mu_{ng} + \\lambda_{ng})$ (exact for Poisson
components), which is non-negative and never above $x_{ng}$.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._core._distributions import negative_binomial_log_prob_logspace


def log_fractions(
    logit_fraction: Float[Array, "*batch"],
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"]]:
    """`(log f, log(1 - f))` for `f = sigmoid(logit_fraction)`, without cancellation at either end."""
    return -jax.nn.softplus(-logit_fraction), -jax.nn.softplus(logit_fraction)


def safe_log_profile(ambient_profile: Float[Array, " n_genes"]) -> Float[Array, " n_genes"]:
    """Log of a non-negative profile normalised to sum to one; zeros map to a large finite negative number."""
    profile = ambient_profile / jnp.sum(ambient_profile)
    return jnp.log(jnp.maximum(profile, jnp.finfo(profile.dtype).tiny))


def ambient_log_rates(
    log_total: Float[Array, " n_cells"],
    logit_fraction: Float[Array, " n_cells"],
    log_cell_profile: Float[Array, "n_cells n_genes"],
    log_ambient_profile: Float[Array, " n_genes"],
) -> tuple[Float[Array, "n_cells n_genes"], Float[Array, "n_cells n_genes"]]:
    """The log cell rate $\\log\\mu$ and log ambient rate $\\log\\lambda$ of every count.

    **Arguments:**

    - `log_total`: `(n_cells,)` log of each droplet's expected total $T_n$.
    - `logit_fraction`: `(n_cells,)` logit of the ambient fraction $f_n$.
    - `log_cell_profile`: `(n_cells, n_genes)` $\\log\\chi$ (a log-softmax: each row exponentiates to one).
    - `log_ambient_profile`: `(n_genes,)` $\\log a$ (see `safe_log_profile`).

    **Returns:** `(log_cell_rate, log_ambient_rate)`, each `(n_cells, n_genes)`.
    """
    log_f, log_1mf = log_fractions(logit_fraction)
    log_cell_rate = (log_1mf + log_total)[:, None] + log_cell_profile
    log_ambient_rate = (log_f + log_total)[:, None] + log_ambient_profile[None, :]
    return log_cell_rate, log_ambient_rate


def ambient_count_log_likelihood(
    counts: Float[Array, "n_cells n_genes"],
    log_cell_rate: Float[Array, "n_cells n_genes"],
    log_ambient_rate: Float[Array, "n_cells n_genes"],
    log_inverse_dispersion: Float[Array, " n_genes"],
    log_factorial: Float[Array, " n_cells"] | None = None,
) -> Float[Array, " n_cells"]:
    """Per-cell $\\sum_g \\log\\mathrm{NB}(x_{ng}; \\mu_{ng} + \\lambda_{ng}, \\theta_g)$.

    `log_factorial`, if given, is each cell's precomputed $\\sum_g \\log\\Gamma(x_{ng} + 1)$ (a constant of the
    data, `log_factorial_per_cell`): the same value without one `lgamma` per count in the training step.
    """
    log_mean = jnp.logaddexp(log_cell_rate, log_ambient_rate)
    per_gene = negative_binomial_log_prob_logspace(counts, log_mean, log_inverse_dispersion[None, :],
                                                   include_log_factorial=log_factorial is None)
    total = jnp.sum(per_gene, axis=-1)
    return total if log_factorial is None else total - log_factorial.astype(total.dtype)


def cell_share(
    log_cell_rate: Float[Array, "n_cells n_genes"], log_ambient_rate: Float[Array, "n_cells n_genes"]
) -> Float[Array, "n_cells n_genes"]:
    """$\\mu / (\\mu + \\lambda) = \\sigma(\\log\\mu - \\log\\lambda)$: the probability that a molecule is the
    cell's."""
    return jax.nn.sigmoid(log_cell_rate - log_ambient_rate)


def posterior_cell_counts(
    counts: Float[Array, "n_cells n_genes"],
    log_cell_rate: Float[Array, "n_cells n_genes"],
    log_ambient_rate: Float[Array, "n_cells n_genes"],
) -> Float[Array, "n_cells n_genes"]:
    """Posterior expected cell counts $x\\,\\mu / (\\mu + \\lambda)$: in `[0, counts]` elementwise."""
    return counts * cell_share(log_cell_rate, log_ambient_rate)


def round_cell_counts(
    counts: Float[Array, "n_cells n_genes"], cell_counts: Float[Array, "n_cells n_genes"]
) -> Float[Array, "n_cells n_genes"]:
    """Whole-number cell counts: `cell_counts` rounded to nearest, capped at `floor(counts)`.

    Since `0 <= cell_counts <= counts`, the result stays in `[0, counts]`; for integer counts the cap never binds.
    """
    return jnp.minimum(jnp.round(cell_counts), jnp.floor(counts))


def contamination_fraction(
    counts: Float[Array, "n_cells n_genes"], cell_counts: Float[Array, "n_cells n_genes"]
) -> Float[Array, " n_cells"]:
    """Share of each droplet's counts that is removed: $1 - \\sum_g c_{ng} / \\sum_g x_{ng}$ (0 for an empty row)."""
    total = jnp.sum(counts, axis=-1)
    removed = jnp.sum(counts - cell_counts, axis=-1)
    return jnp.where(total > 0, removed / jnp.where(total > 0, total, 1.0), jnp.zeros_like(total))


def gaussian_kl_to_prior(
    mean: Float[Array, "n_cells n_dims"],
    log_variance: Float[Array, "n_cells n_dims"],
    prior_mean: Float[Array, "#n_cells #n_dims"],
    prior_log_variance: Float[Array, "#n_cells #n_dims"],
) -> Float[Array, " n_cells"]:
    """Per-cell $\\mathrm{KL}(N(m, v) \\,\\|\\, N(m_0, v_0)) = \\frac12\\sum_k
    [\\log(v_0/v) + (v + (m - m_0)^2)/v_0 - 1]$."""
    ratio = jnp.exp(log_variance - prior_log_variance)
    gap = (mean - prior_mean) ** 2 * jnp.exp(-prior_log_variance)
    return 0.5 * jnp.sum(ratio + gap - 1.0 - (log_variance - prior_log_variance), axis=-1)


def log_prior_fraction(
    logit_fraction: Float[Array, " n_cells"],
    log_total: Float[Array, " n_cells"],
    prior_contamination: Float[Array, ""],
    prior_ambient_count: Float[Array, ""],
    prior_log_scale: Float[Array, ""],
) -> Float[Array, " n_cells"]:
    """Log prior density of each droplet's ambient fraction $f_n$ (up to a constant), in one of two forms.

    - **From the empty droplets** (`prior_ambient_count > 0`), CellBender's prior: the droplet's ambient count
      $d_n = f_n T_n$ is log-normal around the typical empty droplet's total $d_0$,
      $\\log d_n \\sim N(\\log d_0, s^2)$. A droplet's ambient RNA is about a fixed number of molecules, so its
      fraction is about $d_0 / T_n$.
    - **Without them**: $f_n \\sim \\mathrm{Beta}(1, 1/p - 1)$, with mean $p$ = `prior_contamination` and mode
      0, i.e. $\\log p(f) = (1/p - 2) \\log(1 - f)$: with no evidence in the counts the fraction shrinks to 0.

    **Arguments:**

    - `logit_fraction`: `(n_cells,)` $\\mathrm{logit} f_n$.
    - `log_total`: `(n_cells,)` $\\log T_n$, the droplets' observed totals.
    - `prior_contamination`: $p$, used when `prior_ambient_count <= 0`.
    - `prior_ambient_count`: $d_0$ (0 selects the Beta prior).
    - `prior_log_scale`: $s$.

    **Returns:** `(n_cells,)` the log prior densities (of $\\log d_n$, or of $f_n$).
    """
    log_f, log_1mf = log_fractions(logit_fraction)
    has_count = prior_ambient_count > 0
    log_d0 = jnp.log(jnp.where(has_count, prior_ambient_count, 1.0))
    log_normal = -0.5 * ((log_f + log_total - log_d0) / prior_log_scale) ** 2
    beta = (1.0 / prior_contamination - 2.0) * log_1mf
    return jnp.where(has_count, log_normal, beta)


def prior_logit_fraction(
    log_total: Float[Array, " n_cells"], prior_contamination: Float[Array, ""], prior_ambient_count: Float[Array, ""]
) -> Float[Array, " n_cells"]:
    """The logit of each droplet's prior ambient fraction (see `log_prior_fraction`): $d_0 / T_n$ (kept in
    $[10^{-4}, 0.9]$) with a prior ambient count, else the prior mean $p$; the encoder predicts offsets from it."""
    has_count = prior_ambient_count > 0
    log_d0 = jnp.log(jnp.where(has_count, prior_ambient_count, 1.0))
    fraction = jnp.where(has_count, jnp.clip(jnp.exp(log_d0 - log_total), 1e-4, 0.9), prior_contamination)
    return jnp.log(fraction) - jnp.log1p(-fraction)


def refine_logit_fraction(
    counts: Float[Array, "n_cells n_genes"],
    log_cell_profile: Float[Array, "n_cells n_genes"],
    log_ambient_profile: Float[Array, " n_genes"],
    logit_fraction: Float[Array, " n_cells"],
    *,
    n_steps: int,
    log_prior: Callable[[Float[Array, " n_cells"]], Float[Array, " n_cells"]] | None = None,
    n_newton: int = 4,
) -> tuple[Float[Array, " n_cells"], Float[Array, "n_steps n_cells"]]:
    """Maximum-likelihood (or, with `log_prior`, maximum a posteriori) ambient fraction of each droplet given
    its cell profile, by EM (`lax.scan`).

    With the profiles fixed, a droplet's molecules are a two-component multinomial mixture with weights
    $(1 - f, f)$. The E-step gives each gene's ambient responsibility $r_g = \\lambda_g / (\\mu_g + \\lambda_g)$
    and the expected ambient molecules $A = \\sum_g x_g r_g$; the M-step maximises
    $A \\log f + (T - A) \\log(1 - f) + \\log p(f)$. Without a prior that is $f = A / T$; with one, a few
    safeguarded Newton steps in $\\mathrm{logit} f$ (the objective is concave for the priors of
    `log_prior_fraction`). Each step increases the (penalised) likelihood. At the maximum-likelihood fixed point,
    $f$ equals the removed share of the droplet's counts (`contamination_fraction` of `posterior_cell_counts`).
    This closes the amortisation gap of the encoder's estimate, which is the starting point.

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` observed counts.
    - `log_cell_profile`: `(n_cells, n_genes)` the cells' log expression profiles (each row a log-softmax).
    - `log_ambient_profile`: `(n_genes,)` log ambient profile.
    - `logit_fraction`: `(n_cells,)` the starting logits.
    - `n_steps`: number of EM steps. (Keyword only argument.)
    - `log_prior`: per-droplet log prior density of the logits (elementwise), or None for maximum likelihood.
    - `n_newton`: Newton steps per M-step when there is a prior.

    **Returns:** `(logit_fraction, trace)`: the final logits and `(n_steps, n_cells)` the ambient fraction after
    each step.
    """
    total = jnp.sum(counts, axis=-1)
    safe_total = jnp.where(total > 0, total, 1.0)
    log_total = jnp.zeros_like(total)  # the scale cancels in the responsibilities
    tiny = jnp.finfo(counts.dtype).tiny
    eps = jnp.finfo(counts.dtype).eps

    def objective(logit: Float[Array, " n_cells"], ambient: Float[Array, " n_cells"]) -> Float[Array, ""]:
        log_f, log_1mf = log_fractions(logit)
        assert log_prior is not None
        return jnp.sum(ambient * log_f + (total - ambient) * log_1mf + log_prior(logit))

    gradient = jax.grad(objective)
    curvature = jax.grad(lambda logit, ambient: jnp.sum(gradient(logit, ambient)))

    def newton(
        logit: Float[Array, " n_cells"], ambient: Float[Array, " n_cells"]
    ) -> Float[Array, " n_cells"]:
        g, h = gradient(logit, ambient), curvature(logit, ambient)
        step = jnp.where(h < 0, -g / jnp.where(h < 0, h, -1.0), jnp.sign(g))
        return logit + jnp.clip(step, -2.0, 2.0)

    def step(logit: Float[Array, " n_cells"], _: None) -> tuple[Float[Array, " n_cells"], Float[Array, " n_cells"]]:
        log_cell_rate, log_ambient_rate = ambient_log_rates(log_total, logit, log_cell_profile, log_ambient_profile)
        ambient = jnp.sum(counts * cell_share(log_ambient_rate, log_cell_rate), axis=-1)
        fraction = jnp.clip(ambient / safe_total, eps, 1.0 - eps)
        new_logit = jnp.log(jnp.maximum(fraction, tiny)) - jnp.log1p(-fraction)
        if log_prior is not None:
            new_logit = jax.lax.fori_loop(0, n_newton, lambda _, u: newton(u, ambient), new_logit)
        return new_logit, jax.nn.sigmoid(new_logit)

    return jax.lax.scan(step, logit_fraction, None, length=n_steps)
