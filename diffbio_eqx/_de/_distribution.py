"""Differential distributions between two conditions: the two-sample Kolmogorov-Smirnov statistic (SciPy's
`ks_2samp`, exactly), a smooth version for gradients, permutation p-values vmapped over genes and permutations,
and scDD's pattern classes (Korthauer et al. 2016) from per-condition Gaussian mixtures.

**KS statistic.** $D = \\max_x |F_1(x) - F_2(x)|$ over the pooled values, with the empirical CDFs counted with
`side="right"` as SciPy does; computed from one sort of the pooled values per gene, reading the running counts
only at the last of each run of ties, so the same integer counts divided by the same sizes give the same floats
(with the division rounded as IEEE division, which XLA's CPU division is not always: see
`correctly_rounded_divide`). Exact in float64 (`jax_enable_x64`); float32 inputs round differently. SciPy
changed its rounding in 1.18, so the statistic follows the SciPy installed beside it (`SCIPY_SNAPS_KS`): before
1.18, $D$ from the ECDFs $c / n$ and, in the exact branch, snapped to the lattice $h / \\mathrm{lcm}(n_1, n_2)$;
from 1.18, the ECDFs' levels are `linspace(0, 1, n + 1)` ($c \\cdot (1 / n)$, and 1 at $c = n$), never snapped.

**Smooth KS.** The steps $\\mathbb 1[x_j \\le x]$ become $\\sigma((x - x_j) / h)$ and the maximum a
log-sum-exp at temperature $\\tau$; it tends to $D$ as $h, \\tau \\to 0$ and is differentiable in the data.

**Permutation p-values** $(1 + \\#\\{D^{(b)} \\ge D\\}) / (1 + B)$ over $B$ random relabellings of the cells.

**Pattern classes** (scDD's DE / DP / DM / DB, with EE for genes that are not differentially distributed at the
permutation test): in each condition a 1-D Gaussian mixture with 1-3 components chosen by BIC (EM, vmapped over
genes); components of the two conditions are matched when their means differ by less than `match` pooled
standard deviations. Same number of modes: one mode each -> DE (means differ) ; several, all matched -> DP
(proportions differ), else DE. Different numbers of modes: every mode of the condition with fewer modes matched
in the other -> DM, else DB. scDD fits Dirichlet-process mixtures with a Bayesian partition; the BIC choice of
the number of modes is the simplification here.
"""

from importlib import metadata

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._markers import benjamini_hochberg


PATTERNS = ("EE", "DE", "DP", "DM", "DB")


def _scipy_before_1_18() -> bool:
    try:
        major, minor = (int(part) for part in metadata.version("scipy").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) < (1, 18)


#: Whether the installed SciPy's `ks_2samp` divides counts by the sample sizes and snaps D to the lattice (before
#: 1.18) rather than reading ECDF levels from `linspace` (1.18 on): which of the two `ks_statistic` reproduces.
SCIPY_SNAPS_KS = _scipy_before_1_18()


def _two_product(a: Float[Array, "*shape"], b: Float[Array, "*#shape"]):
    """Dekker's error-free product: `p + e == a * b` exactly (Veltkamp splitting, no fused multiply-add)."""
    def split(v):
        t = 134217729.0 * v  # 2**27 + 1 (float64)
        hi = t - (t - v)
        return hi, v - hi

    p = a * b
    (ah, al), (bh, bl) = split(a), split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def correctly_rounded_divide(c: Float[Array, "*shape"], n: Float[Array, ""]) -> Float[Array, "*shape"]:
    """`c / n` rounded as IEEE division (NumPy's): XLA's CPU division can be 1 ulp off, so the quotient is
    corrected once with its exact residual."""
    q = c / n
    p, e = _two_product(q, n)
    return q + ((c - p) - e) / n


def _sorted_counts(values: Float[Array, " n"], first: Bool[Array, " n"], used: Bool[Array, " n"]):
    order = jnp.argsort(jnp.where(used, values, jnp.inf))
    v = jnp.where(used, values, jnp.inf)[order]
    in_first = (first & used)[order].astype(values.dtype)
    in_second = (~first & used)[order].astype(values.dtype)
    last_of_run = jnp.concatenate([v[1:] != v[:-1], jnp.ones((1,), bool)]) & jnp.isfinite(v)
    return v, in_first, in_second, last_of_run


def _ecdf_level(counts: Float[Array, " n"], size: Float[Array, ""]) -> Float[Array, " n"]:
    """SciPy 1.18's ECDF values `linspace(0, 1, size + 1)[counts]`: `counts * (1 / size)`, exactly 1 at `size`."""
    return jnp.where(counts == size, 1.0, counts * correctly_rounded_divide(jnp.ones_like(size), size))


def ks_statistic(
    values: Float[Array, " n"], first: Bool[Array, " n"], used: Bool[Array, " n"] | None = None
) -> Float[Array, ""]:
    """`scipy.stats.ks_2samp(values[first & used], values[~first & used]).statistic`, exactly.

    Before SciPy 1.18 (`SCIPY_SNAPS_KS`), where `method="auto"` takes the exact distribution (both samples of at
    most 10,000 values), SciPy snaps $D$ to the lattice $h / \\mathrm{lcm}(n_1, n_2)$;
    $h = \\max |c_1 n_2 - c_2 n_1| / \\gcd(n_1, n_2)$ is computed here in exact integer arithmetic, then divided as
    SciPy divides. From 1.18 SciPy returns the unsnapped difference of its `linspace` ECDF levels.
    """
    used = jnp.ones_like(first) if used is None else used
    _, in_first, in_second, last = _sorted_counts(values, first, used)
    c1, c2 = jnp.cumsum(in_first), jnp.cumsum(in_second)
    n1, n2 = jnp.sum(in_first), jnp.sum(in_second)
    if not SCIPY_SNAPS_KS:
        return jnp.max(jnp.where(last, jnp.abs(_ecdf_level(c1, n1) - _ecdf_level(c2, n2)), 0.0))
    raw = jnp.max(jnp.where(last, jnp.abs(correctly_rounded_divide(c1, n1) - correctly_rounded_divide(c2, n2)), 0.0))
    g = jnp.gcd(n1.astype(jnp.int64 if values.dtype == jnp.float64 else jnp.int32),
                n2.astype(jnp.int64 if values.dtype == jnp.float64 else jnp.int32)).astype(values.dtype)
    h = jnp.max(jnp.where(last, jnp.abs(c1 * n2 - c2 * n1), 0.0)) / g
    lattice = correctly_rounded_divide(h, (n1 / g) * n2)
    return jnp.where(jnp.maximum(n1, n2) <= 10000, lattice, raw)


def smooth_ks_statistic(
    values: Float[Array, " n"], first: Bool[Array, " n"], bandwidth: Float[Array, ""], temperature: Float[Array, ""]
) -> Float[Array, ""]:
    """Differentiable KS: sigmoid steps of width `bandwidth`, soft maximum at `temperature` over the pooled
    values ($n \\times n$ per gene: for one gene's cells, not whole atlases)."""
    w1 = first.astype(values.dtype)
    w1, w2 = w1 / jnp.sum(w1), (1.0 - w1) / jnp.sum(1.0 - w1)
    steps = jax.nn.sigmoid((values[:, None] - values[None, :]) / bandwidth)  # [at, of]
    diff = jnp.abs(steps @ w1 - steps @ w2)
    return temperature * jax.nn.logsumexp(diff / temperature) - temperature * jnp.log(values.shape[0])


def ks_permutation_test(
    values: Float[Array, " n"], first: Bool[Array, " n"], *, key: PRNGKeyArray, n_permutations: int = 1000
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The KS statistic and its permutation p-value $(1 + \\#\\{D^{(b)} \\ge D\\}) / (1 + B)$ (one sort; each
    permutation relabels the sorted cells). The permutations compare $D n_1 n_2$, an integer, so ties count; it is
    exact while $n_1 n_2 < 2^{24}$ in float32 (about 8,000 cells of a gene split evenly), $2^{53}$ in float64."""
    _, _, _, last = _sorted_counts(values, first, jnp.ones_like(first))
    order = jnp.argsort(values)
    labels = first[order]

    def lattice_stat(lab):
        # D * n1 * n2 = max |c1 n2 - c2 n1|, an integer (exact below 2**24 in float32): a relabelling keeps n1 and
        # n2, so it orders as D. D itself, a difference of two rounded fractions, can differ by an ulp between two
        # relabellings with the same D; in float32 that exceeded the old 1e-12 slack and dropped the ties
        a = lab.astype(values.dtype)
        n1, n2 = jnp.sum(a), jnp.sum(1.0 - a)
        return jnp.max(jnp.where(last, jnp.abs(jnp.cumsum(a) * n2 - jnp.cumsum(1.0 - a) * n1), 0.0))

    observed = lattice_stat(labels)
    permuted = jax.vmap(lambda k: lattice_stat(jr.permutation(k, labels)))(jr.split(key, n_permutations))
    exceed = jnp.sum(permuted >= observed - 0.5).astype(values.dtype)  # integers: ties count, as in float64
    return ks_statistic(values, first), (1.0 + exceed) / (1.0 + n_permutations)


class Mixture1D(eqx.Module):
    """A 1-D Gaussian mixture: `weights`, `means`, `variances` `(n_components,)` (unused components have weight
    0), `n_components` chosen, `bic`."""

    weights: Float[Array, " k"]
    means: Float[Array, " k"]
    variances: Float[Array, " k"]
    n_components: Int[Array, ""]
    bic: Float[Array, ""]


def _em(values, used, k: int, max_k: int, n_iter: int):
    """EM for a k-component 1-D mixture over the `used` values (quantile start, variance floor)."""
    dtype = values.dtype
    w = used.astype(dtype)
    n = jnp.sum(w)
    masked = jnp.where(used, values, jnp.nan)
    means = jnp.nanquantile(masked, (jnp.arange(k, dtype=dtype) + 0.5) / k)
    total_var = jnp.nanvar(masked)
    floor = 1e-3 * total_var + 1e-6
    var = jnp.full((k,), total_var / k**2 + floor)
    weights = jnp.full((k,), 1.0 / k, dtype)

    def log_joint(params):
        pi, mu, s2 = params
        return jnp.log(pi)[None, :] - 0.5 * (jnp.log(2.0 * jnp.pi * s2)[None, :]
                                             + (values[:, None] - mu[None, :]) ** 2 / s2[None, :])

    def step(params, _):
        resp = jax.nn.softmax(log_joint(params), axis=1) * w[:, None]
        mass = jnp.sum(resp, axis=0) + 1e-12
        mu = jnp.sum(resp * values[:, None], axis=0) / mass
        s2 = jnp.sum(resp * (values[:, None] - mu[None, :]) ** 2, axis=0) / mass + floor
        return (mass / n, mu, s2), None

    params = jax.lax.scan(step, (weights, means, var), length=n_iter)[0]
    ll = jnp.sum(w * jax.nn.logsumexp(log_joint(params), axis=1))
    bic = -2.0 * ll + (3.0 * k - 1.0) * jnp.log(n)
    pad = lambda a, fill: jnp.concatenate([a, jnp.full((max_k - k,), fill, dtype)])
    return pad(params[0], 0.0), pad(params[1], jnp.nan), pad(params[2], jnp.nan), bic


def fit_mixture(
    values: Float[Array, " n"], used: Bool[Array, " n"], *, max_components: int = 3, n_iter: int = 200
) -> Mixture1D:
    """The BIC-best 1-D Gaussian mixture with 1 to `max_components` components on the `used` values."""
    fits = [_em(values, used, k, max_components, n_iter) for k in range(1, max_components + 1)]
    bics = jnp.stack([f[3] for f in fits])
    best = jnp.argmin(jnp.where(jnp.isnan(bics), jnp.inf, bics))
    pick = lambda i: jnp.stack([f[i] for f in fits])[best]
    return Mixture1D(weights=pick(0), means=pick(1), variances=pick(2), n_components=best + 1, bic=bics[best])


def classify_pattern(a: Mixture1D, b: Mixture1D, differential: Bool[Array, ""], match: float = 1.5) -> Int[Array, ""]:
    """scDD's class index into `PATTERNS` (EE, DE, DP, DM, DB) from the two conditions' mixtures (see the module
    docstring)."""
    sd = jnp.sqrt(jnp.nanmax(jnp.concatenate([a.variances, b.variances])))
    gaps = jnp.abs(a.means[:, None] - b.means[None, :])
    gaps = jnp.where(jnp.isnan(gaps), jnp.inf, gaps)
    a_matched = jnp.where(a.weights > 0, jnp.min(gaps, axis=1) < match * sd, True)
    b_matched = jnp.where(b.weights > 0, jnp.min(gaps, axis=0) < match * sd, True)
    same = a.n_components == b.n_components
    fewer_matched = jnp.where(a.n_components < b.n_components, jnp.all(a_matched), jnp.all(b_matched))
    unimodal = same & (a.n_components == 1)
    all_matched = jnp.all(a_matched) & jnp.all(b_matched)
    pattern = jnp.where(same, jnp.where(unimodal | ~all_matched, 1, 2), jnp.where(fewer_matched, 3, 4))
    return jnp.where(differential, pattern, 0)


class DistributionResult(eqx.Module):
    """Per gene: the KS `statistic`, its permutation `pvalue`, BH `qvalue`, the scDD `pattern` (index into
    `PATTERNS`) and the number of modes in each condition."""

    statistic: Float[Array, " n_genes"]
    pvalue: Float[Array, " n_genes"]
    qvalue: Float[Array, " n_genes"]
    pattern: Int[Array, " n_genes"]
    n_modes: Int[Array, "n_genes 2"]


@eqx.filter_jit
def differential_distribution(
    x: Float[Array, "n_cells n_genes"],
    first: Bool[Array, " n_cells"],
    *,
    key: PRNGKeyArray,
    n_permutations: int = 1000,
    alpha: float = 0.05,
) -> DistributionResult:
    """KS permutation test and scDD pattern class of every gene between the `first` cells and the others.

    **Arguments:**

    - `x`: expression (log scale), cells by genes.
    - `first`: which cells are in the first condition.
    - `key`: PRNG key for the permutations. (Keyword only argument.)
    - `n_permutations`: permutations per gene. (Keyword only, static.)
    - `alpha`: FDR (BH over genes) under which a gene is differentially distributed. (Keyword only, static.)
    """
    keys = jr.split(key, x.shape[1])
    stat, pvalue = jax.vmap(lambda column, k: ks_permutation_test(column, first, key=k,
                                                                  n_permutations=n_permutations))(x.T, keys)
    qvalue = benjamini_hochberg(pvalue)
    mix_a = jax.vmap(lambda column: fit_mixture(column, first))(x.T)
    mix_b = jax.vmap(lambda column: fit_mixture(column, ~first))(x.T)
    pattern = jax.vmap(classify_pattern)(mix_a, mix_b, qvalue < alpha)
    return DistributionResult(statistic=stat, pvalue=pvalue, qvalue=qvalue, pattern=pattern,
                              n_modes=jnp.stack([mix_a.n_components, mix_b.n_components], axis=1))
