"""What the AnnData faces (`pp`, `tl`) share: the representation they read, the settings they record in `uns`,
the loop settings they refuse when given flat, and the neighbour graph as scanpy's sparse matrices."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ._core._neighbors import NeighborGraph
from ._core._train import TrainSettings
from ._core._validate import check_embedding, check_whole
from .io import check_adata


#: The `obsm` keys `use_rep=None` looks for, in this order (the corrected latent first, then the VAE's, then PCA).
DEFAULT_REPRESENTATIONS = ("X_diffbio_corrected", "X_diffbio", "X_pca")
def representation(
    adata: ad.AnnData, use_rep: str | None = None, *, defaults: Sequence[str] = DEFAULT_REPRESENTATIONS
) -> tuple[np.ndarray, str]:
    """The cells-by-dimensions matrix a face works on, and its name.

    **Arguments:**

    - `adata`: the cells.
    - `use_rep`: an `obsm` key, or `"X"` for `adata.X` itself; None: the first of `defaults` that `adata.obsm`
      holds.
    - `defaults`: the keys `use_rep=None` tries, in order (`DEFAULT_REPRESENTATIONS`). (Keyword only argument.)

    **Returns:** `(x, name)`: `x` a checked, finite float `(n_cells, n_dims)` array.
    """
    check_adata(adata)
    if use_rep is None:
        found = [name for name in defaults if name in adata.obsm]
        if not found:
            raise ValueError(f"use_rep: none of {list(defaults)} is in adata.obsm (has "
                             f"{sorted(adata.obsm.keys())}); pass use_rep= an obsm key or 'X'")
        use_rep = found[0]
    matrix: Any
    if use_rep == "X":
        matrix, field = adata.X, "adata.X"
    elif use_rep in adata.obsm:
        matrix, field = adata.obsm[use_rep], f"adata.obsm[{use_rep!r}]"
    else:
        raise ValueError(f"use_rep: {use_rep!r} is not in adata.obsm (has {sorted(adata.obsm.keys())})")
    if matrix is None:
        raise ValueError(f"{field}: is empty (None)")
    if sp.issparse(matrix):
        matrix = matrix.toarray()
    x = np.asarray(check_embedding(np.asarray(matrix), field=field))
    return x, use_rep


#: scanpy's `settings.N_PCS`: with no representation stored, `pp.neighbors` reads `X` itself up to this many genes.
SMALL_X_GENES = 50


def neighbors_representation(
    adata: ad.AnnData, use_rep: str | None, n_pcs: int | None
) -> tuple[np.ndarray, str]:
    """What scanpy's `pp.neighbors` (and `tl.umap` after it) reads, as its `_choose_representation` does.

    `use_rep` as `representation`, except that None reads `X` when `n_pcs == 0` or when `adata` has at most 50
    genes and no representation is stored (scanpy would run a PCA above 50; we ask for one). `n_pcs` keeps an
    `obsm` representation's first `n_pcs` columns (refused when it has fewer, or for 0); scanpy ignores it for `X`.
    """
    if use_rep is None and (n_pcs == 0 or (
            adata.n_vars <= SMALL_X_GENES and not any(name in adata.obsm for name in DEFAULT_REPRESENTATIONS))):
        use_rep = "X"
    x, use_rep = representation(adata, use_rep)
    if n_pcs is None or use_rep == "X":
        return x, use_rep
    n_pcs = check_whole(n_pcs, "n_pcs")
    if n_pcs > x.shape[1]:
        raise ValueError(f"n_pcs: {n_pcs}, but adata.obsm[{use_rep!r}] has {x.shape[1]} columns")
    return x[:, :n_pcs], use_rep


def settings_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that an h5ad file can hold, for `uns`: numbers, strings, booleans, lists of them, and mappings
    and dataclasses (e.g. `TrainSettings`) of them, nested; None values and objects (arrays, optimisers) are left
    out."""
    record: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, np.generic):
            value = value.item()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. `TrainSettings`
            value = settings_record({field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
        if isinstance(value, Mapping):
            value = settings_record(value)
            if value:
                record[name] = value
        elif isinstance(value, (bool, int, float, str)):
            record[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            record[name] = list(value)
    return record


def graph_matrices(graph: NeighborGraph) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """A `NeighborGraph` as scanpy's two sparse matrices.

    **Returns:** `(distances, connectivities)`, each a float32 `(n_cells, n_cells)` CSR matrix: `distances` holds
    each cell's `n_neighbors - 1` nearest other cells (its own column left out, ties at distance 0 stored
    explicitly, as scanpy does); `connectivities` the symmetric fuzzy-union weights, without zeros.
    """
    indices = np.asarray(graph.indices)[:, 1:]
    n_cells, k = indices.shape
    indptr = np.arange(0, n_cells * k + 1, k)
    distances = sp.csr_matrix(
        (np.asarray(graph.distances)[:, 1:].astype(np.float32).ravel(), indices.ravel(), indptr),
        shape=(n_cells, n_cells),
    )
    c = graph.connectivities
    connectivities = sp.csr_matrix(sp.coo_matrix(
        (np.asarray(c.weights, dtype=np.float32), (np.asarray(c.heads), np.asarray(c.tails))),
        shape=(n_cells, n_cells),
    ))
    connectivities.eliminate_zeros()
    return distances, connectivities


def fit_keywords(fit_settings: Mapping[str, Any], fit_name: str) -> dict[str, Any]:
    """The keywords a face passes on to `fit_name`, after refusing the loop's settings given flat: they go in
    `settings=TrainSettings(...)`, as every `fit_<stage>` takes them."""
    flat = sorted(set(fit_settings) & {field.name for field in dataclasses.fields(TrainSettings)})
    if flat:
        raise ValueError(f"{flat[0]}: {fit_name} takes the training loop's settings as "
                         f"settings=TrainSettings({flat[0]}=...), not as keywords of their own")
    return dict(fit_settings)


def host_array(value: Any, dtype: Any = None) -> np.ndarray:
    """A writeable NumPy copy of `value` for AnnData. `np.asarray` of a JAX array is a read-only view of its buffer
    (without a copy where the dtype already matches, as float32 does in JAX's default session), and scanpy's
    in-place functions and scib-metrics write into what a face stored."""
    return np.array(value, dtype=dtype)


def record_settings(adata: ad.AnnData, name: str, params: Mapping[str, Any], **results: Any) -> None:
    """Write `uns[name]`: `params` as `settings_record` keeps them, and each of `results` as a NumPy array."""
    adata.uns[name] = {"params": settings_record(params),
                       **{key: host_array(value) for key, value in results.items()}}
