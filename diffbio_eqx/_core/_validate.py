"""Checks of user input at the package boundary.

Every public entry point that takes user data calls these before any numerical work. Each failure is a
`ValueError` whose message starts with the field name, says what is wrong and names the offending index or value.
Value checks need concrete data: when a JAX tracer arrives (the caller is already inside `jit`/`vmap`), only
the shape checks run and the numerics are the caller's responsibility.
"""

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast

import jax
import jax.core
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array


P = ParamSpec("P")
R = TypeVar("R")


class NonIntegerCountsWarning(UserWarning):
    """Counts that are not whole numbers: the count likelihoods expect raw, unnormalised counts."""


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _format_indices(indices: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f", ... ({len(indices)} in all)" if len(indices) > limit else ""
    return f"[{shown}{more}]"


def _as_numeric_array(x: Any, field: str) -> np.ndarray:
    try:
        array = np.asarray(x)
    except Exception as error:  # anything numpy cannot turn into an array
        raise ValueError(f"{field}: could not be read as an array ({error})") from None
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise ValueError(f"{field}: expected a numeric array, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{field}: expected real numbers, got complex dtype {array.dtype}")
    return array


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _to_float32(values: np.ndarray, field: str, locate: Any) -> np.ndarray:
    """Cast to float32, refusing finite values beyond its range (they would silently become Inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(np.float32)
        if values.dtype.kind != "f" or values.dtype.itemsize <= 4:
            return cast  # integers (at most ~9.2e18) and narrower floats always fit
        overflow = np.isfinite(values) & ~np.isfinite(cast)
    if np.any(overflow):
        first = float(values[overflow].ravel()[0])
        raise ValueError(
            f"{field}: value {first:.3g} at {locate(overflow)} exceeds the float32 range "
            f"({_FLOAT32_MAX:.3g}); counts must be ordinary numbers of molecules"
        )
    return cast


class _ValueScan(NamedTuple):
    finite_and_nonnegative: bool
    non_integer: bool
    row_totals: np.ndarray | None  # per row of a 2-D (dense) input; None for 1-D (sparse `data`)


# Rows (or values, for sparse `data`) per block: ~2 MB of float32, so the temporaries stay in cache.
_SCAN_BLOCK_VALUES = 1 << 19


def _scan_values(values: np.ndarray) -> _ValueScan:
    """One pass over float32 counts in cache-sized blocks: finite and >= 0, any non-integer, row totals.

    Whole-array checks allocate several temporaries the size of the matrix (800 MB each for 100,000 x 2,000
    cells) and took longer than the VAE's inference on the same cells; blocks keep the memory flat.
    """
    dense = values.ndim == 2
    rows = values if dense else values.reshape(-1, 1)
    block = max(1, _SCAN_BLOCK_VALUES // max(rows.shape[1], 1))
    totals = np.empty(rows.shape[0], dtype=np.float64) if dense else None
    rounded = np.empty((min(block, rows.shape[0]), rows.shape[1]), dtype=values.dtype)
    good, non_integer = True, False
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        good = good and bool(np.isfinite(part).all()) and not bool((part < 0).any())
        if not good:
            break
        if not non_integer:
            scratch = rounded[: part.shape[0]]
            np.rint(part, out=scratch)
            non_integer = bool((scratch != part).any())
        if totals is not None:
            totals[start : start + part.shape[0]] = part.sum(axis=1, dtype=np.float64)
    return _ValueScan(good, non_integer, totals if good else None)


def _checked_csr(counts: Any) -> bool:
    """A float32 `csr_matrix` with int32/int64 indices in canonical form: what `check_counts` would return."""
    return (isinstance(counts, sp.csr_matrix) and counts.dtype == np.float32
            and counts.indices.dtype in (np.int32, np.int64) and bool(counts.has_canonical_format))


def check_counts(
    counts: Any,
    *,
    field: str = "counts",
    allow_empty_cells: bool = False,
    n_genes: int | None = None,
) -> np.ndarray | sp.csr_matrix | Array:
    """Validate a count matrix and return it as float32, dense or CSR (a copy, except a float32 canonical CSR
    input, which is returned as it is; the input is never modified).

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` dense array or SciPy sparse matrix of raw counts.
    - `field`: the name used in error messages. (Keyword only argument.)
    - `allow_empty_cells`: accept cells whose counts are all zero (raw matrices with empty droplets).
    - `n_genes`: the number of genes a trained model expects, if any.

    **Returns:** the counts as a float32 `numpy.ndarray`, or a float32 `scipy.sparse.csr_matrix` when the
    input was sparse (a traced JAX array is returned as it is, after the shape checks).

    Non-integer counts are accepted with a `NonIntegerCountsWarning`, as scvi-tools does.
    """
    if _is_traced(counts):
        _check_shape_only(counts, field, n_genes)
        return counts
    if sp.issparse(counts):
        if counts.ndim != 2:
            raise ValueError(f"{field}: expected a 2-D matrix (n_cells, n_genes), got {counts.ndim}-D")
        if _checked_csr(counts):
            # Already float32 CSR in canonical form (e.g. read by `io.read_counts`): not copied, so that a
            # million-cell matrix is held once; nothing here or downstream writes into it.
            matrix = counts
        else:
            source = sp.csr_matrix(counts, copy=True)
            _as_numeric_array(source.data, field)
            source.data = _to_float32(source.data, field, lambda mask: _locate(source, mask))
            matrix = sp.csr_matrix(source, dtype=np.float32)
        values = matrix.data
        shape = cast(tuple[int, int], matrix.shape)  # scipy infers shape as possibly None
    else:
        array = _as_numeric_array(counts, field)
        if array.ndim != 2:
            raise ValueError(
                f"{field}: expected a 2-D matrix (n_cells, n_genes), got shape {tuple(array.shape)}"
            )
        matrix = _to_float32(array, field, lambda mask: _locate(array, mask))
        values = matrix
        shape = matrix.shape
    n_cells, n_columns = shape
    if n_cells == 0 or n_columns == 0:
        raise ValueError(f"{field}: empty matrix of shape {shape}; need at least one cell and one gene")
    if n_genes is not None and n_columns != n_genes:
        raise ValueError(
            f"{field}: has {n_columns} genes but the model was built for {n_genes}; "
            "subset the new data to the training genes, in the training order"
        )
    scan = _scan_values(values)
    if not scan.finite_and_nonnegative:
        _check_values_finite_nonnegative(matrix, values, field)  # finds and names the first bad entry
    if scan.non_integer:
        warnings.warn(
            f"{field}: contains non-integer values; the count likelihoods expect raw (unnormalised) counts",
            NonIntegerCountsWarning,
            stacklevel=2,
        )
    if not allow_empty_cells:
        totals = scan.row_totals if scan.row_totals is not None else np.asarray(matrix.sum(axis=1)).ravel()
        empty = np.flatnonzero(totals <= 0)
        if empty.size:
            raise ValueError(
                f"{field}: cells with zero total counts at indices {_format_indices(empty)}; "
                "filter them out first (e.g. scanpy.pp.filter_cells(adata, min_counts=1))"
            )
    return matrix


def _check_shape_only(x: Any, field: str, n_genes: int | None) -> None:
    if x.ndim != 2:
        raise ValueError(f"{field}: expected a 2-D matrix (n_cells, n_genes), got shape {tuple(x.shape)}")
    if n_genes is not None and x.shape[1] != n_genes:
        raise ValueError(f"{field}: has {x.shape[1]} genes but the model was built for {n_genes}")


def _locate(matrix: Any, mask: np.ndarray) -> str:
    """`cell i, gene j` of the first True entry of `mask` (over `matrix.data` when sparse)."""
    if sp.issparse(matrix):
        position = int(np.flatnonzero(mask)[0])
        cell = int(np.searchsorted(matrix.indptr, position, side="right") - 1)
        gene = int(matrix.indices[position])
    else:
        cell, gene = (int(i) for i in np.argwhere(mask)[0])
    return f"cell {cell}, gene {gene}"


def _check_values_finite_nonnegative(matrix: Any, values: np.ndarray, field: str) -> None:
    def locate(mask: np.ndarray) -> str:
        return _locate(matrix, mask)

    bad = ~np.isfinite(values)
    if np.any(bad):
        raise ValueError(
            f"{field}: {int(bad.sum())} non-finite value(s) (NaN or Inf), first at {locate(bad)}"
        )
    negative = values < 0
    if np.any(negative):
        first = values[negative][0] if sp.issparse(matrix) else values[tuple(np.argwhere(negative)[0])]
        raise ValueError(
            f"{field}: {int(negative.sum())} negative value(s), first {float(first)} at {locate(negative)}; "
            "counts must be >= 0"
        )


def check_batch_labels(
    batch_labels: Any,
    n_cells: int,
    *,
    n_batches: int | Sequence[int] | None = None,
    field: str = "batch_labels",
) -> np.ndarray | Array:
    """Validate integer batch codes and return them as int32.

    **Arguments:**

    - `batch_labels`: shape `(n_cells,)`, or `(n_cells, n_covariates)` for several covariates (Harmony).
    - `n_cells`: the number of cells the labels must cover.
    - `n_batches`: the number of categories (one per covariate, or one for all); inferred as `max + 1` if None.
    - `field`: the name used in error messages.
    """
    if _is_traced(batch_labels):
        if batch_labels.shape[:1] != (n_cells,):
            raise ValueError(f"{field}: expected length {n_cells}, got shape {tuple(batch_labels.shape)}")
        return batch_labels
    labels = _as_numeric_array(batch_labels, field)
    if labels.ndim not in (1, 2):
        raise ValueError(
            f"{field}: expected shape (n_cells,) or (n_cells, n_covariates), got {tuple(labels.shape)}"
        )
    if labels.shape[0] != n_cells:
        raise ValueError(f"{field}: has length {labels.shape[0]} but there are {n_cells} cells")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{field}: expected integer codes, got dtype {labels.dtype}; convert categories to codes "
            "(diffbio_eqx.io.from_anndata does this for an obs column)"
        )
    columns = labels.reshape(n_cells, -1)
    n_covariates = columns.shape[1]
    if n_batches is None:
        limits = [int(columns[:, j].max()) + 1 if n_cells else 0 for j in range(n_covariates)]
    elif isinstance(n_batches, int):
        limits = [n_batches] * n_covariates
    else:
        limits = [int(n) for n in n_batches]
        if len(limits) != n_covariates:
            raise ValueError(f"{field}: {n_covariates} covariate column(s) but {len(limits)} batch counts")
    for j, limit in enumerate(limits):
        column = columns[:, j]
        bad = np.flatnonzero((column < 0) | (column >= limit))
        if bad.size:
            where = f" (covariate {j})" if n_covariates > 1 else ""
            raise ValueError(
                f"{field}{where}: value {int(column[bad[0]])} at cell {int(bad[0])} is out of range "
                f"[0, {limit}); {bad.size} cell(s) out of range"
            )
    return labels.astype(np.int32)


def check_ambient_profile(
    ambient_profile: Any, n_genes: int, *, field: str = "ambient_profile"
) -> np.ndarray | Array:
    """Validate an ambient RNA profile and return it normalised to sum to one (float32)."""
    if _is_traced(ambient_profile):
        if ambient_profile.shape != (n_genes,):
            raise ValueError(
                f"{field}: expected shape ({n_genes},), got {tuple(ambient_profile.shape)}"
            )
        return ambient_profile
    profile = _as_numeric_array(ambient_profile, field).astype(np.float64)
    if profile.ndim != 1 or profile.shape[0] != n_genes:
        raise ValueError(
            f"{field}: expected one value per gene, shape ({n_genes},), got {tuple(profile.shape)}"
        )
    bad = np.flatnonzero(~np.isfinite(profile))
    if bad.size:
        raise ValueError(f"{field}: non-finite value at gene {int(bad[0])}")
    negative = np.flatnonzero(profile < 0)
    if negative.size:
        raise ValueError(
            f"{field}: negative value {float(profile[negative[0]])} at gene {int(negative[0])}"
        )
    total = profile.sum()
    if total <= 0:
        raise ValueError(f"{field}: all zeros; an ambient profile needs some mass")
    return (profile / total).astype(np.float32)


def check_whole(value: Any, field: str, *, minimum: int = 1) -> int:
    """`value` as an int when it is a whole number (not a bool) of at least `minimum`, else a `ValueError`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field}: must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_numbers(value: Any, field: str, rule: str, holds: Callable[[np.ndarray], np.ndarray]) -> None:
    """A `ValueError` unless every number of a concrete `value` is finite and `holds` (a traced one, inside
    `jit`/`vmap`, is the caller's to check: its values are not known here). One pass, no copy of a float array."""
    if _is_traced(value):
        return
    try:
        array = np.asarray(value)
        array = array if array.dtype.kind == "f" else array.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: must be {rule}, got {value!r}") from None
    # isfinite first: a comparison with NaN is never true, so NaN fails either way, but say "finite" for it
    bad = np.asarray(~(np.isfinite(array) & holds(array)))  # an array even for a 0-d value
    if np.any(bad):
        raise ValueError(f"{field}: must be {rule}, got {_describe_bad(array, bad)}")


def _describe_bad(array: np.ndarray, bad: np.ndarray) -> str:
    """The values themselves when there are a few; else the first bad one, where it is, and how many there are."""
    if array.size <= 10:
        return str(array.tolist())
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{float(array[where])} at index {where[0] if len(where) == 1 else where} ({int(bad.sum())} in all)"


def check_positive(value: Any, field: str) -> None:
    """A `ValueError` unless a concrete `value` is finite and > 0 (a traced one is the caller's to check)."""
    check_numbers(value, field, "finite and > 0", lambda array: array > 0)


def check_nonnegative(value: Any, field: str) -> None:
    """A `ValueError` unless a concrete `value` is finite and >= 0 (standard deviations, rates that may be 0)."""
    check_numbers(value, field, "finite and >= 0", lambda array: array >= 0)


def check_finite(value: Any, field: str) -> None:
    """A `ValueError` unless a concrete `value` is finite (NaN or Inf would run through to garbage)."""
    check_numbers(value, field, "finite", lambda array: np.ones_like(array, dtype=bool))


def check_probability(value: Any, field: str) -> None:
    """A `ValueError` unless a concrete `value` lies in [0, 1]."""
    check_numbers(value, field, "in [0, 1]", lambda array: (array >= 0) & (array <= 1))


def checked_by(check: Callable[[dict[str, Any]], None]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a (jitted) entry point so that `check` sees its arguments by name, defaults filled in, before the
    call: the checks run on the caller's concrete values, outside any `jit`, on every call (inside a jit they
    would run once, at trace time, and see tracers). `check` leaves traced values alone (the `check_*` above do)."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(dict(bound.arguments))
            return function(*args, **kwargs)

        return checked

    return decorate


def check_n_clusters(n_cells: int, n_clusters: int, *, field: str = "n_clusters") -> None:
    """Raise unless `1 <= n_clusters <= n_cells`."""
    if n_clusters < 1:
        raise ValueError(f"{field}: must be >= 1, got {n_clusters}")
    if n_cells < n_clusters:
        raise ValueError(f"{field}: asked for {n_clusters} clusters but there are only {n_cells} cells")


def check_embedding(x: Any, *, field: str = "x", n_dims: int | None = None) -> np.ndarray | Array:
    """Validate a real `(n_cells, n_dims)` embedding (PCs, latent) and return it as a float array."""
    if _is_traced(x):
        if x.ndim != 2:
            raise ValueError(f"{field}: expected a 2-D matrix (n_cells, n_dims), got shape {x.shape}")
        return x
    array = _as_numeric_array(x, field)
    if array.ndim != 2:
        raise ValueError(f"{field}: expected a 2-D matrix (n_cells, n_dims), got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{field}: empty matrix of shape {tuple(array.shape)}")
    if n_dims is not None and array.shape[1] != n_dims:
        raise ValueError(f"{field}: has {array.shape[1]} dimensions, expected {n_dims}")
    bad = ~np.isfinite(array)
    if np.any(bad):
        cell, dim = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{field}: {int(bad.sum())} non-finite value(s), first at cell {cell}, dim {dim}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array
