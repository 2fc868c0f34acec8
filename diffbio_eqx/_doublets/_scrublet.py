"""Scrublet's numerical core in JAX (Wolock, Lopez & Klein 2019; as `scanpy.pp.scrublet` runs it).

Given observed cells and simulated doublets, both normalised to 1e6 over the highly variable genes:

1. z-score every gene with the observed cells' mean and unbiased standard deviation (scanpy's `pipeline.zscore`);
2. PCA with `n_prin_comps` components fitted on the observed cells (centred by their mean) and applied to both
   (scanpy's `pipeline.pca`; here through the eigenvectors of the `(n_genes, n_genes)` covariance). From raw
   counts (`scrublet_manifold`), a simulated doublet's coordinates are its parents' weighted by their shares of
   its total (`doublet_manifold`): exactly what normalising, z-scoring and projecting its counts gives;
3. the nearest neighbours of every observed and simulated cell in their union, with
   `k_adj = round(k * (1 + n_sim / n_obs))` (exact, blocked, counting instead of a top-k over each row:
   `hard_neighbor_counts`, `_counts`; from
   `_ivf.SCRUBLET_IVF_MIN_POINTS` points the inverted-file search of `_ivf` instead, outside this jit; scanpy
   uses exact search below 8192 points and pynndescent above). The count runs over the `k_adj - 1`
   nearest *other* points (the point itself left out) with $n = k_{adj}$ in the score. That is what
   `scanpy.pp.scrublet` computes: its kNN list has `k_adj` columns of which the first is the point itself
   only when no row of the graph begins with its own index, and simulated doublets come in mirrored pairs
   (i, j), (j, i) that are exact duplicates, so in practice the list is `k_adj - 1` other points (as with
   `use_approx_neighbors=True`, where scanpy drops the first column). The original Scrublet counts `k_adj`
   other points;
4. Scrublet's Bayesian score from the number $n_d$ of simulated neighbours among the $n = k_{adj}$: with
   $q = (n_d + 1) / (n + 2)$, $r = n_{sim} / n_{obs}$ and $\\rho$ the expected doublet rate,
   $$L = \\frac{q \\rho / r}{1 - \\rho - q (1 - \\rho - \\rho / r)},$$
   and its standard error from $\\mathrm{se}_q = \\sqrt{q (1 - q) / (n + 3)}$ and `stdev_doublet_rate`.

`soft_doublet_scores` is the differentiable variant: each candidate neighbour counts with weight
$\\sigma((R_i - d_{ij}) / T)$, $R_i$ halfway between the $k_{adj}$-th and the next distance, so the counts (and
the score) are smooth in the coordinates, the temperature and per-point doublet weights, and equal the hard ones
as $T \\to 0$.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._core._neighbors import _blocked_knn
from .._core._stage import AbstractStage
from .._core._threads import host_threads, map_in_threads
from .._core._validate import check_finite, check_nonnegative, checked_by
from ._counts import GROUP, threshold_neighbor_counts


def adjusted_neighbors(n_neighbors: int, n_obs: int, n_sim: int) -> int:
    """Scrublet's `k_adj = round(k * (1 + n_sim / n_obs))`: neighbours in the union of observed and simulated."""
    return round(n_neighbors * (1 + n_sim / float(n_obs)))


def default_neighbors(n_obs: int) -> int:
    """scanpy's default `n_neighbors = round(0.5 * sqrt(n_obs))`."""
    return round(0.5 * float(n_obs) ** 0.5)


def bayesian_doublet_score(
    n_sim_neighbors: Float[Array, " n_points"],
    n_neighbors: Float[ArrayLike, ""] | Float[Array, " n_points"],
    sim_ratio: Float[ArrayLike, ""],
    expected_doublet_rate: Float[ArrayLike, ""],
    stdev_doublet_rate: Float[ArrayLike, ""],
) -> tuple[Float[Array, " n_points"], Float[Array, " n_points"]]:
    """Scrublet's doublet score $L$ and its standard error (module docstring, step 4; `_nearest_neighbor_classifier`).

    **Arguments:** `n_sim_neighbors` ($n_d$, may be fractional), `n_neighbors` ($n$), `sim_ratio` ($r$),
    `expected_doublet_rate` ($\\rho$), `stdev_doublet_rate`.

    **Returns:** `(score, standard_error)`.
    """
    rho, r, n = expected_doublet_rate, sim_ratio, n_neighbors
    q = (n_sim_neighbors + 1) / (n + 2)
    denominator = 1 - rho - q * (1 - rho - rho / r)
    score = q * rho / r / denominator
    se_q = jnp.sqrt(q * (1 - q) / (n + 3))
    error = q * rho / r / denominator**2 * jnp.sqrt((se_q / q * (1 - rho)) ** 2
                                                     + (stdev_doublet_rate / rho * (1 - q)) ** 2)
    return score, error


def zscore_pca(
    obs: Float[Array, "n_obs n_genes"], sim: Float[Array, "n_sim n_genes"], n_prin_comps: int
) -> tuple[Float[Array, "n_obs n_pcs"], Float[Array, "n_sim n_pcs"]]:
    """Steps 1-2: z-score with the observed cells' gene statistics, then PCA fitted on the observed cells.

    Genes with zero variance among the observed cells are scaled by 1 instead of dividing by zero.
    """
    fit = _zscore_pca_fit(obs, n_prin_comps)
    return _project(obs, *fit), _project(sim, *fit)


def _zscore_pca_fit(obs: Float[Array, "n_obs n_genes"], n_prin_comps: int) -> tuple[
        Float[Array, "1 n_genes"], Float[Array, "1 n_genes"], Float[Array, "1 n_genes"], Float[Array, "n_genes n_pcs"]]:
    """The observed cells' gene means and standard deviations, the z-scores' mean and the top components."""
    n_obs = obs.shape[0]
    mean = jnp.mean(obs, axis=0, keepdims=True)
    std = jnp.sqrt(jnp.sum((obs - mean) ** 2, axis=0, keepdims=True) / (n_obs - 1))
    std = jnp.where(std > 0, std, 1.0)
    z_obs = (obs - mean) / std
    center = jnp.mean(z_obs, axis=0, keepdims=True)
    centred = z_obs - center
    covariance = centred.T @ centred / (n_obs - 1)
    _, vectors = jnp.linalg.eigh(covariance)
    return mean, std, center, vectors[:, ::-1][:, :n_prin_comps]


def _project(x: Float[Array, "n_cells n_genes"], mean: Float[Array, "1 n_genes"], std: Float[Array, "1 n_genes"],
             center: Float[Array, "1 n_genes"], components: Float[Array, "n_genes n_pcs"]
             ) -> Float[Array, "n_cells n_pcs"]:
    return ((x - mean) / std - center) @ components


def parent_shares(raw: Float[Array, "n_obs n_genes"], parents: Int[Array, "n_sim 2"]) -> Float[Array, "n_sim 2"]:
    """Each simulated doublet's parents' shares of its total count, $w_a = L_a / (L_a + L_b)$ (one half each where
    both totals are 0: any shares summing to 1 give the same doublet, see `doublet_manifold`)."""
    totals = jnp.sum(raw, axis=1)[parents]
    pair = jnp.sum(totals, axis=1, keepdims=True)
    return jnp.where(pair > 0, totals / jnp.where(pair > 0, pair, 1.0), 0.5)


def doublet_manifold(manifold_obs: Float[Array, "n_obs n_pcs"], parents: Int[Array, "n_sim 2"],
                     shares: Float[Array, "n_sim 2"]) -> Float[Array, "n_sim n_pcs"]:
    """The simulated doublets' PCA coordinates from their parents', without the doublets' counts:
    $w_a \\, \\mathrm{pc}_a + w_b \\, \\mathrm{pc}_b$ with `shares` $w$ (`parent_shares`).

    Exact, not an approximation, for scanpy's defaults: a doublet's counts are its parents' summed
    (`synthetic_doublet_umi_subsampling=1`), over the same genes, and `normalize_total(target_sum=1e6)` by its own
    total $L_a + L_b$ makes it $w_a n_a + w_b n_b$ of the parents' normalised rows $n$; no log
    (`log_transform=False`), and the z-scoring (`mean_center`, `normalize_variance`, no clipping) and the PCA
    fitted on the observed cells are affine maps, which keep a combination whose weights sum to 1. Only rounding
    differs from projecting the doublets' counts; a mirrored pair (a, b), (b, a) stays bitwise identical, and a
    cell paired with itself lands exactly on the cell.
    """
    # the lower index first, so that a mirrored pair rounds alike (a fused multiply-add is not commutative)
    first = parents[:, :1] <= parents[:, 1:]
    lo, hi = jnp.where(first, parents, parents[:, ::-1]).T
    w_lo, w_hi = jnp.where(first, shares, shares[:, ::-1]).T
    return w_lo[:, None] * manifold_obs[lo] + w_hi[:, None] * manifold_obs[hi]


#: Exact kNN: below `KNN_GROUP * 2 * k_adj` points, one top-k over each whole row; from there the counting search
#: of `_counts` (groups of `_counts.GROUP` points).
KNN_GROUP = GROUP


def hard_neighbor_counts(
    manifold: Float[Array, "n_points n_pcs"], is_sim: Bool[Array, " n_points"], k_adj: int
) -> Float[Array, " n_points"]:
    """Step 3: how many of each point's `k_adj - 1` nearest other points are simulated doublets, exactly (ties in
    index order), blocked: never an `n x n` matrix. Small sets: one top-k per row; larger ones: the group minima
    and counting search of `_counts.threshold_neighbor_counts`, which needs no top-k over whole rows."""
    n_points = manifold.shape[0]
    if k_adj * KNN_GROUP * 2 > n_points:  # too few points for groups to pay: one top-k over the whole row
        indices, _ = _blocked_knn(manifold, manifold, k_adj, None, self_first=True)
        return jnp.sum(is_sim[indices[:, 1:]], axis=1).astype(manifold.dtype)
    return threshold_neighbor_counts(manifold, is_sim, k_adj).astype(manifold.dtype)


def threaded_hard_neighbor_counts(
    manifold: Float[Array, "n_points n_pcs"], is_sim: Bool[Array, " n_points"], k_adj: int
) -> Float[Array, " n_points"]:
    """`hard_neighbor_counts` of concrete points (outside jit), the counting search's query rows in
    `host_threads()` equal parts from host threads: its top-k and counting loops run on one core per program."""
    n_points = manifold.shape[0]
    n_parts = host_threads()
    if k_adj * KNN_GROUP * 2 > n_points or n_parts == 1:
        return _hard_neighbor_counts(manifold, is_sim, k_adj)
    n_rows = -(-n_points // n_parts)
    parts = map_in_threads(lambda i: _counts_part(manifold, is_sim, k_adj, jnp.asarray(i * n_rows, jnp.int32),
                                                  n_rows), range(n_parts))
    return jnp.concatenate(parts)[:n_points].astype(manifold.dtype)


_hard_neighbor_counts = jax.jit(hard_neighbor_counts, static_argnames="k_adj")
_counts_part = jax.jit(threshold_neighbor_counts, static_argnames=("k_adj", "n_rows"))


def soft_neighbor_counts(
    manifold: Float[Array, "n_points n_pcs"],
    doublet_weight: Float[Array, " n_points"],
    temperature: Float[ArrayLike, ""],
    k_adj: int,
    n_candidates: int,
) -> tuple[Float[Array, " n_points"], Float[Array, " n_points"]]:
    """Soft neighbour counts: `(sum_j w_ij * doublet_weight_j, 1 + sum_j w_ij)` over each point's
    `n_candidates - 1` nearest other points, $w_{ij} = \\sigma((R_i - d_{ij}) / T)$ with $R_i$ halfway between
    the `(k_adj - 1)`-th and `k_adj`-th of their distances (the `1 +` is the point itself, as $n = k_{adj}$ in
    the hard score). The candidates are chosen without gradient; their distances are recomputed from
    `manifold`, so gradients reach the coordinates, `temperature` and `doublet_weight`.
    """
    indices, _ = _blocked_knn(jax.lax.stop_gradient(manifold), jax.lax.stop_gradient(manifold), n_candidates,
                              None, self_first=True)
    indices = indices[:, 1:]
    differences = manifold[:, None, :] - manifold[indices]
    distances = jnp.sqrt(jnp.sum(differences * differences, axis=-1) + 1e-12)
    radius = (distances[:, k_adj - 2:k_adj - 1] + distances[:, k_adj - 1:k_adj]) / 2
    weights = jax.nn.sigmoid((radius - distances) / temperature)
    return jnp.sum(weights * doublet_weight[indices], axis=1), 1 + jnp.sum(weights, axis=1)


class ScrubletScores(eqx.Module):
    """Scrublet's scores: `scores_obs`, `errors_obs` `(n_obs,)`, `scores_sim`, `errors_sim` `(n_sim,)`, the
    PCA coordinates `manifold_obs`, `manifold_sim`, and `n_neighbors_adjusted` (`k_adj`)."""

    scores_obs: Float[Array, " n_obs"]
    errors_obs: Float[Array, " n_obs"]
    scores_sim: Float[Array, " n_sim"]
    errors_sim: Float[Array, " n_sim"]
    manifold_obs: Float[Array, "n_obs n_pcs"]
    manifold_sim: Float[Array, "n_sim n_pcs"]
    n_neighbors_adjusted: int = eqx.field(static=True)


class Scrublet(AbstractStage):
    """Scrublet's doublet scores of observed cells against simulated doublets (module docstring, steps 1-4).

    `temperature = 0` gives Scrublet's hard neighbour counts; a positive temperature the soft, differentiable
    counts of `soft_neighbor_counts` (over `2 * k_adj` candidates), equal to the hard ones as it goes to 0.
    """

    expected_doublet_rate: Float[Array, ""]
    stdev_doublet_rate: Float[Array, ""]
    temperature: Float[Array, ""]
    n_neighbors: int = eqx.field(static=True)
    n_prin_comps: int = eqx.field(static=True)

    def __init__(self, n_neighbors: int, *, n_prin_comps: int = 30,
                 expected_doublet_rate: Float[ArrayLike, ""] = 0.05, stdev_doublet_rate: Float[ArrayLike, ""] = 0.02,
                 temperature: Float[ArrayLike, ""] = 0.0):
        """**Arguments:** `n_neighbors` ($k$ before Scrublet's adjustment), `n_prin_comps` (30),
        `expected_doublet_rate` (0.05), `stdev_doublet_rate` (0.02), `temperature` (0: hard counts)."""
        self.n_neighbors, self.n_prin_comps = int(n_neighbors), int(n_prin_comps)
        self.expected_doublet_rate = jnp.asarray(expected_doublet_rate, dtype=float)
        self.stdev_doublet_rate = jnp.asarray(stdev_doublet_rate, dtype=float)
        self.temperature = jnp.asarray(temperature, dtype=float)

    def __check_init__(self) -> None:
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors: must be >= 1, got {self.n_neighbors}")
        if self.n_prin_comps < 1:
            raise ValueError(f"n_prin_comps: must be >= 1, got {self.n_prin_comps}")

    def __call__(self, obs: Float[Array, "n_obs n_genes"], sim: Float[Array, "n_sim n_genes"], *,
                 key: PRNGKeyArray | None = None, inference: bool = False) -> ScrubletScores:
        """Score `obs` `(n_obs, n_genes)` against `sim` `(n_sim, n_genes)`, both normalised to 1e6 per cell."""
        del key, inference
        _check_cells({"obs": obs, "sim": sim})
        manifold_obs, manifold_sim = zscore_pca(obs, sim, min(self.n_prin_comps, obs.shape[1]))
        return self.from_manifold(manifold_obs, manifold_sim)

    def from_manifold(self, manifold_obs: Float[Array, "n_obs n_pcs"], manifold_sim: Float[Array, "n_sim n_pcs"]
                      ) -> ScrubletScores:
        """Steps 3-4 alone: the neighbour counts and the scores from the PCA coordinates."""
        for name, manifold in (("manifold_obs", manifold_obs), ("manifold_sim", manifold_sim)):
            check_finite(manifold, name)  # a NaN point's distances are NaN: its neighbour counts are arbitrary
        n_obs, n_sim = manifold_obs.shape[0], manifold_sim.shape[0]
        k_adj = adjusted_neighbors(self.n_neighbors, n_obs, n_sim)
        manifold = jnp.concatenate([manifold_obs, manifold_sim])
        is_sim = jnp.arange(n_obs + n_sim) >= n_obs
        temperature = self.temperature.astype(manifold.dtype)
        n_candidates = min(2 * k_adj, n_obs + n_sim)
        weight = is_sim.astype(manifold.dtype)

        def hard(m: Array) -> tuple[Array, Array]:
            return hard_neighbor_counts(m, is_sim, k_adj), jnp.full((n_obs + n_sim,), float(k_adj), m.dtype)

        def soft(m: Array) -> tuple[Array, Array]:
            return soft_neighbor_counts(m, weight, jnp.maximum(temperature, 1e-30), k_adj, n_candidates)

        if n_candidates > k_adj >= 2:
            n_d, n = jax.lax.cond(temperature > 0, soft, hard, manifold)
        else:
            n_d, n = hard(manifold)
        return self.from_neighbor_counts(n_d, n, manifold_obs, manifold_sim)

    def from_neighbor_counts(self, n_sim_neighbors: Float[Array, " n_points"],
                             n_neighbors: Float[Array, " n_points"], manifold_obs: Float[Array, "n_obs n_pcs"],
                             manifold_sim: Float[Array, "n_sim n_pcs"]) -> ScrubletScores:
        """Step 4 alone: the scores from each point's simulated-neighbour count $n_d$ and $n$ (observed points
        first, then simulated), however the neighbours were found (`__call__`, or the IVF search of `_ivf`)."""
        n_obs, n_sim = manifold_obs.shape[0], manifold_sim.shape[0]
        rho = eqx.error_if(self.expected_doublet_rate, (self.expected_doublet_rate <= 0)
                           | (self.expected_doublet_rate >= 1), "expected_doublet_rate: must be in (0, 1)")
        rho, stdev = (v.astype(manifold_obs.dtype) for v in (rho, self.stdev_doublet_rate))
        score, error = bayesian_doublet_score(n_sim_neighbors, n_neighbors, n_sim / n_obs, rho, stdev)
        return ScrubletScores(score[:n_obs], error[:n_obs], score[n_obs:], error[n_obs:], manifold_obs,
                              manifold_sim, adjusted_neighbors(self.n_neighbors, n_obs, n_sim))


def _check_cells(arguments: dict[str, Any]) -> None:
    """The observed cells and simulated doublets, normalised counts: a NaN or negative value runs through the PCA
    to NaN coordinates and finite but meaningless scores. Concrete arrays only (a traced one is the caller's)."""
    for name in ("obs", "sim"):
        check_nonnegative(arguments[name], name)


@checked_by(_check_cells)
@eqx.filter_jit
def scrublet_scores(scrublet: Scrublet, obs: Float[Array, "n_obs n_genes"], sim: Float[Array, "n_sim n_genes"]
                    ) -> ScrubletScores:
    """`scrublet(obs, sim)` under one `eqx.filter_jit` (the public entry point of the numerical core)."""
    return scrublet(obs, sim)



@eqx.filter_jit
def scrublet_from_counts(scrublet: Scrublet, raw: Float[Array, "n_obs n_genes"], parents: Int[Array, "n_sim 2"]
                         ) -> ScrubletScores:
    """Scrublet from the observed cells' raw counts over the kept genes, in one jit: `scrublet_manifold`, then
    steps 3-4 (`Scrublet.from_manifold`)."""
    return scrublet.from_manifold(*scrublet_manifold(scrublet, raw, parents))


@eqx.filter_jit
def scrublet_manifold(scrublet: Scrublet, raw: Float[Array, "n_obs n_genes"], parents: Int[Array, "n_sim 2"]
                      ) -> tuple[Float[Array, "n_obs n_pcs"], Float[Array, "n_sim n_pcs"]]:
    """Steps 1-2 from raw counts: the PCA coordinates of the observed cells (`normalize_total(target_sum=1e6)`,
    z-scores, PCA) and of the simulated doublets (each the sum of its two `parents`' rows), the latter from their
    parents' coordinates (`doublet_manifold`: what normalising and projecting their counts gives, without the
    `(n_sim, n_genes)` matrix); for a kNN search outside this jit (`_ivf`)."""
    obs = normalize_total(raw)
    manifold_obs = _project(obs, *_zscore_pca_fit(obs, min(scrublet.n_prin_comps, raw.shape[1])))
    return manifold_obs, doublet_manifold(manifold_obs, parents, parent_shares(raw, parents))


@eqx.filter_jit
def scrublet_from_neighbor_counts(scrublet: Scrublet, n_sim_neighbors: Float[Array, " n_points"],
                                  manifold_obs: Float[Array, "n_obs n_pcs"], manifold_sim: Float[Array, "n_sim n_pcs"]
                                  ) -> ScrubletScores:
    """Step 4 from hard counts over the `k_adj - 1` nearest others (`n = k_adj`), under one jit."""
    k_adj = adjusted_neighbors(scrublet.n_neighbors, manifold_obs.shape[0], manifold_sim.shape[0])
    n = jnp.full(n_sim_neighbors.shape, float(k_adj), n_sim_neighbors.dtype)
    return scrublet.from_neighbor_counts(n_sim_neighbors, n, manifold_obs, manifold_sim)


def normalize_total(counts: Float[Array, "n_cells n_genes"], target: float = 1e6) -> Float[Array, "n_cells n_genes"]:
    """Each row scaled to sum to `target` (scanpy's `normalize_total`; a row of zeros stays zero)."""
    totals = jnp.sum(counts, axis=1, keepdims=True)
    return counts * (target / jnp.where(totals > 0, totals, 1.0))
