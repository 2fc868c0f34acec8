"""Supervised pieces for end-to-end training: the clustering stage started from labelled cells (cluster k = cell
type k), and a learnable soft gene gate with a classifier head on the VAE latent.

The gate is the hard-concrete distribution of Louizos, Welling & Kingma (2018, "Learning sparse neural networks
through L0 regularization"): a stretched, clipped binary-concrete variable per gene, `u ~ U(0, 1)`,
`s = sigmoid((log u - log(1 - u) + log_alpha) / beta)`, `z = clip(s (zeta - gamma) + gamma, 0, 1)`, with
`beta = 2/3, gamma = -0.1, zeta = 1.1`; its expected number of open gates
`sum_g sigmoid(log_alpha_g - beta log(-gamma / zeta))` is the L0 penalty. At inference the gate is
`clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)`. As in stochastic gates (Yamada et al. 2020) it
multiplies the input features, here the counts the VAE's encoder reads; the VAE still reconstructs every gene.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._clustering._mixture_stage import GaussianMixture
from .._clustering._stage import SoftKMeans
from .._core._train import FitResult, TrainSettings, fit
from .._vae._stage import VAENormalizer


_BETA, _GAMMA, _ZETA = 2.0 / 3.0, -0.1, 1.1


def clustering_from_labels(
    stage: GaussianMixture | SoftKMeans, corrected: Float[ArrayLike, "n_cells latent_dim"],
    cell_type_labels: Int[ArrayLike, " n_cells"],
) -> GaussianMixture | SoftKMeans:
    """The clustering stage with cluster `k` placed on the labelled cells of type `k` (labels of -1 ignored):
    centroids / means at the type means, and for the Gaussian mixture each type's per-dimension variance and
    share of the labelled cells. A type with no labelled cell keeps its current parameters."""
    x = np.asarray(corrected, dtype=np.float64)
    labels = np.asarray(cell_type_labels)
    n_types = stage.n_clusters
    counts = np.bincount(labels[labels >= 0], minlength=n_types)[:n_types]
    seen = counts > 0
    dtype = stage.temperature.dtype
    means = np.array(stage.centroids if isinstance(stage, SoftKMeans) else stage.means, dtype=np.float64)
    for k in np.flatnonzero(seen):
        means[k] = x[labels == k].mean(axis=0)
    if isinstance(stage, SoftKMeans):
        return eqx.tree_at(lambda s: s.centroids, stage, jnp.asarray(means, dtype))
    variances = np.array(stage.variances, dtype=np.float64)
    floor = 1e-3 * x.var(axis=0).mean()
    for k in np.flatnonzero(seen):
        variances[k] = x[labels == k].var(axis=0) + floor
    weights = np.where(seen, counts, 1.0) / np.sum(np.where(seen, counts, 1.0))
    return eqx.tree_at(lambda s: (s.means, s.variances, s.log_weights), stage,
                       (jnp.asarray(means, dtype), jnp.asarray(variances, dtype), jnp.asarray(np.log(weights), dtype)))


class SoftGeneGate(eqx.Module):
    """A hard-concrete gate per gene (`log_alpha`, trained); `gate(key=...)` draws gates in [0, 1], `gate()` the
    deterministic inference gate, `expected_open()` the expected number of open gates (the L0 penalty)."""

    log_alpha: Float[Array, " n_genes"]

    def __init__(self, n_genes: int, *, initial_open: float = 0.9, dtype: Any = None):
        if not 0.0 < initial_open < 1.0:
            raise ValueError(f"initial_open: must be in (0, 1), got {initial_open!r}")
        logit = math.log(initial_open / (1.0 - initial_open))
        self.log_alpha = jnp.full((n_genes,), logit, dtype=dtype)

    def __call__(self, *, key: PRNGKeyArray | None = None) -> Float[Array, " n_genes"]:
        if key is None:
            s = jax.nn.sigmoid(self.log_alpha)
        else:
            u = jr.uniform(key, self.log_alpha.shape, self.log_alpha.dtype, 1e-6, 1.0 - 1e-6)
            s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + self.log_alpha) / _BETA)
        return jnp.clip(s * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def expected_open(self) -> Float[Array, ""]:
        return jnp.sum(jax.nn.sigmoid(self.log_alpha - _BETA * math.log(-_GAMMA / _ZETA)))


class GatedClassifier(eqx.Module):
    """A soft gene gate (optional) in front of a VAE's encoder, and a linear cell-type head on the latent mean."""

    gate: SoftGeneGate | None
    vae: VAENormalizer
    head: eqx.nn.Linear

    def __init__(self, vae: VAENormalizer, n_types: int, *, key: PRNGKeyArray, gate: bool = True):
        self.vae = vae
        self.gate = SoftGeneGate(vae.n_genes, dtype=vae.dtype) if gate else None
        self.head = eqx.nn.Linear(vae.latent_dim, n_types, key=key, dtype=vae.dtype)

    def gated(self, counts: Float[Array, "n_cells n_genes"], *,
              key: PRNGKeyArray | None = None) -> Float[Array, "n_cells n_genes"]:
        """The counts the encoder reads: gated by drawn gates with a key, by the inference gate without."""
        return counts if self.gate is None else counts * self.gate(key=key)[None, :]

    def latent(self, counts: Float[ArrayLike, "n_cells n_genes"],
               batch_labels: Int[ArrayLike, " n_cells"]) -> Float[Array, "n_cells latent_dim"]:
        """The posterior mean of the gated counts, with the inference gate (what the head reads)."""
        counts = jnp.asarray(counts, self.vae.dtype)
        onehot = self.vae._batch_onehot(jnp.asarray(batch_labels), counts.shape[0])
        mean, _ = self.vae.encode(self.gated(counts), onehot, inference=True)
        return mean

    def predict(self, counts: Float[ArrayLike, "n_cells n_genes"],
                batch_labels: Int[ArrayLike, " n_cells"]) -> Int[Array, " n_cells"]:
        return jnp.argmax(jax.vmap(self.head)(self.latent(counts, batch_labels)), axis=1)


def gated_classifier_loss(model: GatedClassifier, batch: tuple[Array, Array, Array], context: tuple[Array, Array],
                          *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """VAE negative ELBO (the encoder reads the gated counts, the decoder reconstructs all of them) plus
    `supervised_weight` x the cross-entropy of the head on the labelled cells (label -1: unlabelled) plus
    `l0_weight` x the expected fraction of open gates."""
    supervised_weight, l0_weight = context
    counts, batch_labels, labels = batch
    gate_key, vae_key = jr.split(key)
    terms = model.vae.terms((counts, batch_labels), key=vae_key, inference=True,
                            encoder_counts=model.gated(counts, key=gate_key))
    logits = jax.vmap(model.head)(terms.mean)
    elbo_loss = jnp.mean(terms.reconstruction + terms.kl)
    onehot_types = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
    per_cell = -jnp.sum(onehot_types * jax.nn.log_softmax(logits, axis=1), axis=1)
    cross_entropy = jnp.sum(per_cell) / jnp.maximum(jnp.sum(labels >= 0), 1).astype(logits.dtype)
    open_share = (jnp.zeros((), logits.dtype) if model.gate is None
                  else model.gate.expected_open() / model.gate.log_alpha.shape[0])
    loss = elbo_loss + supervised_weight * cross_entropy + l0_weight * open_share
    return loss, {"elbo": elbo_loss, "cross_entropy": cross_entropy, "open_share": open_share}


def fit_gated_classifier(
    model: GatedClassifier, counts: Any, batch_labels: Any, cell_type_labels: Any, *, key: PRNGKeyArray,
    settings: TrainSettings, supervised_weight: float = 10.0, l0_weight: float = 1.0,
) -> FitResult:
    """Train the gate, the VAE and the head together on `gated_classifier_loss` (labels of -1: unlabelled).

    `settings` needs `n_epochs`; the rest defaults to the shared loop's (batch 128, learning rate 1e-3)."""
    if not (isinstance(settings.n_epochs, int) and settings.n_epochs >= 1):
        raise ValueError(f"settings.n_epochs: must be a positive integer, got {settings.n_epochs!r}")
    dtype = model.vae.dtype
    settings = settings.filled(TrainSettings(batch_size=128, hyperparameters={"learning_rate": 1e-3},
                                             description="gated classifier"))
    trainable = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(lambda m: m.vae.target_library_size, trainable, False)
    return fit(model, gated_classifier_loss,
               (np.asarray(counts, dtype=dtype), np.asarray(batch_labels, np.int32),
                np.asarray(cell_type_labels, np.int32)),
               key=key, settings=settings,
               context=(jnp.asarray(supervised_weight, dtype), jnp.asarray(l0_weight, dtype)), trainable=trainable)
