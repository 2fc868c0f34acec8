"""Count likelihoods (negative binomial, zero-inflated negative binomial, Poisson), a cell's log library size,
the Gaussian reparameterisation the count VAEs (scVI's, the ambient model's) share, and the one host-side
helper their training loops share: each cell's log-factorial constant (`log_factorial_per_cell`).

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

import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.scipy.special import gammaln, xlogy
from jaxtyping import Array, Float, PRNGKeyArray

from ._random import normal


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@jax.custom_jvp
def log_gamma_positive(z: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """$\\log\\Gamma(z)$ for $z > 0$, with a fused derivative; the likelihoods' hot path.

    Stirling's series at $w = z + 6$ (terms to $w^{-7}$; truncation error below $10^{-10}$) and the recurrence
    $\\log\\Gamma(z) = \\log\\Gamma(z + 6) - \\log\\prod_{k=0}^{5}(z + k)$. No reflection branch is needed for
    positive arguments, which makes value plus derivative about 2.5x cheaper than XLA's `lgamma` + `digamma`
    on CPU, at the same accuracy (float64: within 4e-9 absolute of `scipy.special.gammaln` up to $z = 2 \\cdot
    10^6$, i.e. rounding of the result).
    """
    w = z + 6.0
    r = 1.0 / w
    r2 = r * r
    series = r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 * (1.0 / 1680))))
    # log prod_k (z + k) = 6 log w + log prod_k ((z + k) / w): the scaled factors lie in (0, 1], so the product
    # neither overflows for large z nor needs a second logarithm.
    scaled = (z * r) * ((z + 1.0) * r) * ((z + 2.0) * r) * ((z + 3.0) * r) * ((z + 4.0) * r) * ((z + 5.0) * r)
    return (w - 6.5) * jnp.log(w) - w + _HALF_LOG_2PI + series - jnp.log(scaled)


def digamma_positive(z: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """$\\psi(z) = \\frac{d}{dz}\\log\\Gamma(z)$ for $z > 0$ (asymptotic series at $z + 6$ and the recurrence)."""
    w = z + 6.0
    r = 1.0 / w
    r2 = r * r
    series = r2 * (1.0 / 12 - r2 * (1.0 / 120 - r2 * (1.0 / 252 - r2 * (1.0 / 240))))
    # sum_{k=0}^{5} 1/(z+k), paired so that each pair shares its numerator 2z + 5.
    pairs = 1.0 / (z * (z + 5.0)) + 1.0 / ((z + 1.0) * (z + 4.0)) + 1.0 / ((z + 2.0) * (z + 3.0))
    return jnp.log(w) - 0.5 * r - series - (2.0 * z + 5.0) * pairs


@log_gamma_positive.defjvp
def _log_gamma_positive_jvp(primals, tangents):
    (z,), (tangent,) = primals, tangents
    return log_gamma_positive(z), digamma_positive(z) * tangent


def _log_binomial_coefficient(
    counts: Float[Array, "*shape"], inverse_dispersion: Float[Array, "*#shape"]
) -> Float[Array, "*shape"]:
    """`log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1)`."""
    return (
        log_gamma_positive(counts + inverse_dispersion)
        - log_gamma_positive(inverse_dispersion)
        - gammaln(counts + 1.0)
    )


def negative_binomial_log_prob_logspace(
    counts: Float[Array, "*shape"],
    log_mean: Float[Array, "*#shape"],
    log_inverse_dispersion: Float[Array, "*#shape"],
    *,
    include_log_factorial: bool = True,
) -> Float[Array, "*shape"]:
    """Negative binomial log-probability from the log mean and the log inverse dispersion.

    $\\mathrm{NB}(x; \\mu, \\theta)$ has mean $\\mu$ and variance $\\mu + \\mu^2 / \\theta$.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `log_mean`: $\\log \\mu$ (finite).
    - `log_inverse_dispersion`: $\\log \\theta$.
    - `include_log_factorial`: False drops the $-\\log\\Gamma(x + 1)$ term, which does not depend on the
      parameters (a training loop can add its precomputed per-cell sum instead). (Keyword only argument.)

    **Returns:** $\\log \\mathrm{NB}(x; \\mu, \\theta)$, the shape of `counts`.
    """
    theta = jnp.exp(log_inverse_dispersion)
    d = log_mean - log_inverse_dispersion
    # -theta softplus(d) - x softplus(-d), with softplus(-d) = softplus(d) - d: one softplus per element.
    value = (
        log_gamma_positive(counts + theta) - log_gamma_positive(theta) - (theta + counts) * jax.nn.softplus(d)
        + counts * d
    )
    return value - gammaln(counts + 1.0) if include_log_factorial else value


def _softmax_negative_binomial_parts(
    counts: Float[Array, "n_cells n_genes"],
    logits: Float[Array, "n_cells n_genes"],
    log_library: Float[Array, " n_cells"],
    log_inverse_dispersion: Float[Array, "#n_cells n_genes"],
) -> tuple[Array, ...]:
    theta = jnp.exp(log_inverse_dispersion)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp_shifted = jnp.exp(shifted)
    row_total = jnp.sum(exp_shifted, axis=-1, keepdims=True)
    log_scale = log_library[:, None] - jnp.log(row_total)
    # mu / theta from the softmax numerator: softplus(d) = log1p(mu / theta) costs one log1p and no exp per count.
    mean_over_theta = exp_shifted * (jnp.exp(log_scale) / theta)
    softplus_d = jnp.log1p(mean_over_theta)
    d = shifted + log_scale - log_inverse_dispersion
    value = jnp.sum(
        log_gamma_positive(counts + theta) - log_gamma_positive(theta) - (theta + counts) * softplus_d + counts * d,
        axis=-1,
    )
    return value, theta, exp_shifted / row_total, mean_over_theta, softplus_d, d


@jax.custom_jvp
def softmax_negative_binomial_log_likelihood(
    counts: Float[Array, "n_cells n_genes"],
    logits: Float[Array, "n_cells n_genes"],
    log_library: Float[Array, " n_cells"],
    log_inverse_dispersion: Float[Array, "#n_cells n_genes"],
) -> Float[Array, " n_cells"]:
    """Per-cell NB log-likelihood of scVI's decoder output, with a fused derivative; the VAE's training hot path.

    The mean is $\\mu = \\ell \\cdot \\mathrm{softmax}(\\text{logits})$ with library size $\\ell$, and the value is
    $\\sum_g \\log \\mathrm{NB}(x_g; \\mu_g, \\theta_g)$ without the $-\\log\\Gamma(x_g + 1)$ terms, i.e.
    `negative_binomial_log_prob_logspace(counts, log_softmax(logits) + log_library[:, None],
    log_inverse_dispersion, include_log_factorial=False).sum(-1)`. The hand-written JVP (linear in the tangents,
    so reverse mode and higher derivatives work) shares the softmax, $\\mu/\\theta$ and $\\mathrm{softplus}(d)$
    between value and derivative and skips derivatives of inputs that are not differentiated; on CPU it made a
    VAE training step about 15 % faster than differentiating the composition.

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` observed counts.
    - `logits`: `(n_cells, n_genes)` decoder outputs before the softmax over genes.
    - `log_library`: `(n_cells,)` log library sizes.
    - `log_inverse_dispersion`: $\\log\\theta$, `(1, n_genes)` or `(n_cells, n_genes)`.

    **Returns:** `(n_cells,)` log-likelihoods up to the log-factorial constant.
    """
    return _softmax_negative_binomial_parts(counts, logits, log_library, log_inverse_dispersion)[0]


def _softmax_negative_binomial_jvp(primals, tangents):
    counts, logits, log_library, log_inverse_dispersion = primals
    d_counts, d_logits, d_log_library, d_log_theta = tangents
    value, theta, probabilities, mean_over_theta, softplus_d, d = _softmax_negative_binomial_parts(*primals)
    # q = sigmoid(d) = mu / (mu + theta); dL/dlog(mu) = x - (theta + x) q.
    q = mean_over_theta / (1.0 + mean_over_theta)
    d_log_mean = counts - (theta + counts) * q
    tangent = jnp.zeros_like(value)
    if not isinstance(d_logits, SymbolicZero):
        tangent = tangent + jnp.sum(d_log_mean * d_logits, axis=-1) - jnp.sum(d_log_mean, axis=-1) * jnp.sum(
            probabilities * d_logits, axis=-1
        )
    if not isinstance(d_log_library, SymbolicZero):
        tangent = tangent + jnp.sum(d_log_mean, axis=-1) * d_log_library
    if not isinstance(d_log_theta, SymbolicZero):
        d_theta_term = (
            theta * (digamma_positive(counts + theta) - digamma_positive(theta) - softplus_d)
            + (theta + counts) * q - counts
        )
        tangent = tangent + jnp.sum(d_theta_term * d_log_theta, axis=-1)
    if not isinstance(d_counts, SymbolicZero):
        tangent = tangent + jnp.sum((digamma_positive(counts + theta) - softplus_d + d) * d_counts, axis=-1)
    return value, tangent


# Symbolic zeros: tangents of inputs that are not differentiated (counts, library) cost nothing.
softmax_negative_binomial_log_likelihood.defjvp(_softmax_negative_binomial_jvp, symbolic_zeros=True)


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
    *,
    include_log_factorial: bool = True,
) -> Float[Array, "*shape"]:
    """Zero-inflated negative binomial log-probability (scVI's ZINB), log-space parameters.

    With dropout probability $\\pi = \\sigma(\\text{zero\\_logits})$:
    $p(0) = \\pi + (1 - \\pi)\\,\\mathrm{NB}(0)$ and $p(x) = (1 - \\pi)\\,\\mathrm{NB}(x)$ for $x > 0$. The zero
    case is evaluated as `logaddexp(logits, log NB(0)) - softplus(logits)`.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `log_mean`, `log_inverse_dispersion`: $\\log \\mu$ (finite) and $\\log \\theta$ of the negative binomial part.
    - `zero_logits`: the logits of the dropout probability $\\pi$.
    - `include_log_factorial`: as in `negative_binomial_log_prob_logspace` ($\\log\\Gamma(0 + 1) = 0$, so the
      zero case is unaffected). (Keyword only argument.)

    **Returns:** the log-probability, the shape of `counts`.
    """
    theta = jnp.exp(log_inverse_dispersion)
    d = log_mean - log_inverse_dispersion
    softplus_d = jax.nn.softplus(d)
    log_nb_zero = -theta * softplus_d
    log_not_dropout = -jax.nn.softplus(zero_logits)
    case_zero = jnp.logaddexp(zero_logits, log_nb_zero) + log_not_dropout
    case_nonzero = (
        log_not_dropout + log_gamma_positive(counts + theta) - log_gamma_positive(theta)
        - (theta + counts) * softplus_d + counts * d
    )
    if include_log_factorial:
        case_nonzero = case_nonzero - gammaln(counts + 1.0)
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
    counts: Float[Array, "*shape"],
    log_rate: Float[Array, "*#shape"],
    *,
    include_log_factorial: bool = True,
) -> Float[Array, "*shape"]:
    """Poisson log-probability from the log rate: $x \\log\\lambda - \\lambda - \\log\\Gamma(x + 1)$.

    **Arguments:**

    - `counts`: the observed counts $x \\ge 0$.
    - `log_rate`: $\\log \\lambda$ (finite).
    - `include_log_factorial`: as in `negative_binomial_log_prob_logspace`. (Keyword only argument.)

    **Returns:** the log-probability, the shape of `counts`.
    """
    value = counts * log_rate - jnp.exp(log_rate)
    return value - gammaln(counts + 1.0) if include_log_factorial else value


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


def log_factorial_per_cell(counts: Any, *, block_rows: int = 8192) -> np.ndarray:
    """Host-side $\\sum_g \\log\\Gamma(x_g + 1)$ per cell for dense or SciPy sparse counts (float64).

    Whole-number counts go through a table of $\\log k!$ (fast); other values through `scipy.special.gammaln`.
    """
    import scipy.sparse as sp
    import scipy.special

    def log_factorial(values: np.ndarray) -> np.ndarray:
        top = float(values.max(initial=0.0))
        if top <= 1e6 and np.array_equal(values, np.floor(values)):
            table = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(top) + 1, dtype=np.float64)))])
            return table[values.astype(np.int64)]
        return scipy.special.gammaln(values.astype(np.float64) + 1.0)

    if sp.issparse(counts):
        # Row blocks bound the float64 temporaries (at a million cells the whole `data` would be GBs).
        csr = sp.csr_matrix(counts)
        n_rows = cast(tuple[int, int], csr.shape)[0]  # scipy infers shape as possibly None
        totals = np.empty(n_rows)
        for start in range(0, n_rows, block_rows):
            block = csr[start : start + block_rows]
            values = log_factorial(block.data)
            block_totals = sp.csr_matrix((values, block.indices, block.indptr), shape=block.shape).sum(axis=1)
            totals[start : start + block.shape[0]] = np.asarray(block_totals).ravel()
        return totals
    dense = np.asarray(counts)
    # By blocks of rows too: the table lookup holds int64 indices and float64 values per entry, which for a whole
    # 100k x 2,000 matrix is 3.2 GB of temporaries (the peak memory of `fit_vae` on such data).
    rows = max(1, 2**22 // max(dense.shape[1] if dense.ndim == 2 else 1, 1))
    return np.concatenate([log_factorial(dense[i : i + rows]).sum(axis=1) for i in range(0, dense.shape[0], rows)]
                          or [np.zeros(0)])


def log_library_size(counts: Float[Array, "n_cells n_genes"]) -> Float[Array, " n_cells"]:
    """Log of each cell's observed total count (clamped at 1 so an empty cell gives 0, not -inf)."""
    return jnp.log(jnp.maximum(jnp.sum(counts, axis=-1), 1.0))


def reparameterize(
    mean: Float[Array, "n_cells latent_dim"], log_variance: Float[Array, "n_cells latent_dim"], *, key: PRNGKeyArray
) -> Float[Array, "n_cells latent_dim"]:
    """A reparameterised draw $z = m + \\sqrt{v}\\,\\epsilon$, $\\epsilon \\sim N(0, I)$ (in `mean`'s dtype)."""
    return mean + jnp.exp(0.5 * log_variance) * normal(key, mean.shape, dtype=mean.dtype)
