"""Ground truth for differential expression and archetypes (issue 22).

- `simulate_conditions`: cells from replicate samples of two conditions; per sample a gamma-distributed biological
  deviation of each gene's mean, per condition a known log2 fold change on a fraction of genes, Poisson counts
  per cell around `library * mean` (so pseudobulk sums are negative binomial across samples).
- `simulate_switch_genes`: counts along a uniform pseudotime whose means follow switchde's sigmoid
  $\\mu(t) = 2\\mu_0 / (1 + e^{-k (t - t_0)})$ with known $(\\mu_0, k, t_0)$, plus constant (null) genes.
- `simulate_distributions`: two-condition genes in scDD's classes: equivalent (EE), differential mean (DE),
  proportion (DP), modality (DM), both (DB).
- `simulate_archetypes`: cells as Dirichlet mixtures of known archetypes, plus Gaussian noise.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._core._validate import check_nonnegative, check_positive, check_probability, check_whole


def _float_dtype() -> jnp.dtype:
    return jnp.zeros(()).dtype


class ConditionData(eqx.Module):
    """`counts` `(n_cells, n_genes)`; `sample` and `condition` `(n_cells,)` integer labels (condition 1 is the
    treated one); `log2_fold_change` `(n_genes,)` the true effect (0 for null genes)."""

    counts: Float[Array, "n_cells n_genes"]
    sample: Int[Array, " n_cells"]
    condition: Int[Array, " n_cells"]
    log2_fold_change: Float[Array, " n_genes"]


def simulate_conditions(
    *,
    key: PRNGKeyArray,
    n_genes: int = 1000,
    n_samples: int = 8,
    cells_per_sample: int = 40,
    de_fraction: float = 0.15,
    dispersion: float = 0.05,
) -> ConditionData:
    """Replicate samples (half in each condition) with known log2 fold changes.

    Gene means are log-normal (median 0.05 counts per cell at a library of 1, wide spread); DE genes get a
    log2 fold change of random sign and size uniform in [0.5, 2]; each sample multiplies each gene's mean by a
    gamma draw of mean 1 and variance `dispersion`; a cell's counts are Poisson with mean `library * mean`,
    libraries log-normal around 1.
    """
    check_whole(n_genes, "n_genes")
    # half the samples (rounded down) are controls: a single sample would leave the treated condition empty
    check_whole(n_samples, "n_samples", minimum=2)
    check_whole(cells_per_sample, "cells_per_sample")
    check_probability(de_fraction, "de_fraction")
    check_positive(dispersion, "dispersion")  # the gamma shape is 1 / dispersion
    dtype = _float_dtype()
    k_mean, k_de, k_size, k_sign, k_bio, k_lib, k_counts = jr.split(key, 7)
    base = jnp.exp(jr.normal(k_mean, (n_genes,), dtype) * 1.5 - 3.0)
    is_de = jr.uniform(k_de, (n_genes,), dtype) < de_fraction
    size = jr.uniform(k_size, (n_genes,), dtype, 0.5, 2.0)
    sign = jnp.where(jr.bernoulli(k_sign, 0.5, (n_genes,)), 1.0, -1.0)
    lfc = jnp.where(is_de, size * sign, 0.0)
    condition_of_sample = (jnp.arange(n_samples) >= n_samples // 2).astype(dtype)
    shape = 1.0 / dispersion
    bio = jr.gamma(k_bio, shape, (n_samples, n_genes), dtype) / shape
    sample_mean = base[None, :] * bio * jnp.exp2(condition_of_sample[:, None] * lfc[None, :])
    sample = jnp.repeat(jnp.arange(n_samples), cells_per_sample)
    library = 20.0 * jnp.exp(0.3 * jr.normal(k_lib, (sample.shape[0],), dtype))
    counts = jr.poisson(k_counts, library[:, None] * sample_mean[sample]).astype(dtype)
    condition = (sample >= n_samples // 2).astype(sample.dtype)
    return ConditionData(counts=counts, sample=sample, condition=condition, log2_fold_change=lfc)


class SwitchData(eqx.Module):
    """`counts` `(n_cells, n_genes)`, `pseudotime` `(n_cells,)` in [0, 1]; per gene `mu0`, `k`, `t0` (k = 0 for
    null genes) and `is_switch`."""

    counts: Float[Array, "n_cells n_genes"]
    pseudotime: Float[Array, " n_cells"]
    mu0: Float[Array, " n_genes"]
    k: Float[Array, " n_genes"]
    t0: Float[Array, " n_genes"]
    is_switch: Array


def simulate_switch_genes(
    *,
    key: PRNGKeyArray,
    n_cells: int = 500,
    n_switch: int = 40,
    n_null: int = 40,
    dropout_lambda: float = 0.0,
) -> SwitchData:
    """Switch genes whose mean follows switchde's sigmoid in a uniform pseudotime, and constant null genes.

    Switch genes: $\\mu_0 \\sim U(5, 20)$, $|k| \\sim U(8, 20)$ of random sign, $t_0 \\sim U(0.25, 0.75)$;
    counts are Gaussian around the mean with standard deviation $\\sqrt{\\mu}$ (switchde's model on
    log-expression, `counts` is the expression it is given); with `dropout_lambda > 0` an entry $x$ is zeroed
    with probability $e^{-\\lambda x^2}$ (switchde's zero-inflated model).
    """
    check_whole(n_cells, "n_cells")
    if check_whole(n_switch, "n_switch", minimum=0) + check_whole(n_null, "n_null", minimum=0) < 1:
        raise ValueError("n_switch, n_null: need at least one gene in all, got 0 and 0")
    check_nonnegative(dropout_lambda, "dropout_lambda")
    dtype = _float_dtype()
    keys = jr.split(key, 7)
    n_genes = n_switch + n_null
    t = jr.uniform(keys[0], (n_cells,), dtype)
    mu0 = jr.uniform(keys[1], (n_genes,), dtype, 5.0, 20.0)
    k = jr.uniform(keys[2], (n_genes,), dtype, 8.0, 20.0) * jnp.where(jr.bernoulli(keys[3], 0.5, (n_genes,)), 1, -1)
    t0 = jr.uniform(keys[4], (n_genes,), dtype, 0.25, 0.75)
    is_switch = jnp.arange(n_genes) < n_switch
    k = jnp.where(is_switch, k, 0.0)
    mean = 2.0 * mu0[None, :] / (1.0 + jnp.exp(-k[None, :] * (t[:, None] - t0[None, :])))
    y = mean + jnp.sqrt(mean) * jr.normal(keys[5], mean.shape, dtype)
    if dropout_lambda > 0:
        y = jnp.where(jr.uniform(keys[6], mean.shape, dtype) < jnp.exp(-dropout_lambda * y**2), 0.0, y)
    return SwitchData(counts=y, pseudotime=t, mu0=mu0, k=k, t0=t0, is_switch=is_switch)


class DistributionData(eqx.Module):
    """`x` `(n_cells, n_genes)` expression; `first` `(n_cells,)` the first condition's cells; `pattern`
    `(n_genes,)` the true class, an index into `("EE", "DE", "DP", "DM", "DB")`."""

    x: Float[Array, "n_cells n_genes"]
    first: Array
    pattern: Int[Array, " n_genes"]


def simulate_distributions(*, key: PRNGKeyArray, n_cells: int = 400, genes_per_pattern: int = 20) -> DistributionData:
    """Two conditions of `n_cells / 2` cells; per gene a base level $m \\sim U(2, 6)$, unit-variance modes, and
    the scDD class: EE N(m) in both; DE N(m) vs N(m + 3); DP modes m and m + 4 with weights 0.25/0.75 vs
    0.75/0.25; DM N(m) vs half N(m), half N(m + 4); DB N(m + 2) vs half N(m), half N(m + 4)."""
    dtype = _float_dtype()
    n_genes = 5 * genes_per_pattern
    k_base, k_noise, k_mode = jr.split(key, 3)
    pattern = jnp.repeat(jnp.arange(5), genes_per_pattern)
    base = jr.uniform(k_base, (n_genes,), dtype, 2.0, 6.0)
    first = jnp.arange(n_cells) < n_cells // 2
    u = jr.uniform(k_mode, (n_cells, n_genes), dtype)
    f = first[:, None]
    p = pattern[None, :]
    upper_dp = jnp.where(f, u < 0.25, u < 0.75)
    offset = jnp.select(
        [p == 0, p == 1, p == 2, p == 3, p == 4],
        [jnp.zeros_like(u), jnp.where(f, 0.0, 3.0), jnp.where(upper_dp, 4.0, 0.0),
         jnp.where(f, 0.0, jnp.where(u < 0.5, 4.0, 0.0)), jnp.where(f, 2.0, jnp.where(u < 0.5, 4.0, 0.0))],
    )
    x = base[None, :] + offset + jr.normal(k_noise, (n_cells, n_genes), dtype)
    return DistributionData(x=x, first=first, pattern=pattern)


class ArchetypeData(eqx.Module):
    """`x` `(n_cells, n_dims)` = `weights @ archetypes` + noise; `archetypes` `(n_archetypes, n_dims)`;
    `weights` `(n_cells, n_archetypes)` on the simplex."""

    x: Float[Array, "n_cells n_dims"]
    archetypes: Float[Array, "n_archetypes n_dims"]
    weights: Float[Array, "n_cells n_archetypes"]


def simulate_archetypes(
    *, key: PRNGKeyArray, n_cells: int = 500, n_dims: int = 10, n_archetypes: int = 3, concentration: float = 0.5,
    noise: float = 0.05,
) -> ArchetypeData:
    """Cells as Dirichlet(`concentration`) mixtures of `n_archetypes` standard-normal archetypes (scaled by 5),
    plus isotropic Gaussian noise of standard deviation `noise`."""
    dtype = _float_dtype()
    k_a, k_w, k_n = jr.split(key, 3)
    archetypes = 5.0 * jr.normal(k_a, (n_archetypes, n_dims), dtype)
    weights = jr.dirichlet(k_w, jnp.full((n_archetypes,), concentration, dtype), (n_cells,))
    x = weights @ archetypes + noise * jr.normal(k_n, (n_cells, n_dims), dtype)
    return ArchetypeData(x=x, archetypes=archetypes, weights=weights)


def pseudobulk_sums(
    counts: Float[Array, "n_cells n_genes"], sample: Int[Array, " n_cells"], n_samples: int
) -> Float[Array, "n_samples n_genes"]:
    """Sum of each sample's cells' counts."""
    return jax.ops.segment_sum(counts, sample, num_segments=n_samples)
