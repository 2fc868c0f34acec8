"""Clustering and integration metrics, written to match scikit-learn and scib-metrics.

The package may not import the reference tools, yet its report needs their scores: these are our own
implementations, checked against them in the tests. LISI follows scib-metrics (`lisi_knn`): a perplexity-
calibrated Gaussian kernel over each cell's k nearest neighbours (self excluded), its bandwidth found by the same
50-step bisection, and the inverse Simpson index of the labels under that kernel.
"""

import functools as ft
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int
from scipy.special import comb


#: Per-cell labels of any kind (integers, strings, categoricals): anything `numpy.unique` accepts.
Labels = Any


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> np.ndarray:
    true_codes = np.unique(np.asarray(labels_true), return_inverse=True)[1].ravel()
    pred_codes = np.unique(np.asarray(labels_pred), return_inverse=True)[1].ravel()
    table = np.zeros((true_codes.max() + 1, pred_codes.max() + 1), dtype=np.int64)
    np.add.at(table, (true_codes, pred_codes), 1)
    return table


def adjusted_rand_index(labels_true: Labels, labels_pred: Labels) -> float:
    """Adjusted Rand index (Hubert and Arabie), as `sklearn.metrics.adjusted_rand_score`."""
    table = _contingency(np.asarray(labels_true), np.asarray(labels_pred))
    n = table.sum()
    sum_cells = comb(table, 2).sum()
    sum_rows = comb(table.sum(axis=1), 2).sum()
    sum_columns = comb(table.sum(axis=0), 2).sum()
    expected = sum_rows * sum_columns / comb(n, 2) if n > 1 else 0.0
    maximum = (sum_rows + sum_columns) / 2
    if maximum == expected:  # both partitions trivial (one cluster, or all singletons)
        return 1.0
    return float((sum_cells - expected) / (maximum - expected))


def normalized_mutual_info(labels_true: Labels, labels_pred: Labels) -> float:
    """Normalised mutual information with the arithmetic-mean normaliser (scikit-learn's default)."""
    table = _contingency(np.asarray(labels_true), np.asarray(labels_pred)).astype(np.float64)
    n = table.sum()
    joint = table / n
    row, column = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    mutual = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(row, column)[nonzero]))
    entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
    h_true, h_pred = entropy(row), entropy(column)
    if h_true == 0 and h_pred == 0:
        return 1.0
    return float(max(mutual, 0.0) / max((h_true + h_pred) / 2, np.finfo(np.float64).tiny))


def _neighbour_entropy(
    distances: Float[Array, " n_neighbors"], mask: Bool[Array, " n_neighbors"], beta: Float[Array, ""]
) -> tuple[Float[Array, ""], Float[Array, " n_neighbors"]]:
    weights = jnp.where(mask, jnp.exp(-distances * beta), 0.0)
    total = jnp.sum(weights)
    safe_total = jnp.where(total == 0, 1.0, total)
    entropy = jnp.where(total == 0, 0.0, jnp.log(safe_total) + beta * jnp.sum(distances * weights) / safe_total)
    return entropy, weights / safe_total


def _simpson_row(
    distances: Float[Array, " n_neighbors"], neighbour_labels: Int[Array, " n_neighbors"],
    mask: Bool[Array, " n_neighbors"], perplexity: Float[Array, ""], tol: float, n_labels: int,
) -> Float[Array, ""]:
    target = jnp.log(perplexity)
    one = jnp.ones((), distances.dtype)
    entropy, probabilities = _neighbour_entropy(distances, mask, one)
    inf = jnp.asarray(jnp.inf, distances.dtype)

    def step(state, _):
        entropy, probabilities, beta, low, high = state
        difference = entropy - target
        active = jnp.abs(difference) >= tol
        up = difference > 0
        new_low = jnp.where(up, beta, low)
        new_high = jnp.where(up, high, beta)
        new_beta = jnp.where(
            up, jnp.where(high == inf, beta * 2, (beta + high) / 2),
            jnp.where(low == -inf, beta / 2, (beta + low) / 2),
        )
        new_entropy, new_probabilities = _neighbour_entropy(distances, mask, new_beta)
        new = (new_entropy, new_probabilities, new_beta, new_low, new_high)
        return jax.tree.map(lambda o, n: jnp.where(active, n, o), state, new), None

    state = (entropy, probabilities, one, -inf, inf)
    (entropy, probabilities, *_), _ = jax.lax.scan(step, state, length=50)
    mass = jax.ops.segment_sum(probabilities, neighbour_labels, num_segments=n_labels)
    return jnp.where(entropy == 0, -1.0, jnp.dot(mass, mass))


@ft.partial(jax.jit, static_argnames=("n_labels", "tol"))
def lisi(
    knn_indices: Int[Array, "n_cells n_neighbors"],
    knn_distances: Float[Array, "n_cells n_neighbors"],
    labels: Int[Array, " n_cells"],
    *,
    n_labels: int,
    perplexity: Float[ArrayLike, ""] | None = None,
    tol: float = 1e-5,
) -> Float[Array, " n_cells"]:
    """Local inverse Simpson index per cell (Korsunsky 2019), computed as scib-metrics' `lisi_knn`.

    **Arguments:**

    - `knn_indices`, `knn_distances`: each cell's nearest neighbours (a cell listed as its own neighbour is
      ignored).
    - `labels`: integer codes in `[0, n_labels)`.
    - `n_labels`: number of label values. (Keyword only argument.)
    - `perplexity`: effective neighbourhood size; default `floor(n_neighbors / 3)`.

    **Returns:** `1 / simpson` per cell (the effective number of labels around it).
    """
    if perplexity is None:
        perplexity = knn_indices.shape[1] // 3
    perplexity = jnp.asarray(perplexity, dtype=knn_distances.dtype)
    mask = knn_indices != jnp.arange(knn_indices.shape[0], dtype=knn_indices.dtype)[:, None]
    simpson = jax.vmap(_simpson_row, in_axes=(0, 0, 0, None, None, None))(
        knn_distances, labels[knn_indices], mask, perplexity, tol, n_labels
    )
    return 1.0 / simpson


def _codes(labels: Labels) -> tuple[np.ndarray, int]:
    categories, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.ravel().astype(np.int32), len(categories)


def ilisi(knn_indices: ArrayLike, knn_distances: ArrayLike, batches: Labels, *,
          perplexity: float | None = None) -> float:
    """Integration LISI, scaled to [0, 1] as in scib-metrics: `(median LISI - 1) / (n_batches - 1)`."""
    codes, n_batches = _codes(batches)
    values = lisi(jnp.asarray(knn_indices), jnp.asarray(knn_distances), jnp.asarray(codes), n_labels=n_batches,
                  perplexity=perplexity)
    return float((np.nanmedian(np.asarray(values)) - 1) / max(n_batches - 1, 1))


def clisi(knn_indices: ArrayLike, knn_distances: ArrayLike, labels: Labels, *,
          perplexity: float | None = None) -> float:
    """Cell-type LISI, scaled to [0, 1] as in scib-metrics: `(n_labels - median LISI) / (n_labels - 1)`."""
    codes, n_labels = _codes(labels)
    values = lisi(jnp.asarray(knn_indices), jnp.asarray(knn_distances), jnp.asarray(codes), n_labels=n_labels,
                  perplexity=perplexity)
    return float((n_labels - np.nanmedian(np.asarray(values))) / max(n_labels - 1, 1))


@ft.partial(jax.jit, static_argnames=("n_labels",))
def _silhouette_samples(
    x: Float[Array, "n_cells n_dims"], codes: Int[Array, " n_cells"], *, n_labels: int
) -> Float[Array, " n_cells"]:
    onehot = jax.nn.one_hot(codes, n_labels, dtype=x.dtype)
    sizes = jnp.sum(onehot, axis=0)
    squared_norms = jnp.sum(x**2, axis=1)

    def row_means(row: Float[Array, " n_dims"]) -> Float[Array, " n_labels"]:
        squared = jnp.maximum(squared_norms - 2 * x @ row + jnp.dot(row, row), 0.0)
        return jnp.sqrt(squared) @ onehot

    sums = jax.lax.map(row_means, x, batch_size=256)
    own = jnp.sum(sums * onehot, axis=1) / jnp.maximum(sizes[codes] - 1, 1)
    other = jnp.where((onehot > 0) | (sizes == 0)[None, :], jnp.inf, sums / jnp.maximum(sizes, 1)[None, :])
    nearest = jnp.min(other, axis=1)
    score = (nearest - own) / jnp.maximum(jnp.maximum(nearest, own), jnp.finfo(x.dtype).tiny)
    return jnp.where(sizes[codes] > 1, score, 0.0)


def silhouette_width(x: ArrayLike, labels: Labels) -> float:
    """Rousseeuw's (1987) mean silhouette width of a partition, in [-1, 1], as `sklearn.metrics.silhouette_score`
    (Euclidean; a cell alone in its cluster scores 0)."""
    codes, n_labels = _codes(labels)
    if not 2 <= n_labels < len(codes):  # one label has no other cluster to compare with; as scikit-learn
        raise ValueError(f"labels: silhouette needs 2 to n_cells - 1 = {len(codes) - 1} distinct labels, got "
                         f"{n_labels}")
    padded = -(-n_labels // 8) * 8  # empty labels are skipped: one compile serves up to 8 label counts
    return float(np.mean(np.asarray(_silhouette_samples(jnp.asarray(x), jnp.asarray(codes), n_labels=padded))))


def silhouette_label(x: ArrayLike, labels: Labels) -> float:
    """Cell-type average silhouette width rescaled to [0, 1], as scib-metrics' `silhouette_label`."""
    return (silhouette_width(x, labels) + 1) / 2
