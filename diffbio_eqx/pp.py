"""Preprocessing over AnnData, scanpy-style: the neighbour graph and ambient RNA removal.

Each function reads an `anndata.AnnData`, writes its results into it under documented keys (and its settings
under `uns`), and returns what it fitted (a module, or the graph). The AnnData object is updated in memory; a
file it was read from is never written. Counts come from `adata.X` (`layer=None`) or `adata.layers[layer]`; genes
are `adata.var_names`.
"""

from collections.abc import Sequence
from typing import Any

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
from jaxtyping import ArrayLike, PRNGKeyArray

from ._ambient._stage import AmbientRemoval, fit_ambient_removal, remove_ambient, resolve_ambient_profile
from ._core._neighbors import NeighborGraph, neighbor_graph
from ._faces import check_adata, fit_keywords, graph_matrices, record_settings, representation
from ._imputation import (
    Magic,
    MagicResult,
    MaskedGeneTransformer,
    denoise as denoise_counts,
    fit_masked_gene_transformer,
    magic as magic_impute,
)
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


#: Where `magic` and `denoise` record their settings.
MAGIC_KEY = "diffbio_magic"
DENOISE_KEY = "diffbio_denoise"


def magic(
    adata: ad.AnnData,
    settings: Magic | None = None,
    *,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    key: PRNGKeyArray | None = None,
    key_added: str = "magic",
) -> MagicResult:
    """MAGIC with magic-impute's defaults (`solver="exact"`), memory-bounded (see `diffbio_eqx._imputation.magic`).

    **Arguments:**

    - `adata`: cells x genes; counts in `X` (or `layers[layer]`) when `settings.normalize` (the default: median
      library size, then square root, as the MAGIC tutorial), else the normalised matrix to diffuse.
    - `settings`: a `Magic` with MAGIC's settings (`knn`, `knn_max`, `decay`, `t`, ...); None: `Magic()`.
    - `layer`: read from this layer instead of `X`. (Keyword only argument.)
    - `genes`: gene names to impute (all when None).
    - `key`: draws MAGIC's 500-gene subsample for `t="auto"`.
    - `key_added`: the name of the output.

    **Returns:** the `MagicResult`. Writes `layers[key_added]` (all genes) or, with `genes`, `obsm["X_" +
    key_added]` (those genes, in that order), and `uns["diffbio_magic"]` (`params`, the `t` used, the `genes`).
    """
    settings = Magic() if settings is None else settings
    check_adata(adata)
    if settings.normalize:
        data = from_anndata(adata, layer=layer).counts
    elif layer is not None and layer not in adata.layers:
        raise ValueError(f"layer: {layer!r} is not in adata.layers (has {sorted(adata.layers.keys())})")
    else:
        data = adata.X if layer is None else adata.layers[layer]
    result = magic_impute(data, settings, genes=genes, gene_names=[str(g) for g in adata.var_names], key=key)
    if genes is None:
        adata.layers[key_added] = result.imputed
    else:
        adata.obsm[f"X_{key_added}"] = result.imputed
    params = {"layer": layer, "knn": settings.knn, "knn_max": settings.knn_max, "t": settings.t,
              "decay": None if settings.decay is None else float(settings.decay), "thresh": float(settings.thresh),
              "n_pca": settings.n_pca, "normalize": settings.normalize, "solver": "exact", "key_added": key_added}
    record_settings(adata, MAGIC_KEY, params, t=result.t,
                    genes=np.asarray(adata.var_names)[result.columns].astype(str))
    return result


def denoise(
    adata: ad.AnnData,
    model: MaskedGeneTransformer | None = None,
    *,
    layer: str | None = None,
    key: PRNGKeyArray,
    key_added: str = "denoised",
    **fit_settings: Any,
) -> MaskedGeneTransformer:
    """Train the masked-gene transformer on the cells and write their denoised expected counts.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or `layers[layer]`).
    - `model`: a `MaskedGeneTransformer` (its `genes`, if set, are matched by name); None builds one for every
      gene of `adata`.
    - `layer`: read counts from this layer instead of `X`. (Keyword only argument.)
    - `key`: split in two: the first builds the default model, the second trains.
    - `key_added`: the layer written.
    - `fit_settings`: passed to `fit_masked_gene_transformer` (`settings=TrainSettings(n_epochs=...)`).

    **Returns:** the trained model. Writes `layers[key_added]` (expected counts; with a model built for a gene
    subset, the other genes are NaN) and `uns["diffbio_denoise"]` (`params`, the per-epoch `train_loss`).
    """
    fit_settings = fit_keywords(fit_settings, "fit_masked_gene_transformer")
    check_adata(adata)
    genes = None if model is None else model.genes
    arrays = from_anndata(adata, layer=layer, genes=genes, genes_owner="the model's")
    init_key, fit_key = jr.split(key)
    if model is None:
        model = MaskedGeneTransformer(adata.n_vars, genes=[str(g) for g in adata.var_names], key=init_key)
    fitted = fit_masked_gene_transformer(model, arrays.counts, key=fit_key, **fit_settings)
    expected = denoise_counts(fitted.model, arrays.counts)
    if genes is None:
        adata.layers[key_added] = expected
    else:
        full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        full[:, gene_columns([str(g) for g in adata.var_names], list(genes))] = expected
        adata.layers[key_added] = full
    params = {"layer": layer, "n_genes": model.n_genes, "n_latents": model.latents.shape[0],
              "dim": model.latents.shape[1], "n_heads": model.n_heads, "mask_rate": float(model.mask_rate),
              "key_added": key_added}
    record_settings(adata, DENOISE_KEY, {**params, **fit_settings}, train_loss=fitted.train_loss)
    return fitted.model
