"""`fit_pipeline`: train the pipeline stage by stage, then optionally end to end; resumable from checkpoints.

The training is a sequence of steps, one per stage, each a function of the pipeline so far, the record of what is
finished (`_FitRecord`, written into the checkpoint with the pipeline) and the fixed inputs (`_FitInputs`):

```
_train_ambient ─ _train_vae ─ _fit_harmony ─ _fit_clustering ─ _train_umap
```
With `fine_tune_epochs > 0`, `_fine_tune` and a second `_fit_harmony` and `_fit_clustering` come before `_train_umap`.
"""

import contextlib
import dataclasses
import pathlib
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._ambient._stage import fit_ambient_removal, remove_ambient
from .._clustering._mixture_stage import fit_gaussian_mixture
from .._clustering._stage import SoftKMeans, fit_soft_kmeans
from .._core._train import TrainSettings, fit, shared_optimizer, sparse_rows_from_csr
from .._core._validate import NonIntegerCountsWarning, check_batch_labels, check_counts
from .._integration._adversarial import fit_adversarial_vae
from .._integration._mmd_vae import fit_mmd_vae
from .._umap import _stage as _umap_stage
from .._vae._stage import fit_vae, vae_latent
from ._loss import PipelineLossWeights, pipeline_loss
from ._model import HarmonyReference, SingleCellPipeline, with_config
from ._run import _check_harmony_clusters, prepare_inputs
from ._serialise import _read_pipeline, _write_pipeline
from ._supervised import clustering_from_labels


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """How `fit_pipeline` trains each stage; every field is also a keyword argument of `fit_pipeline`.

    - `ambient_epochs` (None): ambient model epochs; None uses `ambient_default_epochs`.
    - `vae_epochs` (None): VAE epochs; None uses scVI's heuristic (`vae_default_epochs`).
    - `umap_epochs` (None): parametric UMAP epochs; None uses `fit_umap`'s default, the epochs closest to 3,000
      optimiser steps (30 epochs, the old default, kept 0.85x of umap-learn's 15-NN preservation on pbmc68k; the
      default keeps 0.99x).
    - `umap_max_cells` (None): build the UMAP graph on at most this many cells drawn at random (the trained
      encoder still embeds every cell). None, the default: all cells, the kNN backend chosen by size and device
      (`neighbor_graph(method="auto")`: exact below 8,192 cells, then approximate top-k on GPU/TPU; on CPU exact
      up to 100,000 cells, pynndescent above).
    - `clustering_iterations` (100): EM steps of the Gaussian mixture (soft k-means iterations after k-means++).
    - `fine_tune_epochs` (0): epochs of end-to-end training on `pipeline_loss` after the stages.
    - `fine_tune_weights` (None): the `PipelineLossWeights` of the end-to-end loss (default weights if None).
    - `batch_size` (128), `learning_rate` (1e-3): for the minibatch stages.
    """

    ambient_epochs: int | None = None
    vae_epochs: int | None = None
    umap_epochs: int | None = None
    umap_max_cells: int | None = None
    clustering_iterations: int = 100
    fine_tune_epochs: int = 0
    fine_tune_weights: PipelineLossWeights | None = None
    batch_size: int = 128
    learning_rate: float = 1e-3

    def replace(self, **changes: Any) -> "FitSettings":
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"fit_pipeline: unknown setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class PipelineFit:
    """What `fit_pipeline` returns.

    - `pipeline`: the trained pipeline (with `harmony_reference` set when batch correction is on).
    - `curves`: per stage, its per-epoch loss curves (`{"vae_normalizer": {"train": ..., "validation": ...}, ...}`).
    - `seconds`: wall time of each stage's training, in seconds.
    """

    pipeline: SingleCellPipeline
    curves: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]


@dataclasses.dataclass(frozen=True)
class _FitRecord:
    """What `fit_pipeline` has done so far: the stages finished (and saved in the checkpoint), the loss curves and
    the seconds of each stage. Immutable: each step returns a new record. Saved as JSON in the checkpoint's
    header, so a resumed run skips the finished stages and reports the same curves."""

    done: tuple[str, ...] = ()
    curves: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def timed(self, stage: str, started: float, curves: Mapping[str, np.ndarray] | None = None) -> "_FitRecord":
        """The record with `stage`'s seconds since `started` (and its curves, if given)."""
        seconds = {**self.seconds, stage: time.perf_counter() - started}
        return dataclasses.replace(self, seconds=seconds,
                                   curves=self.curves if curves is None else {**self.curves, stage: curves})

    def finished(self, stage: str) -> "_FitRecord":
        return dataclasses.replace(self, done=(*self.done, stage))

    def to_json(self) -> dict[str, Any]:
        return {"done": list(self.done), "seconds": dict(self.seconds),
                "curves": {stage: {name: np.asarray(values).tolist() for name, values in curves.items()}
                           for stage, curves in self.curves.items()}}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> "_FitRecord":
        curves = {stage: {name: np.asarray(v, dtype=float) for name, v in stage_curves.items()}
                  for stage, stage_curves in values["curves"].items()}
        return cls(tuple(values["done"]), curves, dict(values["seconds"]))


class _StageKeys(NamedTuple):
    ambient: PRNGKeyArray
    vae: PRNGKeyArray
    harmony: PRNGKeyArray
    clustering: PRNGKeyArray
    fine_tune: PRNGKeyArray
    umap: PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class _FitInputs:
    """The validated inputs every step reads (never changed by a step)."""

    counts: np.ndarray | sp.csr_matrix  # float32 CSR kept sparse (rows densify one minibatch at a time)
    ambient_profile: Array
    batch_labels: Array
    raw_counts: Any
    cell_type_labels: np.ndarray | None
    settings: FitSettings
    keys: _StageKeys
    checkpoint_dir: pathlib.Path | None
    progress: bool

    def stage_checkpoint(self, name: str) -> dict[str, Any]:
        """The per-epoch checkpoint of a minibatch stage, inside the checkpoint folder."""
        if self.checkpoint_dir is None:
            return {}
        return {"checkpoint_path": self.checkpoint_dir / f"{name}.training.eqx", "resume": True}


def _is_integer(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= minimum)


def _check_fit_settings(pipeline: SingleCellPipeline, n_cells: int, settings: FitSettings) -> None:
    """Check what `fit_pipeline` needs before any stage trains, so a bad setting never fails half way through."""
    # None epochs: the stage's own heuristic (scVI's for the VAE, `ambient_default_epochs` for the ambient model)
    used = {"ambient_epochs": pipeline.ambient_removal is not None and settings.ambient_epochs is not None,
            "umap_epochs": pipeline.dim_reduction is not None and settings.umap_epochs is not None,
            "vae_epochs": settings.vae_epochs is not None}
    for name in ("ambient_epochs", "vae_epochs", "umap_epochs", "clustering_iterations", "batch_size"):
        value = getattr(settings, name)
        if used.get(name, True) and not _is_integer(value, 1):
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    max_cells = settings.umap_max_cells
    if pipeline.dim_reduction is not None and max_cells is not None and not (
        _is_integer(max_cells, 1) and max_cells > pipeline.dim_reduction.n_neighbors
    ):
        raise ValueError(f"umap_max_cells: must be None or an integer above umap_n_neighbors="
                         f"{pipeline.dim_reduction.n_neighbors}, got {max_cells!r}")
    if not _is_integer(settings.fine_tune_epochs, 0):
        raise ValueError(f"fine_tune_epochs: must be an integer >= 0, got {settings.fine_tune_epochs!r}")
    if not settings.learning_rate > 0:
        raise ValueError(f"learning_rate: must be > 0, got {settings.learning_rate!r}")
    _check_harmony_clusters(pipeline, n_cells)
    n_neighbors = pipeline.config.umap_n_neighbors
    if pipeline.dim_reduction is not None and n_cells <= n_neighbors:
        raise ValueError(f"counts: training the UMAP stage needs more than umap_n_neighbors={n_neighbors} cells, "
                         f"got {n_cells}")


def _fit_inputs(
    pipeline: SingleCellPipeline, data: Mapping[str, Any], settings: FitSettings, *, key: PRNGKeyArray,
    raw_counts: Any, cell_type_labels: ArrayLike | None, checkpoint_dir: str | pathlib.Path | None, progress: bool,
) -> _FitInputs:
    """Validate everything `fit_pipeline` is given, before any training."""
    counts, profile, labels = prepare_inputs(pipeline, data, keep_sparse=True, fitting=True)
    if not sp.issparse(counts):  # dense counts as before, in the pipeline's dtype
        counts = np.asarray(counts, dtype=pipeline.dtype)
    n_cells = counts.shape[0]
    _check_fit_settings(pipeline, n_cells, settings)
    if raw_counts is not None and pipeline.ambient_removal is not None:
        check_counts(raw_counts, field="raw_counts", allow_empty_cells=True, n_genes=pipeline.config.n_genes)
    if cell_type_labels is not None:
        n_types = pipeline.config.n_clusters
        if n_types is None:
            raise ValueError("cell_type_labels: supervised fine-tuning needs n_clusters given (one per cell type), "
                             "not None")
        # -1 marks an unlabelled cell (semi-supervised: held-out cells still train the VAE, not the cross-entropy)
        given = np.asarray(cell_type_labels)
        unlabelled = (given == -1) if given.dtype.kind in "iu" else np.zeros(given.shape, bool)
        cell_type_labels = np.asarray(check_batch_labels(np.where(unlabelled, 0, given), n_cells,
                                                         n_batches=n_types, field="cell_type_labels"))
        cell_type_labels = np.where(unlabelled, -1, cell_type_labels).astype(np.int32)
        if unlabelled.all():
            raise ValueError("cell_type_labels: every cell is unlabelled (-1); label some or pass None")
        if cell_type_labels.ndim != 1:
            raise ValueError(f"cell_type_labels: expected shape ({n_cells},), got {cell_type_labels.shape}")
    folder = None if checkpoint_dir is None else pathlib.Path(checkpoint_dir)
    return _FitInputs(counts, profile, labels, raw_counts, cell_type_labels, settings,
                      _StageKeys(*jr.split(key, 6)), folder, progress)


def _resume(pipeline: SingleCellPipeline, inputs: _FitInputs) -> tuple[SingleCellPipeline, _FitRecord]:
    """The pipeline and record saved in the checkpoint folder, if it holds a checkpoint of this function."""
    folder = inputs.checkpoint_dir
    if folder is None:
        return pipeline, _FitRecord()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "pipeline.eqx").is_file():
        return pipeline, _FitRecord()
    saved, header = _read_pipeline(folder / "pipeline.eqx")
    if header.get("progress") is None:  # a plain saved pipeline, not a checkpoint of `fit_pipeline`
        return pipeline, _FitRecord()
    return saved, _FitRecord.from_json(header["progress"])


def _checkpoint(pipeline: SingleCellPipeline, record: _FitRecord, stage: str, inputs: _FitInputs) -> _FitRecord:
    """Mark `stage` finished and save the pipeline with the record in one file, written atomically: a crash at any
    moment leaves a pipeline and a list of finished stages that belong together."""
    record = record.finished(stage)
    if inputs.checkpoint_dir is not None:
        _write_pipeline(inputs.checkpoint_dir / "pipeline.eqx", pipeline, progress=record.to_json())
    return record


def _loss_curves(result: Any) -> dict[str, np.ndarray]:
    curves = {"train": np.asarray(result.train_loss)}
    if np.any(np.isfinite(np.asarray(result.validation_loss))):
        curves["validation"] = np.asarray(result.validation_loss)
    return curves


@contextlib.contextmanager
def _decontaminated_counts_are_expected() -> Iterator[None]:
    # The VAE reads the ambient model's posterior expected counts, which are not whole numbers by design.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonIntegerCountsWarning)
        yield


#: Cells per compiled call when `fit_pipeline` maps all cells chunk by chunk (the decontaminated counts of sparse
#: input, the latent of every cell): only this many cells' counts are ever dense.
CHUNK_CELLS = 8192


def _decontaminated(pipeline: SingleCellPipeline, inputs: _FitInputs) -> np.ndarray | sp.csr_matrix:
    """The counts the VAE trains on: after ambient removal when it is on. Sparse counts stay sparse: the
    decontaminated counts lie in `[0, counts]`, so they share the counts' non-zero pattern (and index arrays), and
    only one chunk of cells is ever dense."""
    if pipeline.ambient_removal is None:
        return inputs.counts
    profile = np.asarray(inputs.ambient_profile)
    if not sp.issparse(inputs.counts):
        return np.asarray(remove_ambient(pipeline.ambient_removal, inputs.counts, profile).decontaminated_counts)
    counts = sp.csr_matrix(inputs.counts)
    n_cells = int(counts.shape[0])  # pyright: ignore[reportOptionalSubscript]  (scipy's stubs)
    values = np.empty_like(counts.data)
    for start in range(0, n_cells, CHUNK_CELLS):
        rows: Any = counts[start : start + CHUNK_CELLS]
        # Whole chunks keep one compiled shape: the last one is padded by repeating rows, then trimmed.
        padded = rows if rows.shape[0] == min(CHUNK_CELLS, n_cells) else sp.vstack(
            [rows, counts[: CHUNK_CELLS - rows.shape[0]]], format="csr")
        dense = np.asarray(remove_ambient(pipeline.ambient_removal, padded, profile,
                                          chunk_size=CHUNK_CELLS).decontaminated_counts)
        row_of = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
        values[counts.indptr[start] : counts.indptr[start + rows.shape[0]]] = dense[row_of, rows.indices]
    return sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape)


def _train_ambient(pipeline: SingleCellPipeline, record: _FitRecord,
                   inputs: _FitInputs) -> tuple[SingleCellPipeline, _FitRecord]:
    """Step 1: the ambient model on the raw counts."""
    if pipeline.ambient_removal is None or "ambient_removal" in record.done:
        return pipeline, record
    started = time.perf_counter()
    fitted = fit_ambient_removal(pipeline.ambient_removal, inputs.counts, np.asarray(inputs.ambient_profile),
                                 key=inputs.keys.ambient, raw_counts=inputs.raw_counts,
                                 settings=TrainSettings(n_epochs=inputs.settings.ambient_epochs,
                                                        batch_size=inputs.settings.batch_size, progress=inputs.progress,
                                                        **inputs.stage_checkpoint("ambient")))
    pipeline = eqx.tree_at(lambda p: p.ambient_removal, pipeline, fitted.model)
    record = record.timed("ambient_removal", started, _loss_curves(fitted))
    return pipeline, _checkpoint(pipeline, record, "ambient_removal", inputs)


def _fit_vae_with_correction(pipeline: SingleCellPipeline, x: Any, batch_labels: np.ndarray, *,
                             key: PRNGKeyArray, settings: TrainSettings) -> Any:
    """`fit_vae`, or with `batch_correction="mmd"` / `"adversarial"` (and several batches) the VAE trained with
    trVAE's MMD penalty (`fit_mmd_vae`) or against a WGAN-GP batch critic (`fit_adversarial_vae`)."""
    config, vae = pipeline.config, pipeline.vae_normalizer
    method = config.batch_correction_method if vae.n_batches > 1 else None
    if method == "mmd":
        return fit_mmd_vae(vae, x, batch_labels, key=key, settings=settings, beta=config.mmd_beta)
    if method == "adversarial":
        # No per-epoch checkpoints inside the adversarial loop (the pipeline's stage checkpoint still follows it).
        settings = dataclasses.replace(settings, checkpoint_path=None, resume=False)
        return fit_adversarial_vae(vae, x, batch_labels, key=key, settings=settings,
                                   adversarial_weight=config.adversarial_weight).fit
    return fit_vae(vae, x, batch_labels, key=key, settings=settings)


def _train_vae(pipeline: SingleCellPipeline, record: _FitRecord, inputs: _FitInputs,
               x: Any) -> tuple[SingleCellPipeline, _FitRecord]:
    """Step 2: the VAE on the decontaminated counts `x`."""
    if "vae_normalizer" in record.done:
        return pipeline, record
    started = time.perf_counter()
    with _decontaminated_counts_are_expected():
        settings = TrainSettings(n_epochs=inputs.settings.vae_epochs, batch_size=inputs.settings.batch_size,
                                 hyperparameters={"learning_rate": inputs.settings.learning_rate},
                                 progress=inputs.progress, **inputs.stage_checkpoint("vae"))
        fitted = _fit_vae_with_correction(pipeline, x, np.asarray(inputs.batch_labels), key=inputs.keys.vae,
                                          settings=settings)
    pipeline = eqx.tree_at(lambda p: p.vae_normalizer, pipeline, fitted.model)
    record = record.timed("vae_normalizer", started, _loss_curves(fitted))
    return pipeline, _checkpoint(pipeline, record, "vae_normalizer", inputs)


def _fit_harmony(pipeline: SingleCellPipeline, record: _FitRecord, inputs: _FitInputs,
                 x: Any) -> tuple[SingleCellPipeline, _FitRecord, Array]:
    """Step 3: Harmony on the whole latent of `x`; its centroids and ridge coefficients become the reference.
    Returns the corrected latent too (the latent itself when batch correction is off)."""
    with _decontaminated_counts_are_expected():
        latent = vae_latent(pipeline.vae_normalizer, x, np.asarray(inputs.batch_labels), chunk_size=CHUNK_CELLS)
    if pipeline.batch_correction is None:
        return pipeline, record, latent
    started = time.perf_counter()
    result = pipeline.batch_correction.run(latent, inputs.batch_labels, key=inputs.keys.harmony)
    pipeline = eqx.tree_at(lambda p: p.harmony_reference, pipeline, HarmonyReference.from_result(result),
                           is_leaf=lambda node: node is None)
    objective = np.asarray(result.objective)[: int(result.n_rounds)]
    return pipeline, record.timed("batch_correction", started, {"objective": objective}), result.z_corr


def _fit_clustering(pipeline: SingleCellPipeline, record: _FitRecord, inputs: _FitInputs,
                    corrected: Array) -> tuple[SingleCellPipeline, _FitRecord]:
    """Step 4: the clustering stage on the corrected latent, at its temperature: a Gaussian mixture initialised
    from graph communities (`fit_gaussian_mixture`), or soft k-means after k-means++. With `n_clusters=None`
    the mixture chooses the number (`select_n_clusters`), written into the returned pipeline's config."""
    if pipeline.clustering is None:
        return pipeline, record
    started = time.perf_counter()
    key, n_iter = inputs.keys.clustering, inputs.settings.clustering_iterations
    if _supervised(inputs) and inputs.cell_type_labels is not None:  # cluster k = type k, on the labelled cells
        model = clustering_from_labels(pipeline.clustering, corrected, inputs.cell_type_labels)
        return eqx.tree_at(lambda p: p.clustering, pipeline, model), record.timed("clustering", started)
    if isinstance(pipeline.clustering, SoftKMeans):
        fitted = fit_soft_kmeans(pipeline.clustering, corrected, key=key, n_iter=n_iter)
        return eqx.tree_at(lambda p: p.clustering, pipeline, fitted.model), record.timed("clustering", started)
    chosen = pipeline.config.n_clusters is None
    stage = None if chosen else pipeline.clustering
    fitted = fit_gaussian_mixture(stage, corrected, key=key, n_iter=n_iter)
    model = eqx.tree_at(lambda m: m.temperature, fitted.model, pipeline.clustering.temperature)
    if chosen:
        pipeline = with_config(pipeline, pipeline.config.replace(n_clusters=model.n_clusters))
    pipeline = eqx.tree_at(lambda p: p.clustering, pipeline, model)
    curve = np.asarray(fitted.train_loss)[: max(fitted.n_epochs_run, 1)]
    return pipeline, record.timed("clustering", started, {"objective": curve})


def _supervised(inputs: _FitInputs) -> bool:
    """Supervised fine-tuning: cell types given, fine-tuning asked for, a non-zero supervised weight."""
    weights = inputs.settings.fine_tune_weights
    return (inputs.cell_type_labels is not None and inputs.settings.fine_tune_epochs > 0
            and weights is not None and float(weights.supervised) != 0.0)


def _trainable_filter(pipeline: SingleCellPipeline) -> SingleCellPipeline:
    """The leaves end-to-end training updates: network weights, dispersions and centroids; not the
    hyperparameters (Harmony's settings, temperatures, target library size) nor the stored Harmony reference, nor,
    after adversarial correction, the VAE's encoder."""
    spec = jtu.tree_map(lambda _: False, pipeline)
    arrays = lambda module: jtu.tree_map(eqx.is_inexact_array, module)
    if pipeline.ambient_removal is not None:
        ambient_spec = eqx.tree_at(
            lambda a: (a.prior_contamination, a.prior_ambient_count, a.prior_log_scale),
            arrays(pipeline.ambient_removal), (False, False, False),
        )
        spec = eqx.tree_at(lambda s: s.ambient_removal, spec, ambient_spec)
    vae_spec = eqx.tree_at(lambda v: v.target_library_size, arrays(pipeline.vae_normalizer), False)
    if pipeline.config.batch_correction_method == "adversarial" and pipeline.vae_normalizer.n_batches > 1:
        # The encoder carries the adversarial correction and the critic that kept it is not part of the pipeline:
        # on the ELBO alone the encoder learns the batches back (iLISI 0.55 -> 0.08, 0.44 -> 0.26 in 10 epochs)
        vae_spec = eqx.tree_at(lambda v: (v.encoder, v.mean_head, v.log_variance_head), vae_spec,
                               replace_fn=lambda part: jtu.tree_map(lambda _: False, part))
    spec = eqx.tree_at(lambda s: s.vae_normalizer, spec, vae_spec)
    if pipeline.dim_reduction is not None:
        spec = eqx.tree_at(lambda s: s.dim_reduction.encoder, spec, arrays(pipeline.dim_reduction.encoder))
    if pipeline.clustering is not None:
        trained = "centroids" if isinstance(pipeline.clustering, SoftKMeans) else "means"
        spec = eqx.tree_at(lambda s: getattr(s.clustering, trained), spec, True)
    return spec


def _fine_tune_loss(pipeline, batch, context, *, key):
    weights, ambient_profile, kl_weight = context
    counts, batch_labels, cell_type_labels = batch
    return pipeline_loss(pipeline, counts, ambient_profile, batch_labels, key=key, weights=weights,
                         cell_type_labels=cell_type_labels, kl_weight=kl_weight)


def _fine_tune(pipeline: SingleCellPipeline, record: _FitRecord,
               inputs: _FitInputs) -> tuple[SingleCellPipeline, _FitRecord]:
    """Step 5 (optional): every trainable stage end to end on `pipeline_loss`, supervised by the cell types when
    they are given."""
    if "end_to_end" in record.done:
        return pipeline, record
    started = time.perf_counter()
    settings, types = inputs.settings, inputs.cell_type_labels
    weights = PipelineLossWeights() if settings.fine_tune_weights is None else settings.fine_tune_weights
    if types is None:
        types = np.zeros(inputs.batch_labels.shape[0], np.int32)
        weights = eqx.tree_at(lambda w: w.supervised, weights, jnp.zeros((), weights.supervised.dtype))
    # Adam with its learning rate in the state (one shared object: the compiled epoch is reused across calls).
    loop = TrainSettings(n_epochs=settings.fine_tune_epochs, batch_size=settings.batch_size,
                         optimizer=shared_optimizer("adam"), hyperparameters={"learning_rate": settings.learning_rate},
                         progress=inputs.progress, description="end-to-end")
    counts: Any = inputs.counts
    if sp.issparse(counts):  # on the device once, in the pipeline's dtype, densified a minibatch at a time
        counts = sparse_rows_from_csr(counts, dtype=pipeline.dtype)
    fitted = fit(pipeline, _fine_tune_loss, (counts, np.asarray(inputs.batch_labels), types),
                 key=inputs.keys.fine_tune, settings=loop,
                 context=(weights, inputs.ambient_profile, jnp.ones((), pipeline.dtype)),
                 trainable=_trainable_filter(pipeline))
    record = record.timed("end_to_end", started, _loss_curves(fitted))
    return fitted.model, _checkpoint(fitted.model, record, "end_to_end", inputs)


def _train_umap(pipeline: SingleCellPipeline, record: _FitRecord, inputs: _FitInputs,
                corrected: Array) -> tuple[SingleCellPipeline, _FitRecord]:
    """Step 6: the parametric UMAP encoder on the corrected latent; the graph is built on all cells (or at most
    `umap_max_cells`), and the encoder embeds every cell."""
    if pipeline.dim_reduction is None or "dim_reduction" in record.done:
        return pipeline, record
    started = time.perf_counter()
    max_cells, graph_cells = inputs.settings.umap_max_cells, corrected
    if max_cells is not None and corrected.shape[0] > max_cells:
        # Asked for: train the encoder on a random subsample; it embeds every cell.
        chosen = jr.choice(jr.fold_in(inputs.keys.umap, 1), corrected.shape[0], (max_cells,), replace=False)
        graph_cells = corrected[jnp.sort(chosen)]
    loop = TrainSettings(n_epochs=inputs.settings.umap_epochs, progress=inputs.progress)
    fitted = _umap_stage.fit_umap(pipeline.dim_reduction, graph_cells, key=inputs.keys.umap, settings=loop)
    pipeline = eqx.tree_at(lambda p: p.dim_reduction, pipeline, fitted.model)
    record = record.timed("dim_reduction", started, {"train": np.asarray(fitted.train_loss)})
    return pipeline, _checkpoint(pipeline, record, "dim_reduction", inputs)


def fit_pipeline(
    pipeline: SingleCellPipeline,
    data: Mapping[str, Any],
    *,
    key: PRNGKeyArray,
    settings: FitSettings | None = None,
    raw_counts: Any = None,
    cell_type_labels: ArrayLike | None = None,
    progress: bool = True,
    checkpoint_dir: str | pathlib.Path | None = None,
    **overrides: Any,
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
    6. The parametric UMAP encoder on the corrected latent: its fuzzy graph is built on every cell (exact kNN
       up to 100,000 cells on CPU and 8,192 on GPU/TPU, approximate above: pynndescent on CPU, approximate top-k
       on GPU/TPU), or on at most `umap_max_cells` drawn at random when that is set, and the trained encoder
       embeds every cell.

    **Arguments:**

    - `pipeline`, `data`: as in `run_pipeline`.
    - `key`: makes the whole run reproducible. (Keyword only argument.)
    - `settings`: a `FitSettings` (epochs per stage, `batch_size`, `learning_rate`, fine-tuning); its fields may
      also be given one by one as keyword arguments (`vae_epochs=200`), which replace those of `settings`.
    - `raw_counts`: the unfiltered matrix for the ambient model's prior, optional.
    - `cell_type_labels`: `(n_cells,)` codes in `[0, n_clusters)` for supervised fine-tuning, optional; -1 marks
      an unlabelled cell (it trains the unsupervised losses only: semi-supervised, e.g. held-out cells). With
      labels, `fine_tune_epochs > 0` and a non-zero `fine_tune_weights.supervised`, the clustering stage starts
      with cluster k on the labelled cells of type k (their mean, variances and share) instead of being fitted
      unsupervised, and is not refitted after fine-tuning, so `argmax(cluster_assignments)` predicts the type
      (a refit would renumber the clusters). `benchmarks/study_end_to_end.py` measures what this buys.
    - `progress`: show a bar per stage.
    - `checkpoint_dir`: save the pipeline after every trained stage (and the ambient and VAE training after
      every epoch), and resume from there when called again with the same arguments: the result is identical to
      an uninterrupted run. Files are written atomically.

    **Returns:** a `PipelineFit` (trained pipeline, loss curves, seconds per stage).
    """
    settings = (FitSettings() if settings is None else settings).replace(**overrides)
    inputs = _fit_inputs(pipeline, data, settings, key=key, raw_counts=raw_counts, cell_type_labels=cell_type_labels,
                         checkpoint_dir=checkpoint_dir, progress=progress)
    pipeline, record = _resume(pipeline, inputs)
    pipeline, record = _train_ambient(pipeline, record, inputs)
    x = _decontaminated(pipeline, inputs)
    pipeline, record = _train_vae(pipeline, record, inputs, x)
    pipeline, record, corrected = _fit_harmony(pipeline, record, inputs, x)
    pipeline, record = _fit_clustering(pipeline, record, inputs, corrected)
    if settings.fine_tune_epochs:
        pipeline, record = _fine_tune(pipeline, record, inputs)
        x = _decontaminated(pipeline, inputs)
        pipeline, record, corrected = _fit_harmony(pipeline, record, inputs, x)
        if not _supervised(inputs):  # supervised: the tuned clusters are the cell types; a refit would lose that
            pipeline, record = _fit_clustering(pipeline, record, inputs, corrected)
    pipeline, record = _train_umap(pipeline, record, inputs, corrected)
    return PipelineFit(pipeline, {stage: dict(c) for stage, c in record.curves.items()}, dict(record.seconds))
