"""`SingleCellPipelineConfig`: the settings a pipeline is built from."""

import dataclasses
import json
import numbers
import os
import pathlib
import tomllib
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np


def _type_problem(kind: Any, value: Any) -> str | None:
    """What `value` should be for a field annotated `kind` (bool, int, float, str, a Literal of strings, a tuple
    of ints, or one of these or None), or None when it is that (a settings file's values arrive unchecked)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        problem = _type_problem(inner, value)
        return None if value is None or problem is None else f"{problem} or None"
    is_bool = isinstance(value, (bool, np.bool_))
    if kind is bool:
        return None if is_bool else "true or false"
    if kind is int:
        return None if isinstance(value, numbers.Integral) and not is_bool else "an integer"
    if kind is float:
        return None if isinstance(value, numbers.Real) and not is_bool else "a number"
    if kind is str or origin is Literal:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        whole = isinstance(value, (tuple, list)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        return None if whole else "a list of integers"
    return None


@dataclasses.dataclass(frozen=True)
class SingleCellPipelineConfig:
    """Everything that fixes the pipeline's shapes and stages (hashable, so it is static under `jit`).

    The first twelve fields and their defaults are the seed's:

    - `n_genes` (2000): genes in the count matrix.
    - `n_clusters` (10): clusters; None lets `fit_pipeline` choose them (`select_n_clusters`: Leiden's
      communities of the corrected cells in the partition with the widest silhouette), and the fitted pipeline's
      config holds the number chosen.
    - `latent_dim` (64): VAE latent dimension.
    - `hidden_dims` ((128, 64)): VAE encoder layer widths (the decoder mirrors them).
    - `umap_n_components` (2): dimension of the parametric UMAP embedding.
    - `batch_correction_clusters` (100): Harmony's K; `None` uses Harmony's `min(round(N / 30), 100)`.
    - `batch_correction_iterations` (10): Harmony's outer rounds (`max_iter_harmony`).
    - `clustering_temperature` (1.0): the clustering stage's temperature (soft k-means: in squared-distance units;
      Gaussian mixture: of its E-step, 1 the posterior).
    - `enable_ambient_removal`, `enable_batch_correction`, `enable_dim_reduction`, `enable_clustering` (True).

    Then:

    - `clustering_method` ("gmm"): `"gmm"` (a diagonal Gaussian mixture initialised from communities of the
      neighbour graph: per-cluster weights and variances, for unbalanced cell types) or `"soft_kmeans"`
      (k-means++ then soft k-means, the seed's).
    - `n_batches` (1): batch categories in `batch_labels`.
    - `likelihood` ("nb"): the VAE's count likelihood, `"nb"`, `"zinb"` or `"poisson"`.
    - `dropout_rate` (0.1), `use_layer_norm` (False): VAE encoder settings.
    - `ambient_latent_dim` (10), `ambient_hidden_dim` (128): the ambient model's sizes.
    - `harmony_theta` (2.0), `harmony_sigma` (0.1), `harmony_preset` ("harmony2"): Harmony settings.
    - `umap_n_neighbors` (15), `umap_min_dist` (0.1), `umap_hidden_size` (100), `umap_depth` (3): parametric
      UMAP settings (umap-learn's defaults).
    - `doublet_filter` ("none"): `"scrublet"` or `"solo"` call doublets on every input cell before the other
      stages, and the main job (`diffbio-eqx run --doublets`) fits the pipeline on the other cells.
    - `imputation` ("none"): `"magic"`: the main job (`--impute`) writes MAGIC's imputed expression of the cells
      as `layers["magic"]` of its result (the VAE still models the counts).

    These two are steps of the main job around the pipeline (`diffbio_eqx._job_steps`): `fit_pipeline`,
    `run_pipeline` and `tl.pipeline` take the cells they are given and ignore them.
    - `batch_correction` ("harmony"): the batch corrector when `enable_batch_correction` is on: `"harmony"`
      (Harmony on the VAE latent, new cells mapped onto its reference), `"mmd"` (trVAE's MMD penalty between
      every pair of batches while the VAE trains, `fit_mmd_vae`) or `"adversarial"` (a WGAN-GP batch critic on
      the latent while the VAE trains, `fit_adversarial_vae`); for the last two the corrected embedding is the
      VAE's latent itself, so new cells need nothing more. `enable_batch_correction=False` switches batch
      correction off (the one switch); `batch_correction_method` is the corrector in force (None when off).
    - `mmd_beta` (1.0), `adversarial_weight` (1.0): the MMD weight (trVAE's `beta`) and the adversarial weight.
    """

    n_genes: int = 2000
    n_clusters: int | None = 10
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
    clustering_method: Literal["gmm", "soft_kmeans"] = "gmm"
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
    # Plain str (checked in __post_init__): a bad value gets the ValueError naming the field, with or without
    # the runtime type-checking hook.
    doublet_filter: str = "none"
    imputation: str = "none"
    batch_correction: str = "harmony"
    mmd_beta: float = 1.0
    adversarial_weight: float = 1.0

    def __post_init__(self):
        self._check_types({field.name: getattr(self, field.name) for field in dataclasses.fields(self)})
        self._check_ranges()

    @classmethod
    def _check_types(cls, values: Mapping[str, Any]) -> None:
        for field in dataclasses.fields(cls):
            if field.name in values and (problem := _type_problem(field.type, values[field.name])) is not None:
                raise ValueError(f"{field.name}: must be {problem}, got {values[field.name]!r}")

    def _check_ranges(self) -> None:
        if self.batch_correction not in ("harmony", "mmd", "adversarial"):
            raise ValueError("batch_correction: must be 'harmony', 'mmd' or 'adversarial' (to switch batch "
                             f"correction off, set enable_batch_correction=False), got {self.batch_correction!r}")
        for name in ("mmd_beta", "adversarial_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        positive = {
            "n_genes": self.n_genes, "latent_dim": self.latent_dim,
            "umap_n_components": self.umap_n_components, "n_batches": self.n_batches,
            "batch_correction_iterations": self.batch_correction_iterations,
            "umap_n_neighbors": self.umap_n_neighbors, "umap_hidden_size": self.umap_hidden_size,
            "ambient_latent_dim": self.ambient_latent_dim, "ambient_hidden_dim": self.ambient_hidden_dim,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters: must be a positive integer or None, got {self.n_clusters!r}")
        if self.clustering_method not in ("gmm", "soft_kmeans"):
            raise ValueError(f"clustering_method: must be 'gmm' or 'soft_kmeans', got {self.clustering_method!r}")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims: need at least one positive width, got {self.hidden_dims}")
        if self.batch_correction_clusters is not None and self.batch_correction_clusters < 1:
            raise ValueError(f"batch_correction_clusters: must be >= 1 or None, got {self.batch_correction_clusters}")
        for name in ("clustering_temperature", "harmony_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("harmony_theta", "umap_min_dist", "umap_depth"):  # umap-learn allows min_dist 0; depth 0: linear
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.likelihood not in ("nb", "zinb", "poisson"):
            raise ValueError(f"likelihood: must be 'nb', 'zinb' or 'poisson', got {self.likelihood!r}")
        if self.doublet_filter not in ("scrublet", "solo", "none"):
            raise ValueError(f"doublet_filter: must be 'scrublet', 'solo' or 'none', got {self.doublet_filter!r}")
        if self.imputation not in ("magic", "none"):
            raise ValueError(f"imputation: must be 'magic' or 'none', got {self.imputation!r}")
        if self.harmony_preset not in ("harmony2", "classic"):
            raise ValueError(f"harmony_preset: must be 'harmony2' or 'classic', got {self.harmony_preset!r}")

    @property
    def batch_correction_method(self) -> str | None:
        """The batch corrector in force: `batch_correction` when `enable_batch_correction` is on, else None."""
        return self.batch_correction if self.enable_batch_correction else None

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
        cls._check_types(values)  # before the constructor: values read from a file arrive unchecked
        values = dict(values)
        for field in dataclasses.fields(cls):  # JSON's 2 for 2.0
            if field.type is float and field.name in values:
                values[field.name] = float(values[field.name])
        if "hidden_dims" in values:
            values["hidden_dims"] = tuple(values["hidden_dims"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "SingleCellPipelineConfig":
        """Read a `.json` or `.toml` file of settings (a `[pipeline]` table in TOML, or top level)."""
        return cls.from_dict(cls.settings_in_file(path))

    @classmethod
    def settings_in_file(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Only the settings a `.json` or `.toml` file gives (checked against the config's fields), without the
        defaults, so they can override another set of settings."""
        source = pathlib.Path(path)
        if not source.is_file():
            raise ValueError(f"config: {str(source)!r} does not exist")
        try:
            text = source.read_text(encoding="utf-8")
            values = tomllib.loads(text) if source.suffix == ".toml" else json.loads(text)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"config: {str(source)!r} could not be parsed ({error})") from None
        if isinstance(values, dict):
            values = values.get("pipeline", values)
        if not isinstance(values, dict):
            raise ValueError(f"config: {str(source)!r} must hold a table of settings")
        cls.from_dict(values)  # names and values checked here
        return dict(values)
