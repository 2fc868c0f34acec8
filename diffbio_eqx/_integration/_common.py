"""What the MMD and adversarial correctors share: the VAE's loss terms with its latent draw exposed, the training
defaults of `fit_vae`, and batch-corrected expression (every cell decoded into one reference batch)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray

from .._core._nn import dense, layer_norm
from .._core._train import TrainSettings, shared_optimizer
from .._vae._stage import (
    VAENormalizer,
    VAETerms,
    _prepare,
    log_factorial_per_cell,
    vae_default_epochs,
    vae_transform,
)


def vae_terms(
    vae: VAENormalizer, batch: tuple[Array, ...], *, key: PRNGKeyArray, inference: bool = False
) -> VAETerms:
    """`VAENormalizer.terms` for `batch = (counts, batch_labels[, log_factorial])`."""
    return vae.terms(batch, key=key, inference=inference)


def first_decoder_layer(
    vae: VAENormalizer, z: Float[Array, "n_cells latent_dim"], onehot: Float[Array, "n_cells n_batches"] | None
) -> Float[Array, "n_cells hidden"]:
    """The activations of the decoder's first hidden layer (trVAE's `y1`, its "MMD layer"): the batch one-hot is
    concatenated to `z`, then the linear map, the optional layer norm and the ReLU, as in `CovariateMLP`."""
    h = z if onehot is None else jnp.concatenate([z, onehot.astype(z.dtype)], axis=-1)
    h = dense(h, vae.decoder.layers[0])
    if vae.decoder.use_layer_norm:
        h = layer_norm(h)
    return jax.nn.relu(h)


def prepare_training(
    vae: VAENormalizer, counts: Any, batch_labels: Any, settings: TrainSettings | None, description: str
) -> tuple[tuple[Any, Any, Any], TrainSettings]:
    """Checked data `(counts, labels, log_factorial)` and `settings` filled with `fit_vae`'s defaults."""
    if vae.n_batches < 2:
        raise ValueError(f"vae: batch correction needs a model of at least two batches, got n_batches={vae.n_batches}")
    if batch_labels is None:
        raise ValueError("batch_labels: batch correction needs one batch label per cell")
    checked, labels = _prepare(vae, counts, batch_labels)
    defaults = TrainSettings(
        n_epochs=vae_default_epochs(checked.shape[0]), batch_size=128, optimizer=shared_optimizer(),
        hyperparameters={"learning_rate": 1e-3, "weight_decay": 1e-6, "eps": 0.01}, validation_fraction=0.1,
        description=description,
    )
    settings = (TrainSettings() if settings is None else settings).filled(defaults)
    data = (checked, labels, log_factorial_per_cell(checked).astype(jnp.dtype(vae.dtype)))
    return data, settings


def vae_trainable(vae: VAENormalizer) -> Any:
    """The VAE's trained leaves (as `fit_vae`): every inexact array but `target_library_size`."""
    trainable = jtu.tree_map(eqx.is_inexact_array, vae)
    return eqx.tree_at(lambda m: m.target_library_size, trainable, replace=False)


def linear_warmup(epoch: int, n_epochs_warmup: int, top: float) -> float:
    """`top * min(1, epoch / n_epochs_warmup)` (`top` from the start when `n_epochs_warmup <= 0`)."""
    return float(top) if n_epochs_warmup <= 0 else float(top) * min(1.0, epoch / n_epochs_warmup)


def corrected_expression(
    vae: VAENormalizer,
    counts: Any,
    batch_labels: Any,
    *,
    reference_batch: int = 0,
    chunk_size: int = 4096,
) -> Float[Array, "n_cells n_genes"]:
    """Batch-corrected expression: every cell encoded with its own batch and decoded as if it came from
    `reference_batch` (scVI's `get_normalized_expression(transform_batch=...)`), scaled to the VAE's
    `target_library_size`.

    **Arguments:**

    - `vae`: a trained `VAENormalizer` (from `fit_mmd_vae`, `fit_adversarial_vae` or `fit_vae`).
    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse.
    - `batch_labels`: `(n_cells,)` integer batch codes.
    - `reference_batch`: the batch every cell is decoded into. (Keyword only argument.)
    - `chunk_size`: cells per compiled call.

    **Returns:** `(n_cells, n_genes)` normalised expression.
    """
    if not 0 <= int(reference_batch) < vae.n_batches:
        raise ValueError(f"reference_batch: must be in [0, {vae.n_batches}), got {reference_batch}")
    return vae_transform(vae, counts, batch_labels, chunk_size=chunk_size,
                         transform_batch=int(reference_batch)).normalized

