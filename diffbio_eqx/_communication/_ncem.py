"""An NCEM-style linear model of communication in space (Fischer et al. 2022, "node-centric expression models").

Each cell's expression is predicted from its own type and from who its spatial neighbours are:
$$\\hat y_i = B_{t_i} + \\sum_s a_{is} \\, W_{t_i, s} + \\sum_l m_{il} \\, V_{t_i, l}$$
with $t_i$ the cell's type, $a_{is}$ the share of type $s$ among its $k$ nearest cells (the shared neighbour
graph, `_core._neighbors.neighbor_graph`, on the coordinates), $m_{il}$ optionally the neighbours' mean
expression of ligand $l$. $W$ `(receiver, sender, gene)` holds the sender -> receiver interaction strengths
(NCEM's linear "interaction" model with a scaled adjacency), $V$ the ligand effects. Gaussian loss with an L2
penalty on $W$ and $V$, trained with the shared loop (`_core._train.fit`); the baseline without neighbours keeps
$W = V = 0$ (NCEM's "type-only" reference model).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit, shared_optimizer


def neighbour_shares(indices: Int[Array, "n_cells n_neighbors"], types: Int[Array, " n_cells"], n_types: int
                     ) -> Float[Array, "n_cells n_types"]:
    """Share of each type among each cell's neighbours (column 0 of `indices`, the cell itself, left out)."""
    return jnp.mean(jax.nn.one_hot(types[indices[:, 1:]], n_types), axis=1)


def neighbour_means(indices: Int[Array, "n_cells n_neighbors"], values: Float[Array, "n_cells n_ligands"]
                    ) -> Float[Array, "n_cells n_ligands"]:
    """Mean of `values` (e.g. ligand expression) over each cell's neighbours (itself left out)."""
    return jnp.mean(values[indices[:, 1:]], axis=1)


class SpatialNCEM(AbstractTrainableStage):
    """Predict expression from own type, neighbour-type shares and (optionally) neighbours' ligand expression.

    `__call__(types_onehot, shares, ligands)` returns `(n_cells, n_genes)` predictions; `interaction[r, s]` is the
    effect on a receiver of type `r` of a neighbourhood entirely of type `s`. With `use_neighbours=False` it is
    the type-only baseline.
    """

    base: Float[Array, "n_types n_genes"]
    interaction: Float[Array, "n_types n_types n_genes"]
    ligand_effect: Float[Array, "n_types n_ligands n_genes"]
    l2: Float[Array, ""]
    use_neighbours: bool = eqx.field(static=True)

    def __init__(self, n_types: int, n_genes: int, *, n_ligands: int = 0, l2: Float[ArrayLike, ""] = 1e-3,
                 use_neighbours: bool = True):
        """**Arguments:** `n_types` cell types, `n_genes` genes predicted, `n_ligands` ligand features (0: none),
        `l2` the penalty on the neighbour coefficients, `use_neighbours` False for the type-only baseline."""
        self.base = jnp.zeros((n_types, n_genes))
        self.interaction = jnp.zeros((n_types, n_types, n_genes))
        self.ligand_effect = jnp.zeros((n_types, n_ligands, n_genes))
        self.l2 = jnp.asarray(l2)
        self.use_neighbours = use_neighbours

    def __call__(self, types_onehot: Float[Array, "n_cells n_types"], shares: Float[Array, "n_cells n_types"],
                 ligands: Float[Array, "n_cells n_ligands"], *, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> Float[Array, "n_cells n_genes"]:
        del key, inference
        out = types_onehot @ self.base
        if self.use_neighbours:
            out = out + jnp.einsum("cr,cs,rsg->cg", types_onehot, shares, self.interaction)
            out = out + jnp.einsum("cr,cl,rlg->cg", types_onehot, ligands, self.ligand_effect)
        return out

    def loss(self, batch: tuple[Array, ...], /, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Array]]:
        y, types_onehot, shares, ligands = batch
        mse = jnp.mean((self(types_onehot, shares, ligands, key=key) - y) ** 2)
        penalty = self.l2 * (jnp.sum(self.interaction**2) + jnp.sum(self.ligand_effect**2)) / self.base.size
        return mse + penalty, {"mse": mse}


def _ncem_loss(model: SpatialNCEM, batch: tuple[Array, ...], context: None, *, key: PRNGKeyArray
               ) -> tuple[Float[Array, ""], dict[str, Array]]:
    del context
    return model.loss(batch, key=key)


def fit_ncem(stage: SpatialNCEM, y: Float[ArrayLike, "n_cells n_genes"], types: Int[ArrayLike, " n_cells"],
             indices: Int[ArrayLike, "n_cells n_neighbors"], *, key: PRNGKeyArray,
             ligands: Float[ArrayLike, "n_cells n_ligands"] | None = None,
             rows: Int[ArrayLike, " n_rows"] | None = None, settings: TrainSettings | None = None) -> FitResult:
    """Train `stage` on expression `y` (e.g. log1p counts) with the shared loop.

    `indices` is the neighbour graph's `(n_cells, k)` index matrix (column 0 the cell itself, as
    `neighbor_graph` returns it); `ligands` the cells' own ligand expression (the model uses its neighbour mean);
    `rows` the cells to train on (default all; the neighbourhoods always use every cell).
    `settings` default to 300 epochs of batches of up to 1,024 cells with Adam at learning rate 0.05, no progress
    lines; what a given `TrainSettings` leaves at None takes these values.
    """
    y, types, indices = jnp.asarray(y), jnp.asarray(types), jnp.asarray(indices)
    stage = jax.tree_util.tree_map(lambda a: a.astype(y.dtype) if eqx.is_inexact_array(a) else a, stage)
    n_types = stage.base.shape[0]
    onehot = jax.nn.one_hot(types, n_types, dtype=y.dtype)
    shares = neighbour_shares(indices, types, n_types).astype(y.dtype)
    lig = jnp.zeros((y.shape[0], 0), y.dtype)
    if ligands is not None:
        lig = neighbour_means(indices, jnp.asarray(ligands, y.dtype))
    data = (y, onehot, shares, lig)
    if rows is not None:
        data = tuple(d[jnp.asarray(rows)] for d in data)
    defaults = TrainSettings(n_epochs=300, batch_size=min(1024, data[0].shape[0]), optimizer=shared_optimizer("adam"),
                             hyperparameters={"learning_rate": 0.05}, progress=False)
    settings = defaults if settings is None else settings.filled(defaults)
    trainable = jax.tree_util.tree_map(lambda _: False, stage)
    trainable = eqx.tree_at(lambda m: (m.base, m.interaction, m.ligand_effect), trainable,
                            (True, stage.use_neighbours, stage.use_neighbours))
    return fit(stage, _ncem_loss, data, key=key, settings=settings, trainable=trainable)


def held_out_r2(model: SpatialNCEM, y: Float[Array, "n_cells n_genes"], types: Int[Array, " n_cells"],
                indices: Int[Array, "n_cells n_neighbors"], rows: Int[Array, " n_rows"],
                ligands: Float[Array, "n_cells n_ligands"] | None = None) -> Float[Array, ""]:
    """$1 - \\sum (y - \\hat y)^2 / \\sum (y - \\bar y)^2$ over the cells `rows` (all genes pooled, each gene
    centred on its mean over `rows`)."""
    n_types = model.base.shape[0]
    onehot = jax.nn.one_hot(types, n_types, dtype=y.dtype)
    shares = neighbour_shares(indices, types, n_types).astype(y.dtype)
    lig = jnp.zeros((y.shape[0], 0), y.dtype) if ligands is None else neighbour_means(indices, ligands)
    pred = model(onehot[rows], shares[rows], lig[rows])
    target = y[rows]
    return 1 - jnp.sum((target - pred) ** 2) / jnp.sum((target - jnp.mean(target, axis=0, keepdims=True)) ** 2)


def split_cells(n_cells: int, held_out: float, *, key: PRNGKeyArray) -> tuple[Array, Array]:
    """A random split of the cells: (training rows, held-out rows)."""
    order = jr.permutation(key, n_cells)
    n_test = max(1, int(round(held_out * n_cells)))
    return order[n_test:], order[:n_test]
