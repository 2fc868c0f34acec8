"""Preprocessing over AnnData, scanpy-style: the neighbour graph, ambient RNA removal, doublets (`scrublet`,
`solo`) and imputation (`magic`, `denoise`).

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
from ._core._neighbors import NeighborGraph, neighbor_graph, select_neighbor_method
from ._core._train import TrainSettings
from ._core._validate import check_whole
from ._doublets._run import (
    ScrubletResult,
    ScrubletSettings,
    check_scrublet_input,
    run_scrublet,
    run_scrublet_batched,
)
from ._doublets._solo import SoloResult, run_solo
from ._faces import check_adata, fit_keywords, graph_matrices, neighbors_representation, record_settings
from ._imputation import (
    Magic,
    MagicResult,
    MaskedGeneTransformer,
    denoise as denoise_counts,
    fit_masked_gene_transformer,
    magic as magic_impute,
)
from ._vae._stage import VAENormalizer, fit_vae
from .io import check_layer, from_anndata, gene_columns, profile_by_gene, to_anndata


#: Where `ambient_removal` records its settings.
AMBIENT_KEY = "diffbio_ambient"


def neighbors(
    adata: ad.AnnData,
    n_neighbors: int = 15,
    n_pcs: int | None = None,
    *,
    use_rep: str | None = None,
    method: str = "auto",
    key_added: str | None = None,
    set_op_mix_ratio: float = 1.0,
    local_connectivity: float = 1.0,
) -> NeighborGraph:
    """The kNN graph and its UMAP connectivities, written as `scanpy.pp.neighbors(method="umap")` writes them.

    **Arguments:**

    - `adata`: the cells.
    - `n_neighbors`: neighbours per cell, counting the cell itself (scanpy's convention and default, 15).
    - `n_pcs`: use the first `n_pcs` columns of the representation (all when None), as scanpy; recorded in
      `params` when given. `n_pcs=0` with `use_rep=None` reads `X`.
    - `use_rep`: the representation (see `neighbors_representation`; default the first of `X_diffbio_corrected`,
      `X_diffbio`, `X_pca` present, else `X` itself for at most 50 genes, as scanpy). (Keyword only argument.)
    - `method`: the kNN backend of `neighbor_graph`: `"auto"` (exact below 8,192 cells as scanpy, then
      approximate top-k on GPU/TPU; on CPU exact below 20,000 cells, the inverted-file search above), `"exact"`,
      `"ivf"`, `"pynndescent"` or `"approx_top_k"`;
      `uns[...]["params"]["knn_method"]` records the one that ran.
    - `key_added`: as scanpy: None writes `obsp["distances"]`, `obsp["connectivities"]` and `uns["neighbors"]`;
      a name writes `obsp[name + "_distances"]`, `obsp[name + "_connectivities"]` and `uns[name]`.
    - `set_op_mix_ratio`, `local_connectivity`: see `fuzzy_simplicial_set`.

    **Returns:** the `NeighborGraph`. `uns["neighbors"]` holds scanpy's `connectivities_key`, `distances_key` and
    `params` (`n_neighbors`, `method="umap"`, `metric="euclidean"`, `use_rep`, and `knn_method`), so scanpy's tools
    that read the graph (`tl.leiden`, `tl.umap`, ...) use it.
    """
    x, use_rep = neighbors_representation(adata, use_rep, n_pcs)
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
            "use_rep": use_rep,
            "knn_method": select_neighbor_method(graph.indices.shape[0]) if method == "auto" else method,
            "set_op_mix_ratio": float(set_op_mix_ratio),
            "local_connectivity": float(local_connectivity),
            **({} if n_pcs is None else {"n_pcs": int(n_pcs)}),  # as scanpy: only when given; tl.umap reads it
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
    else:
        if layer is not None:
            check_layer(adata, layer)
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


def _scrublet_record(result: ScrubletResult, settings: ScrubletSettings, obs_names: Any) -> dict[str, Any]:
    """`uns["scrublet"]` as scanpy writes it, plus the threshold method and the diffbio settings."""
    parameters = {"expected_doublet_rate": settings.expected_doublet_rate,
                  "sim_doublet_ratio": settings.sim_doublet_ratio, "n_neighbors": result.n_neighbors,
                  "n_neighbors_adjusted": result.n_neighbors_adjusted,
                  "stdev_doublet_rate": settings.stdev_doublet_rate,
                  "n_prin_comps": settings.n_prin_comps, "temperature": settings.temperature,
                  "knn_method": result.knn_method}
    kept = np.asarray(obs_names)[np.isfinite(result.doublet_score)]
    return {"doublet_scores_sim": result.scores_sim, "doublet_parents": kept[result.parents],
            "parameters": parameters, "threshold": result.threshold, "threshold_method": result.threshold_method}


def scrublet(adata: ad.AnnData, *, key: PRNGKeyArray, batch_key: str | None = None, layer: str | None = None,
             **settings: Any) -> None:
    """Scrublet on raw counts, as `scanpy.pp.scrublet` (see `diffbio_eqx._doublets._scrublet`).

    **Arguments:**

    - `adata`: cells x genes, raw counts in `X` (or `layers[layer]`).
    - `key`: draws the simulated doublets' parents (one key per batch is split from it). (Keyword only argument.)
    - `batch_key`: an `obs` column; each batch is scored on its own, as scanpy does.
    - `settings`: `ScrubletSettings` fields: `sim_doublet_ratio` (2), `expected_doublet_rate` (0.05),
      `stdev_doublet_rate` (0.02), `n_neighbors` (round(0.5 sqrt(n))), `n_prin_comps` (30), `threshold` (None:
      automatic, Scrublet's `threshold_minimum`, else the Otsu fallback; `uns["scrublet"]["threshold_method"]`
      says which), `temperature` (0; > 0: soft counts), `knn_method` (`"auto"`: exact below 50,000 observed +
      simulated cells, the inverted-file search above; `"exact"`, `"ivf"`; `parameters` records the one used).

    Writes `obs["doublet_score"]`, `obs["predicted_doublet"]` and `uns["scrublet"]` (`doublet_scores_sim`,
    `doublet_parents`, `parameters`, `threshold`, `threshold_method`; with `batch_key`: `batches` holding one such
    record per batch, and `batched_by`), only once everything succeeded. `doublet_parents` holds each simulated
    doublet's two parents as `obs_names`; scanpy stores row numbers of its filtered copy of the cells, which stop
    matching `adata`'s rows once a cell with under 3 genes was filtered out.
    """
    options = ScrubletSettings(**settings)
    counts = from_anndata(check_adata(adata), layer=layer).counts
    score = np.full(adata.n_obs, np.nan)
    called = np.zeros(adata.n_obs, dtype=bool)
    if batch_key is None:
        result = run_scrublet(counts, options, key=key)
        score, called, record = result.doublet_score, result.predicted_doublet, _scrublet_record(
            result, options, adata.obs_names)
    else:
        if batch_key not in adata.obs:
            raise ValueError(f"batch_key: {batch_key!r} is not a column of adata.obs")
        runs = run_scrublet_batched(counts, adata.obs[batch_key].astype(str).to_numpy(), options, key=key)
        record = {"batches": {}, "batched_by": batch_key}
        for label, (cells, result) in runs.items():
            score[cells], called[cells] = result.doublet_score, result.predicted_doublet
            record["batches"][str(label)] = _scrublet_record(result, options, adata.obs_names[cells])
    adata.obs["doublet_score"] = score
    adata.obs["predicted_doublet"] = called
    adata.uns["scrublet"] = record


def solo(adata: ad.AnnData, vae: VAENormalizer | None = None, *, key: PRNGKeyArray, layer: str | None = None,
         doublet_ratio: int = 2, settings: TrainSettings | None = None,
         vae_settings: TrainSettings | None = None) -> SoloResult:
    """Solo as scvi-tools' `SOLO.from_scvi_model` (see `diffbio_eqx._doublets._solo`).

    **Arguments:**

    - `adata`: cells x genes, raw counts in `X` (or `layers[layer]`).
    - `vae`: a trained `VAENormalizer` on these genes (e.g. the pipeline's); None trains one with `fit_vae`'s
      scvi-tools defaults (`vae_settings`). It stays frozen.
    - `key`: split between the VAE (if trained here) and Solo. (Keyword only argument.)
    - `doublet_ratio`: simulated doublets per cell (2); `settings`: the classifier's training (SOLO's defaults).

    Writes `obs["doublet_score"]` (the doublet probability), `obs["predicted_doublet"]` (probability > 0.5, as
    `SOLO.predict(soft=False)`) and `uns["solo"]` (`params`, `train_loss`, `validation_loss`,
    `doublet_scores_sim`). **Returns:** the `SoloResult`.
    """
    counts = from_anndata(check_adata(adata), layer=layer).counts
    check_scrublet_input(counts, ScrubletSettings())  # all-zero cells and the like, named
    check_whole(doublet_ratio, "doublet_ratio")  # simulated doublets per cell, SOLO's int
    vae_key, solo_key = jr.split(key)
    if vae is None:
        init_key, fit_key = jr.split(vae_key)
        trained: VAENormalizer = fit_vae(VAENormalizer(adata.n_vars, key=init_key), counts, key=fit_key,
                                         settings=vae_settings).model
    elif vae.n_genes != adata.n_vars:
        raise ValueError(f"vae: was trained on {vae.n_genes} genes, adata has {adata.n_vars}")
    else:
        trained = vae
    result = run_solo(trained, counts, key=solo_key, doublet_ratio=doublet_ratio, settings=settings)
    adata.obs["doublet_score"] = result.doublet_probability
    adata.obs["predicted_doublet"] = result.doublet_probability > 0.5
    record_settings(adata, "solo", {"layer": layer, "doublet_ratio": doublet_ratio,
                                    "n_epochs_run": result.fit.n_epochs_run},
                    train_loss=result.fit.train_loss, validation_loss=result.fit.validation_loss,
                    doublet_scores_sim=result.doublet_probability_sim)
    return result
