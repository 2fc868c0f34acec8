"""A diagonal Gaussian mixture as composable pure functions: EM as a `lax.scan`, soft responsibilities with a
temperature, the log-likelihood and BIC.

The model is scikit-learn's `GaussianMixture(covariance_type="diag")`: weights $\\pi_k$, means $\\mu_k$ and
per-dimension variances $\\sigma^2_{kd}$ (each floored by `reg_covar`, 1e-6 as scikit-learn). Responsibilities
are $r_{ik} = \\mathrm{softmax}_k(\\log \\pi_k + \\log \\mathcal{N}(x_i; \\mu_k, \\sigma^2_k)) / T)$; at $T = 1$
one EM step is scikit-learn's E-step then M-step, and each step does not decrease the log-likelihood. Unlike
soft k-means, clusters of different sizes and spreads get their own weight and variance, which is what
unbalanced cell types need. Every function is differentiable in the data and the parameters.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from .._core._loop import iterate


#: scikit-learn's default variance floor (added to every variance after the M-step).
REG_COVAR = 1e-6


class MixtureParameters(eqx.Module):
    """Weights (as logs), means and diagonal variances of a `n_components` Gaussian mixture."""

    log_weights: Float[Array, " n_components"]
    means: Float[Array, "n_components n_dims"]
    variances: Float[Array, "n_components n_dims"]


def component_log_densities(
    x: Float[Array, "n_cells n_dims"], params: MixtureParameters
) -> Float[Array, "n_cells n_components"]:
    """$\\log \\pi_k + \\log \\mathcal{N}(x_i; \\mu_k, \\mathrm{diag}\\,\\sigma^2_k)$ for every cell and component.

    Expanded as scikit-learn does (a matrix product, no `(n_cells, n_components, n_dims)` array).
    """
    precisions = 1.0 / params.variances
    n_dims = x.shape[1]
    squared = (
        jnp.sum(params.means**2 * precisions, axis=1)[None, :]
        - 2.0 * x @ (params.means * precisions).T
        + (x**2) @ precisions.T
    )
    log_det = jnp.sum(jnp.log(params.variances), axis=1)
    return params.log_weights[None, :] - 0.5 * (n_dims * math.log(2 * math.pi) + log_det[None, :] + squared)


def mixture_responsibilities(
    x: Float[Array, "n_cells n_dims"], params: MixtureParameters, temperature: Float[ArrayLike, ""] = 1.0
) -> Float[Array, "n_cells n_components"]:
    """Soft assignments $\\mathrm{softmax}_k(\\log p(x_i, k) / T)$: the posterior at $T = 1$, harder below."""
    return jax.nn.softmax(component_log_densities(x, params) / temperature, axis=1)


def mixture_log_likelihood(x: Float[Array, "n_cells n_dims"], params: MixtureParameters) -> Float[Array, ""]:
    """The mean per-cell log-likelihood $\\frac1n \\sum_i \\log \\sum_k \\pi_k \\mathcal{N}(x_i; \\mu_k, \\sigma^2_k)$
    (scikit-learn's `score`)."""
    return jnp.mean(jax.nn.logsumexp(component_log_densities(x, params), axis=1))


def maximisation_step(
    x: Float[Array, "n_cells n_dims"],
    resp: Float[Array, "n_cells n_components"],
    reg_covar: float = REG_COVAR,
) -> MixtureParameters:
    """The M-step of scikit-learn's diagonal mixture: responsibility-weighted weights, means and variances."""
    tiny = 10 * jnp.finfo(x.dtype).eps
    mass = jnp.sum(resp, axis=0) + tiny
    means = (resp.T @ x) / mass[:, None]
    second = (resp.T @ (x * x)) / mass[:, None]
    variances = second - 2.0 * means * ((resp.T @ x) / mass[:, None]) + means**2 + reg_covar
    return MixtureParameters(jnp.log(mass / jnp.sum(mass)), means, variances)


def parameters_from_labels(
    x: Float[Array, "n_cells n_dims"], labels: Int[Array, " n_cells"], n_components: int,
    reg_covar: float = REG_COVAR,
) -> MixtureParameters:
    """The M-step on hard labels: each component's share, mean and variance (how a partition, e.g. graph
    communities or k-means labels, initialises the mixture)."""
    return maximisation_step(x, jax.nn.one_hot(labels, n_components, dtype=x.dtype), reg_covar)


class MixtureFit(eqx.Module):
    """What `expectation_maximisation` returns.

    - `params`: the fitted `MixtureParameters`.
    - `log_likelihood`: `(n_iter,)` mean per-cell log-likelihood after each step.
    - `n_steps`: steps applied before the state froze; `converged`: whether the gain fell below `tol`.
    """

    params: MixtureParameters
    log_likelihood: Float[Array, " n_iter"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]


class _EMState(eqx.Module):
    params: MixtureParameters
    log_likelihood: Float[Array, ""]
    converged: Bool[Array, ""]


def expectation_maximisation(
    x: Float[Array, "n_cells n_dims"],
    init: MixtureParameters,
    *,
    n_iter: int = 100,
    tol: float = 1e-3,
    temperature: Float[ArrayLike, ""] = 1.0,
    reg_covar: float = REG_COVAR,
) -> MixtureFit:
    """EM from `init` as a fixed-length `lax.scan` that freezes once the mean log-likelihood gains less than `tol`
    (scikit-learn's rule and defaults: `max_iter` 100, `tol` 1e-3); `temperature` tempers the E-step."""

    def step(state: _EMState, _) -> tuple[_EMState, Float[Array, ""]]:
        params = maximisation_step(x, mixture_responsibilities(x, state.params, temperature), reg_covar)
        log_likelihood = mixture_log_likelihood(x, params)
        converged = jnp.abs(log_likelihood - state.log_likelihood) < tol
        return _EMState(params, log_likelihood, converged), log_likelihood

    start = _EMState(init, mixture_log_likelihood(x, init), jnp.array(False))
    final, trace, n_steps = iterate(step, start, lambda s: s.converged, max_steps=n_iter,
                                    frozen=lambda s: s.log_likelihood)
    return MixtureFit(final.params, trace, n_steps, final.converged)


def n_mixture_parameters(n_components: int, n_dims: int) -> int:
    """Free parameters of a diagonal mixture: means and variances per component, and `n_components - 1` weights."""
    return 2 * n_components * n_dims + n_components - 1


def bayesian_information_criterion(
    x: Float[Array, "n_cells n_dims"], params: MixtureParameters
) -> Float[Array, ""]:
    """BIC $= -2 \\log L + p \\log n$ (scikit-learn's `bic`; lower is better)."""
    n_cells, n_dims = x.shape
    n_params = n_mixture_parameters(params.means.shape[0], n_dims)
    return -2.0 * mixture_log_likelihood(x, params) * n_cells + n_params * math.log(n_cells)


def hard_labels(x: Float[Array, "n_cells n_dims"], params: MixtureParameters) -> Int[Array, " n_cells"]:
    """Each cell's most probable component (scikit-learn's `predict`)."""
    return jnp.argmax(component_log_densities(x, params), axis=1)
