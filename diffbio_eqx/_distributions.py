"""Count likelihoods: negative binomial, zero-inflated negative binomial and Poisson log-probabilities.

Elementwise pure functions. Every pair of a mean-space function and a log-space one computes the same value;
the log-space forms are what the VAE uses (its decoder produces `log_softmax + log(library)`), and they are the
numerically stable ones: with `d = log(mu) - log(theta)`,

$$\\log \\mathrm{NB}(x; \\mu, \\theta) = \\log\\Gamma(x + \\theta) - \\log\\Gamma(\\theta) - \\log\\Gamma(x + 1)
    - \\theta\\,\\mathrm{softplus}(d) - x\\,\\mathrm{softplus}(-d),$$

which needs no `eps` inside logarithms (scVI adds `1e-8`), keeps `theta * log(theta / (theta + mu))` accurate when
`theta >> mu` (it is `-theta * log1p(mu / theta)`) and gives finite values and gradients at `x = 0`.

Shapes: `counts` fixes the output shape; the parameters have the same rank and may have size-1 axes that
broadcast (e.g. a `(1, n_genes)` dispersion against `(n_cells, n_genes)` counts).
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, xlogy
from jaxtyping import Array, Float


def _log_binomial_coefficient(
    counts: Float[Array, "*shape"], inverse_dispersion: Float[Array, "*#shape"]
) -> Float[Array, "*shape"]:
    """`log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1)`."""
    return gammaln(counts + inverse_dispersion) - gammaln(inverse_dispersion) - gammaln(counts + 1.0)


def negative_binomial_log_prob_logspace(
    counts: Float[Array, "*shape"],
    log_mean: Float[Array, "*#shape"],
    log_inverse_dispersion: Float[Array, "*#shape"],
) -> Float[Array, "*shape"]:
    """Negative binomial log-probability from the log mean and the log inverse dispersion.

    $\\mathrm{NB}(x; \\mu, \\theta)$ has mean $\\mu$ and variance $\\mu + \\mu^2 / \\theta$.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `log_mean`: $\\log \\mu$.
    - `log_inverse_dispersion`: $\\log \\theta$.

    **Returns:** $\\log \\mathrm{NB}(x; \\mu, \\theta)$, the shape of `counts`.
    """
    theta = jnp.exp(log_inverse_dispersion)
    d = log_mean - log_inverse_dispersion
    return (
        _log_binomial_coefficient(counts, theta)
        - theta * jax.nn.softplus(d)
        - counts * jax.nn.softplus(-d)
    )


def negative_binomial_log_prob(
    counts: Float[Array, "*shape"],
    mean: Float[Array, "*#shape"],
    inverse_dispersion: Float[Array, "*#shape"],
) -> Float[Array, "*shape"]:
    """Negative binomial log-probability with mean $\\mu$ and inverse dispersion $\\theta$.

    Equals `scipy.stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))`.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `mean`: $\\mu \\ge 0$ (a zero mean gives probability one to $x = 0$).
    - `inverse_dispersion`: $\\theta > 0$.

    **Returns:** $\\log \\mathrm{NB}(x; \\mu, \\theta)$, the shape of `counts`.
    """
    theta = inverse_dispersion
    return (
        _log_binomial_coefficient(counts, theta)
        - theta * jnp.log1p(mean / theta)
        + xlogy(counts, mean / (mean + theta))
    )


def zero_inflated_negative_binomial_log_prob_logspace(
    counts: Float[Array, "*shape"],
    log_mean: Float[Array, "*#shape"],
    log_inverse_dispersion: Float[Array, "*#shape"],
    zero_logits: Float[Array, "*#shape"],
) -> Float[Array, "*shape"]:
    """Zero-inflated negative binomial log-probability (scVI's ZINB), log-space parameters.

    With dropout probability $\\pi = \\sigma(\\text{zero\\_logits})$:
    $p(0) = \\pi + (1 - \\pi)\\,\\mathrm{NB}(0)$ and $p(x) = (1 - \\pi)\\,\\mathrm{NB}(x)$ for $x > 0$. The zero
    case is evaluated as `logaddexp(logits, log NB(0)) - softplus(logits)`.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `log_mean`, `log_inverse_dispersion`: $\\log \\mu$ and $\\log \\theta$ of the negative binomial part.
    - `zero_logits`: the logits of the dropout probability $\\pi$.

    **Returns:** the log-probability, the shape of `counts`.
    """
    theta = jnp.exp(log_inverse_dispersion)
    d = log_mean - log_inverse_dispersion
    log_nb_zero = -theta * jax.nn.softplus(d)
    log_not_dropout = -jax.nn.softplus(zero_logits)
    case_zero = jnp.logaddexp(zero_logits, log_nb_zero) + log_not_dropout
    case_nonzero = (
        log_not_dropout + _log_binomial_coefficient(counts, theta) + log_nb_zero - counts * jax.nn.softplus(-d)
    )
    return jnp.where(counts == 0, case_zero, case_nonzero)


def zero_inflated_negative_binomial_log_prob(
    counts: Float[Array, "*shape"],
    mean: Float[Array, "*#shape"],
    inverse_dispersion: Float[Array, "*#shape"],
    zero_logits: Float[Array, "*#shape"],
) -> Float[Array, "*shape"]:
    """Zero-inflated negative binomial log-probability with mean $\\mu$ and inverse dispersion $\\theta$.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `mean`: $\\mu > 0$.
    - `inverse_dispersion`: $\\theta > 0$.
    - `zero_logits`: the logits of the dropout probability.

    **Returns:** the log-probability, the shape of `counts`.
    """
    return zero_inflated_negative_binomial_log_prob_logspace(
        counts, jnp.log(mean), jnp.log(inverse_dispersion), zero_logits
    )


def poisson_log_prob_logspace(
    counts: Float[Array, "*shape"], log_rate: Float[Array, "*#shape"]
) -> Float[Array, "*shape"]:
    """Poisson log-probability from the log rate: $x \\log\\lambda - \\lambda - \\log\\Gamma(x + 1)$.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `log_rate`: $\\log \\lambda$.

    **Returns:** the log-probability, the shape of `counts`.
    """
    return counts * log_rate - jnp.exp(log_rate) - gammaln(counts + 1.0)


def poisson_log_prob(
    counts: Float[Array, "*shape"], rate: Float[Array, "*#shape"]
) -> Float[Array, "*shape"]:
    """Poisson log-probability with rate $\\lambda \\ge 0$; equals `scipy.stats.poisson.logpmf`.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `rate`: $\\lambda \\ge 0$.

    **Returns:** the log-probability, the shape of `counts`.
    """
    return xlogy(counts, rate) - rate - gammaln(counts + 1.0)
