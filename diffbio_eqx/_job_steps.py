"""The main job's optional steps around the pipeline (`diffbio-eqx run --doublets --impute --reference`).

- **Doublet filter** (`dbx.pp.scrublet` or `dbx.pp.solo` on all input cells, before any stage): the cells called
  doublets are left out of every stage the pipeline fits; `result.h5ad` keeps every input cell, with
  `obs["doublet_score"]` and `obs["predicted_doublet"]` for all of them and the pipeline's results (embeddings,
  clusters, layers) missing (NaN) for the cells left out.
- **Imputation** (`dbx.pp.magic` on the kept cells): written as `layers["magic"]` of the result, for plots and
  gene-level reading; the VAE still models the raw counts (MAGIC's smoothed values are not counts).
- **Annotation** (`dbx.tl.annotate` of the kept cells from a labelled reference, or from marker genes):
  `obs["cell_type"]`, `obs["cell_type_confidence"]`, `obsm["cell_type_probabilities"]`.

Every setting is checked, and the reference and marker files read, before any numerical work.
"""

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import io, pl, pp, tl
from ._annotation._annotate import MODES as ANNOTATION_MODES
from ._core._train import TrainSettings
from ._report import annotation_lines, doublet_histogram, imputation_lines, plot_doublet_scores


DOUBLET_METHODS = ("scrublet", "solo", "none")
IMPUTATION_METHODS = ("magic", "none")
# Keys of the steps, folded into the job's seed: the pipeline's own keys stay those of a run without the steps.
_DOUBLET_STREAM, _IMPUTATION_STREAM, _ANNOTATION_STREAM = 15, 16, 18


@dataclasses.dataclass(frozen=True)
class JobSteps:
    """The main job's optional steps (the command line's `--doublets`, `--impute`, `--reference`,
    `--annotation-mode`, `--markers`, `--solo-epochs`).

    - `doublets`: `"scrublet"`, `"solo"` or `"none"`; None: the config's `doublet_filter` (default `"none"`).
    - `impute`: `"magic"` or `"none"`; None: the config's `imputation` (default `"none"`).
    - `reference`: an h5ad file of labelled reference cells (raw counts in `X`); its labels are the job's
      `label_key` column.
    - `annotation_mode`: `"celltypist"` (the default with a reference), `"scanvi"` or `"cellassign"`.
    - `markers`: for `"cellassign"`: a CSV (marker genes x cell types, 0/1) or JSON (`{type: [genes]}`) file.
    - `solo_epochs`: the most epochs of Solo's classifier (default: SOLO's 400, with early stopping).
    - `batch_correction`: `"harmony"`, `"mmd"`, `"adversarial"` or `"none"` (`--batch-correction`); None: the
      config's `batch_correction` (default `"harmony"`).
    """

    doublets: str | None = None
    impute: str | None = None
    reference: str | os.PathLike[str] | None = None
    annotation_mode: str | None = None
    markers: str | os.PathLike[str] | None = None
    solo_epochs: int | None = None
    batch_correction: str | None = None


@dataclasses.dataclass(frozen=True)
class Annotator:
    """A checked annotation request: the mode, the reference cells (or None) and their label column, the markers."""

    mode: str
    reference: ad.AnnData | None
    label_key: str | None
    markers: Any


def _read_markers(path: str | os.PathLike[str]) -> Any:
    source = pathlib.Path(path)
    if not source.is_file():
        raise ValueError(f"--markers: {str(source)!r} does not exist")
    if source.suffix == ".json":
        try:
            markers = json.loads(source.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--markers: {str(source)!r} could not be parsed ({error})") from None
        if not isinstance(markers, dict) or not markers:
            raise ValueError(f"--markers: {str(source)!r} must hold {{cell type: [marker genes]}}")
        return markers
    return pd.read_csv(source, index_col=0)


def check_steps(steps: JobSteps, label_key: str | None, *, mode_flag: str = "--annotation-mode") -> Annotator | None:
    """Check the step settings and read the reference and marker files; raises a ValueError naming the flag
    (`mode_flag`: the one that sets the annotation mode). Returns the annotation request, or None when the job does
    not annotate."""
    if steps.doublets is not None and steps.doublets not in DOUBLET_METHODS:
        raise ValueError(f"--doublets: must be one of {', '.join(DOUBLET_METHODS)}, got {steps.doublets!r}")
    if steps.impute is not None and steps.impute not in IMPUTATION_METHODS:
        raise ValueError(f"--impute: must be one of {', '.join(IMPUTATION_METHODS)}, got {steps.impute!r}")
    if steps.solo_epochs is not None and steps.solo_epochs < 1:
        raise ValueError(f"--solo-epochs: must be >= 1, got {steps.solo_epochs}")
    mode = steps.annotation_mode
    if mode is not None and mode not in ANNOTATION_MODES:
        raise ValueError(f"{mode_flag}: must be one of {', '.join(ANNOTATION_MODES)}, got {mode!r}")
    if steps.reference is None and steps.markers is None:
        if mode is not None:
            raise ValueError(f"{mode_flag}: {mode!r} needs "
                             f"{'--markers' if mode == 'cellassign' else '--reference and --label-key'}")
        return None
    mode = mode or ("cellassign" if steps.reference is None else "celltypist")
    if mode == "cellassign" and steps.markers is None:
        raise ValueError("--markers: annotation mode 'cellassign' needs marker genes (a CSV of 0/1, marker genes x "
                         "cell types, or a JSON file {cell type: [genes]})")
    if mode != "cellassign" and steps.markers is not None:
        raise ValueError(f"--markers: only for {mode_flag} cellassign (the mode is {mode!r})")
    if mode != "cellassign" and steps.reference is None:
        raise ValueError(f"--reference: annotation mode {mode!r} needs a labelled reference h5ad file")
    reference = None
    if steps.reference is not None:
        if label_key is None:
            raise ValueError("--label-key: --reference needs the reference's obs column of cell types")
        if not pathlib.Path(steps.reference).is_file():
            raise ValueError(f"--reference: {str(steps.reference)!r} does not exist or is not a file")
        reference = io.read_h5ad(steps.reference)
        if label_key not in reference.obs.columns:
            raise ValueError(f"--label-key: {label_key!r} is not a column of the reference's obs ({steps.reference}; "
                             f"columns: {list(reference.obs.columns)})")
        if not bool(np.asarray(reference.obs[label_key].notna()).any()):
            raise ValueError(f"--label-key: the reference's obs[{label_key!r}] has no values")
        message = io.not_counts(reference)
        if message is not None:
            raise ValueError(f"--reference: {message}; the reference needs raw counts in X")
    markers = None if steps.markers is None else _read_markers(steps.markers)
    return Annotator(mode, reference, label_key if reference is not None else None, markers)


def check_reference_genes(annotator: Annotator | None, genes: tuple[str, ...]) -> None:
    """Refuse a reference that shares no gene with the cells (before any numerical work)."""
    if annotator is None or annotator.reference is None:
        return
    shared = len(set(map(str, annotator.reference.var_names)) & set(genes))
    if shared == 0:
        raise ValueError(f"--reference: none of its {annotator.reference.n_vars} genes is among the input's "
                         f"{len(genes)} (first: {', '.join(map(str, annotator.reference.var_names[:3]))} vs "
                         f"{', '.join(genes[:3])}); check --gene-key")


def _cells(counts: Any, genes: tuple[str, ...], obs_names: Any, obs: pd.DataFrame | None = None) -> ad.AnnData:
    """A counts-only AnnData of the job's counts (wherever the input held them), for the `pp` / `tl` faces."""
    matrix = counts if sp.issparse(counts) else np.asarray(counts)
    frame = pd.DataFrame(index=pd.Index(list(map(str, obs_names)))) if obs is None else obs.copy()
    frame.index = pd.Index(list(map(str, obs_names)))
    return ad.AnnData(matrix, obs=frame, var=pd.DataFrame(index=pd.Index(list(genes))))


@dataclasses.dataclass(frozen=True)
class DoubletCall:
    """The doublet filter's call on every input cell."""

    method: str
    score: np.ndarray
    called: np.ndarray
    scores_sim: np.ndarray
    thresholds: dict[str, float]  # per batch ("" without batches)
    threshold_method: str
    record_key: str  # where the face's settings are in uns ("scrublet" or "solo")
    record: dict[str, Any]
    seconds: float
    figure: ad.AnnData  # the cells with the face's keys, for the histogram

    @property
    def kept(self) -> np.ndarray:
        return ~self.called


def call_doublets(method: str, counts: Any, genes: tuple[str, ...], obs_names: Any, batches: np.ndarray | None, *,
                  seed: int, vae_epochs: int | None, solo_epochs: int | None, progress: bool) -> DoubletCall | None:
    """Scrublet (within each batch when `batches` is given, as scanpy) or Solo on every input cell."""
    if method == "none":
        return None
    key = jr.fold_in(jr.key(seed), _DOUBLET_STREAM)
    obs = None if batches is None else pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    cells = _cells(counts, genes, obs_names, obs)
    started = time.perf_counter()
    if method == "scrublet":
        pp.scrublet(cells, key=key, batch_key=None if batches is None else "batch")
        record = cells.uns["scrublet"]
        runs = record["batches"] if "batches" in record else {"": record}
        scores_sim = np.concatenate([np.asarray(run["doublet_scores_sim"], float) for run in runs.values()])
        thresholds = {name: float(run["threshold"]) for name, run in runs.items()}
        threshold_method = ", ".join(sorted({str(run["threshold_method"]) for run in runs.values()}))
    else:
        pp.solo(cells, key=key, vae_settings=TrainSettings(n_epochs=vae_epochs, progress=progress),
                settings=TrainSettings(n_epochs=solo_epochs, progress=progress))
        record = cells.uns["solo"]
        scores_sim = np.asarray(record["doublet_scores_sim"], float)
        thresholds, threshold_method = {"": 0.5}, "SOLO.predict(soft=False): doublet probability above it"
    seconds = time.perf_counter() - started
    return DoubletCall(method, np.asarray(cells.obs["doublet_score"], dtype=float),
                       np.asarray(cells.obs["predicted_doublet"], dtype=bool), scores_sim, thresholds, threshold_method,
                       method, record, seconds, cells)


#: What the pipeline writes per cell (`io.to_anndata`): a doublet-filtered result replaces the input's own.
PIPELINE_KEYS = frozenset({*io.OBSM_KEYS.values(), *io.LAYER_KEYS.values(), io.CLUSTER_KEY,
                           f"{io.CLUSTER_KEY}_probabilities"})


@dataclasses.dataclass
class StepsDone:
    """What the steps wrote (into the kept cells' AnnData) and what the report says about them."""

    doublets: DoubletCall | None = None
    input_cells: ad.AnnData | None = None  # every input cell, with the doublet columns (with a doublet filter)
    imputation: str = "none"
    annotator: Annotator | None = None
    stage_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the report's time per stage
    # obs / obsm / layers names the job writes: replaced where the input has them too (the pipeline's from the start)
    written: set[str] = dataclasses.field(default_factory=lambda: set(PIPELINE_KEYS))
    sections: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def timed(self, stage: str, seconds: float, n_cells: int) -> None:
        self.stage_rows.append({"stage": stage, "seconds": seconds, "cells/s": n_cells / max(seconds, 1e-9)})

    def mark_doublets(self, adata: ad.AnnData) -> None:
        """Write the call into `adata` (every input cell): `obs["doublet_score"]`, `obs["predicted_doublet"]`,
        the face's `uns` record."""
        if self.doublets is None:
            return
        adata.obs["doublet_score"] = self.doublets.score
        adata.obs["predicted_doublet"] = self.doublets.called
        adata.uns[self.doublets.record_key] = self.doublets.record
        self.input_cells = adata

    def expand(self, result: ad.AnnData) -> ad.AnnData:
        """`result` (the kept cells) as every input cell: the pipeline's and the steps' per-cell results missing
        (NaN; a missing category) for the cells the doublet filter left out."""
        if self.doublets is None or self.input_cells is None:
            return result
        kept = self.doublets.kept
        out = self.input_cells.copy()
        out.uns.update(result.uns)
        for name in result.obs.columns:
            if name in out.obs.columns and name not in self.written:
                continue
            column = result.obs[name]
            if isinstance(column.dtype, pd.CategoricalDtype):
                codes = np.full(out.n_obs, -1, dtype=np.int64)
                codes[kept] = column.cat.codes.to_numpy()
                out.obs[name] = pd.Categorical.from_codes(codes, categories=column.cat.categories)
            else:
                values = np.full(out.n_obs, np.nan)
                values[kept] = np.asarray(column, dtype=float)
                out.obs[name] = values
        parts = ((out.obsm, result.obsm, list(result.obsm.keys())), (out.layers, result.layers, io.layer_names(result)))
        for store, source, names in parts:
            for name in names:
                if name in store and name not in self.written:
                    continue
                value: Any = source[name]
                values = np.asarray(value.toarray() if sp.issparse(value) else value)
                full = np.full((out.n_obs, *values.shape[1:]), np.nan, dtype=np.float32)
                full[kept] = values
                store[name] = full
        return out

    def expand_stream(self, stream: Any) -> Any:
        """`ChunkedOutput.stream` (blocks of the kept cells' rows) as blocks of every input cell's rows: each
        block split where the kept rows are not consecutive, then NaN rows for the cells left out."""
        if stream is None or self.doublets is None:
            return stream
        kept_rows, left_out = np.flatnonzero(self.doublets.kept), np.flatnonzero(self.doublets.called)

        def runs(rows: np.ndarray) -> list[tuple[int, int]]:
            bounds = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), rows.size]
            return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

        def expanded() -> Any:
            shapes: dict[str, int] = {}
            for start, chunk in stream():
                n_rows = next(iter(chunk.values())).shape[0]
                rows = kept_rows[start:start + n_rows]
                shapes |= {name: values.shape[1] for name, values in chunk.items()}
                for a, b in runs(rows):
                    yield int(rows[a]), {name: values[a:b] for name, values in chunk.items()}
            for a, b in runs(left_out):
                yield int(left_out[a]), {name: np.full((b - a, n), np.nan, np.float32) for name, n in shapes.items()}

        return expanded


def filter_doublets(call: DoubletCall | None, done: StepsDone, out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """The report's doublet section and figure (`doublets.png`); raises when too few cells are left."""
    if call is None:
        return {}
    done.doublets = call
    n_cells, n_called = call.called.size, int(call.called.sum())
    if n_cells - n_called < 3:
        raise ValueError(f"--doublets: {call.method} called {n_called} of {n_cells} cells doublets; too few cells "
                         "are left for the pipeline")
    done.timed(f"doublet filter ({call.method})", call.seconds, n_cells)
    done.metrics["doublet rate called"] = n_called / n_cells
    if call.method == "scrublet":
        figure = pl.scrublet_histogram(call.figure, out_dir / "doublets.png")
    else:
        figure = plot_doublet_scores(out_dir / "doublets.png", call.score, call.scores_sim, 0.5)
    thresholds = ", ".join(f"{name + ': ' if name else ''}{value:.3g}" for name, value in call.thresholds.items())
    done.sections += doublet_histogram(call.method, call.score, call.scores_sim, call.called,
                                       thresholds=thresholds, threshold_method=call.threshold_method,
                                       figure=figure.name)
    return {"doublets": figure}


def impute(method: str, adata: ad.AnnData, counts: Any, genes: tuple[str, ...], done: StepsDone, *,
           seed: int) -> None:
    """MAGIC of the kept cells into `adata.layers["magic"]` and `adata.uns["diffbio_magic"]`."""
    done.imputation = method
    if method == "none":
        return
    cells = _cells(counts, genes, adata.obs_names)
    started = time.perf_counter()
    result = pp.magic(cells, key=jr.fold_in(jr.key(seed), _IMPUTATION_STREAM))
    done.timed("imputation (MAGIC)", time.perf_counter() - started, adata.n_obs)
    adata.layers["magic"] = cells.layers["magic"]
    done.written.add("magic")
    adata.uns["diffbio_magic"] = cells.uns["diffbio_magic"]
    done.sections += imputation_lines(n_cells=adata.n_obs, n_genes=adata.n_vars, t=result.t)


def annotate(annotator: Annotator | None, adata: ad.AnnData, counts: Any, genes: tuple[str, ...], done: StepsDone,
             *, labels: np.ndarray | None, known: np.ndarray | None, seed: int, vae_epochs: int | None,
             progress: bool) -> None:
    """Annotate the kept cells into `adata` (`obs["cell_type"]`, `obs["cell_type_confidence"]`,
    `obsm["cell_type_probabilities"]`, `uns["cell_type"]`); with the query's own labels, their agreement."""
    done.annotator = annotator
    if annotator is None:
        return
    cells = _cells(counts, genes, adata.obs_names)
    options: dict[str, Any] = {}
    if annotator.mode == "cellassign":
        options["markers"] = annotator.markers
        options["settings"] = TrainSettings(progress=progress)
    elif annotator.mode == "scanvi":
        options["vae_settings"] = TrainSettings(n_epochs=vae_epochs, progress=progress)
        options["settings"] = TrainSettings(progress=progress)
    started = time.perf_counter()
    tl.annotate(cells, annotator.mode, reference=annotator.reference, label_key=annotator.label_key,
                key=jr.fold_in(jr.key(seed), _ANNOTATION_STREAM), **options)
    done.timed(f"annotation ({annotator.mode})", time.perf_counter() - started, adata.n_obs)
    replaced = [name for name in ("cell_type", "cell_type_confidence") if name in adata.obs.columns]
    done.written |= {"cell_type", "cell_type_confidence", "cell_type_probabilities"}
    adata.obs["cell_type"] = cells.obs["cell_type"].array  # positional: the categories kept
    adata.obs["cell_type_confidence"] = np.asarray(cells.obs["cell_type_confidence"], dtype=float)
    adata.obsm["cell_type_probabilities"] = cells.obsm["cell_type_probabilities"]
    adata.uns["cell_type"] = cells.uns["cell_type"]
    predicted = cells.obs["cell_type"].astype(str).to_numpy()
    agreement = None
    if labels is not None:
        labelled = np.ones(len(predicted), bool) if known is None else np.asarray(known, bool)
        agreement = float(np.mean(predicted[labelled] == np.asarray(labels, dtype=str)[labelled]))
        done.metrics["annotation accuracy (vs labels)"] = agreement
    if replaced:
        done.sections += [f"The input's own obs column(s) {replaced} are replaced by the annotation's.", ""]
    confidence = np.asarray(cells.obs["cell_type_confidence"], dtype=float)
    reference_cells = None if annotator.reference is None else annotator.reference.n_obs
    done.sections += annotation_lines(annotator.mode, predicted, confidence, reference_cells=reference_cells,
                                      label_key=annotator.label_key, agreement=agreement)
