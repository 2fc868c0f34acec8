"""Spatial domains end to end on arrays (what `dbx.tl.spatial_domains` runs): STAGATE's preprocessing, graph,
training, then a Gaussian mixture on the embedding (mclust's role), optionally smoothed over the spatial graph."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._clustering._gmm import (
    MixtureParameters,
    expectation_maximisation,
    hard_labels,
    mixture_responsibilities,
    parameters_from_labels,
)
from .._clustering._kmeans import kmeans_plus_plus, lloyd, nearest_centroid
from .._core._train import FitResult, TrainSettings
from ._stagate import STAGATE, SpatialGraph, fit_stagate, smooth_labels, spatial_graph


class DomainResult(eqx.Module):
    """What `spatial_domains` returns: `labels` `(n_spots,)`, `embedding` `(n_spots, latent)`, the responsibilities
    of the mixture, the graph and the training record."""

    labels: Array
    embedding: Array
    responsibilities: Array
    graph: SpatialGraph
    training: FitResult


def log_normalize(counts: ArrayLike) -> np.ndarray:
    """scanpy's `normalize_total` (to the median library size) then `log1p`."""
    x = np.asarray(counts, dtype=np.float64)
    library = x.sum(axis=1, keepdims=True)
    return np.log1p(x / np.maximum(library, 1e-12) * np.median(library))


def check_coordinates(coordinates: ArrayLike, n_spots: int, field: str) -> np.ndarray:
    c = np.asarray(coordinates, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != n_spots or c.shape[1] < 2:
        raise ValueError(f"{field}: expected shape ({n_spots}, 2), got {c.shape}")
    if not np.all(np.isfinite(c[:, :2])):
        rows = np.flatnonzero(~np.isfinite(c[:, :2]).all(axis=1))[:10].tolist()
        raise ValueError(f"{field}: contains NaN or infinite coordinates (rows {rows})")
    return c[:, :2]


def spatial_domains(
    counts: ArrayLike, coordinates: ArrayLike, n_domains: int, *, key: PRNGKeyArray, n_neighbors: int = 6,
    radius: float | None = None, pre_labels: ArrayLike | None = None, prune_weight: float = 0.0,
    settings: TrainSettings | None = None, smooth: bool = False,
) -> DomainResult:
    """STAGATE domains: log-normalised counts, the spatial graph, the autoencoder, a Gaussian mixture.

    **Arguments:**

    - `counts`: `(n_spots, n_genes)` counts; `coordinates`: `(n_spots, 2)` positions.
    - `n_domains`: mixture components. `key`: PRNG key (weights, mixture restarts). (Keyword only argument.)
    - `n_neighbors`, `radius`: the graph (`spatial_graph`); `pre_labels`, `prune_weight`: cell-type-aware pruning
      (STAGATE's `alpha`; `pre_labels` per spot, e.g. a pre-clustering).
    - `settings`: the loop's `TrainSettings` (default: STAGATE's 1000 full-batch epochs).
    - `smooth`: majority vote of labels over the spatial neighbours.
    """
    raw = np.asarray(counts, dtype=np.float64)
    if not np.all(np.isfinite(raw)) or np.any(raw < 0):
        raise ValueError("counts: STAGATE log-normalises counts; found negative, NaN or infinite values")
    check_n_domains(n_domains, raw.shape[0])
    graph = domain_graph(coordinates, raw.shape[0], n_neighbors=n_neighbors, radius=radius, pre_labels=pre_labels,
                         prune_weight=prune_weight)
    return domains_from_expression(log_normalize(raw), graph, n_domains, key=key, prune_weight=prune_weight,
                                   settings=settings, smooth=smooth)


def check_n_domains(n_domains: int, n_spots: int) -> None:
    if not 2 <= n_domains < n_spots:
        raise ValueError(f"n_domains: must be in [2, n_spots), got {n_domains}")


def domain_graph(coordinates: ArrayLike, n_spots: int, *, n_neighbors: int = 6, radius: float | None = None,
                 pre_labels: ArrayLike | None = None, prune_weight: float = 0.0) -> SpatialGraph:
    """`spatial_domains`' spatial graph of the checked `coordinates` (pruned by `pre_labels` with a weight)."""
    c = check_coordinates(coordinates, n_spots, "coordinates")
    if prune_weight and pre_labels is None:
        raise ValueError("pre_labels: cell-type-aware pruning (prune_weight > 0) needs pre-cluster labels")
    labels_in = None if pre_labels is None else np.unique(np.asarray(pre_labels), return_inverse=True)[1]
    return spatial_graph(jnp.asarray(c), n_neighbors=n_neighbors, radius=radius, pre_labels=labels_in)


def domains_from_expression(
    x: ArrayLike, graph: SpatialGraph, n_domains: int, *, key: PRNGKeyArray, prune_weight: float = 0.0,
    settings: TrainSettings | None = None, smooth: bool = False,
) -> DomainResult:
    """`spatial_domains` from log-normalised expression `x` `(n_spots, n_genes)` and its built `graph` (for a
    caller that picks the genes after normalising, as STAGATE trains on `var["highly_variable"]`)."""
    x = np.asarray(x, dtype=np.float64)
    check_n_domains(n_domains, x.shape[0])
    model_key, fit_key, mixture_key = jr.split(key, 3)
    stage = STAGATE(x.shape[1], prune_weight=prune_weight, key=model_key)
    xj = jnp.asarray(x, dtype=jnp.zeros(()).dtype)
    training = fit_stagate(stage, xj, graph, key=fit_key, settings=settings)
    z = _embed(training.model, xj, graph)
    labels, responsibilities = gaussian_mixture_labels(z, n_domains, key=mixture_key)
    if smooth:
        labels = smooth_labels(labels, graph, n_domains)
    return DomainResult(labels, z, responsibilities, graph, training)


@eqx.filter_jit
def _embed(model: STAGATE, x: Array, graph: SpatialGraph) -> Array:
    return model(x, graph)  # one program (the decoder pruned), not one compilation per eager operation


@eqx.filter_jit
def _labels_and_responsibilities(z: Array, params: MixtureParameters) -> tuple[Array, Array]:
    return hard_labels(z, params), mixture_responsibilities(z, params)


@eqx.filter_jit
def _mixture_restart(z: Array, n_components: int, key: PRNGKeyArray):
    centroids = lloyd(z, kmeans_plus_plus(z, n_components, key=key), n_iter=100)
    start = parameters_from_labels(z, nearest_centroid(z, centroids), n_components)
    return expectation_maximisation(z, start, n_iter=100)


def gaussian_mixture_labels(z: Array, n_components: int, *, key: PRNGKeyArray, n_restarts: int = 3
                            ) -> tuple[Array, Array]:
    """mclust's role: a diagonal Gaussian mixture by EM from k-means (`_clustering`'s EM, scikit-learn's rules),
    the best of `n_restarts` log-likelihoods. **Returns:** `(labels, responsibilities)`."""
    fits = [_mixture_restart(z, n_components, k) for k in jr.split(key, n_restarts)]
    best = max(fits, key=lambda fit: float(fit.log_likelihood[-1]))
    return _labels_and_responsibilities(z, best.params)
