"""Molecular cross-validation (Batson, Royer and Webber 2019), scored as the Open Problems denoising task does.

The molecules of each cell are split binomially: `train ~ Binomial(counts, p)`, `test = counts - train`, two
independent Poisson draws of the same cell when counts are Poisson. A denoiser sees only `train`; its output is
scored against `test`:

- `mse`: mean squared error after both are scaled to 10,000 counts per cell and `log1p`-transformed
  (Open Problems' `mse` metric, `scanpy.pp.normalize_total(target_sum=1e4)` then `log1p`);
- `poisson`: the mean Poisson negative log-likelihood $\\mu - y \\log(\\mu + 10^{-6})$ of the test counts $y$
  under the denoised values rescaled by `test.sum() / train.sum()` (Open Problems' `poisson` metric, with the
  prediction and target in their intended roles);
- `matched_mse`: Batson et al.'s own MSE: `log1p(test)` against `log1p(denoised * test.sum() / train.sum())`,
  the denoised values brought to the depth of the test half before the transform (the normalised `mse` above
  compares a 10 % draw with a full-depth profile after `log1p`, which favours sparse outputs on sparse data).
- `expected_mse`: Open Problems' transform of the test half scored against what the denoiser predicts for that
  same transformed value, $E[\\log(1 + 10^4 Y / T)]$ for the test counts $Y$ of a cell with test total $T$ when
  its counts follow the denoised shares: $Y \\sim \\mathrm{Binomial}(T, \\mu_g / \\sum_g \\mu_g)$
  (`expected_log1p_normalized`). This is Batson et al.'s rule for an MSE in a transformed space (their
  `convert_expectations`: the denoiser's estimate becomes the expected transformed value of the test draw before
  the squared error, since $f(E[Y]) \\neq E[f(Y)]$ for a concave $f$ on a sparse draw). `mse` compares $f$ of a
  mean with $f$ of a draw: on sparse data it ranks even the true expression profiles below the untreated half,
  where `expected_mse` ranks them first (tested).

The untreated baseline is `train` itself (Open Problems' `no_denoising`). `molecular_cross_validation` accepts
any denoiser, `denoiser(train_counts) -> expected counts`, ours or another package's.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._core._validate import check_counts
from ._magic import Magic, library_size_normalize, magic


#: Open Problems' defaults: 90 % of the molecules to train on, 10,000 counts a cell for the MSE.
TRAIN_FRACTION = 0.9
TARGET_SUM = 1e4

#: `expected_log1p_normalized`: expected test counts up to this are summed over their distribution (over
#: `EXPECTATION_TERMS` counts, 12 standard deviations past the cut-off); above it a fourth-order Taylor expansion
#: around the mean is used (its error is of order mean^-3, below 1e-4 there).
EXPECTATION_CUTOFF = 30.0
EXPECTATION_TERMS = 96


def split_molecules(
    counts: Any, *, key: PRNGKeyArray, train_fraction: float = TRAIN_FRACTION
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray | sp.csr_matrix]:
    """`train ~ Binomial(counts, train_fraction)`, `test = counts - train` (sparse stays sparse, float32)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction: must be in (0, 1), got {train_fraction!r}")
    checked: Any = check_counts(counts, field="counts", allow_empty_cells=True)
    values = checked.data if sp.issparse(checked) else np.asarray(checked).ravel()
    drawn = np.asarray(jr.binomial(key, jnp.asarray(values), train_fraction), dtype=np.float32)
    drawn = np.minimum(drawn, values)
    if sp.issparse(checked):
        # Each half gets its own index arrays: `eliminate_zeros` works in place.
        train = sp.csr_matrix((drawn, checked.indices.copy(), checked.indptr.copy()), shape=checked.shape)
        test = sp.csr_matrix((values - drawn, checked.indices.copy(), checked.indptr.copy()), shape=checked.shape)
        train.eliminate_zeros()
        test.eliminate_zeros()
        return train, test
    shape = np.asarray(checked).shape
    return drawn.reshape(shape), (values - drawn).reshape(shape)


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _log_normalized(x: np.ndarray, target_sum: float) -> np.ndarray:
    totals = x.sum(axis=1, keepdims=True)
    return np.log1p(x * (target_sum / np.where(totals > 0, totals, 1.0)))


def mcv_mse(test: Any, denoised: Any, *, target_sum: float = TARGET_SUM, block_rows: int = 8192) -> float:
    """MSE between `log1p(normalize_total(test))` and `log1p(normalize_total(denoised))`, over all entries."""
    n_cells, n_genes = test.shape
    total = 0.0
    for start in range(0, n_cells, block_rows):
        stop = start + block_rows
        diff = _log_normalized(_dense(test[start:stop]), target_sum) - _log_normalized(
            _dense(denoised[start:stop]), target_sum
        )
        total += float(np.sum(diff * diff))
    return total / (n_cells * n_genes)


def mcv_poisson(test: Any, denoised: Any, train_total: float, *, block_rows: int = 8192) -> float:
    """Mean Poisson loss $\\mu - y \\log(\\mu + 10^{-6})$ with $\\mu$ = `denoised * test.sum() / train_total`."""
    n_cells, n_genes = test.shape
    scale = float(test.sum()) / float(train_total)
    total = 0.0
    for start in range(0, n_cells, block_rows):
        stop = start + block_rows
        mean = _dense(denoised[start:stop]) * scale
        total += float(np.sum(mean - _dense(test[start:stop]) * np.log(mean + 1e-6)))
    return total / (n_cells * n_genes)


def mcv_matched_mse(test: Any, denoised: Any, train_total: float, *, block_rows: int = 8192) -> float:
    """Batson et al.'s MSE: `log1p(test)` against `log1p(denoised * test.sum() / train_total)`."""
    n_cells, n_genes = test.shape
    scale = float(test.sum()) / float(train_total)
    total = 0.0
    for start in range(0, n_cells, block_rows):
        stop = start + block_rows
        diff = np.log1p(_dense(test[start:stop])) - np.log1p(_dense(denoised[start:stop]) * scale)
        total += float(np.sum(diff * diff))
    return total / (n_cells * n_genes)


@jax.jit
def expected_log1p_normalized(
    denoised: Float[Array, "n_cells n_genes"], totals: Float[Array, " n_cells"], target_sum: Float[ArrayLike, ""]
) -> Float[Array, "n_cells n_genes"]:
    """$E[\\log(1 + s Y / T)]$ for $Y \\sim \\mathrm{Binomial}(T, \\pi)$, $\\pi$ = each row of `denoised` divided
    by its sum, $T$ = `totals` (the test half's counts per cell), $s$ = `target_sum`: what a denoiser whose
    expected counts are `denoised` predicts for Open Problems' `log1p(normalize_total(test))` (0 where $T = 0$).

    Expected counts $m = T \\pi$ up to `EXPECTATION_CUTOFF` are summed over the binomial probabilities (by their
    recursion, over `EXPECTATION_TERMS` counts); above it the Taylor expansion of $f(y) = \\log(1 + s y / T)$
    around $m$ to fourth order, with the binomial's central moments.
    """
    row_sum = jnp.sum(denoised, axis=1, keepdims=True)
    share = jnp.clip(denoised / jnp.where(row_sum > 0, row_sum, 1.0), 0.0, 1.0 - 1e-6)
    t = totals[:, None].astype(share.dtype)
    k = jnp.asarray(target_sum, share.dtype) / jnp.where(t > 0, t, 1.0)
    mean = t * share
    odds = share / (1.0 - share)

    def term(y: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        pmf, total = carry
        count = y.astype(share.dtype)
        pmf = pmf * (jnp.maximum(t - count + 1.0, 0.0) / count) * odds
        return pmf, total + pmf * jnp.log1p(k * count)

    first = jnp.exp(t * jnp.log1p(-share))  # P(Y = 0), whose term log1p(k * 0) is 0
    summed = jax.lax.fori_loop(1, EXPECTATION_TERMS, term, (first, jnp.zeros_like(share)))[1]
    slope = k / (1.0 + k * mean)  # f^(j)(m) = (-1)^(j+1) (j-1)! slope^j
    second = mean * (1.0 - share)
    third = second * (1.0 - 2.0 * share)
    fourth = 3.0 * second**2 + second * (1.0 - 6.0 * share * (1.0 - share))
    taylor = jnp.log1p(k * mean) - slope**2 * second / 2 + slope**3 * third / 3 - slope**4 * fourth / 4
    return jnp.where(t > 0, jnp.where(mean > EXPECTATION_CUTOFF, taylor, summed), 0.0)


def mcv_expected_mse(test: Any, denoised: Any, *, target_sum: float = TARGET_SUM, block_rows: int = 2048) -> float:
    """MSE between `log1p(normalize_total(test))` and its expectation under the denoised counts
    (`expected_log1p_normalized`), over all entries."""
    n_cells, n_genes = test.shape
    total = 0.0
    for start in range(0, n_cells, block_rows):
        stop = start + block_rows
        observed = _dense(test[start:stop])
        predicted = expected_log1p_normalized(
            jnp.asarray(_dense(denoised[start:stop]), jnp.float32), jnp.asarray(observed.sum(axis=1), jnp.float32),
            target_sum,
        )
        diff = _log_normalized(observed, target_sum) - np.asarray(predicted, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return total / (n_cells * n_genes)


class MCVResult(eqx.Module):
    """Molecular cross-validation scores (lower is better): the denoiser's `mse` (Open Problems' normalised MSE),
    `poisson`, `matched_mse` (Batson's depth-matched MSE) and `expected_mse` (the normalised test half against its
    expectation under the denoised counts), and the same for the untreated baseline (the training half scored as
    it is): `baseline_mse`, `baseline_poisson`, `baseline_matched_mse`, `baseline_expected_mse`."""

    mse: float
    poisson: float
    matched_mse: float
    expected_mse: float
    baseline_mse: float
    baseline_poisson: float
    baseline_matched_mse: float
    baseline_expected_mse: float


def molecular_cross_validation(
    counts: Any,
    denoiser: Callable[[Any], Any],
    *,
    key: PRNGKeyArray,
    train_fraction: float = TRAIN_FRACTION,
    target_sum: float = TARGET_SUM,
) -> MCVResult:
    """Split `counts` binomially, denoise the training half with `denoiser`, score it against the test half.

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse.
    - `denoiser`: `denoiser(train) -> (n_cells, n_genes)` expected counts on the scale of `train` (any array;
      `train` is float32, dense or CSR as `counts`).
    - `key`: draws the split. (Keyword only argument.)
    - `train_fraction`: share of molecules given to the denoiser (Open Problems: 0.9).
    - `target_sum`: counts per cell before `log1p` in the MSE.

    **Returns:** an `MCVResult`.
    """
    train, test = cast(tuple[Any, Any], split_molecules(counts, key=key, train_fraction=train_fraction))
    denoised: Any = denoiser(train)
    if sp.issparse(denoised):
        denoised = sp.csr_matrix(denoised)
    else:
        denoised = np.asarray(denoised)
    if tuple(denoised.shape) != tuple(train.shape):
        raise ValueError(f"denoiser: returned shape {tuple(denoised.shape)}, expected {tuple(train.shape)}")
    train_total = float(train.sum())
    return MCVResult(
        mse=mcv_mse(test, denoised, target_sum=target_sum),
        poisson=mcv_poisson(test, denoised, train_total),
        matched_mse=mcv_matched_mse(test, denoised, train_total),
        expected_mse=mcv_expected_mse(test, denoised, target_sum=target_sum),
        baseline_mse=mcv_mse(test, train, target_sum=target_sum),
        baseline_poisson=mcv_poisson(test, train, train_total),
        baseline_matched_mse=mcv_matched_mse(test, train, train_total),
        baseline_expected_mse=mcv_expected_mse(test, train, target_sum=target_sum),
    )


def magic_denoiser(settings: Magic | None = None, **magic_keywords: Any) -> Callable[[Any], np.ndarray]:
    """A denoiser for `molecular_cross_validation` running MAGIC as Open Problems' `magic` method does: counts
    scaled to unit library size, square root, MAGIC (`settings`, a `Magic`; its `normalize` is replaced by this
    preprocessing), squared, times each cell's library size. `magic_keywords` go to `magic` (`key`, ...)."""
    chosen = Magic() if settings is None else settings
    chosen = dataclasses.replace(chosen, normalize=False)

    def denoise(train: Any) -> np.ndarray:
        checked: Any = check_counts(train, field="counts")
        scaled, library = library_size_normalize(checked, rescale=None)
        if sp.issparse(scaled):  # stays sparse: MAGIC densifies one block of cells or genes at a time
            rooted: Any = scaled  # a fresh copy from library_size_normalize
            rooted.data = np.sqrt(rooted.data)
        else:
            rooted = np.sqrt(np.asarray(scaled))
        imputed = magic(rooted, chosen, **magic_keywords).imputed  # a fresh host array: squared and scaled in place
        np.square(imputed, out=imputed)
        imputed *= library[:, None].astype(np.float32)
        return imputed

    return denoise
