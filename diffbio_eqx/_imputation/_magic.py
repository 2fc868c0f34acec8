"""MAGIC (van Dijk et al. 2018) as `magic-impute` 3.0.0 runs it, with a sparse operator and chunked output.

What `magic.MAGIC()` does with its defaults (read from `magic/magic.py` and `graphtools/graphs.py`,
`graphtools/base.py`), and what the functions here reproduce:

1. The input is the user's normalised matrix; the MAGIC tutorial (and `pp.magic` here) first scales every cell to
   the median library size and takes the square root (`scprep.normalize.library_size_normalize`,
   `scprep.transform.sqrt`): `library_size_normalize`.
2. PCA to `n_pca = 100` components (none when there are at most 100 genes). graphtools fits scikit-learn's
   `PCA(n_pca, svd_solver="randomized")` on dense data (`Data._reduce_data`): a randomized range finder with
   10 oversamples, 7 power iterations normalised by LU, and a small SVD: `randomized_pca`, the same algorithm with
   the same settings (only the random draw differs). On sparse input graphtools runs an uncentred
   `TruncatedSVD` instead; here the PCA is centred whatever the input's format, so dense and sparse counts give
   the same result.
3. graphtools' `kNNGraph` with `knn = 5`, `knn_max = 3 * knn = 15`, `decay = 1`, `thresh = 1e-4`: each cell's
   `knn_max + 1` nearest neighbours (itself included; with the defaults graphtools searches exactly
   `min(6 * (knn + 1), knn_max + 1) = 16` of them), bandwidth the distance to its `(knn + 1)`-th neighbour
   (itself first), affinities $\\exp(-(d / \\sigma_i)^{\\mathrm{decay}})$ (0/0 counts as 1), and entries below
   `thresh` dropped: `magic_kernel`.
4. Symmetrised with graphtools' default `kernel_symm="+"`, $K = (W + W^\\top) / 2$, and row-normalised (L1)
   into the diffusion operator $P$: `diffusion_operator`, an edge list of `2 * n_cells * (knn_max + 1)` slots,
   never an `n_cells x n_cells` matrix.
5. `solver="exact"`: the imputed data is $P^t X$ on the genes, $t = 3$; with `t="auto"` MAGIC diffuses step by
   step and stops one step after the Procrustes disparity between successive steps (on up to 500 random genes)
   falls below 0.001, or at `t_max = 20`: `procrustes_disparity`, `select_t`.

One difference: graphtools widens its search (up to `knn_max`, then a radius search) for rows whose whole search
stays inside the threshold radius; it can keep more than `knn_max + 1` neighbours only when `6 * (knn + 1)` is
below `knn_max + 1`, never with MAGIC's defaults. Here every row keeps `knn_max + 1`.

The search: graphtools fits scikit-learn's `NearestNeighbors(algorithm="auto")` on the PCs, which is brute force
above 15 dimensions (so exact and O(n^2) on 100 PCs). `magic` does the same by default (`knn_method="exact"`).
`knn_method="ivf"` (or `"auto"`: the IVF from 20,000 cells on CPU) uses the shared inverted-file search
(`_core._neighbors.ivf_knn`, O(n^1.5)) instead: faster at scale, but approximate, and MAGIC's output
moves with its misses: on 20,000 simulated cells (100 PCs, 16 of 141 lists probed) its recall@16 was 0.945 and
the imputed genes correlated with the exact search's at median r 0.962 (0.985 with 64 probes;
`bench_imputation.py --agreement`), so it is not the default.
"""

import functools
from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.sparse as sp
from jax.experimental import sparse as jsparse
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray
from scipy.sparse.csgraph import reverse_cuthill_mckee

from .._core._neighbors import bf16_products_pay, exact_knn, ivf_knn, knn_block_size, select_neighbor_method
from .._core._stage import AbstractStage
from .._core._threads import host_threads, map_in_threads
from .._core._validate import _is_traced, check_counts, check_embedding


#: MAGIC's Procrustes-disparity threshold and gene subsample size for `t="auto"` (`MAGIC._impute`).
AUTO_T_THRESHOLD = 1e-3
AUTO_T_MAX_GENES = 500


def library_size_normalize(
    counts: np.ndarray | sp.csr_matrix, *, rescale: float | Literal["median"] | None = "median"
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray]:
    """scprep's `library_size_normalize`: every cell scaled to the same total (the median one by default).

    **Returns:** `(normalized, library_size)`; `normalized` is dense or CSR as the input, float32.
    """
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    if rescale == "median":
        target = float(np.median(library))
    elif rescale is None:
        target = 1.0
    else:
        target = float(rescale)
    scale = (target / np.where(library > 0, library, 1.0)).astype(np.float32)
    if sp.issparse(counts):
        normalized = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        normalized.data *= np.repeat(scale, np.diff(normalized.indptr))
        return normalized, library
    return (np.asarray(counts, dtype=np.float32) * scale[:, None]), library


#: `magic` holds the data as one dense float32 array on the device when it has at most this many values (1 GiB;
#: 100,000 cells x 2,000 genes is 0.8 GiB), so the PCA's products and the diffusion's gene blocks read it there;
#: above it the data stay on the host (dense or sparse) and are densified a block of cells or genes at a time.
DEVICE_DATA_BUDGET = 2**28
#: Cells per block when the data are densified or multiplied from the host.
HOST_BLOCK_ROWS = 8192
#: The exact kNN search's block of query rows holds at most this many distances (float32 search; the bfloat16
#: screen's blocks hold half as many: on 50,000 cells x 100 PCs 2**23 took 4.3-4.4 CPU-s against 5.5-5.9 for
#: 2**24 and 4.4-4.9 for 2**22, under load).
KNN_BLOCK_BUDGET = 2**24


def _column_block(x: Any, columns: np.ndarray) -> Array:
    if isinstance(x, jax.Array):
        if columns.size > 1 and np.all(np.diff(columns) == 1):  # a slice, not a gather (50,000 cells x 40 genes
            return x[:, int(columns[0]) : int(columns[-1]) + 1]  # on CPU: 2.4 ms against 17 ms)
        return x[:, jnp.asarray(columns)]
    block = x[:, columns]
    return jnp.asarray(block.toarray() if sp.issparse(block) else np.asarray(block), dtype=jnp.float32)


def _row_block(x: Any, start: int, stop: int, buffer: np.ndarray | None = None) -> Array:
    """Rows `start:stop` of `x` as a dense float32 device array; `buffer`: a float32 host array of at least that
    many rows that sparse rows are densified into, reused from block to block (a fresh one page-faults: on 50,000 x
    2,000, 0.45 s against 0.12 s)."""
    block = x[start:stop]
    if not sp.issparse(block):
        return jnp.asarray(np.asarray(block), dtype=jnp.float32)
    if buffer is None or block.dtype != np.float32:
        return jnp.asarray(block.toarray(), dtype=jnp.float32)
    dense = buffer[: block.shape[0]]
    dense.fill(0)  # toarray adds into `out`
    return jnp.array(block.toarray(out=dense), copy=True)  # copied: the buffer is written again


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(dense: Array, block: Array, start: Int[Array, ""]) -> Array:
    return jax.lax.dynamic_update_slice(dense, block, (start, jnp.zeros((), start.dtype)))


def on_device(x: Any, budget: int = DEVICE_DATA_BUDGET) -> Any:
    """`x` (host, dense or sparse) as a dense float32 device array if it has at most `budget` values (filled a
    block of cells at a time, so no dense host copy is made), else `x` unchanged."""
    n_cells, n_genes = x.shape
    if isinstance(x, jax.Array) or n_cells * n_genes > budget:
        return x
    if not sp.issparse(x):
        return jnp.asarray(x, dtype=jnp.float32)
    dense = jnp.zeros((n_cells, n_genes), jnp.float32)
    buffer = np.empty((min(HOST_BLOCK_ROWS, n_cells), n_genes), np.float32)
    for start in range(0, n_cells, HOST_BLOCK_ROWS):
        block = _row_block(x, start, start + HOST_BLOCK_ROWS, buffer)
        dense = _put_rows(dense, block, jnp.asarray(start, jnp.int32))
    return dense


def _times(x: Any, q: Array) -> Array:
    """`x @ q` for a device array or, a block of cells at a time, a host matrix."""
    if isinstance(x, jax.Array):
        return x @ q
    return jnp.concatenate([_row_block(x, s, s + HOST_BLOCK_ROWS) @ q for s in range(0, x.shape[0], HOST_BLOCK_ROWS)])


def _times_transposed(x: Any, p: Array) -> Array:
    """`x.T @ p` for a device array or, a block of cells at a time, a host matrix."""
    if isinstance(x, jax.Array):
        return x.T @ p
    blocks = range(0, x.shape[0], HOST_BLOCK_ROWS)
    return sum((_row_block(x, s, s + HOST_BLOCK_ROWS).T @ p[s : s + HOST_BLOCK_ROWS] for s in blocks),
               start=jnp.zeros((x.shape[1], p.shape[1]), p.dtype))


def _column_mean(x: Any) -> Float[Array, " n_genes"]:
    if isinstance(x, jax.Array):
        return jnp.mean(x, axis=0)
    return jnp.asarray(np.asarray(x.mean(axis=0, dtype=np.float64)).ravel(), dtype=jnp.float32)


#: Gene blocks of the centred Gram matrix `(x - mean).T @ (x - mean)` (`_centered_gram`): only the blocks on and
#: above the diagonal are multiplied, 36 of 64 with 8 blocks (2,000 genes: 0.58x the CPU of the full product).
GRAM_GENE_BLOCKS = 8
#: Cells per step of `_centered_gram` (each step centres one block of cells, so no centred copy of `x` is made).
GRAM_ROWS = 8192


def _symmetric_gram(centered: Float[Array, "n_rows n_genes"]) -> Float[Array, "n_genes n_genes"]:
    """`centered.T @ centered` from the gene blocks on and above the diagonal (`GRAM_GENE_BLOCKS`)."""
    n_genes = centered.shape[1]
    edges = np.linspace(0, n_genes, min(GRAM_GENE_BLOCKS, n_genes) + 1).astype(int)
    spans = list(zip(edges[:-1], edges[1:]))
    pieces: list[list[Any]] = [[None] * len(spans) for _ in spans]
    for i, (a, b) in enumerate(spans):
        for j in range(i, len(spans)):
            c, d = spans[j]
            pieces[i][j] = centered[:, a:b].T @ centered[:, c:d]
            pieces[j][i] = pieces[i][j].T
    return jnp.block(pieces)


@jax.jit
def _centered_block_gram(block: Float[Array, "n_rows n_genes"], mean: Float[Array, " n_genes"]) -> Array:
    return _symmetric_gram(block - mean[None, :])


def _centered_gram(x: Any, mean: Float[Array, " n_genes"]) -> Float[Array, "n_genes n_genes"]:
    """$(x - \\bar x)^\\top (x - \\bar x)$, `GRAM_ROWS` cells at a time (a device array: one `lax.scan`, the last
    block's start pulled back and its rows already counted masked; a host matrix: blocks densified one by one)."""
    n_cells = x.shape[0]
    if not isinstance(x, jax.Array):
        return sum((_centered_block_gram(_row_block(x, s, s + GRAM_ROWS), mean) for s in range(0, n_cells, GRAM_ROWS)),
                   start=jnp.zeros((x.shape[1], x.shape[1]), mean.dtype))
    rows = min(GRAM_ROWS, n_cells)

    def step(total: Array, i: Int[Array, ""]) -> tuple[Array, None]:
        start = jnp.minimum(i * rows, n_cells - rows)
        block = jax.lax.dynamic_slice_in_dim(x, start, rows, axis=0) - mean[None, :]
        fresh = start + jnp.arange(rows) >= i * rows  # rows of the pulled-back last block not yet counted
        return total + _symmetric_gram(jnp.where(fresh[:, None], block, 0)), None

    initial = jnp.zeros((x.shape[1], x.shape[1]), x.dtype)
    return jax.lax.scan(step, initial, jnp.arange(-(-n_cells // rows)))[0]


def _lu_normalize(m: Float[Array, "n k"]) -> Float[Array, "n k_min"]:
    """SciPy's `lu(m, permute_l=True)[0]` (the row-permuted unit lower factor), without the `n x n` permutation
    matrix `jax.scipy.linalg.lu` builds for it."""
    lu, _, permutation = jax.lax.linalg.lu(m)
    k = min(m.shape)
    lower = jnp.tril(lu, -1)[:, :k] + jnp.eye(m.shape[0], k, dtype=m.dtype)
    return jnp.zeros_like(lower).at[permutation].set(lower)


def _power_normalizer(name: str, n_iter: int) -> Any:
    """scikit-learn's `power_iteration_normalizer`: `"auto"` is `"none"` for at most 2 iterations, else `"LU"`."""
    if name == "auto":
        name = "none" if n_iter <= 2 else "LU"
    if name == "LU":
        return _lu_normalize
    if name == "QR":
        return lambda m: jnp.linalg.qr(m)[0]
    if name == "none":
        return lambda m: m
    raise ValueError(f"power_iteration_normalizer: must be 'auto', 'LU', 'QR' or 'none', got {name!r}")


def _gram_range_components(
    gram: Float[Array, "n_genes n_genes"], q: Float[Array, "n_genes n_random"]
) -> Float[Array, "n_random n_genes"]:
    """The randomized SVD's last step, $B = Q^\\top (x - \\bar x)$ with $Q$ an orthonormal basis of $(x - \\bar x) q$
    and the right singular vectors of $B$, from the centred Gram matrix $G$ alone (no pass over the data).

    With $q'$ an orthonormal basis of $q$ (same range), $Z = G q'$ and $H = q'^\\top G q' = W D W^\\top$:
    $B^\\top B = (x - \\bar x)^\\top Q Q^\\top (x - \\bar x) = Z H^{+} Z^\\top$, so $D^{-1/2} W^\\top Z^\\top$ has
    $B$'s right singular vectors (the pseudo-inverse drops directions where $(x - \\bar x) q'$ has no rank).
    Rows: those vectors by decreasing singular value. (On 50,000 cells x 2,000 genes it replaced a QR of
    `(n_cells, n_random)` and an SVD of `(n_random, n_genes)` that took 2.5-5 CPU-s in JAX on CPU.)
    """
    basis = jnp.linalg.qr(q)[0]
    z = gram @ basis
    eigenvalues, eigenvectors = jnp.linalg.eigh(basis.T @ z)
    floor = jnp.max(eigenvalues) * eigenvalues.shape[0] * jnp.finfo(eigenvalues.dtype).eps
    scale = jnp.where(eigenvalues > floor, jax.lax.rsqrt(jnp.maximum(eigenvalues, floor)), 0)
    right, _, _ = jnp.linalg.svd(z @ (eigenvectors * scale[None, :]), full_matrices=False)
    return right.T


def randomized_pca(
    x: Any,
    n_components: int,
    *,
    key: PRNGKeyArray,
    n_oversamples: int = 10,
    n_iter: int | Literal["auto"] = "auto",
    power_iteration_normalizer: str = "auto",
) -> Float[Array, "n_cells n_components"]:
    """Centred PCA scores as `sklearn.decomposition.PCA(n_components, svd_solver="randomized")` computes them,
    which is what magic-impute runs (graphtools' `Data._reduce_data` on dense input), up to the random draw.

    scikit-learn's `_randomized_svd` (Halko, Martinsson & Tropp 2011) with its defaults: `n_components +
    n_oversamples` Gaussian probes; `n_iter` power iterations (`"auto"`: 7 when `n_components < 0.1 * min(n_cells,
    n_genes)`, else 4), each normalised by `power_iteration_normalizer` (`"auto"`: LU beyond 2 iterations); on the
    transposed matrix when there are fewer cells than genes; then a QR, the small SVD, the signs fixed as
    `svd_flip(u_based_decision=False)`, and the scores `(x - mean) @ components.T` (`PCA.transform`).

    `x` is a device array or a host matrix (dense or sparse, read a block of cells at a time); it is never centred
    in memory: the column means are subtracted from each product. `key` draws the probes.

    With few genes (not transposed, and `n_genes * (1 + 1 / GRAM_GENE_BLOCKS) / 2 < 2 * n_iter * (n_components +
    n_oversamples)`: up to about 2,700 genes with the defaults) the power iterations multiply the probes by the
    centred Gram matrix $G = (x - \\bar x)^\\top (x - \\bar x)$, computed once (`_centered_gram`, half of it),
    normalising once per iteration: the same span as scikit-learn's `x.T @ normalize(x @ q)` in exact arithmetic,
    in one product of the data with itself instead of `2 * n_iter` passes (on 50,000 cells x 2,000 genes, the same
    scores to cosine 0.999995 per component, in 5.5-6.3 CPU-s instead of 8.6-12.3); the last step (QR, small SVD)
    is then computed from $G$ too (`_gram_range_components`: the same components in exact arithmetic; on that data
    cosine 0.99992 or more per component, norms within 2e-6, 4.3-4.8 CPU-s for the whole PCA instead of 5.1-10.5).
    """
    n_cells, n_genes = x.shape
    mean = _column_mean(x)

    def forward(q: Array) -> Array:  # (x - mean) @ q
        return _times(x, q) - (mean @ q)[None, :]

    def backward(p: Array) -> Array:  # (x - mean).T @ p
        return _times_transposed(x, p) - mean[:, None] * jnp.sum(p, axis=0)[None, :]

    if n_iter == "auto":
        n_iter = 7 if n_components < 0.1 * min(n_cells, n_genes) else 4
    transpose = n_cells < n_genes
    apply, apply_transposed = (backward, forward) if transpose else (forward, backward)
    normalize = _power_normalizer(power_iteration_normalizer, n_iter)
    n_random = n_components + n_oversamples
    q = jr.normal(key, (n_cells if transpose else n_genes, n_random), jnp.float32)
    # Each power iteration spans (x - mean).T (x - mean) q: with few genes, the centred Gram matrix (one product of
    # the data with itself, half of it computed) is cheaper than 2 * n_iter passes of n_random columns.
    if not transpose and n_genes * (1 + 1 / GRAM_GENE_BLOCKS) / 2 < 2 * n_iter * n_random:
        gram = _centered_gram(x, mean)
        for _ in range(n_iter):
            q = normalize(gram @ q)
        components = _gram_range_components(gram, q)[:n_components]
    else:
        for _ in range(n_iter):
            q = normalize(apply_transposed(normalize(apply(q))))
        q = jnp.linalg.qr(apply(q))[0]
        u_hat, _, vt = jnp.linalg.svd(apply_transposed(q).T, full_matrices=False)
        components = (q @ u_hat)[:, :n_components].T if transpose else vt[:n_components]
    largest = jnp.argmax(jnp.abs(components), axis=1)
    signs = jnp.sign(components[jnp.arange(components.shape[0]), largest])
    return forward((components * signs[:, None]).T)


_randomized_pca_jit = eqx.filter_jit(randomized_pca)


def magic_kernel(
    knn_indices: Int[Array, "n_cells n_search"],
    knn_distances: Float[Array, "n_cells n_search"],
    *,
    knn: int,
    decay: Float[ArrayLike, ""] | None,
    thresh: Float[ArrayLike, ""],
) -> Float[Array, "n_cells n_search"]:
    """graphtools' alpha-decay affinities $W_{ij} = \\exp(-(d_{ij} / d_{i,(knn)})^{\\mathrm{decay}})$, 0 below
    `thresh`, on each cell's sorted neighbour list (column 0 the cell itself, so the bandwidth is column `knn`);
    `decay=None`: graphtools' binary kNN graph (1 on the first `knn + 1` columns).
    """
    if decay is None:
        columns = jnp.arange(knn_indices.shape[1])
        return jnp.broadcast_to((columns <= knn).astype(knn_distances.dtype), knn_distances.shape)
    bandwidth = knn_distances[:, knn][:, None]
    weights = jnp.exp(-jnp.power(knn_distances / bandwidth, jnp.asarray(decay, knn_distances.dtype)))
    weights = jnp.where(jnp.isnan(weights), 1.0, weights)
    return jnp.where(weights >= jnp.asarray(thresh, weights.dtype), weights, 0.0)


class DiffusionOperator(eqx.Module):
    """MAGIC's row-stochastic operator $P = D^{-1} (W + W^\\top) / 2$ in compressed sparse rows.

    - `heads`, `tails`: `(n_edges,)` row and column of each slot, sorted by row: the kNN edges `(i, knn[i, j])`
      and their transposes, `n_edges = 2 * n_cells * s` (`s` = neighbours searched per cell); repeated pairs add
      up.
    - `weights`: `(n_edges,)` $P$'s entries; `indptr`: `(n_cells + 1,)` where each row's slots start.

    `P @ x` is a `jax.experimental.sparse.BCSR` product (on CPU about ten times faster than a scatter-add
    `segment_sum`, and differentiable and vmappable alike).
    """

    heads: Int[Array, " n_edges"]
    tails: Int[Array, " n_edges"]
    weights: Float[Array, " n_edges"]
    indptr: Int[Array, " n_cells_plus_one"]

    def matvec(self, x: Float[Array, "n_cells n_cols"]) -> Float[Array, "n_cells n_cols"]:
        """`P @ x`."""
        n_cells = self.indptr.shape[0] - 1
        matrix = jsparse.BCSR((self.weights, self.tails, self.indptr), shape=(n_cells, n_cells))
        return matrix @ x


def diffusion_operator(
    knn_indices: Int[Array, "n_cells n_search"], kernel: Float[Array, "n_cells n_search"]
) -> DiffusionOperator:
    """Symmetrise the kernel as graphtools' `kernel_symm="+"`, $(W + W^\\top)/2$, and row-normalise it."""
    n_cells = knn_indices.shape[0]
    rows = jnp.broadcast_to(jnp.arange(n_cells, dtype=knn_indices.dtype)[:, None], knn_indices.shape).reshape(-1)
    columns = knn_indices.reshape(-1)
    heads = jnp.concatenate([rows, columns])
    tails = jnp.concatenate([columns, rows])
    half = jnp.concatenate([kernel.reshape(-1), kernel.reshape(-1)]) / 2
    degree = jax.ops.segment_sum(half, heads, num_segments=n_cells)
    order = jnp.argsort(heads, stable=True)
    heads, tails, weights = heads[order], tails[order], (half / degree[heads])[order]
    counts = jnp.bincount(heads, length=n_cells).astype(heads.dtype)
    indptr = jnp.concatenate([jnp.zeros(1, heads.dtype), jnp.cumsum(counts).astype(heads.dtype)])
    return DiffusionOperator(heads, tails, weights, indptr)


def diffuse(operator: DiffusionOperator, x: Float[Array, "n_cells n_cols"], t: int) -> Float[Array, "n_cells n_cols"]:
    """$P^t x$ by `t` sparse products (`lax.scan`)."""
    return jax.lax.scan(lambda y, _: (operator.matvec(y), None), x, None, length=t)[0]


def procrustes_disparity(a: Float[Array, "n_cells n_cols"], b: Float[Array, "n_cells n_cols"]) -> Float[Array, ""]:
    """`scipy.spatial.procrustes(a, b)[2]`: both centred and scaled to unit Frobenius norm, `b` rotated onto `a`
    and scaled; the disparity is $1 - S^2$ with $S$ the nuclear norm of $b^\\top a$.

    Computed as $e (2 - e)$ with $e = 1 - S = \\lVert a - b R \\rVert^2 / 2$ from the residual itself, so it keeps
    its relative precision in float32 when it is small (MAGIC's threshold is 1e-3).
    """

    def standardize(m: Array) -> Array:
        centered = m - jnp.mean(m, axis=0, keepdims=True)
        return centered / jnp.linalg.norm(centered)

    a, b = standardize(a), standardize(b)
    u, _, vt = jnp.linalg.svd(b.T @ a, full_matrices=False)
    residual = a - b @ (u @ vt)
    e = jnp.sum(residual * residual) / 2
    return e * (2 - e)


@eqx.filter_jit
def disparity_trace(
    operator: DiffusionOperator, x: Float[Array, "n_cells n_cols"], t_max: int
) -> Float[Array, " t_max"]:
    """The disparity between diffusion steps `i - 1` and `i`, for `i = 1 .. t_max` (MAGIC's `error_vec`)."""

    def step(prev: Array, _: None) -> tuple[Array, Array]:
        new = operator.matvec(prev)
        return new, procrustes_disparity(prev, new)

    return jax.lax.scan(step, x, None, length=t_max)[1]


def select_t(disparities: Float[ArrayLike, " t_max"], threshold: float = AUTO_T_THRESHOLD) -> int:
    """MAGIC's `t="auto"`: one step after the first disparity below `threshold` (1-based), else `t_max`."""
    below = np.flatnonzero(np.asarray(disparities) < threshold)
    return int(below[0]) + 2 if below.size else int(np.shape(disparities)[0])


def magic_knn(
    representation: Float[Array, "n_cells n_dims"], n_search: int
) -> tuple[Int[Array, "n_cells n_search"], Float[Array, "n_cells n_search"]]:
    """The exact `n_search` nearest cells (each its own first), screened in bfloat16 where that pays; outside a
    trace, the query rows go in `host_threads()` equal parts searched side by side (XLA's top-k runs on one core
    per program)."""
    screened = bf16_products_pay()
    # Float32 blocks of at most 2**24 distances (64 MiB): on 50,000 cells x 100 PCs, with the scores' width a multiple
    # of KNN_GROUP (no padded copy), 335-row blocks took 7.6-7.9 CPU-s against 7.9-8.5 for 167 rows and 9.5 for 83
    # (two rounds, load ~4.5). With the padded copy, 256 rows had beaten 512 at 30,000 cells.
    block = knn_block_size(representation.shape[0], KNN_BLOCK_BUDGET // 2 if screened else KNN_BLOCK_BUDGET)
    n_cells = representation.shape[0]
    n_parts = 1 if _is_traced(representation) else min(host_threads(), -(-n_cells // block))
    if n_parts == 1:
        return exact_knn(representation, representation, n_search, block_size=block, fast=True, screened=screened)
    rows = -(-n_cells // (n_parts * block)) * block
    padded = jnp.concatenate([representation, jnp.zeros((n_parts * rows - n_cells, representation.shape[1]),
                                                        representation.dtype)])
    parts = map_in_threads(
        lambda i: _knn_rows(padded[i * rows : (i + 1) * rows], representation, n_search, block, screened),
        range(n_parts))
    indices, distances = zip(*parts)
    return jnp.concatenate(indices)[:n_cells], jnp.concatenate(distances)[:n_cells]


@functools.partial(jax.jit, static_argnames=("n_search", "block", "screened"))
def _knn_rows(queries: Array, reference: Array, n_search: int, block: int, screened: bool) -> tuple[Array, Array]:
    return exact_knn(queries, reference, n_search, block_size=block, fast=True, screened=screened)


@eqx.filter_jit
def _operator_from_neighbors(
    indices: Int[Array, "n_cells n_search"], distances: Float[Array, "n_cells n_search"], knn: int,
    decay: Array | None, thresh: Array,
) -> DiffusionOperator:
    kernel = magic_kernel(indices, distances, knn=knn, decay=decay, thresh=thresh)
    return diffusion_operator(indices, kernel)


#: The kNN searches MAGIC's operator can use (`magic_operator(knn_method=...)`, `Magic(knn_method=...)`).
MAGIC_KNN_METHODS = ("auto", "exact", "ivf")


def resolve_knn_method(knn_method: str, n_cells: int) -> str:
    """`"auto"`: the inverted-file search (`"ivf"`) where `neighbor_graph(method="auto")` picks it (on CPU from
    `IVF_MIN_CELLS`, 20,000 cells), the exact blocked search otherwise; `"exact"` and `"ivf"` as named."""
    if knn_method not in MAGIC_KNN_METHODS:
        raise ValueError(f"knn_method: must be one of {MAGIC_KNN_METHODS}, got {knn_method!r}")
    if knn_method == "auto":
        return "ivf" if select_neighbor_method(n_cells) == "ivf" else "exact"
    return knn_method


def magic_operator(
    representation: ArrayLike,
    *,
    knn: int = 5,
    knn_max: int | None = None,
    decay: float | None = 1.0,
    thresh: float = 1e-4,
    knn_method: str = "exact",
    key: PRNGKeyArray | None = None,
) -> DiffusionOperator:
    """MAGIC's diffusion operator on a cell representation (MAGIC's PCs, or any embedding).

    **Arguments:** `representation` `(n_cells, n_dims)`; `knn` (5), `knn_max` (None: `3 * knn`), `decay` (1; None:
    binary kNN), `thresh` (1e-4), all as `magic.MAGIC`; `knn_method`: `"exact"` (default: blocked brute force,
    `_core._neighbors.exact_knn`, what magic-impute's graphtools runs on 100 PCs: scikit-learn's
    `NearestNeighbors(algorithm="auto")` chooses brute force above 15 dimensions), `"ivf"` (the shared
    inverted-file search, `ivf_knn`: O(n^1.5) instead of O(n^2), approximate; see the module notes)
    or `"auto"` (`resolve_knn_method`); `key` seeds the IVF's k-means (None: a fixed seed).
    """
    rep = jnp.asarray(check_embedding(representation, field="representation"), dtype=jnp.float32)
    n_cells = rep.shape[0]
    method = resolve_knn_method(knn_method, n_cells)
    knn_max = 3 * knn if knn_max is None else knn_max
    if not isinstance(knn, int) or not 1 <= knn < n_cells - 1:
        raise ValueError(f"knn: must be an integer in [1, n_cells - 2] = [1, {n_cells - 2}], got {knn!r}")
    if not isinstance(knn_max, int) or knn_max < knn:
        raise ValueError(f"knn_max: must be an integer >= knn ({knn}), got {knn_max!r}")
    if decay is not None and not decay > 0:
        raise ValueError(f"decay: must be > 0 or None, got {decay!r}")
    if not 0 <= thresh < 1:
        raise ValueError(f"thresh: must be in [0, 1), got {thresh!r}")
    n_search = min(knn_max + 1, n_cells)
    decay_leaf = None if decay is None else jnp.asarray(decay)
    if method == "ivf":
        indices, distances = ivf_knn(rep, n_search, key=jr.key(0) if key is None else key)
        return _operator_from_neighbors(indices, distances, knn, decay_leaf, jnp.asarray(thresh))
    indices, distances = magic_knn(rep, n_search)
    return _operator_from_neighbors(indices, distances, knn, decay_leaf, jnp.asarray(thresh))


def locality_order(operator: DiffusionOperator) -> tuple[np.ndarray, DiffusionOperator]:
    """The cells in reverse Cuthill-McKee order of the operator's graph (SciPy's), and the operator relabelled in
    that order, `P[order][:, order]`, repeated pairs summed.

    Neighbours then sit close together in memory, so the sparse products' row gathers mostly hit cache: on 50,000
    cells (blocks of 83 genes, t=3) the products took 0.72x the CPU of the kNN order.
    """
    n_cells = operator.indptr.shape[0] - 1
    heads, tails, weights = (np.asarray(a) for a in (operator.heads, operator.tails, operator.weights))
    matrix = sp.csr_matrix((weights, (heads, tails)), shape=(n_cells, n_cells))  # sums repeated pairs
    order = np.asarray(reverse_cuthill_mckee(matrix, symmetric_mode=True))
    permuted = sp.csr_matrix(matrix[order][:, order])
    permuted.sort_indices()
    index_type = operator.tails.dtype
    return order, DiffusionOperator(
        jnp.asarray(np.repeat(np.arange(n_cells), np.diff(permuted.indptr)), index_type),
        jnp.asarray(permuted.indices, index_type), jnp.asarray(permuted.data, operator.weights.dtype),
        jnp.asarray(permuted.indptr, index_type))


@eqx.filter_jit
def _diffuse_in_order(
    operator: DiffusionOperator, x: Float[Array, "n_cells n_cols"], order: Int[Array, " n_cells"],
    rank: Int[Array, " n_cells"], t: int,
) -> Float[Array, "n_cells n_cols"]:
    """$P^t x$ with `operator` relabelled in `order` (`locality_order`): `x`'s rows taken in that order, and back."""
    return diffuse(operator, x[order], t)[rank]


#: Genes diffused together are a multiple of this: the CSR kernel reads each cell's row of the block, and rows of
#: 8 floats (32 bytes) stay aligned (on 50,000 cells, blocks of 83 genes took 1.6x the CPU per gene of 80).
GENE_BLOCK_QUANTUM = 8


def gene_block_size(n_cells: int, memory_budget: int = 2**21) -> int:
    """Genes diffused together so that a block holds at most `memory_budget` floats (8 MiB in float32), a multiple
    of `GENE_BLOCK_QUANTUM`: the products gather rows of the block, so it should stay in cache (on 20,000 cells x
    2,000 genes, blocks of 128 genes diffused in 0.65x the CPU time of 256 MiB blocks; on 50,000 cells in
    locality order, blocks of 32-48 genes took 0.9x the CPU per gene of 80, 64 1.05x)."""
    fitting = max(1, memory_budget // max(n_cells, 1))
    return max(GENE_BLOCK_QUANTUM, fitting // GENE_BLOCK_QUANTUM * GENE_BLOCK_QUANTUM)


def impute(
    operator: DiffusionOperator,
    data: Any,
    t: int,
    *,
    columns: Sequence[int] | np.ndarray | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """$P^t X$ for the chosen `columns` (all by default), diffused one block of genes at a time.

    Only one `(n_cells, block_size)` block (and its product) is on the device at once; the result is written
    into one float32 host array `(n_cells, n_columns)`. The products run with the cells in `locality_order`.
    """
    columns_array = np.arange(data.shape[1]) if columns is None else np.asarray(columns, dtype=np.int64)
    # Never wider than the columns asked for: small data would otherwise pad one block to the memory budget.
    block = min(block_size or gene_block_size(int(data.shape[0])), max(int(columns_array.size), 1))
    if columns_array.size > block:  # blocks of (nearly) equal width, a multiple of GENE_BLOCK_QUANTUM
        even = -(-columns_array.size // -(-columns_array.size // block))
        block = -(-even // GENE_BLOCK_QUANTUM) * GENE_BLOCK_QUANTUM if block_size is None else even
    out = np.empty((data.shape[0], columns_array.size), dtype=np.float32)
    order, ordered = locality_order(operator)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size, dtype=order.dtype)
    order_array, rank_array = jnp.asarray(order), jnp.asarray(rank)

    def diffuse_block(start: int) -> None:
        chosen = columns_array[start : start + block]
        padded = np.concatenate([chosen, np.full(block - chosen.size, chosen[0])]) if chosen.size < block else chosen
        diffused = _diffuse_in_order(ordered, _column_block(data, padded), order_array, rank_array, t)
        out[:, start : start + chosen.size] = np.asarray(diffused)[:, : chosen.size]

    map_in_threads(diffuse_block, range(0, columns_array.size, block))  # XLA gathers on one core per program
    return out


class MagicResult(eqx.Module):
    """What `magic` returns.

    - `imputed`: `(n_cells, n_chosen_genes)` the diffused data, float32 NumPy (the normalised, transformed scale
      MAGIC returns).
    - `t`: the diffusion time used; `disparities`: MAGIC's per-step Procrustes disparities when `t="auto"`.
    - `operator`: the `DiffusionOperator`; `representation`: the PCs the graph was built on.
    - `columns`: the gene columns imputed; `library_size`: each cell's total counts (None without normalising).
    """

    imputed: np.ndarray
    t: int = eqx.field(static=True)
    disparities: np.ndarray | None
    operator: DiffusionOperator
    representation: Array
    columns: np.ndarray
    library_size: np.ndarray | None


class Magic(AbstractStage):
    """MAGIC's settings, and MAGIC itself on a dense matrix under one jit (`Magic()(x)`).

    Defaults are `magic.MAGIC()`'s: `knn=5`, `knn_max=3 * knn`, `decay=1` (None: binary kNN), `thresh=1e-4`
    (array leaves), `t=3` or `"auto"` (with `t_max=20`), `n_pca=100`; `normalize` scales cells to the median
    library size and takes the square root first (the MAGIC tutorial's preprocessing), False uses `x` as given.
    `knn_method` is the kNN search `magic` uses (`magic_operator`): `"exact"` (default, as magic-impute), `"ivf"`
    (the approximate inverted-file search) or `"auto"` (exact below 20,000 cells, the IVF from there on, on CPU).

    Calling the stage runs everything on the device for a dense `x` (PCA, kNN, operator, diffusion; `t="auto"`
    runs `t_max` masked steps; the search is always the exact one there, as the IVF reads its lists' sizes back to
    the host). For large data use `magic`, which keeps the data on the host and diffuses a block of genes at a
    time, or only the genes asked for.
    """

    decay: Float[Array, ""] | None
    thresh: Float[Array, ""]
    knn: int = eqx.field(static=True)
    knn_max: int = eqx.field(static=True)
    t: int | str = eqx.field(static=True)
    t_max: int = eqx.field(static=True)
    n_pca: int | None = eqx.field(static=True)
    normalize: bool = eqx.field(static=True)
    knn_method: str = eqx.field(static=True)

    def __init__(
        self,
        *,
        knn: int = 5,
        knn_max: int | None = None,
        decay: Float[ArrayLike, ""] | None = 1.0,
        thresh: Float[ArrayLike, ""] = 1e-4,
        t: int | Literal["auto"] = 3,
        t_max: int = 20,
        n_pca: int | None = 100,
        normalize: bool = True,
        knn_method: str = "exact",
    ):
        self.knn, self.knn_max = knn, 3 * knn if knn_max is None else knn_max
        self.decay = None if decay is None else jnp.asarray(decay, jnp.float32)
        self.thresh = jnp.asarray(thresh, jnp.float32)
        self.t, self.t_max, self.n_pca, self.normalize = t, t_max, n_pca, normalize
        self.knn_method = knn_method

    def __check_init__(self):
        if isinstance(self.t, bool) or not (self.t == "auto" or (isinstance(self.t, int) and self.t >= 1)):
            raise ValueError(f"t: must be a positive integer or 'auto', got {self.t!r}")
        if not isinstance(self.knn, int) or self.knn < 1:
            raise ValueError(f"knn: must be a positive integer, got {self.knn!r}")
        if not isinstance(self.knn_max, int) or self.knn_max < self.knn:
            raise ValueError(f"knn_max: must be an integer >= knn ({self.knn}), got {self.knn_max!r}")
        if not isinstance(self.t_max, int) or self.t_max < 1:
            raise ValueError(f"t_max: must be a positive integer, got {self.t_max!r}")
        if self.n_pca is not None and (not isinstance(self.n_pca, int) or self.n_pca < 1):
            raise ValueError(f"n_pca: must be a positive integer or None, got {self.n_pca!r}")
        if self.knn_method not in MAGIC_KNN_METHODS:
            raise ValueError(f"knn_method: must be one of {MAGIC_KNN_METHODS}, got {self.knn_method!r}")

    def __call__(
        self, x: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_genes"]:
        del inference
        if x.shape[0] <= self.knn + 1:
            raise ValueError(f"knn: must be below n_cells - 1 = {x.shape[0] - 1}, got {self.knn}")
        if self.t == "auto" and x.shape[1] > AUTO_T_MAX_GENES and key is None:
            raise ValueError("key: t='auto' on more than 500 genes draws a gene subsample and needs a key")
        x = eqx.error_if(x, jnp.any(x < 0) | ~jnp.all(jnp.isfinite(x)), "x: negative or non-finite values")
        if self.normalize:
            library = jnp.sum(x, axis=1, keepdims=True)
            x = jnp.sqrt(x * (jnp.median(library) / jnp.where(library > 0, library, 1.0)))
        if self.n_pca is not None and x.shape[1] > self.n_pca:
            rep = randomized_pca(x, self.n_pca, key=_pca_key(key))
        else:
            rep = x
        n_search = min(self.knn_max + 1, x.shape[0])
        indices, distances = magic_knn(rep, n_search)
        operator = diffusion_operator(
            indices, magic_kernel(indices, distances, knn=self.knn, decay=self.decay, thresh=self.thresh)
        )
        if self.t != "auto":
            return diffuse(operator, x, int(self.t))
        subset = x if x.shape[1] <= AUTO_T_MAX_GENES else x[:, _gene_subsample(key, x.shape[1])]
        trace = disparity_trace(operator, subset, self.t_max)
        below = trace < AUTO_T_THRESHOLD
        t = jnp.where(jnp.any(below), jnp.argmax(below) + 2, self.t_max)

        def step(y: Array, i: Int[Array, ""]) -> tuple[Array, None]:
            return jnp.where(i < t, operator.matvec(y), y), None

        return jax.lax.scan(step, x, jnp.arange(self.t_max + 1))[0]


def _pca_key(key: PRNGKeyArray | None) -> PRNGKeyArray:
    """The PCA's probes: `key` folded with 2, or a fixed key (magic-impute's default `random_state=None` draws
    anew on every run; a fixed default keeps ours reproducible)."""
    return jr.key(0) if key is None else jr.fold_in(key, 2)


def _gene_subsample(key: PRNGKeyArray | None, n_genes: int) -> Int[Array, " n_subsample"]:
    if key is None:
        raise ValueError("key: t='auto' on more than 500 genes draws a gene subsample and needs a key")
    return jr.choice(key, n_genes, (AUTO_T_MAX_GENES,), replace=False)


def _prepare(data: Any, normalize: bool) -> tuple[Any, np.ndarray | None]:
    if normalize:
        counts: Any = check_counts(data, field="counts")
        counts = counts if sp.issparse(counts) else np.asarray(counts)
        normalized, library = library_size_normalize(counts)
        normalized = cast(Any, normalized)
        if sp.issparse(normalized):
            normalized.data = np.sqrt(normalized.data)
            return normalized, library
        return np.sqrt(normalized), library
    if sp.issparse(data):
        matrix = sp.csr_matrix(data, dtype=np.float32)
        check_embedding(matrix.data[None, :] if matrix.nnz else np.zeros((1, 1)), field="data")
        return matrix, None
    return np.asarray(check_embedding(data, field="data"), dtype=np.float32), None


def resolve_genes(genes: Sequence[str | int] | None, gene_names: Sequence[str] | None, n_genes: int) -> np.ndarray:
    """Column indices of `genes` (names looked up in `gene_names`, or integer columns); None: all genes."""
    if genes is None:
        return np.arange(n_genes)
    if isinstance(genes, str):
        genes = [genes]
    if all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in genes):
        bad = [int(g) for g in genes if not 0 <= int(g) < n_genes]
        if bad:
            raise ValueError(f"genes: column indices {bad[:10]} are outside [0, {n_genes})")
        return np.asarray(genes, dtype=np.int64)
    if gene_names is None:
        raise ValueError("genes: gene names were given but the data has no gene_names to match them against")
    lookup = {name: i for i, name in enumerate(gene_names)}
    missing = [g for g in genes if str(g) not in lookup]
    if missing:
        raise ValueError(f"genes: {len(missing)} not in the data, e.g. {missing[:10]}")
    return np.asarray([lookup[str(g)] for g in genes], dtype=np.int64)


def magic(
    data: Any,
    settings: Magic | None = None,
    *,
    genes: Sequence[str | int] | None = None,
    gene_names: Sequence[str] | None = None,
    representation: ArrayLike | None = None,
    key: PRNGKeyArray | None = None,
    block_size: int | None = None,
) -> MagicResult:
    """MAGIC with `magic-impute`'s defaults and `solver="exact"`, memory-bounded: the data are held once, dense
    float32 on the device when they have at most `DEVICE_DATA_BUDGET` values (else on the host, read in blocks).

    **Arguments:**

    - `data`: `(n_cells, n_genes)` raw counts (dense or SciPy sparse) when `settings.normalize` (the default:
      median library size, then square root), else the already normalised matrix.
    - `settings`: a `Magic` carrying MAGIC's settings (None: `Magic()`, MAGIC's defaults).
    - `genes`: names (matched in `gene_names`) or column indices to impute; None: all genes. (Keyword only.)
    - `gene_names`: `(n_genes,)` names of the columns.
    - `representation`: `(n_cells, n_dims)` cells to build the graph on (e.g. magic-impute's own PCs); None:
      the randomized PCA (`randomized_pca`) to `settings.n_pca` components of the normalised data (no PCA with at
      most `n_pca` genes).
    - `key`: draws MAGIC's 500-gene subsample for `t="auto"` (needed only then, with more than 500 genes); folded
      with 1, it also seeds the inverted-file search's k-means when `settings.knn_method` picks it, and folded with
      2 the PCA's random probes (None: fixed keys).
    - `block_size`: genes diffused together (default: `gene_block_size`, blocks of at most 2**21 floats).

    **Returns:** a `MagicResult`.
    """
    settings = Magic() if settings is None else settings
    x, library = _prepare(data, settings.normalize)
    n_cells, n_genes = x.shape
    if settings.knn >= n_cells - 1:
        raise ValueError(f"knn: must be below n_cells - 1 = {n_cells - 1}, got {settings.knn}")
    columns = resolve_genes(genes, gene_names, n_genes)
    x = on_device(x)
    if representation is None:
        if settings.n_pca is not None and n_genes > settings.n_pca:  # one compiled program when x is on the device
            pca_of = _randomized_pca_jit if isinstance(x, jax.Array) else randomized_pca
            rep = pca_of(x, settings.n_pca, key=_pca_key(key))
        else:
            rep = x
        rep = jnp.asarray(cast(Any, rep).toarray() if sp.issparse(rep) else rep, dtype=jnp.float32)
    else:
        rep = jnp.asarray(check_embedding(representation, field="representation"), dtype=jnp.float32)
        if rep.shape[0] != n_cells:
            raise ValueError(f"representation: has {rep.shape[0]} rows but the data has {n_cells} cells")
    decay = None if settings.decay is None else float(settings.decay)
    operator = magic_operator(rep, knn=settings.knn, knn_max=settings.knn_max, decay=decay,
                              thresh=float(settings.thresh), knn_method=settings.knn_method,
                              key=None if key is None else jr.fold_in(key, 1))
    disparities = None
    t = settings.t
    if t == "auto":
        subset = np.arange(n_genes) if n_genes <= AUTO_T_MAX_GENES else np.asarray(_gene_subsample(key, n_genes))
        disparities = np.asarray(disparity_trace(operator, _column_block(x, np.sort(subset)), settings.t_max))
        t = select_t(disparities)
    imputed = impute(operator, x, int(t), columns=columns, block_size=block_size)
    return MagicResult(imputed, int(t), disparities, operator, rep, columns, library)
