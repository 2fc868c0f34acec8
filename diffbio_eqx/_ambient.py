"""Ambient RNA removal maths (CellBender's "ambient" model, Fleming et al. 2023), as pure functions.

Each droplet's counts are a cell's counts plus ambient RNA (free-floating transcripts from lysed cells):

$$x_{ng} \\sim \\mathrm{NB}\\big(\\mu_{ng} + \\lambda_{ng},\\ \\theta_g\\big), \\qquad
\\mu_{ng} = (1 - f_n)\\,T_n\\,\\chi_g(z_n), \\qquad \\lambda_{ng} = f_n\\,T_n\\,a_g,$$

where $T_n$ is the droplet's observed total, $f_n$ its ambient (contamination) fraction, $\\chi(z_n) =
\\mathrm{softmax}(\\mathrm{decoder}(z_n))$ the cell's expression profile, and $a$ the ambient profile. In
CellBender's words, $(1 - f_n) T_n$ is the efficiency times the cell size and $f_n T_n$ the ambient size; with
the total observed, efficiency and cell size are one scale. Every rate is handled in log space.

Given the rates, the cell's share of an observed count is the thinning posterior mean
$\\mathbb{E}[c_{ng} \\mid x_{ng}] = x_{ng}\\,\\mu_{ng} / (\\mu_{ng} + \\lambda_{ng})$ (exact for Poisson
components), which is non-negative and never above $x_{ng}$.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._distributions import negative_binomial_log_prob_logspace


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
) -> Float[Array, " n_cells"]:
    """Per-cell $\\sum_g \\log\\mathrm{NB}(x_{ng}; \\mu_{ng} + \\lambda_{ng}, \\theta_g)$."""
    log_mean = jnp.logaddexp(log_cell_rate, log_ambient_rate)
    per_gene = negative_binomial_log_prob_logspace(counts, log_mean, log_inverse_dispersion[None, :])
    return jnp.sum(per_gene, axis=-1)


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


def gaussian_negative_log_density(
    x: Float[Array, " n_cells"], mean: Float[Array, ""], log_variance: Float[Array, ""]
) -> Float[Array, " n_cells"]:
    """$-\\log N(x; m, v) = \\frac12[(x - m)^2 / v + \\log v + \\log 2\\pi]$."""
    return 0.5 * ((x - mean) ** 2 * jnp.exp(-log_variance) + log_variance + jnp.log(2.0 * jnp.pi).astype(x.dtype))


def refine_logit_fraction(
    counts: Float[Array, "n_cells n_genes"],
    log_cell_profile: Float[Array, "n_cells n_genes"],
    log_ambient_profile: Float[Array, " n_genes"],
    logit_fraction: Float[Array, " n_cells"],
    *,
    n_steps: int,
) -> tuple[Float[Array, " n_cells"], Float[Array, "n_steps n_cells"]]:
    """Maximum-likelihood ambient fraction of each droplet given its cell profile, by EM (`lax.scan`).

    With the profiles fixed, a droplet's molecules are a two-component multinomial mixture with weights
    $(1 - f, f)$, so EM's update is $f \\leftarrow \\sum_g x_g r_g / \\sum_g x_g$ with
    $r_g = \\lambda_g / (\\mu_g + \\lambda_g)$; each step increases the likelihood. At the fixed point, $f$ equals
    the removed share of the droplet's counts (`contamination_fraction` of `posterior_cell_counts`). This
    closes the amortisation gap of the encoder's estimate, which is the starting point.

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` observed counts.
    - `log_cell_profile`: `(n_cells, n_genes)` the cells' log expression profiles (each row a log-softmax).
    - `log_ambient_profile`: `(n_genes,)` log ambient profile.
    - `logit_fraction`: `(n_cells,)` the starting logits.
    - `n_steps`: number of EM steps. (Keyword only argument.)

    **Returns:** `(logit_fraction, trace)`: the final logits and `(n_steps, n_cells)` the ambient fraction after
    each step.
    """
    total = jnp.sum(counts, axis=-1)
    safe_total = jnp.where(total > 0, total, 1.0)
    log_total = jnp.zeros_like(total)  # the scale cancels in the responsibilities
    tiny = jnp.finfo(counts.dtype).tiny
    eps = jnp.finfo(counts.dtype).eps

    def step(logit: Float[Array, " n_cells"], _: None) -> tuple[Float[Array, " n_cells"], Float[Array, " n_cells"]]:
        log_cell_rate, log_ambient_rate = ambient_log_rates(log_total, logit, log_cell_profile, log_ambient_profile)
        ambient = jnp.sum(counts * cell_share(log_ambient_rate, log_cell_rate), axis=-1)
        fraction = jnp.clip(ambient / safe_total, eps, 1.0 - eps)
        new_logit = jnp.log(jnp.maximum(fraction, tiny)) - jnp.log1p(-fraction)
        return new_logit, fraction

    return jax.lax.scan(step, logit_fraction, None, length=n_steps)
