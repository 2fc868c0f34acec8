"""The Gaussian mixture as a stage (`GaussianMixture`) and `fit_gaussian_mixture`: initialisation from communities
of the shared neighbour graph (Leiden, which also proposes the number of clusters) or k-means++, several restarts
chosen by log-likelihood, then EM.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._core._metrics import adjusted_rand_index, silhouette_width
from .._core._neighbors import neighbor_graph
from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult
from .._core._validate import check_embedding, check_n_clusters, check_positive, check_whole
from ._communities import connectivity_matrix, igraph_graph, leiden, leiden_with_k
from ._gmm import (
    REG_COVAR,
    MixtureFit,
    MixtureParameters,
    component_log_densities,
    expectation_maximisation,
    hard_labels,
    mixture_log_likelihood,
    mixture_responsibilities,
    parameters_from_labels,
)
from ._kmeans import kmeans_plus_plus, lloyd, nearest_centroid


#: The initialisations `fit_gaussian_mixture` offers.
MIXTURE_INITS = ("graph", "kmeans")


class GaussianMixture(AbstractTrainableStage):
    """Soft cluster assignments from a diagonal Gaussian mixture: $r_{ik} = \\mathrm{softmax}_k((\\log \\pi_k +
    \\log \\mathcal{N}(x_i; \\mu_k, \\sigma^2_k)) / T)$, with per-cluster weights and variances, so clusters of very
    different sizes and spreads are modelled as such (soft k-means assumes equal ones).

    Weights (as logs), means, variances and the temperature are array leaves (differentiable, vmappable,
    trainable); the number of components and dimensions are their shapes. Fit with `fit_gaussian_mixture`.
    """

    log_weights: Float[Array, " n_clusters"]
    means: Float[Array, "n_clusters n_dims"]
    variances: Float[Array, "n_clusters n_dims"]
    temperature: Float[Array, ""]

    def __init__(self, means: Float[ArrayLike, "n_clusters n_dims"], *,
                 variances: ArrayLike | None = None,
                 log_weights: ArrayLike | None = None,
                 temperature: Float[ArrayLike, ""] = 1.0):
        """**Arguments:**

        - `means`: `(n_clusters, n_dims)` component means (their shape fixes the stage's).
        - `variances`: per-component diagonal variances (default ones).
        - `log_weights`: log mixing weights (default uniform).
        - `temperature`: E-step temperature (1 is the posterior; below 1 sharper), must be > 0.
        """
        self.means = jnp.asarray(means)
        n_clusters = self.means.shape[0]
        self.variances = (jnp.ones_like(self.means) if variances is None
                          else jnp.asarray(variances, dtype=self.means.dtype))
        self.log_weights = (jnp.full((n_clusters,), -jnp.log(n_clusters), self.means.dtype) if log_weights is None
                            else jnp.asarray(log_weights, dtype=self.means.dtype))
        self.temperature = jnp.asarray(temperature, dtype=self.means.dtype)

    def __check_init__(self):
        if self.means.ndim != 2 or self.means.shape[0] < 1:
            raise ValueError(f"means: expected shape (n_clusters >= 1, n_dims), got {self.means.shape}")
        if self.variances.shape != self.means.shape:
            raise ValueError(f"variances: expected shape {self.means.shape}, got {self.variances.shape}")
        if self.log_weights.shape != (self.means.shape[0],):
            raise ValueError(f"log_weights: expected shape ({self.means.shape[0]},), got {self.log_weights.shape}")

    @property
    def n_clusters(self) -> int:
        return self.means.shape[0]

    @property
    def parameters(self) -> MixtureParameters:
        return MixtureParameters(self.log_weights, self.means, self.variances)

    def _checked_temperature(self, check: bool = True) -> Float[Array, ""]:
        # `check=False` (static): the caller checked the temperature on the host (the in-program check's host
        # callback keeps a program out of JAX's persistent compilation cache).
        if not check:
            return self.temperature
        return eqx.error_if(self.temperature, self.temperature <= 0, "temperature must be > 0")

    def __call__(
        self, x: Float[Array, "n_cells n_dims"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_clusters"]:
        """Responsibilities of each cell for each component (rows on the simplex). `key`, `inference` ignored."""
        del key, inference
        return self._assign(x)

    def _assign(self, x: Float[Array, "n_cells n_dims"], *, check: bool = True) -> Float[Array, "n_cells n_clusters"]:
        return mixture_responsibilities(x, self.parameters, self._checked_temperature(check))

    def hard_assign(self, x: Float[Array, "n_cells n_dims"]) -> Int[Array, " n_cells"]:
        """Most probable component of each cell."""
        return hard_labels(x, self.parameters)

    def objective(self, x: Float[Array, "n_cells n_dims"]) -> Float[Array, ""]:
        """The mean per-cell negative log-likelihood (lower is better, as the other stages' objectives)."""
        return -mixture_log_likelihood(x, self.parameters)

    def loss(self, batch: tuple[Float[Array, "n_cells n_dims"]], /, *,
             key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """The mean negative log-likelihood of the cells `batch = (x,)` at temperature 1 (deterministic: `key` is
        ignored): what end-to-end fine-tuning pulls on, keeping clusters compact under their own variances."""
        del key
        (x,) = batch
        log_joint = component_log_densities(x, self.parameters)
        nll = -jnp.mean(jax.nn.logsumexp(log_joint, axis=1))
        return nll, {"negative_log_likelihood": nll}


@eqx.filter_jit
def _em(x: Float[Array, "n_cells n_dims"], init: MixtureParameters, temperature: Float[Array, ""], *,
        n_iter: int, tol: float, reg_covar: float) -> MixtureFit:
    return expectation_maximisation(x, init, n_iter=n_iter, tol=tol, temperature=temperature, reg_covar=reg_covar)


@eqx.filter_jit
def _kmeans_labels(x: Float[Array, "n_cells n_dims"], n_clusters: int, key: PRNGKeyArray) -> Int[Array, " n_cells"]:
    return nearest_centroid(x, lloyd(x, kmeans_plus_plus(x, n_clusters, key=key), n_iter=300, tol=1e-4))


#: Leiden resolutions among whose partitions `select_n_clusters` picks one (by silhouette or by stability).
STABILITY_RESOLUTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)
#: The rules `select_n_clusters` offers for the number of clusters.
K_RULES = ("silhouette", "stability")
#: The default rule: the widest mean silhouette (Rousseeuw 1987) among Leiden's partitions. Chosen on measurement
#: (issue 24, `bench_quality.py --rule-sim`, 10 keys a case): on the simulations it ties the most stable
#: resolution (mean ARI 0.436 both; the unbalanced groups 0.991 vs 0.992, the pbmc_vae draws 0.580 both), and on
#: pbmc68k's five job embeddings it scores 0.551 against `bulk_labels` where stability scores 0.520 (its picks
#: split the T cells and dendritic cells into stable but finer parts).
K_RULE = "silhouette"
#: Leiden seeds per resolution whose partitions the silhouette rule compares: Seurat's `FindClusters(n.start = 10)`
#: random starts. Leiden's partition at one resolution moves with its seed and the silhouette tells the seeds
#: apart, so more starts find wider-silhouette partitions (measured, issue 24: 1, 5, 10, 20 starts over 10 draws).
SILHOUETTE_STARTS = 10
#: At most this many cells (drawn at random) score each partition's silhouette (quadratic in the cells).
SILHOUETTE_CELLS = 10_000
#: At most this many cells (drawn at random) build the graph that initialises the mixture (exact kNN is O(n^2)).
MAX_GRAPH_CELLS = 50_000
#: How `stable_resolution` breaks near-ties in stability when k is chosen: the most stable resolution. The finer
#: rule within max(tolerance, one jackknife standard error) was measured and not adopted (issue 24): on simulated
#: groups its best tolerance is 0.15 (`bench_quality.py --tie-sim`, `quality_tie_sim.json`: mean ARI 0.532 vs
#: 0.467), but on pbmc68k it chose 11-14 clusters and dropped the job's median ARI to 0.392
#: (`quality_tie_tol015.json`), so the simulations' groups do not carry over to real cell types here.
STABILITY_TIE_BREAK = "none"
#: The tolerance of the finer rule (`tie_break="finer"`): 0, within one jackknife standard error only.
STABILITY_TOLERANCE = 0.0


def _graph_k(n_cells: int, n_neighbors: int) -> int:
    """The graph's k, capped for tiny data (a kNN graph needs more cells than neighbours)."""
    return max(min(n_neighbors, n_cells - 1), 2)


def graph_communities(x: Float[ArrayLike, "n_cells n_dims"], n_clusters: int | None = None, *,
                      seed: int = 0, n_neighbors: int = 15, resolution: float = 1.0) -> np.ndarray:
    """Leiden communities of the `n_neighbors` graph of `x` (UMAP connectivities, as `scanpy.pp.neighbors` then
    `scanpy.tl.leiden(flavor="igraph", n_iterations=2)`): at `resolution` when `n_clusters` is None, else at the
    resolution that gives `n_clusters` (`leiden_with_k`)."""
    adjacency = connectivity_matrix(neighbor_graph(x, _graph_k(np.shape(x)[0], n_neighbors)).connectivities)
    if n_clusters is None:
        return leiden(adjacency, resolution=resolution, seed=seed)
    return leiden_with_k(adjacency, n_clusters, seed=seed)[0]


def _pairwise_ari(partitions: list[np.ndarray], subsets: list[np.ndarray]) -> np.ndarray:
    """`(n, n)` ARIs of every pair of partitions on the cells they share (NaN diagonal); all NaN when every
    partition is one community (trivially reproducible)."""
    n = len(partitions)
    matrix = np.full((n, n), np.nan)
    if all(partition.max() == 0 for partition in partitions):
        return matrix
    for i in range(n):
        for j in range(i + 1, n):
            _, left, right = np.intersect1d(subsets[i], subsets[j], return_indices=True)
            matrix[i, j] = matrix[j, i] = float(adjusted_rand_index(partitions[i][left], partitions[j][right]))
    return matrix


def _pair_mean(matrix: np.ndarray) -> float:
    """The mean over the pairs (upper triangle) of a pairwise matrix."""
    return float(np.mean(matrix[np.triu_indices(matrix.shape[0], 1)]))


def _jackknife_error(matrix: np.ndarray) -> float:
    """Jackknife standard error of the mean pairwise value (a U-statistic over subsamples): the spread of the
    means left when each subsample and its pairs are dropped, $\\sqrt{\\frac{n-1}{n} \\sum_i (\\theta_{(i)} -
    \\bar\\theta)^2}$."""
    n = matrix.shape[0]
    if n < 3:  # leaving one out leaves no pair
        return 0.0
    total = np.nansum(matrix) / 2.0
    left_out = (total - np.nansum(matrix, axis=1)) / ((n - 1) * (n - 2) / 2.0)
    return float(np.sqrt((n - 1) / n * np.sum((left_out - left_out.mean()) ** 2)))


def _stability_matrices(x: Float[ArrayLike, "n_cells n_dims"], *, seed: int, n_neighbors: int,
                        resolutions: tuple[float, ...], n_subsamples: int,
                        fraction: float) -> dict[float, np.ndarray]:
    """Per resolution, the pairwise ARIs of Leiden's partitions of `n_subsamples` random `fraction` subsamples."""
    n_cells = np.shape(x)[0]
    rng = np.random.default_rng(seed)
    subsets = [np.sort(rng.choice(n_cells, int(fraction * n_cells), replace=False)) for _ in range(n_subsamples)]
    k = _graph_k(subsets[0].size, n_neighbors)
    graphs = [igraph_graph(connectivity_matrix(neighbor_graph(jnp.asarray(x)[subset], k).connectivities))
              for subset in subsets]
    return {resolution: _pairwise_ari(
        [leiden(graph, resolution=resolution, seed=seed + i) for i, graph in enumerate(graphs)], subsets)
        for resolution in resolutions}


def partition_stability(x: Float[ArrayLike, "n_cells n_dims"], *, seed: int = 0, n_neighbors: int = 15,
                        resolutions: tuple[float, ...] = STABILITY_RESOLUTIONS, n_subsamples: int = 6,
                        fraction: float = 0.8) -> dict[float, float]:
    """How reproducible Leiden's partition is at each resolution: the mean pairwise ARI, on the cells they share,
    of the partitions of `n_subsamples` random `fraction` subsamples (each its own graph and Leiden seed).

    Clustering stability (Ben-Hur, Elisseeff & Guyon 2002; Lange et al. 2004): a resolution that splits real
    groups is reproduced across subsamples; one that cuts through a continuum is not. A resolution at which every
    subsample is one community scores NaN (no partition to reproduce).
    """
    matrices = _stability_matrices(x, seed=seed, n_neighbors=n_neighbors, resolutions=resolutions,
                                   n_subsamples=n_subsamples, fraction=fraction)
    return {resolution: _pair_mean(matrix) for resolution, matrix in matrices.items()}


def stable_resolution(matrices: dict[float, np.ndarray], *, tie_break: str = STABILITY_TIE_BREAK,
                      tolerance: float = STABILITY_TOLERANCE, standard_error: bool = True) -> float | None:
    """The resolution `select_n_clusters` uses, from `_stability_matrices`: the most stable one (`tie_break=
    "none"`, the default), or (`"finer"`) the finest resolution whose stability is within one jackknife standard
    error of the most stable one's (the error of their paired difference over the same subsamples) or within
    `tolerance` (ARI), whichever is larger (`standard_error=False`: within `tolerance` alone).

    Why the finer one on a tie: Ben-Hur, Elisseeff & Guyon (2002) take the largest number of clusters before the
    subsample agreement drops away from its high plateau, not the single most stable one, because a coarser
    partition has fewer boundaries whose cells can flip between subsamples and so agrees more without being more
    right; a difference within its own Monte-Carlo error is no drop. `tolerance` states a size for that
    coarseness bias (the standard error alone shrinks with more subsamples; the bias does not); its value is to
    be chosen on simulated data (`bench_quality.py --tie-sim`). Measured (issue 24): on pbmc68k's counts
    redrawn from a VAE, `"finer"` never scored lower (mixture ARI min 0.541 vs 0.475 over 12 draws), but on
    pbmc68k itself it lowered the main job's median ARI against `bulk_labels` (0.497 vs 0.514, seed 2 going to
    k = 11) and did not lift seed 4; the tolerance the simulations choose (0.15) lowered it to 0.392 (k = 11-14).
    So the default stays `"none"` (`STABILITY_TIE_BREAK`); on pbmc68k every rule tried is decided by gaps of
    0.003-0.02 ARI in stability (`quality_tie_rules.json`).
    None when no resolution gives more than one community.
    """
    if tie_break not in ("finer", "none"):
        raise ValueError(f"tie_break: expected 'finer' or 'none', got {tie_break!r}")
    scored = {r: _pair_mean(m) for r, m in matrices.items() if np.isfinite(_pair_mean(m))}
    if not scored:
        return None
    best = max(scored, key=lambda r: scored[r])
    if tie_break == "none":
        return best
    tied = [r for r in scored if scored[best] - scored[r] <= max(
        tolerance, _jackknife_error(matrices[best] - matrices[r]) if standard_error else 0.0)]
    return max(tied)


def silhouette_partition(x: Float[ArrayLike, "n_cells n_dims"], *, seed: int = 0, n_neighbors: int = 15,
                         resolutions: tuple[float, ...] = STABILITY_RESOLUTIONS,
                         n_starts: int = SILHOUETTE_STARTS) -> tuple[np.ndarray | None, dict[float, float]]:
    """Leiden's partition of the `n_neighbors` graph of `x`, among `n_starts` seeds at each resolution, whose mean
    silhouette width in `x` (`silhouette_width`, on at most `SILHOUETTE_CELLS` cells) is the widest.

    The silhouette (Rousseeuw 1987) weighs how close each cell is to its own cluster against the nearest other
    one, so it prefers partitions whose boundaries fall where the cells thin out; cutting a continuous group in
    two lowers it even where the cut is reproducible.

    **Returns:** `(labels or None, the best silhouette at each resolution)`: None (and NaN) when no partition
    has more than one community.
    """
    x = check_embedding(x)
    check_whole(n_starts, "n_starts")
    n_cells = x.shape[0]
    graph = igraph_graph(connectivity_matrix(neighbor_graph(jnp.asarray(x),
                                                            _graph_k(n_cells, n_neighbors)).connectivities))
    scored = np.sort(np.random.default_rng(seed).choice(n_cells, min(n_cells, SILHOUETTE_CELLS), replace=False))
    scored_cells = jnp.asarray(x)[scored]
    best: tuple[float, np.ndarray] | None = None
    widths = {}
    for resolution in resolutions:
        widths[resolution] = float("nan")
        for start in range(n_starts):
            labels = leiden(graph, resolution=resolution, seed=seed + start)
            if not 2 <= np.unique(labels[scored]).size < scored.size:
                continue
            width = silhouette_width(scored_cells, labels[scored])
            widths[resolution] = float(np.nanmax([widths[resolution], width]))
            if best is None or width > best[0]:
                best = (width, labels)
    return (None if best is None else best[1]), widths


def _graph_cells(x: Array, seed: int) -> Array:
    if x.shape[0] <= MAX_GRAPH_CELLS:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(x.shape[0], MAX_GRAPH_CELLS, replace=False))]


def _stable_partition(cells: Array, *, seed: int, n_neighbors: int, n_subsamples: int, tie_break: str,
                      tolerance: float) -> tuple[np.ndarray | None, dict[float, float]]:
    """Leiden's communities of `cells` at the resolution `stable_resolution` picks (None when there is none).

    **Returns:** `(labels or None, stability by resolution)`.
    """
    matrices = _stability_matrices(cells, seed=seed, n_neighbors=n_neighbors, resolutions=STABILITY_RESOLUTIONS,
                                   n_subsamples=n_subsamples, fraction=0.8)
    stability = {resolution: _pair_mean(matrix) for resolution, matrix in matrices.items()}
    resolution = stable_resolution(matrices, tie_break=tie_break, tolerance=tolerance)
    if resolution is None:
        return None, stability
    return graph_communities(cells, seed=seed, n_neighbors=n_neighbors, resolution=resolution), stability


def _chosen_communities(cells: Array, *, seed: int, n_neighbors: int, min_size: int, rule: str = K_RULE,
                        n_subsamples: int = 6, tie_break: str = STABILITY_TIE_BREAK,
                        tolerance: float = STABILITY_TOLERANCE) -> tuple[np.ndarray | None, dict[float, float]]:
    """The partition `rule` chooses (`silhouette_partition`, or `_stable_partition`), its communities under
    `min_size` cells marked -1 and the rest numbered 0.. by size (largest first); None when there is no partition
    to choose.

    **Returns:** `(labels or None, the rule's score by resolution)`.
    """
    if rule not in K_RULES:
        raise ValueError(f"rule: unknown rule for the number of clusters {rule!r}; choose one of {K_RULES}")
    if int(0.8 * cells.shape[0]) < 4:  # too few cells to partition
        return None, {}
    if rule == "silhouette":
        labels, scores = silhouette_partition(cells, seed=seed, n_neighbors=n_neighbors)
    else:
        labels, scores = _stable_partition(cells, seed=seed, n_neighbors=n_neighbors, n_subsamples=n_subsamples,
                                           tie_break=tie_break, tolerance=tolerance)
    if labels is None:
        return None, scores
    sizes = np.bincount(labels)
    kept = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] >= min_size]
    if not kept:
        return None, scores
    remap = np.full(sizes.size, -1)
    remap[kept] = np.arange(len(kept))
    return remap[labels], scores


def select_n_clusters(x: Float[ArrayLike, "n_cells n_dims"], *, seed: int = 0, n_neighbors: int = 15,
                      min_size: int = 10, rule: str = K_RULE, n_subsamples: int = 6,
                      tie_break: str = STABILITY_TIE_BREAK,
                      tolerance: float = STABILITY_TOLERANCE) -> tuple[int, dict[float, float]]:
    """The number of clusters when the user gives none: Leiden's communities with at least `min_size` cells (the
    mixture absorbs smaller ones) in the partition `rule` chooses, on at most `MAX_GRAPH_CELLS` cells:

    - `"silhouette"` (default, `K_RULE`): among `SILHOUETTE_STARTS` Leiden seeds at each resolution of
      `STABILITY_RESOLUTIONS`, the partition with the widest mean silhouette (`silhouette_partition`);
    - `"stability"`: at the resolution `stable_resolution` picks from the reproducibility of `n_subsamples`
      subsamples (`partition_stability`): the most stable, or with `tie_break="finer"` the finest within one
      jackknife standard error of it.

    **Returns:** `(n_clusters, the rule's score by resolution)` (best silhouette, or stability).
    """
    labels, scores = _chosen_communities(_graph_cells(jnp.asarray(x), seed), seed=seed, n_neighbors=n_neighbors,
                                         min_size=min_size, rule=rule, n_subsamples=n_subsamples,
                                         tie_break=tie_break, tolerance=tolerance)
    return (1 if labels is None else int(labels.max()) + 1), scores


#: EM steps from the chosen partition when the data choose the number of clusters (`fit_gaussian_mixture` with
#: `stage=None`). Chosen on simulated data (issue 24; `bench_quality.py --start-sim`), not on pbmc68k's labels.
STABLE_EM_STEPS = 3


def _chosen_start(x: Array, *, seed: int, n_neighbors: int, rule: str) -> MixtureParameters | None:
    """The M-step on the communities `select_n_clusters` counts (the partition that chose k; its communities under
    10 cells left to EM), on at most `MAX_GRAPH_CELLS` cells; None when there is no partition."""
    cells = _graph_cells(x, seed)
    labels, _ = _chosen_communities(cells, seed=seed, n_neighbors=n_neighbors, min_size=10, rule=rule)
    if labels is None:
        return None
    return parameters_from_labels(cells, jnp.asarray(labels), int(labels.max()) + 1, REG_COVAR)


def _initial_parameters(x: Array, n_clusters: int, init: str, key: PRNGKeyArray,
                        n_neighbors: int) -> MixtureParameters:
    """One restart's start: the M-step on graph communities (the `n_clusters` largest; EM reassigns the rest) of
    at most `MAX_GRAPH_CELLS` cells, or on k-means labels; k-means also when the graph finds too few."""
    seed = int(jr.randint(key, (), 0, 2**31 - 1))
    if init == "graph":
        cells = _graph_cells(x, seed)
        labels = graph_communities(cells, n_clusters, seed=seed, n_neighbors=n_neighbors)
        sizes = np.bincount(labels)
        if sizes.size >= n_clusters:
            largest = np.argsort(-sizes, kind="stable")[:n_clusters]
            remap = np.full(sizes.size, -1)
            remap[largest] = np.arange(n_clusters)
            return parameters_from_labels(cells, jnp.asarray(remap[labels]), n_clusters, REG_COVAR)
    return parameters_from_labels(x, _kmeans_labels(x, n_clusters, key), n_clusters, REG_COVAR)


def fit_gaussian_mixture(
    stage: GaussianMixture | None,
    x: Float[ArrayLike, "n_cells n_dims"],
    *,
    key: PRNGKeyArray,
    init: str = "graph",
    n_restarts: int = 3,
    n_iter: int = 100,
    tol: float = 1e-3,
    n_neighbors: int = 15,
    k_rule: str = K_RULE,
) -> FitResult:
    """Fit a `GaussianMixture` to `x`: `n_restarts` initialisations, EM from each, the best log-likelihood kept.

    **Arguments:**

    - `stage`: its `(n_clusters, n_dims)` means fix the shape and its temperature the E-step's (values unused);
      None lets the data choose the number of clusters (`select_n_clusters`: Leiden's communities in the
      partition `k_rule` chooses) at temperature 1, and then the fit starts from those communities themselves
      (the M-step on them: the partition that chose k) and runs at most `STABLE_EM_STEPS` (3) EM steps from it,
      with no restarts (`init` and `n_restarts` apply when k is given). Why few steps: the diagonal Gaussians
      are a misspecified model of cell types in a VAE latent, so EM to convergence trades the chosen partition
      for a likelier but different one (issue 24, `bench_quality.py --start-sim`).
    - `x`: `(n_cells, n_dims)` cells (e.g. corrected embeddings).
    - `key`: PRNG key (restart seeds). (Keyword only argument.)
    - `init`: `"graph"` (default: Leiden communities of the `n_neighbors` graph at the resolution giving
      `n_clusters`, a different Leiden seed per restart) or `"kmeans"` (k-means++ then Lloyd, scikit-learn's).
    - `n_restarts`, `n_iter`, `tol`: restarts (scikit-learn's `n_init`), EM steps and the log-likelihood gain
      below which EM stops (scikit-learn's `max_iter` 100, `tol` 1e-3).
    - `n_neighbors`: the graph's k (scanpy's 15).
    - `k_rule`: how k is chosen when `stage` is None: `"silhouette"` (default) or `"stability"`
      (`select_n_clusters`).

    **Returns:** a `FitResult`: `model` the fitted stage; `train_loss` the best restart's negative mean
    log-likelihood per EM step; `train_aux` every restart's (`"restart_<i>"`); `n_epochs_run` its EM steps;
    `stopped_early` whether EM converged.
    """
    if init not in MIXTURE_INITS:
        raise ValueError(f"init: unknown initialisation {init!r}; choose one of {MIXTURE_INITS}")
    if k_rule not in K_RULES:
        raise ValueError(f"k_rule: unknown rule for the number of clusters {k_rule!r}; choose one of {K_RULES}")
    check_whole(n_restarts, "n_restarts")
    check_whole(n_iter, "n_iter")
    if stage is not None:
        check_positive(stage.temperature, "temperature")
    x = jnp.asarray(check_embedding(x, n_dims=None if stage is None else stage.means.shape[1]))
    if init == "graph" and x.shape[0] < 3:
        raise ValueError(f"init: the graph initialisation needs a kNN graph, so at least 3 cells, got {x.shape[0]}; "
                         "use init='kmeans'")
    chosen = None
    if stage is None:
        chosen = _chosen_start(x, seed=int(jr.randint(key, (), 0, 2**31 - 1)), n_neighbors=n_neighbors, rule=k_rule)
        n_clusters = 1 if chosen is None else chosen.means.shape[0]
        stage = GaussianMixture(jnp.zeros((n_clusters, x.shape[1]), x.dtype))
    check_n_clusters(x.shape[0], stage.n_clusters)
    temperature = jnp.asarray(stage.temperature, x.dtype)
    if chosen is not None:  # one start, the chosen partition, and a few EM steps from it
        n_iter = min(n_iter, STABLE_EM_STEPS)
        fits = [_em(x, chosen, temperature, n_iter=n_iter, tol=tol, reg_covar=REG_COVAR)]
    else:
        fits = [_em(x, _initial_parameters(x, stage.n_clusters, init, restart_key, n_neighbors), temperature,
                    n_iter=n_iter, tol=tol, reg_covar=REG_COVAR) for restart_key in jr.split(key, n_restarts)]
    best = fits[int(np.argmax([float(fit.log_likelihood[-1]) for fit in fits]))]
    params = best.params
    return FitResult(
        model=GaussianMixture(params.means, variances=params.variances, log_weights=params.log_weights,
                              temperature=temperature),
        train_loss=-best.log_likelihood,
        validation_loss=jnp.full((n_iter,), jnp.nan, x.dtype),
        train_aux={f"restart_{i}": -fit.log_likelihood for i, fit in enumerate(fits)},
        n_epochs_run=int(best.n_steps),
        best_epoch=max(int(best.n_steps) - 1, 0),
        stopped_early=bool(best.converged),
    )
