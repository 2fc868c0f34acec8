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
