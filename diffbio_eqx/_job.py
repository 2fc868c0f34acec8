"""The main job behind `diffbio-eqx run`: train the pipeline on a dataset and write what a biologist opens."""

import contextlib
import dataclasses
import datetime
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import anndata as ad
import jax
import jax.random as jr
import numpy as np
import pandas as pd

from . import datasets, io
from ._core._metrics import (
    adjusted_rand_index,
    clisi,
    ilisi,
    normalized_mutual_info,
    silhouette_label,
)
from ._core._neighbors import exact_knn
from ._core._validate import NonIntegerCountsWarning
from ._job_steps import (
    Annotator,
    JobSteps,
    StepsDone,
    annotate,
    call_doublets,
    check_reference_genes,
    check_steps,
    filter_doublets,
    impute,
)
from ._pipeline import (
    FitSettings,
    PipelineFit,
    PipelineOutput,
    SingleCellPipelineConfig,
    create_single_cell_pipeline,
    fit_pipeline,
    run_pipeline,
    save_pipeline,
)
from ._report import markdown_table, package_versions, plot_embedding, plot_training, write_text
from ._vae._stage import vae_default_epochs


@dataclasses.dataclass
class JobResult:
    out_dir: pathlib.Path
    files: dict[str, pathlib.Path]
    metrics: dict[str, float]


#: The files the job may write into its output folder (`doublets.png` only with a doublet filter).
OUTPUT_NAMES = ("result.h5ad", "pipeline.eqx", "report.md", "umap.png", "training.png", "doublets.png")


def _check_output(out_dir: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None]
                  ) -> pathlib.Path:
    """Refuse an output folder that would overwrite one of the files the job reads (`inputs`, by option name), is
    not a folder, or holds a folder where an output file goes; creates nothing."""
    target = pathlib.Path(out_dir)
    written = {(target / name).resolve() for name in OUTPUT_NAMES} | {target.resolve()}
    for option, path in inputs.items():
        if path is not None and pathlib.Path(path).resolve() in written:
            raise ValueError(f"--out: {str(target)!r} would overwrite the {option} file {str(path)!r}; choose "
                             "another folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out: {str(target)!r} exists and is not a folder")
    for name in OUTPUT_NAMES:
        if (target / name).is_dir():
            raise ValueError(f"--out: {str(target / name)!r} is a folder where the job writes its {name}")
    return target


@contextlib.contextmanager
def _staged_output(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Create `target` if needed and yield a hidden staging folder inside it; on success move every staged file
    into `target` (and remove an earlier run's output files this run did not write, so the folder holds one run's
    results, as its report lists them), on failure remove the staging folder (and the folders this call created),
    so a failed run leaves no partial output behind."""
    created = None  # the outermost folder this call creates, if any
    for folder in (target, *target.parents):
        if folder.exists():
            break
        created = folder
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if created is not None:  # the parents made before the failure
            shutil.rmtree(created, ignore_errors=True)
        raise ValueError(f"--out: cannot create {str(target)!r} ({error.strerror or error})") from None
    try:
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".diffbio-run-", dir=target))
    except OSError as error:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise ValueError(f"--out: folder {str(target)!r} is not writable ({error.strerror or error})") from None
    try:
        yield staging
        staged = sorted(staging.iterdir())
        for path in staged:  # all checked before any is moved, so a failure leaves the folder as it was
            if (target / path.name).is_dir():
                raise ValueError(f"--out: {str(target / path.name)!r} is a folder where the job writes a file")
        for path in staged:
            os.replace(path, target / path.name)
        for name in set(OUTPUT_NAMES) - {path.name for path in staged}:  # an earlier run's, not this one's
            if (target / name).is_file():
                (target / name).unlink()
    except BaseException:
        shutil.rmtree(staging if created is None else created, ignore_errors=True)
        raise
    staging.rmdir()


@dataclasses.dataclass(frozen=True)
class InputSettings:
    """Where the job reads an h5ad file's counts and gene names (the command line's `--layer`, `--use-raw`,
    `--gene-key` and `--allow-non-integer`).

    - `layer`: read the counts from `layers[layer]` (scvi-tools' `layer="counts"`) instead of `X`.
    - `use_raw`: read the counts from `.raw` (scanpy's convention).
    - `gene_key`: a `var` column whose values name the genes (e.g. symbols instead of Ensembl IDs).
    - `allow_non_integer`: run on a matrix that does not hold counts (non-integer values), saying so in the
      report, instead of refusing it.
    """

    layer: str | None = None
    use_raw: bool = False
    gene_key: str | None = None
    allow_non_integer: bool = False


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """The job's cells: the AnnData the results go into, its arrays, the known labels and the notes about them."""

    adata: Any
    arrays: io.AnnDataArrays
    batch_key: str | None
    label_key: str | None
    labels: np.ndarray | None  # a string per cell, "(missing)" where unknown
    known: np.ndarray | None  # which cells have a label
    notes: tuple[str, ...]


def _read(input_path: str | os.PathLike[str] | None, batch_key: str | None, label_key: str | None,
          seed: int) -> tuple[Any, str | None, str | None, list[str]]:
    notes = []
    if input_path is None:
        adata = datasets.pbmc68k()
        adata = datasets.add_simulated_batches(adata, seed=seed)
        notes.append(
            "Data: 10x PBMC 68k reduced (scanpy's bundled copy), 700 cells x 765 genes, restored integer counts. "
            "**The set has no real batches**: the two batches are a random split with a simulated gene-wise "
            "batch effect (`datasets.add_simulated_batches`)."
        )
        return adata, batch_key or "batch", label_key or "bulk_labels", notes
    adata = io.read_h5ad(input_path)
    notes.append(f"Data: {input_path} ({adata.n_obs} cells x {adata.n_vars} genes).")
    if label_key is not None and label_key not in adata.obs.columns:
        raise ValueError(f"--label-key: {label_key!r} is not a column of adata.obs "
                         f"(columns: {list(adata.obs.columns)})")
    return adata, batch_key, label_key, notes


def _counts_source(adata: Any, inputs: InputSettings) -> tuple[Any, bool, list[str]]:
    """Check that the chosen matrix holds counts (refusing it, naming where counts are, unless
    `allow_non_integer`); `.raw` with other genes than `X` becomes the AnnData the results go into."""
    if inputs.layer is not None and inputs.use_raw:
        raise ValueError("--layer and --use-raw: both name where the counts are; choose one")
    if inputs.use_raw and adata.raw is None:
        raise ValueError("--use-raw: the input has no .raw")
    notes, use_raw = [], inputs.use_raw
    if use_raw and not adata.raw.var_names.equals(adata.var_names):
        adata, use_raw = adata.raw.to_adata(), False
        notes.append(f"Counts from .raw, whose {adata.n_vars} genes differ from X's: the results are stored on "
                     ".raw's genes (X, layers and .raw of the input are not in result.h5ad).")
    elif inputs.use_raw or inputs.layer is not None:
        notes.append(f"Counts from {'.raw' if inputs.use_raw else f'layers[{inputs.layer!r}]'}.")
    message = io.not_counts(adata, layer=inputs.layer, use_raw=use_raw, flags=True)
    if message is not None and not inputs.allow_non_integer:
        raise ValueError(f"{message}; --allow-non-integer runs on these values anyway")
    if message is not None:
        notes.append(f"**Not raw counts** (run with --allow-non-integer): {message}. The count likelihoods "
                     "(ambient model, VAE) expect raw counts; their results on these values are not meaningful.")
    return adata, use_raw, notes


def _name_genes(adata: Any, gene_key: str | None) -> list[str]:
    """Name the genes by `var[gene_key]` (or keep `var_names`), made unique as scanpy's `var_names_make_unique`
    does; changes `adata` (the job's own copy) in place and returns notes about it."""
    if gene_key is None:
        names = adata.var_names.astype(str)
    else:
        if gene_key not in adata.var.columns:
            raise ValueError(f"--gene-key: {gene_key!r} is not a column of adata.var "
                             f"(columns: {list(adata.var.columns)})")
        column = adata.var[gene_key]
        if bool(column.isna().any()):
            missing = np.flatnonzero(column.isna().to_numpy())
            raise ValueError(f"--gene-key: adata.var[{gene_key!r}] has {missing.size} missing value(s), first at "
                             f"gene {int(missing[0])}")
        names = pd.Index(column.astype(str).to_numpy())
    repeated = list(names[names.duplicated()].unique())
    notes = [] if gene_key is None else [f"Genes named by var[{gene_key!r}] (first: {', '.join(names[:5])})."]
    if repeated:
        notes.append(f"{len(repeated)} gene name(s) occur more than once (e.g. {', '.join(repeated[:5])}); made "
                     "unique by appending -1, -2, ... (as scanpy's var_names_make_unique).")
    if notes:
        adata.var_names = ad.utils.make_index_unique(pd.Index(names))
    return notes


def _labels(adata: Any, label_key: str | None) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Each cell's label (a string; "(missing)" where `obs[label_key]` has none) and which cells have one."""
    if label_key is None:
        return None, None, []
    column = adata.obs[label_key]
    missing = column.isna().to_numpy()
    if missing.all():
        return None, None, [f"obs[{label_key!r}] has no values: no label scores."]
    labels = np.where(missing, "(missing)", column.astype(str).to_numpy()).astype(object)
    notes = [f"{int(missing.sum())} of {adata.n_obs} cells have no label in obs[{label_key!r}]; they are left out "
             "of the label scores (ARI, NMI, cLISI, silhouette)."] if missing.any() else []
    return labels, ~missing, notes


def _load(input_path: str | os.PathLike[str] | None, batch_key: str | None, label_key: str | None, seed: int,
          inputs: InputSettings) -> _Loaded:
    """Read the cells, choose and check their counts, name their genes, read their batches and labels."""
    adata, batch_key, label_key, notes = _read(input_path, batch_key, label_key, seed)
    adata, use_raw, source_notes = _counts_source(adata, inputs)
    notes += source_notes + _name_genes(adata, inputs.gene_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonIntegerCountsWarning)  # refused above, or allowed and noted
        arrays = io.from_anndata(adata, layer=inputs.layer, use_raw=use_raw, batch_key=batch_key)
    arrays = io.AnnDataArrays(arrays.counts, arrays.batch_labels, arrays.batch_categories,
                              tuple(str(name) for name in adata.var_names))
    if batch_key is not None and arrays.n_batches == 1:
        notes.append(f"obs[{batch_key!r}] has a single batch ({(arrays.batch_categories or ('',))[0]!r}): no batch "
                     "correction (Harmony is off).")
        arrays = io.AnnDataArrays(arrays.counts, None, None, arrays.genes)
    labels, known, label_notes = _labels(adata, label_key)
    return _Loaded(adata, arrays, batch_key, label_key, labels, known, (*notes, *label_notes))


def _knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, x.shape[0])
    indices, distances = exact_knn(jax.numpy.asarray(x), jax.numpy.asarray(x), k)
    return np.asarray(indices), np.asarray(distances)


#: The integration scores of the report are computed on at most this many cells (a random subsample above).
METRIC_CELLS = 50_000


def _integration_metrics(x: np.ndarray, batches: np.ndarray | None, labels: np.ndarray | None,
                         known: np.ndarray | None = None) -> dict[str, float]:
    """iLISI over every cell; cLISI and the label silhouette over the cells with a label (`known`). Above
    `METRIC_CELLS` cells, over that many drawn at random (seed 0): exact kNN and silhouettes are quadratic."""
    metrics: dict[str, float] = {}
    if x.shape[0] > METRIC_CELLS:
        chosen = np.sort(np.random.default_rng(0).choice(x.shape[0], METRIC_CELLS, replace=False))
        x = x[chosen]
        batches, labels = (None if v is None else v[chosen] for v in (batches, labels))
        known = None if known is None else known[chosen]
    indices, distances = _knn(x, 90)
    if batches is not None and len(np.unique(batches)) > 1:
        metrics["iLISI"] = ilisi(indices, distances, batches)
    if labels is not None and known is not None and not known.all():
        x, labels = x[known], labels[known]
        indices, distances = _knn(x, 90)
    if labels is not None:
        metrics["cLISI"] = clisi(indices, distances, labels)
        if 1 < len(np.unique(labels)) < len(labels):  # a silhouette needs another label to compare with
            metrics["silhouette_label"] = silhouette_label(x, labels)
    return metrics


def _settings(adata: Any, arrays: io.AnnDataArrays,
              config_path: str | os.PathLike[str] | None) -> tuple[SingleCellPipelineConfig, tuple[str, ...]]:
    """The job's pipeline settings (sized to the data; a `--config` file overrides them) and a note about them."""
    settings: dict[str, Any] = {
        "n_genes": adata.n_vars,
        "n_batches": arrays.n_batches,
        # Chosen from the data (the widest-silhouette Leiden partition): known labels score, they do not fit.
        "n_clusters": None,
        # Harmony's own default K (min(round(N / 30), 100)) rather than a fixed 100 for any data size.
        "batch_correction_clusters": None,
        "latent_dim": 10,
        # Two hidden layers of 128 (scVI's width, scANVI's atlas depth), chosen on pbmc68k's counts redrawn from a
        # VAE without labels (`select_integration_settings.py --batches pbmc_vae`, 4 draws): mean scib total
        # harmonypy's +0.012, one layer's -0.002; reported on pbmc68k in the README (issue 24).
        "hidden_dims": (128, 128),
    }
    if config_path is None:
        return SingleCellPipelineConfig.from_dict(settings), ()
    from_file = SingleCellPipelineConfig.settings_in_file(config_path)
    for name in ("n_genes", "n_batches"):  # the data's shapes, not settings
        if name in from_file and from_file[name] != settings[name]:
            raise ValueError(f"--config: {name} is {from_file[name]!r} in {str(config_path)!r}, but the input has "
                             f"{settings[name]}; the job takes it from the data, leave it out of the file")
    settings.update(from_file)
    return SingleCellPipelineConfig.from_dict(settings), (f"Settings from {config_path}.",)


def _epochs(n_cells: int, epochs: dict[str, int] | None) -> tuple[dict[str, int], tuple[str, ...]]:
    """The epochs per stage; the VAE's default is scVI's heuristic capped at 100, with a note saying so."""
    epochs = dict(epochs or {})
    if "vae_epochs" in epochs:
        return epochs, ()
    # scVI's heuristic, capped at 100: on small sets (400 epochs for 700 cells) longer training overfits, in
    # scvi-tools as in ours, and mixes batches less.
    epochs["vae_epochs"] = min(vae_default_epochs(n_cells), 100)
    return epochs, (f"VAE epochs: {epochs['vae_epochs']} (scVI's heuristic capped at 100).",)


def _with_labels(loaded: _Loaded, label_key: str | None) -> _Loaded:
    """`loaded` scored against its own `obs[label_key]` when it has that column and was read without it (a
    reference's label key); otherwise unchanged."""
    if label_key is None or label_key == loaded.label_key or label_key not in loaded.adata.obs.columns:
        return loaded
    labels, known, notes = _labels(loaded.adata, label_key)
    return dataclasses.replace(loaded, label_key=label_key, labels=labels, known=known,
                               notes=(*loaded.notes, *notes))


def _keep(loaded: _Loaded, kept: np.ndarray) -> _Loaded:
    """The cells `kept` (a boolean mask) of `loaded`: the AnnData (a copy), the arrays and the labels."""
    rows = np.flatnonzero(kept)
    arrays = loaded.arrays
    subset = io.AnnDataArrays(arrays.counts[rows], None if arrays.batch_labels is None else arrays.batch_labels[rows],
                              arrays.batch_categories, arrays.genes, arrays.columns)
    return dataclasses.replace(loaded, adata=loaded.adata[rows].copy(), arrays=subset,
                               labels=None if loaded.labels is None else loaded.labels[rows],
                               known=None if loaded.known is None else loaded.known[rows])


def _steps_before(out: pathlib.Path, loaded: _Loaded, config: SingleCellPipelineConfig, steps: JobSteps,
                  annotator: Annotator | None, epochs: dict[str, int], *, seed: int, progress: bool
                  ) -> tuple[_Loaded, StepsDone, dict[str, pathlib.Path]]:
    """The optional steps before the pipeline (`_job_steps`): the doublet filter on every input cell (the cells
    called doublets leave the job's cells), then MAGIC and the annotation of the kept cells, written into their
    AnnData; returns the kept cells, what was done, and the files written (the doublet histogram)."""
    done, arrays = StepsDone(), loaded.arrays
    batches = (None if arrays.batch_labels is None or arrays.batch_categories is None
               else np.asarray(arrays.batch_categories, dtype=object)[np.asarray(arrays.batch_labels)])
    call = call_doublets(config.doublet_filter, arrays.counts, arrays.genes, loaded.adata.obs_names, batches,
                         seed=seed, vae_epochs=epochs.get("vae_epochs"), solo_epochs=steps.solo_epochs,
                         progress=progress)
    files = filter_doublets(call, done, out)
    if call is not None:
        done.mark_doublets(loaded.adata)
        loaded = _keep(loaded, call.kept)
    impute(config.imputation, loaded.adata, loaded.arrays.counts, loaded.arrays.genes, done, seed=seed)
    annotate(annotator, loaded.adata, loaded.arrays.counts, loaded.arrays.genes, done, labels=loaded.labels,
             known=loaded.known, seed=seed, vae_epochs=epochs.get("vae_epochs"), progress=progress)
    return loaded, done, files


def run_job(
    input_path: str | os.PathLike[str] | None = None,
    *,
    batch_key: str | None = None,
    label_key: str | None = None,
    out_dir: str | os.PathLike[str] = "out",
    config_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    epochs: dict[str, int] | None = None,
    inputs: InputSettings | None = None,
    steps: JobSteps | None = None,
) -> JobResult:
    """Train the pipeline on a dataset and write `result.h5ad`, `umap.png`, `training.png`, `report.md` and
    `pipeline.eqx` into `out_dir`. Without `input_path`, runs on `datasets.pbmc68k()` with a simulated two-batch
    split. `inputs` says where the counts and gene names are (`InputSettings`; default: counts in `X`, genes
    `var_names`); a matrix that does not hold counts is refused before anything is written. Nothing is written
    next to the input, and the input is never modified. `steps` (`JobSteps`): a doublet filter before the
    pipeline, MAGIC imputation, annotation from a labelled reference (whose labels are `label_key`), and the
    batch corrector over the config's."""
    steps = steps or JobSteps()
    target = _check_output(out_dir, {"input": input_path, "--config": config_path, "--reference": steps.reference,
                                     "--markers": steps.markers})
    annotator = check_steps(steps, label_key)  # settings, reference and markers: before the cells are read
    # With a reference, `label_key` names the reference's labels; the input's column of that name, if any, scores.
    query_key = label_key if annotator is None or annotator.reference is None else None
    loaded = _with_labels(_load(input_path, batch_key, query_key, seed, inputs or InputSettings()), label_key)
    check_reference_genes(annotator, loaded.arrays.genes)
    adata, arrays, batch_key, label_key, labels = (loaded.adata, loaded.arrays, loaded.batch_key, loaded.label_key,
                                                   loaded.labels)
    config, config_notes = _settings(adata, arrays, config_path)
    batch_correction = steps.batch_correction
    if batch_correction is not None:  # --batch-correction overrides the config file
        if batch_correction not in ("harmony", "mmd", "adversarial", "none"):
            raise ValueError(f"batch_correction: must be 'harmony', 'mmd', 'adversarial' or 'none', "
                             f"got {batch_correction!r}")
        config = config.replace(**({"enable_batch_correction": False} if batch_correction == "none" else
                                   {"batch_correction": batch_correction, "enable_batch_correction": True}))
    if batch_key is not None and arrays.batch_labels is None:  # one batch: nothing to correct
        config = config.replace(enable_batch_correction=False)
    config = config.replace(**{name: value for name, value in (("doublet_filter", steps.doublets),
                                                               ("imputation", steps.impute)) if value is not None})
    epochs, epoch_notes = _epochs(adata.n_obs, epochs)
    ambient_notes = (("No ambient profile was given: the pooled expression of the cells stands in for it.",)
                     if config.enable_ambient_removal else ())
    notes = (*loaded.notes, *config_notes, *epoch_notes, *ambient_notes)
    with _staged_output(target) as staging:
        loaded, done, step_files = _steps_before(staging, loaded, config, steps, annotator, epochs, seed=seed,
                                                 progress=progress)
        adata, arrays, labels = loaded.adata, loaded.arrays, loaded.labels
        trained = _train(config, arrays, epochs, seed=seed, progress=progress)
        result, files = _write_results(staging, adata, trained, notes=notes, seed=seed, input_path=input_path,
                                       done=done)
        panels = _panels(result, adata, batch_key, labels, label_key)
        if "cell_type" in result.obs:
            panels["cell_type (annotated)"] = result.obs["cell_type"].astype(str).to_numpy()
        files |= _write_figures(staging, trained, panels) | step_files
        metrics, metric_rows = _quality(trained.output, arrays.batch_labels, labels, panels.get("cluster"),
                                        loaded.known)
        metrics |= done.metrics
        report = _report(trained, adata.n_obs, notes=notes, seed=seed, metrics=metrics, metric_rows=metric_rows,
                         files=[*files.values()], done=done)
        files["report"] = write_text(staging / "report.md", report)
    return JobResult(target, {name: target / path.name for name, path in files.items()}, metrics)


@dataclasses.dataclass(frozen=True)
class _Trained:
    """What the job's training and inference give the files and the report."""

    fitted: PipelineFit
    output: PipelineOutput | io.ChunkedOutput
    train_seconds: float
    first_inference_seconds: float
    inference_seconds: float


def _train(config: SingleCellPipelineConfig, arrays: io.AnnDataArrays, epochs: dict[str, int], *, seed: int,
           progress: bool) -> _Trained:
    """Build the pipeline (keeping the genes' names), train it, and run it twice: once compiling, once timed."""
    data: dict[str, Any] = {"counts": arrays.counts}
    if arrays.batch_labels is not None:
        data["batch_labels"] = arrays.batch_labels
    build_key, fit_key, run_key = jr.split(jr.key(seed), 3)
    pipeline = create_single_cell_pipeline(config=config, genes=arrays.genes, batches=arrays.batch_categories,
                                           key=build_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # the pooled-profile warning is stated in the report
        started = time.perf_counter()
        fitted = fit_pipeline(pipeline, data, key=fit_key, settings=FitSettings().replace(**epochs), progress=progress)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        output = jax.block_until_ready(io.infer(fitted.pipeline, data, key=run_key))
        first_inference = time.perf_counter() - started
        inference_seconds = float("nan")  # large data: one chunked pass (io.infer); its layers stream when written
        if not isinstance(output, io.ChunkedOutput):
            started = time.perf_counter()
            output = jax.block_until_ready(run_pipeline(fitted.pipeline, data, key=run_key))
            inference_seconds = time.perf_counter() - started
    return _Trained(fitted, output, train_seconds, first_inference, inference_seconds)


def _write_results(out: pathlib.Path, adata: Any, trained: _Trained, *, notes: tuple[str, ...], seed: int,
                   input_path: str | os.PathLike[str] | None, done: StepsDone | None = None
                   ) -> tuple[Any, dict[str, pathlib.Path]]:
    """`result.h5ad` (the input annotated, with the settings that ran in `uns["diffbio"]`) and `pipeline.eqx`.
    After a doublet filter (`done`), the file holds every input cell (`StepsDone.expand`); the returned AnnData
    holds the kept cells."""
    result = io.to_anndata(adata, trained.output)
    settings = {k: ("" if v is None else v) for k, v in trained.fitted.pipeline.settings().items()}
    result.uns["diffbio"] = {"config": settings, "seed": seed, "notes": list(notes)}
    streamed = trained.output.stream if isinstance(trained.output, io.ChunkedOutput) else None
    written = result
    if done is not None:
        written, streamed = done.expand(result), done.expand_stream(streamed)
    files = {"result": io.write_h5ad(written, out / "result.h5ad", input_path=input_path, layers=streamed),
             "pipeline": save_pipeline(out / "pipeline.eqx", trained.fitted.pipeline)}
    return result, files


def _panels(result: Any, adata: Any, batch_key: str | None, labels: np.ndarray | None,
            label_key: str | None) -> dict[str, np.ndarray]:
    """The per-cell labels the UMAP figure is coloured by: clusters, batches, known cell types."""
    panels: dict[str, np.ndarray] = {}
    if "diffbio_cluster" in result.obs:
        panels["cluster"] = result.obs["diffbio_cluster"].to_numpy()
    if batch_key is not None:
        panels["batch"] = adata.obs[batch_key].astype(str).to_numpy()
    if labels is not None and label_key is not None:
        panels[label_key] = labels
    return panels


def _write_figures(out: pathlib.Path, trained: _Trained, panels: dict[str, np.ndarray]) -> dict[str, pathlib.Path]:
    files = {}
    embedding_2d = np.asarray(trained.output["embeddings_2d"])
    if embedding_2d.shape[1] >= 2:
        files["umap"] = plot_embedding(out / "umap.png", embedding_2d[:, :2], panels,
                                       title="diffbio_eqx: parametric UMAP of the corrected latent")
    files["training"] = plot_training(out / "training.png", trained.fitted.curves)
    return files


def _quality(output: PipelineOutput | io.ChunkedOutput, batches: np.ndarray | None, labels: np.ndarray | None,
             clusters: np.ndarray | None, known: np.ndarray | None = None
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The headline metrics (ARI and NMI of the clusters against known labels, integration scores of the corrected
    embeddings) and a table of integration scores before and after Harmony; label scores over the cells with a
    label (`known`)."""
    metrics: dict[str, float] = {}
    if labels is not None and clusters is not None:
        labelled = slice(None) if known is None else known
        metrics["ARI (clusters vs labels)"] = adjusted_rand_index(labels[labelled], clusters[labelled])
        metrics["NMI (clusters vs labels)"] = normalized_mutual_info(labels[labelled], clusters[labelled])
    rows = []
    for name, field in (("VAE latent (before Harmony)", "latent"), ("corrected embeddings", "corrected_embeddings")):
        values = _integration_metrics(np.asarray(output[field]), batches, labels, known)
        rows.append({"embedding": name, **values})
        if field == "corrected_embeddings":
            metrics.update({f"{k} (corrected)": v for k, v in values.items()})
    return metrics, rows


def _stage_rows(trained: _Trained, n_cells: int) -> list[dict[str, Any]]:
    rows = [{"stage": stage, "seconds": seconds, "cells/s": n_cells / max(seconds, 1e-9)}
            for stage, seconds in trained.fitted.seconds.items()]
    for stage, seconds in (("training, all stages", trained.train_seconds),
                           ("inference (run_pipeline, compiled)", trained.inference_seconds),
                           ("inference, first call (with compilation)", trained.first_inference_seconds)):
        rows.append({"stage": stage, "seconds": seconds, "cells/s": n_cells / seconds})
    return rows


def _report(trained: _Trained, n_cells: int, *, notes: tuple[str, ...], seed: int, metrics: dict[str, float],
            metric_rows: list[dict[str, Any]], files: list[pathlib.Path], done: StepsDone | None = None) -> str:
    """`report.md`: the data, the settings that ran, the time per stage, the quality, the optional steps
    (doublets, imputation, annotation: `done`), the files."""
    settings = trained.fitted.pipeline.settings()
    lines = [
        "# diffbio_eqx run report",
        "",
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"JAX backend: {jax.default_backend()}; seed {seed}.",
        "",
        *notes,
        "",
        "## Configuration",
        "",
        markdown_table([{"setting": k, "value": v} for k, v in settings.items()]),
        "",
        "## Time per stage",
        "",
        markdown_table([*([] if done is None else done.stage_rows), *_stage_rows(trained, n_cells)]),
        "",
    ]
    if metrics:
        lines += ["## Quality", ""]
        lines += [markdown_table([{"metric": k, "value": v} for k, v in metrics.items()]), ""]
    if metric_rows and len(metric_rows[0]) > 1:
        lines += [
            "Integration scores (our implementations of the scib-metrics definitions, checked against "
            "scib-metrics in the tests; iLISI: batch mixing, higher is better; cLISI and silhouette: cell-type "
            "separation, higher is better):",
            "",
            markdown_table(metric_rows),
            "",
        ]
    lines += [] if done is None else done.sections
    lines += ["## Versions", "", f"Seed: {seed}.", "",
              markdown_table([{"package": k, "version": v} for k, v in package_versions().items()]), ""]
    lines += ["## Files", ""] + [f"- `{path.name}`" for path in files] + ["- `report.md`", ""]
    return "\n".join(lines)
