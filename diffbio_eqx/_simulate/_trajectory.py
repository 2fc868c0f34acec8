"""Ground truth for the trajectory operators: a branching trajectory with each cell's true pseudotime and fate, and
a time course whose fates grow at known rates.

The geometry lives in a latent space with one axis per segment: the trunk runs along axis 0 from the root (time 0)
to the branch point (time `branch_time`); fate `k` then runs along axis `k + 1`. A cell at time `t` on fate `k`
sits at `min(t, t_b) e_0 + max(t - t_b, 0) e_{k+1}` (times `length`), plus isotropic latent noise; an orthonormal
map into `n_genes` dimensions and small gene-level noise give its expression.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._core._validate import (
    check_finite,
    check_nonnegative,
    check_positive,
    check_probability,
    check_whole,
    checked_by,
)


class BranchingTrajectory(eqx.Module):
    """A simulated branching process.

    - `x`: `(n_cells, n_genes)` expression (continuous, e.g. a log-normalised scale).
    - `pseudotime`: `(n_cells,)` true time in `[0, 1]`.
    - `fate`: `(n_cells,)` the fate (arm) each cell is on or, before the branch point, will take.
    - `past_branch`: `(n_cells,)` whether the cell is past the branch point (its fate is visible).
    - `branch_time`: the branch point's time.
    - `root`: index of the cell closest to time 0.
    """

    x: Float[Array, "n_cells n_genes"]
    pseudotime: Float[Array, " n_cells"]
    fate: Int[Array, " n_cells"]
    past_branch: Array
    branch_time: Float[Array, ""]
    root: Int[Array, ""]


def _positions(time: Float[Array, " n_cells"], fate: Int[Array, " n_cells"], branch_time: Float[Array, ""],
               n_fates: int) -> Float[Array, "n_cells n_axes"]:
    trunk = jnp.minimum(time, branch_time)[:, None] * jax.nn.one_hot(0, n_fates + 1, dtype=time.dtype)[None, :]
    arm = jnp.maximum(time - branch_time, 0)[:, None] * jax.nn.one_hot(fate + 1, n_fates + 1, dtype=time.dtype)
    return trunk + arm


def _express(key: PRNGKeyArray, latent: Float[Array, "n_cells n_axes"], n_genes: int, gene_noise: float
             ) -> Float[Array, "n_cells n_genes"]:
    map_key, noise_key = jr.split(key)
    basis, _ = jnp.linalg.qr(jr.normal(map_key, (n_genes, latent.shape[1]), latent.dtype))
    clean = latent @ basis.T
    return clean + gene_noise * jr.normal(noise_key, clean.shape, latent.dtype)


def _check_genes_hold_axes(n_genes: Any, n_fates: int) -> None:
    """The orthonormal map needs as many genes as latent axes (the trunk and one per fate)."""
    check_whole(n_genes, "n_genes")
    if n_genes < n_fates + 1:
        raise ValueError(f"n_genes: {n_fates} fates need at least {n_fates + 1} genes (one latent axis for the "
                         f"trunk and one per fate), got {n_genes}")


def _check_branching(arguments: dict[str, Any]) -> None:
    """Sizes and (concrete) settings of `simulate_branching`; a traced setting is the caller's to check."""
    check_whole(arguments["n_cells"], "n_cells")
    n_fates = check_whole(arguments["n_fates"], "n_fates")
    _check_genes_hold_axes(arguments["n_genes"], n_fates)
    check_probability(arguments["branch_time"], "branch_time")  # a time on the [0, 1] path
    check_positive(arguments["length"], "length")
    for name in ("noise", "gene_noise"):
        check_nonnegative(arguments[name], name)


@checked_by(_check_branching)
@eqx.filter_jit
def simulate_branching(
    key: PRNGKeyArray, n_cells: int = 600, *, n_fates: int = 3, n_genes: int = 50, branch_time: float = 0.3,
    length: float = 10.0, noise: float = 0.25, gene_noise: float = 0.05,
) -> BranchingTrajectory:
    """Cells at uniform true times on a trunk that splits into `n_fates` arms (fates drawn uniformly).

    **Arguments:**

    - `key`: the simulation's randomness. `n_cells`, `n_fates` (2 or 3 typical), `n_genes`: static sizes.
    - `branch_time`: time of the branch point in `(0, 1)`. (Keyword only argument.)
    - `length`: latent length of the whole path (time 1).
    - `noise`, `gene_noise`: standard deviations of the latent and the gene-level noise.

    **Returns:** a `BranchingTrajectory`; cell 0 is placed at time 0 (the root).
    """
    time_key, fate_key, noise_key, gene_key = jr.split(key, 4)
    time = jr.uniform(time_key, (n_cells,)).at[0].set(0.0)
    fate = jr.randint(fate_key, (n_cells,), 0, n_fates)
    tb = jnp.asarray(branch_time, time.dtype)
    latent = length * _positions(time, fate, tb, n_fates)
    latent = latent + noise * jr.normal(noise_key, latent.shape, latent.dtype)
    x = _express(gene_key, latent, n_genes, gene_noise)
    return BranchingTrajectory(x, time, fate, time > tb, tb, jnp.asarray(0))


class TimeCourse(eqx.Module):
    """Cells sampled on several days from a population whose fates grow at known rates.

    - `x`: `(n_cells, n_genes)` expression.
    - `day`: `(n_cells,)` the sampling day of each cell.
    - `fate`: `(n_cells,)` each cell's fate.
    - `growth_rate`: `(n_cells,)` the true per-day growth rate of the cell (its fate's rate).
    - `pseudotime`: `(n_cells,)` the true time along the trajectory.
    """

    x: Float[Array, "n_cells n_genes"]
    day: Float[Array, " n_cells"]
    fate: Int[Array, " n_cells"]
    growth_rate: Float[Array, " n_cells"]
    pseudotime: Float[Array, " n_cells"]


def _check_time_course(arguments: dict[str, Any]) -> None:
    """Sizes and (concrete) settings of `simulate_time_course`; a traced setting is the caller's to check."""
    growth_rates = arguments["growth_rates"]
    if getattr(growth_rates, "ndim", None) != 1 or growth_rates.shape[0] < 1:
        raise ValueError(f"growth_rates: expected a 1-D array with one rate per fate, got "
                         f"{getattr(growth_rates, 'shape', type(growth_rates).__name__)}")
    check_positive(growth_rates, "growth_rates")  # fate shares grow as r ** day: log r must exist
    for name in ("n_days", "n_cells_per_day"):
        check_whole(arguments[name], name)
    _check_genes_hold_axes(arguments["n_genes"], growth_rates.shape[0])
    for name in ("start", "speed"):
        check_finite(arguments[name], name)
    check_positive(arguments["length"], "length")
    for name in ("spread", "noise"):
        check_nonnegative(arguments[name], name)


@checked_by(_check_time_course)
@eqx.filter_jit
def simulate_time_course(
    key: PRNGKeyArray, growth_rates: Float[Array, " n_fates"], *, n_days: int = 3, n_cells_per_day: int = 300,
    n_genes: int = 50, start: float = 0.5, speed: float = 0.15, spread: float = 0.05, length: float = 10.0,
    noise: float = 0.25,
) -> TimeCourse:
    """Days `0 .. n_days - 1`: a cell seen on day `d` is on fate `k` with probability proportional to
    $r_k^d$ (fate `k` multiplies by $r_k$ per day from equal shares on day 0), at true time
    `start + speed * d + spread * N(0, 1)` along its arm (see `simulate_branching`, branch point at 0.3).

    **Arguments:**

    - `key`: the simulation's randomness.
    - `growth_rates`: `(n_fates,)` per-day growth rates $r_k > 0$.
    - `n_days`, `n_cells_per_day`, `n_genes`: static sizes. (Keyword only argument.)
    - `start`, `speed`, `spread`: day-0 time, time advanced per day, within-day spread.
    - `length`, `noise`: as in `simulate_branching` (gene-level noise 0.05).

    **Returns:** a `TimeCourse`.
    """
    n_fates = growth_rates.shape[0]
    day = jnp.repeat(jnp.arange(n_days, dtype=growth_rates.dtype), n_cells_per_day)
    fate_key, time_key, noise_key, gene_key = jr.split(key, 4)
    logits = day[:, None] * jnp.log(growth_rates)[None, :]
    fate = jr.categorical(fate_key, logits, axis=1)
    time = start + speed * day + spread * jr.normal(time_key, day.shape, day.dtype)
    latent = length * _positions(time, fate, jnp.asarray(0.3, day.dtype), n_fates)
    latent = latent + noise * jr.normal(noise_key, latent.shape, latent.dtype)
    x = _express(gene_key, latent, n_genes, 0.05)
    return TimeCourse(x, day, fate, growth_rates[fate], time)
