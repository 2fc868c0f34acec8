"""scANVI (Xu et al. 2021) on the package's VAE, faithful to scvi-tools' `SCANVAE` (scvi-tools 1.4).

Generative model: $y \\sim \\mathrm{Cat}(\\pi)$ (uniform), $z_2 \\sim N(0, I)$, $z_1 \\mid z_2, y \\sim
N(\\mu(z_2, y), \\sigma^2(z_2, y))$, $x \\mid z_1 \\sim$ the VAE's decoder (`VAENormalizer`). Inference:
$q(z_1 \\mid x)$ the VAE's encoder, $q(y \\mid z_1)$ a classifier (one hidden layer of 128, ReLU, dropout 0.1),
$q(z_2 \\mid z_1, y)$ an encoder with the label one-hot as covariate.

Loss per minibatch (scvi-tools' `SCANVAE.loss`): for every cell, $y$ is marginalised with $q(y \\mid z_1)$,

$$-\\log p(x \\mid z_1) + \\log q(z_1 \\mid x) + \\sum_y q(y \\mid z_1)\\big[-\\log p(z_1 \\mid z_2, y)
+ w\\,\\mathrm{KL}(q(z_2 \\mid z_1, y) \\| N(0, I))\\big] + w\\,\\mathrm{KL}(q(y \\mid z_1) \\| \\pi),$$

averaged over cells, plus `classification_ratio` (50) times the cross-entropy of the classifier on the posterior
means of the labelled cells. Differences from scvi-tools, on purpose: the labelled cells' cross-entropy is taken on
the labelled cells of the same minibatch (scvi-tools draws a second, labelled minibatch each step), no batch
normalisation (as the package's VAE). `scanvi_from_vae` starts from a trained `VAENormalizer` as
`SCANVI.from_scvi_model` does (encoder, decoder and dispersions copied; the new parts fresh), and `fit_scanvi`
trains with `SCANVI.train`'s defaults after pre-training: `min(10, max(2, round(e / 3)))` epochs for the VAE's
heuristic `e`, batch 128, AdamW (1e-3, eps 0.01, weight decay 1e-6), 10 % validation, the KL weight rising over
400 epochs from 0.
"""

import math
from collections.abc import Sequence
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._distributions import reparameterize
from .._core._nn import CovariateMLP, dense
from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit, map_in_chunks, shared_optimizer
from .._vae._stage import (
    VAENormalizer,
    _prepare,
    gaussian_kl,
    kl_warmup_weight,
    log_factorial_per_cell,
    vae_default_epochs,
)


_VAR_EPS = 1e-4


def gaussian_log_prob(
    x: Float[Array, "*shape dim"], mean: Float[Array, "*shape dim"], log_variance: Float[Array, "*shape dim"]
) -> Float[Array, " *shape"]:
    """$\\sum_k \\log N(x_k; m_k, e^{v_k})$."""
    return jnp.sum(-0.5 * ((x - mean) ** 2 * jnp.exp(-log_variance) + log_variance + math.log(2 * math.pi)), -1)


class SCANVI(AbstractTrainableStage):
    """scANVI: the VAE with the label $y$ and the second latent $z_2$ (see the module docstring).

    `model(counts, batch_labels)` gives the label probabilities $q(y \\mid z_1)$ at the posterior mean of $z_1$
    (scvi-tools' `predict(soft=True)`); `model.loss((counts, batch_labels, labels[, log_factorial]), key=...)`
    the training objective, with `labels` -1 for unlabelled cells.
    """

    vae: VAENormalizer
    classifier: CovariateMLP
    classifier_head: eqx.nn.Linear
    encoder_z2: CovariateMLP
    z2_mean_head: eqx.nn.Linear
    z2_log_variance_head: eqx.nn.Linear
    decoder_z1: CovariateMLP
    z1_mean_head: eqx.nn.Linear
    z1_log_variance_head: eqx.nn.Linear
    log_y_prior: Float[Array, " n_labels"]
    classification_ratio: Float[Array, ""]
    cell_types: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self, vae: VAENormalizer, cell_types: Sequence[str], *, n_hidden: int = 128, dropout_rate: float = 0.1,
        classification_ratio: Float[ArrayLike, ""] = 50.0, key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `vae`: the (trained) VAE whose encoder and decoder scANVI keeps.
        - `cell_types`: the label names (their number fixes the classifier's width).
        - `n_hidden`, `dropout_rate`: the new networks' hidden width and dropout (scvi-tools: 128, 0.1).
        - `classification_ratio`: the weight of the labelled cells' cross-entropy (scvi-tools: 50).
        - `key`: PRNG key for the new networks. (Keyword only argument.)
        """
        n_labels, latent, dtype = len(cell_types), vae.latent_dim, vae.dtype
        if n_labels < 2:
            raise ValueError(f"cell_types: need at least two, got {list(cell_types)}")
        keys = jr.split(key, 8)
        self.vae = vae
        self.classifier = CovariateMLP(latent, (n_hidden,), dropout_rate=dropout_rate, dtype=dtype, key=keys[0])
        self.classifier_head = eqx.nn.Linear(n_hidden, n_labels, dtype=dtype, key=keys[1])
        self.encoder_z2 = CovariateMLP(latent, (n_hidden,), n_labels, dropout_rate=dropout_rate, dtype=dtype,
                                       key=keys[2])
        self.z2_mean_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[3])
        self.z2_log_variance_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[4])
        self.decoder_z1 = CovariateMLP(latent, (n_hidden,), n_labels, dtype=dtype, key=keys[5])
        self.z1_mean_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[6])
        self.z1_log_variance_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[7])
        self.log_y_prior = jnp.full((n_labels,), -math.log(n_labels), dtype)
        self.classification_ratio = jnp.asarray(classification_ratio, dtype)
        self.cell_types = tuple(str(c) for c in cell_types)

    @property
    def n_labels(self) -> int:
        return len(self.cell_types)

    def classify(self, z1: Float[Array, "n_cells latent_dim"], *, key: PRNGKeyArray | None = None,
                 inference: bool | None = None) -> Float[Array, "n_cells n_labels"]:
        """The classifier's logits $\\log q(y \\mid z_1)$ up to a constant."""
        return dense(self.classifier(z1, key=key, inference=inference), self.classifier_head)

    def __call__(
        self, counts: Float[Array, "n_cells n_genes"], batch_labels: Int[Array, " n_cells"] | None = None, *,
        key: PRNGKeyArray | None = None, inference: bool = False,
    ) -> Float[Array, "n_cells n_labels"]:
        del key, inference
        counts = counts.astype(self.vae.dtype)
        onehot = self.vae._batch_onehot(batch_labels, counts.shape[0])
        mean, _ = self.vae.encode(counts, onehot, inference=True)
        return jax.nn.softmax(self.classify(mean, inference=True), axis=-1)

    def _label_terms(self, z1: Array, *, key: PRNGKeyArray, inference: bool | None) -> tuple[Array, Array]:
        """Per label and cell: $-\\log p(z_1 \\mid z_2, y)$ and $\\mathrm{KL}(q(z_2 \\mid z_1, y) \\| N(0, I))$,
        each `(n_labels, n_cells)`."""
        n_cells, n_labels = z1.shape[0], self.n_labels
        ys = jnp.repeat(jnp.eye(n_labels, dtype=z1.dtype), n_cells, axis=0)
        z1s = jnp.tile(z1, (n_labels, 1))
        dropout_key, sample_key = jr.split(key)
        h = self.encoder_z2(z1s, ys, key=dropout_key, inference=inference)
        mean2 = dense(h, self.z2_mean_head)
        log_var2 = jnp.logaddexp(dense(h, self.z2_log_variance_head), math.log(_VAR_EPS))
        z2 = reparameterize(mean2, log_var2, key=sample_key)
        g = self.decoder_z1(z2, ys, inference=True)
        z1_mean, z1_log_var = dense(g, self.z1_mean_head), dense(g, self.z1_log_variance_head)
        unweighted = -gaussian_log_prob(z1s, z1_mean, z1_log_var)
        return unweighted.reshape(n_labels, n_cells), gaussian_kl(mean2, log_var2).reshape(n_labels, n_cells)

    def loss(
        self, batch: tuple[Array, ...], /, *, key: PRNGKeyArray, kl_weight: Float[ArrayLike, ""] = 1.0,
        inference: bool = False,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """scvi-tools' `SCANVAE.loss` (see the module docstring); `batch` is `(counts, batch_labels, labels[,
        log_factorial])` with `labels` -1 where unknown."""
        counts, batch_labels, labels = batch[0], batch[1], batch[2]
        log_factorial = batch[3] if len(batch) > 3 else None
        vae = self.vae
        counts = counts.astype(vae.dtype)
        onehot = vae._batch_onehot(batch_labels, counts.shape[0])
        encode_key, sample_key, label_key, class_key, ce_key = jr.split(key, 5)
        mean, log_var = vae.encode(counts, onehot, key=encode_key, inference=inference)
        z1 = reparameterize(mean, log_var, key=sample_key)
        reconstruction = -vae._reconstruction_log_likelihood(counts, z1, onehot, batch_labels, log_factorial)
        z1_unweighted, kl_z2 = self._label_terms(z1, key=label_key, inference=inference)
        log_probs = jax.nn.log_softmax(self.classify(z1, key=class_key, inference=inference), axis=-1)
        probs = jnp.exp(log_probs)
        reconstruction = reconstruction + gaussian_log_prob(z1, mean, log_var) + jnp.sum(probs * z1_unweighted.T, 1)
        kl = jnp.sum(probs * kl_z2.T, axis=1) + jnp.sum(probs * (log_probs - self.log_y_prior[None, :]), axis=1)
        weight = jnp.asarray(kl_weight).astype(reconstruction.dtype)
        elbo_loss = jnp.mean(reconstruction + weight * kl)
        mean_ce, _ = vae.encode(counts, onehot, key=ce_key, inference=inference)
        logits = jax.nn.log_softmax(self.classify(mean_ce, key=ce_key, inference=inference), axis=-1)
        known = labels >= 0
        picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
        n_known = jnp.maximum(jnp.sum(known), 1).astype(logits.dtype)
        cross_entropy = -jnp.sum(jnp.where(known, picked, 0.0)) / n_known
        loss = elbo_loss + self.classification_ratio * cross_entropy
        return loss, {"elbo_loss": elbo_loss, "classification_loss": cross_entropy}


class _SCANVILoss(eqx.Module):
    def __call__(self, model: SCANVI, batch: tuple[Array, ...], context: dict[str, Array], *,
                 key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        validation = bool(model.vae.encoder.dropout.inference)
        kl_weight = jnp.ones((), context["kl_weight"].dtype) if validation else context["kl_weight"]
        return model.loss(batch, key=key, kl_weight=kl_weight, inference=validation)


def scanvi_from_vae(vae: VAENormalizer, cell_types: Sequence[str], *, key: PRNGKeyArray) -> SCANVI:
    """`SCANVI.from_scvi_model`: scANVI keeping the trained VAE's encoder, decoder and dispersions."""
    return SCANVI(vae, cell_types, key=key)


def label_codes(labels: Any, cell_types: Sequence[str]) -> np.ndarray:
    """Integer codes of `labels` in `cell_types`; -1 for missing values (NaN/None) or names not in `cell_types`
    (scvi-tools' `unlabeled_category`)."""
    index = {str(c): i for i, c in enumerate(cell_types)}
    return np.asarray([index.get(str(v), -1) if v == v and v is not None else -1 for v in labels], np.int32)


def fit_scanvi(
    model: SCANVI, counts: Any, batch_labels: Any, labels: Any, *, key: PRNGKeyArray,
    settings: TrainSettings | None = None, n_epochs_kl_warmup: int = 400,
) -> FitResult:
    """Train scANVI on the shared loop with `SCANVI.train`'s defaults after pre-training (module docstring).

    **Arguments:**

    - `model`: from `scanvi_from_vae`.
    - `counts`: `(n_cells, n_genes)` raw counts (dense or SciPy sparse); `batch_labels` their batch codes (None
      for one batch).
    - `labels`: `(n_cells,)` integer codes into `model.cell_types`, -1 for unlabelled cells (`label_codes`).
    - `key`: PRNG key. (Keyword only argument.)
    - `settings`: the loop's settings (None fields take the defaults above).
    - `n_epochs_kl_warmup`: epochs of the linear KL warm-up from 0 (scvi-tools: 400).
    """
    checked, batches = _prepare(model.vae, counts, batch_labels)
    n_cells = checked.shape[0]
    codes = np.asarray(labels, dtype=np.int32).ravel()
    if codes.shape != (n_cells,) or codes.min(initial=0) < -1 or codes.max(initial=0) >= model.n_labels:
        raise ValueError(f"labels: expected {n_cells} codes in [-1, {model.n_labels})")
    if not (codes >= 0).any():
        raise ValueError("labels: no cell is labelled")
    epochs = int(min(10, max(2, round(vae_default_epochs(n_cells) / 3.0))))
    defaults = TrainSettings(
        n_epochs=epochs, batch_size=128, optimizer=shared_optimizer(),
        hyperparameters={"learning_rate": 1e-3, "weight_decay": 1e-6, "eps": 0.01}, validation_fraction=0.1,
        description="scANVI",
    )
    settings = (TrainSettings() if settings is None else settings).filled(defaults)

    def context(epoch: int) -> dict[str, Array]:
        return {"kl_weight": jnp.asarray(kl_warmup_weight(epoch, n_epochs_kl_warmup), dtype=model.vae.dtype)}

    trainable = jtu.tree_map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(lambda m: (m.vae.target_library_size, m.log_y_prior, m.classification_ratio),
                            trainable, replace=(False, False, False))
    data = (checked, batches, codes, log_factorial_per_cell(checked).astype(jnp.dtype(model.vae.dtype)))
    return fit(model, _SCANVILoss(), data, key=key, settings=settings, context=context, trainable=trainable)


@eqx.filter_jit
def _predict_chunk(batch: tuple[Array, Array], model: SCANVI) -> Array:
    return model(batch[0], batch[1])


def scanvi_probabilities(model: SCANVI, counts: Any, batch_labels: Any = None, *, chunk_size: int = 4096
                         ) -> Float[Array, "n_cells n_labels"]:
    """$q(y \\mid z_1)$ at the posterior mean, for any number of cells, in chunks (`predict(soft=True)`)."""
    checked, batches = _prepare(model.vae, counts, batch_labels)
    return cast(Array, map_in_chunks(_predict_chunk, (checked, batches), chunk_size=chunk_size, context=model))
