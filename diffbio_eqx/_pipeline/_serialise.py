"""Saving and loading a pipeline: a JSON header line, then the leaves (`eqx.tree_serialise_leaves`).

The header holds what rebuilds the pipeline's structure (the config, the dtype, the number of Harmony reference
clusters, the genes), the settings it ran with (`SingleCellPipeline.settings()`, for people reading the file),
and, in `fit_pipeline`'s checkpoints, the training progress.
"""

import pathlib
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr

from .._core._checkpoint import read_header, save_leaves
from ._config import SingleCellPipelineConfig
from ._model import HarmonyReference, SingleCellPipeline


def _skeleton(config: SingleCellPipelineConfig, n_reference_clusters: int | None, dtype: Any,
              genes: Sequence[str] | None, batches: Sequence[str] | None = None) -> SingleCellPipeline:
    def build():
        pipeline = SingleCellPipeline(config, key=jr.key(0), dtype=dtype, genes=genes, batches=batches)
        if n_reference_clusters is not None:
            d = config.latent_dim
            reference = HarmonyReference(
                jnp.zeros((n_reference_clusters, d), dtype=pipeline.dtype),
                jnp.zeros((n_reference_clusters, config.n_batches, d), dtype=pipeline.dtype),
                jnp.zeros((), pipeline.dtype), (config.n_batches,),
            )
            pipeline = eqx.tree_at(lambda p: p.harmony_reference, pipeline, reference,
                                   is_leaf=lambda node: node is None)
        return pipeline

    return eqx.filter_eval_shape(build)


def save_pipeline(path: str | pathlib.Path, pipeline: SingleCellPipeline) -> pathlib.Path:
    """Save a (trained) pipeline: a JSON header line (config, genes, batches, settings), then the leaves
    (`eqx.tree_serialise_leaves`).

    The file is written to a temporary name and renamed, so it is never half-written.
    """
    return _write_pipeline(path, pipeline)


def _write_pipeline(path: str | pathlib.Path, pipeline: SingleCellPipeline, *,
                    progress: dict[str, Any] | None = None) -> pathlib.Path:
    reference = pipeline.harmony_reference
    header = {
        "format": "diffbio_eqx.pipeline/1",
        "config": pipeline.config.to_dict(),
        "dtype": str(pipeline.dtype),
        "harmony_reference_clusters": None if reference is None else int(reference.centroids.shape[0]),
        "genes": None if pipeline.genes is None else list(pipeline.genes),
        "batches": None if pipeline.batches is None else list(pipeline.batches),
        "settings": pipeline.settings(),
    }
    if progress is not None:
        header["progress"] = progress
    return save_leaves(path, pipeline, header=header)


def load_pipeline(path: str | pathlib.Path) -> SingleCellPipeline:
    """Load a pipeline written by `save_pipeline`."""
    return _read_pipeline(path)[0]


def _read_pipeline(path: str | pathlib.Path) -> tuple[SingleCellPipeline, dict[str, Any]]:
    source = pathlib.Path(path)
    if not source.is_file():
        raise ValueError(f"checkpoint: {str(source)!r} does not exist")
    with open(source, "rb") as handle:
        try:
            header = read_header(handle)
            if header.get("format") != "diffbio_eqx.pipeline/1":
                raise ValueError("unknown format")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"checkpoint: {str(source)!r} is not a diffbio_eqx pipeline file ({error})") from None
        config = SingleCellPipelineConfig.from_dict(header["config"])
        like = _skeleton(config, header["harmony_reference_clusters"], header["dtype"], header.get("genes"),
                         header.get("batches"))
        try:
            return eqx.tree_deserialise_leaves(handle, like), header
        except Exception as error:  # truncated or mismatched file
            raise ValueError(f"checkpoint: {str(source)!r} could not be read ({type(error).__name__}: {error}); "
                             "it may be truncated") from None
