"""Real example data that installs with the package's dependencies (nothing is downloaded at run time)."""

import importlib.metadata
import pathlib
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp


_PBMC68K_FILE = "scanpy/datasets/10x_pbmc68k_reduced.h5ad"


def _scanpy_file(relative: str) -> pathlib.Path:
    # Locate the file through the installed distribution's metadata: this never imports scanpy.
    try:
        distribution = importlib.metadata.distribution("scanpy")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "the PBMC 68k example ships inside the scanpy package; install it with "
            "`pip install 'diffbio_eqx[example]'` (or `pip install scanpy`)"
        ) from None
    path = pathlib.Path(str(distribution.locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"scanpy is installed but {relative} is missing from it ({path})")
    return path


def restore_pbmc68k_counts(
    log_normalized: np.ndarray | sp.spmatrix, n_counts: np.ndarray
) -> tuple[sp.csr_matrix, float]:
    """Undo scanpy's `normalize_total(target_sum=1e4)` + `log1p` on the raw layer of pbmc68k_reduced.

    **Returns:** the integer counts as a float32 CSR matrix, and the share of non-zero values that were within
    0.05 of an integer before rounding (the check that the inversion is right).
    """
    matrix = sp.csr_matrix(log_normalized, dtype=np.float64)
    scale = np.repeat(np.asarray(n_counts, dtype=np.float64) / 1e4, np.diff(matrix.indptr))
    values = np.expm1(matrix.data) * scale
    rounded = np.rint(values)
    near_integer = float(np.mean(np.abs(values - rounded) < 0.05)) if values.size else 1.0
    counts = sp.csr_matrix((rounded.astype(np.float32), matrix.indices, matrix.indptr), shape=matrix.shape)
    counts.eliminate_zeros()
    return counts, near_integer


def pbmc68k() -> ad.AnnData:
    """The 10x Genomics PBMC 68k reduced set shipped inside scanpy, with its raw integer counts restored.

    700 peripheral blood mononuclear cells x 765 genes, annotated with 10 cell types in `obs["bulk_labels"]`
    (scanpy's `pbmc68k_reduced`). The file stores `log1p(normalize_total(x, 1e4))` of the raw counts in
    `.raw` together with each cell's original total `obs["n_counts"]`; the counts are restored as
    `rint(expm1(raw.X) * n_counts / 1e4)` (over 99.99 % of non-zero values are within 0.05 of an integer before
    rounding). The 765 genes are a subset, so a cell's restored counts sum to less than its `n_counts`.

    !!! info
        This set has **no batch column**: all cells come from one 10x run. Batch correction on it needs a
        simulated batch split.

    **Returns:** an `AnnData` with `X` the counts (float32 CSR holding whole numbers), `obs["bulk_labels"]`
    (categorical) and the file's other `obs` columns, `var_names` the gene symbols.
    """
    path = _scanpy_file(_PBMC68K_FILE)
    with warnings.catch_warnings():
        # The file predates `obsp`; anndata warns while moving its neighbour graphs there.
        warnings.simplefilter("ignore", FutureWarning)
        source = ad.read_h5ad(path)
    counts, _ = restore_pbmc68k_counts(source.raw.X, source.obs["n_counts"].to_numpy())
    obs = source.obs.copy()
    obs["bulk_labels"] = obs["bulk_labels"].astype("category")
    var = source.raw.var.copy()
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns["dataset"] = "10x PBMC 68k reduced (scanpy), restored integer counts; no batch column"
    return adata
