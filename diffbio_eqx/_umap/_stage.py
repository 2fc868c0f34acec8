"""Parametric UMAP (Sainburg, McInnes & Gentner 2021): an MLP encoder trained on UMAP's own objective."""

import dataclasses
import warnings
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree

from .._core._neighbors import FuzzyGraph, neighbor_graph
from .._core._stage import AbstractTrainableStage
from .._core._train import TrainSettings, fit, shared_optimizer
from .._core._validate import check_embedding
from ._graph import find_ab_params, prune_weights, umap_default_epochs
from ._loss import umap_loss


#: Optimiser steps `fit_umap` aims for when `n_epochs` is not given.
DEFAULT_N_STEPS = 3000

#: `fit_umap(refine_steps=...)`: edges per refinement step up to `REFINE_BATCH_CELLS` cells, and Adam's learning
#: rate (in embedding units, decayed linearly to 0 over the steps).
REFINE_BATCH_SIZE = 16384
REFINE_LEARNING_RATE = 0.05
#: Above this many cells the edges per refinement step grow in proportion to the cells (`refine_batch_size`).
REFINE_BATCH_CELLS = 50_000


def refine_batch_size(n_cells: int) -> int:
    """Edges drawn per refinement step for `n_cells` cells: `REFINE_BATCH_SIZE` (16,384) up to
    `REFINE_BATCH_CELLS` (50,000) cells, then in proportion to the cells (rounded up to a multiple of 4,096, so
    nearby sizes share a compiled program), i.e. about one edge per three cells per step.

    Why in proportion: Adam moves every coordinate by about the learning rate per step, whatever its gradient's
    size, so what a step gives each cell is the signal of the edges and negatives that touch it. With a fixed
    batch, each cell is touched ~7 * 16,384 / n times per step (2.3 at 50k, 0.57 at 200k: most steps move a
    cell on momentum alone). umap-learn scales its work with the graph the same way: an epoch visits every edge
    (`epochs_per_sample`), so its cost per epoch grows with the cells while the number of epochs is fixed
    (200 above 10,000 cells)."""
    if n_cells <= REFINE_BATCH_CELLS:
        return REFINE_BATCH_SIZE
    scaled = -(-REFINE_BATCH_SIZE * n_cells // REFINE_BATCH_CELLS)
    return -(-scaled // 4096) * 4096


class UMAPFitResult(eqx.Module):
    """What `fit_umap` returns.

    - `model`: the trained `ParametricUMAP` (its `embed` maps new cells).
    - `graph`: the `FuzzyGraph` it was trained on.
    - `train_loss`: `(n_epochs,)` mean loss per epoch.
    - `embedding`: `(n_cells, n_components)` the training cells' coordinates: the encoder's output, refined
      non-parametrically when `fit_umap(refine_steps=...)` asked for it (umap-learn's `embedding_`).
    """

    model: PyTree
    graph: FuzzyGraph
    train_loss: Float[Array, " n_epochs"]
    embedding: Float[Array, "n_cells n_components"]


def _encode_chunks(
    encoder: eqx.nn.MLP, x: Float[Array, "n_cells n_features"], chunk_size: int
) -> Float[Array, "n_cells n_components"]:
    n_cells, n_features = x.shape
    chunk = max(1, min(chunk_size, n_cells))
    n_chunks = -(-n_cells // chunk)
    padded = jnp.concatenate([x, jnp.zeros((n_chunks * chunk - n_cells, n_features), dtype=x.dtype)])
    out = jax.lax.map(jax.vmap(encoder), padded.reshape(n_chunks, chunk, n_features))
    return out.reshape(n_chunks * chunk, -1)[:n_cells]


@eqx.filter_jit
def _embed(encoder: eqx.nn.MLP, x: Float[Array, "n_cells n_features"], chunk_size: int
           ) -> Float[Array, "n_cells n_components"]:
    return _encode_chunks(encoder, x, chunk_size)


def umap_graph(
    x: Float[Array, "n_cells n_features"],
    *,
    n_neighbors: int = 15,
    set_op_mix_ratio: Float[ArrayLike, ""] = 1.0,
    local_connectivity: Float[ArrayLike, ""] = 1.0,
    block_size: int | None = None,
    knn_method: str = "auto",
) -> FuzzyGraph:
    """UMAP's fuzzy graph of `x`: the connectivities of the shared `neighbor_graph` (kNN with each cell its own
    first neighbour, then `fuzzy_simplicial_set`) on every cell. `n_neighbors` is in `[2, n_cells - 1]`;
    `knn_method` is `neighbor_graph`'s `method` (`"auto"`: exact below 8,192 cells, then JAX's approximate top-k
    on an accelerator; on CPU exact below 20,000 cells, the inverted-file search `"ivf"` above). Works inside
    jit too (traced cells on CPU are searched exactly)."""
    graph = neighbor_graph(
        x, n_neighbors, method=knn_method, set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity,
        block_size=block_size,
    )
    return graph.connectivities


class ParametricUMAP(AbstractTrainableStage):
    """Embed cells with an MLP trained on UMAP's fuzzy-set cross-entropy.

    The encoder maps `(n_cells, n_features)` to `(n_cells, n_components)`. Training (`fit_umap`) builds UMAP's fuzzy
    graph on the kNN of all training cells, then runs minibatches of edges drawn in proportion to their
    weight, each with `negative_sample_rate` negatives drawn uniformly from all cells, through `umap_loss`.
    Unlike non-parametric UMAP, `embed` maps cells never seen in training with one forward pass.

    !!! example
        ```python
        umap = ParametricUMAP(x.shape[1], key=jr.key(0))
        fitted = fit_umap(umap, x, key=jr.key(1), settings=TrainSettings(n_epochs=20))
        z = fitted.model.embed(new_x)
        ```

    `set_op_mix_ratio`, `local_connectivity` (the fuzzy graph's, see `fuzzy_simplicial_set`) and
    `repulsion_strength` (the weight of `umap_loss`'s repulsive term) are array leaves, 1 by default as in
    umap-learn; change them with `eqx.tree_at`, e.g.
    `eqx.tree_at(lambda u: u.repulsion_strength, umap, jnp.asarray(0.5))`.
    """

    encoder: eqx.nn.MLP
    a: Float[Array, ""]
    b: Float[Array, ""]
    set_op_mix_ratio: Float[Array, ""]
    local_connectivity: Float[Array, ""]
    repulsion_strength: Float[Array, ""]
    input_noise: Float[Array, ""]
    n_neighbors: int = eqx.field(static=True)
    negative_sample_rate: int = eqx.field(static=True)

    def __init__(
        self,
        n_features: int,
        *,
        key: PRNGKeyArray,
        n_components: int = 2,
        hidden_size: int = 100,
        depth: int = 3,
        n_neighbors: int = 15,
        min_dist: Float[ArrayLike, ""] = 0.1,
        spread: Float[ArrayLike, ""] = 1.0,
        negative_sample_rate: int = 5,
        input_noise: Float[ArrayLike, ""] = 0.0,
    ):
        """**Arguments:**

        - `n_features`: input width (e.g. the number of PCs).
        - `key`: PRNG key for the encoder's initial weights. (Keyword only argument.)
        - `n_components`: embedding dimension.
        - `hidden_size`, `depth`: the encoder has `depth` ReLU layers of `hidden_size` units (umap-learn's
          parametric default: 3 x 100).
        - `n_neighbors`: kNN size of the graph (umap-learn default 15).
        - `min_dist`, `spread`: shape of the low-dimensional similarity; `a`, `b` are fitted from them
          (`find_ab_params`).
        - `negative_sample_rate`: negatives per positive edge (umap-learn default 5).
        - `input_noise`: training-time augmentation, not in umap-learn (0, the default, turns it off): each
          sampled edge's head input gets isotropic Gaussian noise of expected norm `input_noise * rho_head` (its
          distance to its nearest neighbour), so the encoder learns to map a cell's vicinity, where unseen
          cells fall, near the cell. Around 0.5-1 it trades a little training-set neighbour preservation for
          better placement of held-out cells among the training cells.
        """
        self.encoder = eqx.nn.MLP(
            n_features, n_components, width_size=hidden_size, depth=depth, activation=jax.nn.relu, key=key
        )
        self.a, self.b = find_ab_params(spread, min_dist)
        self.set_op_mix_ratio = jnp.asarray(1.0)
        self.local_connectivity = jnp.asarray(1.0)
        self.repulsion_strength = jnp.asarray(1.0)
        self.input_noise = jnp.asarray(input_noise)
        self.n_neighbors = n_neighbors
        self.negative_sample_rate = negative_sample_rate

    def __check_init__(self):
        if self.n_neighbors < 2:
            raise ValueError(f"n_neighbors: must be >= 2, got {self.n_neighbors}")
        if self.negative_sample_rate < 0:
            raise ValueError(f"negative_sample_rate: must be >= 0, got {self.negative_sample_rate}")

    @property
    def n_features(self) -> int:
        return cast(int, self.encoder.in_size)  # built from an int `n_features`, never "scalar"

    def __call__(
        self, x: Float[Array, "n_cells n_features"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_components"]:
        """Embed `x` with the encoder. `key` and `inference` are ignored (the encoder is deterministic)."""
        del key, inference
        return jax.vmap(self.encoder)(x)

    def embed(self, x: ArrayLike, *, chunk_size: int = 8192) -> Float[Array, "n_cells n_components"]:
        """Embed (new) cells in fixed-size chunks under one jit; validates the input first.

        **Arguments:**

        - `x`: `(n_cells, n_features)`, in the same space as the training input (e.g. projected on the same PCs).
        - `chunk_size`: rows per chunk (bounds memory). (Keyword only argument.)
        """
        x = jnp.asarray(check_embedding(x, n_dims=self.n_features))
        return _embed(self.encoder, x, chunk_size)

    def graph(self, x: Float[Array, "n_cells n_features"], *, knn_method: str = "auto") -> FuzzyGraph:
        """The fuzzy graph this model trains on (`umap_graph` with the model's settings and `knn_method`)."""
        return umap_graph(
            x, n_neighbors=self.n_neighbors, set_op_mix_ratio=self.set_op_mix_ratio,
            local_connectivity=self.local_connectivity, knn_method=knn_method,
        )

    def loss(
        self,
        batch: tuple[Int[Array, " batch"], Int[Array, " batch"]],
        /,
        *,
        key: PRNGKeyArray,
        x: Float[Array, "n_cells n_features"] | None = None,
        rho: Float[Array, " n_cells"] | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """UMAP loss on a minibatch of edges.

        **Arguments:**

        - `batch`: `(heads, tails)`, the cell indices of edges sampled in proportion to their weight.
        - `key`: draws `negative_sample_rate` uniform negatives per edge from a pool of as many uniformly drawn
          cells as edges, encoded once (and the input noise). (Keyword only argument.)
        - `x`: the full `(n_cells, n_features)` input the indices point into (for the endpoints and the
          negatives); required.
        - `rho`: `(n_cells,)` the graph's distance to each cell's nearest neighbour (scales `input_noise`); None:
          no input noise.

        **Returns:** `(loss, aux)` as `umap_loss`.
        """
        if x is None:
            raise ValueError("x: ParametricUMAP.loss needs the cells the edge indices point into (x=...)")
        heads, tails = batch
        n_edges, rate = heads.shape[0], self.negative_sample_rate
        pool_key, pair_key, noise_key = jr.split(key, 3)
        # Negatives: a pool of `n_edges` cells drawn uniformly (as umap-learn's optimiser draws them), encoded once,
        # and `rate` random pool members per edge. Each negative is still a uniform cell, but the encoder runs on
        # 3 rows per edge instead of 2 + rate (umap-learn's parametric UMAP likewise reuses the batch's own
        # embeddings as negatives), which makes a step ~2.3x cheaper at rate 5.
        pool = jr.randint(pool_key, (n_edges if rate else 0,), 0, x.shape[0], dtype=heads.dtype)
        head_x = x[heads]
        if rho is not None:
            scale = jax.lax.stop_gradient(self.input_noise) * rho[heads] / jnp.sqrt(jnp.asarray(x.shape[1], x.dtype))
            head_x = head_x + scale[:, None] * jr.normal(noise_key, head_x.shape, dtype=x.dtype)
        z = self(jnp.concatenate([head_x, x[tails], x[pool]]))
        head_z, tail_z, pool_z = z[:n_edges], z[n_edges : 2 * n_edges], z[2 * n_edges :]
        pairs = jr.randint(pair_key, (n_edges, rate), 0, max(pool.shape[0], 1), dtype=heads.dtype)
        negative_z = pool_z[pairs] if rate else jnp.zeros((n_edges, 0, z.shape[1]), z.dtype)
        return umap_loss(
            head_z, tail_z, negative_z, jax.lax.stop_gradient(self.a), jax.lax.stop_gradient(self.b),
            repulsion_strength=jax.lax.stop_gradient(self.repulsion_strength),
        )

    def trainable(self) -> PyTree[bool]:
        """The `eqx.partition` filter spec training uses: the encoder's float arrays only."""
        spec = jtu.tree_map(lambda _: False, self)
        return eqx.tree_at(lambda m: m.encoder, spec, replace=jtu.tree_map(eqx.is_inexact_array, self.encoder))

    def fit(
        self,
        x: ArrayLike,
        *,
        key: PRNGKeyArray,
        n_epochs: int | None = None,
        batch_size: int = 1024,
        graph: FuzzyGraph | None = None,
        prune_epochs: int | None = None,
        optimizer: optax.GradientTransformation | None = None,
        progress: bool = True,
    ) -> UMAPFitResult:
        """Deprecated: use `fit_umap(umap, x, key=..., settings=TrainSettings(...))`, which this forwards to."""
        warnings.warn("ParametricUMAP.fit is deprecated; use fit_umap(umap, x, key=..., settings=TrainSettings(...))",
                      DeprecationWarning, stacklevel=2)
        settings = TrainSettings(n_epochs=n_epochs, batch_size=batch_size, optimizer=optimizer, progress=progress)
        return fit_umap(self, x, key=key, settings=settings, graph=graph, prune_epochs=prune_epochs)


def _umap_loss(
    umap: ParametricUMAP, batch: tuple[Array, Array], context: tuple[Array, Array], *, key: PRNGKeyArray
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """`fit`'s loss function: the minibatch is `(heads, tails)`, the context `(x, rho)`."""
    x, rho = context
    return umap.loss(batch, key=key, x=x, rho=rho)


@eqx.filter_jit
def _refine_embedding(
    umap: ParametricUMAP,
    z: Float[Array, "n_cells n_components"],
    edges: tuple[Int[Array, " n_edges"], Int[Array, " n_edges"], Float[Array, " n_edges"]],
    key: PRNGKeyArray,
    n_steps: int,
    batch_size: int,
) -> Float[Array, "n_cells n_components"]:
    """Non-parametric UMAP from `z`: the coordinates themselves are optimised on the same loss as the encoder
    (`umap_loss`), `n_steps` Adam steps of `batch_size` edges (`refine_batch_size`) drawn in proportion to their
    weight, each with `negative_sample_rate` negatives drawn uniformly from all cells (umap-learn's edge and
    negative sampling; Adam on all coordinates at once instead of its sequential per-edge SGD)."""
    heads, tails, weights = edges
    n_cells, rate = z.shape[0], umap.negative_sample_rate
    optimizer = optax.adam(optax.linear_schedule(REFINE_LEARNING_RATE, 0.0, n_steps))
    cumulative = jnp.cumsum(weights)
    a, b = jax.lax.stop_gradient(umap.a), jax.lax.stop_gradient(umap.b)
    repulsion = jax.lax.stop_gradient(umap.repulsion_strength)

    def loss(coordinates: Array, head: Array, tail: Array, negative: Array) -> Array:
        return umap_loss(coordinates[head], coordinates[tail], coordinates[negative], a, b,
                         repulsion_strength=repulsion)[0]

    def step(carry: tuple[Array, optax.OptState], step_key: PRNGKeyArray) -> tuple[tuple[Array, optax.OptState], None]:
        coordinates, state = carry
        edge_key, negative_key = jr.split(step_key)
        drawn = jr.uniform(edge_key, (batch_size,), cumulative.dtype) * cumulative[-1]
        edge = jnp.minimum(jnp.searchsorted(cumulative, drawn, side="right"), heads.shape[0] - 1)
        negative = jr.randint(negative_key, (batch_size, rate), 0, n_cells, dtype=heads.dtype)
        gradient = jax.grad(loss)(coordinates, heads[edge], tails[edge], negative)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, state = optimizer.update(gradient, state, coordinates)
        return (cast(Array, optax.apply_updates(coordinates, updates)), state), None

    (z, _), _ = jax.lax.scan(step, (z, optimizer.init(z)), jr.split(key, n_steps))
    return z


def fit_umap(
    umap: ParametricUMAP,
    x: ArrayLike,
    *,
    key: PRNGKeyArray,
    settings: TrainSettings | None = None,
    graph: FuzzyGraph | None = None,
    prune_epochs: int | None = None,
    knn_method: str = "auto",
    refine_steps: int = 0,
) -> UMAPFitResult:
    """Build the fuzzy graph of `x` and train the encoder on it, on the shared loop (`fit`).

    **Arguments:**

    - `umap`: the (initialised) model.
    - `x`: `(n_cells, n_features)` training cells.
    - `key`: PRNG key for edge sampling and negatives. (Keyword only argument.)
    - `settings`: the loop's `TrainSettings`; what is left at None takes these defaults: `n_epochs` the number of
      epochs closest to `DEFAULT_N_STEPS` (3,000) optimiser steps, at least one (an epoch is
      `ceil(n_edges / batch_size)` steps and draws as many edges as the graph has slots,
      `2 * n_cells * n_neighbors`); `batch_size` 1024 edges (umap-learn's parametric default is
      `min(n_cells, 1000)`); the optimiser Adam 1e-3 with gradients clipped at 4 as umap-learn
      (`shared_optimizer("adam", clip=4.0)`).
    - `graph`: a precomputed `FuzzyGraph` of `x` (e.g. to reuse across runs); built on all of `x` if None.
    - `prune_epochs`: drop edges with weight below `max / prune_epochs`, as umap-learn does before optimising
      with its epoch count; default umap-learn's count (`umap_default_epochs`: 500 up to 10,000 cells, 200
      above).
    - `knn_method`: the kNN backend of the graph (`neighbor_graph`'s `method`; `"auto"`: exact below 8,192 cells,
      then JAX's approximate top-k on GPU/TPU; on CPU exact below 20,000 cells, the inverted-file search `"ivf"`
      above).
    - `refine_steps`: after training, refine the training cells' own coordinates (`UMAPFitResult.embedding`)
      from the encoder's output by non-parametric UMAP on the same graph and loss (`refine_steps` Adam steps of
      `refine_batch_size(n_cells)` edges with their negatives: 16,384 up to 50,000 cells, then in proportion to
      the cells; 1,000 is a good value); new cells still go through the encoder. 0 (the default): the encoder's
      output.

    **Returns:** a `UMAPFitResult`.
    """
    if not isinstance(refine_steps, int) or isinstance(refine_steps, bool) or refine_steps < 0:
        raise ValueError(f"refine_steps: must be a non-negative integer, got {refine_steps!r}")
    x = jnp.asarray(check_embedding(x, n_dims=umap.n_features))
    if x.shape[0] <= umap.n_neighbors:
        raise ValueError(f"x: need more than n_neighbors={umap.n_neighbors} cells, got {x.shape[0]}")
    if graph is None:
        graph = umap.graph(x, knn_method=knn_method)
    settings = (TrainSettings() if settings is None else settings).filled(
        TrainSettings(batch_size=1024, optimizer=shared_optimizer("adam", clip=4.0), description="parametric UMAP")
    )
    if settings.n_epochs is None:
        assert settings.batch_size is not None
        steps_per_epoch = -(-graph.weights.shape[0] // min(settings.batch_size, graph.weights.shape[0]))
        settings = dataclasses.replace(settings, n_epochs=max(1, round(DEFAULT_N_STEPS / steps_per_epoch)))
    if prune_epochs is None:
        prune_epochs = umap_default_epochs(x.shape[0])
    weights = prune_weights(graph.weights, prune_epochs)
    result = fit(umap, _umap_loss, (graph.heads, graph.tails), key=key, settings=settings,
                 context=(x, graph.rho.astype(x.dtype)), row_weights=weights, trainable=umap.trainable())
    embedding = result.model.embed(x)
    if refine_steps:
        edges = (graph.heads, graph.tails, weights.astype(embedding.dtype))
        embedding = _refine_embedding(result.model, embedding, edges, jr.fold_in(key, 1), refine_steps,
                                      refine_batch_size(x.shape[0]))
    return UMAPFitResult(result.model, graph, result.train_loss, embedding)
