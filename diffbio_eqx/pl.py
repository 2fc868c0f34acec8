"""Figures over AnnData and training curves (matplotlib with the Agg backend: no display needed).

`umap` draws an embedding coloured by an `obs` column or a gene (the operators add theirs: `scrublet_histogram`,
`pseudotime`, `fate_probabilities`, `ligand_receptor_dotplot`, `spatial`, `aligned_slices`, `volcano`,
`archetype_simplex`); `training` draws loss curves per stage (e.g.
`uns["diffbio_pipeline"]["curves"]` from `dbx.tl.pipeline`, or `PipelineFit.curves`). Given `path`, a figure is
written there as PNG (atomically) and the path is returned; otherwise the matplotlib object is returned.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._core._validate import check_whole
from .io import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(figure: Any, path: str | pathlib.Path, *, close: bool = True) -> pathlib.Path:
    figure.tight_layout()
    target = pathlib.Path(path)
    with atomic_path(target) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    if close:
        _pyplot().close(figure)
    return target


def _style_embedding_axis(axis: Any, title: str, basis_label: str) -> None:
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_xlabel(f"{basis_label} 1")
    axis.set_ylabel(f"{basis_label} 2")


def _draw_categories(axis: Any, embedding: np.ndarray, labels: np.ndarray | Sequence[Any], title: str = "", *,
                    basis_label: str = "UMAP") -> None:
    """Scatter `embedding` `(n_cells, 2)` on `axis`, one colour per category of `labels` (legend up to 20)."""
    plt = _pyplot()
    labels = np.asarray([str(v) for v in labels])
    categories = sorted(set(labels), key=lambda v: (len(v), v))
    colours = plt.get_cmap("tab20" if len(categories) > 10 else "tab10")
    for i, category in enumerate(categories):
        mask = labels == category
        axis.scatter(embedding[mask, 0], embedding[mask, 1], s=4, color=colours(i % colours.N), label=category,
                     rasterized=True)
    _style_embedding_axis(axis, title, basis_label)
    if len(categories) <= 20:
        axis.legend(markerscale=3, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _draw_values(axis: Any, embedding: np.ndarray, values: np.ndarray, title: str, basis_label: str) -> None:
    order = np.argsort(values, kind="stable")  # high values on top
    points = axis.scatter(embedding[order, 0], embedding[order, 1], s=4, c=values[order], cmap="viridis",
                          rasterized=True)
    axis.figure.colorbar(points, ax=axis, shrink=0.8)
    _style_embedding_axis(axis, title, basis_label)


def _basis(adata: ad.AnnData, basis: str) -> np.ndarray:
    """The first two columns of `obsm[basis]`, refused unless it has two."""
    if basis not in adata.obsm:
        raise ValueError(f"basis: {basis!r} is not in adata.obsm (has {sorted(adata.obsm.keys())}); run the tool "
                         "that writes it first (dbx.tl.umap for X_umap)")
    embedding = np.asarray(adata.obsm[basis])
    if embedding.ndim != 2 or embedding.shape[1] < 2:
        raise ValueError(f"basis: adata.obsm[{basis!r}] has shape {embedding.shape}; a plot needs two columns")
    return embedding[:, :2]


def _colour(adata: ad.AnnData, color: str | None) -> tuple[np.ndarray | None, bool]:
    """Per-cell values for `color` and whether they are continuous (numbers) rather than categories."""
    if color is None:
        return None, False
    if color in adata.obs.columns:
        column = adata.obs[color]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        return column.to_numpy(), bool(numeric and not isinstance(column.dtype, pd.CategoricalDtype))
    if color in adata.var_names:
        if not adata.var_names.is_unique and int(np.sum(adata.var_names == color)) > 1:
            raise ValueError(f"color: gene {color!r} appears more than once in adata.var_names "
                             "(adata.var_names_make_unique())")
        values: Any = adata[:, color].X
        values = values.toarray() if sp.issparse(values) else np.asarray(values)
        return values.ravel().astype(np.float64), True
    raise ValueError(f"color: {color!r} is neither a column of adata.obs (columns: {list(adata.obs.columns)}) "
                     "nor a gene of adata.var_names")


def umap(
    adata: ad.AnnData,
    color: str | None = None,
    *,
    basis: str = "X_umap",
    ax: Any = None,
    path: str | pathlib.Path | None = None,
    title: str | None = None,
) -> Any:
    """Scatter the cells in a 2-D embedding, coloured by an `obs` column or a gene's expression.

    **Arguments:**

    - `adata`: the cells, with `obsm[basis]` (e.g. from `dbx.tl.umap`).
    - `color`: an `obs` column (categories get a legend; numbers a colour bar) or a name in `adata.var_names`
      (its expression in `X`); None: one colour.
    - `basis`: the `obsm` key of the embedding; its first two columns are drawn. (Keyword only argument.)
    - `ax`: a matplotlib `Axes` to draw on; None makes a new figure.
    - `path`: write the figure there as PNG.
    - `title`: default the colour's name.

    **Returns:** the `Axes`, or the written path when `path` is given (a figure made here is then closed).
    """
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"adata: expected an anndata.AnnData, got {type(adata).__name__}")
    embedding = _basis(adata, basis)
    values, continuous = _colour(adata, color)
    created = ax is None
    axis = _pyplot().subplots(figsize=(5.2, 4.8))[1] if created else ax
    label = basis.removeprefix("X_").upper()
    title = (color or "") if title is None else title
    if continuous:
        _draw_values(axis, embedding, np.asarray(values, dtype=np.float64), title, label)
    else:
        _draw_categories(axis, embedding, values if values is not None else np.full(adata.n_obs, "cells"), title,
                        basis_label=label)
    if path is not None:
        return _save_png(axis.figure, path, close=created)
    return axis


def volcano(table: pd.DataFrame, *, lfc: str = "log2FoldChange", padj: str = "padj", alpha: float = 0.05,
            min_lfc: float = 1.0, ax: Any = None, path: str | pathlib.Path | None = None) -> Any:
    """Volcano plot of a DE table (e.g. `dbx.tl.pseudobulk_de`'s): log2 fold change against $-\\log_{10}$ adjusted
    p-value; genes with `padj < alpha` and `|lfc| >= min_lfc` in colour. Returns the axis (or the saved path)."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table: expected a pandas DataFrame (e.g. dbx.tl.pseudobulk_de's), got "
                         f"{type(table).__name__}")
    for argument, column in (("lfc", lfc), ("padj", padj)):
        if column not in table.columns:
            raise ValueError(f"{argument}: {column!r} is not a column of the table ({list(table.columns)})")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: must be in (0, 1), got {alpha}")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    x = table[lfc].to_numpy(dtype=float)
    y = -np.log10(np.clip(table[padj].to_numpy(dtype=float), 1e-300, 1.0))
    hit = (table[padj].to_numpy(dtype=float) < alpha) & (np.abs(x) >= min_lfc)
    ax.scatter(x[~hit], y[~hit], s=4, color="lightgray", rasterized=True)
    ax.scatter(x[hit], y[hit], s=6, color=np.where(x[hit] > 0, "firebrick", "steelblue"), rasterized=True)
    ax.axhline(-np.log10(alpha), color="black", linestyle="--", linewidth=0.6)
    ax.set_xlabel("log2 fold change")
    ax.set_ylabel("-log10 adjusted p-value")
    if path is not None:
        return _save_png(ax.figure, path, close=True)
    return ax


def archetype_simplex(adata: ad.AnnData, color: str | None = None, *, key: str = "archetypes", ax: Any = None,
                      path: str | pathlib.Path | None = None) -> Any:
    """Cells in the archetypes' simplex (`dbx.tl.archetypes`): each cell at the weighted sum of the corners of a
    regular polygon, one corner per archetype, coloured by an `obs` column."""
    if f"X_{key}" not in adata.obsm:
        raise ValueError(f"key: adata.obsm[{f'X_{key}'!r}] is missing; run dbx.tl.archetypes first")
    plt = _pyplot()
    weights = np.asarray(adata.obsm[f"X_{key}"])
    k = weights.shape[1]
    angles = np.pi / 2 + 2 * np.pi * np.arange(k) / k
    corners = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    points = weights @ corners
    if color is not None and color in adata.obs:
        _draw_categories(ax, points, adata.obs[color].to_numpy(), f"Archetypes ({k})", basis_label="simplex")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=4, color="gray", rasterized=True)
        _style_embedding_axis(ax, f"Archetypes ({k})", "simplex")
    ring = np.vstack([corners, corners[:1]])
    ax.plot(ring[:, 0], ring[:, 1], color="black", linewidth=0.8)
    for i, (cx, cy) in enumerate(corners):
        ax.annotate(f"A{i + 1}", (cx, cy), textcoords="offset points", xytext=(6 * cx, 6 * cy), ha="center")
    ax.set_aspect("equal")
    if path is not None:
        return _save_png(ax.figure, path, close=True)
    return ax


def spatial(adata: ad.AnnData, color: str | None = "spatial_domain", *, basis: str = "spatial", ax: Any = None,
            path: str | pathlib.Path | None = None, title: str | None = None) -> Any:
    """Spots in space (`obsm[basis]`, default `"spatial"`) coloured by an `obs` column (default the domains of
    `dbx.tl.spatial_domains`) or a gene; equal axes. Arguments and return as `umap`."""
    axis = umap(adata, color, basis=basis, ax=ax, title=title)
    axis.set_aspect("equal")
    if path is not None:
        return _save_png(axis.figure, path, close=ax is None)
    return axis


def aligned_slices(slices: Sequence[ad.AnnData], *, basis: str = "spatial_aligned", ax: Any = None,
                   path: str | pathlib.Path | None = None, title: str = "aligned slices") -> Any:
    """The slices overlaid in their aligned coordinates (`obsm[basis]` from `dbx.tl.align_slices`), one colour per
    slice. **Returns:** the `Axes`, or the written path when `path` is given."""
    if len(slices) == 0:
        raise ValueError("slices: no slices to draw")
    for i, s in enumerate(slices):
        if not isinstance(s, ad.AnnData) or basis not in s.obsm:
            raise ValueError(f"slices[{i}]: needs obsm[{basis!r}]; run dbx.tl.align_slices first")
    created = ax is None
    axis = _pyplot().subplots(figsize=(5.2, 4.8))[1] if created else ax
    points = np.concatenate([_basis(s, basis) for s in slices])
    labels = np.concatenate([np.full(s.n_obs, f"slice {i}") for i, s in enumerate(slices)])
    _draw_categories(axis, points, labels, title, basis_label="aligned")
    axis.set_aspect("equal")
    if path is not None:
        return _save_png(axis.figure, path, close=created)
    return axis


def ligand_receptor_dotplot(table: pd.DataFrame, *, top_n: int = 20, sources: Sequence[str] | None = None,
                            targets: Sequence[str] | None = None, path: str | pathlib.Path | None = None) -> Any:
    """Dot plot of the top interactions (LIANA's `li.pl.dotplot` layout): rows `ligand -> receptor`, columns
    `source -> target`, colour the score, dot size `-log10(p-value)` (all dots one size without p-values).

    **Arguments:**

    - `table`: what `tl.ligand_receptor` returns (columns `source`, `target`, `ligand_complex`,
      `receptor_complex`, `score`, `pvalue`).
    - `top_n`: the interactions with the highest score, as (ligand, receptor) pairs. (Keyword only argument.)
    - `sources`, `targets`: only these sender / receiver groups (LIANA's `source_labels`, `target_labels`).
    - `path`: write the figure there as PNG.

    **Returns:** the matplotlib `Figure`, or the written path when `path` is given.
    """
    check_whole(top_n, "top_n")
    missing = [c for c in ("source", "target", "ligand_complex", "receptor_complex", "score") if c not in table]
    if missing or len(table) == 0:
        raise ValueError(f"table: expected tl.ligand_receptor's non-empty table; missing columns {missing}")
    keep = np.ones(len(table), dtype=bool)
    if sources is not None:
        keep &= table["source"].astype(str).isin([str(s) for s in sources]).to_numpy()
    if targets is not None:
        keep &= table["target"].astype(str).isin([str(t) for t in targets]).to_numpy()
    if not keep.any():
        raise ValueError(f"sources: no interaction from {sources} to {targets} in the table")
    table = pd.DataFrame(table[keep]).reset_index(drop=True)
    pair = table["ligand_complex"].astype(str) + " -> " + table["receptor_complex"].astype(str)
    groups = table["source"].astype(str) + " -> " + table["target"].astype(str)
    top = list(dict.fromkeys(pair[np.argsort(-table["score"].to_numpy(), kind="stable")]))[:top_n]
    shown = table[pair.isin(top)]
    rows = {name: i for i, name in enumerate(top)}
    columns = {name: i for i, name in enumerate(sorted(set(groups[shown.index])))}
    pvalues = np.asarray(shown["pvalue"], dtype=float) if "pvalue" in shown else np.full(len(shown), np.nan)
    size = np.where(np.isfinite(pvalues), -np.log10(np.maximum(pvalues, 1e-3)) * 25 + 5, 30)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(2 + 0.35 * len(columns), 1.5 + 0.3 * len(rows)))
    dots = axis.scatter([columns[g] for g in groups[shown.index]], [rows[p] for p in pair[shown.index]], s=size,
                        c=np.asarray(shown["score"], dtype=float), cmap="viridis")
    axis.set_xticks(range(len(columns)), list(columns), rotation=90, fontsize=7)
    axis.set_yticks(range(len(rows)), list(rows), fontsize=7)
    axis.invert_yaxis()
    figure.colorbar(dots, ax=axis, label="score")
    axis.set_title("dot size: -log10(p-value)", fontsize=8)
    if path is not None:
        return _save_png(figure, path)
    return figure


_FEW_POINTS = 10  # curves with this many points or fewer are drawn with markers


def pseudotime(adata: ad.AnnData, key: str = "dpt_pseudotime", *, basis: str = "X_umap", ax: Any = None,
               path: str | pathlib.Path | None = None) -> Any:
    """Pseudotime (`obs[key]`, e.g. from `dbx.tl.dpt`) on the embedding `obsm[basis]`, the root marked; cells with
    infinite pseudotime (outside the root's component) in grey. Returns the `Axes`, or the path when `path` is
    given."""
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"adata: expected an anndata.AnnData, got {type(adata).__name__}")
    if key not in adata.obs.columns:
        raise ValueError(f"key: {key!r} is not in adata.obs; run dbx.tl.dpt first")
    embedding = _basis(adata, basis)
    values = np.asarray(adata.obs[key], dtype=np.float64)
    root = int(adata.uns["iroot"]) if "iroot" in adata.uns else None
    if root is not None and not 0 <= root < adata.n_obs:
        raise ValueError(f"adata.uns['iroot']: {root} is not a cell index (there are {adata.n_obs} cells)")
    finite = np.isfinite(values)
    created = ax is None
    axis = _pyplot().subplots(figsize=(5.2, 4.8))[1] if created else ax
    axis.scatter(embedding[~finite, 0], embedding[~finite, 1], s=4, color="lightgrey", rasterized=True)
    _draw_values(axis, embedding[finite], values[finite], key, basis.removeprefix("X_").upper())
    if root is not None:
        axis.scatter(embedding[root, 0], embedding[root, 1], s=60, marker="*", color="red", label="root")
        axis.legend(fontsize=6, frameon=False)
    if path is not None:
        return _save_png(axis.figure, path, close=created)
    return axis


def fate_probabilities(adata: ad.AnnData, *, basis: str = "X_umap", key: str = "fate_probabilities",
                       path: str | pathlib.Path | None = None) -> Any:
    """One panel per terminal state: each cell's probability (`obsm[key]`, names in `uns[key]["names"]`, from
    `dbx.tl.fate_probabilities`) on the embedding `obsm[basis]`. Returns the figure, or the path when `path` is
    given."""
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"adata: expected an anndata.AnnData, got {type(adata).__name__}")
    if key not in adata.obsm or key not in adata.uns:
        raise ValueError(f"key: {key!r} is not in adata.obsm and adata.uns; run dbx.tl.fate_probabilities first")
    embedding = _basis(adata, basis)
    probabilities = np.asarray(adata.obsm[key])
    names = list(adata.uns[key].get("names", [])) if isinstance(adata.uns[key], Mapping) else []
    if not names or probabilities.ndim != 2 or len(names) != probabilities.shape[1]:
        raise ValueError(f"key: adata.uns[{key!r}]['names'] must name each of the {probabilities.shape[-1]} columns "
                         f"of adata.obsm[{key!r}], got {names}; run dbx.tl.fate_probabilities again")
    figure, axes = _pyplot().subplots(1, len(names), figsize=(4.4 * len(names), 4.0), squeeze=False)
    for k, (axis, name) in enumerate(zip(axes[0], names)):
        _draw_values(axis, embedding, probabilities[:, k], f"fate: {name}", basis.removeprefix("X_").upper())
    if path is not None:
        return _save_png(figure, path)
    return figure


def training(curves: Mapping[str, Mapping[str, Any]], path: str | pathlib.Path | None = None) -> Any:
    """Loss curves, one panel per stage.

    **Arguments:**

    - `curves`: `{stage: {curve name: per-epoch values}}` (non-finite values are skipped; a curve of up to 10
      points is drawn with markers, so a single point shows), e.g.
      `PipelineFit.curves` or `adata.uns["diffbio_pipeline"]["curves"]`.
    - `path`: write the figure there as PNG.

    **Returns:** the matplotlib `Figure`, or the written path when `path` is given (the figure is then closed).
    """
    if not isinstance(curves, Mapping) or not all(isinstance(c, Mapping) for c in curves.values()):
        raise ValueError("curves: expected {stage: {curve name: per-epoch values}}, e.g. PipelineFit.curves")
    for stage, stage_curves in curves.items():
        for name, values in stage_curves.items():
            if np.ndim(values) != 1:
                raise ValueError(f"curves[{stage!r}][{name!r}]: expected one value per epoch (1-D), got shape "
                                 f"{np.shape(values)}")
    plt = _pyplot()
    n_panels = max(len(curves), 1)
    figure, axes = plt.subplots(1, n_panels, figsize=(4.5 * n_panels, 3.6), squeeze=False)
    for axis, (stage, stage_curves) in zip(axes[0], curves.items()):
        for name, values in stage_curves.items():
            values = np.asarray(values, dtype=float)
            epochs = np.flatnonzero(np.isfinite(values))
            if epochs.size:  # markers on short curves: a single point (one Harmony round) has no line to see
                axis.plot(epochs + 1, values[epochs], label=name, marker="o" if epochs.size <= _FEW_POINTS else "")
        axis.set_title(stage)
        axis.set_xlabel("round" if "objective" in stage_curves else "epoch")
        axis.set_ylabel("loss")
        axis.legend(fontsize=7)
    if path is not None:
        return _save_png(figure, path)
    return figure


def scrublet_histogram(adata: ad.AnnData, path: str | pathlib.Path | None = None, *, log_scale: bool = True
                       ) -> Any:
    """Scrublet's score histograms (as `Scrublet.plot_histogram` and `scanpy.pl.scrublet_score_distribution`):
    observed cells and simulated doublets side by side, the threshold as a vertical line; one row per batch
    after `dbx.pp.scrublet(..., batch_key=...)`.

    **Arguments:** `adata` after `dbx.pp.scrublet`; `path`: write the figure there as PNG; `log_scale`: log
    y axis (Scrublet's default).

    **Returns:** the matplotlib `Figure`, or the written path when `path` is given.
    """
    record = adata.uns.get("scrublet")
    if record is None or "doublet_score" not in adata.obs.columns:
        raise ValueError("adata.uns['scrublet'] and adata.obs['doublet_score']: missing; run dbx.pp.scrublet first")
    runs = record["batches"].values() if "batches" in record else [record]
    if any("doublet_scores_sim" not in run for run in runs):
        raise ValueError("adata.uns['scrublet']: has no 'doublet_scores_sim'; run dbx.pp.scrublet again")
    if "batches" in record:
        batch_key = record["batched_by"]
        rows = [(str(name), adata.obs["doublet_score"].to_numpy()[adata.obs[batch_key].astype(str) == str(name)],
                 batch) for name, batch in record["batches"].items()]
    else:
        rows = [("", adata.obs["doublet_score"].to_numpy(), record)]
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 2, figsize=(8, 3 * len(rows)), squeeze=False)
    for (name, observed, batch), pair in zip(rows, axes):
        for axis, scores, title in ((pair[0], observed, "Observed transcriptomes"),
                                    (pair[1], np.asarray(batch["doublet_scores_sim"]), "Simulated doublets")):
            scores = np.asarray(scores, dtype=float)
            axis.hist(scores[np.isfinite(scores)], bins=np.linspace(0, 1, 50), color="gray", linewidth=0)
            if log_scale:
                axis.set_yscale("log")
            if batch.get("threshold") is not None:
                axis.axvline(float(batch["threshold"]), color="black", linestyle="--")
            axis.set_title(f"{title} {name}".strip())
            axis.set_xlabel("Doublet score")
            axis.set_ylabel("cells")
    if path is not None:
        return _save_png(figure, path)
    return figure
