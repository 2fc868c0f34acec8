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

    with pytest.raises(jaxtyping.TypeCheckError):
        dbx.simulate(jr.key(0), n_cells=10, n_genes=5, ambient_profile=jnp.ones((5, 2)))
