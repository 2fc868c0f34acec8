"""An amortised encoder for archetype weights: an MLP maps a cell to its weights on the simplex (softmax), trained
on the shared loop to reconstruct the cell from fixed archetypes, so new cells get their weights in one pass
instead of PCHA's per-cell projected-gradient solve.

Loss: $\\frac{1}{B}\\sum_i \\|x_i - s(x_i)^\\top A\\|^2 / \\overline{\\|x\\|^2}$ with the archetypes $A$ held fixed
(`stop_gradient`; a trainable leaf of the module, but excluded from training by `fit_archetype_encoder`).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit


class ArchetypeEncoder(AbstractTrainableStage):
    """`encoder(x) -> (n_cells, n_archetypes)` simplex weights; `archetypes` `(n_archetypes, n_dims)` fixed."""

    mlp: eqx.nn.MLP
    archetypes: Float[Array, "n_archetypes n_dims"]
    scale: Float[Array, ""]

    def __init__(self, archetypes: Float[Array, "n_archetypes n_dims"], *, key: PRNGKeyArray, width: int = 64,
                 depth: int = 2, scale: float = 1.0):
        n_archetypes, n_dims = archetypes.shape
        self.mlp = eqx.nn.MLP(n_dims, n_archetypes, width, depth, activation=jax.nn.gelu, key=key,
                              dtype=archetypes.dtype)
        self.archetypes = archetypes
        self.scale = jnp.asarray(scale, archetypes.dtype)

    def __call__(self, x: Float[Array, "n_cells n_dims"], *, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> Float[Array, "n_cells n_archetypes"]:
        del key, inference
        return jax.nn.softmax(jax.vmap(self.mlp)(x), axis=-1)

    def loss(self, batch: tuple[Array, ...], /, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Array]]:
        del key
        (x,) = batch
        recon = self(x) @ jax.lax.stop_gradient(self.archetypes)
        value = jnp.mean(jnp.sum((x - recon) ** 2, axis=1)) / self.scale
        return value, {"relative_sse": value}


def fit_archetype_encoder(
    encoder: ArchetypeEncoder, x: Float[Array, "n_cells n_dims"], *, key: PRNGKeyArray,
    settings: TrainSettings | None = None,
) -> FitResult:
    """Train the encoder's MLP on the cells `x` (the archetypes stay fixed) on the shared loop (default 200
    epochs of 256 cells)."""
    settings = settings or TrainSettings()
    settings = dataclasses.replace(settings, n_epochs=settings.n_epochs or 200,
                                   batch_size=settings.batch_size or 256)
    scale = jnp.mean(jnp.sum(x * x, axis=1))
    encoder = eqx.tree_at(lambda e: e.scale, encoder, scale)
    trainable = jax.tree_util.tree_map(eqx.is_inexact_array, encoder)
    trainable = eqx.tree_at(lambda e: (e.archetypes, e.scale), trainable, (False, False))
    return fit(encoder, lambda model, batch, _, *, key: model.loss(batch, key=key), [x], key=key, settings=settings,
               trainable=trainable)
