import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import scipy.special
import scipy.stats

from diffbio_eqx._core._distributions import (
    digamma_positive,
    log_gamma_positive,
    negative_binomial_log_prob,
    negative_binomial_log_prob_logspace,
    poisson_log_prob,
    poisson_log_prob_logspace,
    softmax_negative_binomial_log_likelihood,
    zero_inflated_negative_binomial_log_prob,
    zero_inflated_negative_binomial_log_prob_logspace,
)


COUNTS = np.array([0.0, 1.0, 2.0, 3.0, 7.0, 30.0, 100.0, 1e3, 1e4, 1e5])
MEANS = np.array([1e-3, 0.1, 1.0, 10.0, 1e3, 1e5])
THETAS = np.array([1e-4, 1e-2, 0.5, 1.0, 10.0, 1e3, 1e6])
LOGITS = np.array([-8.0, -1.0, 0.0, 2.5])


def _grid(*axes):
    return [np.ascontiguousarray(a) for a in np.meshgrid(*axes, indexing="ij")]


def _scipy_nb(x, mu, theta):
    return scipy.stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def _scipy_zinb(x, mu, theta, logits):
    log_pi = scipy.special.log_expit(logits)
    log_not_pi = scipy.special.log_expit(-logits)
    zero = np.logaddexp(log_pi, log_not_pi + _scipy_nb(0.0, mu, theta))
    return np.where(x == 0, zero, log_not_pi + _scipy_nb(x, mu, theta))


def _assert_close(ours, reference):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    assert np.all(np.isfinite(ours)), "non-finite log-probabilities"
    # Absolute error scaled by the magnitude of the terms (lgamma of ~1e6 carries ~1e-9 absolute error).
    np.testing.assert_allclose(ours, reference, rtol=1e-8, atol=1e-7)


def test_negative_binomial_matches_scipy_over_grid():
    x, mu, theta = _grid(COUNTS, MEANS, THETAS)
    reference = _scipy_nb(x, mu, theta)
    assert np.all(np.isfinite(reference))
    _assert_close(negative_binomial_log_prob(*map(jnp.asarray, (x, mu, theta))), reference)
    _assert_close(
        negative_binomial_log_prob_logspace(*map(jnp.asarray, (x, np.log(mu), np.log(theta)))), reference
    )


def test_zero_inflated_negative_binomial_matches_scipy_over_grid():
    x, mu, theta, logits = _grid(COUNTS, MEANS, THETAS, LOGITS)
    reference = _scipy_zinb(x, mu, theta, logits)
    _assert_close(zero_inflated_negative_binomial_log_prob(*map(jnp.asarray, (x, mu, theta, logits))), reference)
    _assert_close(
        zero_inflated_negative_binomial_log_prob_logspace(
            *map(jnp.asarray, (x, np.log(mu), np.log(theta), logits))
        ),
        reference,
    )


def test_poisson_matches_scipy_over_grid():
    x, rate = _grid(COUNTS, MEANS)
    reference = scipy.stats.poisson.logpmf(x, rate)
    _assert_close(poisson_log_prob(jnp.asarray(x), jnp.asarray(rate)), reference)
    _assert_close(poisson_log_prob_logspace(jnp.asarray(x), jnp.asarray(np.log(rate))), reference)


def test_log_gamma_positive_matches_scipy():
    z = np.concatenate([np.geomspace(1e-6, 2e6, 3000), np.arange(1.0, 300.0), np.arange(0.5, 50.0)])
    np.testing.assert_allclose(log_gamma_positive(jnp.asarray(z)), scipy.special.gammaln(z), rtol=1e-13, atol=5e-9)
    np.testing.assert_allclose(digamma_positive(jnp.asarray(z)), scipy.special.digamma(z), rtol=1e-10, atol=1e-10)
    grad = jax.vmap(jax.grad(log_gamma_positive))(jnp.asarray(z))
    np.testing.assert_allclose(grad, scipy.special.digamma(z), rtol=1e-10, atol=1e-10)
    with jax.enable_x64(False):
        ours = log_gamma_positive(jnp.asarray(z[z < 1e4], jnp.float32))
        xla = jax.scipy.special.gammaln(jnp.asarray(z[z < 1e4], jnp.float32))
    reference = scipy.special.gammaln(z[z < 1e4])
    # In float32 ours is as accurate as XLA's lgamma (both limited by rounding of the terms).
    ours_error = np.abs(np.asarray(ours, np.float64) - reference)
    xla_error = np.abs(np.asarray(xla, np.float64) - reference)
    assert ours_error.max() <= 2 * xla_error.max() + 1e-5, (ours_error.max(), xla_error.max())


def test_log_factorial_can_be_left_out():
    x, mu, theta, logits = (jnp.asarray(a) for a in _grid(COUNTS[:6], MEANS[:4], THETAS[:4], LOGITS[:2]))
    log_mu, log_theta = jnp.log(mu), jnp.log(theta)
    constant = jax.scipy.special.gammaln(x + 1.0)
    pairs = [
        (negative_binomial_log_prob_logspace, (x, log_mu, log_theta)),
        (zero_inflated_negative_binomial_log_prob_logspace, (x, log_mu, log_theta, logits)),
        (poisson_log_prob_logspace, (x, log_mu)),
    ]
    for fn, args in pairs:
        full = fn(*args)
        np.testing.assert_allclose(fn(*args, include_log_factorial=False) - constant, full, rtol=1e-12, atol=1e-9)


def test_distributions_normalise():
    x = jnp.arange(0.0, 4000.0)[:, None]
    for mu, theta in [(0.3, 0.05), (5.0, 1.0), (50.0, 1e4)]:
        mu_a, theta_a = jnp.full((1, 1), mu), jnp.full((1, 1), theta)
        total = jnp.exp(jax.scipy.special.logsumexp(negative_binomial_log_prob(x, mu_a, theta_a)))
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
        zinb = zero_inflated_negative_binomial_log_prob(x, mu_a, theta_a, jnp.full((1, 1), 0.7))
        np.testing.assert_allclose(jnp.exp(jax.scipy.special.logsumexp(zinb)), 1.0, rtol=1e-6)
        pois = poisson_log_prob(x, mu_a)
        np.testing.assert_allclose(jnp.exp(jax.scipy.special.logsumexp(pois)), 1.0, rtol=1e-6)


def test_zero_mean_and_zero_counts():
    x = jnp.array([[0.0, 0.0, 3.0]])
    mu = jnp.array([[0.0, 2.0, 2.0]])
    theta = jnp.array([[1.0, 1.0, 1.0]])
    out = negative_binomial_log_prob(x, mu, theta)
    assert out[0, 0] == 0.0
    np.testing.assert_allclose(out[0, 1:], _scipy_nb(np.array([0.0, 3.0]), 2.0, 1.0))
    np.testing.assert_allclose(poisson_log_prob(x, mu)[0, 0], 0.0)


def test_broadcast_dispersion_and_shape_contract():
    x = jnp.array([[0.0, 4.0, 9.0], [2.0, 0.0, 1.0]])
    mu = jnp.array([[1.0, 3.0, 8.0], [2.0, 0.5, 1.5]])
    theta = jnp.array([[0.7, 2.0, 30.0]])
    out = negative_binomial_log_prob(x, mu, theta)
    np.testing.assert_allclose(out, _scipy_nb(np.asarray(x), np.asarray(mu), np.asarray(theta)), rtol=1e-10)
    with pytest.raises(jaxtyping.TypeCheckError):
        negative_binomial_log_prob(x, mu, jnp.ones((3, 3)))


def test_gradients_finite_and_match_finite_differences():
    x = jnp.array([0.0, 1.0, 5.0, 40.0, 1e4])
    log_mu = jnp.log(jnp.array([0.2, 1.0, 4.0, 35.0, 9e3]))
    log_theta = jnp.log(jnp.array([1e-3, 0.5, 2.0, 1e3, 1e5]))
    logits = jnp.array([-2.0, 0.0, 1.0, -1.0, 3.0])

    def total(params):
        lm, lt, lg = params
        return jnp.sum(zero_inflated_negative_binomial_log_prob_logspace(x, lm, lt, lg)) + jnp.sum(
            negative_binomial_log_prob_logspace(x, lm, lt)
        )

    params = (log_mu, log_theta, logits)
    grads = jax.grad(total)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    eps = 1e-6
    for i in range(3):
        v = jnp.linspace(-1.0, 1.0, 5)
        plus = list(params)
        minus = list(params)
        plus[i] = params[i] + eps * v
        minus[i] = params[i] - eps * v
        fd = (total(tuple(plus)) - total(tuple(minus))) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grads[i], v), fd, rtol=1e-4, atol=1e-6)


def test_float32_log_space_is_accurate():
    x, mu, theta = _grid(COUNTS[:8], MEANS[:5], THETAS)
    reference = _scipy_nb(x, mu, theta)
    with jax.enable_x64(False):
        ours = negative_binomial_log_prob_logspace(
            jnp.asarray(x, jnp.float32), jnp.asarray(np.log(mu), jnp.float32), jnp.asarray(np.log(theta), jnp.float32)
        )
        assert ours.dtype == jnp.float32
    # lgamma(theta) of ~1e6 in float32 carries an absolute error of order 1; elsewhere float32 is tight.
    ours = np.asarray(ours, np.float64)
    moderate = theta <= 1e3
    np.testing.assert_allclose(ours[moderate], reference[moderate], rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(ours))


def _softmax_nb_data(theta_rows: int):
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2.0, 0.3, size=(12, 40)).astype(np.float64)
    counts[3] = 0.0  # an empty cell (library clamped to 1)
    counts[5, :3] = [1e4, 3e3, 250.0]
    logits = rng.normal(scale=2.0, size=(12, 40))
    log_library = np.log(np.maximum(counts.sum(1), 1.0))
    log_theta = rng.uniform(np.log(1e-3), np.log(1e5), size=(theta_rows, 40))
    return tuple(jnp.asarray(a) for a in (counts, logits, log_library, log_theta))


@pytest.mark.parametrize("theta_rows", [1, 12])
def test_softmax_negative_binomial_matches_scipy_and_its_composition(theta_rows):
    counts, logits, log_library, log_theta = _softmax_nb_data(theta_rows)
    fused = softmax_negative_binomial_log_likelihood(counts, logits, log_library, log_theta)
    mean = np.exp(np.asarray(log_library))[:, None] * scipy.special.softmax(np.asarray(logits), axis=-1)
    theta = np.broadcast_to(np.exp(np.asarray(log_theta)), counts.shape)
    reference = (_scipy_nb(np.asarray(counts), mean, theta) + scipy.special.gammaln(np.asarray(counts) + 1.0)).sum(1)
    np.testing.assert_allclose(fused, reference, rtol=1e-9, atol=1e-6)

    def composed(counts, logits, log_library, log_theta):
        log_mean = jax.nn.log_softmax(logits, axis=-1) + log_library[:, None]
        return negative_binomial_log_prob_logspace(
            counts, log_mean, log_theta, include_log_factorial=False
        ).sum(-1)

    weights = jnp.asarray(np.random.default_rng(1).normal(size=12))

    def weighted(fn):
        return lambda *args: jnp.sum(weights * fn(*args))

    args = (counts, logits, log_library, log_theta)
    # Every input's gradient (the counts' and the library's too) and a second derivative agree with autodiff of
    # the composition, so the hand-written JVP is right in reverse mode and under higher-order differentiation.
    # (Compiled: one program each instead of an eager compile per operation; the derivatives are the same.)
    for ours, theirs in zip(jax.jit(jax.grad(weighted(softmax_negative_binomial_log_likelihood), (0, 1, 2, 3)))(*args),
                            jax.jit(jax.grad(weighted(composed), (0, 1, 2, 3)))(*args)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    weighted_fused = weighted(softmax_negative_binomial_log_likelihood)
    hessian = jax.jit(jax.hessian(lambda lg, lt: weighted_fused(counts, lg, log_library, lt), (0, 1)))
    reference_hessian = jax.jit(jax.hessian(lambda lg, lt: weighted(composed)(counts, lg, log_library, lt), (0, 1)))
    for ours, theirs in zip(jax.tree.leaves(hessian(logits, log_theta)),
                            jax.tree.leaves(reference_hessian(logits, log_theta))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=1e-7)


def test_softmax_negative_binomial_float32_matches_float64():
    counts, logits, log_library, log_theta = _softmax_nb_data(1)
    log_theta = jnp.clip(log_theta, np.log(1e-3), np.log(1e3))  # lgamma(theta ~ 1e5) alone carries float32 error ~1
    reference = softmax_negative_binomial_log_likelihood(counts, logits, log_library, log_theta)
    reference_grad = jax.grad(lambda lg: jnp.sum(softmax_negative_binomial_log_likelihood(
        counts, lg, log_library, log_theta)))(logits)
    with jax.enable_x64(False):
        args32 = [jnp.asarray(np.asarray(a), jnp.float32) for a in (counts, logits, log_library, log_theta)]
        value = softmax_negative_binomial_log_likelihood(*args32)
        grad = jax.grad(lambda lg: jnp.sum(softmax_negative_binomial_log_likelihood(
            args32[0], lg, args32[2], args32[3])))(args32[1])
        assert value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(value, np.float64), reference, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(np.asarray(grad, np.float64), reference_grad, rtol=1e-3, atol=1e-3)
