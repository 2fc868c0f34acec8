"""Doublets with known ground truth on top of `simulate`: which droplets hold two cells, and whether the two came
from different groups (heterotypic, what Scrublet and Solo can find) or the same group (homotypic, which look
like a large singlet)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ._simulate import _simulate


class DoubletSimulation(eqx.Module):
    """Simulated droplets with doublet truth.

    - `counts`: `(n_cells, n_genes)` droplet counts (a doublet's are the sum of its two cells' counts).
    - `groups`: `(n_cells,)` the group of the droplet's first cell.
    - `partner_groups`: `(n_cells,)` the group of its second cell (equal to `groups` for singlets).
    - `is_doublet`, `is_heterotypic`, `is_homotypic`: `(n_cells,)` flags; a doublet is exactly one of the last two.
    - `parents`: `(n_cells, 2)` rows of the underlying singlet simulation making up each droplet (both equal for
      a singlet).
    - `batches`: `(n_cells,)` batch of the droplet's first cell.
    """

    counts: Float[Array, "n_cells n_genes"]
    groups: Int[Array, " n_cells"]
    partner_groups: Int[Array, " n_cells"]
    is_doublet: Bool[Array, " n_cells"]
    is_heterotypic: Bool[Array, " n_cells"]
    is_homotypic: Bool[Array, " n_cells"]
    parents: Int[Array, "n_cells 2"]
    batches: Int[Array, " n_cells"]


def _partners(key: PRNGKeyArray, groups: Int[Array, " n_cells"], pool_groups: Int[Array, " n_cells"],
              n_groups: int, heterotypic_only: bool) -> Int[Array, " n_cells"]:
    """A random pool cell for each cell; with `heterotypic_only`, one from a uniformly drawn other group (any
    pool cell where that group has none in the pool). Never builds a cells x cells matrix."""
    any_key, group_key, pick_key = jr.split(key, 3)
    anyone = jr.randint(any_key, groups.shape, 0, pool_groups.shape[0])
    if not heterotypic_only or n_groups < 2:
        return anyone
    target = (groups + jr.randint(group_key, groups.shape, 1, n_groups)) % n_groups
    order = jnp.argsort(pool_groups)
    sizes = jnp.bincount(pool_groups, length=n_groups)
    starts = jnp.cumsum(sizes) - sizes
    offset = jnp.floor(jr.uniform(pick_key, groups.shape) * sizes[target].astype(float)).astype(starts.dtype)
    picked = order[jnp.clip(starts[target] + offset, 0, pool_groups.shape[0] - 1)]
    return jnp.where(sizes[target] > 0, picked, anyone)


def _simulate_doublets(
    key: PRNGKeyArray,
    *,
    n_cells: int = 1000,
    n_genes: int = 500,
    n_groups: int = 5,
    n_batches: int = 1,
    doublet_rate: Float[ArrayLike, ""] = 0.1,
    heterotypic_only: bool = False,
    **settings: Float[ArrayLike, ""],
) -> DoubletSimulation:
    """`n_cells` droplets, each a doublet with probability `doublet_rate`, from a Splatter-style simulation.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `n_cells`, `n_genes`, `n_groups`, `n_batches`: sizes (static; keyword only).
    - `doublet_rate`: probability that a droplet holds a second cell (traceable).
    - `heterotypic_only`: draw every doublet's second cell from another group than the first (static), so all
      doublets are heterotypic; otherwise the second cell is any other cell and about `1 / n_groups` of the
      doublets are homotypic.
    - `settings`: `simulate`'s Splatter settings (`de_prob`, `lib_loc`, ...).

    The underlying simulation has `2 * n_cells` singlets (`simulate(..., doublet_rate=0)`); droplet `i` takes
    singlet `i` and, if a doublet, a partner from the other half, so no cell is used twice.

    **Returns:** a `DoubletSimulation`.
    """
    sim_key, doublet_key, partner_key = jr.split(key, 3)
    singlets: Any = _simulate  # the settings go to its Splatter keywords
    base = singlets(sim_key, n_cells=2 * n_cells, n_genes=n_genes, n_groups=n_groups, n_batches=n_batches,
                     **settings)
    first = jnp.arange(n_cells)
    partner = n_cells + _partners(partner_key, base.groups[:n_cells], base.groups[n_cells:], n_groups,
                                  heterotypic_only)
    dtype = base.counts.dtype
    is_doublet = jr.bernoulli(doublet_key, jnp.asarray(doublet_rate, dtype), (n_cells,))
    second = jnp.where(is_doublet, partner, first)
    counts = base.true_counts[first] + jnp.where(is_doublet[:, None], base.true_counts[second], 0.0)
    groups, partner_groups = base.groups[first], base.groups[second]
    return DoubletSimulation(
        counts=counts, groups=groups, partner_groups=partner_groups, is_doublet=is_doublet,
        is_heterotypic=is_doublet & (groups != partner_groups), is_homotypic=is_doublet & (groups == partner_groups),
        parents=jnp.stack([first, second], axis=1), batches=base.batches[first],
    )


simulate_doublets = jax.jit(
    _simulate_doublets, static_argnames=("n_cells", "n_genes", "n_groups", "n_batches", "heterotypic_only")
)
simulate_doublets.__doc__ = _simulate_doublets.__doc__
