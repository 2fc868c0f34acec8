"""The single-cell pipeline: configuration, composition of the five stages, and the one compiled entry point.

```
counts ─ AmbientRemoval ─ VAENormalizer ─ Harmony ─┬─ ParametricUMAP ─► embeddings_2d
                                                   └─ SoftKMeans ─────► cluster_assignments
```
A disabled stage passes its input on unchanged. Clustering reads the corrected embeddings, not the 2-D map.
"""

import contextlib
import dataclasses
import functools as ft
import json
import pathlib
import time
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._ambient._stage import (
    AmbientProfileWarning,
    AmbientRemoval,
    fit_ambient_removal,
    remove_ambient,
)
from .._clustering._stage import SoftKMeans
from .._core._train import fit, map_in_chunks
from .._core._validate import (
    NonIntegerCountsWarning,
    check_ambient_profile,
    check_batch_labels,
    check_counts,
    check_n_clusters,
)
from .._harmony._math import HarmonyResult, map_to_reference
from .._harmony._stage import Harmony
from .._umap._stage import ParametricUMAP, umap_graph
from .._vae._stage import VAENormalizer, fit_vae, vae_transform
from ..io import atomic_path, from_anndata, to_anndata


@dataclasses.dataclass(frozen=True)
class SingleCellPipelineConfig:
    """Everything that fixes the pipeline's shapes and stages (hashable, so it is static under `jit`).

    The first twelve fields and their defaults are the seed's:

    - `n_genes` (2000): genes in the count matrix.
    - `n_clusters` (10): soft k-means clusters.
    - `latent_dim` (64): VAE latent dimension.
    - `hidden_dims` ((128, 64)): VAE encoder layer widths (the decoder mirrors them).
    - `umap_n_components` (2): dimension of the parametric UMAP embedding.
    - `batch_correction_clusters` (100): Harmony's K; `None` uses Harmony's `min(round(N / 30), 100)`.
    - `batch_correction_iterations` (10): Harmony's outer rounds (`max_iter_harmony`).
    - `clustering_temperature` (1.0): soft k-means temperature, in squared-distance units.
    - `enable_ambient_removal`, `enable_batch_correction`, `enable_dim_reduction`, `enable_clustering` (True).

    Then:

    - `n_batches` (1): batch categories in `batch_labels`.
    - `likelihood` ("nb"): the VAE's count likelihood, `"nb"`, `"zinb"` or `"poisson"`.
    - `dropout_rate` (0.1), `use_layer_norm` (False): VAE encoder settings.
    - `ambient_latent_dim` (10), `ambient_hidden_dim` (128): the ambient model's sizes.
    - `harmony_theta` (2.0), `harmony_sigma` (0.1), `harmony_preset` ("harmony2"): Harmony settings.
    - `umap_n_neighbors` (15), `umap_min_dist` (0.1), `umap_hidden_size` (100), `umap_depth` (3): parametric
      UMAP settings (umap-learn's defaults).
    """

    n_genes: int = 2000
    n_clusters: int = 10
    latent_dim: int = 64
    hidden_dims: tuple[int, ...] = (128, 64)
    umap_n_components: int = 2
    batch_correction_clusters: int | None = 100
    batch_correction_iterations: int = 10
    clustering_temperature: float = 1.0
    enable_ambient_removal: bool = True
    enable_batch_correction: bool = True
    enable_dim_reduction: bool = True
    enable_clustering: bool = True
    n_batches: int = 1
    likelihood: Literal["nb", "zinb", "poisson"] = "nb"
    dropout_rate: float = 0.1
    use_layer_norm: bool = False
    ambient_latent_dim: int = 10
    ambient_hidden_dim: int = 128
    harmony_theta: float = 2.0
    harmony_sigma: float = 0.1
    harmony_preset: Literal["harmony2", "classic"] = "harmony2"
    umap_n_neighbors: int = 15
    umap_min_dist: float = 0.1
    umap_hidden_size: int = 100
    umap_depth: int = 3

    def __post_init__(self):
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        positive = {
            "n_genes": self.n_genes, "n_clusters": self.n_clusters, "latent_dim": self.latent_dim,
            "umap_n_components": self.umap_n_components, "n_batches": self.n_batches,
            "batch_correction_iterations": self.batch_correction_iterations,
            "umap_n_neighbors": self.umap_n_neighbors,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims: need at least one positive width, got {self.hidden_dims}")
        if self.batch_correction_clusters is not None and self.batch_correction_clusters < 1:
            raise ValueError(f"batch_correction_clusters: must be >= 1 or None, got {self.batch_correction_clusters}")
        if not self.clustering_temperature > 0:
            raise ValueError(f"clustering_temperature: must be > 0, got {self.clustering_temperature}")
        if self.likelihood not in ("nb", "zinb", "poisson"):
            raise ValueError(f"likelihood: must be 'nb', 'zinb' or 'poisson', got {self.likelihood!r}")
        if self.harmony_preset not in ("harmony2", "classic"):
            raise ValueError(f"harmony_preset: must be 'harmony2' or 'classic', got {self.harmony_preset!r}")

    def replace(self, **changes: Any) -> "SingleCellPipelineConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SingleCellPipelineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown setting(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "hidden_dims" in values:
            values["hidden_dims"] = tuple(values["hidden_dims"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "SingleCellPipelineConfig":
        """Read a `.json` or `.toml` file of settings (a `[pipeline]` table in TOML, or top level)."""
        return cls.from_dict(cls.settings_in_file(path))

    @classmethod
    def settings_in_file(cls, path: str | pathlib.Path) -> dict[str, Any]:
        """Only the settings a `.json` or `.toml` file gives (checked against the config's fields), without the
        defaults, so they can override another set of settings."""
        source = pathlib.Path(path)
        if not source.is_file():
            raise ValueError(f"config: {str(source)!r} does not exist")
        text = source.read_text()
        try:
            values = tomllib.loads(text) if source.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"config: {str(source)!r} could not be parsed ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config: {str(source)!r} must hold a table of settings")
        values = values.get("pipeline", values)
        cls.from_dict(values)  # names and values checked here
        return dict(values)


class PipelineOutput(eqx.Module):
    """The pipeline's results, with the seed's names and shapes; also readable like a dict (`out["latent"]`).

    - `counts`: `(n_cells, n_genes)` the input counts.
    - `ambient_profile`: `(n_genes,)` the ambient profile used (normalised to sum 1).
    - `batch_labels`: `(n_cells,)` the batch codes used.
    - `decontaminated_counts`: `(n_cells, n_genes)` counts after ambient removal; only when it is enabled.
    - `normalized`: `(n_cells, n_genes)` VAE-normalised expression (expected frequencies x 1e4).
    - `latent`: `(n_cells, latent_dim)` VAE posterior means.
    - `corrected_embeddings`: `(n_cells, latent_dim)` after Harmony (the latent when disabled).
    - `embeddings_2d`: `(n_cells, umap_n_components)` parametric UMAP (the corrected embeddings when disabled).
    - `cluster_assignments`: `(n_cells, n_clusters)` soft assignments (the corrected embeddings when disabled).
    """

    counts: Float[Array, "n_cells n_genes"]
    ambient_profile: Float[Array, " n_genes"]
    batch_labels: Int[Array, " n_cells"]
    decontaminated_counts: Float[Array, "n_cells n_genes"] | None
    normalized: Float[Array, "n_cells n_genes"]
    latent: Float[Array, "n_cells latent_dim"]
    corrected_embeddings: Float[Array, "n_cells latent_dim"]
    embeddings_2d: Float[Array, "n_cells n_components"]
    cluster_assignments: Float[Array, "n_cells n_assign"]

    def keys(self) -> tuple[str, ...]:
        names = [f.name for f in dataclasses.fields(self)]
        return tuple(n for n in names if getattr(self, n) is not None)

    def __getitem__(self, name: str) -> Array:
        if name not in self.keys():
            raise KeyError(f"{name!r} (available: {', '.join(self.keys())})")
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def items(self) -> list[tuple[str, Array]]:
        return [(name, getattr(self, name)) for name in self.keys()]


class HarmonyReference(eqx.Module):
    """What mapping new cells onto a trained Harmony run needs (Symphony-style): the final centroids, each
    cluster's ridge coefficients per batch, and the bandwidth. Independent of the number of reference cells."""

    centroids: Float[Array, "n_clusters latent_dim"]
    ridge_coefficients: Float[Array, "n_clusters n_batches latent_dim"]
    sigma: Float[Array, ""]
    n_batches: tuple[int, ...] = eqx.field(static=True)

    @classmethod
    def from_result(cls, result: HarmonyResult) -> "HarmonyReference":
        return cls(result.centroids, result.ridge_coefficients, result.sigma, result.n_batches)

    def transform(
        self, latent: Float[Array, "n_cells latent_dim"], batch_labels: Int[Array, " n_cells"]
    ) -> Float[Array, "n_cells latent_dim"]:
        """Correct cells of batches seen in training with the stored centroids and coefficients."""
        return map_to_reference(latent, batch_labels[:, None], self.centroids, self.ridge_coefficients,
                                self.sigma, n_batches=self.n_batches)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jtu.tree_map(lambda leaf: leaf.astype(dtype) if eqx.is_inexact_array(leaf) else leaf, tree)


class SingleCellPipeline(eqx.Module):
    """Ambient removal, VAE normalisation, Harmony, parametric UMAP and soft k-means as one immutable module.

    Stages are reachable as `pipeline.ambient_removal`, `pipeline.vae_normalizer`, `pipeline.batch_correction`,
    `pipeline.dim_reduction` and `pipeline.clustering` (None when disabled). After training, `harmony_reference`
    holds the reference Harmony run's centroids and ridge coefficients, so new cells are corrected by mapping
    them onto the reference (as Symphony does) instead of re-running Harmony.
    """

    ambient_removal: AmbientRemoval | None
    vae_normalizer: VAENormalizer
    batch_correction: Harmony | None
    dim_reduction: ParametricUMAP | None
    clustering: SoftKMeans | None
    harmony_reference: HarmonyReference | None
    config: SingleCellPipelineConfig = eqx.field(static=True)

    def __init__(self, config: SingleCellPipelineConfig | None = None, *, key: PRNGKeyArray,
                 dtype: Any = None):
        """**Arguments:**

        - `config`: a `SingleCellPipelineConfig` (default settings if None).
        - `key`: PRNG key for all initial parameters. (Keyword only argument.)
        - `dtype`: parameter dtype (default: JAX's default float).
        """
        config = SingleCellPipelineConfig() if config is None else config
        self.config = config
        ambient_key, vae_key, umap_key, cluster_key = jr.split(key, 4)
        self.ambient_removal = (
            AmbientRemoval(config.n_genes, latent_dim=config.ambient_latent_dim,
                           hidden_dim=config.ambient_hidden_dim, dtype=dtype, key=ambient_key)
            if config.enable_ambient_removal else None
        )
        self.vae_normalizer = VAENormalizer(
            config.n_genes, config.n_batches, hidden_dims=config.hidden_dims, latent_dim=config.latent_dim,
            likelihood=config.likelihood, dropout_rate=config.dropout_rate, use_layer_norm=config.use_layer_norm,
            dtype=dtype, key=vae_key,
        )
        float_dtype = self.vae_normalizer.dtype
        self.batch_correction = (
            Harmony(preset=config.harmony_preset, theta=jnp.asarray(config.harmony_theta, float_dtype),
                    sigma=jnp.asarray(config.harmony_sigma, float_dtype),
                    n_clusters=config.batch_correction_clusters,
                    max_iter_harmony=config.batch_correction_iterations, n_batches=config.n_batches)
            if config.enable_batch_correction else None
        )
        self.dim_reduction = (
            ParametricUMAP(config.latent_dim, n_components=config.umap_n_components,
                           n_neighbors=config.umap_n_neighbors, min_dist=config.umap_min_dist,
                           hidden_size=config.umap_hidden_size, depth=config.umap_depth, key=umap_key)
            if config.enable_dim_reduction else None
        )
        # Every float leaf in the pipeline's dtype (Harmony's settings and the UMAP encoder are built in JAX's default
        # float), so a float32 pipeline stays float32 with x64 on, and a saved pipeline loads under either setting.
        self.batch_correction, self.dim_reduction = _cast_floats((self.batch_correction, self.dim_reduction),
                                                                 float_dtype)
        # Placeholder centroids until `fit_pipeline` initialises them by k-means++ on the corrected cells.
        self.clustering = (
            SoftKMeans(jr.normal(cluster_key, (config.n_clusters, config.latent_dim), dtype=float_dtype),
                       temperature=jnp.asarray(config.clustering_temperature, float_dtype))
            if config.enable_clustering else None
        )
        self.harmony_reference = None

    @property
    def dtype(self) -> Any:
        return self.vae_normalizer.dtype

    def __call__(
        self,
        counts: Float[Array, "n_cells n_genes"],
        ambient_profile: Float[Array, " n_genes"],
        batch_labels: Int[Array, " n_cells"],
        *,
        key: PRNGKeyArray,
        inference: bool = True,
    ) -> PipelineOutput:
        """Run every enabled stage on already validated arrays (see `run_pipeline` for the checked entry point)."""
        ambient_key, vae_key, harmony_key = jr.split(key, 3)
        decontaminated = None
        x = counts
        if self.ambient_removal is not None:
            result = self.ambient_removal(counts, ambient_profile, key=ambient_key, inference=inference)
            decontaminated = result.decontaminated_counts
            x = decontaminated
        vae_out = self.vae_normalizer(x, batch_labels, key=None if inference else vae_key, inference=inference)
        latent = vae_out.latent
        corrected = self.correct(latent, batch_labels, key=harmony_key, inference=inference)
        embeddings_2d = corrected if self.dim_reduction is None else self.dim_reduction(corrected)
        assignments = corrected if self.clustering is None else self.clustering(corrected)
        return PipelineOutput(
            counts=counts, ambient_profile=ambient_profile, batch_labels=batch_labels,
            decontaminated_counts=decontaminated, normalized=vae_out.normalized, latent=latent,
            corrected_embeddings=corrected, embeddings_2d=embeddings_2d, cluster_assignments=assignments,
        )

    def correct(
        self, latent: Float[Array, "n_cells latent_dim"], batch_labels: Int[Array, " n_cells"], *,
        key: PRNGKeyArray, inference: bool = True,
    ) -> Float[Array, "n_cells latent_dim"]:
        """Batch-correct a latent: map onto the trained reference in inference, else run Harmony on these cells."""
        if self.batch_correction is None:
            return latent
        if inference and self.harmony_reference is not None:
            return self.harmony_reference.transform(latent, batch_labels)
        return self.batch_correction(latent, batch_labels, key=key)


def create_single_cell_pipeline(*, key: PRNGKeyArray, config: SingleCellPipelineConfig | None = None,
                                **settings: Any) -> SingleCellPipeline:
    """Build a `SingleCellPipeline` from keyword settings (those of `SingleCellPipelineConfig`) or a config.

    !!! example
        ```python
        pipeline = create_single_cell_pipeline(n_genes=765, n_clusters=10, n_batches=2, key=jr.key(0))
        ```
    """
    if config is not None and settings:
        config = config.replace(**settings)
    elif config is None:
        config = SingleCellPipelineConfig.from_dict(settings)
    return SingleCellPipeline(config, key=key)


def prepare_inputs(
    pipeline: SingleCellPipeline, data: Mapping[str, Any], *, warn_profile: bool = True, keep_sparse: bool = False
) -> tuple[Any, Array, Array]:
    """Validate the seed's input dict (`counts`, optional `ambient_profile` and `batch_labels`) for `pipeline`.

    Counts may be dense or SciPy sparse (densified here: the whole-dataset entry point holds them in memory).
    Without `ambient_profile`, the pooled expression of the cells is used (with a warning when ambient removal
    is on); without `batch_labels`, every cell is batch 0. With `keep_sparse`, the counts are returned as the
    checked host matrix (float32 NumPy or CSR) for chunked processing.
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
    if hasattr(counts, "toarray") and not keep_sparse:
        counts = counts.toarray()
    n_cells = counts.shape[0]
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
    if pipeline.clustering is not None:
        check_n_clusters(n_cells, config.n_clusters)
    dtype = pipeline.dtype
    host_counts = counts if keep_sparse else jnp.asarray(counts, dtype=dtype)
    return host_counts, jnp.asarray(profile, dtype=dtype), jnp.asarray(labels)


def _check_harmony_clusters(pipeline: SingleCellPipeline, n_cells: int) -> None:
    # Harmony runs on these cells (training, or inference without a stored reference): K <= n_cells.
    k = pipeline.config.batch_correction_clusters
    if pipeline.batch_correction is not None and k is not None and k > n_cells:
        raise ValueError(f"batch_correction_clusters: Harmony asked for {k} clusters but there are only "
                         f"{n_cells} cells; lower it or set it to None (Harmony's min(round(N / 30), 100))")


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


@eqx.filter_jit
def _run_compiled(
    pipeline: SingleCellPipeline, counts: Float[Array, "n_cells n_genes"], ambient_profile: Float[Array, " n_genes"],
    batch_labels: Int[Array, " n_cells"], key: PRNGKeyArray, inference: bool,
) -> PipelineOutput:
    return pipeline(counts, ambient_profile, batch_labels, key=key, inference=inference)


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
    """
    counts, profile, labels = prepare_inputs(pipeline, data)
    if not inference or pipeline.harmony_reference is None:
        _check_harmony_clusters(pipeline, counts.shape[0])
    return _run_compiled(pipeline, counts, profile, labels, key, inference)


#: The per-cell outputs `run_pipeline_in_chunks` returns by default (the `(n_cells, n_genes)` ones are left out).
CELL_OUTPUTS = ("latent", "corrected_embeddings", "embeddings_2d", "cluster_assignments")


@eqx.filter_jit
def _run_chunk(batch: tuple[Array, Array], context: tuple[Any, ...]) -> dict[str, Array]:
    pipeline, ambient_profile, key, names = context
    counts, labels = batch
    output = pipeline(counts.astype(pipeline.dtype), ambient_profile, labels, key=key, inference=True)
    return {name: output[name] for name in names}


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
    if pipeline.batch_correction is not None and pipeline.harmony_reference is None:
        raise ValueError("pipeline: batch correction is on but there is no harmony_reference to map cells onto; "
                         "train with fit_pipeline, or use run_pipeline (Harmony on the whole dataset)")
    known = [f.name for f in dataclasses.fields(PipelineOutput)]
    unknown = [name for name in outputs if name not in known]
    if unknown or not outputs:
        raise ValueError(f"outputs: unknown or empty {unknown or list(outputs)}; choose from {known}")
    if "decontaminated_counts" in outputs and pipeline.ambient_removal is None:
        raise ValueError("outputs: 'decontaminated_counts' needs ambient removal to be enabled")
    counts, profile, labels = prepare_inputs(pipeline, data, keep_sparse=True)
    return map_in_chunks(_run_chunk, (counts, np.asarray(labels)), chunk_size=chunk_size,
                         context=(pipeline, profile, key, tuple(outputs)), devices=devices)


# ---------------------------------------------------------------------------------------------------------------
# Losses over the whole pipeline


class PipelineLossWeights(eqx.Module):
    """Weights of the stage losses in the end-to-end objective (array leaves: vmappable, differentiable)."""

    ambient: Float[Array, ""]
    vae: Float[Array, ""]
    clustering: Float[Array, ""]
    umap: Float[Array, ""]
    supervised: Float[Array, ""]

    def __init__(self, *, ambient: Float[ArrayLike, ""] = 1.0, vae: Float[ArrayLike, ""] = 1.0,
                 clustering: Float[ArrayLike, ""] = 1.0, umap: Float[ArrayLike, ""] = 1.0,
                 supervised: Float[ArrayLike, ""] = 0.0):
        self.ambient, self.vae, self.clustering, self.umap, self.supervised = (
            jnp.asarray(w) for w in (ambient, vae, clustering, umap, supervised)
        )


def cell_type_cross_entropy(
    assignments: Float[Array, "n_cells n_clusters"], cell_type_labels: Int[Array, " n_cells"]
) -> Float[Array, ""]:
    """Supervised loss: mean cross-entropy of soft cluster assignments against one-hot cell-type labels."""
    onehot = jax.nn.one_hot(cell_type_labels, assignments.shape[1], dtype=assignments.dtype)
    return -jnp.mean(jnp.sum(onehot * jnp.log(jnp.clip(assignments, jnp.finfo(assignments.dtype).tiny)), axis=1))


def umap_graph_loss(
    umap: ParametricUMAP, x: Float[Array, "n_cells n_features"], *, key: PRNGKeyArray, n_edges: int | None = None
) -> Float[Array, ""]:
    """The UMAP loss of `umap`'s encoder on the fuzzy graph of these cells (edges drawn in proportion to their
    weight, `negative_sample_rate` negatives each). The graph is built on `stop_gradient(x)`; gradients reach
    the encoder and, through the embedded points, `x`."""
    graph = umap_graph(jax.lax.stop_gradient(x), n_neighbors=min(umap.n_neighbors, x.shape[0] - 1))
    n_edges = x.shape[0] if n_edges is None else n_edges
    edge_key, loss_key = jr.split(key)
    edges = jr.choice(edge_key, graph.weights.shape[0], (n_edges,), p=graph.weights / jnp.sum(graph.weights))
    loss, _ = umap.loss((graph.heads[edges], graph.tails[edges]), (x, graph.rho), key=loss_key)
    return loss


def pipeline_loss(
    pipeline: SingleCellPipeline,
    counts: Float[Array, "n_cells n_genes"],
    ambient_profile: Float[Array, " n_genes"],
    batch_labels: Int[Array, " n_cells"],
    *,
    key: PRNGKeyArray,
    weights: PipelineLossWeights | None = None,
    cell_type_labels: Int[Array, " n_cells"] | None = None,
    kl_weight: Float[ArrayLike, ""] = 1.0,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The weighted sum of every enabled stage's loss along the forward path, for end-to-end training.

    Ambient ELBO on the counts; VAE negative ELBO on the decontaminated counts; soft k-means compactness of the
    corrected latent; UMAP cross-entropy of the encoder on the fuzzy graph of these cells' corrected latent;
    and, with `cell_type_labels` and a non-zero `weights.supervised`, the cross-entropy of the cluster
    assignments against the labels. Gradients reach every trainable stage (Harmony's `theta`/`sigma` too when no
    reference is stored and Harmony runs on the batch).
    """
    weights = PipelineLossWeights() if weights is None else weights
    ambient_key, vae_key, harmony_key, umap_key = jr.split(key, 4)
    dtype = pipeline.dtype
    total = jnp.zeros((), dtype)
    aux: dict[str, Float[Array, ""]] = {}
    x = counts
    if pipeline.ambient_removal is not None:
        ambient_loss, _ = pipeline.ambient_removal.loss(counts, ambient_profile, key=ambient_key)
        x = pipeline.ambient_removal(counts, ambient_profile, inference=True).decontaminated_counts
        total = total + weights.ambient.astype(dtype) * ambient_loss
        aux["ambient"] = ambient_loss
    vae_loss, _ = pipeline.vae_normalizer.loss(x, batch_labels, key=vae_key, kl_weight=kl_weight)
    total = total + weights.vae.astype(dtype) * vae_loss
    aux["vae"] = vae_loss
    latent = pipeline.vae_normalizer(x, batch_labels, inference=True).latent
    corrected = pipeline.correct(latent, batch_labels, key=harmony_key, inference=True)
    if pipeline.dim_reduction is not None:
        umap_loss_value = umap_graph_loss(pipeline.dim_reduction, corrected, key=umap_key)
        total = total + weights.umap.astype(dtype) * umap_loss_value
        aux["umap"] = umap_loss_value
    if pipeline.clustering is not None:
        clustering_loss, _ = pipeline.clustering.loss(corrected)
        total = total + weights.clustering.astype(dtype) * clustering_loss
        aux["clustering"] = clustering_loss
        if cell_type_labels is not None:
            supervised = cell_type_cross_entropy(pipeline.clustering(corrected), cell_type_labels)
            total = total + weights.supervised.astype(dtype) * supervised
            aux["supervised"] = supervised
    aux["total"] = total
    return total, aux


# ---------------------------------------------------------------------------------------------------------------
# Training


class PipelineFit(eqx.Module):
    """What `fit_pipeline` returns.

    - `pipeline`: the trained pipeline (with `harmony_reference` set when batch correction is on).
    - `curves`: per stage, its per-epoch loss curves (`{"vae": {"train": ..., "validation": ...}, ...}`).
    - `seconds`: wall time of each stage's training, in seconds.
    """

    pipeline: SingleCellPipeline
    curves: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]


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


@ft.cache
def _fine_tune_optimizer() -> optax.GradientTransformation:
    # Adam with its learning rate in the state: one object per process, so the compiled epoch is reused across
    # `fit_pipeline` calls and learning rates.
    return optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)(1e-3)


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
                                         key=keys["ambient"], raw_counts=raw_counts, n_epochs=ambient_epochs,
                                         batch_size=batch_size, progress=progress, **stage_checkpoint("ambient"))
            pipeline = eqx.tree_at(lambda p: p.ambient_removal, pipeline, fitted.model)
            record("ambient_removal", fitted, started)
            checkpoint("ambient_removal")
        x = np.asarray(remove_ambient(pipeline.ambient_removal, host_counts,
                                      np.asarray(profile)).decontaminated_counts)

    if "vae_normalizer" not in done:
        started = time.perf_counter()
        with _decontaminated_counts_are_expected():
            fitted = fit_vae(pipeline.vae_normalizer, x, np.asarray(labels), key=keys["vae"], n_epochs=vae_epochs,
                             batch_size=batch_size, learning_rate=learning_rate, progress=progress,
                             **stage_checkpoint("vae"))
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
                     key=keys["fine_tune"], n_epochs=fine_tune_epochs, batch_size=batch_size,
                     context=(weights, profile, jnp.ones((), pipeline.dtype)),
                     optimizer=_fine_tune_optimizer(), hyperparameters={"learning_rate": learning_rate},
                     trainable=trainable, progress=progress,
                     description="end-to-end")
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
        fitted = pipeline.dim_reduction.fit(graph_cells, key=keys["umap"], n_epochs=umap_epochs, progress=progress)
        pipeline = eqx.tree_at(lambda p: p.dim_reduction, pipeline, fitted.model)
        seconds["dim_reduction"] = time.perf_counter() - started
        curves["dim_reduction"] = {"train": np.asarray(fitted.train_loss)}
        checkpoint("dim_reduction")
    return PipelineFit(pipeline=pipeline, curves=curves, seconds=seconds)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


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


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameter studies


@eqx.filter_jit
def _sweep_compiled(
    pipeline: SingleCellPipeline, counts: Float[Array, "n_cells n_genes"], ambient_profile: Float[Array, " n_genes"],
    batch_labels: Int[Array, " n_cells"], key: PRNGKeyArray, thetas: Float[Array, " n_theta"],
    temperatures: Float[Array, " n_temperature"],
) -> PipelineOutput:
    def one(theta: Float[Array, ""], temperature: Float[Array, ""]) -> PipelineOutput:
        swept = pipeline
        if swept.batch_correction is not None:
            swept = eqx.tree_at(lambda p: p.batch_correction.theta, swept, theta.astype(swept.dtype))
        if swept.clustering is not None:
            swept = eqx.tree_at(lambda p: p.clustering.temperature, swept, temperature.astype(swept.dtype))
        return swept(counts, ambient_profile, batch_labels, key=key, inference=True)

    return jax.vmap(lambda theta: jax.vmap(lambda t: one(theta, t))(temperatures))(thetas)


def sweep_pipeline(
    pipeline: SingleCellPipeline, data: Mapping[str, Any], *, key: PRNGKeyArray,
    theta: Float[ArrayLike, " n_theta"], temperature: Float[ArrayLike, " n_temperature"],
) -> PipelineOutput:
    """Run the pipeline over a grid of Harmony `theta` x clustering `temperature` in one compiled call.

    Harmony is re-run on the whole dataset for every `theta` (the stored reference is set aside), with the same
    key everywhere (common random numbers), so differences come from the hyperparameters alone.

    **Returns:** a `PipelineOutput` whose every field has two leading axes `(n_theta, n_temperature, ...)`.
    """
    counts, profile, labels = prepare_inputs(pipeline, data)
    unreferenced = eqx.tree_at(lambda p: p.harmony_reference, pipeline, None, is_leaf=lambda node: node is None)
    return _sweep_compiled(unreferenced, counts, profile, labels, key,
                           jnp.atleast_1d(jnp.asarray(theta, pipeline.dtype)),
                           jnp.atleast_1d(jnp.asarray(temperature, pipeline.dtype)))


# ---------------------------------------------------------------------------------------------------------------
# AnnData


def fit_anndata(
    adata: Any,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    key: PRNGKeyArray,
    config: SingleCellPipelineConfig | None = None,
    ambient_profile: ArrayLike | None = None,
    **fit_settings: Any,
) -> tuple[Any, PipelineFit]:
    """Train a pipeline on an AnnData and write every result back under scanpy's conventions.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or in `layers[layer]`); never modified.
    - `batch_key`: `obs` column with each cell's batch (any dtype). (Keyword only argument.)
    - `layer`: read counts from this layer instead of `X`.
    - `key`: PRNG key for building and training the pipeline.
    - `config`: pipeline settings; `n_genes` and `n_batches` are taken from the data.
    - `ambient_profile`: `(n_genes,)`, optional.
    - `fit_settings`: passed to `fit_pipeline` (epochs, `raw_counts`, fine-tuning, ...).

    **Returns:** `(annotated, fitted)`: a new AnnData with `obsm["X_diffbio"]`, `obsm["X_diffbio_corrected"]`,
    `obsm["X_umap"]`, `obs["diffbio_cluster"]` and the `layers` of `diffbio_eqx.io.to_anndata`, so
    `scanpy.pl.umap(annotated, color="diffbio_cluster")` works; and the `PipelineFit`.
    """
    arrays = from_anndata(adata, layer=layer, batch_key=batch_key)
    config = SingleCellPipelineConfig() if config is None else config
    config = config.replace(n_genes=adata.n_vars, n_batches=arrays.n_batches)
    data: dict[str, Any] = {"counts": arrays.counts}
    if arrays.batch_labels is not None:
        data["batch_labels"] = arrays.batch_labels
    if ambient_profile is not None:
        data["ambient_profile"] = ambient_profile
    build_key, fit_key, run_key = jr.split(key, 3)
    pipeline = SingleCellPipeline(config, key=build_key)
    fitted = fit_pipeline(pipeline, data, key=fit_key, **fit_settings)
    output = run_pipeline(fitted.pipeline, data, key=run_key)
    annotated = to_anndata(adata, output)
    if arrays.batch_categories is not None:
        annotated.uns["diffbio_batch_categories"] = list(arrays.batch_categories)
    return annotated, fitted
