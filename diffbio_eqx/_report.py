"""Figures and the markdown report of the main job (matplotlib, Agg backend: no display needed)."""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(figure: Any, path: str | pathlib.Path) -> pathlib.Path:
    figure.tight_layout()
    target = pathlib.Path(path)
    with atomic_path(target) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    _pyplot().close(figure)
    return target


def plot_embedding(
    path: str | pathlib.Path, embedding: np.ndarray, panels: Mapping[str, np.ndarray | Sequence[Any]], *,
    title: str = "",
) -> pathlib.Path:
    """Scatter `embedding` (n_cells, 2) once per panel, coloured by that panel's per-cell labels."""
    plt = _pyplot()
    embedding = np.asarray(embedding)
    n_panels = max(len(panels), 1)
    figure, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 4.8), squeeze=False)
    for axis, (name, labels) in zip(axes[0], panels.items()):
        labels = np.asarray([str(v) for v in labels])
        categories = sorted(set(labels), key=lambda v: (len(v), v))
        colours = plt.get_cmap("tab20" if len(categories) > 10 else "tab10")
        for i, category in enumerate(categories):
            mask = labels == category
            axis.scatter(embedding[mask, 0], embedding[mask, 1], s=4, color=colours(i % colours.N),
                         label=category, rasterized=True)
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel("UMAP 1")
        axis.set_ylabel("UMAP 2")
        if len(categories) <= 20:
            axis.legend(markerscale=3, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        figure.suptitle(title)
    return _save_png(figure, path)


def plot_training(path: str | pathlib.Path, curves: Mapping[str, Mapping[str, np.ndarray]]) -> pathlib.Path:
    """One panel per stage, each with its loss curves (per epoch)."""
    plt = _pyplot()
    n_panels = max(len(curves), 1)
    figure, axes = plt.subplots(1, n_panels, figsize=(4.5 * n_panels, 3.6), squeeze=False)
    for axis, (stage, stage_curves) in zip(axes[0], curves.items()):
        for name, values in stage_curves.items():
            values = np.asarray(values, dtype=float)
            epochs = np.flatnonzero(np.isfinite(values))
            if epochs.size:
                axis.plot(epochs + 1, values[epochs], label=name)
        axis.set_title(stage)
        axis.set_xlabel("round" if "objective" in stage_curves else "epoch")
        axis.set_ylabel("loss")
        axis.legend(fontsize=7)
    return _save_png(figure, path)


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
