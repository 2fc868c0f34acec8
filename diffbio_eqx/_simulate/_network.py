"""Ground truth for gene regulatory networks and for communication in space.

- `simulate_grn`: expression from a known TF -> target network, as SERGIO (Dibaeinia & Sinha 2020) and BEELINE's
  synthetic networks define it: each target's production rate is a basal rate plus a sum of Hill functions of its
  regulators, $b + \\sum_j w_j h_j(x_j)$ with $h(x) = x^n / (K^n + x^n)$ (activation) or $K^n / (K^n + x^n)$
  (repression); TF levels come from a few cell states (so TFs are correlated, as in real data); counts are
  Poisson around the rates times a gene scale and a cell's library size.
- `simulate_spatial_communication`: cells of a few types on a plane; each cell's expression is its type's
  profile plus, when `neighbour_effect` is non-zero, an effect of the types of its nearest cells (receiver x
  sender interaction strengths, what an NCEM-style model estimates).
"""

import dataclasses
from typing import Any

import numpy as np

from .._core._validate import check_numbers, check_positive, check_probability, check_whole


@dataclasses.dataclass(frozen=True)
class SimulatedNetwork:
    """A simulated expression matrix and the network that made it.

    - `counts`: `(n_cells, n_genes)` Poisson counts; genes are the TFs first, then the targets.
    - `gene_names`: `TF0..`, then `G0..`; `tf_names`: the TFs.
    - `adjacency`: `(n_tfs, n_genes)` True where TF `i` regulates gene `j` (the truth for AUPRC).
    - `sign`: `(n_tfs, n_genes)` +1 activation, -1 repression, 0 no edge.
    - `states`: `(n_cells,)` the cell state behind each cell's TF levels.
    """

    counts: np.ndarray
    gene_names: np.ndarray
    tf_names: np.ndarray
    adjacency: np.ndarray
    sign: np.ndarray
    states: np.ndarray


def _hill(x: np.ndarray, k: np.ndarray, n: float, repress: np.ndarray) -> np.ndarray:
    act = x**n / (k**n + x**n)
    return np.where(repress, 1 - act, act)


def _check_network(*, n_cells: Any, n_tfs: Any, n_targets: Any, max_regulators: Any, n_states: Any, hill_n: Any,
                   repression_prob: Any, library_size: Any) -> None:
    """Sizes and settings of `simulate_grn` (a network needs a TF and a target; each target draws its regulators
    from the TFs without replacement; a Hill coefficient <= 0 turns activation into repression)."""
    for name, value in (("n_cells", n_cells), ("n_tfs", n_tfs), ("n_targets", n_targets), ("n_states", n_states)):
        check_whole(value, name)
    if not 1 <= check_whole(max_regulators, "max_regulators") <= n_tfs:
        raise ValueError(f"max_regulators: each target draws distinct regulators from the {n_tfs} TFs, so it must "
                         f"be between 1 and n_tfs, got {max_regulators}")
    check_positive(hill_n, "hill_n")
    check_probability(repression_prob, "repression_prob")
    check_positive(library_size, "library_size")


def simulate_grn(
    *, n_cells: int = 1000, n_tfs: int = 20, n_targets: int = 200, max_regulators: int = 3, n_states: int = 6,
    hill_n: float = 2.0, repression_prob: float = 0.3, library_size: float = 2000.0, seed: int = 0,
) -> SimulatedNetwork:
    """Counts from a random TF -> target network with Hill-function regulation (SERGIO's steady state).

    Each target has 1 to `max_regulators` distinct TF regulators, weights `U(1, 3)`, half-saturation `K` the
    TF's median level, Hill coefficient `hill_n`, and repression with probability `repression_prob`. TF levels
    are `state mean x LogNormal(0, 0.5)` over `n_states` states with `LogNormal(0, 1)` means.
    """
    _check_network(n_cells=n_cells, n_tfs=n_tfs, n_targets=n_targets, max_regulators=max_regulators,
                   n_states=n_states, hill_n=hill_n, repression_prob=repression_prob, library_size=library_size)
    rng = np.random.default_rng(seed)
    states = rng.integers(0, n_states, n_cells)
    state_means = np.exp(rng.normal(0.0, 1.0, (n_states, n_tfs)))
    tf_level = state_means[states] * np.exp(rng.normal(0.0, 0.5, (n_cells, n_tfs)))
    n_genes = n_tfs + n_targets
    adjacency = np.zeros((n_tfs, n_genes), dtype=bool)
    sign = np.zeros((n_tfs, n_genes), dtype=np.int8)
    rates = np.zeros((n_cells, n_genes))
    rates[:, :n_tfs] = tf_level
    k = np.median(tf_level, axis=0)
    for target in range(n_tfs, n_genes):
        regulators = rng.choice(n_tfs, rng.integers(1, max_regulators + 1), replace=False)
        repress = rng.random(len(regulators)) < repression_prob
        weights = rng.uniform(1.0, 3.0, len(regulators))
        hills = _hill(tf_level[:, regulators], k[regulators], hill_n, repress)
        rates[:, target] = 0.1 + hills @ weights
        adjacency[regulators, target] = True
        sign[regulators, target] = np.where(repress, -1, 1)
    proportions = rates * np.exp(rng.normal(0.0, 0.5, n_genes))
    proportions = proportions / proportions.sum(axis=1, keepdims=True)
    library = library_size * np.exp(rng.normal(0.0, 0.2, (n_cells, 1)))
    counts = rng.poisson(proportions * library).astype(np.float32)
    names = np.array([f"TF{i}" for i in range(n_tfs)] + [f"G{i}" for i in range(n_targets)])
    return SimulatedNetwork(counts, names, names[:n_tfs], adjacency, sign, states)


@dataclasses.dataclass(frozen=True)
class SimulatedSpatialCommunication:
    """Cells in space whose expression depends on their neighbours' types (or not).

    - `counts`: `(n_cells, n_genes)` Poisson counts; `positions`: `(n_cells, 2)`; `cell_types`: `(n_cells,)`.
    - `interaction`: `(n_types, n_types, n_genes)` the true log-scale effect on a receiver of type `r` (first axis)
      of its neighbourhood being all of sender type `s` (second axis); all zero when `neighbour_effect == 0`.
    - `n_neighbors`: the neighbourhood size used (nearest cells, the cell itself not counted).
    """

    counts: np.ndarray
    positions: np.ndarray
    cell_types: np.ndarray
    interaction: np.ndarray
    n_neighbors: int


def _check_communication(*, n_cells: Any, n_types: Any, n_genes: Any, neighbour_effect: Any, n_neighbors: Any,
                         n_patches: Any) -> None:
    """Sizes and settings of `simulate_spatial_communication` (the neighbourhoods need more cells than neighbours;
    an effect beyond e^20 overflows the Poisson draws)."""
    for name, value in (("n_types", n_types), ("n_genes", n_genes), ("n_patches", n_patches)):
        check_whole(value, name)
    check_whole(n_neighbors, "n_neighbors")
    if check_whole(n_cells, "n_cells") <= n_neighbors:
        raise ValueError(f"n_cells: each cell's {n_neighbors} nearest others need more cells than that, got {n_cells}")
    check_numbers(neighbour_effect, "neighbour_effect", "finite, between -20 and 20 (a log-scale effect)",
                  lambda effect: np.abs(effect) <= 20)


def simulate_spatial_communication(
    *, n_cells: int = 3000, n_types: int = 4, n_genes: int = 30, neighbour_effect: float = 0.6,
    n_neighbors: int = 10, n_patches: int = 40, seed: int = 0,
) -> SimulatedSpatialCommunication:
    """Cell types in patches on the unit square (30 % of cells of a random type, so neighbourhoods vary); each
    cell's log-mean is its type's profile plus $\\sum_s share_s \\cdot interaction[r, s]$ over the
    shares of its `n_neighbors` nearest cells' types, with a sparse `interaction` (20 % of entries
    `+-neighbour_effect`; 0 gives no neighbour effect at all); counts are Poisson."""
    from scipy.spatial import KDTree

    _check_communication(n_cells=n_cells, n_types=n_types, n_genes=n_genes, neighbour_effect=neighbour_effect,
                         n_neighbors=n_neighbors, n_patches=n_patches)
    rng = np.random.default_rng(seed)
    positions = rng.random((n_cells, 2))
    centres, patch_type = rng.random((n_patches, 2)), rng.integers(0, n_types, n_patches)
    nearest = np.argmin(((positions[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    mixed = rng.random(n_cells) < 0.3
    cell_types = np.where(mixed, rng.integers(0, n_types, n_cells), patch_type[nearest])
    profile = rng.normal(1.0, 0.7, (n_types, n_genes))
    active = rng.random((n_types, n_types, n_genes)) < 0.2
    interaction = neighbour_effect * active * rng.choice([-1.0, 1.0], active.shape)
    neighbours = np.asarray(KDTree(positions).query(positions, k=n_neighbors + 1)[1])
    share = np.eye(n_types)[cell_types[neighbours[:, 1:]]].mean(axis=1)
    log_mean = profile[cell_types] + np.einsum("cs,csg->cg", share, interaction[cell_types])
    counts = rng.poisson(np.exp(log_mean)).astype(np.float32)
    return SimulatedSpatialCommunication(counts, positions, cell_types, interaction, n_neighbors)
