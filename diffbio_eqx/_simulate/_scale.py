"""Data at scale: Splatter-style counts simulated chunk by chunk straight into a sparse matrix.

`simulate` builds the whole `(n_cells, n_genes)` matrix densely (and its intermediates), which at a million cells
and 2,000 genes is 8 GB per array. `simulate_sparse` draws the gene-level parameters once (base means, group DE
factors, batch factors, the per-gene BCV draw) and then the cells in fixed-size chunks, each from
`fold_in(cell_key, chunk)`, converting each dense chunk to CSR before drawing the next. Memory is the CSR result
plus one chunk. The gamma-Poisson draws use NumPy's samplers (seeded from the JAX key), which on CPU are an
order of magnitude faster than `jax.random`'s for per-entry shapes. Ambient RNA and doublets are left out (use
`simulate` for those at small scale).
"""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._validate import check_whole
from ._simulate import (
    GeneParameters,
    SplatterSettings,
    cell_expectations,
    check_splatter_settings,
    gene_parameters,
)


@dataclasses.dataclass(frozen=True)
class SparseSimulation:
    """What `simulate_sparse` returns (host-side: SciPy and NumPy).

    - `counts`: `(n_cells, n_genes)` float32 CSR matrix of whole-number counts.
    - `groups`, `batches`: `(n_cells,)` int32 labels.
    - `library_size`: `(n_cells,)` expected size of each cell's counts.
    - `genes`: the shared `GeneParameters`.
    """

    counts: sp.csr_matrix
    groups: np.ndarray
    batches: np.ndarray
    library_size: np.ndarray
    genes: GeneParameters


def draw_gene_parameters(
    key: PRNGKeyArray, *, n_genes: int, n_groups: int, n_batches: int, **settings: Float[ArrayLike, ""]
) -> GeneParameters:
    """Draw the gene-level parameters of the Splatter model (`settings` by name as in `SplatterSettings`)."""
    return gene_parameters(tuple(jr.split(key, 4)), SplatterSettings(**settings), n_genes=n_genes,
                           n_groups=n_groups, n_batches=n_batches)


@eqx.filter_jit
def cell_means(
    key: PRNGKeyArray, genes: GeneParameters, lib_loc: Float[Array, ""], lib_scale: Float[Array, ""],
    bcv_common: Float[Array, ""], *, n_cells: int,
) -> tuple[Float[Array, "n_cells n_genes"], Float[Array, "n_cells n_genes"], Int[Array, " n_cells"],
           Int[Array, " n_cells"], Float[Array, " n_cells"]]:
    """`cell_expectations` for one chunk of cells, its three keys split from `key`."""
    return cell_expectations(tuple(jr.split(key, 3)), genes, lib_loc, lib_scale, bcv_common, n_cells=n_cells)


def _gamma_poisson(seed: np.ndarray, means: np.ndarray, gamma_shape: np.ndarray) -> sp.csr_matrix:
    # NumPy's samplers: on CPU they are an order of magnitude faster than `jax.random.gamma`/`poisson` for
    # per-entry shapes, and this is the only dense O(n_cells * n_genes) work of the simulation.
    rng = np.random.default_rng(seed)
    rates = rng.standard_gamma(gamma_shape, dtype=gamma_shape.dtype)  # float32 or float64, as JAX made it
    rates *= means
    rates /= gamma_shape
    return sp.csr_matrix(rng.poisson(rates).astype(np.float32))


def simulate_sparse(
    key: PRNGKeyArray,
    *,
    n_cells: int,
    n_genes: int = 2000,
    n_groups: int = 10,
    n_batches: int = 2,
    lib_loc: float = 7.0,
    lib_scale: float = 0.3,
    bcv_common: float = 0.1,
    chunk_size: int = 10_000,
    **gene_settings: float,
) -> SparseSimulation:
    """Simulate Splatter-style counts for any number of cells as a CSR matrix, one chunk of cells at a time.

    **Arguments:**

    - `key`: PRNG key; the gene parameters come from one half, chunk `c` from `fold_in(other half, c)`.
    - `n_cells`, `n_genes`, `n_groups`, `n_batches`: sizes. (Keyword only arguments.)
    - `lib_loc`, `lib_scale`: library sizes `exp(N(lib_loc, lib_scale))` (default about 1,100 counts a cell, a quarter
      of the entries non-zero: 10x-like for 2,000 highly variable genes).
    - `bcv_common`: Splatter's common biological coefficient of variation.
    - `chunk_size`: cells drawn per compiled call (bounds the dense working memory: about
      `10 * chunk_size * n_genes` floats).
    - `gene_settings`: `de_prob`, `de_down_prob`, `de_fac_loc`, `de_fac_scale`, `batch_fac_loc`,
      `batch_fac_scale`, `mean_shape`, `mean_rate`, `bcv_df`, as in `simulate`.

    **Returns:** a `SparseSimulation`. The result does not depend on how many chunks have been drawn before a
    given one, but it does depend on `chunk_size` (the chunk keys).
    """
    sizes = dict(n_cells=n_cells, n_genes=n_genes, n_groups=n_groups, n_batches=n_batches, chunk_size=chunk_size)
    for name, value in sizes.items():
        check_whole(value, name)
    check_splatter_settings(dict(lib_loc=lib_loc, lib_scale=lib_scale, bcv_common=bcv_common, **gene_settings))
    gene_key, cell_key = jr.split(key)
    genes = draw_gene_parameters(gene_key, n_genes=n_genes, n_groups=n_groups, n_batches=n_batches, **gene_settings)
    dtype = genes.gene_mean.dtype
    scalars = tuple(jnp.asarray(v, dtype=dtype) for v in (lib_loc, lib_scale, bcv_common))
    data, indices, indptr = [], [], [np.zeros(1, np.int64)]
    groups, batches, library = [], [], []
    offset = 0
    for chunk_index, start in enumerate(range(0, n_cells, chunk_size)):
        size = min(chunk_size, n_cells - start)
        chunk_key = jr.fold_in(cell_key, chunk_index)
        means, gamma_shape, chunk_groups, chunk_batches, chunk_library = cell_means(
            chunk_key, genes, *scalars, n_cells=size
        )
        seed = np.asarray(jr.key_data(jr.fold_in(chunk_key, 1)), dtype=np.uint32)
        chunk = _gamma_poisson(seed, np.asarray(means), np.asarray(gamma_shape))
        data.append(chunk.data)
        indices.append(chunk.indices.astype(np.int32, copy=False))
        indptr.append(chunk.indptr[1:].astype(np.int64) + offset)
        offset += chunk.nnz
        groups.append(np.asarray(chunk_groups, np.int32))
        batches.append(np.asarray(chunk_batches, np.int32))
        library.append(np.asarray(chunk_library))
    index_dtype = np.int32 if offset < np.iinfo(np.int32).max else np.int64
    # Concatenate one component at a time and drop its chunks, so the peak is the result plus one component.
    all_data = np.concatenate(data)
    del data
    all_indices = np.concatenate(indices)
    del indices
    matrix = sp.csr_matrix((all_data, all_indices, np.concatenate(indptr).astype(index_dtype)),
                           shape=(n_cells, n_genes), copy=False)
    return SparseSimulation(matrix, np.concatenate(groups), np.concatenate(batches), np.concatenate(library), genes)
