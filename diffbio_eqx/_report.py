"""Figures and the markdown report of the main job (matplotlib, Agg backend: no display needed)."""

import importlib.metadata
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._core._checkpoint import atomic_path
from .pl import _draw_categories, _pyplot, _save_png, training


# The packages whose versions `diffbio-eqx info` prints and the run report lists.
VERSIONED = ("diffbio_eqx", "jax", "jaxlib", "equinox", "optax", "jaxtyping", "beartype", "numpy", "scipy", "anndata")


def package_versions() -> dict[str, str]:
    """The installed version of each package in `VERSIONED` ("not installed" where missing)."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def plot_embedding(
    path: str | pathlib.Path, embedding: np.ndarray, panels: Mapping[str, np.ndarray | Sequence[Any]], *,
    title: str = "",
) -> pathlib.Path:
    """Scatter `embedding` (n_cells, 2) once per panel, coloured by that panel's per-cell labels."""
    embedding = np.asarray(embedding)
    n_panels = max(len(panels), 1)
    figure, axes = _pyplot().subplots(1, n_panels, figsize=(5.2 * n_panels, 4.8), squeeze=False)
    for axis, (name, labels) in zip(axes[0], panels.items()):
        _draw_categories(axis, embedding, labels, name)
    if title:
        figure.suptitle(title)
    return _save_png(figure, path)


def plot_training(path: str | pathlib.Path, curves: Mapping[str, Mapping[str, np.ndarray]]) -> pathlib.Path:
    """One panel per stage, each with its loss curves (per epoch)."""
    return training(curves, path=path)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table from dict rows (columns from the first row)."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: str | pathlib.Path, text: str) -> pathlib.Path:
    target = pathlib.Path(path)
    with atomic_path(target) as temporary:
        temporary.write_text(text)
    return target


# --- the optional steps of the main job (doublet filter, imputation, annotation) ---------------------------------
def plot_doublet_scores(path: str | pathlib.Path, observed: np.ndarray, simulated: np.ndarray, threshold: float, *,
                        log_scale: bool = True) -> pathlib.Path:
    """Observed and simulated doublet scores side by side with the threshold (as `dbx.pl.scrublet_histogram`
    draws Scrublet's), for a detector whose call is a probability threshold (Solo)."""
    figure, axes = _pyplot().subplots(1, 2, figsize=(8, 3), squeeze=False)
    for axis, scores, title in ((axes[0][0], observed, "Observed transcriptomes"),
                                (axes[0][1], simulated, "Simulated doublets")):
        scores = np.asarray(scores, dtype=float)
        axis.hist(scores[np.isfinite(scores)], bins=np.linspace(0, 1, 50), color="gray", linewidth=0)
        if log_scale:
            axis.set_yscale("log")
        axis.axvline(float(threshold), color="black", linestyle="--")
        axis.set_title(title)
        axis.set_xlabel("Doublet score")
        axis.set_ylabel("cells")
    return _save_png(figure, path)


def score_histogram(observed: np.ndarray, simulated: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Rows of a histogram table over [0, 1]: the observed cells and the simulated doublets in each bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = [np.histogram(np.clip(np.asarray(s, float)[np.isfinite(s)], 0.0, 1.0), bins=edges)[0]
              for s in (observed, simulated)]
    return [{"doublet score": f"{edges[i]:.1f}-{edges[i + 1]:.1f}", "observed cells": int(counts[0][i]),
             "simulated doublets": int(counts[1][i])} for i in range(n_bins)]


def doublet_histogram(method: str, score: np.ndarray, scores_sim: np.ndarray, called: np.ndarray, *,
                      thresholds: str, threshold_method: str, figure: str) -> list[str]:
    """The report's doublet section: the rate called, the threshold, the score histogram (table and figure)."""
    n_cells, n_called = int(np.size(called)), int(np.sum(called))
    name = {"scrublet": "Scrublet (as scanpy.pp.scrublet)", "solo": "Solo (as scvi-tools SOLO)"}.get(method, method)
    return [
        "## Doublets",
        "",
        f"{name} on all {n_cells} input cells: **{n_called} called doublets ({100 * n_called / max(n_cells, 1):.1f} "
        f"%)**, threshold {thresholds} ({threshold_method}). They are left out of every stage of the pipeline and "
        "of the imputation and annotation; "
        "`result.h5ad` keeps all input cells, with `obs['doublet_score']` and `obs['predicted_doublet']`, and the "
        "pipeline's results missing (NaN) for the cells left out.",
        "",
        markdown_table(score_histogram(score, scores_sim)),
        "",
        f"![doublet scores]({figure})",
        "",
    ]


def imputation_lines(*, n_cells: int, n_genes: int, t: Any) -> list[str]:
    """The report's imputation section."""
    return [
        "## Imputation",
        "",
        f"MAGIC (magic-impute's defaults, `solver='exact'`; diffusion time t = {t}) of the {n_cells} cells the "
        f"pipeline fits, all {n_genes} genes: `layers['magic']` of `result.h5ad`, for plots and reading genes. "
        "The VAE still models the raw counts (imputed values are not counts).",
        "",
    ]


def annotation_lines(mode: str, predicted: np.ndarray, confidence: np.ndarray, *, reference_cells: int | None,
                     label_key: str | None, agreement: float | None) -> list[str]:
    """The report's annotation section: the source, then cells and median confidence per cell type."""
    source = ("marker genes (CellAssign)" if reference_cells is None
              else f"a reference of {reference_cells} cells labelled by obs[{label_key!r}]")
    types, inverse = np.unique(np.asarray(predicted, dtype=str), return_inverse=True)
    rows = [{"cell type": name, "cells": int(np.sum(inverse == i)),
             "median confidence": float(np.median(np.asarray(confidence)[inverse == i]))}
            for i, name in enumerate(types)]
    lines = ["## Annotation", "",
             f"Mode {mode} from {source}: `obs['cell_type']`, `obs['cell_type_confidence']` and "
             "`obsm['cell_type_probabilities']` of `result.h5ad`."]
    if agreement is not None:
        lines.append(f"Agreement with the input's own labels (the share of labelled cells given their label): "
                     f"{agreement:.3f}.")
    return [*lines, "", markdown_table(rows), ""]
