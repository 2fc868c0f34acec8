"""Splatter-style simulation of single-cell counts with known ground truth.

The generative model follows Splatter (Zappia et al. 2017): gamma-distributed gene means, log-normal
differential-expression factors per group, log-normal multiplicative batch factors per gene, log-normal library
sizes and gamma-Poisson (biological coefficient of variation) counts. On top of it, optional ambient RNA
drawn from a shared profile, with empty droplets holding ambient RNA only, as CellBender models it) and doublets
(two cells in one droplet).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._core._validate import (
    _is_traced,
    check_nonnegative,
    check_numbers,
    check_positive,
    check_probability,
    check_whole,
    checked_by,
)


class SimulatedData(eqx.Module):
    """Simulated counts and their ground truth.

    - `counts`: `(n_cells, n_genes)` observed counts (cell + doublet partner + ambient), whole numbers as floats.
    - `true_counts`: the counts that came from the cell(s) in the droplet, without ambient RNA.
    - `ambient_counts`: the ambient part; `counts = true_counts + ambient_counts`.
    - `empty_counts`: `(n_empty_droplets, n_genes)` counts of empty droplets (ambient RNA only).
    - `contamination_fraction`: `(n_cells,)` realised ambient share of each droplet's counts.
    - `ambient_profile`: `(n_genes,)` the profile ambient counts were drawn from (sums to one).
    - `groups`, `batches`: `(n_cells,)` integer labels.
    - `is_doublet`: `(n_cells,)` whether the droplet holds a second cell.
    - `library_size`: `(n_cells,)` the expected size of the cell's own counts.
    - `de_factors`: `(n_groups, n_genes)` multiplicative group effects (1 where a gene is not DE).
    - `batch_factors`: `(n_batches, n_genes)` multiplicative batch effects.
    """

    counts: Float[Array, "n_cells n_genes"]
    true_counts: Float[Array, "n_cells n_genes"]
    ambient_counts: Float[Array, "n_cells n_genes"]
    empty_counts: Float[Array, "n_empty_droplets n_genes"]
    contamination_fraction: Float[Array, " n_cells"]
    ambient_profile: Float[Array, " n_genes"]
    groups: Int[Array, " n_cells"]
    batches: Int[Array, " n_cells"]
    is_doublet: Bool[Array, " n_cells"]
    library_size: Float[Array, " n_cells"]
    de_factors: Float[Array, "n_groups n_genes"]
    batch_factors: Float[Array, "n_batches n_genes"]


def _float_dtype() -> jnp.dtype:
    return jnp.zeros(()).dtype  # float64 under jax_enable_x64, float32 otherwise


def _lognormal(key: PRNGKeyArray, loc: Array, scale: Array, shape: tuple[int, ...]) -> Array:
    return jnp.exp(loc + scale * jr.normal(key, shape, dtype=_float_dtype()))


def _multiplicative_factors(
    key: PRNGKeyArray, n_rows: int, n_genes: int, prob: Array, down_prob: Array, loc: Array, scale: Array
) -> Float[Array, "n_rows n_genes"]:
    """Splatter's DE factors: a gene is affected with `prob`, by a log-normal factor, inverted with `down_prob`."""
    affected_key, down_key, size_key = jr.split(key, 3)
    affected = jr.bernoulli(affected_key, prob, (n_rows, n_genes))
    down = jr.bernoulli(down_key, down_prob, (n_rows, n_genes))
    factor = _lognormal(size_key, loc, scale, (n_rows, n_genes))
    factor = jnp.where(down, 1.0 / factor, factor)
    return jnp.where(affected, factor, 1.0)


@dataclasses.dataclass(frozen=True)
class SplatterSettings:
    """The continuous settings of the Splatter model (each may be a traced scalar: jit- and vmap-able).

    - `de_prob`, `de_down_prob`, `de_fac_loc`, `de_fac_scale`: per group, each gene is differentially expressed
      with probability `de_prob`, by a factor `exp(N(de_fac_loc, de_fac_scale))`, inverted with `de_down_prob`.
    - `batch_fac_loc`, `batch_fac_scale`: every gene in every batch is scaled by `exp(N(loc, scale))`.
    - `mean_shape`, `mean_rate`: gene base means are `Gamma(mean_shape, mean_rate)`.
    - `lib_loc`, `lib_scale`: library sizes are `exp(N(lib_loc, lib_scale))`.
    - `bcv_common`, `bcv_df`: Splatter's biological coefficient of variation,
      `(bcv_common + 1/sqrt(mean)) * sqrt(bcv_df / chi2(bcv_df))`.
    - `ambient_log_scale`, `contamination_concentration`: the spread of ambient totals (`"count"` model) and the
      Beta concentration of ambient fractions (`"fraction"` model), see `simulate`.
    """

    de_prob: Float[ArrayLike, ""] = 0.1
    de_down_prob: Float[ArrayLike, ""] = 0.5
    de_fac_loc: Float[ArrayLike, ""] = 0.6
    de_fac_scale: Float[ArrayLike, ""] = 0.4
    batch_fac_loc: Float[ArrayLike, ""] = 0.0
    batch_fac_scale: Float[ArrayLike, ""] = 0.15
    mean_shape: Float[ArrayLike, ""] = 0.6
    mean_rate: Float[ArrayLike, ""] = 0.3
    lib_loc: Float[ArrayLike, ""] = 8.0
    lib_scale: Float[ArrayLike, ""] = 0.3
    bcv_common: Float[ArrayLike, ""] = 0.1
    bcv_df: Float[ArrayLike, ""] = 60.0
    ambient_log_scale: Float[ArrayLike, ""] = 0.2
    contamination_concentration: Float[ArrayLike, ""] = 30.0

    def scalar(self, name: str) -> Float[Array, ""]:
        """The setting `name` as a scalar of the simulation's float dtype."""
        return jnp.asarray(getattr(self, name), dtype=_float_dtype())


class GeneParameters(eqx.Module):
    """The gene-level draws of the Splatter model (shared by every cell; `simulate_sparse` draws them once).

    - `gene_mean`: `(n_genes,)` base means, `Gamma(mean_shape, mean_rate)`.
    - `de_factors`: `(n_groups, n_genes)` multiplicative group effects (1 where a gene is not DE).
    - `batch_factors`: `(n_batches, n_genes)` multiplicative batch effects (all 1 with one batch).
    - `bcv_scale`: `(n_genes,)` Splatter's `sqrt(bcv_df / chi2(bcv_df))` per gene.
    """

    gene_mean: Float[Array, " n_genes"]
    de_factors: Float[Array, "n_groups n_genes"]
    batch_factors: Float[Array, "n_batches n_genes"]
    bcv_scale: Float[Array, " n_genes"]


def gene_parameters(
    keys: tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray, PRNGKeyArray], settings: SplatterSettings, *,
    n_genes: int, n_groups: int, n_batches: int,
) -> GeneParameters:
    """Draw the gene-level parameters from `(mean, de, batch, bcv)` keys."""
    mean_key, de_key, batch_key, bcv_key = keys
    s = settings.scalar
    dtype = _float_dtype()
    gene_mean = jr.gamma(mean_key, s("mean_shape"), (n_genes,), dtype=dtype) / s("mean_rate")
    de_factors = _multiplicative_factors(de_key, n_groups, n_genes, s("de_prob"), s("de_down_prob"),
                                         s("de_fac_loc"), s("de_fac_scale"))
    batch_factors = _lognormal(batch_key, s("batch_fac_loc"), s("batch_fac_scale"), (n_batches, n_genes))
    batch_factors = batch_factors if n_batches > 1 else jnp.ones_like(batch_factors)
    df = s("bcv_df")
    chi2 = 2.0 * jr.gamma(bcv_key, df / 2.0, (n_genes,), dtype=dtype)
    return GeneParameters(gene_mean, de_factors, batch_factors, jnp.sqrt(df / chi2))


def cell_expectations(
    keys: tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray], genes: GeneParameters, lib_loc: Float[Array, ""],
    lib_scale: Float[Array, ""], bcv_common: Float[Array, ""], *, n_cells: int,
) -> tuple[Float[Array, "n_cells n_genes"], Float[Array, "n_cells n_genes"], Int[Array, " n_cells"],
           Int[Array, " n_cells"], Float[Array, " n_cells"]]:
    """Draw `n_cells` cells' labels and expected counts from `(group, batch, library)` keys.

    Groups and batches are uniform, library sizes log-normal. **Returns:** `(means, gamma_shape, groups,
    batches, library_size)`, where the counts are `Poisson(Gamma(gamma_shape, means / gamma_shape))` with
    Splatter's BCV, `gamma_shape = 1 / bcv^2`.
    """
    group_key, batch_key, lib_key = keys
    n_groups, n_genes = genes.de_factors.shape
    groups = jr.randint(group_key, (n_cells,), 0, n_groups)
    batches = jr.randint(batch_key, (n_cells,), 0, genes.batch_factors.shape[0])
    library_size = _lognormal(lib_key, lib_loc, lib_scale, (n_cells,)).astype(genes.gene_mean.dtype)
    cell_gene_mean = genes.gene_mean[None, :] * genes.de_factors[groups] * genes.batch_factors[batches]
    means = cell_gene_mean / jnp.sum(cell_gene_mean, axis=1, keepdims=True) * library_size[:, None]
    bcv = (bcv_common + 1.0 / jnp.sqrt(jnp.maximum(means, 1e-8))) * genes.bcv_scale[None, :]
    return means, 1.0 / bcv**2, groups, batches, library_size


class _AmbientDraw(eqx.Module):
    counts: Float[Array, "n_cells n_genes"]
    empty_counts: Float[Array, "n_empty_droplets n_genes"]
    profile: Float[Array, " n_genes"]


def _ambient(
    keys: tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray, PRNGKeyArray], true_counts: Float[Array, "n_cells n_genes"],
    contamination: Float[Array, ""], ambient_profile: Float[ArrayLike, " n_genes"] | None,
    settings: SplatterSettings, *, ambient_model: str, n_empty_droplets: int,
) -> _AmbientDraw:
    """Ambient RNA for each droplet and the empty droplets, from `(fraction, ambient, empty size, empty)` keys."""
    fraction_key, ambient_key, empty_size_key, empty_key = keys
    dtype = true_counts.dtype
    if ambient_profile is None:  # what lysed cells release: the pooled expression
        pooled = jnp.sum(true_counts, axis=0) + 1e-3
        profile = pooled / jnp.sum(pooled)
    else:
        profile = jnp.asarray(ambient_profile, dtype=dtype)
        profile = profile / jnp.sum(profile)
    has_ambient = contamination > 0
    safe_mean = jnp.clip(contamination, 1e-6, 0.95)
    typical_ambient = safe_mean / (1.0 - safe_mean) * jnp.exp(settings.scalar("lib_loc"))
    log_scale = settings.scalar("ambient_log_scale")
    if ambient_model == "count":
        ambient_total = _lognormal(fraction_key, jnp.log(typical_ambient), log_scale, (true_counts.shape[0],))
    else:
        concentration = settings.scalar("contamination_concentration")
        target_fraction = jr.beta(fraction_key, safe_mean * concentration, (1.0 - safe_mean) * concentration,
                                  (true_counts.shape[0],), dtype=dtype)
        target_fraction = jnp.clip(target_fraction, 0.0, 0.95)
        ambient_total = target_fraction / (1.0 - target_fraction) * jnp.sum(true_counts, axis=1)
    ambient_total = jnp.where(has_ambient, ambient_total, 0.0)
    ambient_counts = jr.poisson(ambient_key, ambient_total[:, None] * profile[None, :]).astype(dtype)
    empty_total = _lognormal(empty_size_key, jnp.log(typical_ambient), log_scale, (n_empty_droplets,))
    empty_total = jnp.where(has_ambient, empty_total, 0.0)
    empty_counts = jr.poisson(empty_key, empty_total[:, None] * profile[None, :]).astype(dtype)
    return _AmbientDraw(ambient_counts, empty_counts, profile)


def _simulate(
    key: PRNGKeyArray,
    *,
    n_cells: int = 1000,
    n_genes: int = 500,
    n_groups: int = 5,
    n_batches: int = 1,
    contamination: Float[ArrayLike, ""] = 0.0,
    doublet_rate: Float[ArrayLike, ""] = 0.0,
    ambient_model: str = "count",
    n_empty_droplets: int = 0,
    ambient_profile: Float[ArrayLike, " n_genes"] | None = None,
    **settings: Float[ArrayLike, ""],
) -> SimulatedData:
    """Simulate gamma-Poisson counts with groups, batches, ambient RNA and doublets (Splatter-style).

    **Arguments:**

    - `key`: a JAX PRNG key. Everything random comes from it, so `jax.vmap` over keys gives replicates.
    - `n_cells`, `n_genes`, `n_groups`, `n_batches`: sizes (static; keyword only).
    - `contamination`: typical ambient fraction of a droplet's counts (0 disables ambient RNA).
    - `doublet_rate`: probability that a droplet holds a second, random cell.
    - `ambient_model`: how much ambient RNA each droplet gets (static; keyword only):
        - `"count"` (CellBender's model, the default): about the same number of ambient molecules in every
          droplet, whatever its cell's size: $d_n \\sim \\mathrm{LogNormal}(\\log d_0, s)$ with $s$ =
          `ambient_log_scale` and $d_0$ = `contamination / (1 - contamination)` times the median library size
          $e^{\\mathrm{lib\\_loc}}$, so a droplet of median size has fraction about `contamination` and small cells
          are more contaminated than large ones;
        - `"fraction"`: the ambient share of each droplet is `Beta` with mean `contamination` and concentration
          `contamination_concentration`, so ambient counts scale with the cell's size.
    - `n_empty_droplets`: number of empty droplets to simulate (static): Poisson counts of the ambient profile
      with totals drawn as in the `"count"` model, returned as `empty_counts`.
    - `ambient_profile`: `(n_genes,)` profile of the ambient RNA; default: the pooled expression of all cells,
      which is what lysed cells release.
    - `settings`: the Splatter model's continuous settings by name, as in `SplatterSettings` (`de_prob`,
      `batch_fac_scale`, `lib_loc`, `bcv_common`, ...); an unknown name is a `TypeError`.

    All continuous arguments may be traced, so the function is jit-able and vmappable over them and over keys.

    **Returns:** a `SimulatedData` record.
    """
    if ambient_model not in ("count", "fraction"):
        raise ValueError(f"ambient_model: must be 'count' or 'fraction', got {ambient_model!r}")
    splatter = SplatterSettings(**settings)
    (
        mean_key, de_key, batch_fac_key, group_key, batch_key, lib_key, bcv_key, gamma_key, count_key,
        doublet_key, partner_key, fraction_key, ambient_key,
    ) = jr.split(key, 13)
    empty_size_key, empty_key = jr.split(jr.fold_in(key, 13))  # apart, so the other draws keep their keys
    genes = gene_parameters((mean_key, de_key, batch_fac_key, bcv_key), splatter, n_genes=n_genes,
                            n_groups=n_groups, n_batches=n_batches)
    s = splatter.scalar
    means, gamma_shape, groups, batches, library_size = cell_expectations(
        (group_key, batch_key, lib_key), genes, s("lib_loc"), s("lib_scale"), s("bcv_common"), n_cells=n_cells
    )
    rates = jr.gamma(gamma_key, gamma_shape, dtype=means.dtype) * means / gamma_shape
    single_counts = jr.poisson(count_key, rates).astype(means.dtype)
    is_doublet = jr.bernoulli(doublet_key, jnp.asarray(doublet_rate, means.dtype), (n_cells,))
    partner = jr.randint(partner_key, (n_cells,), 0, n_cells)
    true_counts = single_counts + jnp.where(is_doublet[:, None], single_counts[partner], 0.0)
    ambient = _ambient((fraction_key, ambient_key, empty_size_key, empty_key), true_counts,
                       jnp.asarray(contamination, means.dtype), ambient_profile, splatter,
                       ambient_model=ambient_model, n_empty_droplets=n_empty_droplets)
    counts = true_counts + ambient.counts
    fraction = jnp.sum(ambient.counts, axis=1) / jnp.maximum(jnp.sum(counts, axis=1), 1.0)
    return SimulatedData(
        counts=counts, true_counts=true_counts, ambient_counts=ambient.counts, empty_counts=ambient.empty_counts,
        contamination_fraction=fraction, ambient_profile=ambient.profile, groups=groups, batches=batches,
        is_doublet=is_doublet, library_size=library_size, de_factors=genes.de_factors,
        batch_factors=genes.batch_factors,
    )


_simulate_compiled = jax.jit(
    _simulate, static_argnames=("n_cells", "n_genes", "n_groups", "n_batches", "ambient_model", "n_empty_droplets")
)
#: Splatter's settings that are probabilities, and those that must be positive (shapes, rates, scales).
_PROBABILITIES = ("contamination", "doublet_rate", "de_prob", "de_down_prob")
_POSITIVE = ("mean_shape", "mean_rate", "lib_scale", "bcv_df", "contamination_concentration")


def _check_lib_loc(value: Any, field: str) -> None:
    # e^20 counts a cell would overflow the draws
    check_numbers(value, field, "finite and <= 20 (the log of a cell's counts)", lambda number: number <= 20)


#: The check of each Splatter setting that has one.
_SETTING_CHECKS: dict[str, Callable[[Any, str], None]] = {
    **dict.fromkeys(_PROBABILITIES, check_probability), **dict.fromkeys(_POSITIVE, check_positive),
    "bcv_common": check_nonnegative, "lib_loc": _check_lib_loc,
}


def check_splatter_settings(values: dict[str, Any]) -> None:
    """The Splatter settings given in `values` (`simulate_sparse` shares them): probabilities in [0, 1], positive
    shapes, rates and scales, a library location that fits the draws; a traced setting is the caller's."""
    for name, check in _SETTING_CHECKS.items():
        if values.get(name) is not None:
            check(values[name], name)


def _check_simulation(arguments: dict[str, Any]) -> None:
    """Sizes and (concrete) settings a simulation can run with; a traced setting is the caller's to check."""
    for name in ("n_cells", "n_genes", "n_groups", "n_batches"):
        check_whole(arguments[name], name)
    check_splatter_settings({**arguments, **arguments.get("settings", {})})
    profile = arguments.get("ambient_profile")
    if profile is not None and not _is_traced(profile):
        profile = np.asarray(profile, dtype=np.float64)
        if profile.shape != (arguments["n_genes"],) or not np.all(np.isfinite(profile)) or np.any(profile < 0) \
                or not profile.sum() > 0:
            raise ValueError(f"ambient_profile: expected {arguments['n_genes']} finite, non-negative values with "
                             f"some mass, got shape {profile.shape} summing to {np.nansum(profile):g}")


simulate = checked_by(_check_simulation)(_simulate_compiled)
