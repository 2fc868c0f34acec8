"""Harmony batch correction (Korsunsky et al. 2019, with R harmony 2's changes) as pure JAX functions.

The numerics follow harmonypy 2.1 (its C++ backend, which follows R harmony 2) step by step; the loop that runs
these functions is `diffbio_eqx._harmony._stage.harmony_core`:

1. **Initialisation.** Cells are scaled to unit length (cosine normalisation). Centroids come from plain
   k-means++ seeding plus up to 25 Lloyd rounds on the normalised cells (`kmeans_plus_plus` with one trial and
   `lloyd`, from `diffbio_eqx._clustering`), or from `init_centroids`, scaled to unit length.
2. **Each outer round** (at most `max_iter_harmony`):
    - *Cold start*: the corrected cells are scaled to unit length, `dist = 2 (1 - z_cos y^T)` and
      `R = softmax(-dist / sigma)` without the penalty; `E = (sum_i R_ik) Pr_b` and `O = R^T Phi`.
    - *Clustering* (at most `max_iter_kmeans` rounds, centroids held fixed as in harmonypy 2.1): the cells are
      shuffled and split into blocks of `block_size` of them; block by block, the block's cells leave `E` and `O`,
      get new responsibilities `R_i = softmax_k(-dist_ik / sigma + sum_b Phi_ib theta_b log((2 E_kb + 1) /
      (O_kb + E_kb + 1)))` (the Harmony 2 diversity penalty) and are put back.
    - *Mixture-of-experts ridge correction*: for every cluster `k`, a ridge regression of the original cells on
      an intercept and the batch indicators, weighted by `R_{.k}`, with the intercept unpenalised and the batch
      terms penalised by `lamb` (fixed) or Harmony 2's `alpha * E_kb` (`lamb < 0` or `None`). Batches holding a
      share of at most `batch_prop_cutoff` of their cells in the cluster are dropped from that cluster's
      regression. The batch terms are subtracted (`z_corr = x - sum_k R_ik W_k^T phi_i`) and the intercepts,
      scaled to unit length, become the new centroids.
3. **Objective** (tracked after each clustering round, scaled by `2000 / n_cells`):
   $\\sum_{ik} R_{ik} d_{ik} + \\sigma \\sum_{ik} R_{ik} \\log R_{ik}
   + \\sigma \\sum_{kb} \\theta_b O_{kb} \\log\\frac{O_{kb} + E_{kb} + 1}{2 E_{kb} + 1}$
   (k-means error, entropy, diversity cross-entropy).
4. **Convergence** as harmonypy: clustering stops once, after the fifth round, the windowed change
   `|sum(obj[-4:-1]) - sum(obj[-3:])| / |sum(obj[-4:-1])| < epsilon_cluster`; Harmony stops once
   `(obj_prev - obj_new) / |obj_prev| < epsilon_harmony`. Both loops run on `diffbio_eqx._core._loop.iterate`:
   by default `lax.scan`s of fixed length whose state freezes once the test passes (differentiable,
   vmappable); with `early_exit=True` the same steps in `lax.while_loop`s that stop there.

The random stream (k-means++ draws and block shuffles) is JAX's, so results equal harmonypy's only in
distribution; from the same initial centroids they agree closely (see the tests).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._clustering._kmeans import ROW_CHUNK
from .._core._loop import chunk_start, row_chunks


# ---------------------------------------------------------------------------------------------------------------
# Presets


@dataclasses.dataclass(frozen=True)
class HarmonyPreset:
    """Default settings of one Harmony version (see `HARMONY2` and `CLASSIC`)."""

    theta: float
    sigma: float
    lamb: float | None
    alpha: float
    max_iter_harmony: int
    max_iter_kmeans: int
    epsilon_cluster: float
    epsilon_harmony: float
    block_size: float
    batch_prop_cutoff: float


#: Harmony 2 (R harmony >= 1.0, harmonypy 2.x): dynamic ridge penalty `alpha * E`, 4 clustering rounds.
HARMONY2 = HarmonyPreset(
    theta=2.0,
    sigma=0.1,
    lamb=None,
    alpha=0.2,
    max_iter_harmony=10,
    max_iter_kmeans=4,
    epsilon_cluster=1e-3,
    epsilon_harmony=1e-2,
    block_size=0.05,
    batch_prop_cutoff=1e-5,
)
#: Harmony 1 (the 2019 paper's defaults): fixed ridge penalty 1, 20 clustering rounds, tighter tolerances.
CLASSIC = dataclasses.replace(
    HARMONY2, lamb=1.0, max_iter_kmeans=20, epsilon_cluster=1e-5, epsilon_harmony=1e-4
)
PRESETS = {"harmony2": HARMONY2, "classic": CLASSIC}


def default_n_clusters(n_cells: int) -> int:
    """Harmony's default number of clusters, `min(round(n_cells / 30), 100)` (at least 1)."""
    return max(1, int(min(round(n_cells / 30.0), 100)))


# ---------------------------------------------------------------------------------------------------------------
# Result


class HarmonyResult(eqx.Module):
    """The output of `harmony`, with everything `harmony_transform` needs to correct new cells.

    - `z_corr`: `(n_cells, n_dims)` corrected embedding (not scaled to unit length).
    - `r`: `(n_cells, n_clusters)` soft assignments of the last clustering round.
    - `centroids`: `(n_clusters, n_dims)` final centroids Y (unit rows: the normalised ridge intercepts).
    - `ridge_coefficients`: `(n_clusters, n_batches, n_dims)` the batch terms of each cluster's last ridge
      regression (zero for batches dropped from that cluster); `z_corr = x - sum_k r_ik W_k[batch_i]`.
    - `cluster_sizes`, `cluster_sums`: `sum_i r_ik` and `r^T z_corr`, the reference statistics a Symphony-style
      query mapping uses.
    - `objective`: `(max_iter_harmony,)` the objective after each outer round's clustering (repeated once frozen).
    - `initial_objective`: the objective at the initial centroids.
    - `objective_kmeans`: `(max_iter_harmony, max_iter_kmeans)` the objective after every clustering round.
    - `kmeans_rounds`: `(max_iter_harmony,)` clustering rounds run in each outer round (0 once frozen).
    - `n_rounds`: outer rounds run; `converged`: whether the Harmony test passed.
    - `sigma`: the bandwidth used (for `harmony_transform`); `n_batches`: levels per covariate (static).
    """

    z_corr: Float[Array, "n_cells n_dims"]
    r: Float[Array, "n_cells n_clusters"]
    centroids: Float[Array, "n_clusters n_dims"]
    ridge_coefficients: Float[Array, "n_clusters n_batches n_dims"]
    cluster_sizes: Float[Array, " n_clusters"]
    cluster_sums: Float[Array, "n_clusters n_dims"]
    objective: Float[Array, " n_iter"]
    initial_objective: Float[Array, ""]
    objective_kmeans: Float[Array, "n_iter n_kmeans"]
    kmeans_rounds: Int[Array, " n_iter"]
    n_rounds: Int[Array, ""]
    converged: Bool[Array, ""]
    sigma: Float[Array, ""]
    n_batches: tuple[int, ...] = eqx.field(static=True)


# ---------------------------------------------------------------------------------------------------------------
# Small pure functions


def cosine_normalize(x: Float[Array, "n dims"]) -> Float[Array, "n dims"]:
    """Scale each row to unit Euclidean length (rows of zeros stay zero)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    positive = norm > 0
    return jnp.where(positive, x / jnp.where(positive, norm, 1), 0)


def batch_onehot(
    batch_labels: Int[Array, "n_cells n_covariates"], n_batches: tuple[int, ...], dtype: DTypeLike
) -> Float[Array, "n_cells n_levels"]:
    """Indicator matrix `Phi^T` with one block of columns per covariate (levels in code order)."""
    columns = [
        jax.nn.one_hot(batch_labels[:, c], n, dtype=dtype) for c, n in enumerate(n_batches)
    ]
    return jnp.concatenate(columns, axis=1)


def _level_to_covariate(n_batches: tuple[int, ...]) -> np.ndarray:
    return np.repeat(np.arange(len(n_batches)), n_batches)


def per_level(
    values: Float[Array, "*covariates"], n_batches: tuple[int, ...]
) -> Float[Array, " n_levels"]:
    """Expand a scalar or one value per covariate to one value per batch level."""
    values = jnp.reshape(values, (-1,))
    if values.shape[0] == 1:
        return jnp.broadcast_to(values, (sum(n_batches),))
    return values[_level_to_covariate(n_batches)]


def squared_distances_cosine(
    z_cos: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"]
) -> Float[Array, "n_cells n_clusters"]:
    """Harmony's distance between unit vectors, `2 (1 - z_cos . y)`."""
    return 2 - 2 * (z_cos @ centroids.T)


# ---------------------------------------------------------------------------------------------------------------
# Soft clustering with the diversity penalty


def block_layout(n_cells: int, block_size: float) -> np.ndarray:
    """Positions (in shuffled order) of the cells of each block, padded with `n_cells`, as harmonypy cuts them.

    `ceil(1 / block_size)` blocks of `floor(n_cells * block_size)` cells (at least 1); the last block takes the
    remainder. Returns an `(n_blocks, max_block_len)` integer array (static, NumPy).
    """
    n_blocks = int(math.ceil(1.0 / float(np.float32(block_size))))
    per_block = max(1, int(np.float32(n_cells) * np.float32(block_size)))
    bounds = []
    for i in range(n_blocks):
        lo = i * per_block
        if lo >= n_cells:
            break
        hi = n_cells if i == n_blocks - 1 else min((i + 1) * per_block, n_cells)
        bounds.append((lo, hi))
    width = max(hi - lo for lo, hi in bounds)
    layout = np.full((len(bounds), width), n_cells, dtype=np.int32)
    for row, (lo, hi) in enumerate(bounds):
        layout[row, : hi - lo] = np.arange(lo, hi)
    return layout


def _primes_below(limit: int) -> np.ndarray:
    if limit < 2:
        return np.zeros((0,), np.int64)
    sieve = np.ones(limit, bool)
    sieve[:2] = False
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    return np.flatnonzero(sieve)


def shuffle_strides(n_cells: int, n_strides: int = 64) -> np.ndarray:
    """Static strides `a` coprime with `n_cells`, small enough that `a * i` fits in int32 for `i < n_cells`."""
    limit = min(n_cells, (2**31 - 1) // max(n_cells, 1))
    primes = _primes_below(limit)
    primes = primes[n_cells % primes != 0]
    if primes.size == 0:
        return np.ones((1,), np.int32)
    pick = np.unique(np.linspace(0, primes.size - 1, min(n_strides, primes.size)).astype(int))
    return primes[pick].astype(np.int32)


def shuffled_order(
    base_order: Int[Array, " n_cells"], strides: np.ndarray, key: PRNGKeyArray
) -> Int[Array, " n_cells"]:
    """A fresh visiting order per clustering round without a sort: `base_order[(a i + c) mod n_cells]`.

    `base_order` is one uniformly random permutation drawn per run; the stride `a` (coprime with `n_cells`, from
    `strides`) and offset `c` are drawn per round. Each block of consecutive positions is then a uniformly random
    subset of the cells, as with harmonypy's per-round `std::shuffle`, at O(n_cells) cost instead of a sort.
    """
    n_cells = base_order.shape[0]
    stride_key, offset_key = jr.split(key)
    stride = jnp.asarray(strides)[jr.randint(stride_key, (), 0, strides.shape[0])]
    offset = jr.randint(offset_key, (), 0, n_cells, dtype=stride.dtype)
    positions = jnp.arange(n_cells, dtype=stride.dtype)
    return base_order[(stride * positions % n_cells + offset) % n_cells]


class _ClusterStats(eqx.Module):
    r: Float[Array, "n_cells n_clusters"]
    mass: Float[Array, " n_clusters"]  # sum_i R_ik; E = mass Pr_b
    observed: Float[Array, "n_clusters n_levels"]  # O = R^T Phi


def diversity_log_penalty(
    mass: Float[Array, " n_clusters"],
    observed: Float[Array, "n_clusters n_levels"],
    prior: Float[Array, " n_levels"],
    theta: Float[Array, " n_levels"],
) -> Float[Array, "n_clusters n_levels"]:
    """Harmony 2's log penalty `theta_b log((2 E_kb + 1) / (O_kb + E_kb + 1))` with `E = mass Pr_b`."""
    expected = mass[:, None] * prior[None, :]
    return theta[None, :] * (jnp.log(2 * expected + 1) - jnp.log(observed + expected + 1))


def harmony_objective_terms(
    kmeans_error: Float[Array, ""],
    entropy: Float[Array, ""],
    stats_mass: Float[Array, " n_clusters"],
    observed: Float[Array, "n_clusters n_levels"],
    prior: Float[Array, " n_levels"],
    theta: Float[Array, " n_levels"],
    sigma: Float[Array, ""],
    n_cells: int,
) -> Float[Array, ""]:
    """The Harmony objective from its parts, scaled by `2000 / n_cells` as harmonypy and R harmony do.

    `kmeans_error = sum R d`, `entropy = sum R log R`; the cross-entropy is
    `sigma sum_kb theta_b O_kb log((O_kb + E_kb + 1) / (2 E_kb + 1))`.
    """
    cross = -jnp.sum(observed * diversity_log_penalty(stats_mass, observed, prior, theta))
    return (kmeans_error + sigma * entropy + sigma * cross) * (2000.0 / n_cells)


def _softmax_and_log(logits: Float[Array, "n k"]) -> tuple[Float[Array, "n k"], Float[Array, "n k"]]:
    """`softmax` and `log_softmax` along the last axis with one `exp` per element."""
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    e = jnp.exp(shifted)
    total = jnp.sum(e, axis=1, keepdims=True)
    return e / total, shifted - jnp.log(total)


def cold_start(
    z: Float[Array, "n_cells n_dims"],
    centroids: Float[Array, "n_clusters n_dims"],
    phi: Float[Array, "n_cells n_levels"],
    sigma: Float[Array, ""],
    buffer: Float[Array, "n_cells n_clusters"] | None = None,
) -> tuple[_ClusterStats, Float[Array, ""], Float[Array, ""]]:
    """Responsibilities without the penalty, `softmax(-dist / sigma)`, their `E`/`O` statistics and the
    k-means error and entropy sums (for the initial objective), computed in row chunks of the cells `z`, each
    scaled to unit length on the fly (no normalised copy of `z` is kept). `buffer`, an array of
    the output's shape whose values are not needed any more, is overwritten in place instead of allocating."""
    n_cells = z.shape[0]
    n_clusters = centroids.shape[0]
    dtype = z.dtype
    n_chunks, chunk = row_chunks(n_cells, ROW_CHUNK)

    def body(carry, i):
        r, mass, observed, kmeans_error, entropy = carry
        start, fresh = chunk_start(i, n_cells, chunk)
        z_chunk = cosine_normalize(jax.lax.dynamic_slice_in_dim(z, start, chunk))
        dist = squared_distances_cosine(z_chunk, centroids)
        r_chunk, log_r = _softmax_and_log(-dist / sigma)
        r = jax.lax.dynamic_update_slice_in_dim(r, r_chunk, start, 0)
        r_fresh = r_chunk * fresh.astype(dtype)[:, None]
        phi_chunk = jax.lax.dynamic_slice_in_dim(phi, start, chunk)
        mass = mass + jnp.sum(r_fresh, axis=0)
        observed = observed + (phi_chunk.T @ r_fresh).T
        kmeans_error = kmeans_error + jnp.sum(r_fresh * dist)
        entropy = entropy + jnp.sum(r_fresh * log_r)
        return (r, mass, observed, kmeans_error, entropy), None

    zero = jnp.zeros((), dtype)
    if buffer is None:
        buffer = jnp.zeros((n_cells, n_clusters), dtype)
    init = (jax.lax.stop_gradient(buffer), jnp.zeros((n_clusters,), dtype),
            jnp.zeros((n_clusters, phi.shape[1]), dtype), zero, zero)
    (r, mass, observed, kmeans_error, entropy), _ = jax.lax.scan(
        body, init, jnp.arange(n_chunks, dtype=jnp.int32)
    )
    return _ClusterStats(r, mass, observed), kmeans_error, entropy


def update_r(
    stats: _ClusterStats,
    z: Float[Array, "n_cells n_dims"],
    centroids: Float[Array, "n_clusters n_dims"],
    phi: Float[Array, "n_cells n_levels"],
    prior: Float[Array, " n_levels"],
    theta: Float[Array, " n_levels"],
    sigma: Float[Array, ""],
    order: Int[Array, " n_cells"],
    layout: np.ndarray,
) -> tuple[_ClusterStats, Float[Array, ""], Float[Array, ""]]:
    """One clustering round: block-wise responsibility updates with the E/O bookkeeping.

    The cells `z` (scaled to unit length block by block) are visited in `order` and cut into blocks by `layout`
    (see `block_layout`); the blocks are an inner `lax.scan` whose carry holds `R` (updated in place),
    `sum_i R_ik` and `O` (the padding of a ragged block points past the last cell and is masked). Returns the new
    statistics and the sums `sum R d`, `sum R log R` of the new `R`.
    """
    n_cells = z.shape[0]
    order_ext = jnp.concatenate([order, jnp.full((1,), n_cells, order.dtype)])
    blocks = order_ext[layout]
    dtype = z.dtype

    def block(carry, cells):
        r, mass, observed, kmeans_error, entropy = carry
        valid = (cells < n_cells).astype(dtype)[:, None]
        r_old = r.at[cells].get(mode="fill", fill_value=0)
        phi_b = phi.at[cells].get(mode="fill", fill_value=0)
        z_b = cosine_normalize(z.at[cells].get(mode="fill", fill_value=0))
        mass = mass - jnp.sum(r_old, axis=0)
        observed = observed - (phi_b.T @ r_old).T
        log_penalty = diversity_log_penalty(mass, observed, prior, theta)
        dist = squared_distances_cosine(z_b, centroids)
        r_new, log_r = _softmax_and_log(-dist / sigma + phi_b @ log_penalty.T)
        r_new = r_new * valid
        mass = mass + jnp.sum(r_new, axis=0)
        observed = observed + (phi_b.T @ r_new).T
        kmeans_error = kmeans_error + jnp.sum(r_new * dist)
        entropy = entropy + jnp.sum(r_new * log_r)
        r = r.at[cells].set(r_new, mode="drop")
        return (r, mass, observed, kmeans_error, entropy), None

    zero = jnp.zeros((), dtype)
    init = (stats.r, stats.mass, stats.observed, zero, zero)
    (r, mass, observed, kmeans_error, entropy), _ = jax.lax.scan(block, init, blocks)
    return _ClusterStats(r, mass, observed), kmeans_error, entropy


# ---------------------------------------------------------------------------------------------------------------
# Mixture-of-experts ridge correction


def level_cells(
    labels: Int[Array, " n_cells"], sizes: tuple[int, ...]
) -> tuple[Int[Array, " _"], ...]:
    """The cells of each level, in increasing order, given the level sizes (static, from concrete labels)."""
    order = jnp.argsort(labels, stable=True).astype(jnp.int32)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return tuple(order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))


class BatchDesign(eqx.Module):
    """The cells' batch indicators and their per-level statistics (see `batch_design`).

    - `phi`: `(n_cells, n_levels)` indicators `Phi^T`, one block of columns per covariate.
    - `prior`: `(n_levels,)` each level's share of the cells, `Pr_b = N_b / N`.
    - `sizes`: `(n_levels,)` each level's number of cells `N_b`.
    - `cells`: the cell indices of each level of the first covariate (`level_cells`), or None.
    - `n_batches`: levels per covariate (static).
    """

    phi: Float[Array, "n_cells n_levels"]
    prior: Float[Array, " n_levels"]
    sizes: Float[Array, " n_levels"]
    cells: tuple[Int[Array, " _"], ...] | None
    n_batches: tuple[int, ...] = eqx.field(static=True)


def batch_design(
    batch_labels: Int[Array, "n_cells n_covariates"],
    n_batches: tuple[int, ...],
    dtype: DTypeLike,
    segments: tuple[int, ...] | None = None,
) -> BatchDesign:
    """The `BatchDesign` of integer codes. `segments`, the level sizes of the first covariate (static, known when
    the labels are concrete), lets the ridge step gather each level's cells instead of masked full-size products
    (B times less work; same results)."""
    n_cells = batch_labels.shape[0]
    cells = None
    if segments is not None:
        if len(segments) != n_batches[0] or sum(segments) != n_cells:
            raise ValueError("segments: must give the size of every level of the first covariate")
        cells = level_cells(batch_labels[:, 0], segments)
    phi = batch_onehot(batch_labels, n_batches, dtype)
    sizes = jnp.sum(phi, axis=0)
    return BatchDesign(phi, sizes / n_cells, sizes, cells, n_batches)


def _ridge_levels(
    observed: Float[Array, "n_clusters n_levels"], design: BatchDesign, batch_prop_cutoff: Float[Array, ""]
) -> tuple[Float[Array, "n_clusters n_levels"], Bool[Array, " n_clusters"]]:
    """Which levels take part in each cluster's regression (as 0/1), and which clusters have any covariate left:
    a level needs a share `O_kb / N_b` above the cutoff, a covariate at least two such levels."""
    dtype = observed.dtype
    batch_sizes = design.sizes
    to_cov = jax.nn.one_hot(_level_to_covariate(design.n_batches), len(design.n_batches), dtype=dtype)
    share = observed / jnp.where(batch_sizes > 0, batch_sizes, 1)[None, :]
    qualifies = (share > batch_prop_cutoff) & (batch_sizes > 0)[None, :]
    cov_active = qualifies.astype(dtype) @ to_cov > 1  # (clusters, covariates)
    keep = qualifies & (cov_active.astype(dtype) @ to_cov.T > 0)
    return keep.astype(dtype), jnp.any(cov_active, axis=1)


def moe_ridge_correct(
    x: Float[Array, "n_cells n_dims"],
    stats: _ClusterStats,
    design: BatchDesign,
    centroids: Float[Array, "n_clusters n_dims"],
    lamb: Float[Array, " n_levels"],
    alpha: Float[Array, ""],
    batch_prop_cutoff: Float[Array, ""],
) -> tuple[
    Float[Array, "n_cells n_dims"], Float[Array, "n_clusters n_dims"], Float[Array, "n_clusters n_levels n_dims"]
]:
    """Harmony's mixture-of-experts ridge correction of the original cells `x`.

    For each cluster `k`, solve `(Phi_moe diag(R_k) Phi_moe^T + Lambda_k) W_k = Phi_moe diag(R_k) x` with
    `Phi_moe` the indicators plus an intercept row, `Lambda_k = diag(0, lambda_kb)`: the intercept is
    unpenalised; `lambda_kb = lamb_b` when `lamb_b >= 0`, else Harmony 2's `alpha * E_kb`. Batch levels whose
    share `O_kb / N_b` is at most `batch_prop_cutoff`, and covariates left with fewer than two such levels, drop
    out of cluster `k`'s regression (with their cells, for the intercept); a cluster with no covariate left is
    not corrected and keeps its centroid.

    `design.cells`, when given, are the cell indices of each level of the first covariate; the per-level sums
    and corrections of that covariate then gather those cells instead of masked full-size products.

    **Returns:** `x - sum_k R_ik W_k[batch terms]^T phi_i`, the new unit-length centroids (the intercepts) and the
    batch coefficients `(n_clusters, n_levels, n_dims)`.
    """
    r, mass, observed = stats.r, stats.mass, stats.observed
    phi, cells = design.phi, design.cells
    dtype = x.dtype
    n_levels = phi.shape[1]
    n_covariates = len(design.n_batches)
    keep_f, active = _ridge_levels(observed, design, batch_prop_cutoff)

    expected = mass[:, None] * design.prior[None, :]
    penalty = jnp.where(lamb[None, :] < 0, alpha * expected, lamb[None, :])
    # Dropped levels get an isolated unit row, so their coefficients solve to zero.
    diag = keep_f * penalty + (1 - keep_f)

    # Per-level weighted sums of the original cells: S[k, b] = sum_i R_ik Phi_ib x_i; the levels with a cell list
    # gather their cells, the others use masked full-size products.
    grouped = () if cells is None else cells
    level_sums = jnp.stack(
        [r[idx].T @ x[idx] for idx in grouped]
        + [r.T @ (x * phi[:, b][:, None]) for b in range(len(grouped), n_levels)],
        axis=1,
    )
    if n_covariates == 1:
        gram = observed[:, :, None] * jnp.eye(n_levels, dtype=dtype)[None, :, :]  # one level per cell
        intercept_mass = jnp.sum(keep_f * observed, axis=1)
        intercept_sum = jnp.sum(keep_f[:, :, None] * level_sums, axis=1)
    else:
        gram = jnp.stack([(r * phi[:, b][:, None]).T @ phi for b in range(n_levels)], axis=2)
        in_kept = (phi @ keep_f.T > 0).astype(dtype)  # (cells, clusters): cell has a kept level
        intercept_mass = jnp.sum(r * in_kept, axis=0)
        intercept_sum = (r * in_kept).T @ x
    eye = jnp.eye(n_levels, dtype=dtype)[None, :, :]
    gram = gram * keep_f[:, :, None] * keep_f[:, None, :] + diag[:, :, None] * eye
    edge = keep_f * observed
    corner = jnp.where(active, intercept_mass, 1)
    top = jnp.concatenate([corner[:, None], edge], axis=1)[:, None, :]
    bottom = jnp.concatenate([edge[:, :, None], gram], axis=2)
    system = jnp.concatenate([top, bottom], axis=1)  # (clusters, levels + 1, levels + 1)
    rhs = jnp.concatenate([intercept_sum[:, None, :], keep_f[:, :, None] * level_sums], axis=1)
    coef = jnp.linalg.solve(system, rhs)

    new_centroids = cosine_normalize(jnp.where(active[:, None], coef[:, 0, :], centroids))
    batch_coef = coef[:, 1:, :] * (keep_f * active[:, None].astype(dtype))[:, :, None]
    corrected = x - sum(
        phi[:, b][:, None] * (r @ batch_coef[:, b, :]) for b in range(len(grouped), n_levels)
    )
    for b, idx in enumerate(grouped):
        corrected = corrected.at[idx].add(-(r[idx] @ batch_coef[:, b, :]), unique_indices=True,
                                          indices_are_sorted=True)
    return corrected, new_centroids, batch_coef


# ---------------------------------------------------------------------------------------------------------------
# Correcting new cells


def soft_assign_cosine(
    x: Float[Array, "n_cells n_dims"], centroids: Float[Array, "n_clusters n_dims"], sigma: Float[Array, ""]
) -> Float[Array, "n_cells n_clusters"]:
    """Harmony's responsibilities without the diversity penalty, `softmax(-2 (1 - x_cos . y) / sigma)`."""
    return jax.nn.softmax(-squared_distances_cosine(cosine_normalize(x), centroids) / sigma, axis=1)


def map_to_reference(
    x: Float[Array, "n_cells n_dims"],
    batch_labels: Int[Array, "n_cells n_covariates"],
    centroids: Float[Array, "n_clusters n_dims"],
    ridge_coefficients: Float[Array, "n_clusters n_levels n_dims"],
    sigma: Float[Array, ""],
    *,
    n_batches: tuple[int, ...],
) -> Float[Array, "n_cells n_dims"]:
    """Correct cells with a stored Harmony reference: soft-assign them to the final centroids (no diversity
    penalty: the new cells do not move the clusters) and subtract each cluster's ridge batch terms,
    `z = x - sum_k r_ik W_k[batch_i]`."""
    x = x.astype(centroids.dtype)
    r = soft_assign_cosine(x, centroids, sigma)
    phi = batch_onehot(batch_labels, n_batches, x.dtype)
    return x - jnp.einsum("nk,nb,kbd->nd", r, phi, ridge_coefficients)
