"""Solo (Bernstein et al. 2020), as scvi-tools' `SOLO.from_scvi_model` runs it (scvi-tools 1.4,
`scvi/external/solo/_model.py`):

1. simulate `doublet_ratio * n_cells` doublets by adding the raw counts of random parent pairs (drawn with
   replacement, `create_doublets`);
2. encode observed cells and doublets with the trained, frozen VAE: the posterior mean of $z$ and the log library
   size (the observed total, scVI's default `use_observed_lib_size`), concatenated;
3. train a classifier on these features (singlet 0, doublet 1): scvi-tools' `Classifier` (one hidden layer of
   128, batch norm, ReLU, dropout 0.1, two logits), cross-entropy, Adam (lr 1e-3, eps 0.01, L2 1e-6),
   minibatches of 128, 10 % held out, at most 400 epochs with early stopping after 30 epochs without a lower
   validation loss; on the shared loop `diffbio_eqx._core._train.fit`;
4. the doublet probability of each observed cell: the softmax of the logits (`predict(soft=True)`).

Batch norm: minibatch statistics while training, and at inference the statistics of the hidden layer over all
training rows, computed once after training (PyTorch keeps a running average instead).
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import scipy.sparse as sp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._core._nn import dense
from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit, map_in_chunks
from .._vae._stage import VAENormalizer, vae_latent


#: scvi-tools' `ClassifierTrainingPlan` optimiser: torch Adam with L2 weight decay 1e-6, eps 0.01, lr 1e-3.
SOLO_OPTIMIZER = optax.chain(optax.add_decayed_weights(1e-6), optax.inject_hyperparams(optax.adam)(1e-3, eps=0.01))
BATCH_NORM_EPS = 1e-3  # scvi-tools' FCLayers: BatchNorm1d(momentum=0.01, eps=0.001)


class SoloClassifier(AbstractTrainableStage):
    """scvi-tools' `Classifier(n_hidden=128, n_layers=1, n_labels=2, logits=True)`: Linear, batch norm, ReLU,
    dropout, Linear. `__call__(features) -> (n_cells, 2)` logits; `loss((features, labels), *, key)`."""

    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    norm_scale: Float[Array, " n_hidden"]
    norm_shift: Float[Array, " n_hidden"]
    norm_mean: Float[Array, " n_hidden"]
    norm_var: Float[Array, " n_hidden"]
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, n_input: int, *, n_hidden: int = 128, dropout_rate: float = 0.1, key: PRNGKeyArray):
        hidden_key, output_key = jr.split(key)
        self.hidden = eqx.nn.Linear(n_input, n_hidden, key=hidden_key)
        self.output = eqx.nn.Linear(n_hidden, 2, key=output_key)
        self.norm_scale, self.norm_shift = jnp.ones(n_hidden), jnp.zeros(n_hidden)
        self.norm_mean, self.norm_var = jnp.zeros(n_hidden), jnp.ones(n_hidden)
        self.dropout_rate = float(dropout_rate)

    def _normalize(self, h: Array, mean: Array, var: Array) -> Array:
        return (h - mean) / jnp.sqrt(var + BATCH_NORM_EPS) * self.norm_scale[None, :] + self.norm_shift[None, :]

    def __call__(self, features: Float[Array, "n_cells n_features"], *, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> Float[Array, "n_cells 2"]:
        """Logits; `inference=True` uses the population batch-norm statistics and no dropout, `inference=False`
        (training, the stage contract's default) the minibatch's statistics and dropout (needs `key`)."""
        h = dense(features, self.hidden)
        if inference:
            h = self._normalize(h, self.norm_mean[None, :], self.norm_var[None, :])
        else:
            h = self._normalize(h, jnp.mean(h, axis=0, keepdims=True), jnp.var(h, axis=0, keepdims=True))
        h = jax.nn.relu(h)
        if not inference and self.dropout_rate > 0:
            if key is None:
                raise ValueError("key: SoloClassifier needs a key for dropout when training")
            keep = jr.bernoulli(key, 1 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1 - self.dropout_rate), 0.0)
        return dense(h, self.output)

    def loss(self, batch: Any, /, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Array]]:
        """Mean cross-entropy of the labels (0 singlet, 1 doublet) under training-mode logits."""
        features, labels = batch
        labels = labels.astype(jnp.int32)
        logits = self(features, key=key, inference=False)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        correct = jnp.argmax(logits, axis=1).astype(jnp.int32) == labels
        return loss, {"accuracy": jnp.mean(correct.astype(logits.dtype))}


def _classifier_loss(model: SoloClassifier, batch: tuple[Array, ...], context: None, *, key: PRNGKeyArray
                     ) -> tuple[Array, dict[str, Array]]:
    del context
    return model.loss(batch, key=key)


def _hidden_chunk(batch: tuple[Array], model: SoloClassifier) -> Array:
    return dense(batch[0], model.hidden)


def with_population_statistics(model: SoloClassifier, features: Float[Array, "n_cells n_features"]
                               ) -> SoloClassifier:
    """The classifier with its batch-norm inference statistics set to the hidden layer's over `features`."""
    h = map_in_chunks(_hidden_chunk, (features,), chunk_size=8192, context=model)
    return eqx.tree_at(lambda m: (m.norm_mean, m.norm_var), model, (jnp.mean(h, axis=0), jnp.var(h, axis=0)))


def solo_features(vae: VAENormalizer, counts: Any) -> Float[Array, "n_cells n_features"]:
    """Step 2: `[posterior mean of z, log library size]` for each row of `counts` (the VAE is not trained)."""
    latent = vae_latent(vae, counts)
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float32)
    return jnp.concatenate([latent, jnp.log(jnp.maximum(jnp.asarray(totals), 1.0))[:, None].astype(latent.dtype)],
                           axis=1)


@dataclasses.dataclass(frozen=True)
class SoloResult:
    """Solo's output: `doublet_probability` `(n_cells,)`, `doublet_probability_sim` `(n_sim,)`, the trained
    `classifier`, its `fit` record and the `parents` `(n_sim, 2)` of the simulated doublets."""

    doublet_probability: np.ndarray
    doublet_probability_sim: np.ndarray
    classifier: SoloClassifier
    fit: FitResult
    parents: np.ndarray


def solo_training_settings(settings: TrainSettings | None) -> TrainSettings:
    """scvi-tools SOLO's training defaults under the given settings."""
    defaults = TrainSettings(n_epochs=400, batch_size=128, optimizer=SOLO_OPTIMIZER, validation_fraction=0.1,
                             early_stopping_patience=30, description="Solo classifier")
    return (settings or TrainSettings()).filled(defaults)


def fit_solo_classifier(classifier: SoloClassifier, data: tuple[Array, Array], *, key: PRNGKeyArray,
                        settings: TrainSettings | None = None) -> FitResult:
    """Train Solo's classifier on `data = (features, labels)` (label 1: simulated doublet) on the shared loop with
    SOLO's defaults (`solo_training_settings`); the returned model's batch-norm statistics are the population's
    over all `features` (`with_population_statistics`)."""
    fitted = fit(classifier, _classifier_loss, data, key=key, settings=solo_training_settings(settings))
    return eqx.tree_at(lambda f: f.model, fitted, with_population_statistics(fitted.model, data[0]))


def run_solo(vae: VAENormalizer, counts: Any, *, key: PRNGKeyArray, doublet_ratio: int = 2,
             settings: TrainSettings | None = None, parents: Int[Any, "n_sim 2"] | None = None) -> SoloResult:
    """Solo on raw `counts` `(n_cells, n_genes)` with a trained `vae` (steps 1-4 of the module docstring).

    `parents` replaces the random parent pairs (e.g. to compare with scvi-tools on the same doublets).
    """
    matrix: Any = sp.csr_matrix(counts, dtype=np.float32)
    n_cells = matrix.shape[0]
    pair_key, init_key, fit_key = jr.split(key, 3)
    if parents is None:
        parents = np.asarray(jr.randint(pair_key, (doublet_ratio * n_cells, 2), 0, n_cells))
    parents = np.asarray(parents)
    doublets = sp.csr_matrix(matrix[parents[:, 0]] + matrix[parents[:, 1]])
    features = jnp.concatenate([solo_features(vae, matrix), solo_features(vae, doublets)])
    labels = jnp.concatenate([jnp.zeros(n_cells, jnp.int32), jnp.ones(parents.shape[0], jnp.int32)])
    fitted = fit_solo_classifier(SoloClassifier(features.shape[1], key=init_key), (features, labels), key=fit_key,
                                 settings=settings)
    model = fitted.model
    probability = np.asarray(jax.nn.softmax(model(features, inference=True), axis=1)[:, 1], dtype=np.float64)
    return SoloResult(probability[:n_cells], probability[n_cells:], model, fitted, parents)
