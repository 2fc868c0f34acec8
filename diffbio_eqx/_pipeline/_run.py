"""Inputs checked on the host, then the one compiled call: `run_pipeline`, and `run_pipeline_in_chunks` for any
number of cells."""

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._ambient._stage import AmbientProfileWarning
from .._core._train import _host_rows, map_in_chunks
from .._core._validate import _is_traced, check_ambient_profile, check_batch_labels, check_counts, check_n_clusters
from ._model import PipelineOutput, SingleCellPipeline


def prepare_inputs(
    pipeline: SingleCellPipeline, data: Mapping[str, Any], *, warn_profile: bool = True, keep_sparse: bool = False,
    fitting: bool = False,
) -> tuple[Any, Array, Array]:
    """Validate the seed's input dict (`counts`, optional `ambient_profile` and `batch_labels`) for `pipeline`.

    Counts may be dense or SciPy sparse (densified here: the whole-dataset entry point holds them in memory).
    Without `ambient_profile`, the pooled expression of the cells is used (with a warning when ambient removal
    is on); without `batch_labels`, every cell is batch 0. With `keep_sparse`, the counts are returned as the
    checked host matrix (float32 NumPy or CSR) for chunked processing. With `fitting`, there must be at least as
    many cells as clusters to fit (running a fitted pipeline assigns any number of cells).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected a mapping with 'counts' (and optionally 'ambient_profile', "
                         f"'batch_labels'), got {type(data).__name__}")
    unknown = sorted(set(data) - {"counts", "ambient_profile", "batch_labels"})
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; expected 'counts', 'ambient_profile', 'batch_labels'")
    if "counts" not in data:
        raise ValueError("data: missing 'counts'")
    config = pipeline.config
    counts = check_counts(data["counts"], n_genes=config.n_genes)
    if isinstance(counts, sp.csr_matrix) and not keep_sparse:
        counts = counts.toarray()
    n_cells = counts.shape[0]  # pyright: ignore[reportOptionalSubscript]  (scipy's stubs: shape may be None)
    profile = data.get("ambient_profile")
    if profile is None:
        if pipeline.ambient_removal is not None and warn_profile:
            warnings.warn("ambient_profile: not given; using the pooled expression of the cells",
                          AmbientProfileWarning, stacklevel=3)
        profile = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel() + 1e-3
    profile = check_ambient_profile(profile, config.n_genes)
    labels = data.get("batch_labels")
    labels = np.zeros(n_cells, np.int32) if labels is None else labels
    labels = check_batch_labels(labels, n_cells, n_batches=config.n_batches)
    if labels.ndim != 1:
        raise ValueError(f"batch_labels: the pipeline takes one batch covariate, shape ({n_cells},)")
    if fitting and pipeline.clustering is not None:  # fitting k clusters needs k cells; assigning cells does not
        check_n_clusters(n_cells, pipeline.clustering.n_clusters)
    dtype = pipeline.dtype
    host_counts = counts if keep_sparse else jnp.asarray(counts, dtype=dtype)
    return host_counts, jnp.asarray(profile, dtype=dtype), jnp.asarray(labels)


def _check_harmony_clusters(pipeline: SingleCellPipeline, n_cells: int) -> None:
    # Harmony runs on these cells (training, or inference without a stored reference): K <= n_cells.
    k = pipeline.config.batch_correction_clusters
    if pipeline.batch_correction is not None and k is not None and k > n_cells:
        raise ValueError(f"batch_correction_clusters: Harmony asked for {k} clusters but there are only "
                         f"{n_cells} cells; lower it or set it to None (Harmony's min(round(N / 30), 100))")


@eqx.filter_jit
def _run_compiled(
    pipeline: SingleCellPipeline, counts: Float[Array, "n_cells n_genes"], ambient_profile: Float[Array, " n_genes"],
    batch_labels: Int[Array, " n_cells"], key: PRNGKeyArray, inference: bool, check: bool = True,
) -> PipelineOutput:
    # `check` (static) False: `run_pipeline` checked the inputs and the settings on the host, so the program has no
    # in-program checks, whose host callbacks would keep it out of JAX's persistent compilation cache.
    return pipeline._forward(counts, ambient_profile, batch_labels, key=key, inference=inference, check=check)


def _checked_on_host(pipeline: SingleCellPipeline, *arrays: Any) -> bool:
    """Whether the host has checked all that the stages' in-program checks test: the inputs (`prepare_inputs`
    checks concrete ones) and the settings (`check_settings`); False when any of them is traced."""
    if any(_is_traced(array) for array in arrays):
        return False
    return pipeline.check_settings()


def run_pipeline(
    pipeline: SingleCellPipeline, data: Mapping[str, Any], *, key: PRNGKeyArray, inference: bool = True
) -> PipelineOutput:
    """Run the whole pipeline on a dataset in one compiled call.

    **Arguments:**

    - `pipeline`: a `SingleCellPipeline` (usually trained with `fit_pipeline`).
    - `data`: `{"counts": (n_cells, n_genes), "ambient_profile": (n_genes,), "batch_labels": (n_cells,)}`;
      the last two are optional.
    - `key`: PRNG key (Harmony's initialisation when it runs, posterior draws when not `inference`).
      (Keyword only argument.)
    - `inference`: deterministic posterior means, and new cells mapped onto the trained Harmony reference.

    **Returns:** a `PipelineOutput`.

    Inputs are validated on the host first (a `ValueError` names the field and the problem); the numerics are
    one `eqx.filter_jit`-compiled function, compiled once per input shape and reused across parameter values.
    The whole dataset is dense in this one call (SciPy sparse counts are densified): for large data use
    `run_pipeline_in_chunks` / `pipeline_chunks`, which `io.infer` (and so `fit_anndata`, `run_anndata` and
    `diffbio-eqx run`) choose automatically above `io.CHUNKED_ABOVE` count entries.
    """
    counts, profile, labels = prepare_inputs(pipeline, data)
    checked = _checked_on_host(pipeline, counts, profile, labels)
    if not inference or pipeline.harmony_reference is None:
        _check_harmony_clusters(pipeline, counts.shape[0])
    return _run_compiled(pipeline, counts, profile, labels, key, inference, not checked)


#: The per-cell outputs `run_pipeline_in_chunks` returns by default (the `(n_cells, n_genes)` ones are left out).
CELL_OUTPUTS = ("latent", "corrected_embeddings", "embeddings_2d", "cluster_assignments")


@eqx.filter_jit
def _run_chunk(batch: tuple[Array, Array], context: tuple[Any, ...]) -> dict[str, Array]:
    pipeline, ambient_profile, key, names, check = context
    counts, labels = batch
    # `check` (static) False: the callers checked the inputs and the settings on the host (see `_run_compiled`).
    output = pipeline._forward(counts.astype(pipeline.dtype), ambient_profile, labels, key=key, inference=True,
                               check=check)
    return {name: output[name] for name in names}


def _check_chunked(pipeline: SingleCellPipeline, outputs: tuple[str, ...]) -> None:
    if pipeline.batch_correction is not None and pipeline.harmony_reference is None:
        raise ValueError("pipeline: batch correction is on but there is no harmony_reference to map cells onto; "
                         "train with fit_pipeline, or use run_pipeline (Harmony on the whole dataset)")
    known = [f.name for f in dataclasses.fields(PipelineOutput)]
    unknown = [name for name in outputs if name not in known]
    if unknown or not outputs:
        raise ValueError(f"outputs: unknown or empty {unknown or list(outputs)}; choose from {known}")
    if "decontaminated_counts" in outputs and pipeline.ambient_removal is None:
        raise ValueError("outputs: 'decontaminated_counts' needs ambient removal to be enabled")


def pipeline_chunks(
    pipeline: SingleCellPipeline,
    data: Mapping[str, Any],
    *,
    key: PRNGKeyArray,
    chunk_size: int = 4096,
    outputs: tuple[str, ...] = CELL_OUTPUTS,
    warn_profile: bool = True,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """`run_pipeline_in_chunks` as a stream: yields `(first_cell, {name: host array of the chunk's cells})`, one
    chunk at a time, so that `(n_cells, n_genes)` outputs can be written to a file as they come and are never
    whole in memory. Same arguments and numbers as `run_pipeline_in_chunks` (one compiled shape: the last chunk
    is padded and trimmed); `warn_profile=False` drops the warning about a missing ambient profile (for a second
    pass over the same data)."""
    _check_chunked(pipeline, tuple(outputs))
    counts, profile, labels = prepare_inputs(pipeline, data, keep_sparse=True, warn_profile=warn_profile)
    check = not _checked_on_host(pipeline, profile)
    labels = np.asarray(labels)
    n_cells = counts.shape[0]
    size = max(1, min(chunk_size, n_cells))
    for start in range(0, n_cells, size):
        batch = (jnp.asarray(_host_rows(counts, start, size)), jnp.asarray(_host_rows(labels, start, size)))
        output = _run_chunk(batch, (pipeline, profile, key, tuple(outputs), check))
        keep = min(size, n_cells - start)
        yield start, {name: np.asarray(value[:keep]) for name, value in output.items()}


def run_pipeline_in_chunks(
    pipeline: SingleCellPipeline,
    data: Mapping[str, Any],
    *,
    key: PRNGKeyArray,
    chunk_size: int = 4096,
    outputs: tuple[str, ...] = CELL_OUTPUTS,
    devices: Any = None,
) -> dict[str, Array]:
    """Run a trained pipeline's inference on any number of cells, a fixed-size chunk at a time.

    In inference every stage is per cell (ambient posterior, VAE posterior mean, mapping onto the stored
    Harmony reference, encoder, soft assignments), so chunking gives the same numbers as `run_pipeline` with
    memory bounded by the chunk. Counts may be SciPy sparse: they are densified one chunk at a time.

    **Arguments:**

    - `pipeline`: a trained pipeline; with batch correction on it needs `harmony_reference` (`fit_pipeline`
      sets it), since Harmony itself needs the whole dataset.
    - `data`: as in `run_pipeline`.
    - `key`: PRNG key (unused by the deterministic inference path; kept for the common signature).
    - `chunk_size`: cells per compiled call.
    - `outputs`: which `PipelineOutput` fields to return (default the per-cell low-dimensional ones; adding
      `"normalized"` or `"decontaminated_counts"` returns `(n_cells, n_genes)` arrays).
    - `devices`: split every chunk along its cells over several devices (`"all"`, a sequence of devices or
      a 1-D mesh; see `map_in_chunks`): data-parallel inference.

    **Returns:** a dict from output name to array.
    """
    _check_chunked(pipeline, tuple(outputs))
    counts, profile, labels = prepare_inputs(pipeline, data, keep_sparse=True)
    check = not _checked_on_host(pipeline, profile)
    return map_in_chunks(_run_chunk, (counts, np.asarray(labels)), chunk_size=chunk_size,
                         context=(pipeline, profile, key, tuple(outputs), check), devices=devices)
