"""The single-cell pipeline as one immutable module: its output record, the Harmony reference, the pipeline.

```
counts ─ AmbientRemoval ─ VAENormalizer ─ Harmony ─┬─ ParametricUMAP ─► embeddings_2d
                                                   └─ SoftKMeans ─────► cluster_assignments
```
A disabled stage passes its input on unchanged. Clustering reads the corrected embeddings, not the 2-D map.
"""

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._ambient._stage import AmbientRemoval
from .._clustering._mixture_stage import GaussianMixture
from .._clustering._stage import SoftKMeans
from .._core._validate import _is_traced
from .._harmony._math import HarmonyResult, map_to_reference
from .._harmony._stage import Harmony
from .._umap._stage import ParametricUMAP
from .._vae._stage import VAENormalizer, VAEOptions
from ._config import SingleCellPipelineConfig


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


def _leaf_settings(stage: eqx.Module) -> dict[str, float | list[float]]:
    """A stage's continuous settings: its own scalar float fields (Harmony's may also be per covariate, one axis).
    Weights sit inside the stage's layers, or have more axes, and are not settings."""
    values: dict[str, float | list[float]] = {}
    for field in dataclasses.fields(stage):
        leaf = getattr(stage, field.name)
        if eqx.is_inexact_array(leaf) and leaf.ndim == 0:
            values[field.name] = _shortest(leaf)
        elif eqx.is_inexact_array(leaf) and leaf.ndim == 1 and isinstance(stage, Harmony):
            values[field.name] = [_shortest(v) for v in leaf]
    return values


def _shortest(value: Array) -> float:
    # The shortest decimal that reads back as the same value in the leaf's dtype: a float32 0.1 reads 0.1.
    return float(str(np.asarray(value)[()]))


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jtu.tree_map(lambda leaf: leaf.astype(dtype) if eqx.is_inexact_array(leaf) else leaf, tree)


def _placeholder_clustering(config: SingleCellPipelineConfig, dtype: Any,
                            key: PRNGKeyArray) -> GaussianMixture | SoftKMeans:
    shape = (config.n_clusters or 1, config.latent_dim)
    temperature = jnp.asarray(config.clustering_temperature, dtype)
    if config.clustering_method == "gmm":
        return GaussianMixture(jr.normal(key, shape, dtype=dtype), temperature=temperature)
    return SoftKMeans(jr.normal(key, shape, dtype=dtype), temperature=temperature)


def with_config(pipeline: "SingleCellPipeline", config: SingleCellPipelineConfig) -> "SingleCellPipeline":
    """The pipeline with another config (a static field, which `eqx.tree_at` cannot replace), e.g. the number of
    clusters `fit_pipeline` chose."""
    copy = object.__new__(type(pipeline))
    for field in dataclasses.fields(pipeline):
        object.__setattr__(copy, field.name, getattr(pipeline, field.name))
    object.__setattr__(copy, "config", config)
    return copy


class SingleCellPipeline(eqx.Module):
    """Ambient removal, VAE normalisation, Harmony, parametric UMAP and soft k-means as one immutable module.

    Stages are reachable as `pipeline.ambient_removal`, `pipeline.vae_normalizer`, `pipeline.batch_correction`,
    `pipeline.dim_reduction` and `pipeline.clustering` (None when disabled). After training, `harmony_reference`
    holds the reference Harmony run's centroids and ridge coefficients, so new cells are corrected by mapping
    them onto the reference (as Symphony does) instead of re-running Harmony.

    `config` is what the pipeline was built from: it fixes the shapes and which stages exist. The continuous
    settings (Harmony's `theta` and `sigma`, the clustering temperature, ...) live in the stages as array leaves,
    which `eqx.tree_at` or training may change; `settings()` reads them from there. `genes` names the count
    matrix's columns (None when the pipeline was built from arrays alone); the AnnData functions match new data
    to them by name. `batches` names the batch codes of training (code `i` is `batches[i]`), so new cells' batch
    names are coded as in training.
    """

    ambient_removal: AmbientRemoval | None
    vae_normalizer: VAENormalizer
    batch_correction: Harmony | None
    dim_reduction: ParametricUMAP | None
    clustering: GaussianMixture | SoftKMeans | None
    harmony_reference: HarmonyReference | None
    config: SingleCellPipelineConfig = eqx.field(static=True)
    batches: tuple[str, ...] | None = eqx.field(static=True)

    def __init__(self, config: SingleCellPipelineConfig | None = None, *, key: PRNGKeyArray,
                 dtype: Any = None, genes: Sequence[str] | None = None, batches: Sequence[str] | None = None):
        """**Arguments:**

        - `config`: a `SingleCellPipelineConfig` (default settings if None).
        - `key`: PRNG key for all initial parameters. (Keyword only argument.)
        - `dtype`: parameter dtype (default: JAX's default float).
        - `genes`: the name of each of the `n_genes` columns of the counts (e.g. `adata.var_names`), kept by the
          VAE stage (`pipeline.genes`) and in the saved file; None when unknown.
        - `batches`: the name of each of the `n_batches` batch codes (e.g. an `obs` column's categories), kept in
          the saved file; None when unknown.
        """
        config = SingleCellPipelineConfig() if config is None else config
        self.config = config
        self.batches = None if batches is None else tuple(str(name) for name in batches)
        ambient_key, vae_key, umap_key, cluster_key = jr.split(key, 4)
        self.ambient_removal = (
            AmbientRemoval(config.n_genes, latent_dim=config.ambient_latent_dim,
                           hidden_dim=config.ambient_hidden_dim, dtype=dtype, key=ambient_key)
            if config.enable_ambient_removal else None
        )
        self.vae_normalizer = VAENormalizer(
            config.n_genes, config.n_batches, hidden_dims=config.hidden_dims, latent_dim=config.latent_dim,
            likelihood=config.likelihood, dropout_rate=config.dropout_rate,
            options=VAEOptions(use_layer_norm=config.use_layer_norm), genes=genes, dtype=dtype, key=vae_key,
        )
        float_dtype = self.vae_normalizer.dtype
        self.batch_correction = (
            Harmony(preset=config.harmony_preset, theta=jnp.asarray(config.harmony_theta, float_dtype),
                    sigma=jnp.asarray(config.harmony_sigma, float_dtype),
                    n_clusters=config.batch_correction_clusters,
                    max_iter_harmony=config.batch_correction_iterations, n_batches=config.n_batches)
            if config.batch_correction_method == "harmony" else None  # MMD and adversarial live in the VAE's training
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
        # Placeholder parameters until `fit_pipeline` fits the stage on the corrected cells (one cluster when the
        # number is left to the fit, which then replaces the stage and the config's `n_clusters`).
        self.clustering = (
            _placeholder_clustering(config, float_dtype, cluster_key) if config.enable_clustering else None
        )
        self.harmony_reference = None

    def __check_init__(self):
        if self.batches is not None and len(self.batches) != self.config.n_batches:
            raise ValueError(f"batches: {len(self.batches)} names for a pipeline of {self.config.n_batches} batches")
        if self.genes is None:
            return
        repeated = [gene for gene, count in collections.Counter(self.genes).items() if count > 1]
        if repeated:
            raise ValueError(f"genes: names must be unique; {len(repeated)} repeated, e.g. {repeated[:5]}")

    @property
    def dtype(self) -> Any:
        return self.vae_normalizer.dtype

    @property
    def genes(self) -> tuple[str, ...] | None:
        """The name of each column of the counts (kept by the VAE stage, the first to read them), or None."""
        return self.vae_normalizer.genes

    def settings(self) -> dict[str, Any]:
        """The settings as the pipeline runs now: the config's, then every stage's continuous settings read from
        its array leaves (as `<stage>_<leaf>`: `harmony_theta`, `harmony_sigma`, `harmony_lamb`, ...,
        `clustering_temperature`, `umap_a`, ...), which replace the config's initial values of the same name.

        Call it on a concrete pipeline (not inside `jit`); a per-covariate setting comes back as a list.
        """
        values = self.config.to_dict()
        for prefix, stage in (("ambient", self.ambient_removal), ("vae", self.vae_normalizer),
                              ("harmony", self.batch_correction), ("umap", self.dim_reduction),
                              ("clustering", self.clustering)):
            if stage is not None:
                values.update({f"{prefix}_{name}": value for name, value in _leaf_settings(stage).items()})
        return values

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
        return self._forward(counts, ambient_profile, batch_labels, key=key, inference=inference)

    def _forward(
        self,
        counts: Float[Array, "n_cells n_genes"],
        ambient_profile: Float[Array, " n_genes"],
        batch_labels: Int[Array, " n_cells"],
        *,
        key: PRNGKeyArray,
        inference: bool = True,
        check: bool = True,
    ) -> PipelineOutput:
        """`__call__`; `check=False` (static) leaves out the stages' in-program value checks of the inputs and the
        settings, for callers that checked them on the host (`run_pipeline`): their host callbacks would keep the
        program out of JAX's persistent compilation cache. Harmony run here (no reference) keeps its own checks."""
        ambient_key, vae_key, harmony_key = jr.split(key, 3)
        decontaminated = None
        x = counts
        if self.ambient_removal is not None:
            result = self.ambient_removal._forward(counts, ambient_profile, key=ambient_key, inference=inference,
                                                   integer=False, check=check)
            decontaminated = result.decontaminated_counts
            x = decontaminated
        vae_out = self.vae_normalizer._forward(x, batch_labels, key=None if inference else vae_key,
                                               inference=inference, check=check)
        latent = vae_out.latent
        corrected = self.correct(latent, batch_labels, key=harmony_key, inference=inference)
        embeddings_2d = corrected if self.dim_reduction is None else self.dim_reduction(corrected)
        assignments = corrected if self.clustering is None else self.clustering._assign(corrected, check=check)
        return PipelineOutput(
            counts=counts, ambient_profile=ambient_profile, batch_labels=batch_labels,
            decontaminated_counts=decontaminated, normalized=vae_out.normalized, latent=latent,
            corrected_embeddings=corrected, embeddings_2d=embeddings_2d, cluster_assignments=assignments,
        )

    def check_settings(self) -> bool:
        """Test on the host the settings that the stages' in-program checks test (`_forward(check=False)` leaves
        those out): the ambient prior and the clustering temperature; a `ValueError` names the field. Returns
        False (testing nothing) when one of them is traced (inside `jit`/`vmap`): the program must check them."""
        temperature = None if self.clustering is None else self.clustering.temperature
        prior = () if self.ambient_removal is None else (self.ambient_removal.prior_contamination,
                                                         self.ambient_removal.prior_log_scale,
                                                         self.ambient_removal.prior_ambient_count)
        if any(_is_traced(leaf) for leaf in (temperature, *prior)):
            return False
        if self.ambient_removal is not None:
            self.ambient_removal.check_prior()
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"clustering temperature: must be > 0, got {float(temperature)}")
        return True

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
                                genes: Sequence[str] | None = None, batches: Sequence[str] | None = None,
                                **settings: Any) -> SingleCellPipeline:
    """Build a `SingleCellPipeline` from keyword settings (those of `SingleCellPipelineConfig`) or a config, and
    optionally the names of its genes and batches.

    !!! example
        ```python
        pipeline = create_single_cell_pipeline(n_genes=765, n_clusters=10, n_batches=2, key=jr.key(0))
        ```
    """
    if config is not None and settings:
        config = config.replace(**settings)
    elif config is None:
        config = SingleCellPipelineConfig.from_dict(settings)
    return SingleCellPipeline(config, key=key, genes=genes, batches=batches)
