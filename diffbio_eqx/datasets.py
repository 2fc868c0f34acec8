"""Real example data that installs with the package's dependencies (nothing is downloaded at run time)."""

import importlib.metadata
import pathlib
import warnings
from typing import cast

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._core._validate import check_whole


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
    # Read into memory (not backed, not lazy): the raw layer is a SciPy matrix and `obs` a DataFrame.
    counts, _ = restore_pbmc68k_counts(cast(sp.spmatrix, source.raw.X), source.obs["n_counts"].to_numpy())
    obs = cast(pd.DataFrame, source.obs).copy()
    obs["bulk_labels"] = obs["bulk_labels"].astype("category")
    var = source.raw.var.copy()
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns["dataset"] = "10x PBMC 68k reduced (scanpy), restored integer counts; no batch column"
    return adata


def add_simulated_batches(
    adata: ad.AnnData, *, n_batches: int = 2, effect_scale: float = 0.4, seed: int = 0, key: str = "batch"
) -> ad.AnnData:
    """Split the cells into batches at random and give each batch a simulated technical effect.

    For data without real batches (like `pbmc68k`): every batch after the first gets a gene-wise multiplicative
    effect `exp(N(0, effect_scale))`, applied by resampling its counts as `Poisson(counts * effect)`, the same
    kind of effect as in `diffbio_eqx.simulate`. Batch 0 is left untouched. The batch is written to
    `obs[key]` (categorical `"batch0"`, `"batch1"`, ...), the effects to `var[f"{key}_effect_{b}"]` and a note
    to `uns["simulated_batches"]`. Returns a new AnnData; the input is not modified.
    """
    check_whole(n_batches, "n_batches")
    if not 0 <= effect_scale <= 5:  # the log-scale sd of a technical effect; above 5 the resampled counts overflow
        raise ValueError(f"effect_scale: must be in [0, 5], got {effect_scale}")
    if key in adata.obs.columns:
        raise ValueError(f"key: adata.obs already has a column {key!r}; choose another key for the batches")
    rng = np.random.default_rng(seed)
    out = adata.copy()
    counts = sp.csr_matrix(out.X, dtype=np.float64)
    batch = rng.integers(0, n_batches, out.n_obs)
    effects = np.exp(rng.normal(0.0, effect_scale, (n_batches, out.n_vars)))
    effects[0] = 1.0
    row_of_entry = np.repeat(np.arange(out.n_obs), np.diff(counts.indptr))
    entry_batch = batch[row_of_entry]
    resampled = np.where(entry_batch == 0, counts.data,
                         rng.poisson(counts.data * effects[entry_batch, counts.indices]))
    # A cell emptied by the resampling keeps its original counts (models and validation need non-empty cells).
    emptied = np.bincount(row_of_entry, weights=resampled, minlength=out.n_obs) == 0
    resampled = np.where(emptied[row_of_entry], counts.data, resampled)
    new = sp.csr_matrix((resampled.astype(np.float32), counts.indices, counts.indptr), shape=counts.shape)
    new.eliminate_zeros()
    out.X = new
    out.obs[key] = pd.Categorical([f"batch{b}" for b in batch], categories=[f"batch{b}" for b in range(n_batches)])
    for b in range(n_batches):
        out.var[f"{key}_effect_{b}"] = effects[b]
    out.uns["simulated_batches"] = (
        f"{n_batches} batches assigned at random with simulated gene-wise effects exp(N(0, {effect_scale})); "
        "the original data has no batches"
    )
    return out


def ligand_receptor_pairs(name: str = "consensus") -> pd.DataFrame:
    """A ligand-receptor resource from an installed `liana` (LIANA+ ships them in its package; nothing is downloaded).

    Reads `liana/resource/omni_resource.csv` from the installed package without importing `liana`, and keeps the
    rows of resource `name` (default LIANA's `"consensus"`, 4,620 pairs) as `liana.rs.select_resource(name)` does.

    **Returns:** a DataFrame with columns `ligand` and `receptor` (complexes as subunits joined by `_`). Any such
    table works as `resource=` of `tl.ligand_receptor`; without `liana` installed, this raises an `ImportError`
    saying how to pass one.
    """
    import importlib.util

    spec = importlib.util.find_spec("liana")
    folder = None if spec is None or spec.origin is None else pathlib.Path(spec.origin).parent
    path = None if folder is None else folder / "resource" / "omni_resource.csv"
    if path is None or not path.exists():
        raise ImportError(
            "ligand_receptor_pairs: needs the `liana` package (pip install liana), which ships LIANA's resources; "
            "or pass your own resource to tl.ligand_receptor(..., resource=table) as a pandas DataFrame with "
            "'ligand' and 'receptor' columns of gene symbols (complex subunits joined by '_', e.g. 'ITGA4_ITGB1')"
        )
    table = pd.read_csv(path, index_col=False)
    names = sorted(table["resource"].unique())
    if name.lower() not in names:
        raise ValueError(f"name: resource {name!r} is not in liana's file; choose from {names}")
    rows = (table["resource"] == name.lower()).to_numpy()
    return pd.DataFrame({"ligand": table["source_genesymbol"].to_numpy()[rows],
                         "receptor": table["target_genesymbol"].to_numpy()[rows]})
