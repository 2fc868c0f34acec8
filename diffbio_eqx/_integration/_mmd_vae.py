"""trVAE's MMD batch correction on the scVI-style VAE: the negative ELBO plus `beta` times the MMD between every pair
of batches, on the latent draw or on the decoder's first layer, trained on the shared loop (`fit`)."""

from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._core._train import FitResult, TrainSettings, fit
from .._vae._stage import VAENormalizer, kl_warmup_weight
from ._common import first_decoder_layer, linear_warmup, prepare_training, vae_terms, vae_trainable
from ._mmd import TRVAE_BANDWIDTHS, batch_mmd_penalty


MMDOn = Literal["latent", "decoder"]


class MMDVAELoss(eqx.Module):
    """`fit`'s loss for a `VAENormalizer` with trVAE's MMD penalty.

    $\\mathcal{L} = \\frac1n \\sum_i \\big[-\\log p(x_i \\mid z_i, s_i) + w_{KL}\\,\\mathrm{KL}(q(z_i \\mid x_i)
    \\,\\|\\, p(z))\\big] + \\beta \\sum_{a < b} \\mathrm{MMD}^2_u(h_a, h_b)$, where $h$ is the latent draw $z$
    (`mmd_on="latent"`, trVAE's `mmd_on='z'`) or the decoder's first-layer activations (`"decoder"`, trVAE's
    `'y'`), and the MMD is `batch_mmd_penalty` over the minibatch's batches.

    `bandwidths` (array leaf) are the kernel variances; `context` is `{"kl_weight": w_KL, "mmd_weight": beta}` for
    the epoch. In validation (`eqx.nn.inference_mode`) dropout is off and the KL weight is one.
    """

    bandwidths: Float[Array, " n_scales"]
    mmd_on: str = eqx.field(static=True)

    def __init__(self, *, bandwidths: Float[ArrayLike, " n_scales"] | Sequence[float] = TRVAE_BANDWIDTHS,
                 mmd_on: MMDOn = "latent"):
        self.bandwidths = jnp.asarray(bandwidths)
        self.mmd_on = mmd_on

    def __check_init__(self):
        if self.mmd_on not in ("latent", "decoder"):
            raise ValueError(f"mmd_on: must be 'latent' or 'decoder', got {self.mmd_on!r}")

    def __call__(
        self, vae: VAENormalizer, batch: tuple[Array, ...], context: dict[str, Array], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        validation = bool(vae.encoder.dropout.inference)
        terms = vae_terms(vae, batch, key=key, inference=validation)
        kl_weight = jnp.ones((), vae.dtype) if validation else context["kl_weight"].astype(vae.dtype)
        points = terms.z if self.mmd_on == "latent" else first_decoder_layer(vae, terms.z, terms.onehot)
        mmd = batch_mmd_penalty(points, batch[1], self.bandwidths.astype(vae.dtype), n_batches=vae.n_batches)
        elbo_loss = jnp.mean(terms.reconstruction + kl_weight * terms.kl)
        loss = elbo_loss + context["mmd_weight"].astype(vae.dtype) * mmd
        aux = {"reconstruction": jnp.mean(terms.reconstruction), "kl": jnp.mean(terms.kl), "mmd": mmd,
               "elbo": -jnp.mean(terms.reconstruction + terms.kl)}
        return loss, aux


def fit_mmd_vae(
    vae: VAENormalizer,
    counts: Any,
    batch_labels: Any,
    *,
    key: PRNGKeyArray,
    settings: TrainSettings | None = None,
    beta: float = 1.0,
    mmd_on: str = "latent",
    bandwidths: Sequence[float] = TRVAE_BANDWIDTHS,
    n_epochs_kl_warmup: int | None = None,
    n_epochs_mmd_warmup: int = 0,
) -> FitResult:
    """Train a `VAENormalizer` with trVAE's MMD batch penalty (Lotfollahi et al. 2020) on the shared loop.

    **Arguments:**

    - `vae`: the (initialised) model, with `n_batches >= 2` (its decoder is conditioned on the batch).
    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse.
    - `batch_labels`: `(n_cells,)` integer batch codes.
    - `key`: PRNG key. (Keyword only argument.)
    - `settings`: `TrainSettings`; what is left at None takes `fit_vae`'s (scvi-tools') defaults.
    - `beta`: the MMD weight (trVAE's `beta`, default 1).
    - `mmd_on`: `"latent"` (the latent draw $z$, trVAE's default) or `"decoder"` (the first decoder layer).
    - `bandwidths`: the kernel variances (trVAE's nineteen, `TRVAE_BANDWIDTHS`).
    - `n_epochs_kl_warmup`: the KL weight rises linearly from 0 to 1 over these epochs (trVAE's
      `alpha_epoch_anneal`; None: as `fit_vae`, `min(400, n_epochs)`).
    - `n_epochs_mmd_warmup`: `beta` rises linearly from 0 over these epochs (0, trVAE's behaviour: constant).

    **Returns:** `fit`'s `FitResult`; `.model` is the trained VAE, `.train_aux` has the per-epoch `mmd`.
    """
    if not beta >= 0:
        raise ValueError(f"beta: must be >= 0, got {beta}")
    if mmd_on not in ("latent", "decoder"):
        raise ValueError(f"mmd_on: must be 'latent' or 'decoder', got {mmd_on!r}")
    data, settings = prepare_training(vae, counts, batch_labels, settings, "MMD VAE")
    assert settings.n_epochs is not None
    warmup = min(400, settings.n_epochs) if n_epochs_kl_warmup is None else int(n_epochs_kl_warmup)
    dtype = vae.dtype

    def context(epoch: int) -> dict[str, Array]:
        return {"kl_weight": jnp.asarray(kl_warmup_weight(epoch, warmup), dtype=dtype),
                "mmd_weight": jnp.asarray(linear_warmup(epoch, n_epochs_mmd_warmup, beta), dtype=dtype)}

    trainable = vae_trainable(vae)
    loss = MMDVAELoss(bandwidths=jnp.asarray(bandwidths, dtype=dtype), mmd_on=cast(MMDOn, mmd_on))
    return fit(vae, loss, data, key=key, settings=settings, context=context, trainable=trainable)

