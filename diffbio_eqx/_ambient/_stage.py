"""CellBender-style ambient RNA removal (Fleming et al. 2023) as an immutable Equinox module.

`AmbientRemoval` is a small variational autoencoder over raw counts whose likelihood is the ambient model of
`diffbio_eqx._ambient`: an encoder gives each droplet a latent state `z` and an ambient fraction `f`; the decoder
turns `z` into the cell's expression profile; counts are negative binomial around cell rate plus ambient rate.
The fraction has a fixed prior: CellBender's ambient count per droplet from the empty droplets
(`estimate_ambient_count`, used when `raw_counts` is given), else a Beta prior with mode 0.
It is trained on minibatches with the shared `fit` (`fit_ambient_removal`) and applied in chunks
(`remove_ambient`). The ambient profile comes from the caller, from the empty droplets of a raw matrix
(`estimate_ambient_profile`), or, as a last resort, from the pooled counts (`resolve_ambient_profile` warns
which).
"""

import math
import warnings
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._core._distributions import log_factorial_per_cell, log_library_size, reparameterize
from .._core._nn import dense
from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit, map_in_chunks, shared_optimizer
from .._core._validate import check_ambient_profile, check_counts
from ._math import (
    ambient_count_log_likelihood,
    ambient_log_rates,
    contamination_fraction,
    gaussian_kl_to_prior,
    log_prior_fraction,
    posterior_cell_counts,
    prior_logit_fraction,
    refine_logit_fraction,
    round_cell_counts,
    safe_log_profile,
)


class AmbientProfileWarning(UserWarning):
    """Says where the ambient profile came from when the caller did not pass one."""


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


def _normalized_log_counts(counts: Float[Array, "n_cells n_genes"]) -> Float[Array, "n_cells n_genes"]:
    total = jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    return jnp.log1p(counts * (1e4 / total))


class AmbientResult(eqx.Module):
    """What `AmbientRemoval` returns.

    - `decontaminated_counts`: `(n_cells, n_genes)` posterior expected cell counts, in `[0, counts]` (whole
      numbers when asked for with `integer=True`).
    - `contamination_fraction`: `(n_cells,)` the removed share of each droplet's counts.
    - `latent`: `(n_cells, latent_dim)` the latent state used (posterior mean, or a draw when sampled).
    - `ambient_fraction`: `(n_cells,)` the model's ambient fraction $f$ (after EM refinement, if any); equals
      `contamination_fraction` at the EM fixed point.

    Fields can also be read like a dict: `out["decontaminated_counts"]`.
    """

    decontaminated_counts: Float[Array, "n_cells n_genes"]
    contamination_fraction: Float[Array, " n_cells"]
    latent: Float[Array, "n_cells latent_dim"]
    ambient_fraction: Float[Array, " n_cells"]

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


class AmbientRemoval(AbstractTrainableStage):
    """Remove ambient RNA with CellBender's ambient model: $x \\sim \\mathrm{NB}(\\mu + \\lambda, \\theta)$ with
    cell rate $\\mu = (1 - f) T \\,\\mathrm{softmax}(\\mathrm{decoder}(z))$ and ambient rate $\\lambda = f T a$.

    The encoder reads $\\log(1 + 10^4 x / T)$ and gives a Gaussian posterior for $z$ (prior $N(0, I)$) and a
    point (MAP) estimate of $\\mathrm{logit} f$, as an offset from the prior's centre, under a FIXED prior
    (`diffbio_eqx._ambient.log_prior_fraction`):

    - with a prior ambient count $d_0$ (the typical total of an empty droplet; `fit_ambient_removal` sets it
      from `raw_counts`), CellBender's prior: the droplet's ambient count $f T$ is log-normal around $d_0$, so
      $f \\approx d_0 / T$ unless the counts say otherwise;
    - without it, $f \\sim \\mathrm{Beta}(1, 1/p - 1)$ with mean $p$ = `prior_contamination` and mode 0, so the
      fraction shrinks to 0 unless the counts say otherwise.

    Training minimises the negative ELBO in $z$ plus $-\\log p(f)$. At inference the posterior mean of $z$ is
    used, the ambient fraction is refined by MAP-EM (same prior) with the decoded profile held fixed, and each
    count is split by the thinning posterior mean.

    !!! info "Identifiability"
        The fraction is pinned down by genes that the ambient profile carries and a cell type does not express
        (e.g. another type's markers): their counts in that type are ambient. Where no such genes exist, the
        split of a droplet between its own profile and the ambient profile is not identifiable from the cells
        alone: a profile that absorbs some ambient RNA fits as well as a larger fraction does. The prior then
        decides: CellBender's ambient count from the empty droplets (pass `raw_counts`), or, without empty
        droplets, the Beta prior's mode 0 (nothing is removed that the counts do not demand, so on such data
        the removal is an underestimate). A learned (empirical-Bayes) prior is not used: it followed the
        encoder and let the fraction drift to 0.5-0.99 on data without absent genes.

    Call contract: `stage(counts, ambient_profile, *, key=None, inference=False) -> AmbientResult` and
    `stage.loss((counts, ambient_profile), *, key) -> (loss, aux)`; trained by `fit_ambient_removal`.
    """

    encoder: eqx.nn.Linear
    encoder_latent: eqx.nn.Linear
    encoder_fraction: eqx.nn.Linear
    decoder: eqx.nn.Linear
    decoder_out: eqx.nn.Linear
    log_inverse_dispersion: Float[Array, " n_genes"]
    prior_contamination: Float[Array, ""]
    prior_ambient_count: Float[Array, ""]
    prior_log_scale: Float[Array, ""]
    n_genes: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    hidden_dim: int = eqx.field(static=True)
    n_refine_steps: int = eqx.field(static=True)

    def __init__(
        self,
        n_genes: int,
        *,
        latent_dim: int = 10,
        hidden_dim: int = 128,
        n_refine_steps: int = 20,
        prior_contamination: Float[ArrayLike, ""] = 0.05,
        prior_ambient_count: Float[ArrayLike, ""] | None = None,
        prior_log_scale: Float[ArrayLike, ""] = 0.5,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `n_genes`: number of genes.
        - `latent_dim`: width of the latent state $z$.
        - `hidden_dim`: width of the encoder's and the decoder's hidden layer.
        - `n_refine_steps`: MAP-EM steps refining each droplet's ambient fraction at inference (0: use the
          encoder's estimate as is).
        - `prior_contamination`: mean $p$ of the Beta prior on the ambient fraction, used without a prior ambient
          count. Its mode is 0 whatever $p$; $p$ sets how fast the prior decays (the penalty is about
          $(1/p - 2) f$ nats per droplet). Every droplet starts training at this fraction.
        - `prior_ambient_count`: CellBender's prior: the expected number of ambient molecules per droplet (the
          typical total of an empty droplet; see `estimate_ambient_count`). None: use the Beta prior
          (`fit_ambient_removal` fills it in from `raw_counts` when given).
        - `prior_log_scale`: standard deviation of the log ambient count around `prior_ambient_count`.
        - `dtype`: parameter dtype (default: JAX's default float).
        - `key`: PRNG key for the initial weights. (Keyword only argument.)

        The prior is fixed, not trained (`fit_ambient_removal` leaves these three leaves alone, and `loss` stops
        their gradients).
        """
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        self.n_genes, self.latent_dim, self.hidden_dim = int(n_genes), int(latent_dim), int(hidden_dim)
        self.n_refine_steps = int(n_refine_steps)
        k1, k2, k3, k4, k5 = jr.split(key, 5)
        self.encoder = eqx.nn.Linear(self.n_genes, self.hidden_dim, dtype=dtype, key=k1)
        self.encoder_latent = eqx.nn.Linear(self.hidden_dim, 2 * self.latent_dim, dtype=dtype, key=k2)
        fraction_head = eqx.nn.Linear(self.hidden_dim, 1, dtype=dtype, key=k3)
        assert fraction_head.bias is not None  # `use_bias=True` by default
        # Start every droplet at the prior's centre: the head gives the offset from it.
        self.encoder_fraction = eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            fraction_head,
            (fraction_head.weight * 0.1, jnp.zeros_like(fraction_head.bias)),
        )
        self.decoder = eqx.nn.Linear(self.latent_dim, self.hidden_dim, dtype=dtype, key=k4)
        self.decoder_out = eqx.nn.Linear(self.hidden_dim, self.n_genes, dtype=dtype, key=k5)
        self.log_inverse_dispersion = jnp.full((self.n_genes,), jnp.log(10.0), dtype=dtype)
        self.prior_contamination = jnp.asarray(prior_contamination, dtype=dtype)
        self.prior_ambient_count = jnp.asarray(0.0 if prior_ambient_count is None else prior_ambient_count, dtype=dtype)
        self.prior_log_scale = jnp.asarray(prior_log_scale, dtype=dtype)

    def __check_init__(self):
        if self.n_genes < 1 or self.latent_dim < 1 or self.hidden_dim < 1:
            raise ValueError("n_genes, latent_dim and hidden_dim must be >= 1")
        if self.n_refine_steps < 0:
            raise ValueError(f"n_refine_steps: must be >= 0, got {self.n_refine_steps}")

    @property
    def dtype(self) -> Any:
        return self.log_inverse_dispersion.dtype

    # ---- building blocks ------------------------------------------------------------------------------------

    def encode(
        self, counts: Float[Array, "n_cells n_genes"], *, check: bool = True
    ) -> tuple[
        Float[Array, "n_cells latent_dim"],
        Float[Array, "n_cells latent_dim"],
        Float[Array, " n_cells"],
    ]:
        """The posterior mean and log-variance of `z`, and the estimate of `logit f` (the prior's centre plus the
        encoder's offset). `check` (static): test the prior's leaves in the program (see `_prior`)."""
        h = jax.nn.relu(dense(_normalized_log_counts(counts), self.encoder))
        latent = dense(h, self.encoder_latent)
        contamination, ambient_count, _ = self._prior(check=check)
        centre = prior_logit_fraction(log_library_size(counts), contamination, ambient_count)
        fraction = centre + dense(h, self.encoder_fraction)[:, 0]
        return latent[:, : self.latent_dim], latent[:, self.latent_dim :], fraction

    def _prior(self, *, check: bool = True) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
        """The fixed prior's leaves, with their gradients stopped (they are settings, not parameters). `check`
        (static): test their values in the program (`eqx.error_if`), for traced leaves; the host entry points test
        concrete ones first (`check_prior`) and pass False, since the check's host callback keeps a program out of
        JAX's persistent compilation cache."""
        contamination, scale = self.prior_contamination, self.prior_log_scale
        if check:
            outside = (contamination <= 0) | (contamination >= 0.5)
            contamination = eqx.error_if(contamination, outside, "prior_contamination: must be in (0, 0.5)")
            scale = eqx.error_if(scale, scale <= 0, "prior_log_scale: must be > 0")
        leaves = (contamination, self.prior_ambient_count, scale)
        return jax.lax.stop_gradient(leaves)

    def check_prior(self) -> None:
        """Test the prior's concrete leaves on the host (the `ValueError`s `_prior`'s in-program checks raise)."""
        contamination, scale = float(self.prior_contamination), float(self.prior_log_scale)
        if not 0 < contamination < 0.5:
            raise ValueError(f"prior_contamination: must be in (0, 0.5), got {contamination}")
        if not scale > 0:
            raise ValueError(f"prior_log_scale: must be > 0, got {scale}")
        if not np.isfinite(float(self.prior_ambient_count)):
            raise ValueError(f"prior_ambient_count: must be finite, got {float(self.prior_ambient_count)}")

    def log_prior(
        self, logit_fraction: Float[Array, " n_cells"], log_total: Float[Array, " n_cells"], *, check: bool = True
    ) -> Float[Array, " n_cells"]:
        """Log prior density of each droplet's ambient fraction (`log_prior_fraction` with this stage's prior)."""
        return log_prior_fraction(logit_fraction, log_total, *self._prior(check=check))

    def decode(self, z: Float[Array, "n_cells latent_dim"]) -> Float[Array, "n_cells n_genes"]:
        """The cells' log expression profiles $\\log\\mathrm{softmax}(\\mathrm{decoder}(z))$."""
        h = jax.nn.relu(dense(z, self.decoder))
        return jax.nn.log_softmax(dense(h, self.decoder_out), axis=-1)

    def _check(
        self, counts: Float[Array, "n_cells n_genes"], ambient_profile: Float[Array, " n_genes"], *, check: bool = True
    ) -> tuple[Float[Array, "n_cells n_genes"], Float[Array, " n_genes"]]:
        """Shapes always; values in the program only with `check` (static; see `_prior`)."""
        if counts.ndim != 2 or counts.shape[-1] != self.n_genes:
            raise ValueError(f"counts: expected shape (n_cells, {self.n_genes}), got {counts.shape}")
        if ambient_profile.shape != (self.n_genes,):
            raise ValueError(f"ambient_profile: expected shape ({self.n_genes},), got {ambient_profile.shape}")
        counts = counts.astype(self.dtype)
        profile = ambient_profile.astype(self.dtype)
        if not check:
            return counts, profile
        counts = eqx.error_if(
            counts, jnp.any(counts < 0) | ~jnp.all(jnp.isfinite(counts)), "counts: must be finite and >= 0"
        )
        profile = eqx.error_if(
            profile,
            jnp.any(profile < 0) | ~jnp.all(jnp.isfinite(profile)) | (jnp.sum(profile) <= 0),
            "ambient_profile: must be finite, >= 0 and not all zero",
        )
        return counts, profile

    # ---- public API -----------------------------------------------------------------------------------------

    def __call__(
        self,
        counts: Float[Array, "n_cells n_genes"],
        ambient_profile: Float[Array, " n_genes"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        integer: bool = False,
    ) -> AmbientResult:
        """Split each droplet's counts into cell and ambient parts.

        **Arguments:**

        - `counts`: `(n_cells, n_genes)` raw counts.
        - `ambient_profile`: `(n_genes,)` non-negative ambient profile (normalised here).
        - `key`: if given and not `inference`, use one posterior draw of `z` instead of its mean (and skip the
          EM refinement). (Keyword only argument.)
        - `inference`: use the posterior means even when a key is given.
        - `integer`: round the decontaminated counts to whole numbers (never above the observed counts).

        **Returns:** an `AmbientResult`.
        """
        return self._forward(counts, ambient_profile, key=key, inference=inference, integer=integer, check=True)

    def _forward(
        self,
        counts: Float[Array, "n_cells n_genes"],
        ambient_profile: Float[Array, " n_genes"],
        *,
        key: PRNGKeyArray | None,
        inference: bool,
        integer: bool,
        check: bool,
    ) -> AmbientResult:
        """`__call__`; without `check` (static), no value checks in the program (the caller checked on the host)."""
        counts, profile = self._check(counts, ambient_profile, check=check)
        log_profile = safe_log_profile(profile)
        z_mean, z_log_variance, logit_f = self.encode(counts, check=check)
        sample = key is not None and not inference
        z = z_mean if key is None or inference else reparameterize(z_mean, z_log_variance, key=key)
        log_cell_profile = self.decode(z)
        log_total = log_library_size(counts)
        if self.n_refine_steps and not sample:
            logit_f, _ = refine_logit_fraction(
                counts, log_cell_profile, log_profile, logit_f, n_steps=self.n_refine_steps,
                log_prior=lambda logit: self.log_prior(logit, log_total, check=check),
            )
        log_cell_rate, log_ambient_rate = ambient_log_rates(log_total, logit_f, log_cell_profile, log_profile)
        cell_counts = posterior_cell_counts(counts, log_cell_rate, log_ambient_rate)
        if integer:
            cell_counts = round_cell_counts(counts, cell_counts)
        return AmbientResult(
            decontaminated_counts=cell_counts,
            contamination_fraction=contamination_fraction(counts, cell_counts),
            latent=z,
            ambient_fraction=jax.nn.sigmoid(logit_f),
        )

    def loss(
        self,
        batch: tuple[Float[Array, "n_cells n_genes"], Float[Array, " n_genes"]],
        /,
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """Negative ELBO in `z` plus the negative log prior of the point estimate of $f$, averaged over cells,
        with one reparameterised draw of `z` per cell.

        $\\mathcal{L} = \\frac1n \\sum_n \\big[-\\log p(x_n \\mid z_n, f_n) + \\mathrm{KL}(q(z_n)\\,\\|\\,p(z))
        - \\log p(f_n)\\big]$ with the fixed prior of `log_prior_fraction`.

        **Arguments:**

        - `batch`: `(counts, ambient_profile)`: a `(n_cells, n_genes)` minibatch of raw counts and the
          `(n_genes,)` ambient profile, as in `__call__`.
        - `key`: PRNG key for the posterior draw of `z`. (Keyword only argument.)

        **Returns:** `(loss, aux)` with the per-cell means `reconstruction` (negative log-likelihood), `kl_latent`,
        `prior_fraction` (negative log prior density of `logit f`) and `ambient_fraction`.
        """
        return self._loss(*batch, key=key, check=True)

    def _loss(
        self,
        counts: Float[Array, "n_cells n_genes"],
        ambient_profile: Float[Array, " n_genes"],
        *,
        key: PRNGKeyArray,
        check: bool,
        log_factorial: Float[Array, " n_cells"] | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """`loss`; without `check` (static), no value checks in the program (the caller checked on the host).
        `log_factorial`: the cells' precomputed log-factorial constants (`ambient_count_log_likelihood`)."""
        counts, profile = self._check(counts, ambient_profile, check=check)
        z_mean, z_log_variance, logit_f = self.encode(counts, check=check)
        z = reparameterize(z_mean, z_log_variance, key=key)
        log_total = log_library_size(counts)
        log_cell_profile = self.decode(z)
        log_cell_rate, log_ambient_rate = ambient_log_rates(
            log_total, logit_f, log_cell_profile, safe_log_profile(profile)
        )
        reconstruction = -ambient_count_log_likelihood(
            counts, log_cell_rate, log_ambient_rate, self.log_inverse_dispersion, log_factorial
        )
        zero = jnp.zeros((), dtype=self.dtype)
        kl_latent = gaussian_kl_to_prior(z_mean, z_log_variance, zero[None, None], zero[None, None])
        prior_fraction = -self.log_prior(logit_f, log_total, check=check)
        loss = jnp.mean(reconstruction + kl_latent + prior_fraction)
        aux = {
            "reconstruction": jnp.mean(reconstruction),
            "kl_latent": jnp.mean(kl_latent),
            "prior_fraction": jnp.mean(prior_fraction),
            "ambient_fraction": jnp.mean(jax.nn.sigmoid(logit_f)),
        }
        return loss, aux


def _ambient_loss(
    stage: AmbientRemoval, batch: tuple[Array, ...], ambient_profile: Float[Array, " n_genes"], *, key: PRNGKeyArray
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """`fit`'s loss function: the minibatch is `(counts,)` or `(counts, log_factorial)` (the cells' precomputed
    log-factorial constants, which change nothing but speed) and the context is the ambient profile. No value
    checks in the program: `fit_ambient_removal` checked the counts, the profile and the prior on the host (an
    in-program check's host callback would keep the epoch program out of JAX's persistent compilation cache)."""
    counts, log_factorial = batch[0], (batch[1] if len(batch) > 1 else None)
    return stage._loss(counts, ambient_profile, key=key, check=False, log_factorial=log_factorial)


# --------------------------------------------------------------------------------------------------------------
# Ambient profile: given, from empty droplets, or pooled
# --------------------------------------------------------------------------------------------------------------


def _row_totals(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


def empty_droplet_threshold(totals: Any, *, knee_fraction: float = 0.1) -> float:
    """A total-count cutoff below which barcodes are taken as empty droplets.

    Finds the knee of the barcode-rank curve ($\\log$ total against $\\log$ rank, barcodes with counts only):
    the point farthest above the straight line joining the curve's ends, which sits at the end of the cell
    plateau. Returns `knee_fraction` times the knee's total.

    **Arguments:**

    - `totals`: `(n_barcodes,)` total counts per barcode.
    - `knee_fraction`: the cutoff as a share of the knee's total. (Keyword only argument.)

    **Returns:** the cutoff (barcodes with `0 < total <= cutoff` are empty).
    """
    totals = np.asarray(totals, dtype=np.float64).ravel()
    positive = np.sort(totals[totals > 0])[::-1]
    if positive.size < 3:
        raise ValueError("raw_counts: need at least 3 barcodes with counts to find the knee of the rank curve")
    if not 0 < knee_fraction <= 1:
        raise ValueError(f"knee_fraction: must be in (0, 1], got {knee_fraction}")
    x = np.log10(np.arange(1, positive.size + 1))
    y = np.log10(positive)
    chord = y[0] + (y[-1] - y[0]) * (x - x[0]) / (x[-1] - x[0])
    knee = int(np.argmax(y - chord))
    return float(positive[knee] * knee_fraction)


def _empty_droplets(totals: np.ndarray, max_total: float | None, knee_fraction: float, min_droplets: int) -> np.ndarray:
    cutoff = empty_droplet_threshold(totals, knee_fraction=knee_fraction) if max_total is None else float(max_total)
    empty = np.flatnonzero((totals > 0) & (totals <= cutoff))
    if empty.size < min_droplets:
        raise ValueError(
            f"raw_counts: only {empty.size} barcodes with 0 < total <= {cutoff:.4g}; need >= {min_droplets} "
            "empty droplets (pass the unfiltered matrix, or set max_total)"
        )
    return empty


def estimate_ambient_profile(
    raw_counts: Any, *, max_total: float | None = None, knee_fraction: float = 0.1, min_droplets: int = 10
) -> np.ndarray:
    """The ambient profile as the pooled expression of the empty droplets of a raw (unfiltered) matrix.

    Empty droplets are barcodes with `0 < total <= max_total` (EmptyDrops' `lower`); by default the cutoff is
    `knee_fraction` times the total at the knee of the barcode-rank curve (`empty_droplet_threshold`).

    **Arguments:**

    - `raw_counts`: `(n_barcodes, n_genes)` raw counts including empty droplets, dense or SciPy sparse.
    - `max_total`: the largest total of an empty droplet; None finds it from the knee. (Keyword only argument.)
    - `knee_fraction`: see `empty_droplet_threshold`.
    - `min_droplets`: raise if fewer empty droplets than this are found.

    **Returns:** `(n_genes,)` float32 profile summing to one.
    """
    matrix = check_counts(raw_counts, field="raw_counts", allow_empty_cells=True)
    empty = _empty_droplets(_row_totals(matrix), max_total, knee_fraction, min_droplets)
    pooled = np.asarray(matrix[empty].sum(axis=0), dtype=np.float64).ravel()
    n_genes = cast(tuple[int, int], matrix.shape)[1]  # scipy infers a CSR shape as possibly None
    # A host array is never a tracer, so the check returns NumPy.
    return cast(np.ndarray, check_ambient_profile(pooled, n_genes, field="ambient profile of the empty droplets"))


def estimate_ambient_count(
    raw_counts: Any,
    *,
    max_total: float | None = None,
    knee_fraction: float = 0.5,
    min_total: float = 0.0,
    min_droplets: int = 10,
) -> tuple[float, float]:
    """CellBender's prior on the ambient amount: the typical number of molecules in an empty droplet.

    A droplet holds about as many ambient molecules as an empty one, whatever the size of its cell (CellBender's
    $d_\\mathrm{empty}$), so a droplet's ambient fraction is about $d_0 / T$. Empty droplets are the barcodes
    with `min_total < total <= max_total`, by default up to half the knee's total (`empty_droplet_threshold`
    with `knee_fraction=0.5`: wider than for the profile, since a cutoff inside the empty plateau would bias the
    typical size down).

    **Arguments:**

    - `raw_counts`: `(n_barcodes, n_genes)` raw counts including empty droplets, dense or SciPy sparse.
    - `max_total`, `knee_fraction`, `min_droplets`: as in `estimate_ambient_profile`. (Keyword only arguments.)
    - `min_total`: ignore barcodes with at most this many counts (on real data, the long tail of barcodes with
      a handful of counts lies below the empty plateau; set it to exclude them).

    **Returns:** `(count, log_scale)`: the median total $d_0$ of the empty droplets and the standard deviation of
    their log totals (at least 0.1), for `AmbientRemoval(prior_ambient_count=, prior_log_scale=)`.
    """
    matrix = check_counts(raw_counts, field="raw_counts", allow_empty_cells=True)
    totals = _row_totals(matrix)
    empty = _empty_droplets(np.where(totals > min_total, totals, 0.0), max_total, knee_fraction, min_droplets)
    return float(np.median(totals[empty])), float(max(np.std(np.log(totals[empty])), 0.1))


def resolve_ambient_profile(counts: Any, ambient_profile: Any = None, *, raw_counts: Any = None) -> np.ndarray:
    """The ambient profile to use, checked and normalised: the given one, else the empty droplets' of
    `raw_counts` (`estimate_ambient_profile`), else the pooled counts of the cells themselves.

    The last two warn (`AmbientProfileWarning`) and say which was used. The pooled fallback is biased: it mixes
    the cells' own expression into the profile, so it under-removes ambient RNA that resembles abundant cells.

    **Returns:** `(n_genes,)` float32 profile summing to one.
    """
    return _resolve_profile(check_counts(counts), ambient_profile, raw_counts)


def _resolve_profile(checked: Any, ambient_profile: Any, raw_counts: Any) -> np.ndarray:
    n_genes = cast(tuple[int, int], checked.shape)[1]  # scipy infers a CSR shape as possibly None
    # Profiles are resolved on the host: the checks below return NumPy (only a tracer would come back as one).
    if ambient_profile is not None:
        return cast(np.ndarray, check_ambient_profile(ambient_profile, n_genes))
    if raw_counts is not None:
        raw = check_counts(raw_counts, field="raw_counts", allow_empty_cells=True, n_genes=n_genes)
        totals = _row_totals(raw)
        cutoff = empty_droplet_threshold(totals)
        n_empty = int(np.sum((totals > 0) & (totals <= cutoff)))
        warnings.warn(
            f"ambient_profile: not given; estimated from the {n_empty} empty droplets of raw_counts "
            f"(barcodes with 0 < total <= {cutoff:.4g})",
            AmbientProfileWarning,
            stacklevel=3,
        )
        return estimate_ambient_profile(raw, max_total=cutoff)
    warnings.warn(
        "ambient_profile: not given and no raw_counts; using the pooled counts of the cells as the ambient "
        "profile (a fallback biased toward abundant cell types; pass ambient_profile= or the unfiltered "
        "raw_counts= for a better one)",
        AmbientProfileWarning,
        stacklevel=3,
    )
    pooled = np.asarray(checked.sum(axis=0), dtype=np.float64).ravel()
    return cast(np.ndarray, check_ambient_profile(pooled, n_genes))


# --------------------------------------------------------------------------------------------------------------
# Training and inference in chunks
# --------------------------------------------------------------------------------------------------------------


#: CellBender's default epochs (`remove-background --epochs 150`; its usage notes: "150 is typically a good choice
#: ... training for more than 300 epochs is too much").
CELLBENDER_EPOCHS = 150
#: The fewest optimiser steps the ambient model gets (see `ambient_default_epochs`).
AMBIENT_MIN_STEPS = 1800


def ambient_default_epochs(n_cells: int, batch_size: int = 128) -> int:
    """Epochs for `fit_ambient_removal`: CellBender's 150, more on small sets (up to 300, so that training takes
    at least 1,800 minibatch steps), fewer on large ones (6 million cell passes, scvi-tools' heuristic scaled):
    `min(round(20000 / n_cells * 300), min(300, max(150, ceil(1800 / steps_per_epoch))))`, at least 1.

    Up to 768 cells: 300 (unchanged: the quality tests' 600 cells and the bundled 700-cell job, 1,500-1,800
    steps); 1,000: 225; 2,000 to 40,000: 150; 100,000: 60; 1,000,000: 6. CellBender trains 150 epochs
    whatever the size and calls more than 300 too many (over-fitting). Steps matter more than epochs on small
    sets: the decoder starts at the pooled profile, which contains every type's markers, and must learn to drop
    the genes a type does not express before the fraction can claim their counts (at 600 cells, 50 epochs (250
    steps) left 26 % of such counts at 2 % contamination and underestimated 30 % contamination by 0.03; 300
    epochs (1,500 steps): 14 % and 0.015). Until 2026-12-02 the rule was `min(round(20000 / n * 300), 300)`,
    300 epochs up to 20,000 cells. At 5,000 cells (the quality test's marker data, 2-30 % contamination) 150
    epochs met every bound of that test as 300 did, at half the CPU: fraction correlation 0.888-0.969 (300:
    0.887-0.972), MAE 0.0034-0.021 (0.0034-0.018), squared error vs raw within 2.3 % of 300's, absent genes
    keeping 1.8-5.5 % of their counts (1.4-3.8 %; the bound is 30 %).
    """
    n_cells = max(int(n_cells), 1)
    steps_per_epoch = math.ceil(n_cells / max(int(batch_size), 1))
    small = min(300, max(CELLBENDER_EPOCHS, math.ceil(AMBIENT_MIN_STEPS / steps_per_epoch)))
    return max(1, min(round(20000 / n_cells * 300), small))


def fit_ambient_removal(
    stage: AmbientRemoval,
    counts: Any,
    ambient_profile: Any = None,
    *,
    key: PRNGKeyArray,
    raw_counts: Any = None,
    settings: TrainSettings | None = None,
    init_profile: bool = True,
) -> FitResult:
    """Train an `AmbientRemoval` stage with the shared minibatch loop (`fit`).

    **Arguments:**

    - `stage`: the (initialised) model.
    - `counts`: `(n_cells, n_genes)` raw counts of the cells (filtered droplets), dense or SciPy sparse.
    - `ambient_profile`: `(n_genes,)` the ambient profile; if None, taken from `raw_counts` or pooled (see
      `resolve_ambient_profile`, which warns which).
    - `key`: PRNG key; the same key gives identical results. (Keyword only argument.)
    - `raw_counts`: the unfiltered matrix (cells and empty droplets). Its empty droplets give the profile (when
      `ambient_profile` is None) and, when the stage has no `prior_ambient_count` yet, CellBender's prior on the
      ambient count per droplet (`estimate_ambient_count`), which the returned model keeps.
    - `settings`: the loop's `TrainSettings`; what is left at None takes these defaults: `n_epochs`
      `ambient_default_epochs(n_cells, batch_size)` (CellBender's 150; up to 300 below 1,400 cells), `batch_size`
      128, AdamW (`shared_optimizer()`) with `hyperparameters` `{"learning_rate": 3e-3, "weight_decay": 1e-6,
      "eps": 0.01}` (given ones replace these), no validation split (with one, the validation loss is the negative
      ELBO).
    - `init_profile`: start the decoder at the cells' pooled profile (its output bias), so that no droplet's
      counts are handed to the ambient term just because the untrained decoder fits worse than the ambient
      profile (with a random decoder the fraction ran to 0.19 in 45 steps on clean data, and to 1.0 with the
      empty-droplet prior). Turn off to continue training an already trained stage.

    **Returns:** `fit`'s `FitResult`; `.model` is the trained stage, `.train_aux` has the per-epoch means of
    `reconstruction`, `kl_latent`, `prior_fraction` and `ambient_fraction`. Use the same profile at inference
    (`remove_ambient` resolves it the same way from the same arguments).
    """
    checked = check_counts(counts, n_genes=stage.n_genes)
    profile = _resolve_profile(checked, ambient_profile, raw_counts)
    stage.check_prior()
    if raw_counts is not None and not float(stage.prior_ambient_count) > 0:
        count, log_scale = estimate_ambient_count(raw_counts)
        stage = eqx.tree_at(
            lambda s: (s.prior_ambient_count, s.prior_log_scale),
            stage,
            (jnp.asarray(count, dtype=stage.dtype), jnp.asarray(log_scale, dtype=stage.dtype)),
        )
    # Start the decoder at the cells' pooled profile: a random profile fits worse than the ambient profile, and
    # early training would then hand the counts to the ambient term (the fraction rose from 0.05 to 0.19 in the
    # first 45 steps on data without absent genes).
    if init_profile:
        pooled = np.asarray(checked.sum(axis=0), dtype=np.float64).ravel() + 0.5
        stage = eqx.tree_at(
            lambda s: s.decoder_out.bias, stage, jnp.asarray(np.log(pooled / pooled.sum()), dtype=stage.dtype)
        )
    trainable = jax.tree_util.tree_map(eqx.is_inexact_array, stage)
    trainable = eqx.tree_at(
        lambda s: (s.prior_contamination, s.prior_ambient_count, s.prior_log_scale), trainable, (False,) * 3
    )
    batch_size = 128 if settings is None or settings.batch_size is None else settings.batch_size
    defaults = TrainSettings(
        # scipy: a CSR shape may be None
        n_epochs=ambient_default_epochs(cast(tuple[int, int], checked.shape)[0], batch_size),
        batch_size=128, optimizer=shared_optimizer(),
        hyperparameters={"learning_rate": 3e-3, "weight_decay": 1e-6, "eps": 0.01}, validation_fraction=0.0,
        description="ambient removal",
    )
    settings = (TrainSettings() if settings is None else settings).filled(defaults)
    # The log-factorial constants once on the host, not an `lgamma` per count in every step (a quarter of a
    # step's CPU at 2,000 genes).
    data = (checked, log_factorial_per_cell(checked).astype(jnp.dtype(stage.dtype)))
    return fit(stage, _ambient_loss, data, key=key, settings=settings,
               context=jnp.asarray(profile, dtype=stage.dtype), trainable=trainable)


@eqx.filter_jit
def _remove_chunk(
    batch: tuple[Array], context: tuple[AmbientRemoval, Float[Array, " n_genes"], bool]
) -> AmbientResult:
    # No value checks in the program: `remove_ambient` checked the counts, the profile and the prior on the host.
    stage, profile, integer = context
    (counts,) = batch
    return stage._forward(counts, profile, key=None, inference=True, integer=integer, check=False)


def remove_ambient(
    stage: AmbientRemoval,
    counts: Any,
    ambient_profile: Any = None,
    *,
    raw_counts: Any = None,
    integer: bool = False,
    chunk_size: int = 4096,
) -> AmbientResult:
    """Decontaminate any number of cells with a trained stage, in fixed-size compiled chunks.

    **Arguments:**

    - `stage`: a trained `AmbientRemoval`.
    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse (densified one chunk at a time).
    - `ambient_profile`, `raw_counts`: the profile, as in `fit_ambient_removal`.
    - `integer`: whole-number decontaminated counts (rounded, never above the observed counts).
      (Keyword only argument.)
    - `chunk_size`: cells per compiled call.

    **Returns:** an `AmbientResult` with deterministic (posterior mean) values.
    """
    checked = check_counts(counts, n_genes=stage.n_genes)
    profile = _resolve_profile(checked, ambient_profile, raw_counts)
    stage.check_prior()
    context = (stage, jnp.asarray(profile, dtype=stage.dtype), bool(integer))
    return map_in_chunks(_remove_chunk, (checked,), chunk_size=chunk_size, context=context)


__all__ = [
    "AmbientProfileWarning",
    "AmbientRemoval",
    "AmbientResult",
    "empty_droplet_threshold",
    "estimate_ambient_count",
    "estimate_ambient_profile",
    "ambient_default_epochs",
    "fit_ambient_removal",
    "remove_ambient",
    "resolve_ambient_profile",
]
