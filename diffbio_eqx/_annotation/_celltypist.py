"""CellTypist (Domínguez Conde et al. 2022) as an immutable Equinox module: `CellTypistModel`, its training and
prediction.

Faithful to `celltypist.train` / `celltypist.annotate` (celltypist 1.6):

- input: log1p of counts per 10k (`log1p(1e4 * x / sum(x))`, the library over all of the cell's genes);
- genes never expressed in the reference are left out; the rest are standardised (`StandardScaler(with_mean=True)`:
  mean and population standard deviation, a zero deviation taken as one) and clipped above at 10;
- one-vs-rest L2 logistic regression with `C = 1` (`LogisticRegression(C=1, multi_class="ovr")`, CellTypist's
  choice; `multi_class="multinomial"` gives the softmax model), minimised full batch by L-BFGS (optax) to a
  gradient tolerance, where scikit-learn's `lbfgs` solver runs on the same objective
  $\\frac1n\\sum_i \\ell(y_i, W x_i + b) + \\frac{1}{2Cn}\\|W\\|^2$;
- `feature_selection=True`: CellTypist's two-pass training. The first pass is its `SGDClassifier(alpha=1e-4)`
  objective (one-vs-rest logistic loss, mean over cells, plus $\\frac{\\alpha}{2}\\|W\\|^2$), here minimised full
  batch by the same L-BFGS instead of by SGD; the `top_genes` largest $|W_{kg}|$ of every type are kept (their
  union), and the second pass trains on those genes only;
- prediction: decision scores $W x + b$ on the query's genes matched by name (genes missing from the query are left
  out, as CellTypist drops their coefficients, with a warning naming them), the label of the largest score, and
  CellTypist's probability matrix `expit(scores)` (one-vs-rest) or the softmax (multinomial);
- majority voting: each over-cluster takes its most frequent predicted label (`Classifier.majority_vote`,
  `min_prop=0`). CellTypist over-clusters with Leiden at resolution 5 to 30; here over-clusters come from the
  caller (any labels, e.g. scanpy's Leiden) or from `over_cluster`: k-means (k-means++ and Lloyd, in JAX) with
  $\\lceil\\sqrt{n}\\rceil$ clusters on the first 50 principal components of the scaled expression, a documented
  stand-in that makes clusters of about $\\sqrt{n}$ cells, as Leiden at CellTypist's resolutions does.
"""

import math
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pandas as pd
import scipy.sparse as sp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._clustering._kmeans import kmeans_plus_plus, lloyd, nearest_centroid
from .._core._checkpoint import load_leaves, save_leaves
from .._core._loop import iterate
from .._core._neighbors import neighbor_graph
from .._core._stage import AbstractStage
from .._core._train import map_in_chunks
from .._core._validate import check_counts


MultiClass = Literal["ovr", "multinomial"]
TARGET_SUM = 1e4
CLIP = 10.0


class MissingGenesWarning(UserWarning):
    """Some of a model's genes are not in the query data; prediction uses the others."""


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------


def log_normalize(
    counts: Float[Array, "n_cells n_genes"], library: Float[Array, " n_cells"]
) -> Float[Array, "n_cells n_genes"]:
    """CellTypist's input: $\\log(1 + 10^4 x_{ig} / \\ell_i)$ with $\\ell_i$ the cell's total count."""
    scale = jnp.asarray(TARGET_SUM, counts.dtype) / jnp.maximum(library, jnp.asarray(1.0, counts.dtype))
    return jnp.log1p(counts * scale[:, None])


def standardize(
    x: Float[Array, "n_cells n_genes"], mean: Float[Array, " n_genes"], scale: Float[Array, " n_genes"]
) -> Float[Array, "n_cells n_genes"]:
    """`StandardScaler.transform` then CellTypist's clip above at 10: $\\min((x - m) / s, 10)$."""
    return jnp.minimum((x - mean[None, :]) / scale[None, :], jnp.asarray(CLIP, x.dtype))


def logistic_objective(
    params: tuple[Float[Array, "n_types n_genes"], Float[Array, " n_types"]],
    x: Float[Array, "n_cells n_genes"],
    onehot: Float[Array, "n_cells n_types"],
    l2: Float[Array, ""],
    multi_class: MultiClass,
) -> Float[Array, ""]:
    """$\\frac1n\\sum_i \\ell(y_i, W x_i + b) + \\frac{l_2}{2}\\|W\\|^2$; $\\ell$ the softmax cross-entropy
    (multinomial) or the sum over types of the binary logistic losses (one-vs-rest). The intercept is not
    penalised (scikit-learn's `LogisticRegression`, `SGDClassifier`)."""
    weights, intercept = params
    scores = x @ weights.T + intercept[None, :]
    if multi_class == "multinomial":
        data = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(scores, axis=-1), axis=-1))
    else:
        signs = 2.0 * onehot - 1.0
        data = jnp.sum(jnp.mean(jax.nn.softplus(-signs * scores), axis=0))
    return data + 0.5 * l2 * jnp.sum(weights**2)


def _max_abs(tree: Any) -> Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


@eqx.filter_jit
def fit_logistic(
    x: Float[Array, "n_cells n_genes"],
    onehot: Float[Array, "n_cells n_types"],
    l2: Float[Array, ""],
    *,
    multi_class: MultiClass = "ovr",
    max_steps: int = 1000,
    tol: float = 1e-6,
) -> tuple[Float[Array, "n_types n_genes"], Float[Array, " n_types"], Int[Array, ""]]:
    """Minimise `logistic_objective` from zero by L-BFGS (optax, zoom line search), full batch.

    Stops when the largest gradient entry is at most `tol` (scikit-learn's `lbfgs`: `gtol=tol`, there 1e-4) or
    after `max_steps` (CellTypist: 1000 below 50,000 cells). **Returns:** `(weights, intercept, n_steps)`.
    """
    n_types, n_genes = onehot.shape[1], x.shape[1]
    params = (jnp.zeros((n_types, n_genes), x.dtype), jnp.zeros((n_types,), x.dtype))
    loss = lambda p: logistic_objective(p, x, onehot, l2, multi_class)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(state, _):
        p, opt_state, _ = state
        value, grad = value_and_grad(p, state=opt_state)
        updates, opt_state = solver.update(grad, opt_state, p, value=value, grad=grad, value_fn=loss)
        return (cast(Any, optax.apply_updates(p, updates)), opt_state, _max_abs(grad)), None

    # optax's L-BFGS line search mixes int32 and int64 counters under x64; keep JAX's standard promotion here.
    with jax.numpy_dtype_promotion("standard"):
        init = (params, solver.init(params), jnp.asarray(jnp.inf, x.dtype))
        (final, _, _), _, n_steps = iterate(step, init, lambda s: s[2] <= tol, max_steps=max_steps,
                                            early_exit=True)
    weights, intercept = cast(tuple[Array, Array], final)
    return weights, intercept, n_steps


def decision_scores(
    x: Float[Array, "n_cells n_genes"], weights: Float[Array, "n_types n_genes"], intercept: Float[Array, " n_types"]
) -> Float[Array, "n_cells n_types"]:
    """`LogisticRegression.decision_function`: $W x + b$."""
    return x @ weights.T + intercept[None, :]


def majority_vote(
    predicted: Int[Array, " n_cells"], clusters: Int[Array, " n_cells"], *, n_types: int, n_clusters: int
) -> Int[Array, " n_cells"]:
    """CellTypist's majority voting: every cell takes the most frequent predicted label of its over-cluster
    (ties: the lowest label code, as `DataFrame.idxmax` over sorted labels)."""
    votes = jnp.zeros((n_clusters, n_types), jnp.int32).at[clusters, predicted].add(1)
    return jnp.argmax(votes, axis=1)[clusters]


@eqx.filter_jit
def over_cluster(
    x: Float[Array, "n_cells n_genes"], *, n_clusters: int, n_components: int = 50, key: PRNGKeyArray
) -> Int[Array, " n_cells"]:
    """Over-clusters for majority voting: k-means (k-means++ seeding, up to 100 Lloyd rounds) on the first
    `n_components` principal components of `x` (the scaled expression). A JAX stand-in for CellTypist's Leiden
    over-clustering (see the module docstring)."""
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    n_comp = min(n_components, *x.shape)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :n_comp] * s[None, :n_comp]
    centroids = lloyd(pcs, kmeans_plus_plus(pcs, n_clusters, key=key), n_iter=100)
    return nearest_centroid(pcs, centroids)


def celltypist_resolution(n_cells: int) -> float:
    """CellTypist's Leiden resolution for over-clustering: 5, 10, 15, 20, 25, 30 below 5k, 20k, 40k, 100k, 200k
    cells and above."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0)):
        if n_cells < limit:
            return resolution
    return 30.0


def leiden_over_cluster(x: Any, *, resolution: float | None = None, seed: int = 0) -> np.ndarray:
    """CellTypist's over-clustering: Leiden (igraph, `objective_function="modularity"`, `beta=0.01`,
    `n_iterations=2`, as scanpy's `tl.leiden(flavor="igraph")` that CellTypist calls) on the 10-neighbour UMAP
    connectivities (`neighbor_graph`, scanpy's `pp.neighbors(n_neighbors=10)`) of the first 50 principal
    components of `x` (the scaled expression), at `celltypist_resolution` unless given. Needs the optional
    `igraph` package."""
    try:
        import igraph
    except ImportError:
        raise ImportError("Leiden over-clustering needs igraph (`pip install igraph`); or use 'kmeans'") from None
    import random

    x = jnp.asarray(x)
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    n_comp = min(50, *x.shape)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    graph = neighbor_graph(u[:, :n_comp] * s[None, :n_comp], min(10, x.shape[0] - 1))
    c = graph.connectivities
    weights = np.asarray(c.weights)
    keep = weights > 0
    edges = list(zip(np.asarray(c.heads)[keep].tolist(), np.asarray(c.tails)[keep].tolist()))
    g = igraph.Graph(n=x.shape[0], edges=edges, directed=False)
    g.es["weight"] = weights[keep].tolist()
    random.seed(seed)
    igraph.set_random_number_generator(random)
    resolution = celltypist_resolution(x.shape[0]) if resolution is None else float(resolution)
    part = g.community_leiden(objective_function="modularity", weights="weight", resolution=resolution,
                              beta=0.01, n_iterations=2)
    return np.asarray(part.membership, dtype=np.int32)


def default_n_over_clusters(n_cells: int) -> int:
    """$\\lceil\\sqrt{n}\\rceil$ over-clusters (at least 2, at most `n_cells`)."""
    return max(1, min(n_cells, max(2, math.ceil(math.sqrt(n_cells)))))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class CellTypistModel(AbstractStage):
    """A trained CellTypist classifier: scaler, coefficients, its genes and cell types.

    `model(log_expression)` gives the decision scores `(n_cells, n_types)` of cells given as CellTypist's input
    (`log_normalize`) on the model's genes, in order. Use `predict_celltypist` for counts with any genes.
    """

    weights: Float[Array, "n_types n_genes"]
    intercept: Float[Array, " n_types"]
    mean: Float[Array, " n_genes"]
    scale: Float[Array, " n_genes"]
    genes: tuple[str, ...] = eqx.field(static=True)
    cell_types: tuple[str, ...] = eqx.field(static=True)
    multi_class: str = eqx.field(static=True)

    def __check_init__(self):
        if len(self.genes) != self.weights.shape[1] or len(self.cell_types) != self.weights.shape[0]:
            raise ValueError(f"genes/cell_types: {len(self.genes)} genes and {len(self.cell_types)} types for "
                             f"weights of shape {self.weights.shape}")
        if self.multi_class not in ("ovr", "multinomial"):
            raise ValueError(f"multi_class: must be 'ovr' or 'multinomial', got {self.multi_class!r}")

    def __call__(
        self, x: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_types"]:
        del key, inference
        return decision_scores(standardize(x, self.mean, self.scale), self.weights, self.intercept)

    def probabilities(self, scores: Float[Array, "n_cells n_types"]) -> Float[Array, "n_cells n_types"]:
        """CellTypist's probability matrix: `expit(scores)` (one-vs-rest; rows need not sum to one) or the
        softmax (multinomial)."""
        return jax.nn.sigmoid(scores) if self.multi_class == "ovr" else jax.nn.softmax(scores, axis=-1)


def _host_log_normalized(counts: Any) -> np.ndarray:
    checked = check_counts(counts)
    dense = cast(Any, checked).toarray() if sp.issparse(checked) else np.asarray(checked)
    dense = dense.astype(np.float64)
    library = np.maximum(dense.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(dense * (TARGET_SUM / library))


def _labels(labels: Any, n_cells: int) -> tuple[np.ndarray, tuple[str, ...]]:
    series = pd.Series(np.asarray(labels, dtype=object))
    if len(series) != n_cells:
        raise ValueError(f"labels: {len(series)} labels for {n_cells} cells")
    if series.isna().any():
        raise ValueError(f"labels: {int(series.isna().sum())} missing labels; leave those cells out")
    codes, types = pd.factorize(series.astype(str), sort=True)
    if len(types) < 2:
        raise ValueError(f"labels: need at least two cell types, got {list(types)}")
    return codes.astype(np.int32), tuple(str(t) for t in types)


def _float(x: Any) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(float))


def train_celltypist(
    counts: Any,
    labels: Any,
    genes: Any,
    *,
    C: float = 1.0,
    multi_class: MultiClass = "ovr",
    feature_selection: bool = False,
    top_genes: int = 300,
    alpha: float = 1e-4,
    max_iter: int | None = None,
    tol: float = 1e-6,
) -> CellTypistModel:
    """Train a CellTypist model on raw counts of labelled reference cells (`celltypist.train`'s defaults).

    **Arguments:**

    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse (log-normalised to 10k here).
    - `labels`: `(n_cells,)` cell-type names (no missing values).
    - `genes`: the `n_genes` gene names (kept in the model to match query genes by name).
    - `C`: inverse L2 strength (CellTypist: 1). (Keyword only argument.)
    - `multi_class`: `"ovr"` (CellTypist) or `"multinomial"`.
    - `feature_selection`, `top_genes`, `alpha`: CellTypist's two-pass training (see the module docstring).
    - `max_iter`: L-BFGS steps (CellTypist: 1000 below 50,000 cells, 500 below 500,000, else 200).
    - `tol`: stop when the largest gradient entry is below this.

    **Returns:** a `CellTypistModel`.
    """
    x = _host_log_normalized(counts)
    n_cells = x.shape[0]
    names = np.asarray([str(g) for g in genes], dtype=object)
    if len(names) != x.shape[1]:
        raise ValueError(f"genes: {len(names)} names for {x.shape[1]} columns of counts")
    if C <= 0 or alpha <= 0:
        raise ValueError(f"C, alpha: must be > 0, got C={C}, alpha={alpha}")
    codes, types = _labels(labels, n_cells)
    expressed = np.count_nonzero(x, axis=0) > 0
    x, names = x[:, expressed], names[expressed]
    mean, std = x.mean(axis=0), x.std(axis=0)
    scale = np.where(std == 0, 1.0, std)
    scaled = _float(np.minimum((x - mean) / scale, CLIP))
    onehot = jax.nn.one_hot(jnp.asarray(codes), len(types), dtype=scaled.dtype)
    if max_iter is None:
        max_iter = 1000 if n_cells < 50_000 else 500 if n_cells < 500_000 else 200
    options = {"max_steps": int(max_iter), "tol": float(tol)}
    if feature_selection:
        if len(names) <= top_genes:
            raise ValueError(f"top_genes: {top_genes} is not below the number of expressed genes ({len(names)})")
        first, _, _ = fit_logistic(scaled, onehot, _float(alpha), multi_class="ovr", **options)
        keep = np.unique(np.argpartition(np.abs(np.asarray(first)), -top_genes, axis=1)[:, -top_genes:])
        scaled, names, mean, scale = scaled[:, keep], names[keep], mean[keep], scale[keep]
    weights, intercept, _ = fit_logistic(scaled, onehot, _float(1.0 / (C * n_cells)), multi_class=multi_class,
                                         **options)
    return CellTypistModel(weights, intercept, _float(mean), _float(scale), tuple(names), types, multi_class)


def query_columns(model_genes: Sequence[str], query_genes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Match the model's genes by name in the query's: `(query_columns, model_columns)` of the shared genes, in
    the model's order. Warns (`MissingGenesWarning`) naming the model genes the query lacks and how many are used;
    raises when none is shared."""
    index = pd.Index([str(g) for g in query_genes])
    if not index.is_unique:
        repeated = list(index[index.duplicated()].unique())
        raise ValueError(f"genes: query gene names must be unique to match by name; {len(repeated)} repeated, "
                         f"e.g. {repeated[:5]}")
    position = index.get_indexer([str(g) for g in model_genes])
    found = position >= 0
    if not found.any():
        raise ValueError(f"genes: none of the model's {len(model_genes)} genes is in the query (e.g. "
                         f"{list(model_genes[:5])}); are they the same kind of names (symbols vs Ensembl IDs)?")
    if not found.all():
        missing = [str(g) for g, ok in zip(model_genes, found) if not ok]
        warnings.warn(f"genes: {len(missing)} of the model's {len(model_genes)} genes are missing from the query "
                      f"(first {missing[:10]}); predicting with the {int(found.sum())} genes present",
                      MissingGenesWarning, stacklevel=3)
    return position[found], np.flatnonzero(found)


class CellTypistPrediction(eqx.Module):
    """What `predict_celltypist` returns: `labels` (codes into `cell_types`), `scores` (decision scores),
    `probabilities` (CellTypist's probability matrix), `majority` (majority-voted codes, or None) and
    `over_clusters` (or None)."""

    labels: Int[Array, " n_cells"]
    scores: Float[Array, "n_cells n_types"]
    probabilities: Float[Array, "n_cells n_types"]
    majority: Int[Array, " n_cells"] | None
    over_clusters: Int[Array, " n_cells"] | None
    cell_types: tuple[str, ...] = eqx.field(static=True)


@eqx.filter_jit
def _scaled_chunk(batch: tuple[Array, Array], model: CellTypistModel) -> Array:
    counts, library = batch
    return standardize(log_normalize(counts, library), model.mean, model.scale)


@eqx.filter_jit
def _query_scores_chunk(
    batch: tuple[Float[Array, "n_rows n_query_genes"]],
    context: tuple[Float[Array, "n_types n_query_genes"], Float[Array, " n_types"], Float[Array, " n_query_genes"],
                   Float[Array, " n_query_genes"]],
) -> Float[Array, "n_rows n_types"]:
    """Decision scores of a chunk of query counts on all of the query's genes, with the model laid out on them
    (`_on_query_genes`): each cell's library over all of them, then `model(log_normalize(x, library))` written for
    speed on CPU. XLA's log1p is not vectorised there (12x slower than log), and $10^4 x / \\ell \\ge 10^4 / \\ell$
    where $x > 0$, far from where log(1 + y) loses precision; zeros go through the constant $W z^0 + b$ with
    $z^0 = -m / s$."""
    (counts,), (weights, intercept, mean, scale) = batch, context
    dtype = weights.dtype
    x = counts.astype(dtype)
    factor = jnp.asarray(TARGET_SUM, dtype) / jnp.maximum(jnp.sum(x, axis=1), jnp.asarray(1.0, dtype))
    zero = -mean / scale
    z = jnp.minimum((jnp.log(1 + x * factor[:, None]) - mean[None, :]) / scale[None, :], jnp.asarray(CLIP, dtype))
    delta = jnp.where(x > 0, z - zero[None, :], 0)
    return delta @ weights.T + decision_scores(zero[None, :], weights, intercept)


def _on_query_genes(model: CellTypistModel, columns: np.ndarray, n_query: int) -> tuple[Array, Array, Array, Array]:
    """The model's weights, intercept, means and scales laid out on the query's `n_query` genes: the model's genes
    at `columns`, the others with weight 0, mean 0, scale 1 (they add nothing), so no column of the query is
    gathered or copied."""
    dtype = np.dtype(model.weights.dtype)
    weights = np.zeros((len(model.cell_types), n_query), dtype)
    weights[:, columns] = np.asarray(model.weights)
    mean, scale = np.zeros(n_query, dtype), np.ones(n_query, dtype)
    mean[columns], scale[columns] = np.asarray(model.mean), np.asarray(model.scale)
    return jnp.asarray(weights), model.intercept, jnp.asarray(mean), jnp.asarray(scale)


def _query_scores(model: CellTypistModel, counts: Any, columns: np.ndarray, chunk_size: int) -> Array:
    """`_query_scores_chunk` over row chunks of the query (`map_in_chunks`: one compiled shape, a sparse query
    densified one chunk at a time on the host, never the whole matrix)."""
    context = _on_query_genes(model, columns, counts.shape[1])
    return map_in_chunks(_query_scores_chunk, (counts,), chunk_size=chunk_size, context=context)


def _dense_data(checked: Any, columns: np.ndarray, dtype: np.dtype) -> tuple[Any, np.ndarray]:
    """The model's columns of the counts (sparse stays sparse; `map_in_chunks` densifies a chunk at a time) and
    each cell's library over all of its genes."""
    library = np.asarray(checked.sum(axis=1)).ravel().astype(dtype)
    selected = checked[:, columns]
    return (selected.astype(dtype) if sp.issparse(selected) else np.asarray(selected, dtype=dtype)), library


def restrict_to_query(model: CellTypistModel, query_genes: Any) -> tuple[CellTypistModel, np.ndarray]:
    """The model on the genes the query has (CellTypist drops the others' coefficients) and where those genes sit
    in the query's columns."""
    columns, kept = query_columns(model.genes, query_genes)
    if len(kept) == len(model.genes):
        return model, columns
    restricted = CellTypistModel(model.weights[:, kept], model.intercept, model.mean[kept], model.scale[kept],
                                 tuple(model.genes[i] for i in kept), model.cell_types, model.multi_class)
    return restricted, columns


def predict_celltypist(
    model: CellTypistModel,
    counts: Any,
    genes: Any,
    *,
    majority_voting: bool = False,
    over_clustering: Any = "kmeans",
    key: PRNGKeyArray | None = None,
    chunk_size: int = 2048,
) -> CellTypistPrediction:
    """Annotate query cells from raw counts (`celltypist.annotate`).

    **Arguments:**

    - `model`: a trained `CellTypistModel`.
    - `counts`: `(n_cells, n_query_genes)` raw counts, dense or SciPy sparse; each cell's library is its total over
      all of these genes.
    - `genes`: the query's gene names; the model's genes are matched by name (any order; missing ones are left out
      with a `MissingGenesWarning`).
    - `majority_voting`: also majority-vote over over-clusters. (Keyword only argument.)
    - `over_clustering`: `(n_cells,)` over-cluster labels (e.g. scanpy's Leiden), `"leiden"`
      (`leiden_over_cluster`, CellTypist's, needs igraph) or `"kmeans"` (`over_cluster` with
      `default_n_over_clusters` clusters, pure JAX, needs `key`).
    - `key`: PRNG key for `"kmeans"` (and the seed of `"leiden"`).
    - `chunk_size`: cells per compiled call (2,048: a sparse query's chunk, densified on the host, stays in cache;
      larger chunks were slower on CPU).

    **Returns:** a `CellTypistPrediction`.
    """
    checked = check_counts(counts)
    n_cells, n_genes = cast(tuple[int, int], checked.shape)
    if len(genes) != n_genes:
        raise ValueError(f"genes: {len(genes)} names for {n_genes} columns of counts")
    restricted, columns = restrict_to_query(model, genes)
    dtype = np.dtype(restricted.weights.dtype)
    scores = _query_scores(restricted, checked, columns, chunk_size)
    labels = jnp.argmax(scores, axis=1)
    majority = clusters = None
    if majority_voting:
        if isinstance(over_clustering, str):
            if over_clustering not in ("kmeans", "leiden"):
                raise ValueError(f"over_clustering: 'kmeans', 'leiden' or labels, got {over_clustering!r}")
            if key is None:
                raise ValueError("key: majority voting with computed over-clusters needs a key")
            scaled = map_in_chunks(_scaled_chunk, _dense_data(checked, columns, dtype), chunk_size=chunk_size,
                                   context=restricted)
            if over_clustering == "leiden":
                seed = int(jr.randint(key, (), 0, 2**31 - 1))
                clusters = jnp.asarray(leiden_over_cluster(scaled, seed=seed))
            else:
                clusters = over_cluster(scaled, n_clusters=default_n_over_clusters(n_cells), key=key)
        else:
            given = np.asarray(over_clustering)
            if given.dtype.kind not in "iub":  # names: factorised as strings (integer labels as they are)
                given = pd.Series(given.astype(object)).astype(str).to_numpy()
            codes = pd.factorize(given)[0]
            if len(codes) != n_cells:
                raise ValueError(f"over_clustering: {len(codes)} labels for {n_cells} cells")
            clusters = jnp.asarray(codes.astype(np.int32))
        n_clusters = int(jnp.max(clusters)) + 1
        majority = majority_vote(labels, clusters, n_types=len(model.cell_types), n_clusters=n_clusters)
    return CellTypistPrediction(labels, scores, restricted.probabilities(scores), majority, clusters,
                                model.cell_types)


def save_celltypist(path: str | os.PathLike[str], model: CellTypistModel) -> pathlib.Path:
    """Save a `CellTypistModel` atomically: a JSON header (genes, cell types, settings), then its leaves."""
    header = {"format": "diffbio_eqx.celltypist/1", "genes": list(model.genes), "cell_types": list(model.cell_types),
              "multi_class": model.multi_class, "dtype": np.dtype(model.weights.dtype).name}
    return save_leaves(path, model, header=header)


def load_celltypist(path: str | os.PathLike[str]) -> CellTypistModel:
    """Load a model written by `save_celltypist` (with its genes and cell types)."""
    def like(header: dict[str, Any]) -> CellTypistModel:
        n_types, n_genes, dtype = len(header["cell_types"]), len(header["genes"]), np.dtype(header["dtype"])
        return CellTypistModel(jnp.zeros((n_types, n_genes), dtype), jnp.zeros((n_types,), dtype),
                               jnp.zeros((n_genes,), dtype), jnp.ones((n_genes,), dtype), tuple(header["genes"]),
                               tuple(header["cell_types"]), header["multi_class"])

    return load_leaves(path, format="diffbio_eqx.celltypist/1", template=like,
                       what="a CellTypist model saved by save_celltypist")[0]
