"""One entry point over the three annotators, on arrays: what `dbx.tl.annotate` and `diffbio-eqx annotate` call."""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax.random as jr
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jaxtyping import PRNGKeyArray

from .._vae._stage import VAENormalizer, fit_vae
from ._cellassign import cellassign_data, cellassign_probabilities, fit_cellassign, init_cellassign
from ._celltypist import predict_celltypist, query_columns, train_celltypist
from ._scanvi import fit_scanvi, label_codes, scanvi_from_vae, scanvi_probabilities


Mode = Literal["celltypist", "cellassign", "scanvi"]
MODES = ("celltypist", "cellassign", "scanvi")


@dataclasses.dataclass(frozen=True)
class Annotation:
    """Per query cell: `labels` (names), `confidence` (the probability of the label), `probabilities`
    `(n_cells, n_types)` over `cell_types`; `model` the fitted model."""

    labels: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray
    cell_types: tuple[str, ...]
    model: Any


@dataclasses.dataclass(frozen=True)
class Reference:
    """Labelled reference cells: raw `counts`, gene names `genes`, `labels` (names; missing values allowed for
    scANVI only)."""

    counts: Any
    genes: Sequence[str]
    labels: Any


def _finish(probabilities: Any, cell_types: Sequence[str], model: Any, codes: Any = None) -> Annotation:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    codes = probabilities.argmax(axis=1) if codes is None else np.asarray(codes)
    types = tuple(str(c) for c in cell_types)
    labels = np.asarray(types, dtype=object)[codes]
    confidence = probabilities[np.arange(len(codes)), codes]
    return Annotation(labels, confidence, probabilities, types, model)


def _celltypist(counts: Any, genes: Any, reference: Reference, *, key: PRNGKeyArray,
                options: dict[str, Any]) -> Annotation:
    train = {name: options.pop(name) for name in ("C", "multi_class", "feature_selection", "top_genes")
             if name in options}
    model = train_celltypist(reference.counts, reference.labels, reference.genes, **train)
    prediction = predict_celltypist(model, counts, genes, key=key, **options)
    codes = prediction.labels if prediction.majority is None else prediction.majority
    return _finish(prediction.probabilities, model.cell_types, model, codes)


def _scanvi(counts: Any, genes: Any, reference: Reference, *, key: PRNGKeyArray,
            options: dict[str, Any]) -> Annotation:
    """Reference and query together (the reference's genes, matched by name in the query), one batch each;
    the query's labels unknown."""
    query_cols, kept = query_columns(reference.genes, genes)
    ref_counts = reference.counts[:, kept] if sp.issparse(reference.counts) else np.asarray(reference.counts)[:, kept]
    query = counts[:, query_cols] if sp.issparse(counts) else np.asarray(counts)[:, query_cols]
    stack: Any = sp.vstack([sp.csr_matrix(ref_counts), sp.csr_matrix(query)], format="csr")
    n_ref = ref_counts.shape[0]
    batches = np.r_[np.zeros(n_ref, np.int32), np.ones(query.shape[0], np.int32)]
    known = pd.Series(np.asarray(reference.labels, dtype=object)).dropna().astype(str)
    types = sorted(known.unique())
    codes = np.r_[label_codes(np.asarray(reference.labels, dtype=object), types), -np.ones(query.shape[0], np.int32)]
    init_key, vae_key, scanvi_key, fit_key = jr.split(key, 4)
    vae_settings = options.pop("vae_settings", None)
    settings = options.pop("settings", None)
    if options:
        raise ValueError(f"{sorted(options)[0]}: not an option of mode 'scanvi'")
    vae = VAENormalizer(stack.shape[1], 2, genes=[str(reference.genes[i]) for i in kept], key=init_key)
    vae = fit_vae(vae, stack, batches, key=vae_key, settings=vae_settings).model
    fitted = fit_scanvi(scanvi_from_vae(vae, types, key=scanvi_key), stack, batches, codes, key=fit_key,
                        settings=settings).model
    probabilities = scanvi_probabilities(fitted, stack[n_ref:], batches[n_ref:])
    return _finish(probabilities, types, fitted)


def _cellassign(counts: Any, genes: Any, *, key: PRNGKeyArray, options: dict[str, Any]) -> Annotation:
    markers = options.pop("markers", None)
    if markers is None:
        raise ValueError("markers: mode 'cellassign' needs a marker matrix (genes x cell types) or a dict of lists")
    if isinstance(markers, dict):
        names = sorted({str(g) for values in markers.values() for g in values})
        frame = pd.DataFrame(0, index=pd.Index(names), columns=pd.Index([str(t) for t in markers]))
        for cell_type, values in markers.items():
            frame.loc[[str(g) for g in values], str(cell_type)] = 1
        markers = frame
    settings = options.pop("settings", None)
    data = cellassign_data(counts, genes, markers, **options)
    init_key, fit_key = jr.split(key)
    fitted = fit_cellassign(init_cellassign(data, key=init_key), data, key=fit_key, settings=settings).model
    return _finish(cellassign_probabilities(fitted, data), data.cell_types, fitted)


def annotate_counts(
    counts: Any,
    genes: Any,
    *,
    mode: str = "celltypist",
    reference: Reference | None = None,
    key: PRNGKeyArray,
    **options: Any,
) -> Annotation:
    """Annotate query cells given as raw counts.

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` raw counts of the query (dense or SciPy sparse); `genes` their names.
    - `mode`: `"celltypist"` (logistic regression on the reference), `"scanvi"` (the VAE with labels on reference
      and query together) or `"cellassign"` (marker genes; no reference). (Keyword only argument.)
    - `reference`: the labelled reference (`Reference`), for `"celltypist"` and `"scanvi"`.
    - `key`: PRNG key.
    - `options`: per mode: `"celltypist"`: `C`, `multi_class`, `feature_selection`, `top_genes` (training) and
      `majority_voting`, `over_clustering` (prediction); `"scanvi"`: `vae_settings`, `settings` (`TrainSettings`
      of the VAE and of scANVI); `"cellassign"`: `markers` (a genes x types 0/1 DataFrame, or a dict of type ->
      marker genes), `size_factor`, `design`, `other`, `settings`.

    **Returns:** an `Annotation`.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    options = dict(options)
    if mode == "cellassign":
        return _cellassign(counts, genes, key=key, options=options)
    if reference is None:
        raise ValueError(f"reference: mode {mode!r} needs labelled reference cells")
    if mode == "celltypist":
        return _celltypist(counts, genes, reference, key=key, options=options)
    return _scanvi(counts, genes, reference, key=key, options=options)

