"""scVI (Lopez et al. 2018) as an immutable Equinox module: `VAENormalizer`, its loss, training and inference.

The model follows scvi-tools' `VAE` with `use_observed_lib_size=True`, `log_variational=True` and a normal
latent: the encoder reads `log1p(counts)`, outputs a Gaussian posterior `q(z | x) = N(mean, exp(h) + 1e-4)`,
and the decoder maps `z` (with the batch one-hot injected into every hidden layer) to a softmax over genes that
is scaled by the cell's observed library size to give the negative binomial (or ZINB, or Poisson) mean. The
differences from scvi-tools are deliberate: no batch normalisation (it needs mutable running statistics; use the
optional stateless layer norm instead), and AdamW's decoupled weight decay instead of Adam's L2 term (both at
1e-6).
"""

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.scipy.special import gammaln
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._checkpoint import load_leaves, save_leaves
from .._core._distributions import (
    log_factorial_per_cell,
    log_library_size,
    negative_binomial_log_prob_logspace,
    poisson_log_prob_logspace,
    reparameterize,
    softmax_negative_binomial_log_likelihood,
    zero_inflated_negative_binomial_log_prob_logspace,
)
from .._core._nn import CovariateMLP, dense
from .._core._stage import AbstractTrainableStage
from .._core._train import Devices, FitResult, TrainSettings, fit, map_in_chunks, shared_optimizer, tuned_jit
from .._core._validate import check_batch_labels, check_counts


Likelihood = Literal["nb", "zinb", "poisson"]
Dispersion = Literal["gene", "gene-batch"]
_VAR_EPS = 1e-4  # scvi-tools' `var_eps`: q(z|x) variance is exp(h) + var_eps


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------


def gaussian_kl(
    mean: Float[Array, "n_cells latent_dim"], log_variance: Float[Array, "n_cells latent_dim"]
) -> Float[Array, " n_cells"]:
    """$\\mathrm{KL}(N(m, v) \\,\\|\\, N(0, I))$ per cell: $\\frac12 \\sum_k (v_k + m_k^2 - 1 - \\log v_k)$."""
    return 0.5 * jnp.sum(jnp.exp(log_variance) + mean**2 - 1.0 - log_variance, axis=-1)


def count_log_likelihood(
    counts: Float[Array, "n_cells n_genes"],
    log_mean: Float[Array, "n_cells n_genes"],
    log_inverse_dispersion: Float[Array, "#n_cells n_genes"] | None,
    zero_logits: Float[Array, "n_cells n_genes"] | None,
    likelihood: Likelihood,
    log_factorial: Float[Array, " n_cells"] | None = None,
) -> Float[Array, " n_cells"]:
    """Per-cell log-likelihood summed over genes under `likelihood` (`"nb"`, `"zinb"` or `"poisson"`).

    `log_factorial`, if given, is each cell's precomputed $\\sum_g \\log\\Gamma(x_g + 1)$ (a constant of the
    data), which saves one `lgamma` per count in the training loop.
    """
    options = {"include_log_factorial": log_factorial is None}
    if likelihood == "nb":
        assert log_inverse_dispersion is not None
        per_gene = negative_binomial_log_prob_logspace(counts, log_mean, log_inverse_dispersion, **options)
    elif likelihood == "zinb":
        assert log_inverse_dispersion is not None and zero_logits is not None
        per_gene = zero_inflated_negative_binomial_log_prob_logspace(
            counts, log_mean, log_inverse_dispersion, zero_logits, **options
        )
    else:
        per_gene = poisson_log_prob_logspace(counts, log_mean, **options)
    total = jnp.sum(per_gene, axis=-1)
    return total if log_factorial is None else total - log_factorial.astype(total.dtype)


def kl_warmup_weight(
    epoch: int, n_epochs_kl_warmup: int, *, min_kl_weight: float = 0.0, max_kl_weight: float = 1.0
) -> float:
    """scvi-tools' linear KL warm-up: `min + (max - min) * epoch / n_epochs_kl_warmup`, capped at `max`."""
    if n_epochs_kl_warmup <= 0:
        return max_kl_weight
    return min(max_kl_weight, min_kl_weight + (max_kl_weight - min_kl_weight) * epoch / n_epochs_kl_warmup)


def vae_default_epochs(n_cells: int) -> int:
    """scvi-tools' epoch heuristic: `min(round(20000 / n_cells * 400), 400)`."""
    return int(min(round(20000 / n_cells * 400), 400))


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class VAEOutput(eqx.Module):
    """What `VAENormalizer` returns for a set of cells.

    - `latent`: `(n_cells, latent_dim)` posterior means (scVI's `get_latent_representation()`).
    - `latent_log_variance`: `(n_cells, latent_dim)` posterior log-variances.
    - `latent_sample`: `(n_cells, latent_dim)` a posterior draw, or None when no key was given.
    - `normalized`: `(n_cells, n_genes)` decoded expected frequencies times the target library size
      (scVI's `get_normalized_expression(library_size=...)`), decoded from `latent_sample` if present, else
      from `latent`.
    - `library_size`: `(n_cells,)` observed total counts.

    Fields can also be read like a dict: `out["latent"]`.
    """

    latent: Float[Array, "n_cells latent_dim"]
    latent_log_variance: Float[Array, "n_cells latent_dim"]
    latent_sample: Float[Array, "n_cells latent_dim"] | None
    normalized: Float[Array, "n_cells n_genes"]
    library_size: Float[Array, " n_cells"]

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


class VAETerms(eqx.Module):
    """One minibatch through the VAE: the per-cell terms of the negative ELBO and what penalties act on.

    - `reconstruction`, `kl`: `(n_cells,)` negative log-likelihood and KL divergence.
    - `mean`: `(n_cells, latent_dim)` the posterior mean (what a classifier head reads).
    - `z`: `(n_cells, latent_dim)` the reparameterised posterior draw (trVAE's `z1`).
    - `onehot`: `(n_cells, n_batches)` the batch one-hot the decoder was given (None with one batch).
    """

    reconstruction: Float[Array, " n_cells"]
    kl: Float[Array, " n_cells"]
    mean: Float[Array, "n_cells latent_dim"]
    z: Float[Array, "n_cells latent_dim"]
    onehot: Float[Array, "n_cells n_batches"] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEOptions:
    """scVI's further model options for `VAENormalizer(options=...)` (scvi-tools' names and defaults).

    - `dispersion`: `"gene"` (one inverse dispersion per gene) or `"gene-batch"` (per gene and batch).
    - `use_layer_norm`: stateless layer norm in the hidden layers (replaces scVI's batch norm).
    - `encode_covariates`: also feed the batch one-hot to the encoder (scVI: False).
    - `deeply_inject_covariates`: inject the batch one-hot into every decoder layer (scVI: True).
    """

    dispersion: Dispersion = "gene"
    use_layer_norm: bool = False
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True


def _gene_names(genes: Sequence[str] | None, n_genes: int) -> tuple[str, ...] | None:
    if genes is None:
        return None
    names = tuple(str(name) for name in genes)
    if len(names) != n_genes:
        raise ValueError(f"genes: {len(names)} names for a model of {n_genes} genes")
    return names


class VAENormalizer(AbstractTrainableStage):
    """scVI's variational autoencoder for raw counts, as an immutable module.

    Generative model: $z \\sim N(0, I)$, $\\rho = \\mathrm{softmax}(f(z, s))$, $x_g \\sim \\mathrm{NB}(\\ell\\rho_g,
    \\theta_g)$ with $\\ell$ the observed library size and $s$ the batch one-hot injected into every decoder layer.
    Inference model: $q(z \\mid x) = N(\\mu(\\log(1 + x)), \\sigma^2(\\log(1 + x)))$.

    Call contract: `vae(counts, batch_labels, *, key=None, inference=False) -> VAEOutput` and
    `vae.loss((counts, batch_labels), *, key, kl_weight=1.0) -> (loss, aux)`; trained by `fit_vae`.

    `genes` (static; None when not given) names the genes of the count matrix's columns, in order: `save_vae`
    writes them and `load_vae` restores them, so new data can be matched to the training genes by name.
    `target_library_size` (an array leaf, 1e4) is the library size `normalized` is scaled to; change it with
    `eqx.tree_at(lambda v: v.target_library_size, vae, jnp.asarray(1e6))`.
    """

    encoder: CovariateMLP
    mean_head: eqx.nn.Linear
    log_variance_head: eqx.nn.Linear
    decoder: CovariateMLP
    scale_head: eqx.nn.Linear
    zero_logits_head: eqx.nn.Linear | None
    log_inverse_dispersion: Float[Array, "n_dispersion n_genes"] | None
    target_library_size: Float[Array, ""]
    n_genes: int = eqx.field(static=True)
    n_batches: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    hidden_dims: tuple[int, ...] = eqx.field(static=True)
    likelihood: str = eqx.field(static=True)
    dispersion: str = eqx.field(static=True)
    encode_covariates: bool = eqx.field(static=True)
    deeply_inject_covariates: bool = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    use_layer_norm: bool = eqx.field(static=True)
    genes: tuple[str, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        n_genes: int,
        n_batches: int = 1,
        *,
        hidden_dims: tuple[int, ...] = (128,),
        latent_dim: int = 10,
        likelihood: Likelihood = "nb",
        dropout_rate: float = 0.1,
        options: VAEOptions = VAEOptions(),
        genes: Sequence[str] | None = None,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `n_genes`: number of genes.
        - `n_batches`: number of batches (1 for none).
        - `hidden_dims`: width of each hidden layer of the encoder; the decoder mirrors it (scVI: `(128,)`).
        - `latent_dim`: latent dimension (scVI: 10).
        - `likelihood`: `"nb"`, `"zinb"` or `"poisson"` (scVI's default is `"zinb"`).
        - `dropout_rate`: encoder dropout (scVI: 0.1; the decoder has none, as in scVI).
        - `options`: scVI's further options (`VAEOptions`: dispersion, layer norm, where the batch enters).
        - `genes`: the genes' names, one per column of the counts (kept as `genes`; None: unnamed).
        - `dtype`: parameter dtype (default: JAX's default float).
        - `key`: PRNG key for the initial parameters. (Keyword only argument.)
        """
        self.n_genes, self.n_batches, self.latent_dim = int(n_genes), int(n_batches), int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.likelihood, self.dispersion = likelihood, options.dispersion
        self.encode_covariates = options.encode_covariates
        self.deeply_inject_covariates = options.deeply_inject_covariates
        self.dropout_rate, self.use_layer_norm = float(dropout_rate), options.use_layer_norm
        self.genes = _gene_names(genes, self.n_genes)
        use_layer_norm, dispersion = options.use_layer_norm, options.dispersion
        encode_covariates, deeply_inject_covariates = options.encode_covariates, options.deeply_inject_covariates
        enc_key, mean_key, var_key, dec_key, scale_key, zero_key, disp_key = jr.split(key, 7)
        n_cov = self.n_batches if self.n_batches > 1 else 0
        self.encoder = CovariateMLP(
            self.n_genes, self.hidden_dims, n_cov if encode_covariates else 0, dropout_rate=dropout_rate,
            use_layer_norm=use_layer_norm, dtype=dtype, key=enc_key,
        )
        width = self.hidden_dims[-1] if self.hidden_dims else 1
        self.mean_head = eqx.nn.Linear(width, self.latent_dim, dtype=dtype, key=mean_key)
        self.log_variance_head = eqx.nn.Linear(width, self.latent_dim, dtype=dtype, key=var_key)
        self.decoder = CovariateMLP(
            self.latent_dim, tuple(reversed(self.hidden_dims)), n_cov,
            inject_all_layers=deeply_inject_covariates, use_layer_norm=use_layer_norm, dtype=dtype, key=dec_key,
        )
        self.scale_head = eqx.nn.Linear(self.hidden_dims[0], self.n_genes, dtype=dtype, key=scale_key)
        self.zero_logits_head = (
            eqx.nn.Linear(self.hidden_dims[0], self.n_genes, dtype=dtype, key=zero_key)
            if likelihood == "zinb" else None
        )
        param_dtype = self.scale_head.weight.dtype
        n_dispersion = self.n_batches if dispersion == "gene-batch" else 1
        self.log_inverse_dispersion = (
            None if likelihood == "poisson"
            else jr.normal(disp_key, (n_dispersion, self.n_genes), dtype=param_dtype)  # scVI: torch.randn
        )
        self.target_library_size = jnp.asarray(1e4, dtype=param_dtype)

    def __check_init__(self):
        if self.likelihood not in ("nb", "zinb", "poisson"):
            raise ValueError(f"likelihood: must be 'nb', 'zinb' or 'poisson', got {self.likelihood!r}")
        if self.dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion: must be 'gene' or 'gene-batch', got {self.dispersion!r}")
        if self.n_genes < 1 or self.n_batches < 1 or self.latent_dim < 1:
            raise ValueError("n_genes, n_batches and latent_dim must be >= 1")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate: must be in [0, 1), got {self.dropout_rate}")

    # ---- building blocks ------------------------------------------------------------------------------------

    @property
    def dtype(self) -> Any:
        return self.scale_head.weight.dtype

    def _batch_onehot(self, batch_labels: Int[Array, " n_cells"] | None, n_cells: int) -> Array | None:
        if self.n_batches == 1:
            return None
        if batch_labels is None:
            raise ValueError(f"batch_labels: the model has {self.n_batches} batches; pass one label per cell")
        return jax.nn.one_hot(batch_labels, self.n_batches, dtype=self.dtype)

    def encode(
        self,
        counts: Float[Array, "n_cells n_genes"],
        batch_onehot: Float[Array, "n_cells n_batches"] | None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "n_cells latent_dim"], Float[Array, "n_cells latent_dim"]]:
        """Posterior mean and log-variance of `q(z | x)` from `log1p(counts)`."""
        covariates = batch_onehot if self.encode_covariates else None
        h = self.encoder(jnp.log1p(counts), covariates, key=key, inference=inference)
        mean = dense(h, self.mean_head)
        log_variance = jnp.logaddexp(dense(h, self.log_variance_head), math.log(_VAR_EPS))
        return mean, log_variance

    def decode(
        self, z: Float[Array, "n_cells latent_dim"], batch_onehot: Float[Array, "n_cells n_batches"] | None
    ) -> tuple[Float[Array, "n_cells n_genes"], Float[Array, "n_cells n_genes"] | None]:
        """Log expected gene frequencies `log softmax(f(z, s))` and, for ZINB, the dropout logits."""
        logits, zero_logits = self._decoder_logits(z, batch_onehot)
        return jax.nn.log_softmax(logits, axis=-1), zero_logits

    def _decoder_logits(
        self, z: Float[Array, "n_cells latent_dim"], batch_onehot: Float[Array, "n_cells n_batches"] | None
    ) -> tuple[Float[Array, "n_cells n_genes"], Float[Array, "n_cells n_genes"] | None]:
        h = self.decoder(z, batch_onehot)
        zero_logits = None if self.zero_logits_head is None else dense(h, self.zero_logits_head)
        return dense(h, self.scale_head), zero_logits

    def _reconstruction_log_likelihood(
        self,
        counts: Float[Array, "n_cells n_genes"],
        z: Float[Array, "n_cells latent_dim"],
        onehot: Float[Array, "n_cells n_batches"] | None,
        batch_labels: Int[Array, " n_cells"] | None,
        log_factorial: Float[Array, " n_cells"] | None,
    ) -> Float[Array, " n_cells"]:
        logits, zero_logits = self._decoder_logits(z, onehot)
        log_library = log_library_size(counts)
        if self.likelihood == "nb":
            # The fused softmax + NB likelihood (same value as the general path below, cheaper derivative).
            value = softmax_negative_binomial_log_likelihood(counts, logits, log_library, self._log_theta(batch_labels))
            if log_factorial is None:
                log_factorial = jnp.sum(gammaln(counts + 1.0), axis=-1)
            return value - log_factorial.astype(value.dtype)
        log_mean = jax.nn.log_softmax(logits, axis=-1) + log_library[:, None]
        return count_log_likelihood(
            counts, log_mean, self._log_theta(batch_labels), zero_logits, cast(Likelihood, self.likelihood),
            log_factorial,
        )

    def _log_theta(
        self, batch_labels: Int[Array, " n_cells"] | None
    ) -> Float[Array, "n_rows n_genes"] | None:
        if self.log_inverse_dispersion is None:
            return None
        if self.dispersion == "gene-batch" and self.n_batches > 1:
            assert batch_labels is not None
            return self.log_inverse_dispersion[batch_labels]
        return self.log_inverse_dispersion[:1]

    def _check(self, counts: Array, batch_labels: Array | None) -> None:
        if counts.shape[-1] != self.n_genes:
            raise ValueError(f"counts: has {counts.shape[-1]} genes but the model was built for {self.n_genes}")
        if batch_labels is not None and batch_labels.shape != counts.shape[:1]:
            raise ValueError(f"batch_labels: expected shape {counts.shape[:1]}, got {batch_labels.shape}")

    # ---- public API -----------------------------------------------------------------------------------------

    def __call__(
        self,
        counts: Float[Array, "n_cells n_genes"],
        batch_labels: Int[Array, " n_cells"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        transform_batch: Int[ArrayLike, ""] | None = None,
    ) -> VAEOutput:
        """Encode cells and decode their normalised expression.

        **Arguments:**

        - `counts`: `(n_cells, n_genes)` raw counts.
        - `batch_labels`: `(n_cells,)` integer batch codes; may be None when `n_batches == 1`.
        - `key`: if given, also draw `latent_sample` (and decode `normalized` from it) and apply encoder dropout
          unless `inference`. (Keyword only argument.)
        - `inference`: disable dropout.
        - `transform_batch`: decode every cell as if it came from this batch (scVI's
          `get_normalized_expression(transform_batch=...)`); default: each cell's own batch.

        **Returns:** a `VAEOutput`.
        """
        return self._forward(counts, batch_labels, key=key, inference=inference, transform_batch=transform_batch)

    def _forward(
        self, counts: Float[Array, "n_cells n_genes"], batch_labels: Int[Array, " n_cells"] | None = None, *,
        key: PRNGKeyArray | None = None, inference: bool = False, transform_batch: Int[ArrayLike, ""] | None = None,
        check: bool = True,
    ) -> VAEOutput:
        """`__call__`; `check=False` (static) leaves out the in-program value check of the counts, for callers that
        checked them on the host (the check's host callback keeps a program out of JAX's persistent cache)."""
        self._check(counts, batch_labels)
        counts = counts.astype(self.dtype)
        if check:
            counts = eqx.error_if(counts, jnp.any(counts < 0) | ~jnp.all(jnp.isfinite(counts)),
                                  "counts: must be finite and >= 0")
        n_cells = counts.shape[0]
        onehot = self._batch_onehot(batch_labels, n_cells)
        dropout_key = sample_key = None
        if key is not None:
            dropout_key, sample_key = jr.split(key)
        mean, log_variance = self.encode(
            counts, onehot, key=dropout_key, inference=True if key is None else inference
        )
        sample = None if sample_key is None else reparameterize(mean, log_variance, key=sample_key)
        if transform_batch is not None and self.n_batches > 1:
            code = jnp.asarray(transform_batch)
            code = eqx.error_if(code, (code < 0) | (code >= self.n_batches), "transform_batch: out of range")
            onehot = jax.nn.one_hot(jnp.broadcast_to(code, (n_cells,)), self.n_batches, dtype=self.dtype)
        log_frequencies, _ = self.decode(mean if sample is None else sample, onehot)
        library = jnp.sum(counts, axis=-1)
        normalized = jnp.exp(log_frequencies) * self.target_library_size
        return VAEOutput(mean, log_variance, sample, normalized, library)

    def loss(
        self,
        batch: tuple[Array | None, ...],
        /,
        *,
        key: PRNGKeyArray,
        kl_weight: Float[ArrayLike, ""] = 1.0,
        inference: bool = False,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """Negative ELBO with a KL weight, averaged over cells (scvi-tools' training loss).

        $\\mathcal{L} = \\frac1n \\sum_i \\big[-\\mathbb{E}_{q}\\log p(x_i \\mid z_i) + w\\,
        \\mathrm{KL}(q(z_i \\mid x_i) \\,\\|\\, p(z))\\big]$ with one reparameterised draw per cell.

        **Arguments:**

        - `batch`: a minibatch `(counts, batch_labels)` as in `__call__` (`batch_labels` may be None or left out
          with one batch), optionally with a third entry: the precomputed per-cell $\\sum_g \\log\\Gamma(x_g + 1)$
          (`log_factorial_per_cell`), which changes nothing but speed.
        - `key`: PRNG key for dropout and the posterior draw. (Keyword only argument.)
        - `kl_weight`: the KL warm-up weight $w$.
        - `inference`: disable dropout (validation).

        **Returns:** `(loss, aux)` where `aux` has the per-cell means `reconstruction` (negative
        log-likelihood), `kl` and `elbo` (with weight one).
        """
        terms = self.terms(batch, key=key, inference=inference)
        weight = jnp.asarray(kl_weight).astype(self.dtype)
        loss = jnp.mean(terms.reconstruction + weight * terms.kl)
        aux = {
            "reconstruction": jnp.mean(terms.reconstruction),
            "kl": jnp.mean(terms.kl),
            "elbo": -jnp.mean(terms.reconstruction + terms.kl),
        }
        return loss, aux

    def terms(
        self,
        batch: tuple[Array | None, ...],
        /,
        *,
        key: PRNGKeyArray,
        inference: bool = False,
        encoder_counts: Float[Array, "n_cells n_genes"] | None = None,
    ) -> VAETerms:
        """The per-cell terms of `loss` (one reparameterised draw per cell), for losses that add to the ELBO.

        **Arguments:**

        - `batch`, `key`, `inference`: as in `loss`.
        - `encoder_counts`: what the encoder reads instead of the counts (e.g. gated counts); the decoder
          still reconstructs the counts.

        **Returns:** a `VAETerms`.
        """
        counts, batch_labels, log_factorial = _unpack(batch)
        self._check(counts, batch_labels)
        counts = counts.astype(self.dtype)
        onehot = self._batch_onehot(batch_labels, counts.shape[0])
        dropout_key, sample_key = jr.split(key)
        encoder_input = counts if encoder_counts is None else encoder_counts.astype(self.dtype)
        mean, log_variance = self.encode(encoder_input, onehot, key=dropout_key, inference=inference)
        z = reparameterize(mean, log_variance, key=sample_key)
        reconstruction = -self._reconstruction_log_likelihood(counts, z, onehot, batch_labels, log_factorial)
        return VAETerms(reconstruction, gaussian_kl(mean, log_variance), mean, z, onehot)

    def heldout_log_likelihood(
        self, counts: Float[Array, "n_cells n_genes"], batch_labels: Int[Array, " n_cells"] | None = None
    ) -> Float[Array, " n_cells"]:
        """Per-cell count log-likelihood with `z` at the posterior mean (deterministic; for evaluation)."""
        self._check(counts, batch_labels)
        counts = counts.astype(self.dtype)
        onehot = self._batch_onehot(batch_labels, counts.shape[0])
        mean, _ = self.encode(counts, onehot, inference=True)
        return self._reconstruction_log_likelihood(counts, mean, onehot, batch_labels, None)


def _unpack(batch: tuple[Array | None, ...]) -> tuple[Array, Array | None, Array | None]:
    counts, batch_labels, log_factorial = (*batch, None, None)[:3]
    if not 1 <= len(batch) <= 3 or counts is None:
        raise ValueError(f"batch: expected (counts, batch_labels[, log_factorial]), got {len(batch)} entries")
    return counts, batch_labels, log_factorial


class VAELoss(eqx.Module):
    """`fit`'s loss function for a `VAENormalizer`: `loss_fn(vae, (counts, batch_labels), context, *, key)`.

    `batch` may carry a third entry, the precomputed per-cell log-factorials (`log_factorial_per_cell`).
    `context` is `{"kl_weight": w}` (the warm-up weight of the epoch). Under `eqx.nn.inference_mode` (which `fit`
    applies for its validation pass) dropout is off and the KL weight is one, so the validation loss is the
    plain negative ELBO, which is what scvi-tools monitors (`elbo_validation`) for early stopping.
    """

    def __call__(
        self,
        vae: VAENormalizer,
        batch: tuple[Array, ...],
        context: dict[str, Array],
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        validation = bool(vae.encoder.dropout.inference)
        kl_weight = jnp.ones(()) if validation else context["kl_weight"]
        return vae.loss(batch, key=key, kl_weight=kl_weight, inference=validation)


# --------------------------------------------------------------------------------------------------------------
# Training, inference in chunks, checkpoints
# --------------------------------------------------------------------------------------------------------------


def _prepare(vae: VAENormalizer, counts: Any, batch_labels: Any) -> tuple[Any, np.ndarray | Array]:
    checked = check_counts(counts, n_genes=vae.n_genes)
    n_cells = cast(tuple[int, int], checked.shape)[0]  # scipy infers a CSR shape as possibly None
    if batch_labels is None:
        if vae.n_batches > 1:
            raise ValueError(f"batch_labels: the model has {vae.n_batches} batches; pass one label per cell")
        labels = np.zeros(n_cells, dtype=np.int32)
    else:
        labels = check_batch_labels(batch_labels, n_cells, n_batches=vae.n_batches)
        if labels.ndim != 1:
            raise ValueError(f"batch_labels: expected shape ({n_cells},), got {labels.shape}")
    return checked, labels


def fit_vae(
    vae: VAENormalizer,
    counts: Any,
    batch_labels: Any = None,
    *,
    key: PRNGKeyArray,
    settings: TrainSettings | None = None,
    n_epochs_kl_warmup: int | None = None,
    min_kl_weight: float = 0.0,
    max_kl_weight: float = 1.0,
) -> FitResult:
    """Train a `VAENormalizer` with scvi-tools' defaults on the shared loop (`fit`).

    **Arguments:**

    - `vae`: the (initialised) model.
    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse (sparse stays sparse on the device and
      is densified one minibatch at a time).
    - `batch_labels`: `(n_cells,)` integer batch codes (None for one batch).
    - `key`: PRNG key; the same key gives identical results. (Keyword only argument.)
    - `settings`: the loop's `TrainSettings`; what is left at None takes scvi-tools' defaults: `n_epochs`
      `min(round(20000 / n_cells * 400), 400)` (`vae_default_epochs`), `batch_size` 128, AdamW
      (`shared_optimizer()`) with `hyperparameters` `{"learning_rate": 1e-3, "weight_decay": 1e-6, "eps": 0.01}`
      (given ones replace these), `validation_fraction` 0.1 (the validation loss is the negative ELBO). Early
      stopping is off unless `early_stopping_patience` is set (scvi-tools' patience is 45 when switched on).
    - `n_epochs_kl_warmup`: epochs over which the KL weight rises linearly from `min_kl_weight` to
      `max_kl_weight` (scvi-tools: 400). None: `min(400, n_epochs)`, i.e. scvi-tools' 400 epochs, scaled down
      to the run when it is shorter.
    - `min_kl_weight`, `max_kl_weight`: the ends of the warm-up.

    **Returns:** `fit`'s `FitResult` (`.model` is the trained `VAENormalizer`; `.validation_loss` the held-out
    negative ELBO per epoch; `.train_aux` the mean `reconstruction`, `kl` and `elbo` per epoch).
    """
    checked, labels = _prepare(vae, counts, batch_labels)
    defaults = TrainSettings(
        n_epochs=vae_default_epochs(checked.shape[0]), batch_size=128, optimizer=shared_optimizer(),
        hyperparameters={"learning_rate": 1e-3, "weight_decay": 1e-6, "eps": 0.01}, validation_fraction=0.1,
        description="VAE",
    )
    settings = (TrainSettings() if settings is None else settings).filled(defaults)
    assert settings.n_epochs is not None
    warmup = min(400, settings.n_epochs) if n_epochs_kl_warmup is None else int(n_epochs_kl_warmup)

    def context(epoch: int) -> dict[str, Array]:
        weight = kl_warmup_weight(epoch, warmup, min_kl_weight=min_kl_weight, max_kl_weight=max_kl_weight)
        return {"kl_weight": jnp.asarray(weight, dtype=vae.dtype)}

    # The target library size is a hyperparameter, not a weight: keep it out of the optimiser (weight decay).
    trainable = jtu.tree_map(eqx.is_inexact_array, vae)
    trainable = eqx.tree_at(lambda m: m.target_library_size, trainable, replace=False)
    data = (checked, labels, log_factorial_per_cell(checked).astype(jnp.dtype(vae.dtype)))
    return fit(vae, VAELoss(), data, key=key, settings=settings, context=context, trainable=trainable)


@tuned_jit
def _transform_chunk(batch: tuple[Array, Array], context: tuple[VAENormalizer, Array | None]) -> VAEOutput:
    vae, transform_batch = context
    counts, labels = batch
    return vae(counts, labels, inference=True, transform_batch=transform_batch)


@tuned_jit
def _log_likelihood_chunk(batch: tuple[Array, Array], vae: VAENormalizer) -> Float[Array, " n_cells"]:
    counts, labels = batch
    return vae.heldout_log_likelihood(counts, labels)


def vae_transform(
    vae: VAENormalizer,
    counts: Any,
    batch_labels: Any = None,
    *,
    chunk_size: int = 4096,
    transform_batch: int | None = None,
    devices: Devices = None,
) -> VAEOutput:
    """Posterior means and normalised expression for any number of cells, computed in fixed-size chunks.

    **Arguments:**

    - `vae`: a trained `VAENormalizer`.
    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse (densified one chunk at a time).
    - `batch_labels`: `(n_cells,)` batch codes (None for one batch).
    - `chunk_size`: cells per compiled call. (Keyword only argument.)
    - `transform_batch`: decode every cell as this batch.
    - `devices`: split every chunk over several devices (see `map_in_chunks`).

    **Returns:** a `VAEOutput` without `latent_sample` (deterministic: decoded from the posterior mean).
    """
    checked, labels = _prepare(vae, counts, batch_labels)
    if transform_batch is not None and not 0 <= int(transform_batch) < vae.n_batches:
        raise ValueError(f"transform_batch: must be in [0, {vae.n_batches}), got {transform_batch}")
    code = None if transform_batch is None else jnp.asarray(int(transform_batch))
    return map_in_chunks(_transform_chunk, (checked, labels), chunk_size=chunk_size, context=(vae, code),
                         devices=devices)


@tuned_jit
def _latent_chunk(batch: tuple[Array, Array], vae: VAENormalizer) -> Float[Array, "n_cells latent_dim"]:
    # `vae(counts, labels, inference=True).latent` (the posterior means) without `__call__`'s in-graph value check:
    # `vae_latent` checked the counts on the host, and the check's host callback would keep this program out of
    # JAX's persistent compilation cache (a second `diffbio-eqx run` compiled it again).
    counts, labels = batch
    counts = counts.astype(vae.dtype)
    mean, _ = vae.encode(counts, vae._batch_onehot(labels, counts.shape[0]), inference=True)
    return mean


def vae_latent(
    vae: VAENormalizer, counts: Any, batch_labels: Any = None, *, chunk_size: int = 4096, devices: Devices = None
) -> Float[Array, "n_cells latent_dim"]:
    """Posterior means only, in chunks: `vae_transform(...).latent` without the `(n_cells, n_genes)` normalised
    expression, so memory is `O(n_cells * latent_dim)` plus one chunk (for millions of cells)."""
    checked, labels = _prepare(vae, counts, batch_labels)
    return map_in_chunks(_latent_chunk, (checked, labels), chunk_size=chunk_size, context=vae, devices=devices)


def vae_log_likelihood(
    vae: VAENormalizer, counts: Any, batch_labels: Any = None, *, chunk_size: int = 4096
) -> Float[Array, " n_cells"]:
    """Per-cell count log-likelihood at the posterior mean, in chunks (held-out evaluation)."""
    checked, labels = _prepare(vae, counts, batch_labels)
    return map_in_chunks(_log_likelihood_chunk, (checked, labels), chunk_size=chunk_size, context=vae)


_SIZE_FIELDS = ("n_genes", "n_batches", "hidden_dims", "latent_dim", "likelihood", "dropout_rate")
_OPTION_FIELDS = tuple(field.name for field in dataclasses.fields(VAEOptions))


def save_vae(
    path: str | os.PathLike[str], vae: VAENormalizer, *, genes: Sequence[str] | None = None
) -> pathlib.Path:
    """Save a `VAENormalizer` atomically: a JSON header line (its configuration and gene names), then its leaves
    (`eqx.tree_serialise_leaves`).

    **Arguments:**

    - `path`: the file to write.
    - `vae`: the model.
    - `genes`: the names of its genes, in column order (default: `vae.genes`); `load_vae` puts them in the
      loaded model's `genes`. (Keyword only argument.)

    **Returns:** `path` as a `pathlib.Path`.
    """
    names = vae.genes if genes is None else _gene_names(genes, vae.n_genes)
    header = {name: getattr(vae, name) for name in (*_SIZE_FIELDS, *_OPTION_FIELDS)}
    header.update(format="diffbio_eqx.vae/1", dtype=jnp.dtype(vae.dtype).name,
                  genes=None if names is None else list(names))
    return save_leaves(path, vae, header=header)


def load_vae(path: str | os.PathLike[str]) -> VAENormalizer:
    """Load a model written by `save_vae` (no template needed); its `genes` are the saved names (or None)."""
    def like(header: dict[str, Any]) -> VAENormalizer:
        sizes = {name: header[name] for name in _SIZE_FIELDS}
        sizes["hidden_dims"] = tuple(sizes["hidden_dims"])
        n_genes, n_batches = sizes.pop("n_genes"), sizes.pop("n_batches")
        options = VAEOptions(**{name: header[name] for name in _OPTION_FIELDS})
        return VAENormalizer(n_genes, n_batches, **sizes, options=options, genes=header.get("genes"),
                             dtype=jnp.dtype(header["dtype"]), key=jr.key(0))

    return load_leaves(path, format="diffbio_eqx.vae/1", template=like, what="a VAE saved by save_vae")[0]
