import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import pytest

from diffbio_eqx._core._train import take_rows


def test_wrong_shape_raises_a_type_check_error():
    # take_rows wants a 1-D index; a 2-D one must be rejected by the jaxtyping/beartype hook.
    with pytest.raises(jaxtyping.TypeCheckError):
        take_rows(jnp.ones((4, 3)), jnp.zeros((2, 2), dtype=jnp.int32))


def test_wrong_argument_type_raises_a_type_check_error():
    import diffbio_eqx as dbx

    # Float batch labels where integer codes are annotated (`simulate`, which this test used, now checks its
    # arguments by name before its annotated core runs, for users without the hook).
    with pytest.raises(jaxtyping.TypeCheckError):
        dbx.harmony(jnp.ones((10, 3)), jnp.zeros(10), key=jr.key(0))
