"""Saving and loading a pipeline: a JSON header line, then the leaves (`eqx.tree_serialise_leaves`)."""

import json
import pathlib
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr

from ._config import SingleCellPipelineConfig
from ._model import HarmonyReference, SingleCellPipeline


def _skeleton(config: SingleCellPipelineConfig, n_reference_clusters: int | None, dtype: Any) -> SingleCellPipeline:
    def build():
        pipeline = SingleCellPipeline(config, key=jr.key(0), dtype=dtype)
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
    """Save a (trained) pipeline: a JSON header line with the config, then the leaves (`eqx.tree_serialise_leaves`).

    The file is written to a temporary name and renamed, so it is never half-written.
    """
    return _write_pipeline(path, pipeline)


def _write_pipeline(path: str | pathlib.Path, pipeline: SingleCellPipeline,
                    extra: dict[str, Any] | None = None) -> pathlib.Path:
    reference = pipeline.harmony_reference
    header = {
        "format": "diffbio_eqx.pipeline/1",
        "config": pipeline.config.to_dict(),
        "dtype": str(pipeline.dtype),
        "harmony_reference_clusters": None if reference is None else int(reference.centroids.shape[0]),
        **(extra or {}),
    }
    from ..io import atomic_path  # TEMPORARY: until the core's atomic writer lands

    target = pathlib.Path(path)
    with atomic_path(target) as temporary:
        with open(temporary, "wb") as handle:
            handle.write((json.dumps(header) + "\n").encode())
            eqx.tree_serialise_leaves(handle, pipeline)
    return target


def load_pipeline(path: str | pathlib.Path) -> SingleCellPipeline:
    """Load a pipeline written by `save_pipeline`."""
    return _read_pipeline(path)[0]


def _read_pipeline(path: str | pathlib.Path) -> tuple[SingleCellPipeline, dict[str, Any]]:
    source = pathlib.Path(path)
    if not source.is_file():
        raise ValueError(f"checkpoint: {str(source)!r} does not exist")
    with open(source, "rb") as handle:
        try:
            header = json.loads(handle.readline().decode())
            if header.get("format") != "diffbio_eqx.pipeline/1":
                raise ValueError("unknown format")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"checkpoint: {str(source)!r} is not a diffbio_eqx pipeline file ({error})") from None
        config = SingleCellPipelineConfig.from_dict(header["config"])
        like = _skeleton(config, header["harmony_reference_clusters"], header["dtype"])
        try:
            return eqx.tree_deserialise_leaves(handle, like), header
        except Exception as error:  # truncated or mismatched file
            raise ValueError(f"checkpoint: {str(source)!r} could not be read ({type(error).__name__}: {error}); "
                             "it may be truncated") from None
