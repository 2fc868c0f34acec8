"""Diffusion maps and diffusion pseudotime (DPT), faithful to scanpy 1.x (`scanpy/tools/_dpt.py` and
`scanpy/neighbors/__init__.py`: `compute_transitions`, `compute_eigen`, `_get_dpt_row`, `_set_pseudotime`).

The kernel is the neighbour graph's connectivities `K` (scanpy's `obsp["connectivities"]`, UMAP's fuzzy union by
default). Density normalisation (Coifman & Lafon) gives $K' = D^{-1} K D^{-1}$ with $D = \\mathrm{diag}(K 1)$,
and the symmetric transition matrix is $T_s = Z^{-1} K' Z^{-1}$ with $Z = \\mathrm{diag}(\\sqrt{K' 1})$. The
diffusion map is the top `n_comps` eigenpairs $(\\lambda_k, \\psi_k)$ of $T_s$ (scanpy stores the eigenvectors of
$T_s$ themselves as `obsm["X_diffmap"]`, not the right eigenvectors of $T$). The DPT distance from the root $r$ is

$$d(r, i)^2 = \\sum_{k: \\lambda_k < 0.9994} \\Big(\\frac{\\lambda_k}{1 - \\lambda_k}\\Big)^2
(\\psi_{rk} - \\psi_{ik})^2
+ \\sum_{k: \\lambda_k \\geq 0.9994} (\\psi_{rk} - \\psi_{ik})^2,$$

the geometric series $\\sum_{t \\geq 1} \\lambda^t$ over the non-stationary components; the (near-)stationary ones
cannot be summed and enter unweighted, exactly as scanpy does. Cells outside the root's connected component get
`inf`; pseudotime is the distance divided by its largest finite value.

The eigenproblem is solved with LOBPCG (`jax.experimental.sparse.linalg.lobpcg_standard`) on the sparse operator
(a `segment_sum` matvec, memory `O(n_edges + n_cells * n_comps)`); only tiny graphs (`5 * n_comps >= n_cells`,
where LOBPCG is not defined) use a dense `eigh`. scanpy uses ARPACK (`eigsh`, "LM"): the top eigenvalues of
$T_s$ are the ones of largest magnitude unless the graph is nearly bipartite, which a kNN graph is not.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.experimental.sparse.linalg import lobpcg_standard
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._graph import CellGraph, as_cell_graph, connected_components, matvec, row_sums, warn_if_disconnected


#: scanpy's cut between the (near-)stationary components and the others (`_get_dpt_row`, float32 precision).
STATIONARY_THRESHOLD = 0.9994


def diffusion_operator(graph: CellGraph, *, density_normalize: bool = True) -> CellGraph:
    """scanpy's `transitions_sym`: $Z^{-1} D^{-1} K D^{-1} Z^{-1}$ on the same edges as `graph` (the kernel `K`)."""
    w = graph.weights
    if density_normalize:
        density = row_sums(graph)  # K is symmetric: row sums are scanpy's column sums
        w = w / (density[graph.heads] * density[graph.tails])
    z = jnp.sqrt(jax.ops.segment_sum(w, graph.heads, num_segments=graph.n_cells))
    return CellGraph(graph.heads, graph.tails, w / (z[graph.heads] * z[graph.tails]), graph.n_cells)


class DiffusionMap(eqx.Module):
    """The top eigenpairs of the symmetric transition matrix, eigenvalues decreasing.

    - `eigenvalues`: `(n_comps,)`; scanpy's `uns["diffmap_evals"]`.
    - `eigenvectors`: `(n_cells, n_comps)`; scanpy's `obsm["X_diffmap"]` (each column's sign fixed so that its
      entries sum to a non-negative number; scanpy leaves ARPACK's arbitrary signs).
    - `n_iter`: LOBPCG iterations (0 for the dense solve).
    """

    eigenvalues: Float[Array, " n_comps"]
    eigenvectors: Float[Array, "n_cells n_comps"]
    n_iter: Int[Array, ""]


def _dense_operator(operator: CellGraph) -> Float[Array, "n_cells n_cells"]:
    n = operator.n_cells
    return jnp.zeros((n, n), operator.weights.dtype).at[operator.heads, operator.tails].add(operator.weights)


def diffusion_map(
    graph: CellGraph, *, n_comps: int = 15, density_normalize: bool = True, max_iter: int = 500,
    key: PRNGKeyArray,
) -> DiffusionMap:
    """The diffusion map of a symmetric kernel graph (pure; see the module docstring).

    **Arguments:**

    - `graph`: the kernel `K` (symmetric non-negative weights), e.g. the UMAP connectivities.
    - `n_comps`: number of eigenpairs (static; scanpy's `tl.diffmap` default 15, at most `n_cells - 1`).
      (Keyword only argument.)
    - `density_normalize`: scanpy's Coifman-Lafon density normalisation (default True, as scanpy).
    - `max_iter`: LOBPCG's iteration cap (static).
    - `key`: draws LOBPCG's random start block (scanpy draws ARPACK's start vector with `random_state=0`).

    **Returns:** a `DiffusionMap`.
    """
    operator = diffusion_operator(graph, density_normalize=density_normalize)
    n = operator.n_cells
    if 5 * n_comps < n:
        start = jr.normal(key, (n, n_comps), operator.weights.dtype)
        # LOBPCG stops when every residual is below tol * 10 * n * (|lambda| + |Av|); 1e-9 (or the float epsilon
        # when coarser) keeps the DPT distances within ~1e-5 of ARPACK's at a third of the iterations of eps
        tol = max(1e-9, float(jnp.finfo(operator.weights.dtype).eps))
        values, vectors, n_iter = lobpcg_standard(lambda v: matvec(operator, v), start, m=max_iter, tol=tol)
    else:  # LOBPCG needs 5 * k < n: tiny graphs only
        values, vectors = jnp.linalg.eigh(_dense_operator(operator))
        values, vectors = values[::-1][:n_comps], vectors[:, ::-1][:, :n_comps]
        n_iter = jnp.asarray(0)
    order = jnp.argsort(-values)
    values, vectors = values[order], vectors[:, order]
    signs = jnp.where(jnp.sum(vectors, axis=0) < 0, -1.0, 1.0).astype(vectors.dtype)
    return DiffusionMap(values, vectors * signs[None, :], jnp.asarray(n_iter))


def dpt_distances(
    eigenvalues: Float[Array, " n_dcs"], eigenvectors: Float[Array, "n_cells n_dcs"], root: Int[ArrayLike, ""],
    components: Int[Array, " n_cells"] | None = None,
) -> Float[Array, " n_cells"]:
    """scanpy's DPT distance of every cell from `root` (`_get_dpt_row`; see the module docstring); `inf` for cells
    whose `components` label differs from the root's."""
    weight = jnp.where(eigenvalues < STATIONARY_THRESHOLD, eigenvalues / (1 - eigenvalues), 1)
    difference = (eigenvectors[root][None, :] - eigenvectors) * weight[None, :]
    distance = jnp.sqrt(jnp.sum(difference * difference, axis=1))
    if components is not None:
        distance = jnp.where(components == components[root], distance, jnp.inf)
    return distance


def dpt_pseudotime(distances: Float[Array, " n_cells"]) -> Float[Array, " n_cells"]:
    """scanpy's `_set_pseudotime`: distances over their largest finite value."""
    return distances / jnp.max(jnp.where(jnp.isfinite(distances), distances, 0))


class DPTResult(eqx.Module):
    """Diffusion pseudotime from a root cell.

    - `pseudotime`: `(n_cells,)` in `[0, 1]` (`inf` outside the root's component); scanpy's
      `obs["dpt_pseudotime"]`.
    - `diffmap`: the `DiffusionMap` it used (all `n_comps` components; the distance uses the first `n_dcs`).
    - `components`: `(n_cells,)` connected-component labels (the smallest cell index in each).
    """

    pseudotime: Float[Array, " n_cells"]
    diffmap: DiffusionMap
    components: Int[Array, " n_cells"]


@eqx.filter_jit
def _dpt(graph: CellGraph, root: Int[Array, ""], n_dcs: int, n_comps: int, key: PRNGKeyArray) -> DPTResult:
    diffmap = diffusion_map(graph, n_comps=n_comps, key=key)
    components = connected_components(graph)
    distances = dpt_distances(diffmap.eigenvalues[:n_dcs], diffmap.eigenvectors[:, :n_dcs], root, components)
    return DPTResult(dpt_pseudotime(distances), diffmap, components)


@eqx.filter_jit
def _components(graph: CellGraph) -> Int[Array, " n_cells"]:
    return connected_components(graph)


def diffusion_pseudotime(
    graph: object, root: Any, *, n_dcs: int = 10, n_comps: int = 15, key: PRNGKeyArray,
) -> DPTResult:
    """scanpy's `tl.diffmap` + `tl.dpt` (`n_branchings=0`) on a neighbour graph, under one jit.

    **Arguments:**

    - `graph`: a `NeighborGraph` (its connectivities are the kernel), a `FuzzyGraph`, a `CellGraph`, or a SciPy
      sparse matrix such as scanpy's `obsp["connectivities"]`.
    - `root`: index of the root cell (scanpy's `uns["iroot"]`).
    - `n_dcs`: diffusion components in the distance (scanpy's `tl.dpt` default 10). (Keyword only argument.)
    - `n_comps`: components computed (scanpy's `tl.diffmap` default 15); `n_dcs <= n_comps`.
    - `key`: LOBPCG's start block.

    **Returns:** a `DPTResult`. Warns (`DisconnectedGraphWarning`, naming the components) when the graph is
    disconnected; cells outside the root's component then get pseudotime `inf`, as in scanpy.
    """
    cells = as_cell_graph(graph)
    n = cells.n_cells
    index = np.asarray(root)
    if index.shape != () or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"root: expected an integer cell index, got {root!r}")
    if not 0 <= int(index) < n:
        raise ValueError(f"root: cell index {int(index)} is out of range for {n} cells")
    if not 1 <= n_comps < n:
        raise ValueError(f"n_comps: must be in [1, n_cells - 1] = [1, {n - 1}], got {n_comps}")
    if not 1 <= n_dcs <= n_comps:
        raise ValueError(f"n_dcs: must be in [1, n_comps] = [1, {n_comps}], got {n_dcs}")
    warn_if_disconnected(_components(cells))
    return _dpt(cells, jnp.asarray(int(index)), int(n_dcs), int(n_comps), key)


@eqx.filter_jit
def _diffusion_map(graph: CellGraph, n_comps: int, key: PRNGKeyArray) -> DiffusionMap:
    return diffusion_map(graph, n_comps=n_comps, key=key)


def compute_diffusion_map(graph: object, *, n_comps: int = 15, key: PRNGKeyArray) -> DiffusionMap:
    """scanpy's `tl.diffmap` on a neighbour graph (any form `diffusion_pseudotime` takes), under one jit; warns
    when the graph is disconnected."""
    cells = as_cell_graph(graph)
    if not 1 <= n_comps < cells.n_cells:
        raise ValueError(f"n_comps: must be in [1, n_cells - 1] = [1, {cells.n_cells - 1}], got {n_comps}")
    warn_if_disconnected(_components(cells))
    return _diffusion_map(cells, int(n_comps), key)
