"""Marker genes as `scanpy.tl.rank_genes_groups` computes them, one gene per vmapped call.

Faithful to scanpy 1.x (`scanpy/tools/_rank_genes_groups.py`):

- **Wilcoxon rank-sum**: mid-ranks of each gene over the cells compared (all cells for `reference="rest"`, the
  group and the reference group otherwise), the rank sum $R$ of the group's $n$ cells against $m$ others,
  $z = (R - n(n+m+1)/2) / \\sqrt{c\\, n m (n+m+1)/12}$ with the tie correction
  $c = 1 - \\sum_t (t^3 - t) / (N^3 - N)$ (or $c = 1$ without it, scanpy's default), $z$ set to 0 where it is
  NaN, and $p = 2\\,\\Phi(-|z|)$.
- **Welch's t-test** (`scipy.stats.ttest_ind_from_stats(equal_var=False)`) on the group's and the rest's means
  and unbiased variances; a NaN score is 0 and a NaN p-value 1. `"t-test_overestim_var"` uses the group's size
  for the rest as well.
- **log fold changes** $\\log_2((\\mathrm{expm1}(\\bar x_g) + 10^{-9}) / (\\mathrm{expm1}(\\bar x_r) + 10^{-9}))$ of
  the log-scale means.
- **Benjamini-Hochberg** adjusted p-values (statsmodels' `fdr_bh`).

Against the rest, one sort per gene carries each cell's group: in sorted order a cell's mid-rank is the mean of the
first and last positions of its value (+1), the rank sums are segment sums over the groups and the tie sum is
$\\sum_i (t_i^2 - 1) = \\sum_{\\text{ties}} (t^3 - t)$. Against a reference group the mid-ranks come from two
`searchsorted` calls on the sorted column (rank = #smaller + (#equal + 1) / 2). Nothing is
$n_\\text{cells} \\times n_\\text{cells}$.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
from jaxtyping import Array, Bool, Float, Int


def midranks(
    values: Float[Array, " n_cells"], used: Bool[Array, " n_cells"]
) -> tuple[Float[Array, " n_cells"], Float[Array, " n_cells"]]:
    """Average ranks (1-based, as `scipy.stats.rankdata`) of `values` among the `used` cells, and each cell's tie
    count; entries of unused cells are meaningless."""
    v = jnp.where(used, values, jnp.inf)
    s = jnp.sort(v)
    left = jnp.searchsorted(s, v, side="left").astype(values.dtype)
    right = jnp.searchsorted(s, v, side="right").astype(values.dtype)
    return (left + right + 1.0) / 2.0, right - left


def rank_sum_z(
    values: Float[Array, " n_cells"],
    group: Bool[Array, " n_cells"],
    used: Bool[Array, " n_cells"],
    tie_correct: bool,
) -> Float[Array, ""]:
    """Wilcoxon rank-sum z-score of the `group` cells against the other `used` cells (scanpy's normal
    approximation, NaN set to 0)."""
    ranks, ties = midranks(values, used)
    return _z_from_ranks(ranks, ties, group, used, tie_correct)


def _z_from_ranks(ranks, ties, group, used, tie_correct: bool):
    dtype = ranks.dtype
    n = jnp.sum(group & used).astype(dtype)
    n_used = jnp.sum(used).astype(dtype)
    m = n_used - n
    rank_sum = jnp.sum(jnp.where(group & used, ranks, 0.0))
    if tie_correct:
        tie_term = jnp.sum(jnp.where(used, ties**2 - 1.0, 0.0))
        coef = 1.0 - tie_term / (n_used**3 - n_used)
    else:
        coef = jnp.ones((), dtype)
    std = jnp.sqrt(coef * n * m * (n_used + 1.0) / 12.0)
    z = (rank_sum - n * (n_used + 1.0) / 2.0) / std
    return jnp.where(jnp.isnan(z), 0.0, z)


def normal_two_sided(z: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """$2\\,\\Phi(-|z|)$, `2 * scipy.stats.norm.sf(abs(z))`."""
    return 2.0 * jsp.ndtr(-jnp.abs(z))


def welch_t_test(
    mean1: Float[Array, "*#shape"],
    var1: Float[Array, "*#shape"],
    n1: Float[Array, "*#shape"],
    mean2: Float[Array, "*#shape"],
    var2: Float[Array, "*#shape"],
    n2: Float[Array, "*#shape"],
) -> tuple[Float[Array, "*#shape"], Float[Array, "*#shape"]]:
    """Welch's t and its two-sided p-value, as `scipy.stats.ttest_ind_from_stats(equal_var=False)`, with scanpy's
    NaN handling (score 0, p-value 1).

    Degrees of freedom $\\nu = (v_1 + v_2)^2 / (v_1^2/(n_1-1) + v_2^2/(n_2-1))$ with $v_i = s_i^2/n_i$ (1 where
    undefined, as SciPy); $p = I_{\\nu/(\\nu+t^2)}(\\nu/2, 1/2)$, the regularised incomplete beta function.
    """
    vn1, vn2 = var1 / n1, var2 / n2
    df = (vn1 + vn2) ** 2 / (vn1**2 / (n1 - 1.0) + vn2**2 / (n2 - 1.0))
    df = jnp.where(jnp.isnan(df), 1.0, df)
    t = (mean1 - mean2) / jnp.sqrt(vn1 + vn2)
    p = jsp.betainc(df / 2.0, 0.5, df / (df + t**2))
    return jnp.where(jnp.isnan(t), 0.0, t), jnp.where(jnp.isnan(p), 1.0, p)


def benjamini_hochberg(pvals: Float[Array, " n"]) -> Float[Array, " n"]:
    """Benjamini-Hochberg adjusted p-values (statsmodels' `multipletests(method="fdr_bh")`) over the non-NaN
    p-values; NaN stays NaN (R's `p.adjust`, `scipy.stats.false_discovery_control` on the rest), so one untestable
    gene does not void the others."""
    valid = ~jnp.isnan(pvals)
    n = jnp.sum(valid).astype(pvals.dtype)
    order = jnp.argsort(jnp.where(valid, pvals, jnp.inf))
    ranked = jnp.where(valid, pvals, jnp.inf)[order] * n / jnp.arange(1, pvals.shape[0] + 1, dtype=pvals.dtype)
    adjusted = jnp.minimum(jax.lax.cummin(ranked[::-1])[::-1], 1.0)
    return jnp.where(valid, jnp.zeros_like(pvals).at[order].set(adjusted), jnp.nan)


def _moments_from_sums(first, second, n):
    mean = first / n[:, None]
    var = second / n[:, None] - mean**2
    var = jnp.where((n != 1.0)[:, None], var * (n / jnp.maximum(n - 1.0, 1.0))[:, None], var)
    return mean, var, n


def group_moments(
    x: Float[Array, "n_cells n_genes"], masks: Bool[Array, "n_groups n_cells"]
) -> tuple[Float[Array, "n_groups n_genes"], Float[Array, "n_groups n_genes"], Float[Array, " n_groups"]]:
    """Means, unbiased variances (scanpy's `_get_mean_var`: $E[x^2] - E[x]^2$ times $n/(n-1)$) and sizes of the
    cells in each (possibly overlapping) mask, accumulated in the default float dtype; the squares are taken in
    `x`'s own dtype first, as scanpy squares float32 data in float32."""
    dtype = jnp.zeros(()).dtype
    w = masks.astype(dtype)

    def sums(column):  # blocks of genes: x is never copied whole into the wider dtype
        return w @ column.astype(dtype), w @ (column * column).astype(dtype)

    first, second = jax.lax.map(sums, x.T, batch_size=256)
    return _moments_from_sums(first.T, second.T, jnp.sum(w, axis=1))


def _label_blocks(labels: Int[Array, " n_cells"], n_labels: int, block: int) -> tuple[Array, Array]:
    """Cells grouped by label into blocks of `block` rows, each block holding one label's cells: the row indices
    (`n_cells` pads a block) and each block's label (`n_labels` for unused blocks)."""
    n_cells = labels.shape[0]
    counts = jnp.bincount(labels, length=n_labels)
    blocks_per_label = (counts + block - 1) // block
    block_end = jnp.cumsum(blocks_per_label)
    ids = jnp.arange(n_cells // block + n_labels)  # enough blocks for any split of the cells
    block_label = jnp.searchsorted(block_end, ids, side="right")
    label = jnp.minimum(block_label, n_labels - 1)
    position = (ids - (block_end - blocks_per_label)[label])[:, None] * block + jnp.arange(block)[None]
    valid = (block_label < n_labels)[:, None] & (position < counts[label][:, None])
    order = jnp.argsort(labels, stable=True)
    start = (jnp.cumsum(counts) - counts)[label][:, None]
    rows = jnp.where(valid, order[jnp.clip(start + position, 0, n_cells - 1)], n_cells)
    return rows, block_label


def label_moments(
    x: Float[Array, "n_cells n_genes"], labels: Int[Array, " n_cells"], n_labels: int, *, block: int = 128
) -> tuple[Float[Array, "n_rows n_genes"], Float[Array, "n_rows n_genes"], Float[Array, " n_rows"]]:
    """`group_moments` of the disjoint groups `labels == l` for `l` in `[0, n_labels)` (cells labelled otherwise
    belong to none), then of each group's complement (all other cells), from one pass over `x`.

    The cells are gathered label by label in blocks of `block` rows; each block is summed along the cells in the
    default float dtype (so the work is one addition per value and group, not one per value, group and mask as a
    mask matmul), the blocks' sums are added per label and each complement is the column totals minus its
    group's sums.
    """
    dtype = jnp.zeros(()).dtype
    labels = jnp.where((labels >= 0) & (labels < n_labels), labels, n_labels)
    rows, block_label = _label_blocks(labels, n_labels + 1, block)

    def sums(index):
        values = x.at[index].get(mode="fill", fill_value=0)
        return jnp.sum(values.astype(dtype), axis=0), jnp.sum((values * values).astype(dtype), axis=0)

    first, second = jax.lax.map(sums, rows, batch_size=max(1, 1024 // block))
    one_hot = (block_label[None] == jnp.arange(n_labels + 1, dtype=block_label.dtype)[:, None]).astype(dtype)
    first, second = one_hot @ first, one_hot @ second  # (n_labels + 1, n_genes): the last row, unlabelled cells
    total_first, total_second = jnp.sum(first, axis=0, keepdims=True), jnp.sum(second, axis=0, keepdims=True)
    n = jnp.bincount(labels, length=n_labels + 1)[:n_labels].astype(dtype)
    first = jnp.concatenate([first[:n_labels], total_first - first[:n_labels]])
    second = jnp.concatenate([second[:n_labels], total_second - second[:n_labels]])
    return _moments_from_sums(first, second, jnp.concatenate([n, x.shape[0] - n]))


def log_fold_changes(
    mean_group: Float[Array, "*shape"], mean_rest: Float[Array, "*shape"], log_base: Float[Array, ""]
) -> Float[Array, "*shape"]:
    """scanpy's $\\log_2((\\mathrm{expm1}(\\bar x_g \\ln b) + 10^{-9}) / (\\mathrm{expm1}(\\bar x_r \\ln b) + 10^{-9}))$
    ($\\ln b = 1$ for natural-log data)."""
    return jnp.log2((jnp.expm1(mean_group * log_base) + 1e-9) / (jnp.expm1(mean_rest * log_base) + 1e-9))


class MarkerResult(eqx.Module):
    """Per compared group and gene: `scores` (z or t), `pvals`, `pvals_adj` (BH within each group),
    `logfoldchanges`, and the group and rest means."""

    scores: Float[Array, "n_groups n_genes"]
    pvals: Float[Array, "n_groups n_genes"]
    pvals_adj: Float[Array, "n_groups n_genes"]
    logfoldchanges: Float[Array, "n_groups n_genes"]
    mean_group: Float[Array, "n_groups n_genes"]
    mean_rest: Float[Array, "n_groups n_genes"]


def _order_keys(values: Float[Array, " n"]) -> Array:
    """Integers ordered as the float values (IEEE bits with the negatives' magnitude bits flipped; -0.0 as 0.0):
    XLA's CPU sort compares integers several times faster than floats (their comparator is a total order)."""
    wide = values.dtype == jnp.float64
    values = jnp.where(values == 0, jnp.zeros((), values.dtype), values if wide else values.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(values, jnp.int64 if wide else jnp.int32)
    return bits ^ ((bits >> (63 if wide else 31)) & (0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF))


def _sort_with_labels(values: Float[Array, " n"], labels: Int[Array, " n"]) -> tuple[Array, Array]:
    """`values`' order keys sorted, with the labels carried: float32 (and narrower) data packed with the label into
    one int64 key where x64 is on, else a two-operand sort."""
    keys = _order_keys(values)
    # the flag, not a trial int64 array: that warns (an error under the tests' filters) where x64 is off
    if keys.dtype == jnp.int32 and jax.config.jax_enable_x64:  # pyright: ignore[reportAttributeAccessIssue]
        packed = jnp.sort((keys.astype(jnp.int64) << 32) | labels.astype(jnp.int64))
        return packed >> 32, (packed & 0xFFFFFFFF).astype(labels.dtype)
    sorted_keys, sorted_labels = jax.lax.sort((keys, labels), num_keys=1)
    return sorted_keys, sorted_labels


def sorted_rank_sums(
    values: Float[Array, " n_cells"], labels: Int[Array, " n_cells"], n_labels: int, dtype
) -> tuple[Float[Array, " n_labels"], Float[Array, ""]]:
    """Sums of the mid-ranks of `values` (among all cells) per label in `[0, n_labels)` (cells with label
    `n_labels` rank but count in no sum), and the tie sum $\\sum_i (t_i^2 - 1)$, from one sort carrying the
    labels: in sorted order a cell's mid-rank is $(f + l)/2 + 1$ with $f$, $l$ the first and last positions of its
    value."""
    s, lab = _sort_with_labels(values, labels)
    n = values.shape[0]
    idx = jnp.arange(n)
    change = s[1:] != s[:-1]
    first = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), change]), idx, 0))
    last = jax.lax.cummin(jnp.where(jnp.concatenate([change, jnp.ones(1, bool)]), idx, n), reverse=True)
    ranks = (first + last).astype(dtype) / 2.0 + 1.0
    ties = (last - first + 1).astype(dtype)
    return jax.ops.segment_sum(ranks, lab, num_segments=n_labels + 1)[:n_labels], jnp.sum(ties**2 - 1.0)


def _labels_of(groups: Bool[Array, "n_groups n_cells"]) -> Int[Array, " n_cells"]:
    """Each cell's group among disjoint `groups`, `n_groups` for a cell in none."""
    return jnp.where(jnp.any(groups, axis=0), jnp.argmax(groups, axis=0), groups.shape[0]).astype(jnp.int32)


def _wilcoxon_scores(x, groups, rests, tie_correct: bool, batch_size: int, vs_rest: bool, dtype):
    if vs_rest:  # every comparison ranks all cells: one sort per gene carrying each cell's group
        n_groups, n_cells = groups.shape
        labels = _labels_of(groups)
        n = jnp.sum(groups, axis=1).astype(dtype)
        total = jnp.asarray(n_cells, dtype)
        m = total - n

        def per_gene(column):
            sums, tie_term = sorted_rank_sums(column, labels, n_groups, dtype)
            coef = 1.0 - tie_term / (total**3 - total) if tie_correct else jnp.ones((), dtype)
            z = (sums - n * (total + 1.0) / 2.0) / jnp.sqrt(coef * n * m * (total + 1.0) / 12.0)
            return jnp.where(jnp.isnan(z), 0.0, z)

        return jax.lax.map(per_gene, x.T, batch_size=batch_size).T

    def per_pair(column):
        column = column.astype(dtype)
        return jax.vmap(lambda g, r: rank_sum_z(column, g, g | r, tie_correct))(groups, rests)

    return jax.lax.map(per_pair, x.T, batch_size=batch_size).T


@eqx.filter_jit
def rank_genes(
    x: Float[Array, "n_cells n_genes"],
    groups: Bool[Array, "n_groups n_cells"],
    rests: Bool[Array, "n_groups n_cells"],
    log_base: Float[Array, ""],
    *,
    method: str = "t-test",
    tie_correct: bool = False,
    vs_rest: bool = False,
    batch_size: int = 64,
) -> MarkerResult:
    """Score every gene for each group against its rest (scanpy's `rank_genes_groups` statistics, unsorted).

    **Arguments:**

    - `x`: log-scale expression (float32 data is squared in float32, as scanpy does, then accumulated in the
      default float dtype).
    - `groups`: row `g` marks the cells of compared group `g`.
    - `rests`: row `g` marks the cells it is compared with (the complement for `reference="rest"`, the reference
      group's cells otherwise).
    - `log_base`: $\\ln b$ of the data's logarithm base (1 for natural log).
    - `method`: `"wilcoxon"`, `"t-test"` or `"t-test_overestim_var"`. (Keyword only, static.)
    - `tie_correct`: Wilcoxon tie correction (scanpy's default is off). (Keyword only, static.)
    - `vs_rest`: every row of `rests` is the complement of `groups`' row and the groups are disjoint (rank once
      per gene, in `x`'s own dtype: its order and ties are those of the float64 values). (Keyword only, static.)
    - `batch_size`: genes ranked at once (memory only). (Keyword only, static.)
    """
    if vs_rest:  # one pass: the rests' sums are the totals minus the groups'
        n_groups = groups.shape[0]
        mean, var, n = label_moments(x, _labels_of(groups), n_groups)
        mean_g, var_g, n_g, mean_r, var_r, n_r = (mean[:n_groups], var[:n_groups], n[:n_groups], mean[n_groups:],
                                                  var[n_groups:], n[n_groups:])
    else:
        mean_g, var_g, n_g = group_moments(x, groups)
        mean_r, var_r, n_r = group_moments(x, rests)
    if method == "wilcoxon":
        scores = _wilcoxon_scores(x, groups, rests, tie_correct, batch_size, vs_rest, mean_g.dtype)
        pvals = normal_two_sided(scores)
    elif method in ("t-test", "t-test_overestim_var"):
        n_other = n_g if method == "t-test_overestim_var" else n_r
        scores, pvals = welch_t_test(mean_g, var_g, n_g[:, None], mean_r, var_r, n_other[:, None])
    else:
        raise ValueError(f"method: {method!r} is not one of 'wilcoxon', 't-test', 't-test_overestim_var'")
    return MarkerResult(
        scores=scores,
        pvals=pvals,
        pvals_adj=jax.vmap(benjamini_hochberg)(pvals),
        logfoldchanges=log_fold_changes(mean_g, mean_r, log_base),
        mean_group=mean_g,
        mean_rest=mean_r,
    )
