"""Splatter-style simulation of single-cell counts with known ground truth.

The generative model follows Splatter (Zappia et al. 2017): gamma-distributed gene means, log-normal
differential-expression factors per group, log-normal multiplicative batch factors per gene, log-normal library
sizes and gamma-Poisson (biological coefficient of variation) counts. On top of it, optional ambient RNA
drawn from a shared profile, with empty droplets holding ambient RNA only, as CellBender models it) and doublets
(two cells in one droplet).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray


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


def simulate(
    key: PRNGKeyArray,
    *,
    n_cells: int = 1000,
    n_genes: int = 500,
    n_groups: int = 5,
    n_batches: int = 1,
    de_prob: Float[ArrayLike, ""] = 0.1,
    de_down_prob: Float[ArrayLike, ""] = 0.5,
    de_fac_loc: Float[ArrayLike, ""] = 0.6,
    de_fac_scale: Float[ArrayLike, ""] = 0.4,
    batch_fac_loc: Float[ArrayLike, ""] = 0.0,
    batch_fac_scale: Float[ArrayLike, ""] = 0.15,
    mean_shape: Float[ArrayLike, ""] = 0.6,
    mean_rate: Float[ArrayLike, ""] = 0.3,
    lib_loc: Float[ArrayLike, ""] = 8.0,
    lib_scale: Float[ArrayLike, ""] = 0.3,
    bcv_common: Float[ArrayLike, ""] = 0.1,
    bcv_df: Float[ArrayLike, ""] = 60.0,
    contamination: Float[ArrayLike, ""] = 0.0,
    ambient_model: str = "count",
    ambient_log_scale: Float[ArrayLike, ""] = 0.2,
    contamination_concentration: Float[ArrayLike, ""] = 30.0,
    n_empty_droplets: int = 0,
    ambient_profile: Float[ArrayLike, " n_genes"] | None = None,
    doublet_rate: Float[ArrayLike, ""] = 0.0,
) -> SimulatedData:
    """Simulate gamma-Poisson counts with groups, batches, ambient RNA and doublets (Splatter-style).

    **Arguments:**

    - `key`: a JAX PRNG key. Everything random comes from it, so `jax.vmap` over keys gives replicates.
    - `n_cells`, `n_genes`, `n_groups`, `n_batches`: sizes (static; keyword only).
    - `de_prob`, `de_down_prob`, `de_fac_loc`, `de_fac_scale`: per group, each gene is differentially expressed
      with probability `de_prob`, by a factor `exp(N(de_fac_loc, de_fac_scale))`, inverted with `de_down_prob`.
    - `batch_fac_loc`, `batch_fac_scale`: every gene in every batch is scaled by `exp(N(loc, scale))`.
    - `mean_shape`, `mean_rate`: gene base means are `Gamma(mean_shape, mean_rate)`.
    - `lib_loc`, `lib_scale`: library sizes are `exp(N(lib_loc, lib_scale))`.
    - `bcv_common`, `bcv_df`: Splatter's biological coefficient of variation,
      `(bcv_common + 1/sqrt(mean)) * sqrt(bcv_df / chi2(bcv_df))`.
    - `contamination`: typical ambient fraction of a droplet's counts (0 disables ambient RNA).
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
    - `doublet_rate`: probability that a droplet holds a second, random cell.

    All continuous arguments may be traced, so the function is jit-able and vmappable over them and over keys.

    **Returns:** a `SimulatedData` record.
    """
    dtype = _float_dtype()
    as_float = lambda v: jnp.asarray(v, dtype=dtype)
    (
        mean_key, de_key, batch_fac_key, group_key, batch_key, lib_key, bcv_key, gamma_key, count_key,
        doublet_key, partner_key, fraction_key, ambient_key,
    ) = jr.split(key, 13)
    empty_size_key, empty_key = jr.split(jr.fold_in(key, 13))  # apart, so the other draws keep their keys
    if ambient_model not in ("count", "fraction"):
        raise ValueError(f"ambient_model: must be 'count' or 'fraction', got {ambient_model!r}")

    gene_mean = jr.gamma(mean_key, as_float(mean_shape), (n_genes,), dtype=dtype) / as_float(mean_rate)
    de_factors = _multiplicative_factors(
        de_key, n_groups, n_genes, as_float(de_prob), as_float(de_down_prob), as_float(de_fac_loc),
        as_float(de_fac_scale),
    )
    batch_factors = _lognormal(batch_fac_key, as_float(batch_fac_loc), as_float(batch_fac_scale),
                               (n_batches, n_genes))
    batch_factors = batch_factors if n_batches > 1 else jnp.ones_like(batch_factors)

    groups = jr.randint(group_key, (n_cells,), 0, n_groups)
    batches = jr.randint(batch_key, (n_cells,), 0, n_batches)
    library_size = _lognormal(lib_key, as_float(lib_loc), as_float(lib_scale), (n_cells,))

    cell_gene_mean = gene_mean[None, :] * de_factors[groups] * batch_factors[batches]
    proportions = cell_gene_mean / jnp.sum(cell_gene_mean, axis=1, keepdims=True)
    means = proportions * library_size[:, None]

    df = as_float(bcv_df)
    chi2 = 2.0 * jr.gamma(bcv_key, df / 2.0, (n_genes,), dtype=dtype)
    bcv = (as_float(bcv_common) + 1.0 / jnp.sqrt(jnp.maximum(means, 1e-8))) * jnp.sqrt(df / chi2)[None, :]
    gamma_shape = 1.0 / bcv**2
    rates = jr.gamma(gamma_key, gamma_shape, dtype=dtype) * means / gamma_shape
    single_counts = jr.poisson(count_key, rates).astype(dtype)

    is_doublet = jr.bernoulli(doublet_key, as_float(doublet_rate), (n_cells,))
    partner = jr.randint(partner_key, (n_cells,), 0, n_cells)
    true_counts = single_counts + jnp.where(is_doublet[:, None], single_counts[partner], 0.0)

    if ambient_profile is None:
        pooled = jnp.sum(true_counts, axis=0) + 1e-3
        profile = pooled / jnp.sum(pooled)
    else:
        profile = jnp.asarray(ambient_profile, dtype=dtype)
        profile = profile / jnp.sum(profile)
    mean_fraction = as_float(contamination)
    has_ambient = mean_fraction > 0
    safe_mean = jnp.clip(mean_fraction, 1e-6, 0.95)
    typical_ambient = safe_mean / (1.0 - safe_mean) * jnp.exp(as_float(lib_loc))

    def ambient_totals(size_key: PRNGKeyArray, n: int) -> Float[Array, " n"]:
        return _lognormal(size_key, jnp.log(typical_ambient), as_float(ambient_log_scale), (n,))

    if ambient_model == "count":
        ambient_total = ambient_totals(fraction_key, n_cells)
    else:
        concentration = as_float(contamination_concentration)
        target_fraction = jr.beta(
            fraction_key, safe_mean * concentration, (1.0 - safe_mean) * concentration, (n_cells,), dtype=dtype
        )
        target_fraction = jnp.clip(target_fraction, 0.0, 0.95)
        ambient_total = target_fraction / (1.0 - target_fraction) * jnp.sum(true_counts, axis=1)
    ambient_total = jnp.where(has_ambient, ambient_total, 0.0)
    ambient_counts = jr.poisson(ambient_key, ambient_total[:, None] * profile[None, :]).astype(dtype)
    empty_total = jnp.where(has_ambient, ambient_totals(empty_size_key, n_empty_droplets), 0.0)
    empty_counts = jr.poisson(empty_key, empty_total[:, None] * profile[None, :]).astype(dtype)

    counts = true_counts + ambient_counts
    total = jnp.sum(counts, axis=1)
    fraction = jnp.sum(ambient_counts, axis=1) / jnp.maximum(total, 1.0)
    return SimulatedData(
        counts=counts,
        true_counts=true_counts,
        ambient_counts=ambient_counts,
        empty_counts=empty_counts,
        contamination_fraction=fraction,
        ambient_profile=profile,
        groups=groups,
        batches=batches,
        is_doublet=is_doublet,
        library_size=library_size,
        de_factors=de_factors,
        batch_factors=batch_factors,
    )


simulate = jax.jit(
    simulate, static_argnames=("n_cells", "n_genes", "n_groups", "n_batches", "ambient_model", "n_empty_droplets")
)
