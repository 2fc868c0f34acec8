"""AnnData in and out, under scanpy's conventions (genes matched by name); training and running the pipeline on an
AnnData; atomic file writes."""

import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._core._checkpoint import atomic_path as atomic_path  # the one atomic writer, re-exported
from ._core._validate import NonIntegerCountsWarning, _scan_values, check_batch_labels, check_counts
from ._pipeline import (
    CELL_OUTPUTS,
    PipelineFit,
    SingleCellPipeline,
    SingleCellPipelineConfig,
    fit_pipeline,
    pipeline_chunks,
    run_pipeline,
)


#: Above this many count entries (n_cells x n_genes; 25,000 cells x 2,000 genes) the faces work chunk by chunk: an
#: h5ad's sparse `X` is read a block of rows at a time into one float32 CSR matrix (`read_h5ad`), inference runs in
#: chunks (`infer`), and the `(n_cells, n_genes)` layers are written to the file a chunk at a time (`write_h5ad`),
#: so no dense `n_cells x n_genes` matrix is ever held. Below it, the whole-data paths run as before.
CHUNKED_ABOVE = 50_000_000

#: Rows per block when a matrix is read or a result written chunk by chunk (and cells per compiled inference call).
CHUNK_ROWS = 8192


def is_large(n_cells: int, n_genes: int) -> bool:
    """Whether `n_cells x n_genes` counts go through the chunked paths (`CHUNKED_ABOVE`)."""
    return int(n_cells) * int(n_genes) > CHUNKED_ABOVE


def _is_backed_matrix(matrix: Any) -> bool:
    """An on-disk matrix of a backed AnnData or `anndata.io.sparse_dataset` (not in memory)."""
    import h5py

    return isinstance(matrix, (ad.abc.CSRDataset, ad.abc.CSCDataset, h5py.Dataset))


def read_matrix_in_chunks(matrix: Any, *, chunk_rows: int | None = None) -> sp.csr_matrix:
    """An on-disk (or in-memory) cells x genes matrix as one float32 CSR matrix, read `chunk_rows` rows at a time.

    The result is allocated once (from the row pointers) and filled block by block, so memory is the float32 CSR
    plus one block: an int64/float64 file never exists as a whole in its own dtypes, and a dense on-disk matrix is
    never whole in memory. Accepts an `anndata.io.sparse_dataset` / backed `X`, an `h5py.Dataset`, or any matrix
    that slices by rows.
    """
    n_cells, n_genes = (int(n) for n in matrix.shape)
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    index_dtype = np.int32 if n_genes <= np.iinfo(np.int32).max else np.int64
    blocks: list[sp.csr_matrix] = []
    pointers = np.zeros(n_cells + 1, np.int64)
    # First pass over the blocks' row pointers only for CSR on disk (cheap); else read each block once, keep it
    # sparse in float32 (a dense block becomes CSR at once) and assemble.
    group = getattr(matrix, "group", None)
    if isinstance(matrix, ad.abc.CSRDataset) and group is not None and "indptr" in group:
        pointers[:] = group["indptr"][...]
        nnz = int(pointers[-1])
        data = np.empty(nnz, np.float32)
        indices = np.empty(nnz, index_dtype)
        for start in range(0, n_cells, chunk_rows):
            stop = min(start + chunk_rows, n_cells)
            first, last = int(pointers[start]), int(pointers[stop])
            data[first:last] = group["data"][first:last]
            indices[first:last] = group["indices"][first:last]
        if nnz >= np.iinfo(np.int32).max:
            return sp.csr_matrix((data, indices, pointers), shape=(n_cells, n_genes))
        return sp.csr_matrix((data, indices, pointers.astype(np.int32)), shape=(n_cells, n_genes))
    for start in range(0, n_cells, chunk_rows):
        block = matrix[start : min(start + chunk_rows, n_cells)]
        block = sp.csr_matrix(block, dtype=np.float32)
        blocks.append(block)
        pointers[start + 1 : start + 1 + len(block.indptr) - 1] = np.diff(block.indptr)
    np.cumsum(pointers, out=pointers)
    data = np.concatenate([b.data for b in blocks]) if blocks else np.zeros(0, np.float32)
    indices = np.concatenate([b.indices.astype(index_dtype) for b in blocks]) if blocks else np.zeros(0, index_dtype)
    return sp.csr_matrix((data, indices, pointers), shape=(n_cells, n_genes))


class AnnDataArrays:
    """What `from_anndata` extracts: counts, integer batch codes, the code -> category mapping, and the name of
    each column of the counts (`genes`); `columns` says where those columns sit in `adata.var_names` (None when
    the counts are the AnnData's own columns, in order)."""

    def __init__(
        self,
        counts: np.ndarray | sp.csr_matrix | Array,
        batch_labels: np.ndarray | None,
        batch_categories: tuple[str, ...] | None,
        genes: tuple[str, ...],
        columns: np.ndarray | None = None,
    ):
        self.counts = counts
        self.batch_labels = batch_labels
        self.batch_categories = batch_categories
        self.genes = genes
        self.columns = columns

    @property
    def n_batches(self) -> int:
        return 1 if self.batch_categories is None else len(self.batch_categories)

    def __repr__(self) -> str:
        kind = "CSR" if sp.issparse(self.counts) else "dense"
        return (
            f"AnnDataArrays(counts={kind} {self.counts.shape}, "
            f"batch_categories={self.batch_categories})"
        )


def gene_columns(
    var_names: Iterable[Any], genes: Iterable[Any], *, field: str = "adata.var_names", owner: str = "the pipeline's"
) -> np.ndarray | None:
    """Where each of `genes` sits in `var_names`, matched by name: the one gene matching of the faces
    (`from_anndata(genes=)`, `run_anndata`, `dbx.tl.vae`'s model genes, `dbx.pp.ambient_removal`'s profile and raw
    droplets).

    **Arguments:**

    - `var_names`: the names to look in (e.g. `adata.var_names`); extra names are ignored.
    - `genes`: the names wanted, in the order wanted.
    - `field`: what `var_names` are, for the error messages. (Keyword only argument.)
    - `owner`: whose `genes` they are, for the error messages ("the pipeline's", "adata's").

    **Returns:** an integer index array, `var_names[columns] == genes`; None when `var_names` are `genes`, in order.
    Raises a `ValueError` naming the missing genes (how many, and the first few) when some are not in
    `var_names`, and one naming the repeated names when `var_names` are not unique.
    """
    names = pd.Index([str(name) for name in var_names])
    wanted = [str(gene) for gene in genes]
    if len(names) == len(wanted) and bool(np.all(names == wanted)):
        return None
    if not names.is_unique:
        repeated = list(names[names.duplicated()].unique())
        raise ValueError(f"{field}: to match genes by name they must be unique; {len(repeated)} "
                         f"repeated, e.g. {repeated[:5]}")
    columns = names.get_indexer(wanted)
    missing = [gene for gene, column in zip(wanted, columns) if column < 0]
    if missing:
        raise ValueError(f"{field}: {len(missing)} of {owner} {len(wanted)} genes are missing, first {missing[:5]}")
    return columns


def profile_by_gene(adata: ad.AnnData, profile: Any, *, field: str = "ambient_profile") -> Any:
    """A per-gene profile given as a `pandas.Series` indexed by gene name, as an array in the order of
    `adata.var_names` (extra genes left out; a `ValueError` names the missing ones); anything else as given."""
    if not isinstance(profile, pd.Series):
        return profile
    columns = gene_columns(profile.index, adata.var_names, field=f"{field}.index", owner="adata's")
    values = profile.to_numpy()
    return values if columns is None else values[columns]


def check_adata(adata: Any) -> ad.AnnData:
    """`adata` itself when it is an `AnnData`, else a `ValueError` naming what it is."""
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"adata: expected an anndata.AnnData, got {type(adata).__name__}")
    return adata


def layer_names(adata: ad.AnnData) -> list[str]:
    """The names of `adata`'s layers, sorted (anndata 0.13 also lists `X` in `layers`, under the key None)."""
    return sorted(name for name in adata.layers.keys() if name is not None)


def check_layer(adata: ad.AnnData, layer: str) -> None:
    """A `ValueError` naming `layer` and the layers there are when `adata` has no such layer."""
    if layer not in layer_names(adata):
        raise ValueError(f"layer: {layer!r} is not in adata.layers (has {layer_names(adata)})")


def counts_matrix(adata: ad.AnnData, *, layer: str | None = None, use_raw: bool = False) -> tuple[Any, str, pd.Index]:
    """The matrix that holds the counts, where it is (for messages) and its gene names: `adata.X`,
    `adata.layers[layer]` or `adata.raw.X` (with `adata.raw.var_names`)."""
    if layer is not None and use_raw:
        raise ValueError(f"layer: {layer!r} and use_raw=True both name where the counts are; choose one")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw: adata.raw is not set")
        matrix, field, names = adata.raw.X, "adata.raw.X", adata.raw.var_names
    elif layer is None:
        matrix, field, names = adata.X, "adata.X", adata.var_names
    else:
        check_layer(adata, layer)
        matrix, field, names = adata.layers[layer], f"adata.layers[{layer!r}]", adata.var_names
    if matrix is None:
        raise ValueError(f"{field}: is empty (None)")
    return matrix, field, names


def _whole_numbers(matrix: Any) -> tuple[bool | None, float]:
    """Whether a matrix holds whole numbers (what counts are), and its largest value; None when it holds no
    numbers, or non-finite or negative ones (which `check_counts` names)."""
    values = np.asarray(matrix.data if sp.issparse(matrix) else matrix)
    if values.size == 0 or not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        return None, 0.0
    scan = _scan_values(np.ascontiguousarray(values, dtype=np.float32))
    if not scan.finite_and_nonnegative:
        return None, float("nan")
    return not scan.non_integer, float(values.max())


def count_sources(adata: ad.AnnData) -> list[tuple[str, dict[str, Any]]]:
    """Where `adata` holds whole-number counts besides `X`: `layers["counts"]` (scvi-tools' convention), any
    other layer, then `.raw` (scanpy's), as `(field, from_anndata keywords)` pairs."""
    found = []
    for name in sorted(layer_names(adata), key=lambda name: name != "counts"):
        if _whole_numbers(adata.layers[name])[0] is True:
            found.append((f"adata.layers[{name!r}]", {"layer": name}))
    if adata.raw is not None and _whole_numbers(adata.raw.X)[0] is True:
        found.append(("adata.raw", {"use_raw": True}))
    return found


def not_counts(adata: ad.AnnData, *, layer: str | None = None, use_raw: bool = False,
               flags: bool = False) -> str | None:
    """None when the chosen matrix holds whole numbers (counts; or values that `check_counts` refuses); else one
    line saying it does not, whether its values look log-transformed, and where counts are instead (with the
    argument, or with `flags` the command line's flag, that reads them)."""
    matrix, field, _ = counts_matrix(adata, layer=layer, use_raw=use_raw)
    whole, largest = _whole_numbers(matrix)
    if whole is not False:
        return None
    looks = ", looks log-transformed" if largest < 30 or "log1p" in adata.uns else ""
    message = f"{field}: holds non-integer values (largest {largest:.3g}{looks}), not raw counts"

    def how(keywords: dict[str, Any]) -> str:
        if flags:
            return "--use-raw" if "use_raw" in keywords else f"--layer {keywords['layer']}"
        return "use_raw=True" if "use_raw" in keywords else f"layer={keywords['layer']!r}"

    sources = [(where, keywords) for where, keywords in count_sources(adata)
               if keywords != ({"use_raw": True} if use_raw else {"layer": layer})]
    if sources:
        return message + "; counts are in " + " and ".join(f"{where} ({how(kw)})" for where, kw in sources)
    return message + "; no layer or .raw holds counts either"


def from_anndata(
    adata: Any,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    batch_key: str | None = None,
    genes: Iterable[str] | None = None,
    genes_owner: str = "the pipeline's",
) -> AnnDataArrays:
    """Extract validated counts and batch codes from an AnnData.

    **Arguments:**

    - `adata`: cells x genes.
    - `layer`: read counts from `adata.layers[layer]` instead of `adata.X` (e.g. `"counts"`, scvi-tools'
      convention). (Keyword only argument.)
    - `use_raw`: read counts from `adata.raw` (scanpy's convention), with its genes.
    - `batch_key`: an `obs` column holding the batch of each cell (any dtype; its categories become codes).
    - `genes`: take these genes' columns, in this order, matched by name in the counts' gene names (`gene_columns`;
      e.g. a trained pipeline's `genes`); a `ValueError` names the missing ones. None: every column as it is.
    - `genes_owner`: whose `genes` they are, for that error ("the pipeline's", "the model's").

    **Returns:** an `AnnDataArrays` with `counts` (float32; CSR kept sparse when the input is sparse, so that
    only minibatches are ever densified), `batch_labels` (int32 codes, or None without `batch_key`),
    `batch_categories` (the category of each code) and `genes` (the name of each column of `counts`).

    Counts that are not whole numbers (e.g. log-normalised values in `X`) are accepted with one
    `NonIntegerCountsWarning` that names the field and where counts are instead (`not_counts`).
    """
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"adata: expected an anndata.AnnData, got {type(adata).__name__}")
    matrix, field, var_names = counts_matrix(adata, layer=layer, use_raw=use_raw)
    if _is_backed_matrix(matrix):  # a backed AnnData: read a block of rows at a time, kept sparse
        matrix = read_matrix_in_chunks(matrix)
    elif sp.issparse(matrix) and not is_large(*matrix.shape):
        # `check_counts` keeps a float32 CSR as it is; below the chunked size the counts are the caller's own copy
        # (at scale they are shared with the AnnData, which nothing here writes into).
        matrix = sp.csr_matrix(matrix, copy=True)
    genes = None if genes is None else [str(gene) for gene in genes]
    columns = None if genes is None else gene_columns(var_names, genes, owner=genes_owner)
    if columns is not None:
        matrix = matrix[:, columns]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = check_counts(matrix, field=field)
    for warning in caught:  # one warning, naming the field and where the counts are instead
        if issubclass(warning.category, NonIntegerCountsWarning):
            message = not_counts(adata, layer=layer, use_raw=use_raw) or str(warning.message)
            warnings.warn(f"{message}; the count likelihoods expect raw (unnormalised) counts",
                          NonIntegerCountsWarning, stacklevel=2)
        else:
            warnings.warn(warning.message, warning.category, stacklevel=2)
    names = tuple(str(name) for name in (var_names if genes is None else genes))
    if batch_key is None:
        return AnnDataArrays(counts, None, None, names, columns)
    codes, categories = _batch_codes(adata, batch_key)
    return AnnDataArrays(counts, codes, categories, names, columns)


def _batch_codes(adata: ad.AnnData, batch_key: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if batch_key not in adata.obs.columns:
        raise ValueError(
            f"batch_key: {batch_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})"
        )
    column = adata.obs[batch_key]
    if bool(column.isna().any()):
        first = int(np.flatnonzero(column.isna().to_numpy())[0])
        raise ValueError(f"adata.obs[{batch_key!r}]: missing value at cell {first}")
    categorical = pd.Categorical(column)
    codes = np.asarray(check_batch_labels(
        categorical.codes.astype(np.int32), adata.n_obs, n_batches=len(categorical.categories),
        field=f"adata.obs[{batch_key!r}]",
    ))
    return codes, tuple(str(c) for c in categorical.categories)


#: Where each result goes, following scanpy's naming (`X_umap` makes `scanpy.pl.umap` work).
OBSM_KEYS = {
    "latent": "X_diffbio",
    "corrected_embeddings": "X_diffbio_corrected",
    "embeddings_2d": "X_umap",
}
LAYER_KEYS = {
    "normalized": "diffbio_normalized",
    "decontaminated_counts": "diffbio_decontaminated",
}
CLUSTER_KEY = "diffbio_cluster"


def _get(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(name)
    try:
        return result[name]
    except (KeyError, TypeError, IndexError):
        return getattr(result, name, None)


def to_anndata(adata: ad.AnnData, result: Any, *, copy: bool = True) -> ad.AnnData:
    """Write pipeline results into an AnnData under scanpy's conventions.

    **Arguments:**

    - `adata`: the cells the results belong to (same order).
    - `result`: a mapping or a `PipelineOutput` (anything readable as `result["latent"]`); missing entries are
      skipped. `latent` goes to `obsm["X_diffbio"]`, `corrected_embeddings` to `obsm["X_diffbio_corrected"]`,
      `embeddings_2d` to `obsm["X_umap"]`, the argmax of `cluster_assignments` to the categorical
      `obs["diffbio_cluster"]` (probabilities in `obsm["diffbio_cluster_probabilities"]`), `normalized` to
      `layers["diffbio_normalized"]` and `decontaminated_counts` to `layers["diffbio_decontaminated"]`.
    - `copy`: write into a copy (default) instead of `adata` itself. (Keyword only argument.)
    """
    if check_adata(adata).isbacked:  # the matrices stay in their file: the results go into a new AnnData
        out = _shallow_copy(adata, matrices=False)
    elif copy:
        out = _shallow_copy(adata) if is_large(adata.n_obs, adata.n_vars) else adata.copy()
    else:
        out = adata
    n_cells = out.n_obs

    def as_cells_array(name: str, value: Any) -> np.ndarray:
        array = np.asarray(value)
        if array.ndim != 2 or array.shape[0] != n_cells:
            raise ValueError(f"result[{name!r}]: expected {n_cells} rows, got shape {array.shape}")
        return array

    # Every result checked before any is written, so a bad one leaves `out` (maybe the caller's AnnData) as it was.
    obsm, layers = {}, {}
    for name, key in OBSM_KEYS.items():
        value = _get(result, name)
        if value is not None:
            obsm[key] = as_cells_array(name, value).astype(np.float32)
    for name, key in LAYER_KEYS.items():
        value = _get(result, name)
        if value is not None:
            array = as_cells_array(name, value)
            if array.shape[1] != out.n_vars:
                raise ValueError(f"result[{name!r}]: expected {out.n_vars} genes, got {array.shape[1]}")
            layers[key] = array.astype(np.float32)
    assignments = _get(result, "cluster_assignments")
    if assignments is not None:
        obsm[f"{CLUSTER_KEY}_probabilities"] = as_cells_array("cluster_assignments", assignments).astype(np.float32)
    for key, array in obsm.items():
        out.obsm[key] = array
    for key, array in layers.items():
        out.layers[key] = array
    if assignments is not None:
        probabilities = obsm[f"{CLUSTER_KEY}_probabilities"]
        categories = [str(k) for k in range(probabilities.shape[1])]
        out.obs[CLUSTER_KEY] = pd.Categorical([str(k) for k in np.argmax(probabilities, axis=1)],
                                              categories=categories)
    return out


def _shallow_copy(adata: ad.AnnData, *, matrices: bool = True) -> ad.AnnData:
    """A new AnnData sharing the (large) matrices of `adata`, with its own annotations: `to_anndata` at scale
    adds results without a second copy of millions of cells' counts (nothing writes into the shared matrices).
    With `matrices=False` (a backed AnnData) `X`, `layers` and `.raw` are left out."""
    import copy as copying

    parts: dict[str, Any] = {
        "X": adata.X if matrices else None, "obs": adata.obs.copy(), "var": adata.var.copy(),
        "uns": copying.deepcopy(dict(adata.uns)), "obsm": dict(adata.obsm), "varm": dict(adata.varm),
        "obsp": dict(adata.obsp), "varp": dict(adata.varp),
        "layers": {name: adata.layers[name] for name in layer_names(adata)} if matrices else None,
        "raw": adata.raw if matrices else None,
    }
    return ad.AnnData(**parts)


class ChunkedOutput(Mapping[str, Any]):
    """What `infer` returns at scale: the per-cell outputs (`latent`, `corrected_embeddings`, `embeddings_2d`,
    `cluster_assignments`) in memory, and the `(n_cells, n_genes)` ones (`normalized`, `decontaminated_counts`)
    computed again chunk by chunk, only when they are written (`write_h5ad(..., layers=output.stream)`).

    Reads like a `PipelineOutput` for the per-cell fields (`out["latent"]`); `out.get("normalized")` is None.
    """

    def __init__(self, cells: dict[str, np.ndarray], pipeline: SingleCellPipeline, data: Mapping[str, Any], *,
                 key: PRNGKeyArray, gene_outputs: tuple[str, ...], chunk_size: int | None = None):
        self.cells, self.pipeline, self.data, self.key = cells, pipeline, data, key
        self.gene_outputs, self.chunk_size = gene_outputs, CHUNK_ROWS if chunk_size is None else chunk_size

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cells[name]

    def __iter__(self) -> Any:
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    def stream(self) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
        """`(first_cell, {layer key: (chunk_cells, n_genes) float32})` for each chunk, in order."""
        for start, chunk in pipeline_chunks(self.pipeline, self.data, key=self.key, chunk_size=self.chunk_size,
                                            outputs=self.gene_outputs, warn_profile=False):
            yield start, {LAYER_KEYS[name]: values.astype(np.float32) for name, values in chunk.items()}


def infer(pipeline: SingleCellPipeline, data: Mapping[str, Any], *, key: PRNGKeyArray,
          chunked: bool | None = None) -> Any:
    """Run a trained pipeline's inference, chunk by chunk when the data are large.

    **Arguments:**

    - `pipeline`, `data`, `key`: as in `run_pipeline`.
    - `chunked`: None (default) chooses by size: `is_large(n_cells, n_genes)` (`CHUNKED_ABOVE` count entries)
      runs `pipeline_chunks` (a `ChunkedOutput`: per-cell outputs in memory, the `(n_cells, n_genes)` layers
      streamed when written), below it `run_pipeline` on the whole data (a `PipelineOutput`). The chunked path
      maps cells onto the stored Harmony reference; it equals the whole-data run with that reference.
    """
    counts = data["counts"]
    n_cells, n_genes = (int(n) for n in counts.shape)
    if chunked is None:
        chunked = is_large(n_cells, n_genes) and not (
            pipeline.batch_correction is not None and pipeline.harmony_reference is None)
    if not chunked:
        return run_pipeline(pipeline, data, key=key)
    outputs = tuple(name for name in CELL_OUTPUTS)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for _, chunk in pipeline_chunks(pipeline, data, key=key, chunk_size=CHUNK_ROWS, outputs=outputs):
        for name, values in chunk.items():
            parts[name].append(values)
    cells = {name: np.concatenate(values) for name, values in parts.items()}
    genes = ("normalized",) + (("decontaminated_counts",) if pipeline.ambient_removal is not None else ())
    return ChunkedOutput(cells, pipeline, data, key=key, gene_outputs=genes)


def _write_streamed_layers(path: pathlib.Path, n_cells: int, n_genes: int,
                           chunks: Iterable[tuple[int, dict[str, np.ndarray]]]) -> None:
    """Add dense float32 `layers` to a written h5ad file, one block of rows at a time (anndata's "array"
    encoding, so `anndata.read_h5ad` reads them as any layer)."""
    import h5py

    with h5py.File(path, "r+") as file:
        layers = file.require_group("layers")
        if "encoding-type" not in layers.attrs:
            layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        datasets: dict[str, Any] = {}
        for start, chunk in chunks:
            for name, values in chunk.items():
                if name not in datasets:
                    datasets[name] = layers.create_dataset(
                        name, shape=(n_cells, n_genes), dtype=np.float32,
                        chunks=(max(1, min(n_cells, (1 << 20) // max(n_genes, 1))), n_genes))
                    datasets[name].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                datasets[name][start : start + values.shape[0]] = values


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike[str], *,
               input_path: str | os.PathLike[str] | None = None,
               layers: Any = None) -> pathlib.Path:
    """Write `adata` to `path` atomically (temporary file in the same folder, then rename).

    Refuses to overwrite `input_path` (the file the data was read from), so an input is never modified.
    `layers`: a callable returning `(first_cell, {layer key: block})` pairs (`ChunkedOutput.stream`), whose
    blocks are written into `layers` one at a time before the rename, so no whole `(n_cells, n_genes)` layer is
    ever in memory.
    """
    check_adata(adata)
    target = pathlib.Path(path)
    if input_path is not None and pathlib.Path(input_path).exists() and target.exists():
        if target.resolve() == pathlib.Path(input_path).resolve():
            raise ValueError(f"output: {str(target)!r} is the input file; choose another output path")
    with atomic_path(target) as temporary:
        adata.write_h5ad(temporary)
        if layers is not None:
            _write_streamed_layers(pathlib.Path(temporary), adata.n_obs, adata.n_vars, layers())
    return target


def read_h5ad(path: str | os.PathLike[str]) -> ad.AnnData:
    """Read an h5ad file into memory, with a clear error for a missing, corrupt or truncated file.

    A large file (`is_large`: more than `CHUNKED_ABOVE` entries in `X`) is opened in anndata's backed mode and its
    `X` read a block of rows at a time into one float32 CSR matrix (`read_matrix_in_chunks`): never dense, and
    never whole in the file's own (e.g. float64/int64) dtypes. The rest (`obs`, `var`, `obsm`, `layers`, ...) is
    read as anndata reads it.
    """
    source = pathlib.Path(path)
    if not source.is_file():
        raise ValueError(f"input: {str(source)!r} does not exist or is not a file")
    try:
        backed = ad.read_h5ad(source, backed="r")
        try:
            if is_large(backed.n_obs, backed.n_vars) and backed.raw is None:
                parts: dict[str, Any] = {
                    "X": read_matrix_in_chunks(backed.X), "obs": backed.obs.copy(), "var": backed.var.copy(),
                    "uns": dict(backed.uns), "obsm": dict(backed.obsm), "varm": dict(backed.varm),
                    "obsp": dict(backed.obsp), "varp": dict(backed.varp),
                    "layers": {name: backed.layers[name] for name in layer_names(backed)},
                }
                return ad.AnnData(**parts)
        finally:
            backed.file.close()
        return ad.read_h5ad(source)
    except Exception as error:  # h5py/anndata raise many types for damaged files
        raise ValueError(
            f"input: {str(source)!r} could not be read as an h5ad file ({type(error).__name__}: {error}); "
            "it may be corrupt or truncated"
        ) from None


def _pipeline_data(
    adata: ad.AnnData, arrays: AnnDataArrays, ambient_profile: ArrayLike | pd.Series | None
) -> dict[str, Any]:
    """The array functions' input dict; the profile, in the order of `adata.var_names` (or a Series by gene
    name), follows the counts' columns."""
    data: dict[str, Any] = {"counts": arrays.counts}
    if arrays.batch_labels is not None:
        data["batch_labels"] = arrays.batch_labels
    if ambient_profile is not None:
        profile = np.asarray(profile_by_gene(adata, ambient_profile))
        if arrays.columns is not None:
            if profile.shape != (adata.n_vars,):
                raise ValueError(f"ambient_profile: expected one value per gene of adata, shape ({adata.n_vars},), "
                                 f"got {profile.shape}")
            profile = profile[arrays.columns]
        data["ambient_profile"] = profile
    return data


def fit_anndata(
    adata: Any,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    key: PRNGKeyArray,
    config: SingleCellPipelineConfig | None = None,
    ambient_profile: ArrayLike | pd.Series | None = None,
    **fit_settings: Any,
) -> tuple[Any, PipelineFit]:
    """Train a pipeline on an AnnData and write every result back under scanpy's conventions.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or in `layers[layer]`); never modified.
    - `batch_key`: `obs` column with each cell's batch (any dtype). (Keyword only argument.)
    - `layer`: read counts from this layer instead of `X`.
    - `key`: PRNG key for building and training the pipeline.
    - `config`: pipeline settings; `n_genes` and `n_batches` are taken from the data.
    - `ambient_profile`: `(n_genes,)` in the order of `adata.var_names`, or a `pandas.Series` indexed by gene
      name (`profile_by_gene`); optional.
    - `fit_settings`: passed to `fit_pipeline` (epochs, `raw_counts`, fine-tuning, ...).

    **Returns:** `(annotated, fitted)`: a new AnnData with `obsm["X_diffbio"]`, `obsm["X_diffbio_corrected"]`,
    `obsm["X_umap"]`, `obs["diffbio_cluster"]` and the `layers` of `diffbio_eqx.io.to_anndata`, so
    `scanpy.pl.umap(annotated, color="diffbio_cluster")` works; and the `PipelineFit`. The trained pipeline
    keeps `adata.var_names` as its `genes` and the batch names as its `batches`, so `run_anndata` matches new
    data to them by name.
    """
    arrays = from_anndata(adata, layer=layer, batch_key=batch_key)
    config = SingleCellPipelineConfig() if config is None else config
    config = config.replace(n_genes=adata.n_vars, n_batches=arrays.n_batches)
    data = _pipeline_data(adata, arrays, ambient_profile)
    build_key, fit_key, run_key = jr.split(key, 3)
    pipeline = SingleCellPipeline(config, key=build_key, genes=arrays.genes, batches=arrays.batch_categories)
    fitted = fit_pipeline(pipeline, data, key=fit_key, **fit_settings)
    output = infer(fitted.pipeline, data, key=run_key)
    annotated = to_anndata(adata, output)
    if arrays.batch_categories is not None:
        annotated.uns["diffbio_batch_categories"] = list(arrays.batch_categories)
    return annotated, fitted


def _coded_as_in_training(arrays: AnnDataArrays, batches: tuple[str, ...], batch_key: str | None) -> AnnDataArrays:
    """`arrays` with each cell's batch code the position of its batch's name in the training `batches`."""
    assert arrays.batch_labels is not None and arrays.batch_categories is not None
    position = {name: code for code, name in enumerate(batches)}
    present = [arrays.batch_categories[code] for code in np.unique(arrays.batch_labels)]
    unseen = [name for name in present if name not in position]
    if unseen:
        raise ValueError(f"batch_key: adata.obs[{batch_key!r}] holds batches the pipeline was not trained on "
                         f"({unseen[:5]}; trained on {list(batches)})")
    recode = np.array([position.get(name, -1) for name in arrays.batch_categories])
    labels = recode[arrays.batch_labels].astype(arrays.batch_labels.dtype)
    return AnnDataArrays(arrays.counts, labels, batches, arrays.genes, arrays.columns)


def run_anndata(
    pipeline: SingleCellPipeline,
    adata: Any,
    *,
    key: PRNGKeyArray,
    batch_key: str | None = None,
    layer: str | None = None,
    ambient_profile: ArrayLike | pd.Series | None = None,
    inference: bool = True,
) -> Any:
    """Run a trained pipeline on an AnnData, matching its genes by name, and return the annotated cells.

    **Arguments:**

    - `pipeline`: a trained pipeline. With `genes` (set by `fit_anndata` and the main job), the columns of
      `adata` are matched to them by name: another order is reordered, extra genes are left out, and missing
      ones raise a `ValueError` that names them. Without, `adata` must hold its genes, in order.
    - `adata`: cells x genes, raw counts in `X` (or in `layers[layer]`); never modified.
    - `key`: PRNG key, as in `run_pipeline`. (Keyword only argument.)
    - `batch_key`: `obs` column with each cell's batch. With `batches` (set by `fit_anndata` and the main job),
      each name is coded as in training (a query of batch "b1" alone gets b1's code), and a batch the pipeline
      was not trained on raises a `ValueError`; without, the column's categories must code the batches as in
      training.
    - `layer`: read counts from this layer instead of `X`.
    - `ambient_profile`: `(adata.n_vars,)`, in the order of `adata.var_names`, or a `pandas.Series` indexed by
      gene name; optional.
    - `inference`: as in `run_pipeline`.

    **Returns:** a new AnnData with the results under scanpy's conventions (see `to_anndata`). When `adata`'s
    genes differ from the pipeline's (order or set), it holds the pipeline's genes, in its order
    (`adata[:, pipeline.genes]`), so that the per-gene layers line up.
    """
    arrays = from_anndata(adata, layer=layer, batch_key=batch_key, genes=pipeline.genes)
    if arrays.batch_labels is not None and pipeline.batches is not None:
        arrays = _coded_as_in_training(arrays, pipeline.batches, batch_key)
    data = _pipeline_data(adata, arrays, ambient_profile)
    output = (infer(pipeline, data, key=key) if inference else run_pipeline(pipeline, data, key=key, inference=False))
    cells = adata if arrays.columns is None else adata[:, list(arrays.genes)]
    annotated = to_anndata(cells, output)
    if arrays.batch_categories is not None:
        annotated.uns["diffbio_batch_categories"] = list(arrays.batch_categories)
    return annotated
