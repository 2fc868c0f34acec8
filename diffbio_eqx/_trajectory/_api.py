"""The trajectory operators' public entry points: input checks naming the field, then one jitted call each."""

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._diffmap import _components
from ._fate import FateResult, _fates, _top_pseudotime_groups
from ._graph import as_cell_graph, warn_if_disconnected
from ._transport import OTSettings, TransportMap, transport_map


#: CellRank's default number of cells per terminal state (`n_cells=30` in `set_terminal_states` / `predict`).
TERMINAL_CELLS = 30


def _terminal_labels(terminal_states: Any, n_cells: int) -> tuple[np.ndarray, tuple[str, ...]]:
    if isinstance(terminal_states, Mapping):
        names = tuple(str(name) for name in terminal_states)
        labels = np.full(n_cells, -1, np.int32)
        for k, (name, cells) in enumerate(terminal_states.items()):
            cells = np.asarray(cells).ravel()
            if cells.size == 0:
                raise ValueError(f"terminal_states: state {name!r} has no cells")
            if not np.issubdtype(cells.dtype, np.integer) or cells.min() < 0 or cells.max() >= n_cells:
                raise ValueError(f"terminal_states: state {name!r} lists cells outside [0, {n_cells - 1}]")
            if np.any(labels[cells] >= 0):
                raise ValueError(f"terminal_states: state {name!r} shares cells with another state")
            labels[cells] = k
    else:
        labels = np.asarray(terminal_states)
        if labels.shape != (n_cells,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"terminal_states: expected a mapping name -> cell indices or an integer array of shape "
                             f"({n_cells},) with -1 for transient cells, got shape {labels.shape}")
        states = np.unique(labels[labels >= 0])
        names = tuple(str(s) for s in states)
        labels = np.searchsorted(states, labels).astype(np.int32) * (labels >= 0) - (labels < 0)
    if not np.any(labels >= 0):
        raise ValueError("terminal_states: no terminal cells given")
    if np.all(labels >= 0):
        raise ValueError("terminal_states: every cell is terminal; nothing is left to assign")
    return labels.astype(np.int32), names


def _check_reachable(result: FateResult, components: np.ndarray) -> None:
    probabilities = np.asarray(result.probabilities)
    transient = np.asarray(result.terminal) < 0
    stranded = transient & ~(np.abs(probabilities.sum(axis=1) - 1) < 1e-3)
    if np.any(stranded):
        cells = np.flatnonzero(stranded)
        groups = sorted({int(c) for c in components[cells]})
        raise ValueError(f"terminal_states: {cells.size} cells reach no terminal state (graph components starting at "
                         f"cells {groups[:10]} hold none); add a terminal state there or drop those cells")
    for k, name in enumerate(result.names):
        if not np.any(probabilities[transient, k] > 1e-8):
            raise ValueError(f"terminal_states: state {name!r} is not reachable from any transient cell")


def fate_probabilities(
    graph: object, terminal_states: Any, *, pseudotime: Any = None, scheme: str = "hard", tol: float = 1e-6,
) -> FateResult:
    """CellRank's fate (absorption) probabilities and mean absorption times on a neighbour graph.

    **Arguments:**

    - `graph`: the connectivities (`NeighborGraph`, `FuzzyGraph`, `CellGraph` or SciPy sparse matrix).
    - `terminal_states`: a mapping `name -> cell indices`, or an `(n_cells,)` integer array with each terminal
      cell's state and -1 for the others (see `find_terminal_states` to find them).
    - `pseudotime`: `(n_cells,)`; given, the transitions are CellRank's `PseudotimeKernel` (`scheme` "hard" or
      "soft"), else its `ConnectivityKernel`. (Keyword only argument.)
    - `tol`: the relative tolerance on the preconditioned residual of the GMRES solves (1e-6, CellRank's).

    **Returns:** a `FateResult`. Raises a `ValueError` naming `terminal_states` when a state is not reachable or
    some cells reach none; warns when the graph is disconnected.
    """
    cells = as_cell_graph(graph)
    labels, names = _terminal_labels(terminal_states, cells.n_cells)
    if scheme not in ("hard", "soft"):
        raise ValueError(f"scheme: expected 'hard' or 'soft', got {scheme!r}")
    if pseudotime is not None:
        pseudotime = np.asarray(pseudotime, dtype=float)
        if pseudotime.shape != (cells.n_cells,) or not np.all(np.isfinite(pseudotime)):
            raise ValueError(f"pseudotime: expected {cells.n_cells} finite values, got shape {pseudotime.shape}")
        pseudotime = jnp.asarray(pseudotime, cells.weights.dtype)
    components = np.asarray(_components(cells))
    warn_if_disconnected(components)
    out = _fates(cells, jnp.asarray(labels), pseudotime, scheme, len(names), float(tol))
    result = FateResult(out.probabilities, out.mean_time, out.residual, jnp.asarray(labels), names)
    _check_reachable(result, components)
    return result


def find_terminal_states(
    graph: object, pseudotime: Any, *, n_states: int, fraction: float = 0.1, n_cells: int = TERMINAL_CELLS,
) -> dict[str, np.ndarray]:
    """Terminal states as the ends of the pseudotime: the cells in the top `fraction` of `pseudotime`, split into
    the connected pieces of the graph among them; the `n_states` largest pieces, each kept to its `n_cells` cells of
    highest pseudotime, named `"state_0", ...` in decreasing mean pseudotime. (A simple stand-in for CellRank's
    GPCCA macrostates: it finds tips of a pseudotime, not metastable sets.)"""
    cells = as_cell_graph(graph)
    pseudotime = np.asarray(pseudotime, dtype=float)
    if pseudotime.shape != (cells.n_cells,) or not np.all(np.isfinite(pseudotime)):
        raise ValueError(f"pseudotime: expected {cells.n_cells} finite values, got shape {pseudotime.shape}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    cut = np.quantile(pseudotime, 1 - fraction)
    groups = np.asarray(_top_pseudotime_groups(cells, jnp.asarray(pseudotime, cells.weights.dtype),
                                               jnp.asarray(cut, cells.weights.dtype)))
    roots, sizes = np.unique(groups[groups >= 0], return_counts=True)
    if len(roots) < n_states:
        raise ValueError(f"n_states: only {len(roots)} separate groups among the top {fraction:.0%} of pseudotime, "
                         f"asked for {n_states}; raise fraction or lower n_states")
    chosen = roots[np.argsort(-sizes, kind="stable")[:n_states]]
    members = [np.flatnonzero(groups == root) for root in chosen]
    members = [m[np.argsort(-pseudotime[m], kind="stable")[:n_cells]] for m in members]
    members.sort(key=lambda m: -pseudotime[m].mean())
    return {f"state_{k}": np.sort(m) for k, m in enumerate(members)}


def transport_maps(
    x: Any, time: Any, *, growth_prior: Any = None, settings: OTSettings | None = None, n_pcs: int = 30,
    growth_iters: int = 1, pairs: Sequence[tuple[float, float]] | None = None,
) -> dict[tuple[float, float], TransportMap]:
    """wot's `OTModel.compute_all_transport_maps`: one `TransportMap` per pair of consecutive time points.

    **Arguments:**

    - `x`: `(n_cells, n_genes)` expression (wot reads `adata.X`, typically log-normalised).
    - `time`: `(n_cells,)` each cell's time point (wot's `day`).
    - `growth_prior`: `(n_cells,)` per-unit-time growth rates (wot's `cell_growth_rate`); ones when None.
      (Keyword only argument.)
    - `settings`: `OTSettings()` (wot's defaults) when None; `n_pcs`: wot's `local_pca`; `growth_iters`: wot's.
    - `pairs`: the `(t0, t1)` pairs to compute (e.g. to skip a held-out time point); consecutive ones when None.

    **Returns:** `{(t0, t1): TransportMap}`; cells are in their order within each time point.
    """
    x = np.asarray(x, dtype=float)
    time = np.asarray(time, dtype=float)
    if x.ndim != 2 or time.shape != (x.shape[0],):
        raise ValueError(f"time: expected one value per cell ({x.shape[0] if x.ndim else 0}), got shape {time.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x: contains non-finite values")
    points = np.unique(time[np.isfinite(time)])
    if len(points) < 2:
        raise ValueError(f"time: needs at least two time points to transport between, got {points.tolist()}")
    g = np.ones(x.shape[0]) if growth_prior is None else np.asarray(growth_prior, dtype=float)
    if g.shape != (x.shape[0],) or not np.all(np.isfinite(g) & (g > 0)):
        raise ValueError("growth_prior: expected one positive finite rate per cell")
    if not isinstance(growth_iters, int) or growth_iters < 1:
        raise ValueError(f"growth_iters: must be a positive integer, got {growth_iters!r}")
    pairs = list(zip(points[:-1], points[1:])) if pairs is None else list(pairs)
    for t0, t1 in pairs:
        if t0 not in points or t1 not in points or not t0 < t1:
            raise ValueError(f"pairs: ({t0}, {t1}) must be two time points of `time`, the first earlier")
    settings = OTSettings() if settings is None else settings
    dtype = jnp.zeros(()).dtype
    maps = {}
    for t0, t1 in pairs:
        source, target = time == t0, time == t1
        maps[(float(t0), float(t1))] = transport_map(
            jnp.asarray(x[source], dtype), jnp.asarray(x[target], dtype), jnp.asarray(g[source], dtype),
            jnp.asarray(t1 - t0, dtype), settings, n_pcs=n_pcs, growth_iters=growth_iters)
    for (t0, t1), tmap in maps.items():
        if not bool(np.all(np.asarray(tmap.converged))):
            warnings.warn(f"transport map ({t0}, {t1}): Sinkhorn did not reach its threshold "
                          f"{settings.threshold} within its iterations", RuntimeWarning, stacklevel=2)
    return maps
