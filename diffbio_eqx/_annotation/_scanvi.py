"""scANVI (Xu et al. 2021) on the package's VAE, faithful to scvi-tools' `SCANVAE` (scvi-tools 1.4).

Generative model: $y \\sim \\mathrm{Cat}(\\pi)$ (uniform), $z_2 \\sim N(0, I)$, $z_1 \\mid z_2, y \\sim
N(\\mu(z_2, y), \\sigma^2(z_2, y))$, $x \\mid z_1 \\sim$ the VAE's decoder (`VAENormalizer`). Inference:
$q(z_1 \\mid x)$ the VAE's encoder, $q(y \\mid z_1)$ a classifier (scvi-tools' `Classifier`: one hidden layer of
128 with batch normalisation, ReLU, dropout 0.1), $q(z_2 \\mid z_1, y)$ an encoder with the label one-hot as
covariate.

Loss per minibatch (scvi-tools' `SCANVAE.loss`): for every cell, $y$ is marginalised with $q(y \\mid z_1)$,

$$-\\log p(x \\mid z_1) + \\log q(z_1 \\mid x) + \\sum_y q(y \\mid z_1)\\big[-\\log p(z_1 \\mid z_2, y)
+ w\\,\\mathrm{KL}(q(z_2 \\mid z_1, y) \\| N(0, I))\\big] + w\\,\\mathrm{KL}(q(y \\mid z_1) \\| \\pi),$$

averaged over cells, plus `classification_ratio` (50) times the cross-entropy of the classifier on the posterior
means of a second minibatch of labelled cells, drawn each step from the labelled training cells as scvi-tools'
`SemiSupervisedDataLoader` does (here with replacement; scvi-tools cycles through them shuffled).

The classifier's batch normalisation (scvi-tools' `FCLayers`, eps 1e-3) normalises with the minibatch's statistics
in training, as torch's does. torch keeps running averages (momentum 0.01) for prediction; this loop keeps no
mutable state, so `fit_scanvi` computes the population statistics of the training cells' posterior means after
training instead (the "precise" statistics that the running averages approximate; from a random 16,384 of them
when there are more, about the 100 minibatches torch's averages weigh). Without it, the classifier
learns several times slower from a VAE trained briefly: after one VAE epoch and two scANVI epochs on 10,000
simulated cells, 0.78 of the hidden labels right without it, 0.97 with it (scvi-tools 0.976). Differences from
scvi-tools, on purpose: no batch normalisation in the VAE (as the package's VAE) nor in the $z_2$ networks.

`scanvi_from_vae` starts from a trained `VAENormalizer` as `SCANVI.from_scvi_model` does (encoder, decoder and
dispersions copied; the new parts fresh), and `fit_scanvi` trains with `SCANVI.train`'s defaults after
pre-training: `min(10, max(2, round(e / 3)))` epochs for the VAE's heuristic `e`, batch 128, AdamW (1e-3, eps
0.01, weight decay 1e-6), 10 % of the labelled and of the unlabelled cells held out (scvi-tools'
`SemiSupervisedDataSplitter`; like scvi-tools without early stopping, their loss is not computed), the KL weight
rising over 400 epochs from 0.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._distributions import reparameterize
from .._core._nn import CovariateMLP, dense
from .._core._random import bits
from .._core._stage import AbstractTrainableStage
from .._core._train import (
    DeviceRows,
    FitResult,
    SparseRows,
    TrainSettings,
    fit,
    map_in_chunks,
    shared_optimizer,
    take_rows,
    to_device_rows,
    tuned_jit,
)
from .._vae._stage import (
    VAENormalizer,
    _prepare,
    gaussian_kl,
    kl_warmup_weight,
    log_factorial_per_cell,
    vae_default_epochs,
)


_VAR_EPS = 1e-4
_BATCH_NORM_EPS = 1e-3  # torch's BatchNorm1d in scvi-tools' FCLayers (eps=0.001)
# Training cells whose posterior means give the classifier's population statistics after `fit_scanvi` (all of them
# up to this many, else a random sample): torch's running averages (momentum 0.01) weigh about the last 100
# minibatches, 12,800 cells.
_POPULATION_SAMPLE = 16_384


def gaussian_log_prob(
    x: Float[Array, "*shape dim"], mean: Float[Array, "*shape dim"], log_variance: Float[Array, "*shape dim"]
) -> Float[Array, " *shape"]:
    """$\\sum_k \\log N(x_k; m_k, e^{v_k})$."""
    return jnp.sum(-0.5 * ((x - mean) ** 2 * jnp.exp(-log_variance) + log_variance + math.log(2 * math.pi)), -1)


def dropout16(x: Float[Array, "*shape"], rate: float, *, key: PRNGKeyArray) -> Float[Array, "*shape"]:
    """Inverted dropout with 16-bit uniforms: each 32-bit random word gives the masks of two entries (half the
    threefry evaluations of `eqx.nn.Dropout`, which draws a float per entry). An entry is dropped when its 16 bits
    are below `round(rate * 2**16)`, so the drop probability is `rate` to within 2**-17 (0.1: 0.100006), and the
    kept entries are scaled by the inverse of the exact keep probability (the expectation is unbiased)."""
    threshold = round(rate * 65536)
    if threshold == 0:
        return x
    n_words = -(-x.size // 2)
    # XLA's CPU compiler fuses the (unrolled) hash into the halves' concatenation, so each word is hashed once per
    # half (an optimisation barrier does not stop it: the CPU pipeline removes barriers before fusion).
    words = bits(key, (n_words,), jnp.uint32)
    halves = jnp.concatenate([words & 0xFFFF, words >> 16])[: x.size].reshape(x.shape)
    keep = 1.0 - threshold / 65536
    return jnp.where(halves >= threshold, x * (1.0 / keep), jnp.zeros((), x.dtype))


def _dense(x: Float[Array, "*rows n_in"], layer: eqx.nn.Linear) -> Float[Array, "*rows n_out"]:
    """`dense` for inputs of any rank (the bias broadcast explicitly)."""
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias.reshape((1,) * (x.ndim - 1) + (-1,))


def _label_layer(layer: eqx.nn.Linear, x: Float[Array, "#n_labels n_cells n_in"]
                 ) -> Float[Array, "n_labels n_cells n_out"]:
    """`layer([x, onehot(y)])` for every label `y` (the covariate columns last, as `CovariateMLP` concatenates
    them): the product with `x`'s columns once per row of `x` (a leading axis of 1 is shared by all labels) plus
    the weights' column of label `y` and the bias."""
    n_in = x.shape[-1]
    shared = x @ layer.weight[:, :n_in].T
    per_label = layer.weight[:, n_in:].T
    if layer.bias is not None:
        per_label = per_label + layer.bias[None, :]
    return shared + per_label[:, None, :]


def _label_network(mlp: CovariateMLP, x: Float[Array, "#n_labels n_cells n_in"], n_labels: int, *,
                   key: PRNGKeyArray | None, inference: bool | None) -> Float[Array, "n_labels n_cells n_out"]:
    """`mlp(x, onehot(y))` for every label `y` at once (the label one-hot as covariates of the first layer only),
    with `_label_layer` as its first layer; dropout by `dropout16`."""
    if mlp.n_covariates != n_labels or mlp.inject_all_layers or mlp.use_layer_norm:
        raise ValueError("mlp: expected the label one-hot as covariates of the first layer only, no layer norm")
    inference = mlp.dropout.inference if inference is None else inference
    keys = (None,) * len(mlp.layers) if key is None or inference else tuple(jr.split(key, len(mlp.layers)))
    h = x
    for i, (layer, layer_key) in enumerate(zip(mlp.layers, keys, strict=True)):
        h = jax.nn.relu(_label_layer(layer, h) if i == 0 else _dense(h, layer))
        if layer_key is not None:
            h = dropout16(h, float(mlp.dropout.p), key=layer_key)
    return h


class LabelClassifier(eqx.Module):
    """scvi-tools' `Classifier` with one hidden layer: `Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear`, giving
    logits.

    In training the batch normalisation uses the minibatch's mean and (biased) variance; with `inference=True` the
    stored population `mean` and `variance` (set by `with_population_statistics`; 0 and 1 before, as torch's
    running statistics start), unless `batch_statistics=True`. `scale` and `shift` are its affine parameters.
    """

    hidden: eqx.nn.Linear
    scale: Float[Array, " n_hidden"]
    shift: Float[Array, " n_hidden"]
    mean: Float[Array, " n_hidden"]
    variance: Float[Array, " n_hidden"]
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(self, n_in: int, n_hidden: int, n_labels: int, *, dropout_rate: float, dtype: Any,
                 key: PRNGKeyArray):
        hidden_key, head_key = jr.split(key)
        self.hidden = eqx.nn.Linear(n_in, n_hidden, dtype=dtype, key=hidden_key)
        self.scale, self.shift = jnp.ones((n_hidden,), dtype), jnp.zeros((n_hidden,), dtype)
        self.mean, self.variance = jnp.zeros((n_hidden,), dtype), jnp.ones((n_hidden,), dtype)
        self.dropout = eqx.nn.Dropout(dropout_rate)
        self.head = eqx.nn.Linear(n_hidden, n_labels, dtype=dtype, key=head_key)

    def __call__(self, z: Float[Array, "n_cells n_in"], *, key: PRNGKeyArray | None = None,
                 inference: bool | None = None, batch_statistics: bool | None = None
                 ) -> Float[Array, "n_cells n_labels"]:
        inference = self.dropout.inference if inference is None else inference
        batch_statistics = not inference if batch_statistics is None else batch_statistics
        h = dense(z, self.hidden)
        mean, variance = (jnp.mean(h, 0), jnp.var(h, 0)) if batch_statistics else (self.mean, self.variance)
        factor = jax.lax.rsqrt(variance + _BATCH_NORM_EPS) * self.scale
        h = (h - mean[None, :]) * factor[None, :] + self.shift[None, :]
        h = jax.nn.relu(h)
        if not inference:
            if key is None:
                raise ValueError("key: the classifier's dropout needs a key in training")
            h = dropout16(h, float(self.dropout.p), key=key)
        return dense(h, self.head)


class SCANVI(AbstractTrainableStage):
    """scANVI: the VAE with the label $y$ and the second latent $z_2$ (see the module docstring).

    `model(counts, batch_labels)` gives the label probabilities $q(y \\mid z_1)$ at the posterior mean of $z_1$
    (scvi-tools' `predict(soft=True)`); `model.loss((counts, batch_labels, labels[, log_factorial]), key=...)`
    the training objective, with `labels` -1 for unlabelled cells.
    """

    vae: VAENormalizer
    classifier: LabelClassifier
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
        keys = jr.split(key, 7)
        self.vae = vae
        self.classifier = LabelClassifier(latent, n_hidden, n_labels, dropout_rate=dropout_rate, dtype=dtype,
                                          key=keys[0])
        self.encoder_z2 = CovariateMLP(latent, (n_hidden,), n_labels, dropout_rate=dropout_rate, dtype=dtype,
                                       key=keys[1])
        self.z2_mean_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[2])
        self.z2_log_variance_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[3])
        self.decoder_z1 = CovariateMLP(latent, (n_hidden,), n_labels, dtype=dtype, key=keys[4])
        self.z1_mean_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[5])
        self.z1_log_variance_head = eqx.nn.Linear(n_hidden, latent, dtype=dtype, key=keys[6])
        self.log_y_prior = jnp.full((n_labels,), -math.log(n_labels), dtype)
        self.classification_ratio = jnp.asarray(classification_ratio, dtype)
        self.cell_types = tuple(str(c) for c in cell_types)

    @property
    def n_labels(self) -> int:
        return len(self.cell_types)

    def classify(self, z1: Float[Array, "n_cells latent_dim"], *, key: PRNGKeyArray | None = None,
                 inference: bool | None = None, batch_statistics: bool | None = None
                 ) -> Float[Array, "n_cells n_labels"]:
        """The classifier's logits $\\log q(y \\mid z_1)$ up to a constant (`LabelClassifier`)."""
        return self.classifier(z1, key=key, inference=inference, batch_statistics=batch_statistics)

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
        each `(n_labels, n_cells)`.

        scvi-tools feeds the networks `[z_1, \\mathrm{onehot}(y)]` for every (label, cell) pair. Their first layers
        are split accordingly (`_label_layer`): the $z$ part is one product per cell (the encoder's: over the
        cells, not over all pairs) and the one-hot part a column of the weights per label, broadcast."""
        n_labels, (n_cells, latent) = self.n_labels, z1.shape
        dropout_key, sample_key = jr.split(key)
        h = _label_network(self.encoder_z2, z1[None, :, :], n_labels, key=dropout_key, inference=inference)
        h = h.reshape(n_labels * n_cells, h.shape[-1])  # rows: label-major, as scvi-tools' `broadcast_labels`
        mean2 = dense(h, self.z2_mean_head)
        log_var2 = jnp.logaddexp(dense(h, self.z2_log_variance_head), math.log(_VAR_EPS))
        z2 = reparameterize(mean2, log_var2, key=sample_key)
        g = _label_network(self.decoder_z1, z2.reshape(n_labels, n_cells, latent), n_labels, key=None,
                           inference=True)
        z1_mean, z1_log_var = _dense(g, self.z1_mean_head), _dense(g, self.z1_log_variance_head)
        unweighted = -gaussian_log_prob(jnp.broadcast_to(z1[None, :, :], z1_mean.shape), z1_mean, z1_log_var)
        return unweighted, gaussian_kl(mean2, log_var2).reshape(n_labels, n_cells)

    def _cross_entropy(self, mean: Array, labels: Array, *, key: PRNGKeyArray, inference: bool) -> Array:
        """Mean cross-entropy of the classifier at the posterior means `mean` over the cells with `labels` >= 0."""
        logits = jax.nn.log_softmax(self.classify(mean, key=key, inference=inference, batch_statistics=True), -1)
        known = labels >= 0
        picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
        n_known = jnp.maximum(jnp.sum(known), 1).astype(logits.dtype)
        return -jnp.sum(jnp.where(known, picked, 0.0)) / n_known

    def loss(
        self, batch: tuple[Array, ...], /, *, key: PRNGKeyArray, kl_weight: Float[ArrayLike, ""] = 1.0,
        inference: bool = False, labelled: tuple[Array, Array, Array] | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """scvi-tools' `SCANVAE.loss` (see the module docstring); `batch` is `(counts, batch_labels, labels[,
        log_factorial])` with `labels` -1 where unknown. `labelled`: the labelled minibatch `(counts, batch_labels,
        labels)` of the cross-entropy; None takes the labelled cells of `batch`. The classifier's batch
        normalisation uses the minibatches' statistics, also with `inference=True` (validation)."""
        counts, batch_labels, labels = batch[0], batch[1], batch[2]
        log_factorial = batch[3] if len(batch) > 3 else None
        if labelled is None:
            labelled = (counts, batch_labels, labels)
        # One encoder pass over both minibatches (each row draws its own dropout mask, as two passes would).
        both = jnp.concatenate([counts, labelled[0].astype(counts.dtype)])
        both_batches = jnp.concatenate([batch_labels, labelled[1].astype(batch_labels.dtype)])
        both = both.astype(self.vae.dtype)
        return self._loss(both[: counts.shape[0]], jnp.log1p(both), both_batches, labelled[2], log_factorial,
                          key=key, kl_weight=kl_weight, inference=inference)

    def _loss(
        self, counts: Array, log_both: Array, both_batches: Array, labels: Array, log_factorial: Array | None, *,
        key: PRNGKeyArray, kl_weight: Float[ArrayLike, ""], inference: bool,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """`loss` on the two minibatches: `counts` the ELBO's cells, `log_both` `log1p` of those then of the
        labelled cells (the encoder's input), `labels` the latter's labels."""
        vae = self.vae
        n_cells = counts.shape[0]
        encode_key, sample_key, label_key, class_key, ce_key = jr.split(key, 5)
        means, log_vars = _encode_log(vae, log_both.astype(vae.dtype), both_batches, key=encode_key,
                                      inference=inference)
        mean, log_var = means[:n_cells], log_vars[:n_cells]
        counts, batch_labels = counts.astype(vae.dtype), both_batches[:n_cells]
        z1 = reparameterize(mean, log_var, key=sample_key)
        onehot = vae._batch_onehot(batch_labels, n_cells)
        reconstruction = -vae._reconstruction_log_likelihood(counts, z1, onehot, batch_labels, log_factorial)
        z1_unweighted, kl_z2 = self._label_terms(z1, key=label_key, inference=inference)
        logits = self.classify(z1, key=class_key, inference=inference, batch_statistics=True)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        probs = jnp.exp(log_probs)
        reconstruction = reconstruction + gaussian_log_prob(z1, mean, log_var) + jnp.sum(probs * z1_unweighted.T, 1)
        kl = jnp.sum(probs * kl_z2.T, axis=1) + jnp.sum(probs * (log_probs - self.log_y_prior[None, :]), axis=1)
        weight = jnp.asarray(kl_weight).astype(reconstruction.dtype)
        elbo_loss = jnp.mean(reconstruction + weight * kl)
        cross_entropy = self._cross_entropy(means[n_cells:], labels, key=ce_key, inference=inference)
        loss = elbo_loss + self.classification_ratio * cross_entropy
        return loss, {"elbo_loss": elbo_loss, "classification_loss": cross_entropy}


class _Cells(eqx.Module):
    """The whole data set on the device, read by row numbers: counts, batch codes, label codes (-1: unlabelled) and
    per-cell log-factorials. The counts are `SparseRows` (then also `log1p` of their non-zeros, the encoder's input,
    computed once instead of on every minibatch; zeros stay zeros), a float matrix, or whole-number counts as a
    dense uint8/uint16 matrix (`_compact_counts`; `value_dtype` is then the float dtype they stand for)."""

    counts: DeviceRows
    batch_labels: Int[Array, " n_cells"]
    labels: Int[Array, " n_cells"]
    log_factorial: Float[Array, " n_cells"]
    log_counts: SparseRows | None = None
    value_dtype: Any = eqx.field(static=True, default=None)

    def take_counts(self, rows: Int[Array, " n_rows"]) -> Array:
        """The counts of `rows`, dense."""
        counts = take_rows(self.counts, rows)
        return counts if self.value_dtype is None else counts.astype(self.value_dtype)

    def take(self, rows: Int[Array, " n_rows"]) -> tuple[Array, Array, Array, Array]:
        return (self.take_counts(rows), self.batch_labels[rows], self.labels[rows], self.log_factorial[rows])

    def take_log(self, rows: Int[Array, " n_rows"]) -> Array:
        """`log1p` of the counts of `rows`."""
        if self.value_dtype is not None:
            # Whole numbers: 1 + x is exact, so log(1 + x) is log1p(x) (bit for bit on XLA's CPU, checked for every
            # whole number below 2**17 in float32 and float64), and vectorised, which XLA's log1p is not.
            return jnp.log(1 + self.take_counts(rows))
        if self.log_counts is None:
            return jnp.log1p(take_rows(self.counts, rows))
        return take_rows(self.log_counts, rows)


def _with_log_counts(cells: _Cells) -> _Cells:
    counts = cells.counts
    if not isinstance(counts, SparseRows):
        return cells
    log_counts = SparseRows(jnp.log1p(counts.data), counts.indices, counts.indptr, counts.n_columns, counts.max_nnz)
    return dataclasses.replace(cells, log_counts=log_counts)


# Bytes a non-zero takes in the sparse layout: its value and its log1p (float32 each) and its column (int16).
_SPARSE_BYTES_PER_NONZERO = 10


def _compact_counts(counts: Any) -> np.ndarray | None:
    """`counts` as a dense uint8 matrix (all below 256; else uint16, below 65,536) when they are whole numbers >= 0
    and, for sparse counts, the dense matrix takes no more memory than the sparse rows with their log1p copy
    (`_SPARSE_BYTES_PER_NONZERO` a non-zero; at 25 % non-zeros, a quarter of it); None otherwise.

    A minibatch is then a gather of whole rows. From sparse rows every non-zero is scattered into a dense block:
    for a scANVI step's 256 + 128 rows of 2,000 genes (25 % non-zeros) that cost about 2 CPU ms, an eighth of
    the step."""
    sparse = sp.issparse(counts)
    if sparse and not (isinstance(counts, sp.csr_matrix) and counts.has_canonical_format):
        return None
    data = counts.data if sparse else np.asarray(counts)
    if data.size == 0 or not np.issubdtype(data.dtype, np.number) or data.min() < 0 or data.max() >= 65536:
        return None
    dtype = np.dtype(np.uint8 if data.max() < 256 else np.uint16)
    n_rows, n_columns = cast(tuple[int, int], counts.shape)
    if sparse and n_rows * n_columns * dtype.itemsize > _SPARSE_BYTES_PER_NONZERO * data.size:
        return None
    whole = data.astype(dtype)
    if not np.array_equal(whole, data):
        return None
    if not sparse:
        return whole
    return sp.csr_matrix((whole, counts.indices, counts.indptr), shape=(n_rows, n_columns)).toarray()


def _device_cells(checked: Any, batches: Any, codes: np.ndarray, log_factorial: np.ndarray, dtype: Any) -> _Cells:
    """`_Cells` of the checked counts: compact (`_compact_counts`) where they allow it, else `SparseRows` with
    their log1p (or the dense float matrix)."""
    compact = _compact_counts(checked)
    rest = (jnp.asarray(batches), jnp.asarray(codes), jnp.asarray(log_factorial, dtype=dtype))
    if compact is None:
        return _with_log_counts(_Cells(to_device_rows(checked), *rest))
    value_dtype = checked.dtype if np.issubdtype(checked.dtype, np.floating) else np.dtype(dtype)
    return _Cells(jnp.asarray(compact), *rest, value_dtype=jnp.dtype(value_dtype))


def _encode_log(vae: VAENormalizer, log_counts: Array, batch_labels: Array, *, key: PRNGKeyArray | None,
                inference: bool | None) -> tuple[Array, Array]:
    """`vae.encode` from `log1p(counts)` already taken (the VAE's encoder reads `log1p` of the counts)."""
    onehot = vae._batch_onehot(batch_labels, log_counts.shape[0])
    h = vae.encoder(log_counts, onehot if vae.encode_covariates else None, key=key, inference=inference,
                    reverse_only=True)
    return dense(h, vae.mean_head), jnp.logaddexp(dense(h, vae.log_variance_head), math.log(_VAR_EPS))


class _SCANVILoss(eqx.Module):
    """The loop's loss. The loop's data are row numbers into `context["cells"]` (a `_Cells`), so the training
    cells are never copied on the host. In training, a labelled minibatch of `batch_size` cells is drawn (with
    replacement) from the row numbers `context["labelled"]` each step; in validation, the validation
    minibatch's own labelled cells."""

    batch_size: int = eqx.field(static=True)

    def __call__(self, model: SCANVI, batch: tuple[Array, ...], context: dict[str, Any], *,
                 key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        cells: _Cells = context["cells"]
        validation = bool(model.vae.encoder.dropout.inference)
        if validation:
            return model.loss(cells.take(batch[0]), key=key, kl_weight=jnp.ones((), context["kl_weight"].dtype),
                              inference=True)
        draw_key, key = jr.split(key)
        pool = context["labelled"]
        # The ELBO's minibatch and the labelled one gathered as one block of rows.
        rows = jnp.concatenate([batch[0], pool[jr.randint(draw_key, (self.batch_size,), 0, pool.shape[0])]])
        n_cells = batch[0].shape[0]
        counts = cells.take_counts(batch[0])
        return model._loss(counts, cells.take_log(rows), cells.batch_labels[rows], cells.labels[rows[n_cells:]],
                           cells.log_factorial[batch[0]], key=key, kl_weight=context["kl_weight"], inference=False)


def scanvi_from_vae(vae: VAENormalizer, cell_types: Sequence[str], *, key: PRNGKeyArray) -> SCANVI:
    """`SCANVI.from_scvi_model`: scANVI keeping the trained VAE's encoder, decoder and dispersions."""
    return SCANVI(vae, cell_types, key=key)


def label_codes(labels: Any, cell_types: Sequence[str]) -> np.ndarray:
    """Integer codes of `labels` in `cell_types`; -1 for missing values (NaN/None) or names not in `cell_types`
    (scvi-tools' `unlabeled_category`)."""
    index = {str(c): i for i, c in enumerate(cell_types)}
    return np.asarray([index.get(str(v), -1) if v == v and v is not None else -1 for v in labels], np.int32)


def _held_in_rows(codes: np.ndarray, validation_fraction: float, key: PRNGKeyArray) -> np.ndarray:
    """The training rows (sorted) of scvi-tools' `SemiSupervisedDataSplitter`: of the labelled and of the
    unlabelled cells each, `ceil((1 - validation_fraction) * n)` drawn at random."""
    kept = []
    for part, part_key in zip((np.flatnonzero(codes >= 0), np.flatnonzero(codes < 0)), jr.split(key), strict=True):
        n_train = math.ceil((1.0 - validation_fraction) * part.size)
        kept.append(part[np.asarray(jr.permutation(part_key, part.size))[:n_train]])
    return np.sort(np.concatenate(kept))


def _log_factorial_rows(counts: Any, *, block_nnz: int = 1 << 20) -> np.ndarray:
    """$\\sum_g \\log x_g!$ per cell of CSR counts of whole numbers by a table and one reduction per row over
    the rows' non-zeros (`log_factorial_per_cell` otherwise), by blocks of rows of about `block_nnz` non-zeros:
    whole-matrix temporaries (at 100k cells, 50M non-zeros: 200 MB of integers, 400 MB of float64 values) took
    several CPU seconds in page faults alone, the blocks' buffers are reused."""
    if not sp.issparse(counts):
        return log_factorial_per_cell(counts)
    csr = cast(sp.csr_matrix, counts)
    top = float(csr.data.max(initial=0.0))
    if top > 1e6:
        return log_factorial_per_cell(counts)
    table = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(top) + 1, dtype=np.float64)))])
    indptr = np.asarray(csr.indptr, np.int64)
    n_rows = indptr.size - 1
    totals = np.zeros(n_rows)
    rows_per_block = max(1, block_nnz * n_rows // max(int(indptr[-1]), 1))
    for start in range(0, n_rows, rows_per_block):
        stop = min(n_rows, start + rows_per_block)
        data = csr.data[indptr[start] : indptr[stop]]
        whole = data.astype(np.int32)
        if not np.array_equal(whole, data):
            return log_factorial_per_cell(counts)
        values = np.append(table[whole], 0.0)  # reduceat reads one past the last row's start
        starts = np.minimum(indptr[start:stop] - indptr[start], values.size - 1)
        lengths = np.diff(indptr[start : stop + 1])
        totals[start:stop] = np.where(lengths > 0, np.add.reduceat(values, starts), 0.0)
    return totals


def fit_scanvi(
    model: SCANVI, counts: Any, batch_labels: Any, labels: Any, *, key: PRNGKeyArray,
    settings: TrainSettings | None = None, n_epochs_kl_warmup: int = 400,
) -> FitResult:
    """Train scANVI on the shared loop with `SCANVI.train`'s defaults after pre-training (module docstring), then
    set the classifier's population statistics (as `with_population_statistics`, on the training cells).

    **Arguments:**

    - `model`: from `scanvi_from_vae`.
    - `counts`: `(n_cells, n_genes)` raw counts (dense or SciPy sparse); `batch_labels` their batch codes (None
      for one batch).
    - `labels`: `(n_cells,)` integer codes into `model.cell_types`, -1 for unlabelled cells (`label_codes`).
    - `key`: PRNG key. (Keyword only argument.)
    - `settings`: the loop's settings (None fields take the defaults above). The held-out cells' loss is computed
      each epoch only with `early_stopping_patience` or `restore_best` (then the loop holds them out, and the
      labelled minibatches are drawn from all labelled cells).
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
    split_key, key = jr.split(key)
    rows = np.arange(n_cells, dtype=np.int32)
    assert settings.validation_fraction is not None and settings.batch_size is not None
    batch_size = settings.batch_size
    if settings.early_stopping_patience is None and not settings.restore_best:
        rows = _held_in_rows(codes, settings.validation_fraction, split_key).astype(np.int32)
        settings = dataclasses.replace(settings, validation_fraction=0.0)
    dtype = model.vae.dtype
    # The whole matrix goes to the device once; the loop's data are row numbers into it (no host copies).
    cells = _device_cells(checked, batches, codes, _log_factorial_rows(checked), dtype)
    pool = jnp.asarray(rows[codes[rows] >= 0])

    def context(epoch: int) -> dict[str, Any]:
        return {"kl_weight": jnp.asarray(kl_warmup_weight(epoch, n_epochs_kl_warmup), dtype=dtype),
                "labelled": pool, "cells": cells}

    trainable = jtu.tree_map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(
        lambda m: (m.vae.target_library_size, m.log_y_prior, m.classification_ratio, m.classifier.mean,
                   m.classifier.variance),
        trainable, replace=(False,) * 5)
    loss = _SCANVILoss(min(batch_size, int(pool.shape[0])))
    result = fit(model, loss, (rows,), key=key, settings=settings, context=context, trainable=trainable)
    sample = rows
    if rows.size > _POPULATION_SAMPLE:  # a random sample of the training cells (the split's key, folded)
        drawn = jr.choice(jr.fold_in(split_key, 1), rows.size, (_POPULATION_SAMPLE,), replace=False)
        sample = np.sort(rows[np.asarray(drawn)])
    fitted = _set_population_statistics(result.model, cells, jnp.asarray(sample))
    return eqx.tree_at(lambda r: r.model, result, fitted)


@eqx.filter_jit
def _predict_chunk(batch: tuple[Array, Array], model: SCANVI) -> Array:
    """$q(y \\mid z_1)$ at the posterior means of a chunk."""
    counts = batch[0].astype(model.vae.dtype)
    mean, _ = model.vae.encode(counts, model.vae._batch_onehot(batch[1], counts.shape[0]), inference=True)
    return jax.nn.softmax(model.classify(mean, inference=True), axis=-1)


@tuned_jit
def _hidden_moments(model: SCANVI, cells: _Cells, rows: Int[Array, " n_rows"], *, chunk_size: int
                    ) -> tuple[Float[Array, " n_hidden"], Float[Array, " n_hidden"]]:
    """Mean and (biased) variance over `rows` of the classifier's hidden layer before its normalisation, at the
    posterior means: chunk by chunk on the device, the chunks' moments merged as Chan et al. (1979)."""
    n_rows = rows.shape[0]
    n_chunks = -(-n_rows // chunk_size)
    order = jnp.resize(rows, (n_chunks * chunk_size,)).reshape(n_chunks, chunk_size)
    valid = (jnp.arange(n_chunks * chunk_size) < n_rows).reshape(n_chunks, chunk_size)
    width = model.classifier.hidden.out_features
    dtype = model.vae.dtype

    def merge(carry, inputs):
        count, mean, m2 = carry
        index, inside = inputs
        latent, _ = _encode_log(model.vae, cells.take_log(index).astype(dtype), cells.batch_labels[index], key=None,
                                inference=True)
        hidden = dense(latent, model.classifier.hidden)
        weight = inside.astype(dtype)[:, None]
        n_chunk = jnp.sum(weight)
        chunk_mean = jnp.sum(hidden * weight, 0) / n_chunk
        chunk_m2 = jnp.sum((hidden - chunk_mean[None, :]) ** 2 * weight, 0)
        total = count + n_chunk
        delta = chunk_mean - mean
        mean = mean + delta * n_chunk / total
        m2 = m2 + chunk_m2 + delta**2 * count * n_chunk / total
        return (total, mean, m2), None

    zeros = jnp.zeros((width,), dtype)
    (count, mean, m2), _ = jax.lax.scan(merge, (jnp.zeros((), dtype), zeros, zeros), (order, valid))
    return mean, m2 / count


def _set_population_statistics(model: SCANVI, cells: _Cells, rows: Int[Array, " n_rows"], chunk_size: int = 2048
                               ) -> SCANVI:
    moments = _hidden_moments(model, cells, rows, chunk_size=min(chunk_size, int(rows.shape[0])))
    return eqx.tree_at(lambda m: (m.classifier.mean, m.classifier.variance), model, moments)


def with_population_statistics(model: SCANVI, counts: Any, batch_labels: Any = None, *, chunk_size: int = 2048
                               ) -> SCANVI:
    """`model` with its classifier's batch-normalisation statistics set to the mean and variance of its hidden
    layer over `counts`' posterior means (what torch's running averages estimate)."""
    checked, batches = _prepare(model.vae, counts, batch_labels)
    n_cells = checked.shape[0]
    cells = _Cells(to_device_rows(checked), jnp.asarray(batches), jnp.full((n_cells,), -1, jnp.int32),
                   jnp.zeros((n_cells,), model.vae.dtype))
    return _set_population_statistics(model, cells, jnp.arange(n_cells, dtype=jnp.int32), chunk_size)


def scanvi_probabilities(model: SCANVI, counts: Any, batch_labels: Any = None, *, chunk_size: int = 4096
                         ) -> Float[Array, "n_cells n_labels"]:
    """$q(y \\mid z_1)$ at the posterior mean, for any number of cells, in chunks (`predict(soft=True)`)."""
    checked, batches = _prepare(model.vae, counts, batch_labels)
    return cast(Array, map_in_chunks(_predict_chunk, (checked, batches), chunk_size=chunk_size, context=model))
