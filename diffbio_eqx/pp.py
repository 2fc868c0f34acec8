"""Preprocessing over AnnData, scanpy-style: the neighbour graph and ambient RNA removal.

Each function reads an `anndata.AnnData`, writes its results into it under documented keys (and its settings
under `uns`), and returns what it fitted (a module, or the graph). The AnnData object is updated in memory; a
file it was read from is never written. Counts come from `adata.X` (`layer=None`) or `adata.layers[layer]`; genes
are `adata.var_names`.
"""

from typing import Any

import anndata as ad
import jax.random as jr
import pandas as pd
from jaxtyping import ArrayLike, PRNGKeyArray

from ._ambient._stage import AmbientRemoval, fit_ambient_removal, remove_ambient, resolve_ambient_profile
from ._core._neighbors import NeighborGraph, neighbor_graph
from ._faces import check_adata, fit_keywords, graph_matrices, record_settings, representation
from .io import from_anndata, gene_columns, profile_by_gene, to_anndata


#: Where `ambient_removal` records its settings.
AMBIENT_KEY = "diffbio_ambient"


def neighbors(
    adata: ad.AnnData,
    n_neighbors: int = 15,
    *,
    use_rep: str | None = None,
    method: str = "exact",
    key_added: str | None = None,
    set_op_mix_ratio: float = 1.0,
    local_connectivity: float = 1.0,
) -> NeighborGraph:
    """The kNN graph and its UMAP connectivities, written as `scanpy.pp.neighbors(method="umap")` writes them.

    **Arguments:**

    - `adata`: the cells.
    - `n_neighbors`: neighbours per cell, counting the cell itself (scanpy's convention and default, 15).
    - `use_rep`: the representation (see `representation`; default the first of `X_diffbio_corrected`,
      `X_diffbio`, `X_pca` present). (Keyword only argument.)
    - `method`: the kNN backend of `neighbor_graph` (`"exact"`).
    - `key_added`: as scanpy: None writes `obsp["distances"]`, `obsp["connectivities"]` and `uns["neighbors"]`;
      a name writes `obsp[name + "_distances"]`, `obsp[name + "_connectivities"]` and `uns[name]`.
    - `set_op_mix_ratio`, `local_connectivity`: see `fuzzy_simplicial_set`.

    **Returns:** the `NeighborGraph`. `uns["neighbors"]` holds scanpy's `connectivities_key`, `distances_key` and
    `params` (`n_neighbors`, `method="umap"`, `metric="euclidean"`, `use_rep`, and `knn_method`), so scanpy's tools
    that read the graph (`tl.leiden`, `tl.umap`, ...) use it.
    """
    x, use_rep = representation(adata, use_rep)
    graph = neighbor_graph(
        x, n_neighbors, method=method, set_op_mix_ratio=set_op_mix_ratio, local_connectivity=local_connectivity
    )
    distances, connectivities = graph_matrices(graph)
    prefix = "" if key_added is None else f"{key_added}_"
    adata.obsp[f"{prefix}distances"] = distances
    adata.obsp[f"{prefix}connectivities"] = connectivities
    adata.uns["neighbors" if key_added is None else key_added] = {
        "connectivities_key": f"{prefix}connectivities",
        "distances_key": f"{prefix}distances",
        "params": {
            "n_neighbors": int(n_neighbors), "method": "umap", "metric": "euclidean", "random_state": 0,
            "use_rep": use_rep, "knn_method": method, "set_op_mix_ratio": float(set_op_mix_ratio),
            "local_connectivity": float(local_connectivity),
        },
    }
    return graph


def _raw_by_gene(adata: ad.AnnData, raw_counts: Any) -> Any:
    """Raw droplets given as an AnnData: its counts for the genes of `adata.var_names`, in that order."""
    if not isinstance(raw_counts, ad.AnnData):
        return raw_counts
    matrix = raw_counts.X
    if matrix is None:
        raise ValueError("raw_counts.X: is empty (None)")
    columns = gene_columns(raw_counts.var_names, adata.var_names, field="raw_counts.var_names", owner="adata's")
    return matrix if columns is None else matrix[:, columns]


def ambient_removal(
    adata: ad.AnnData,
    model: AmbientRemoval | None = None,
    *,
    layer: str | None = None,
    ambient_profile: ArrayLike | pd.Series | None = None,
    raw_counts: Any = None,
    key: PRNGKeyArray,
    **fit_settings: Any,
) -> AmbientRemoval:
    """Train CellBender's ambient model on the cells and write their decontaminated counts.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or `layers[layer]`).
    - `model`: an `AmbientRemoval` carrying the model settings; None builds `AmbientRemoval(adata.n_vars)`.
    - `layer`: read counts from this layer instead of `X`. (Keyword only argument.)
    - `ambient_profile`: `(n_genes,)`, or a `pandas.Series` indexed by gene name (matched by `io.profile_by_gene`);
      None: from `raw_counts`' empty droplets, else the cells' pooled counts (see `resolve_ambient_profile`,
      which warns which).
    - `raw_counts`: the unfiltered droplets (a matrix with the genes of `adata`, or an AnnData matched by gene
      name): the profile and CellBender's prior on the ambient count.
    - `key`: split in two: the first builds the default model (unused when `model` is given), the second trains.
    - `fit_settings`: passed to `fit_ambient_removal` (`settings=TrainSettings(n_epochs=...)`, `init_profile`).

    **Returns:** the trained `AmbientRemoval`. Writes `layers["diffbio_decontaminated"]` (posterior expected
    counts) and `uns["diffbio_ambient"]` (`params` and the per-epoch `train_loss`).
    """
    fit_settings = fit_keywords(fit_settings, "fit_ambient_removal")
    counts = from_anndata(check_adata(adata), layer=layer).counts
    raw = _raw_by_gene(adata, raw_counts)
    profile = resolve_ambient_profile(counts, profile_by_gene(adata, ambient_profile), raw_counts=raw)
    init_key, fit_key = jr.split(key)
    model = AmbientRemoval(adata.n_vars, key=init_key) if model is None else model
    fitted = fit_ambient_removal(model, counts, profile, key=fit_key, raw_counts=raw, **fit_settings)
    result = remove_ambient(fitted.model, counts, profile)
    to_anndata(adata, {"decontaminated_counts": result.decontaminated_counts}, copy=False)
    params = {"layer": layer, "latent_dim": model.latent_dim, "hidden_dim": model.hidden_dim,
              "profile": "given" if ambient_profile is not None else "raw_counts" if raw is not None else "pooled"}
    record_settings(adata, AMBIENT_KEY, {**params, **fit_settings}, train_loss=fitted.train_loss)
    return fitted.model
