"""Hyperparameter studies: the pipeline over a grid of continuous settings in one compiled, vmapped call."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._model import PipelineOutput, SingleCellPipeline
from ._run import prepare_inputs


@eqx.filter_jit
def _sweep_compiled(
    pipeline: SingleCellPipeline, counts: Float[Array, "n_cells n_genes"], ambient_profile: Float[Array, " n_genes"],
    batch_labels: Int[Array, " n_cells"], key: PRNGKeyArray, thetas: Float[Array, " n_theta"],
    temperatures: Float[Array, " n_temperature"],
) -> PipelineOutput:
    def one(theta: Float[Array, ""], temperature: Float[Array, ""]) -> PipelineOutput:
        swept = pipeline
        if swept.batch_correction is not None:
            swept = eqx.tree_at(lambda p: p.batch_correction.theta, swept, theta.astype(swept.dtype))
        if swept.clustering is not None:
            swept = eqx.tree_at(lambda p: p.clustering.temperature, swept, temperature.astype(swept.dtype))
        return swept(counts, ambient_profile, batch_labels, key=key, inference=True)

    return jax.vmap(lambda theta: jax.vmap(lambda t: one(theta, t))(temperatures))(thetas)


def sweep_pipeline(
    pipeline: SingleCellPipeline, data: Mapping[str, Any], *, key: PRNGKeyArray,
    theta: Float[ArrayLike, " n_theta"], temperature: Float[ArrayLike, " n_temperature"],
) -> PipelineOutput:
    """Run the pipeline over a grid of Harmony `theta` x clustering `temperature` in one compiled call.

    Harmony is re-run on the whole dataset for every `theta` (the stored reference is set aside), with the same
    key everywhere (common random numbers), so differences come from the hyperparameters alone.

    **Returns:** a `PipelineOutput` whose every field has two leading axes `(n_theta, n_temperature, ...)`.
    """
    counts, profile, labels = prepare_inputs(pipeline, data)
    unreferenced = eqx.tree_at(lambda p: p.harmony_reference, pipeline, None, is_leaf=lambda node: node is None)
    return _sweep_compiled(unreferenced, counts, profile, labels, key,
                           jnp.atleast_1d(jnp.asarray(theta, pipeline.dtype)),
                           jnp.atleast_1d(jnp.asarray(temperature, pipeline.dtype)))
