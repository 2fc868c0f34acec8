"""MMD and adversarial batch correction (`diffbio_eqx._integration`)."""

import functools as ft

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.test_util import check_grads

from diffbio_eqx._integration._mmd import (
    TRVAE_BANDWIDTHS,
    batch_mmd_penalty,
    multiscale_rbf_kernel,
    pairwise_batch_mmd,
)


BANDWIDTHS = jnp.asarray(TRVAE_BANDWIDTHS)
pairwise = jax.jit(pairwise_batch_mmd, static_argnames="n_batches")
penalty = jax.jit(batch_mmd_penalty, static_argnames="n_batches")


@ft.partial(jax.jit, static_argnums=(1, 2, 4))
def _two_samples(key, n_a, n_b, shift=0.0, dims=5):
    ka, kb = jr.split(key)
    a = jr.normal(ka, (n_a, dims))
    b = jr.normal(kb, (n_b, dims)) + shift
    return jnp.concatenate([a, b]), jnp.concatenate([jnp.zeros(n_a, jnp.int32), jnp.ones(n_b, jnp.int32)])


def _reference_unbiased_mmd(x, y, bandwidths):
    """The textbook U-statistic with explicit loops over the blocks (numpy, float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(p, q):
        d = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        return np.sum([np.exp(-d / (2 * a)) for a in bandwidths], axis=0)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kernel_matches_trvae_formula(getkey):
    x, y = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (5, 3))
    d = np.asarray(((x[:, None] - y[None]) ** 2).sum(-1))
    expected = sum(np.exp(-d / (2 * a)) for a in TRVAE_BANDWIDTHS)
    np.testing.assert_allclose(multiscale_rbf_kernel(x, y, BANDWIDTHS), expected, rtol=1e-10)


def test_unbiased_mmd_matches_textbook_estimator(getkey):
    x, labels = _two_samples(getkey(), 40, 13, shift=0.7)
    got = pairwise(x, labels, BANDWIDTHS, n_batches=2)
    ref = _reference_unbiased_mmd(x[:40], x[40:], TRVAE_BANDWIDTHS)
    np.testing.assert_allclose(got[0, 1], ref, rtol=1e-9)
    np.testing.assert_allclose(got, got.T)
    assert got[0, 0] == 0.0 and got[1, 1] == 0.0


def test_mmd_near_zero_for_unbalanced_samples_of_one_distribution():
    # Unbiased: the mean over draws is zero (a biased V-statistic would sit at a positive offset that grows
    # as the small batch shrinks).
    values = jax.vmap(lambda k: penalty(*_two_samples(k, 200, 20), BANDWIDTHS, n_batches=2))(
        jr.split(jr.key(1), 8))
    assert abs(float(jnp.mean(values))) < 0.02
    shifted = jax.vmap(lambda k: penalty(*_two_samples(k, 200, 20, 1.0), BANDWIDTHS, n_batches=2))(
        jr.split(jr.key(2), 8))
    assert float(jnp.min(shifted)) > 10 * abs(float(jnp.mean(values)))


def test_mmd_grows_with_the_shift(getkey):
    key = getkey()
    shifts = jnp.asarray([0.0, 0.25, 0.5, 1.0, 2.0])
    values = jax.vmap(lambda s: penalty(*_two_samples(key, 200, 50, s), BANDWIDTHS, n_batches=2))(shifts)
    assert bool(jnp.all(jnp.diff(values) > 0))


def test_every_pair_counts_and_missing_batches_drop_out(getkey):
    # Three batches, the third shifted: pairs (0, 2) and (1, 2) are large, (0, 1) small; the sum is over all pairs.
    k1, k2, k3 = jr.split(getkey(), 3)
    x = jnp.concatenate([jr.normal(k1, (60, 4)), jr.normal(k2, (20, 4)), jr.normal(k3, (30, 4)) + 1.5])
    labels = jnp.repeat(jnp.arange(3, dtype=jnp.int32), jnp.asarray([60, 20, 30]), total_repeat_length=110)
    pairs = pairwise(x, labels, BANDWIDTHS, n_batches=4)  # batch 3 is absent from this minibatch
    assert float(pairs[0, 2]) > 10 * abs(float(pairs[0, 1])) and float(pairs[1, 2]) > 10 * abs(float(pairs[0, 1]))
    np.testing.assert_array_equal(pairs[3], 0.0)
    np.testing.assert_allclose(penalty(x, labels, BANDWIDTHS, n_batches=4),
                               pairs[0, 1] + pairs[0, 2] + pairs[1, 2], rtol=1e-12)
    # A batch with one cell in the minibatch has no unbiased within-batch term: its pairs are left out.
    lone = labels.at[0].set(3)
    assert float(pairwise(x, lone, BANDWIDTHS, n_batches=4)[3].sum()) == 0.0


def test_mmd_gradients(getkey):
    x, labels = _two_samples(getkey(), 12, 7, shift=0.5, dims=3)
    loss = jax.jit(lambda z: penalty(jnp.asarray(z), labels, BANDWIDTHS[6:14], n_batches=2))
    check_grads(loss, (x,), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)
    # and the bandwidths (a continuous setting): vmap over them agrees with a loop
    sets = jnp.stack([BANDWIDTHS[6:14], 2.0 * BANDWIDTHS[6:14]])
    vmapped = jax.vmap(lambda b: penalty(x, labels, b, n_batches=2))(sets)
    looped = jnp.stack([penalty(x, labels, b, n_batches=2) for b in sets])
    np.testing.assert_allclose(vmapped, looped, rtol=1e-12)
