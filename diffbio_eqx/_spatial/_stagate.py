"""STAGATE spatial domains (Dong & Zhang 2022, `STAGATE_pyG`): a graph attention autoencoder on the spatial graph.

The spatial graph links each spot to its `n_neighbors` nearest spots (STAGATE's `k_cutoff`, default 6) or to all
spots within `radius` (`rad_cutoff`, up to `max_neighbors`), plus itself. The network, as `STAGATE_pyG`'s
`STAGATE` module:

- `h1 = elu(GAT(x W1))`, `z = h1 W2` (the 30-dimensional embedding; the second layer has no attention),
- `h3 = elu(GAT_tied(z W2^T))` reusing the first layer's attention coefficients, `x_hat = h3 W1^T` (tied weights),

with STAGATE's attention: $e_{ij} = \\sigma(a_{src} \\cdot W h_j + a_{dst} \\cdot W h_i)$, then a softmax over the
neighbours $j$ of spot $i$. The loss is the mean squared reconstruction error of `x` (log-normalised expression),
trained with Adam (learning rate 1e-3, weight decay 1e-4 as an L2 term, gradients clipped to norm 5), full batch, on
the shared loop (`_core._train.fit`).

**Cell-type-aware pruning** (STAGATE's `alpha`): given pre-cluster labels (STAGATE: Louvain at resolution 0.2 on
expression), a second neighbour mask keeps only edges within a pre-cluster, and each attention layer aggregates
`(1 - prune_weight) * A_full h + prune_weight * A_pruned h` with the same attention parameters.

Domains: a Gaussian mixture on the embedding (mclust's role in STAGATE), `_clustering`'s EM; optional label
smoothing by majority vote over the spatial neighbours.
"""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._core._neighbors import exact_knn
from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit
from .._core._validate import check_embedding


class SpatialGraph(eqx.Module):
    """Each spot's neighbours as a fixed-width table (itself first).

    - `neighbors`: `(n_spots, n_slots)` spot indices; `mask`: which slots are edges (radius graphs leave some
      empty); `pruned`: the cell-type-aware mask (edges within a pre-cluster), `None` without a pre-clustering
      (the pruned graph is then the graph itself, and the network attends over it once).
    """

    neighbors: Int[Array, "n_spots n_slots"]
    mask: Bool[Array, "n_spots n_slots"]
    pruned: Bool[Array, "n_spots n_slots"] | None = None


def spatial_graph(
    coordinates: Float[ArrayLike, "n_spots 2"], *, n_neighbors: int = 6, radius: float | None = None,
    max_neighbors: int = 30, pre_labels: Int[ArrayLike, " n_spots"] | None = None,
) -> SpatialGraph:
    """STAGATE's `Cal_Spatial_Net` (kNN with `n_neighbors`, or `radius` up to `max_neighbors`) plus self-loops, and
    `Stats_Spatial_Net`'s pruning by `pre_labels` when given."""
    if radius is None and n_neighbors < 1:
        raise ValueError(f"n_neighbors: spatial neighbours per spot, must be at least 1, got {n_neighbors}")
    if radius is not None and not radius > 0:
        raise ValueError(f"radius: must be > 0, got {radius}")
    check_embedding(coordinates, field="coordinates")  # a NaN spot is nobody's neighbour and everybody's
    c = jnp.asarray(coordinates)
    n = c.shape[0]
    k = min((max_neighbors if radius is not None else n_neighbors) + 1, n)
    neighbors, distances = exact_knn(c, c, k)
    mask = jnp.ones_like(neighbors, dtype=bool) if radius is None else distances <= radius
    mask = mask.at[:, 0].set(True)
    pruned = None
    if pre_labels is not None:
        labels = jnp.asarray(pre_labels)
        pruned = mask & (labels[neighbors] == labels[:, None])
    return SpatialGraph(neighbors, mask, pruned)


def attention_coefficients(
    h: Float[Array, "n_spots n_features"], att_src: Float[Array, " n_features"], att_dst: Float[Array, " n_features"],
    neighbors: Int[Array, "n_spots n_slots"], mask: Bool[Array, "n_spots n_slots"],
) -> Float[Array, "n_spots n_slots"]:
    """STAGATE's attention: $\\mathrm{softmax}_j \\sigma(a_{src} \\cdot h_j + a_{dst} \\cdot h_i)$ over the masked
    neighbours $j$ of $i$."""
    logits = jax.nn.sigmoid((h @ att_src)[neighbors] + (h @ att_dst)[:, None])
    logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=1)


def aggregate(h: Float[Array, "n_spots n_out"], attention: Float[Array, "n_spots n_slots"],
              neighbors: Int[Array, "n_spots n_slots"]) -> Float[Array, "n_spots n_out"]:
    """$\\sum_j \\alpha_{ij} h_j$."""
    return jnp.einsum("ns,nsd->nd", attention, h[neighbors])


def _glorot(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    fan_in, fan_out = shape[0], shape[-1] if len(shape) > 1 else 1
    bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
    return jr.uniform(key, shape, jnp.zeros(()).dtype, -bound, bound)


class STAGATE(AbstractTrainableStage):
    """STAGATE's graph attention autoencoder (tied weights); `stage(x, graph)` gives the `(n_spots, latent)`
    embedding. Fit with `fit_stagate`."""

    w1: Float[Array, "n_genes n_hidden"]
    w2: Float[Array, "n_hidden n_latent"]
    att_src: Float[Array, " n_hidden"]
    att_dst: Float[Array, " n_hidden"]
    prune_weight: Float[Array, ""]

    def __init__(self, n_genes: int, *, hidden: int = 512, latent: int = 30, prune_weight: float = 0.0,
                 key: PRNGKeyArray):
        """**Arguments:** `n_genes` inputs; `hidden`, `latent`: STAGATE's `hidden_dims=[512, 30]`;
        `prune_weight`: STAGATE's `alpha` (0: no cell-type-aware pruning); `key` draws Glorot weights."""
        k1, k2, k3, k4 = jr.split(key, 4)
        self.w1, self.w2 = _glorot(k1, (n_genes, hidden)), _glorot(k2, (hidden, latent))
        self.att_src, self.att_dst = _glorot(k3, (hidden, 1))[:, 0], _glorot(k4, (hidden, 1))[:, 0]
        self.prune_weight = jnp.asarray(prune_weight, dtype=jnp.zeros(()).dtype)

    def _attend(self, x: Array, graph: SpatialGraph) -> tuple[Array, Array | None]:
        # The logits a . (x W1) are x . (W1 a): no (n_spots, n_hidden) gather is needed.
        src, dst = self.w1 @ self.att_src, self.w1 @ self.att_dst
        full = attention_coefficients(x, src, dst, graph.neighbors, graph.mask)
        if graph.pruned is None:  # no pre-clustering: the pruned graph is the graph, one pass instead of two
            return full, None
        return full, attention_coefficients(x, src, dst, graph.neighbors, graph.pruned)

    def _mix(self, h: Array, attention: tuple[Array, Array | None], graph: SpatialGraph) -> Array:
        full, pruned = attention
        if pruned is None:
            return aggregate(h, full, graph.neighbors)
        w = jax.lax.stop_gradient(self.prune_weight)  # STAGATE's `alpha` is a setting, not a trained weight
        return (1 - w) * aggregate(h, full, graph.neighbors) + w * aggregate(h, pruned, graph.neighbors)

    def encode_decode(self, x: Float[Array, "n_spots n_genes"], graph: SpatialGraph
                      ) -> tuple[Float[Array, "n_spots n_latent"], Float[Array, "n_spots n_genes"]]:
        """`(z, x_hat)`: the embedding and the reconstruction.

        Aggregation is linear, so `sum_j a_ij (x_j W)` is computed as `(sum_j a_ij x_j) W`: neighbours are
        gathered in the input (genes) and latent widths, never the hidden one (same values, less memory traffic).
        """
        attention = self._attend(x, graph)
        z = jax.nn.elu(self._mix(x, attention, graph) @ self.w1) @ self.w2
        h3 = jax.nn.elu(self._mix(z, attention, graph) @ self.w2.T)  # tied weights and tied attention
        return z, h3 @ self.w1.T

    def __call__(self, x: Float[Array, "n_spots n_genes"], graph: SpatialGraph, *, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> Float[Array, "n_spots n_latent"]:
        del key, inference
        return self.encode_decode(x, graph)[0]

    def loss(self, batch: tuple[Int[Array, " batch"]], /, *, key: PRNGKeyArray,
             x: Float[Array, "n_spots n_genes"] | None = None, graph: SpatialGraph | None = None
             ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """Mean squared reconstruction error over the batch's spots (the forward pass runs on the whole graph,
        held in `x` and `graph`)."""
        del key
        if x is None or graph is None:
            raise ValueError("graph: STAGATE's loss needs the whole expression `x` and the spatial `graph`")
        rows = batch[0]
        _, x_hat = self.encode_decode(x, graph)
        loss = jnp.mean((x[rows] - x_hat[rows]) ** 2)
        return loss, {"mse": loss}


@ft.cache
def stagate_optimizer() -> optax.GradientTransformation:
    """STAGATE's optimiser: gradients clipped to norm 5, then torch's Adam with weight decay 1e-4 (L2), lr 1e-3."""
    return optax.chain(optax.clip_by_global_norm(5.0), optax.add_decayed_weights(1e-4),
                       optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)(1e-3))


def _stagate_loss(model: STAGATE, batch: tuple[Array, ...], context: tuple[Array, SpatialGraph], *,
                  key: PRNGKeyArray) -> tuple[Array, dict[str, Array]]:
    x, graph = context
    return model.loss((batch[0][:, 0].astype(jnp.int32),), key=key, x=x, graph=graph)


def fit_stagate(stage: STAGATE, x: Float[ArrayLike, "n_spots n_genes"], graph: SpatialGraph, *, key: PRNGKeyArray,
                settings: TrainSettings | None = None) -> FitResult:
    """Train STAGATE on the shared loop: full batch (`batch_size = n_spots`) for 1000 epochs by default, as
    STAGATE's `n_epochs=1000`, with `stagate_optimizer()`."""
    x = jnp.asarray(x, dtype=jnp.zeros(()).dtype)
    n = x.shape[0]
    defaults = TrainSettings(n_epochs=1000, batch_size=n, optimizer=stagate_optimizer(), description="STAGATE")
    settings = (settings or TrainSettings(progress=False)).filled(defaults)
    rows = np.arange(n, dtype=np.int32)[:, None]
    return fit(stage, _stagate_loss, (rows,), key=key,
               settings=settings, context=(x, graph))


def smooth_labels(labels: Int[ArrayLike, " n_spots"], graph: SpatialGraph, n_labels: int) -> Int[Array, " n_spots"]:
    """Majority vote of each spot's label among its spatial neighbours (itself included; ties to the lower label)."""
    labels = jnp.asarray(labels)
    one_hot = jax.nn.one_hot(labels[graph.neighbors], n_labels)
    votes = jnp.sum(jnp.where(graph.mask[..., None], one_hot, 0.0), axis=1)
    return jnp.argmax(votes, axis=1).astype(labels.dtype)
