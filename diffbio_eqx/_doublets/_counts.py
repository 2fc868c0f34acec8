"""Scrublet's exact neighbour counts without a top-k over every row (`_scrublet.hard_neighbor_counts` calls this).

Scrublet needs, for each of its `n` observed and simulated points, only the number of simulated points among its
`k_adj - 1` nearest others, not who they are. With `k_adj` in the hundreds (213 at 20,000 cells) a top-k over all
`n` columns of every row is what costs on a CPU, not the `n x n x n_pcs` distances. Here each block of `BLOCK`
query rows, against all points:

1. squared distances from one matrix product (`|q|^2 + |r|^2 - 2 q.r`, the point itself set below every other),
   the points laid out in groups of `GROUP` in a strided order (group `j` holds points `j`, `j + n_groups`,
   `j + 2 n_groups`, ...), so that a group is a spread sample whatever the input order;
2. each group's minimum, and by a counting search (`_search`) a value $m$ with `k_adj` to `k_adj + EXTRA_GROUPS`
   group minima at most it. $m$ bounds the `k_adj`-th smallest distance $v$ from above (`k_adj` groups hold a
   point at most $m$), and every point at most $m$ lies in those groups: their points (at most
   `(k_adj + EXTRA_GROUPS) * GROUP`) are the candidates, gathered by a prefix-sum compaction;
3. $v$ is found among the candidates by the same counting search over the float's bits (monotone in the value),
   which keeps `count(d <= lo) < k_adj <= count(d <= hi)` and snaps `lo` and `hi` onto the nearest distances each
   probe finds on either side, until `count(d <= hi) == k_adj` (then the `k_adj` nearest are exactly the points
   at most `hi`) or `hi` is $v$ itself; its first probe is the group minimum with about `k_adj` points below it;
4. the simulated points at most `hi`, less the point itself. Where several points tie at $v$ and not all of them
   fit (duplicates, e.g. a doublet of a cell with itself), the tied points are taken in index order, as a top-k
   over the row (and sklearn's search) keeps the lower index: a second counting search over the tied points'
   indices, run only for blocks that have such a row.

The result is the count `hard_neighbor_counts` gave with one top-k per row (ties included) and that scanpy's exact
search gives, at the cost of one matrix product, one pass for the group minima and a few counting passes over the
minima and over the candidates (about 6 a block at 60,000 points). Memory: `BLOCK * n` distances at a time, never
`n x n`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int


#: Reference points per group and query rows per block (`threshold_neighbor_counts`).
GROUP, BLOCK = 32, 64


def _sortable(x: Float[Array, "..."]) -> Int[Array, "..."]:
    """Floats as integers in the same order (the IEEE bits, negatives flipped): a search over values in steps of
    one representable float."""
    int_type = jnp.int32 if x.dtype == jnp.float32 else jnp.int64
    bits = jax.lax.bitcast_convert_type(x, int_type)
    return jnp.where(bits < 0, bits ^ jnp.iinfo(int_type).max, bits)


def _probe(keys: Int[Array, "n_block n"], t: Int[Array, " n_block"]) -> tuple[Array, Array, Array]:
    """Per row, `count(keys <= t)`, the largest key at most `t` and the smallest key above it, in one pass (one
    variadic reduction: XLA fuses the comparison into it, where a sum of a mask first writes the mask out)."""
    low, high = jnp.iinfo(keys.dtype).min, jnp.iinfo(keys.dtype).max
    at_most = keys <= t[:, None]
    # the count as float32: exact to 2**24 entries a row, and XLA's CPU float sum is the faster one
    count, below, above = jax.lax.reduce(
        (at_most.astype(jnp.float32), jnp.where(at_most, keys, low), jnp.where(at_most, high, keys)),
        (jnp.float32(0), jnp.asarray(low, keys.dtype), jnp.asarray(high, keys.dtype)),
        lambda x, y: (x[0] + y[0], jnp.maximum(x[1], y[1]), jnp.minimum(x[2], y[2])), (1,))
    return count.astype(jnp.int32), below, above


def _search(keys: Int[Array, "n_block n_candidates"], k: Int[Array, " n_block"], lo: Int[Array, " n_block"],
            hi: Int[Array, " n_block"], slack: int = 0, probe: Int[Array, " n_block"] | None = None
            ) -> tuple[Array, Array, Array, Array]:
    """Per row, a key `hi` with `k <= count(keys <= hi) <= k + slack`, or else the `k`-th smallest key itself,
    given `count(keys <= lo) < k <= count(keys <= hi)`; `probe`, if given, is the first value tried. Returns
    `(lo, hi, count(keys <= lo), count(keys <= hi))` with the bracket kept (`hi == lo + 1` where the search found
    the `k`-th key and it is tied with the next, or the count was not yet within `slack`).

    Each probe also yields the nearest keys on either side of it, and the bracket snaps to them (`hi` to the
    largest key at most the probe, `lo` to just below the smallest key above it; a probe with `k - 1` keys at most
    it has the `k`-th key as that smallest key above): the ends then sit on keys, which the interpolation needs
    near the end, where the `k`-th and the next key may lie a few floats apart. Probes interpolate the log count
    over the keys (for positive floats about their log: a power law, as neighbour counts grow with the radius, is a
    line there); every fourth probe halves the bracket, so the search ends after at most four times the key's bits
    in probes, and usually in a few."""

    def running(state: tuple) -> Array:
        lo, hi, _, c_hi, _ = state
        return (c_hi > k + slack) & (hi > lo + 1)

    def step(state: tuple) -> tuple:
        lo, hi, c_lo, c_hi, i = state
        active = running(state)
        log_lo = jnp.log(jnp.maximum(c_lo, 1).astype(jnp.float32))
        log_hi = jnp.log(c_hi.astype(jnp.float32))
        share = (jnp.log(k.astype(jnp.float32) + 0.5 * (1 + slack)) - log_lo) / jnp.maximum(log_hi - log_lo, 1e-6)
        # the bracket's width as an unsigned integer: `hi - lo` may not fit the signed keys (negative floats)
        unsigned = jnp.uint32 if lo.dtype == jnp.int32 else jnp.uint64
        width = (hi.astype(unsigned) - lo.astype(unsigned)).astype(jnp.float32)
        interpolated = (lo.astype(unsigned) + (jnp.clip(share, 0.0, 1.0) * width).astype(unsigned)).astype(lo.dtype)
        halfway = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        middle = jnp.where((c_lo > 0) & (i % 4 != 3), interpolated, halfway)
        middle = jnp.clip(middle if probe is None else jnp.where(i == 0, probe, middle), lo + 1, hi - 1)
        c, below, above = _probe(keys, middle)
        up, down = active & (c >= k), active & (c < k)
        found = down & (c == k - 1)  # the k-th key is `above`: its count, ties included, is taken after the loop
        return (jnp.where(down, above - 1, lo), jnp.where(found, above, jnp.where(up, below, hi)),
                jnp.where(down, c, c_lo), jnp.where(found, k, jnp.where(up, c, c_hi)), i + 1)

    state = (lo, hi, _probe(keys, lo)[0], _probe(keys, hi)[0], jnp.int32(0))
    lo, hi, c_lo, _, _ = jax.lax.while_loop(lambda s: jnp.any(running(s)), step, state)
    return lo, hi, c_lo, _probe(keys, hi)[0]


def _floor(keys: Int[Array, "n_block n"], self_key: Array) -> Int[Array, " n_block"]:
    """Per row, the key just below its smallest key other than the point itself (`self_key`): a lower end for
    `_search` with one key (the point's own) at most it, from which the interpolation starts on the power law
    instead of bisecting the negative and the tiny floats first."""
    return jnp.min(jnp.where(keys > self_key, keys, jnp.iinfo(keys.dtype).max), axis=1) - 1


class _Layout(NamedTuple):
    """The reference points, transposed, `(width, n_groups * GROUP)`: rows `[r, |r|^2, 0...]` (padding: points at
    distance `FAR`), column `j * GROUP + i` holding point `j + i * n_groups`, member `i` of group `j` (a group's
    members side by side, so that gathering a group reads one contiguous run); and their simulated flags, in the
    same order."""

    points: Float[Array, "width n_padded"]
    is_sim: Bool[Array, " n_padded"]


#: The point itself is set at distance `-SELF`, below every other point (distances come from one product
#: `|q|^2 + |r|^2 - 2 q.r` and may fall below 0 by rounding).
SELF = 1e30

#: The padding points' squared norm: farther than any real point, finite (no `0 * inf` in the product).
FAR = 1e30


def _layout(manifold: Float[Array, "n_points n_pcs"], is_sim: Bool[Array, " n_points"], n_groups: int) -> _Layout:
    n_points, n_pcs = manifold.shape
    n_padded = n_groups * GROUP
    width = -(-(n_pcs + 2) // 8) * 8
    augmented = jnp.concatenate([manifold, jnp.sum(manifold * manifold, axis=1, keepdims=True),
                                 jnp.ones((n_points, 1), manifold.dtype),
                                 jnp.zeros((n_points, width - n_pcs - 2), manifold.dtype)], axis=1)
    padding = jnp.zeros((n_padded - n_points, width), manifold.dtype).at[:, n_pcs].set(FAR)
    points = jnp.concatenate([augmented, padding]).reshape(GROUP, n_groups, width).transpose(1, 0, 2)
    flags = jnp.concatenate([is_sim, jnp.zeros(n_padded - n_points, bool)]).reshape(GROUP, n_groups).T
    return _Layout(points.reshape(n_padded, width).T, flags.reshape(n_padded))


def _compact(mask: Bool[Array, "n_block n"], n_slots: int) -> Int[Array, "n_block n_slots"]:
    """Per row, the indices of the first `n_slots` true entries of `mask`, in order (`n` where fewer): prefix
    sums as two small triangular products, then a scatter."""
    n_block, n = mask.shape
    chunk = 64
    n_chunks = -(-n // chunk)
    padded = jnp.concatenate([mask, jnp.zeros((n_block, n_chunks * chunk - n), bool)], axis=1)
    ones = padded.reshape(n_block, n_chunks, chunk).astype(jnp.float32)
    within = ones @ jnp.triu(jnp.ones((chunk, chunk), jnp.float32))
    before = jnp.sum(ones, axis=2) @ jnp.triu(jnp.ones((n_chunks, n_chunks), jnp.float32), 1)
    position = (within + before[:, :, None]).reshape(n_block, -1).astype(jnp.int32) - 1
    position = jnp.where(padded, position, n_slots)
    columns = jnp.broadcast_to(jnp.arange(n_chunks * chunk, dtype=jnp.int32), position.shape)
    slots = jnp.full((n_block, n_slots), n, jnp.int32)
    return slots.at[jnp.arange(n_block)[:, None], position].set(columns, mode="drop")


def _block(queries: Float[Array, "n_block n_pcs"], rows: Int[Array, " n_block"], layout: _Layout, k: int,
           n_points: int) -> Int[Array, " n_block"]:
    """Steps 1-4 of the module docstring for one block of query rows (their indices `rows`)."""
    n_block, n_pcs = queries.shape
    n_groups = layout.points.shape[1] // GROUP
    n_slots = min(k + EXTRA_GROUPS, n_groups)
    augmented = jnp.concatenate([-2 * queries, jnp.ones((n_block, 1), queries.dtype),
                                 jnp.sum(queries * queries, axis=1, keepdims=True),
                                 jnp.zeros((n_block, layout.points.shape[0] - n_pcs - 2), queries.dtype)], axis=1)
    columns = (rows % n_groups) * GROUP + rows // n_groups
    distances = (augmented @ layout.points).at[jnp.arange(n_block), columns].set(-SELF)
    distances = distances.reshape(n_block, n_groups, GROUP)
    minima = _sortable(jnp.min(distances, axis=2))
    self_key = _sortable(jnp.asarray(-SELF, queries.dtype))
    lowest = jnp.full((n_block,), _sortable(jnp.asarray(-2 * SELF, queries.dtype)))  # nothing at most it
    floor = _floor(minima, self_key) if k > 1 else lowest
    # a group minimum with about `guess` groups at most it (a first probe for the k-th distance: about k points at
    # most it), then the bound: k to k + EXTRA_GROUPS groups at most it (so that they all fit the slots)
    guess = min(k - 1, max(1, round(k / (1 + (GROUP - 1) * k / n_points))))
    top = jnp.max(minima, axis=1)
    near_lo, near, _, _ = _search(minima, jnp.full((n_block,), guess, jnp.int32), floor, top, slack=EXTRA_GROUPS)
    _, bound, _, _ = _search(minima, jnp.full((n_block,), k, jnp.int32), near_lo, top, slack=EXTRA_GROUPS,
                             probe=near + 1)
    groups = _compact(minima <= bound[:, None], n_slots)
    safe = jnp.minimum(groups, n_groups - 1)
    candidates = jnp.where((groups < n_groups)[:, :, None],
                           _sortable(jnp.take_along_axis(distances, safe[:, :, None], axis=1)),
                           jnp.iinfo(minima.dtype).max).reshape(n_block, -1)
    lo, hi, c_lo, c_hi = _search(candidates, jnp.full((n_block,), k, jnp.int32),
                                 _floor(candidates, self_key) if k > 1 else lowest, bound, probe=near)
    sim = layout.is_sim.reshape(n_groups, GROUP)[safe].reshape(n_block, -1)
    counts = jnp.sum(sim & (candidates <= hi[:, None]), axis=1, dtype=jnp.int32)
    tied = c_hi > k

    def break_ties(counts: Array) -> Array:
        # the `k - c_lo` lowest-index points among those at the k-th distance, found by a search over indices
        index = (jnp.arange(GROUP, dtype=jnp.int32)[None, None, :] * n_groups + safe[:, :, None]).reshape(n_block, -1)
        at = candidates == hi[:, None]
        keys = jnp.where(at, index, jnp.iinfo(jnp.int32).max)
        _, last, _, _ = _search(keys, jnp.where(tied, k - c_lo, 1), jnp.full((n_block,), -1, jnp.int32),
                                jnp.full((n_block,), n_points, jnp.int32))
        kept = (candidates <= lo[:, None]) | (at & (index <= last[:, None]))
        return jnp.where(tied, jnp.sum(sim & kept, axis=1, dtype=jnp.int32), counts)

    counts = jax.lax.cond(jnp.any(tied), break_ties, lambda c: c, counts)
    return counts - layout.is_sim[columns].astype(jnp.int32)


#: Groups kept beyond the `k_adj` with the smallest minima, where several groups tie at the bound.
EXTRA_GROUPS = 8


def threshold_neighbor_counts(manifold: Float[Array, "n_points n_pcs"], is_sim: Bool[Array, " n_points"], k_adj: int,
                              first: Int[ArrayLike, ""] = 0, n_rows: int | None = None) -> Int[Array, " n_rows"]:
    """How many of each point's `k_adj - 1` nearest other points are simulated (module docstring), exactly, ties
    in index order. Needs `k_adj <= n_points / GROUP` (so that `k_adj` groups exist); `BLOCK` query rows at a
    time (`lax.map`), `BLOCK * n_points` distances in memory. `first`, `n_rows` (static): only the points
    `first .. first + n_rows - 1` (clipped at the last point) are counted; default all."""
    n_points = manifold.shape[0]
    n_groups = -(-n_points // GROUP)
    if not 1 <= k_adj <= n_groups:
        raise ValueError(f"k_adj: must be in [1, {n_groups}] (points / {GROUP}), got {k_adj}")
    n_rows = n_points if n_rows is None else n_rows
    layout = _layout(manifold, is_sim, n_groups)
    block = min(BLOCK, n_rows)
    n_blocks = -(-n_rows // block)
    rows = jnp.minimum(first + jnp.arange(n_blocks * block, dtype=jnp.int32), n_points - 1).reshape(n_blocks, block)
    counts = jax.lax.map(lambda r: _block(manifold[r], r, layout, k_adj, n_points), rows)
    return counts.reshape(-1)[:n_rows]
