"""`_core._random`: jax.random's threefry draws with the hash unrolled, bit for bit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from diffbio_eqx._core import _random
from diffbio_eqx._core._nn import dropout


SHAPES = [(), (1,), (7,), (256, 128), (3, 5, 7)]


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", [0, 1])
def test_draws_equal_jax_random_bit_for_bit(seed):
    key = jr.fold_in(jr.key(seed), 11)

    @jax.jit
    def both(key):
        ours, theirs = [], []
        for shape in SHAPES:
            for dtype in (jnp.uint32, jnp.uint64):
                ours.append(_random.bits(key, shape, dtype))
                theirs.append(jr.bits(key, shape, dtype))
            for dtype in (jnp.float32, jnp.float64):
                ours += [_random.uniform(key, shape, dtype), _random.normal(key, shape, dtype)]
                theirs += [jr.uniform(key, shape, dtype), jr.normal(key, shape, dtype)]
            for p in (jnp.float32(0.9), 1 - jax.lax.stop_gradient(0.1)):
                ours.append(_random.bernoulli(key, p, shape))
                theirs.append(jr.bernoulli(key, p, shape))
        return ours, theirs

    ours, theirs = both(key)
    assert all(_same_bits(a, b) for a, b in zip(ours, theirs, strict=True))


def test_other_keys_fall_back_to_jax_random():
    legacy = jr.PRNGKey(3)  # a raw uint32 key, not a typed threefry key
    assert _same_bits(_random.normal(legacy, (4, 3), jnp.float32), jr.normal(legacy, (4, 3), jnp.float32))
    rbg = jr.key(3, impl="rbg")
    assert _same_bits(_random.bits(rbg, (5,)), jr.bits(rbg, (5,)))


def test_dropout_equals_equinox_dropout(getkey):
    x = jr.normal(getkey(), (64, 32), jnp.float32)
    layer, key = eqx.nn.Dropout(0.1), getkey()
    assert _same_bits(jax.jit(lambda x, k: dropout(layer, x, key=k, inference=None))(x, key), layer(x, key=key))
    assert _same_bits(dropout(layer, x, key=None, inference=True), x)
    assert _same_bits(dropout(eqx.nn.Dropout(0.0), x, key=None, inference=False), x)
    with pytest.raises(RuntimeError, match="requires a key"):
        dropout(layer, x, key=None, inference=False)
