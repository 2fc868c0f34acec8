import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)  # float64 for finite differences
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(0), 1000))
    return lambda: next(keys)
