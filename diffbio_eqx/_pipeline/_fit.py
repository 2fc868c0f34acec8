"""`fit_pipeline`: train the pipeline stage by stage, then optionally end to end; resumable from checkpoints."""

import contextlib
import pathlib
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._ambient._stage import fit_ambient_removal, remove_ambient
from .._clustering._stage import SoftKMeans
from .._core._train import TrainSettings, fit, shared_optimizer
from .._core._validate import NonIntegerCountsWarning, check_batch_labels, check_counts
from .._umap import _stage as _umap_stage
from .._vae._stage import fit_vae, vae_transform
from ._loss import PipelineLossWeights, pipeline_loss
from ._model import HarmonyReference, SingleCellPipeline
from ._run import _check_harmony_clusters, prepare_inputs
from ._serialise import _read_pipeline, _write_pipeline


class PipelineFit(eqx.Module):
    """What `fit_pipeline` returns.

    - `pipeline`: the trained pipeline (with `harmony_reference` set when batch correction is on).
    - `curves`: per stage, its per-epoch loss curves (`{"vae": {"train": ..., "validation": ...}, ...}`).
    - `seconds`: wall time of each stage's training, in seconds.
    """

    pipeline: SingleCellPipeline
    curves: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]


def _check_fit_settings(pipeline: SingleCellPipeline, n_cells: int, **settings: Any) -> None:
    """Check what `fit_pipeline` needs before any stage trains, so a bad setting never fails half way through."""
    def is_integer(value: Any, minimum: int) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum

    # None epochs: the stage's own heuristic (scVI's for the VAE, `default_n_epochs` for the ambient model)
    used = {"ambient_epochs": pipeline.ambient_removal is not None and settings["ambient_epochs"] is not None,
            "umap_epochs": pipeline.dim_reduction is not None, "vae_epochs": settings["vae_epochs"] is not None}
    for name in ("ambient_epochs", "vae_epochs", "umap_epochs", "clustering_iterations", "batch_size"):
        if used.get(name, True) and not is_integer(settings[name], 1):
            raise ValueError(f"{name}: must be a positive integer, got {settings[name]!r}")
    max_cells = settings["umap_max_cells"]
    if pipeline.dim_reduction is not None and max_cells is not None and not (
        is_integer(max_cells, 1) and max_cells > pipeline.dim_reduction.n_neighbors
    ):
        raise ValueError(f"umap_max_cells: must be None or an integer above umap_n_neighbors="
                         f"{pipeline.dim_reduction.n_neighbors}, got {max_cells!r}")
    if not is_integer(settings["fine_tune_epochs"], 0):
        raise ValueError(f"fine_tune_epochs: must be an integer >= 0, got {settings['fine_tune_epochs']!r}")
    if not settings["learning_rate"] > 0:
        raise ValueError(f"learning_rate: must be > 0, got {settings['learning_rate']!r}")
    _check_harmony_clusters(pipeline, n_cells)
    n_neighbors = pipeline.config.umap_n_neighbors
    if pipeline.dim_reduction is not None and n_cells <= n_neighbors:
        raise ValueError(f"counts: training the UMAP stage needs more than umap_n_neighbors={n_neighbors} cells, "
                         f"got {n_cells}")

def _trainable_filter(pipeline: SingleCellPipeline) -> SingleCellPipeline:
    """The leaves end-to-end training updates: network weights, dispersions and centroids; not the
    hyperparameters (Harmony's settings, temperatures, target library size) nor the stored Harmony reference."""
    spec = jtu.tree_map(lambda _: False, pipeline)
    arrays = lambda module: jtu.tree_map(eqx.is_inexact_array, module)
    if pipeline.ambient_removal is not None:
        ambient_spec = eqx.tree_at(
            lambda a: (a.prior_contamination, a.prior_ambient_count, a.prior_log_scale),
            arrays(pipeline.ambient_removal), (False, False, False),
        )
        spec = eqx.tree_at(lambda s: s.ambient_removal, spec, ambient_spec)
    vae_spec = eqx.tree_at(lambda v: v.target_library_size, arrays(pipeline.vae_normalizer), False)
    spec = eqx.tree_at(lambda s: s.vae_normalizer, spec, vae_spec)
    if pipeline.dim_reduction is not None:
        spec = eqx.tree_at(lambda s: s.dim_reduction.encoder, spec, arrays(pipeline.dim_reduction.encoder))
    if pipeline.clustering is not None:
        spec = eqx.tree_at(lambda s: s.clustering.centroids, spec, True)
    return spec


@contextlib.contextmanager
def _decontaminated_counts_are_expected() -> Iterator[None]:
    # The VAE reads the ambient model's posterior expected counts, which are not whole numbers by design.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonIntegerCountsWarning)
        yield


def _fine_tune_loss(pipeline, batch, context, *, key):
    weights, ambient_profile, kl_weight = context
    counts, batch_labels, cell_type_labels = batch
    return pipeline_loss(pipeline, counts, ambient_profile, batch_labels, key=key, weights=weights,
                         cell_type_labels=cell_type_labels, kl_weight=kl_weight)


def fit_pipeline(
    pipeline: SingleCellPipeline,
    data: Mapping[str, Any],
    *,
    key: PRNGKeyArray,
    raw_counts: Any = None,
    ambient_epochs: int | None = None,
    vae_epochs: int | None = None,
    umap_epochs: int = 30,
    umap_max_cells: int | None = 20_000,
    clustering_iterations: int = 100,
    fine_tune_epochs: int = 0,
    fine_tune_weights: PipelineLossWeights | None = None,
    cell_type_labels: ArrayLike | None = None,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    progress: bool = True,
    checkpoint_dir: str | pathlib.Path | None = None,
) -> PipelineFit:
    """Train the pipeline stage by stage, then optionally end to end.

    1. Ambient removal on the raw counts (`fit_ambient_removal`), then the decontaminated counts. Pass the
       unfiltered matrix as `raw_counts` (cells and empty droplets): its empty droplets give the ambient count
       prior, as in CellBender; without it the fraction's prior has mode 0 and little is removed unless the
       data show it (see `AmbientRemoval`).
    2. The VAE on those counts (`fit_vae`, scVI's defaults; `vae_epochs=None` uses scVI's epoch heuristic).
    3. Harmony on the full latent; its centroids and ridge coefficients become `harmony_reference`.
    4. Soft k-means initialised by k-means++ on the corrected latent.
    5. Optionally `fine_tune_epochs` of end-to-end training of all stages on `pipeline_loss` (with the
       supervised cell-type cross-entropy when `cell_type_labels` are given and `fine_tune_weights.supervised`
       is non-zero), after which Harmony and the clustering are refitted on the new latent.
    6. The parametric UMAP encoder on the corrected latent: its fuzzy graph (exact kNN, O(n^2)) is built on at
       most `umap_max_cells` cells drawn at random (all of them up to 20,000 by default; None: always all), and
       the trained encoder embeds every cell, as parametric UMAP is meant to.

    **Arguments:** `data` as in `run_pipeline`; `key` (keyword only) makes the whole run reproducible; epochs
    per stage; `batch_size` and `learning_rate` for the minibatch stages; `progress` shows a bar per stage;
    `checkpoint_dir`: save the pipeline after every trained stage (and the ambient and VAE training after every
    epoch), and resume from there when called again with the same arguments: the result is identical to an
    uninterrupted run. Files are written atomically.

    **Returns:** a `PipelineFit` (trained pipeline, loss curves, seconds per stage).
    """
    counts, profile, labels = prepare_inputs(pipeline, data)
    _check_fit_settings(pipeline, counts.shape[0], ambient_epochs=ambient_epochs, vae_epochs=vae_epochs,
                        umap_epochs=umap_epochs, umap_max_cells=umap_max_cells,
                        clustering_iterations=clustering_iterations,
                        fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, learning_rate=learning_rate)
    if raw_counts is not None and pipeline.ambient_removal is not None:
        check_counts(raw_counts, field="raw_counts", allow_empty_cells=True, n_genes=pipeline.config.n_genes)
    if cell_type_labels is not None:
        cell_type_labels = check_batch_labels(cell_type_labels, counts.shape[0],
                                              n_batches=pipeline.config.n_clusters, field="cell_type_labels")
        if cell_type_labels.ndim != 1:
            raise ValueError(f"cell_type_labels: expected shape ({counts.shape[0]},), got {cell_type_labels.shape}")
    host_counts = np.asarray(counts)
    keys = dict(zip(("ambient", "vae", "harmony", "clustering", "fine_tune", "umap"), jr.split(key, 6)))
    curves: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}

    def record(stage: str, result: Any, started: float) -> None:
        seconds[stage] = time.perf_counter() - started
        stage_curves = {"train": np.asarray(result.train_loss)}
        if np.any(np.isfinite(np.asarray(result.validation_loss))):
            stage_curves["validation"] = np.asarray(result.validation_loss)
        curves[stage] = stage_curves

    directory = None if checkpoint_dir is None else pathlib.Path(checkpoint_dir)
    done: list[str] = []
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "pipeline.eqx").is_file():
            saved, header = _read_pipeline(directory / "pipeline.eqx")
            state = header.get("progress")
            if state is not None:  # a checkpoint of this function (not a plain saved pipeline)
                pipeline, done = saved, list(state["done"])
                curves.update({stage: {k: np.asarray(v, dtype=float) for k, v in c.items()}
                               for stage, c in state["curves"].items()})
                seconds.update(state["seconds"])

    def checkpoint(stage: str) -> None:
        done.append(stage)
        if directory is None:
            return
        # The progress goes in the same file as the pipeline (its header), written atomically: a crash at any
        # moment leaves a pipeline and a list of finished stages that belong together.
        progress_state = {"done": done, "seconds": seconds,
                          "curves": {k: {n: np.asarray(v).tolist() for n, v in c.items()} for k, c in curves.items()}}
        _write_pipeline(directory / "pipeline.eqx", pipeline, {"progress": progress_state})


    def stage_checkpoint(name: str) -> dict[str, Any]:
        return {} if directory is None else {"checkpoint_path": directory / f"{name}.training.eqx", "resume": True}

    x = host_counts
    if pipeline.ambient_removal is not None:
        if "ambient_removal" not in done:
            started = time.perf_counter()
            fitted = fit_ambient_removal(pipeline.ambient_removal, host_counts, np.asarray(profile),
                                         key=keys["ambient"], raw_counts=raw_counts,
                                         settings=TrainSettings(n_epochs=ambient_epochs, batch_size=batch_size,
                                                                progress=progress, **stage_checkpoint("ambient")))
            pipeline = eqx.tree_at(lambda p: p.ambient_removal, pipeline, fitted.model)
            record("ambient_removal", fitted, started)
            checkpoint("ambient_removal")
        x = np.asarray(remove_ambient(pipeline.ambient_removal, host_counts,
                                      np.asarray(profile)).decontaminated_counts)

    if "vae_normalizer" not in done:
        started = time.perf_counter()
        with _decontaminated_counts_are_expected():
            loop = TrainSettings(n_epochs=vae_epochs, batch_size=batch_size,
                                 hyperparameters={"learning_rate": learning_rate}, progress=progress,
                                 **stage_checkpoint("vae"))
            fitted = fit_vae(pipeline.vae_normalizer, x, np.asarray(labels), key=keys["vae"], settings=loop)
        pipeline = eqx.tree_at(lambda p: p.vae_normalizer, pipeline, fitted.model)
        record("vae_normalizer", fitted, started)
        checkpoint("vae_normalizer")

    def refit_correction_and_clusters(
        pipeline: SingleCellPipeline, x: np.ndarray
    ) -> tuple[SingleCellPipeline, Array]:
        with _decontaminated_counts_are_expected():
            latent = vae_transform(pipeline.vae_normalizer, x, np.asarray(labels)).latent
        corrected = latent
        if pipeline.batch_correction is not None:
            started = time.perf_counter()
            result = pipeline.batch_correction.run(latent, labels, key=keys["harmony"])
            reference = HarmonyReference.from_result(result)
            pipeline = eqx.tree_at(lambda p: p.harmony_reference, pipeline, reference,
                                   is_leaf=lambda node: node is None)
            corrected = result.z_corr
            seconds["batch_correction"] = time.perf_counter() - started
            curves["batch_correction"] = {"objective": np.asarray(result.objective)[: int(result.n_rounds)]}
        if pipeline.clustering is not None:
            started = time.perf_counter()
            clustering = SoftKMeans.from_data(corrected, pipeline.config.n_clusters, key=keys["clustering"],
                                              temperature=pipeline.clustering.temperature,
                                              n_iter=clustering_iterations)
            pipeline = eqx.tree_at(lambda p: p.clustering, pipeline, clustering)
            seconds["clustering"] = time.perf_counter() - started
        return pipeline, corrected

    pipeline, corrected = refit_correction_and_clusters(pipeline, x)

    if fine_tune_epochs and "end_to_end" not in done:
        started = time.perf_counter()
        types = np.zeros(counts.shape[0], np.int32) if cell_type_labels is None else cell_type_labels
        weights = PipelineLossWeights() if fine_tune_weights is None else fine_tune_weights
        if cell_type_labels is None:
            weights = eqx.tree_at(lambda w: w.supervised, weights, jnp.zeros((), weights.supervised.dtype))
        trainable = _trainable_filter(pipeline)
        fitted = fit(pipeline, _fine_tune_loss, (host_counts, np.asarray(labels), types),
                     key=keys["fine_tune"],
                     settings=TrainSettings(n_epochs=fine_tune_epochs, batch_size=batch_size,
                                            optimizer=shared_optimizer("adam"),
                                            hyperparameters={"learning_rate": learning_rate}, progress=progress,
                                            description="end-to-end"),
                     context=(weights, profile, jnp.ones((), pipeline.dtype)), trainable=trainable)
        pipeline = fitted.model
        record("end_to_end", fitted, started)
        checkpoint("end_to_end")
    if fine_tune_epochs:
        if pipeline.ambient_removal is not None:
            x = np.asarray(remove_ambient(pipeline.ambient_removal, host_counts,
                                          np.asarray(profile)).decontaminated_counts)
        pipeline, corrected = refit_correction_and_clusters(pipeline, x)

    if pipeline.dim_reduction is not None and "dim_reduction" not in done:
        started = time.perf_counter()
        graph_cells = corrected
        if umap_max_cells is not None and corrected.shape[0] > umap_max_cells:
            # The exact kNN graph costs O(n^2): train the encoder on a random subsample; it embeds every cell.
            chosen = jr.choice(jr.fold_in(keys["umap"], 1), corrected.shape[0], (umap_max_cells,), replace=False)
            graph_cells = corrected[jnp.sort(chosen)]
        fitted = _umap_stage.fit_umap(pipeline.dim_reduction, graph_cells, key=keys["umap"],
                                      settings=TrainSettings(n_epochs=umap_epochs, progress=progress))
        pipeline = eqx.tree_at(lambda p: p.dim_reduction, pipeline, fitted.model)
        seconds["dim_reduction"] = time.perf_counter() - started
        curves["dim_reduction"] = {"train": np.asarray(fitted.train_loss)}
        checkpoint("dim_reduction")
    return PipelineFit(pipeline=pipeline, curves=curves, seconds=seconds)
