"""Tools over AnnData, scanpy/scvi-tools-style: the VAE, Harmony, parametric UMAP, the Gaussian mixture and soft
k-means, the whole pipeline; and the operators: annotation (`annotate`), trajectories (`diffmap`, `dpt`,
`fate_probabilities`, `transport_maps`), communication and GRNs (`ligand_receptor`, `grn`), spatial
(`spatial_domains`, `align_slices`), differential expression and archetypes (`rank_genes_groups`,
`pseudobulk_de`, `switch_de`, `differential_distribution`, `archetypes`).

Each function reads an `anndata.AnnData`, writes its results into it under the keys of `diffbio_eqx.io`
(`obsm["X_diffbio"]`, `obsm["X_diffbio_corrected"]`, `obsm["X_umap"]`, `obs["diffbio_cluster"]`,
`layers["diffbio_normalized"]`, ...) and its settings under `uns["diffbio_<name>"]["params"]`, and returns what
it fitted. A trained stage's model settings live in the module: pass a built module as `model` to change them (its
shapes must fit the data), or None for the defaults. The AnnData object is updated in memory; a file it was read
from is never written.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import anndata as ad
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
from jaxtyping import ArrayLike, PRNGKeyArray

from ._annotation._annotate import Annotation, Reference, annotate_counts
from ._clustering._mixture_stage import GaussianMixture, fit_gaussian_mixture
from ._clustering._stage import SoftKMeans, fit_soft_kmeans
from ._core._validate import check_positive, check_whole
from ._de._deseq2 import DESeq2Options
from ._faces import (
    SMALL_X_GENES,
    check_adata,
    fit_keywords,
    host_array,
    neighbors_representation,
    record_settings,
    representation,
    settings_record,
)
from ._harmony._math import HarmonyResult
from ._harmony._stage import Harmony
from ._pipeline import SingleCellPipeline, SingleCellPipelineConfig
from ._trajectory import (
    DiffusionMap,
    DPTResult,
    FateResult,
    OTSettings,
    TransportMap,
    compute_diffusion_map,
    diffusion_pseudotime,
    fate_probabilities as _fate_probabilities,
    find_terminal_states,
    pseudotime_from_diffmap,
    transport_maps as _transport_maps,
)
from ._umap._stage import ParametricUMAP, fit_umap
from ._vae._stage import VAENormalizer, fit_vae, vae_transform
from .io import (
    CLUSTER_KEY,
    LAYER_KEYS,
    OBSM_KEYS,
    _batch_codes,
    check_layer,
    counts_matrix,
    fit_anndata,
    from_anndata,
    layer_names,
    to_anndata,
)


#: The `obsm` keys Harmony's `use_rep=None` tries, in order (never an already corrected embedding).
HARMONY_REPRESENTATIONS = ("X_diffbio", "X_pca")


def _record(adata: ad.AnnData, name: str, params: dict[str, Any], **results: Any) -> None:
    record_settings(adata, f"diffbio_{name}", params, **results)


def _spatial_coordinates(adata: ad.AnnData, spatial_key: str, field: str = "adata") -> np.ndarray:
    from ._spatial._domains import check_coordinates

    if spatial_key not in adata.obsm:
        raise ValueError(f"spatial_key: {field}.obsm has no {spatial_key!r} spatial coordinates (has "
                         f"{sorted(adata.obsm.keys())})")
    return check_coordinates(np.asarray(adata.obsm[spatial_key]), adata.n_obs, f"{field}.obsm[{spatial_key!r}]")


def _dense(matrix: Any) -> np.ndarray:
    """A dense NumPy copy of an AnnData matrix (SciPy sparse or dense), in its own dtype."""
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix)


def _layer_matrix(adata: ad.AnnData, layer: str | None, field: str = "adata") -> tuple[Any, str]:
    """`X`, or `layers[layer]` once it is checked to exist, and its name for messages."""
    if layer is None:
        return adata.X, f"{field}.X"
    check_layer(adata, layer)
    return adata.layers[layer], f"{field}.layers[{layer!r}]"


def _dense_counts(adata: ad.AnnData, layer: str | None, field: str = "adata") -> np.ndarray:
    """The counts of `X` (or `layer`) as dense float64, refused unless finite and non-negative."""
    matrix, name = _layer_matrix(adata, layer, field)
    x = _dense(matrix).astype(np.float64)
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"{name}: needs finite, non-negative counts (found negative, NaN or infinite values)")
    return x


def spatial_domains(
    adata: ad.AnnData, n_domains: int, *, spatial_key: str = "spatial", layer: str | None = None,
    n_neighbors: int = 6, radius: float | None = None, prune_key: str | None = None, prune_weight: float = 0.5,
    n_epochs: int = 1000, seed: int = 0,
) -> None:
    """STAGATE spatial domains: a graph attention autoencoder on the spatial graph, then a Gaussian mixture.

    **Arguments:**

    - `adata`: counts in `X` (or `layer`), coordinates in `obsm[spatial_key]`. As STAGATE's `train_STAGATE`,
      the autoencoder sees only the genes of `var["highly_variable"]` when that column is set (log-normalised over
      all genes first).
    - `n_domains`: the number of domains (mclust's `num_cluster`).
    - `n_neighbors` / `radius`: STAGATE's `k_cutoff` / `rad_cutoff` spatial graph.
    - `prune_key`, `prune_weight`: cell-type-aware pruning from the pre-clusters in `obs[prune_key]` with STAGATE's
      `alpha` (default 0.5; ignored without `prune_key`).
    - `n_epochs`: full-batch epochs (STAGATE: 1000). (Majority-vote smoothing over neighbours:
      `diffbio_eqx._spatial.spatial_domains(..., smooth=True)` on arrays.)

    Writes `obs["spatial_domain"]` (categorical), `obsm["X_stagate"]`, and `uns["diffbio_spatial_domains"]` (settings,
    training loss).
    """
    from ._core._train import TrainSettings
    from ._spatial._domains import check_n_domains, domain_graph, domains_from_expression, log_normalize

    check_adata(adata)
    coordinates = _spatial_coordinates(adata, spatial_key)
    pre_labels = None
    if prune_key is not None:
        if prune_key not in adata.obs:
            raise ValueError(f"prune_key: {prune_key!r} is not a column of adata.obs")
        pre_labels = adata.obs[prune_key].astype(str).to_numpy()
    counts, genes = _dense_counts(adata, layer), _stagate_genes(adata)
    check_n_domains(n_domains, adata.n_obs)
    weight = prune_weight if prune_key is not None else 0.0
    graph = domain_graph(coordinates, adata.n_obs, n_neighbors=n_neighbors, radius=radius, pre_labels=pre_labels,
                         prune_weight=weight)
    result = domains_from_expression(log_normalize(counts)[:, genes], graph, n_domains, key=jr.key(seed),
                                     prune_weight=weight, settings=TrainSettings(n_epochs=n_epochs, progress=False))
    adata.obs["spatial_domain"] = pd.Categorical(np.asarray(result.labels).astype(str))
    adata.obsm["X_stagate"] = host_array(result.embedding, np.float32)
    _record(adata, "spatial_domains", {"n_domains": n_domains, "spatial_key": spatial_key, "n_neighbors": n_neighbors,
                                       "radius": radius, "prune_key": prune_key, "prune_weight": prune_weight,
                                       "n_epochs": n_epochs, "seed": seed, "n_genes": int(genes.sum())},
            train_loss=result.training.train_loss)


def _stagate_genes(adata: ad.AnnData) -> np.ndarray:
    """The genes STAGATE trains on: `var["highly_variable"]` when set (its `train_STAGATE`), else all."""
    if "highly_variable" not in adata.var:
        return np.ones(adata.n_vars, bool)
    column = adata.var["highly_variable"]
    usable = pd.api.types.is_bool_dtype(column) and not bool(column.isna().to_numpy().any())
    genes = np.asarray(column, dtype=bool) if usable else None
    if genes is None or not genes.any():
        raise ValueError("adata.var['highly_variable']: STAGATE trains on these genes; needs a boolean column with "
                         "at least one True")
    return genes


def _top_k_plan(plan: np.ndarray, top_k: int) -> Any:
    import scipy.sparse as sp

    k = min(top_k, plan.shape[0])
    rows = np.argpartition(-plan, k - 1, axis=0)[:k]  # the k heaviest rows of each column
    columns = np.broadcast_to(np.arange(plan.shape[1]), rows.shape)
    return sp.csr_matrix((plan[rows, columns].ravel(), (rows.ravel(), columns.ravel())), shape=plan.shape)


def align_slices(
    slices: Sequence[ad.AnnData], *, spatial_key: str = "spatial", layer: str | None = None, alpha: float = 0.1,
    method: str = "pairwise", top_k: int = 5, key_added: str = "spatial_aligned", seed: int = 0, overlap: float = 1.0,
) -> list[Any]:
    """PASTE alignment of several slices on their shared genes (matched by name: those of each consecutive pair
    for `"pairwise"`, as PASTE's `pairwise_align`; those of all slices for `"center"`, as its `center_align`).

    **Arguments:**

    - `slices`: AnnData slices with counts in `X` (or `layer`) and coordinates in `obsm[spatial_key]`.
    - `alpha`: PASTE's spatial weight in (0, 1] (default 0.1).
    - `method`: `"pairwise"` (PASTE's `pairwise_align` between consecutive slices, stacked onto slice 0 as
      `stack_slices_pairwise`) or `"center"` (`center_align` with slice 0 as the reference, each slice stacked onto
      the centre).
    - `top_k`: plan entries kept per spot of the later slice.
    - `overlap`: PASTE2's `s`, the share of each slice's mass aligned (1: PASTE; below 1: partial alignment).

    Writes each slice's `obsm[key_added]` (coordinates in slice 0's frame) and, for slices 1.., `uns[key_added]`:
    `plan` (sparse `(n_previous_or_center, n_this)`, top `top_k` per column), `rotation`, `translation` (onto the
    previous slice, or the centre), `entropy`. **Returns:** the `AlignmentResult`s.
    """
    from ._spatial._center import center_align
    from ._spatial._paste import PasteAlignment, check_alpha, pairwise_align

    if len(slices) < 2:
        raise ValueError(f"slices: need at least two AnnData slices, got {len(slices)}")
    if method not in ("pairwise", "center"):
        raise ValueError(f"method: must be 'pairwise' or 'center', got {method!r}")
    check_alpha(alpha)
    if top_k < 1:
        raise ValueError(f"top_k: must be at least 1, got {top_k}")
    for i, s in enumerate(slices):
        if not s.var_names.is_unique:
            duplicated = s.var_names[s.var_names.duplicated()][0]
            raise ValueError(f"slices[{i}].var_names: not unique ({duplicated!r} repeats); PASTE matches genes by "
                             "name (adata.var_names_make_unique())")
    settings = PasteAlignment(alpha, overlap=overlap)
    coordinates = [_spatial_coordinates(check_adata(s), spatial_key, f"slices[{i}]") for i, s in enumerate(slices)]
    if method == "center":  # paste's center_align: the genes all slices share; pairwise_align: each pair's own
        xs = _shared_counts(slices, range(len(slices)), layer)
        out = center_align(xs, coordinates, key=jr.key(seed), alpha=alpha, settings=settings)
        results = list(out.alignments)
        aligned = [np.asarray(r.aligned_b) for r in results]
    else:
        pairs = [_shared_counts(slices, (i - 1, i), layer) for i in range(1, len(slices))]
        results = [pairwise_align(xa, xb, coordinates[i], coordinates[i + 1], settings=settings)
                   for i, (xa, xb) in enumerate(pairs)]
        aligned = [coordinates[0]]
        for r in results:  # compose: slice i onto slice i-1, then on to slice 0
            rotation, translation = np.asarray(r.rotation), np.asarray(r.translation)
            previous = aligned[-1]
            previous_rotation, previous_shift = _rigid_fit(coordinates[len(aligned) - 1], previous)
            onto_previous = coordinates[len(aligned)] @ rotation.T + translation
            aligned.append(onto_previous @ previous_rotation.T + previous_shift)
    for i, s in enumerate(slices):
        s.obsm[key_added] = host_array(aligned[i], np.float64)
    for i, r in enumerate(results if method == "pairwise" else results[1:], start=1):
        slices[i].uns[key_added] = {"plan": _top_k_plan(np.asarray(r.plan), top_k), "rotation": host_array(r.rotation),
                                    "translation": host_array(r.translation), "entropy": float(r.entropy),
                                    "params": {"alpha": alpha, "method": method, "top_k": top_k}}
    return results


def _shared_counts(slices: Sequence[ad.AnnData], indices: Sequence[int], layer: str | None) -> list[np.ndarray]:
    """The counts of `slices[indices]` on the genes they all share (by name, in the first one's order)."""
    genes = slices[indices[0]].var_names
    for i in indices[1:]:
        genes = genes.intersection(slices[i].var_names, sort=False)
    if len(genes) == 0:
        raise ValueError(f"slices: slices {list(indices)} share no genes (var_names); PASTE aligns on shared genes")
    return [_dense_counts(slices[i][:, genes], layer, f"slices[{i}]") for i in indices]


def _rigid_fit(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rotation and shift taking `source` exactly onto `target` (two copies of one slice related rigidly)."""
    ms, mt = source.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd((source - ms).T @ (target - mt))
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation = vt.T @ np.diag([1.0, d]) @ u.T
    return rotation, mt - ms @ rotation.T


def _graph_from_adata(adata: ad.AnnData, neighbors_key: str) -> Any:
    """The connectivities scanpy's tools read: `obsp[uns[neighbors_key]["connectivities_key"]]`."""
    check_adata(adata)
    if neighbors_key not in adata.uns:
        raise ValueError(f"neighbors_key: {neighbors_key!r} is not in adata.uns; run dbx.pp.neighbors (or "
                         "scanpy.pp.neighbors) first")
    name = adata.uns[neighbors_key].get("connectivities_key", "connectivities")
    if name not in adata.obsp:
        raise ValueError(f"adata.obsp[{name!r}]: missing; run dbx.pp.neighbors first")
    return adata.obsp[name]


def diffmap(adata: ad.AnnData, n_comps: int = 15, *, neighbors_key: str = "neighbors",
            key: PRNGKeyArray) -> DiffusionMap:
    """scanpy's `tl.diffmap` on the neighbour graph (see `diffbio_eqx._trajectory`): writes `obsm["X_diffmap"]`
    `(n_cells, n_comps)` and `uns["diffmap_evals"]`. `key` draws the eigensolver's start block. Returns the
    `DiffusionMap`."""
    result = compute_diffusion_map(_graph_from_adata(adata, neighbors_key), n_comps=n_comps, key=key)
    adata.obsm["X_diffmap"] = host_array(result.eigenvectors)
    adata.uns["diffmap_evals"] = host_array(result.eigenvalues)
    return result


def dpt(adata: ad.AnnData, n_dcs: int = 10, *, root: int | None = None, n_comps: int = 15,
        neighbors_key: str = "neighbors", key: PRNGKeyArray) -> DPTResult:
    """scanpy's `tl.dpt` (`n_branchings=0`): diffusion pseudotime from the root cell.

    **Arguments:** `n_dcs` diffusion components (10); `root` the root cell's index (None: `uns["iroot"]`, as
    scanpy); `n_comps` components computed when no diffusion map is stored (15, scanpy's `tl.diffmap`); `key` the
    eigensolver's start block.

    As scanpy, the diffusion map of an earlier `tl.diffmap` (`obsm["X_diffmap"]`, `uns["diffmap_evals"]`) is
    reused, its first `n_dcs` components; without one it is computed and written.

    **Returns:** the `DPTResult`. Writes `obs["dpt_pseudotime"]` and `uns["iroot"]` (and `obsm["X_diffmap"]`,
    `uns["diffmap_evals"]` when it computed them).
    """
    graph = _graph_from_adata(adata, neighbors_key)
    if root is None:
        if "iroot" not in adata.uns:
            raise ValueError("root: not given and adata.uns['iroot'] is not set; pass root= a cell index")
        root = adata.uns["iroot"]
    stored = _stored_diffmap(adata)
    if stored is not None:
        result = pseudotime_from_diffmap(graph, stored, root, n_dcs=n_dcs)
    else:
        result = diffusion_pseudotime(graph, root, n_dcs=n_dcs, n_comps=n_comps, key=key)
        adata.obsm["X_diffmap"] = host_array(result.diffmap.eigenvectors)
        adata.uns["diffmap_evals"] = host_array(result.diffmap.eigenvalues)
    adata.obs["dpt_pseudotime"] = np.asarray(result.pseudotime)
    adata.uns["iroot"] = int(np.asarray(root))
    return result


def _stored_diffmap(adata: ad.AnnData) -> DiffusionMap | None:
    """`tl.diffmap`'s result as stored in `adata` (None when there is none); its residual is unknown (NaN)."""
    if "X_diffmap" not in adata.obsm:
        return None
    if "diffmap_evals" not in adata.uns:
        raise ValueError("adata.uns['diffmap_evals']: missing beside obsm['X_diffmap']; run dbx.tl.diffmap again")
    vectors = np.asarray(adata.obsm["X_diffmap"], dtype=np.float64)
    values = np.asarray(adata.uns["diffmap_evals"], dtype=np.float64)
    if values.shape != (vectors.shape[1],):
        raise ValueError(f"adata.uns['diffmap_evals']: expected one eigenvalue per column of obsm['X_diffmap'] "
                         f"({vectors.shape[1]}), got shape {values.shape}")
    return DiffusionMap(jnp.asarray(values), jnp.asarray(vectors), jnp.asarray(0), jnp.asarray(np.nan))


def _terminal_from_obs(adata: ad.AnnData, column: str) -> dict[str, np.ndarray]:
    if column not in adata.obs.columns:
        raise ValueError(f"terminal_states: {column!r} is not a column of adata.obs")
    values = adata.obs[column]
    present = values.notna().to_numpy()
    return {str(name): np.flatnonzero(present & (values.astype(str).to_numpy() == str(name)))
            for name in pd.unique(values[present])}


def fate_probabilities(adata: ad.AnnData, terminal_states: Any = None, *, n_states: int | None = None,
                       pseudotime_key: str | None = "dpt_pseudotime", scheme: str = "hard", tol: float = 1e-6,
                       neighbors_key: str = "neighbors") -> FateResult:
    """CellRank's fate (absorption) probabilities on the neighbour graph.

    **Arguments:**

    - `terminal_states`: a mapping `name -> cell indices`, or an `obs` column naming each terminal cell's state
      (missing values elsewhere, as CellRank's `obs["term_states_fwd"]`); None finds `n_states` of them at the
      ends of `obs[pseudotime_key]` (`find_terminal_states`).
    - `pseudotime_key`: an `obs` column; present, the transitions follow CellRank's `PseudotimeKernel`
      (`scheme` "hard"/"soft"), None uses its `ConnectivityKernel`. (Keyword only argument.)
    - `tol`: the iterative solver's relative tolerance.

    **Returns:** the `FateResult`. Writes `obsm["fate_probabilities"]` `(n_cells, n_states)`,
    `obs["fate_mean_time"]`, `obs["terminal_states"]` and `uns["fate_probabilities"]` (`names`, `params`).
    """
    graph = _graph_from_adata(adata, neighbors_key)
    pseudotime = None
    if pseudotime_key is not None:
        if pseudotime_key not in adata.obs.columns:
            raise ValueError(f"pseudotime_key: {pseudotime_key!r} is not in adata.obs; run dbx.tl.dpt first or pass "
                             "pseudotime_key=None")
        pseudotime = np.asarray(adata.obs[pseudotime_key], dtype=float)
    if terminal_states is None:
        if pseudotime is None or n_states is None:
            raise ValueError("terminal_states: not given; pass them, or n_states= and a pseudotime to find them")
        terminal_states = find_terminal_states(graph, pseudotime, n_states=n_states)
    elif isinstance(terminal_states, str):
        terminal_states = _terminal_from_obs(adata, terminal_states)
    result = _fate_probabilities(graph, terminal_states, pseudotime=pseudotime, scheme=scheme, tol=tol)
    adata.obsm["fate_probabilities"] = host_array(result.probabilities)
    adata.obs["fate_mean_time"] = np.asarray(result.mean_time)
    labels = np.asarray(result.terminal)
    adata.obs["terminal_states"] = pd.Categorical.from_codes(labels, categories=list(result.names))
    adata.uns["fate_probabilities"] = {"names": list(result.names), "params": settings_record(
        {"pseudotime_key": pseudotime_key, "scheme": scheme, "tol": tol})}
    return result


def transport_maps(adata: ad.AnnData, time_key: str = "day", *, growth_key: str | None = None,
                   layer: str | None = None, growth_iters: int = 1, settings: OTSettings | None = None,
                   n_pcs: int = 30) -> dict[tuple[float, float], TransportMap]:
    """wot's `OTModel.compute_all_transport_maps` over `X` (or `layers[layer]`), consecutive time points of
    `obs[time_key]`, with the per-cell growth prior `obs[growth_key]` (None: `obs["cell_growth_rate"]` when
    present, wot's `growth_rate_field`, else ones); wot's defaults.

    **Returns:** `{(t0, t1): TransportMap}`. Writes `obs["growth_rate_learned"]` (each cell's learned growth on
    the map leaving its time point; NaN at the last) and `uns["transport_maps"]["params"]`.
    """
    check_adata(adata)
    if time_key not in adata.obs.columns:
        raise ValueError(f"time_key: {time_key!r} is not a column of adata.obs")
    if growth_key is None and "cell_growth_rate" in adata.obs.columns:  # wot's default growth_rate_field
        growth_key = "cell_growth_rate"
    if growth_key is not None and growth_key not in adata.obs.columns:
        raise ValueError(f"growth_key: {growth_key!r} is not a column of adata.obs")
    matrix = _dense(_layer_matrix(adata, layer)[0])
    time = np.asarray(adata.obs[time_key], dtype=float)
    prior = None if growth_key is None else np.asarray(adata.obs[growth_key], dtype=float)
    maps = _transport_maps(matrix, time, growth_prior=prior, settings=settings, n_pcs=n_pcs,
                           growth_iters=growth_iters)
    learned = np.full(adata.n_obs, np.nan)
    for (t0, _), tmap in maps.items():
        learned[time == t0] = np.asarray(tmap.growth[-1])
    adata.obs["growth_rate_learned"] = learned
    ot = OTSettings() if settings is None else settings
    adata.uns["transport_maps"] = {"params": settings_record({
        "time_key": time_key, "growth_key": growth_key, "layer": layer, "growth_iters": growth_iters,
        "n_pcs": n_pcs, "epsilon": ot.epsilon, "lambda1": ot.lambda1, "lambda2": ot.lambda2})}
    return maps


def vae(
    adata: ad.AnnData,
    model: VAENormalizer | None = None,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    key: PRNGKeyArray,
    **fit_settings: Any,
) -> VAENormalizer:
    """Train scVI's VAE on the counts and write the latent space and the normalised expression.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or `layers[layer]`).
    - `model`: a `VAENormalizer` carrying the model settings (`latent_dim`, `hidden_dims`, likelihood, ...) for
      the batches of `batch_key`; when it names its `genes`, they are matched by name in `adata.var_names` (genes
      it lacks get NaN in `layers["diffbio_normalized"]`). None builds `VAENormalizer(n_vars, n_batches,
      genes=var_names)`.
    - `batch_key`: `obs` column with each cell's batch. (Keyword only argument.)
    - `layer`: read counts from this layer instead of `X`.
    - `key`: split in two: the first builds the default model (unused when `model` is given), the second trains.
    - `fit_settings`: passed to `fit_vae` (`settings=TrainSettings(n_epochs=...)`, KL warm-up, ...).

    **Returns:** the trained `VAENormalizer`. Writes `obsm["X_diffbio"]` (posterior means),
    `layers["diffbio_normalized"]` and `uns["diffbio_vae"]` (`params`, `train_loss`, `validation_loss`).
    """
    fit_settings = fit_keywords(fit_settings, "fit_vae")
    genes = None if model is None else model.genes
    arrays = from_anndata(check_adata(adata), layer=layer, batch_key=batch_key, genes=genes,
                          genes_owner="the model's")
    init_key, fit_key = jr.split(key)
    if model is None:
        model = VAENormalizer(adata.n_vars, arrays.n_batches, genes=arrays.genes, key=init_key)
    fitted = fit_vae(model, arrays.counts, arrays.batch_labels, key=fit_key, **fit_settings)
    output = vae_transform(fitted.model, arrays.counts, arrays.batch_labels)
    normalized = np.asarray(output.normalized)
    if arrays.columns is not None:  # the model's genes, matched by name: back to the order of adata.var_names
        normalized = np.full((adata.n_obs, adata.n_vars), np.nan, np.float32)
        normalized[:, arrays.columns] = np.asarray(output.normalized)
    to_anndata(adata, {"latent": output.latent, "normalized": normalized}, copy=False)
    params = {"batch_key": batch_key, "layer": layer, "latent_dim": fitted.model.latent_dim,
              "hidden_dims": fitted.model.hidden_dims, "likelihood": fitted.model.likelihood,
              "batch_categories": arrays.batch_categories, **fit_settings}
    _record(adata, "vae", params, train_loss=fitted.train_loss, validation_loss=fitted.validation_loss)
    return fitted.model


def _batch_labels(adata: ad.AnnData, batch_key: str | Sequence[str]) -> tuple[np.ndarray, list[list[str]]]:
    keys = [batch_key] if isinstance(batch_key, str) else list(batch_key)
    if not keys:
        raise ValueError("batch_key: name at least one obs column")
    codes, categories = zip(*(_batch_codes(adata, name) for name in keys))
    labels = codes[0] if isinstance(batch_key, str) else np.stack(codes, axis=1)
    return labels, [list(c) for c in categories]


def harmony(
    adata: ad.AnnData,
    batch_key: str | Sequence[str],
    model: Harmony | None = None,
    *,
    use_rep: str | None = None,
    key: PRNGKeyArray,
) -> HarmonyResult:
    """Harmony batch correction of an embedding, written as `obsm["X_diffbio_corrected"]`.

    **Arguments:**

    - `adata`: the cells.
    - `batch_key`: `obs` column(s) with each cell's batch; several columns correct for several covariates.
    - `model`: a `Harmony` carrying the settings (`theta`, `n_clusters`, preset, ...); None: `Harmony()`.
    - `use_rep`: the embedding to correct; None: the first of `obsm["X_diffbio"]`, `obsm["X_pca"]`.
      (Keyword only argument.)
    - `key`: PRNG key for Harmony's k-means++ initialisation and block shuffles.

    **Returns:** the `HarmonyResult` (centroids, ridge coefficients and objective trace, for mapping new cells
    with `map_to_reference`). Writes `obsm["X_diffbio_corrected"]` and `uns["diffbio_harmony"]` (`params`,
    `objective`).
    """
    x, use_rep = representation(adata, use_rep, defaults=HARMONY_REPRESENTATIONS)
    labels, categories = _batch_labels(adata, batch_key)
    model = Harmony() if model is None else model
    result = model.run(x, labels, key=key)
    to_anndata(adata, {"corrected_embeddings": result.z_corr}, copy=False)
    params = {"batch_key": [batch_key] if isinstance(batch_key, str) else list(batch_key), "use_rep": use_rep,
              "n_clusters": int(result.centroids.shape[0]), "max_iter_harmony": model.max_iter_harmony,
              "theta": np.ravel(model.theta).tolist(), "sigma": float(model.sigma),
              "n_rounds": int(result.n_rounds), "converged": bool(result.converged)}
    params["batch_categories"] = {name: c for name, c in zip(params["batch_key"], categories)}
    _record(adata, "harmony", params, objective=result.objective)
    return result


def _neighbors_settings(adata: ad.AnnData, neighbors_key: str | None, use_rep: str | None) -> dict[str, Any] | None:
    """`pp.neighbors`' settings in `uns[neighbors_key]` (its representation, `n_neighbors`, kNN backend and fuzzy
    union), which `umap` builds its graph with, as scanpy's `tl.umap` uses that graph; None when there are none."""
    if neighbors_key is None or neighbors_key not in adata.uns:
        return None
    params = dict(adata.uns[neighbors_key].get("params", {}))
    if "n_neighbors" not in params:
        raise ValueError(f"neighbors_key: adata.uns[{neighbors_key!r}] has no params['n_neighbors']; run "
                         "dbx.pp.neighbors, or pass neighbors_key=None")
    if "use_rep" not in params:  # scanpy's pp.neighbors records use_rep only when it was given
        params["use_rep"] = _scanpy_default_representation(adata, neighbors_key)
    if use_rep is not None and use_rep != params["use_rep"]:
        raise ValueError(f"use_rep: {use_rep!r}, but adata.uns[{neighbors_key!r}] is the graph of "
                         f"{params['use_rep']!r}; run dbx.pp.neighbors(use_rep={use_rep!r}) or pass neighbors_key=None")
    return params


def _scanpy_default_representation(adata: ad.AnnData, neighbors_key: str) -> str:
    """What scanpy's `pp.neighbors` read without `use_rep` (its `_choose_representation`): `X` up to 50 genes,
    else `obsm["X_pca"]` (which it computes when missing, so a graph of more genes implies one)."""
    if adata.n_vars <= SMALL_X_GENES:
        return "X"
    if "X_pca" not in adata.obsm:
        raise ValueError(f"neighbors_key: adata.uns[{neighbors_key!r}] records no use_rep, so it is scanpy's graph "
                         "of obsm['X_pca'], which is missing; pass use_rep to pp.neighbors, or neighbors_key=None")
    return "X_pca"


def umap(
    adata: ad.AnnData,
    model: ParametricUMAP | None = None,
    *,
    use_rep: str | None = None,
    neighbors_key: str | None = "neighbors",
    key: PRNGKeyArray,
    **fit_settings: Any,
) -> ParametricUMAP:
    """Train a parametric UMAP encoder on an embedding and write the 2-D embedding as `obsm["X_umap"]`.

    **Arguments:**

    - `adata`: the cells.
    - `model`: a `ParametricUMAP` carrying the settings (`n_neighbors`, `min_dist`, encoder size, ...), for the
      width of `use_rep`; None builds `ParametricUMAP(n_dims)`: umap-learn's defaults, `min_dist` 0.1 (scanpy's
      `tl.umap` uses 0.5: pass `model=ParametricUMAP(n_dims, min_dist=0.5, key=...)` for its look).
    - `use_rep`: the embedding (see `diffbio_eqx._faces.representation`; default the graph's representation when
      there is one, else the first of `X_diffbio_corrected`, `X_diffbio`, `X_pca`), read in the encoder's float
      dtype. (Keyword only argument.)
    - `neighbors_key`: as scanpy's `tl.umap`, train on the graph `pp.neighbors` described in `uns[neighbors_key]`
      (its representation and `n_pcs`, `n_neighbors`, kNN backend and fuzzy union; rebuilt from them,
      deterministically) when it is there; None, or no such key: the graph of `model`'s own settings.
    - `key`: split in two: the first builds the default model (unused when `model` is given), the second trains.
    - `fit_settings`: passed to `fit_umap` (`settings=TrainSettings(n_epochs=...)`, `prune_epochs`, ...).

    **Returns:** the trained `ParametricUMAP` (its `embed` maps new cells). Writes `obsm["X_umap"]` and
    `uns["diffbio_umap"]` (`params` with `a`, `b`, `n_neighbors`, `use_rep`, `neighbors_key`; `train_loss`).
    """
    from ._umap._stage import umap_graph

    fit_settings = fit_keywords(fit_settings, "fit_umap")
    neighbors = _neighbors_settings(adata, neighbors_key, use_rep)
    if neighbors is None:
        x, use_rep = representation(adata, use_rep)
    else:  # the graph's own input: its representation, cut to its `n_pcs` (scanpy's tl.umap reads both)
        x, use_rep = neighbors_representation(adata, neighbors["use_rep"], neighbors.get("n_pcs"))
    init_key, fit_key = jr.split(key)
    model = ParametricUMAP(x.shape[1], key=init_key) if model is None else model
    x = x.astype(model.encoder.layers[0].weight.dtype)  # the encoder's precision
    n_neighbors = model.n_neighbors
    if neighbors is not None and "graph" not in fit_settings:
        n_neighbors = int(neighbors["n_neighbors"])
        fit_settings["graph"] = umap_graph(
            jnp.asarray(x), n_neighbors=n_neighbors, knn_method=neighbors.get("knn_method", "auto"),
            set_op_mix_ratio=neighbors.get("set_op_mix_ratio", 1.0),
            local_connectivity=neighbors.get("local_connectivity", 1.0))
    fitted = fit_umap(model, x, key=fit_key, **fit_settings)
    to_anndata(adata, {"embeddings_2d": fitted.model.embed(x)}, copy=False)
    params = {"use_rep": use_rep, "n_neighbors": n_neighbors, "neighbors_key": neighbors_key if neighbors else None,
              "a": float(fitted.model.a), "b": float(fitted.model.b),
              **{name: value for name, value in fit_settings.items() if name != "graph"}}
    _record(adata, "umap", params, train_loss=fitted.train_loss)
    return fitted.model


def soft_kmeans(
    adata: ad.AnnData,
    n_clusters: int,
    *,
    use_rep: str | None = None,
    temperature: float = 1.0,
    key: PRNGKeyArray,
    **fit_settings: Any,
) -> SoftKMeans:
    """Soft k-means clustering of an embedding: cluster labels in `obs`, probabilities in `obsm`.

    **Arguments:**

    - `adata`: the cells.
    - `n_clusters`: number of clusters, at most `n_obs`.
    - `use_rep`: the embedding (see `diffbio_eqx._faces.representation`). (Keyword only argument.)
    - `temperature`: the stage's soft-assignment temperature, in squared-distance units.
    - `key`: PRNG key for the k-means++ seeding.
    - `fit_settings`: passed to `fit_soft_kmeans` (`n_iter`, `start_temperature`).

    **Returns:** the fitted `SoftKMeans`. Writes `obs["diffbio_cluster"]` (categorical, the most probable
    cluster), `obsm["diffbio_cluster_probabilities"]` and `uns["diffbio_soft_kmeans"]` (`params`, `objective`).
    """
    x, use_rep = representation(adata, use_rep)
    check_whole(n_clusters, "n_clusters")
    check_positive(temperature, "temperature")
    stage = SoftKMeans(jnp.zeros((n_clusters, x.shape[1]), x.dtype), temperature=temperature)
    fitted = fit_soft_kmeans(stage, x, key=key, **fit_settings)
    to_anndata(adata, {"cluster_assignments": fitted.model(jnp.asarray(x))}, copy=False)
    params = {"use_rep": use_rep, "n_clusters": n_clusters, "temperature": temperature, **fit_settings}
    _record(adata, "soft_kmeans", params, objective=fitted.train_loss)
    return fitted.model


def gaussian_mixture(
    adata: ad.AnnData,
    n_clusters: int | None = None,
    *,
    use_rep: str | None = None,
    temperature: float = 1.0,
    key: PRNGKeyArray,
    **fit_settings: Any,
) -> GaussianMixture:
    """Gaussian-mixture clustering of an embedding (the pipeline's default clustering): labels in `obs`,
    probabilities in `obsm`.

    **Arguments:**

    - `adata`: the cells.
    - `n_clusters`: number of clusters, at most `n_obs`; None chooses it (`select_n_clusters`: Leiden's
      communities in the partition with the widest silhouette).
    - `use_rep`: the embedding (see `diffbio_eqx._faces.representation`). (Keyword only argument.)
    - `temperature`: the E-step temperature (1: the posterior).
    - `key`: PRNG key (restart seeds).
    - `fit_settings`: passed to `fit_gaussian_mixture` (`init`, `n_restarts`, `n_iter`, `tol`, `n_neighbors`, `k_rule`).

    **Returns:** the fitted `GaussianMixture`. Writes `obs["diffbio_cluster"]` (categorical, the most probable
    cluster), `obsm["diffbio_cluster_probabilities"]` and `uns["diffbio_gaussian_mixture"]` (`params`,
    `objective`: the negative mean log-likelihood per EM step).
    """
    x, use_rep = representation(adata, use_rep)
    if n_clusters is not None:
        check_whole(n_clusters, "n_clusters")
    check_positive(temperature, "temperature")
    stage = None if n_clusters is None else GaussianMixture(jnp.zeros((n_clusters, x.shape[1]), x.dtype),
                                                            temperature=temperature)
    fitted = fit_gaussian_mixture(stage, x, key=key, **fit_settings)
    model = eqx.tree_at(lambda m: m.temperature, fitted.model, jnp.asarray(temperature, x.dtype))
    to_anndata(adata, {"cluster_assignments": model(jnp.asarray(x))}, copy=False)
    params = {"use_rep": use_rep, "n_clusters": model.n_clusters, "temperature": temperature, **fit_settings}
    _record(adata, "gaussian_mixture", params, objective=fitted.train_loss)
    return model


def _expression(adata: ad.AnnData, layer: str | None) -> tuple[Any, pd.Index]:
    """The log-normalised matrix a communication/GRN face reads: `layer=None` `.raw` when present (LIANA's
    `use_raw=True`) else X; `"X"` X; `"raw"` `.raw`; any other name that layer."""
    if layer == "raw" or (layer is None and adata.raw is not None):
        if adata.raw is None:
            raise ValueError("layer: 'raw' asked for, but adata.raw is not set")
        return adata.raw.X, adata.raw.var_names
    if layer is None or layer == "X":
        return adata.X, adata.var_names
    if layer not in layer_names(adata):
        raise ValueError(f"layer: {layer!r} is not 'X', 'raw' or one of adata.layers ({layer_names(adata)})")
    return adata.layers[layer], adata.var_names


def ligand_receptor(
    adata: ad.AnnData,
    groupby: str,
    *,
    resource: pd.DataFrame | None = None,
    method: str = "cellphonedb",
    layer: str | None = None,
    expr_prop: float = 0.1,
    min_cells: int = 5,
    n_perms: int = 1000,
    key: PRNGKeyArray | None = None,
    key_added: str = "liana_res",
) -> pd.DataFrame:
    """Ligand-receptor scores between the groups of `obs[groupby]`, as LIANA runs CellPhoneDB or CellChat.

    **Arguments:**

    - `adata`: log-normalised expression (LIANA's input): `layer=None` reads `.raw` when present (LIANA's
      default `use_raw=True`), else `X`; `layer="X"`, `"raw"` or a name in `layers` chooses.
    - `groupby`: `obs` column of the cell groups; groups with fewer than `min_cells` cells are left out with a
      warning naming `groupby`.
    - `resource`: a table with `ligand` and `receptor` columns (complexes as `_`-joined subunits); default
      `datasets.ligand_receptor_pairs()` (LIANA's consensus resource, read from an installed `liana`).
    - `method`: `"cellphonedb"` (mean of the ligand and receptor means) or `"cellchat"` (Hill probability of the
      trimeans, K_h 0.5).
    - `expr_prop`: every subunit expressed in at least this fraction of its group's cells (LIANA's 0.1).
    - `n_perms`: label permutations for the p-values (0: none); `key` their PRNG key (default `jr.key(1337)`,
      LIANA's seed number; the draws are JAX's, not NumPy's).

    **Returns:** LIANA's tidy table (`source`, `target`, `ligand_complex`, `receptor_complex`, the complexes'
    values and expressed fractions, `lr_means`/`cellphone_pvals` or `lr_probs`/`cellchat_pvals`, and the same as
    `score` and `pvalue`), sorted by score; also written to `uns[key_added]` (LIANA's `"liana_res"`, where
    `liana.pl.dotplot` reads it), the settings to `uns[f"{key_added}_params"]`.
    """
    from ._communication._table import ligand_receptor_table
    from .datasets import ligand_receptor_pairs

    check_adata(adata)
    if groupby not in adata.obs:
        raise ValueError(f"groupby: {groupby!r} is not a column of adata.obs")
    if method not in ("cellphonedb", "cellchat"):
        raise ValueError(f"method: expected 'cellphonedb' or 'cellchat', got {method!r}")
    if not 0 <= expr_prop <= 1:
        raise ValueError(f"expr_prop: a fraction of cells, must be in [0, 1], got {expr_prop}")
    x, var_names = _expression(adata, layer)
    table = ligand_receptor_table(
        x, var_names, adata.obs[groupby], ligand_receptor_pairs() if resource is None else resource,
        method="cellchat" if method == "cellchat" else "cellphonedb", expr_prop=expr_prop, min_cells=min_cells,
        n_perms=n_perms, key=jr.key(1337) if key is None and n_perms > 0 else key)
    adata.uns[key_added] = table
    adata.uns[f"{key_added}_params"] = {"groupby": groupby, "method": method, "expr_prop": expr_prop,
                                        "min_cells": min_cells, "n_perms": n_perms, "layer": str(layer)}
    return table


def grn(
    adata: ad.AnnData,
    tfs: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    layer: str | None = None,
    ridge: float = 1e-2,
    n_knots: int = 3,
    key_added: str = "grn",
) -> pd.DataFrame:
    """TF -> target network: every target regressed on the TFs at once (an additive ridge analogue of GENIE3).

    **Arguments:**

    - `adata`: log-normalised expression, chosen by `layer` as in `ligand_receptor` (`.raw` when present, else
      `X`).
    - `tfs`: the transcription factors (names missing from the data are left out with a warning naming `tfs`).
    - `targets`: genes to explain (default all genes).
    - `ridge`, `n_knots`: the ridge penalty and the hinge knots per TF (see `AdditiveGRN`).

    **Returns:** ranked edges `TF`, `target`, `importance` (arboreto's columns; importance = share of the
    target's variance the TF's partial fit explains); also written to `uns[key_added]`.
    """
    from ._grn._table import grn_table

    check_adata(adata)
    if not ridge > 0:
        raise ValueError(f"ridge: the ridge penalty must be > 0, got {ridge}")
    x, var_names = _expression(adata, layer)
    table = grn_table(x, var_names, tfs, targets=targets, ridge=ridge, n_knots=n_knots)
    adata.uns[key_added] = table
    adata.uns[f"{key_added}_params"] = {"n_tfs": len(tfs), "ridge": ridge, "n_knots": n_knots, "layer": str(layer)}
    return table


def annotate(
    adata: ad.AnnData,
    mode: str = "celltypist",
    *,
    reference: ad.AnnData | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    key: PRNGKeyArray,
    **options: Any,
) -> Annotation:
    """Annotate cell types from a labelled reference (CellTypist-style or scANVI) or from marker genes
    (CellAssign).

    **Arguments:**

    - `adata`: the query cells, raw counts in `X` (or `layers[layer]`).
    - `mode`: `"celltypist"`, `"scanvi"` or `"cellassign"` (see `diffbio_eqx._annotation`).
    - `reference`: labelled reference cells with raw counts in `X` (or `layers[layer]`); genes are matched by name.
      (Keyword only argument.)
    - `label_key`: the reference's `obs` column of cell types.
    - `layer`: read counts of both from this layer instead of `X`.
    - `key`: PRNG key.
    - `options`: passed to the mode (`annotate_counts`): e.g. `majority_voting=True`, `markers={...}`,
      `settings=TrainSettings(...)`. As `celltypist.annotate`, an `over_clustering` string naming a column of
      `adata.obs` takes those over-clusters (before `"kmeans"` / `"leiden"` computes them).

    **Returns:** the `Annotation` (with the fitted `model`). Writes `obs["cell_type"]` (categorical),
    `obs["cell_type_confidence"]`, `obsm["cell_type_probabilities"]` (columns in `uns["cell_type"]["cell_types"]`)
    and `uns["cell_type"]["params"]`.
    """
    check_adata(adata)
    counts, _, genes = counts_matrix(adata, layer=layer)
    ref = None
    if mode != "cellassign":
        if reference is None or label_key is None:
            raise ValueError(f"reference: mode {mode!r} needs a labelled reference AnnData and its label_key")
        check_adata(reference)
        if label_key not in reference.obs:
            raise ValueError(f"label_key: {label_key!r} is not in reference.obs (has {list(reference.obs.columns)})")
        ref_counts, _, ref_genes = counts_matrix(reference, layer=layer)
        labels = np.asarray(reference.obs[label_key], dtype=object)
        keep = pd.notna(labels)
        if mode == "celltypist" and not keep.all():
            ref_counts, labels = ref_counts[np.flatnonzero(keep)], labels[keep]
        ref = Reference(ref_counts, [str(g) for g in ref_genes], labels)
    run_options = dict(options)
    clusters = options.get("over_clustering")
    if isinstance(clusters, str) and clusters in adata.obs:  # CellTypist reads an obs column before computing
        run_options["over_clustering"] = adata.obs[clusters].astype(str).to_numpy()
    result = annotate_counts(counts, [str(g) for g in genes], mode=mode, reference=ref,  # type: ignore[arg-type]
                             key=key, **run_options)
    adata.obs["cell_type"] = pd.Categorical(result.labels, categories=list(result.cell_types))
    adata.obs["cell_type_confidence"] = result.confidence
    adata.obsm["cell_type_probabilities"] = result.probabilities
    params = {"mode": mode, "label_key": label_key, "layer": layer,
              **{name: value for name, value in options.items() if name != "markers"}}
    record_settings(adata, "cell_type", params)
    adata.uns["cell_type"]["cell_types"] = list(result.cell_types)
    return result


def pipeline(
    adata: ad.AnnData,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    key: PRNGKeyArray,
    config: SingleCellPipelineConfig | None = None,
    ambient_profile: ArrayLike | pd.Series | None = None,
    **fit_settings: Any,
) -> SingleCellPipeline:
    """Train the whole pipeline on the counts (`io.fit_anndata`) and write every result into `adata`.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or `layers[layer]`).
    - `batch_key`: `obs` column with each cell's batch. (Keyword only argument.)
    - `layer`: read counts from this layer instead of `X`.
    - `key`: PRNG key for building, training and running the pipeline (as `fit_anndata`).
    - `config`: pipeline settings; `n_genes` and `n_batches` are taken from the data.
    - `ambient_profile`: `(n_genes,)`, or a `pandas.Series` indexed by gene name; optional.
    - `fit_settings`: passed to `fit_pipeline` (epochs, fine-tuning, ...).

    **Returns:** the trained `SingleCellPipeline`. Writes what `io.to_anndata` writes (`obsm["X_diffbio"]`,
    `obsm["X_diffbio_corrected"]`, `obsm["X_umap"]`, `obs["diffbio_cluster"]`, its probabilities and the layers
    of the enabled stages), `uns["diffbio_pipeline"]` (`params`: the config and fit settings; `curves`: the
    training curves per stage, for `pl.training`) and, with `batch_key`, `uns["diffbio_batch_categories"]` (the
    batch of each code).
    """
    annotated, fitted = fit_anndata(check_adata(adata), batch_key=batch_key, layer=layer, key=key, config=config,
                                    ambient_profile=ambient_profile, **fit_settings)
    for name in (*OBSM_KEYS.values(), f"{CLUSTER_KEY}_probabilities"):
        if name in annotated.obsm:
            adata.obsm[name] = annotated.obsm[name]
    for name in LAYER_KEYS.values():
        if name in annotated.layers:
            adata.layers[name] = annotated.layers[name]
    if CLUSTER_KEY in annotated.obs:
        adata.obs[CLUSTER_KEY] = annotated.obs[CLUSTER_KEY].array  # the categorical, not aligned on the index
    params = {"batch_key": batch_key, "layer": layer, "config": fitted.pipeline.config.to_dict(), **fit_settings}
    curves = {stage: {name: np.asarray(values) for name, values in stage_curves.items()}
              for stage, stage_curves in fitted.curves.items()}
    record_settings(adata, "diffbio_pipeline", params)
    adata.uns["diffbio_pipeline"]["curves"] = curves
    if "diffbio_batch_categories" in annotated.uns:
        adata.uns["diffbio_batch_categories"] = annotated.uns["diffbio_batch_categories"]
    return fitted.pipeline


# --- differential expression and archetypes (issue 22) ---
def _marker_inputs(adata: ad.AnnData, groupby: str, groups: Any, reference: str, use_raw: bool | None,
                   layer: str | None) -> tuple[np.ndarray, list[str], np.ndarray, bool, pd.Index]:
    """The expression matrix (scanpy's choice of raw / layer / X), the compared group names and their masks."""
    if groupby not in adata.obs:
        raise ValueError(f"groupby: {groupby!r} is not a column of adata.obs")
    if isinstance(groups, str) and groups != "all":  # scanpy refuses it too: "12" would read as groups "1", "2"
        raise ValueError(f"groups: pass a sequence of group names or 'all', got the string {groups!r}")
    labels = adata.obs[groupby].astype("category")
    categories = [str(c) for c in labels.cat.categories]
    names = categories if groups == "all" else [str(g) for g in groups]
    if reference != "rest" and reference not in names:
        names = [*names, reference]
    unknown = [n for n in names if n not in categories]
    if unknown:
        raise ValueError(f"groups: {unknown[0]!r} is not a category of adata.obs[{groupby!r}] ({categories})")
    values = labels.astype(str).to_numpy()
    masks = np.stack([values == n for n in names])
    small = [n for n, m in zip(names, masks) if m.sum() < 2]
    if small:
        raise ValueError(f"groups: {small[0]!r} has fewer than 2 cells in adata.obs[{groupby!r}]")
    if use_raw is None:  # scanpy's rule, which does not look at `layer`
        use_raw = adata.raw is not None
    elif use_raw and adata.raw is None:  # scanpy refuses it rather than reading X
        raise ValueError("use_raw: True, but adata.raw is not set; pass use_raw=False to read X (or layer=)")
    if layer is not None and use_raw:  # scanpy refuses the pair too
        raise ValueError(f"layer: {layer!r} given with use_raw=True (the default when adata.raw is set, as in "
                         "scanpy); both name where the expression is: pass use_raw=False to read the layer")
    source = adata.raw if use_raw and adata.raw is not None else adata
    matrix, name = (source.X, "adata.raw.X") if source is not adata else _layer_matrix(adata, layer)
    x = _dense(matrix)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: rank_genes_groups needs finite expression values")
    return x, names, masks, bool(use_raw and adata.raw is not None), source.var_names


def rank_genes_groups(
    adata: ad.AnnData,
    groupby: str,
    *,
    groups: Sequence[str] | str = "all",
    reference: str = "rest",
    method: str = "t-test",
    corr_method: str = "benjamini-hochberg",
    tie_correct: bool = False,
    use_raw: bool | None = None,
    layer: str | None = None,
    key_added: str | None = None,
    **options: Any,
) -> None:
    """Rank marker genes per group, as `scanpy.tl.rank_genes_groups` (same statistics, same `uns` layout).

    The statistics are computed in float64, as scanpy computes them, whether or not `jax_enable_x64` is set.

    **Arguments:**

    - `adata`: log-normalised expression (`raw` if present and `use_raw` is not False, else `layer` or `X`).
    - `groupby`: `obs` column of the groups.
    - `groups`: the groups to score, or `"all"`.
    - `reference`: `"rest"` (every other cell) or one group's name.
    - `method`: `"t-test"` (Welch, scanpy's default), `"t-test_overestim_var"` or `"wilcoxon"`.
    - `corr_method`: `"benjamini-hochberg"` or `"bonferroni"`.
    - `tie_correct`: Wilcoxon tie correction.
    - `use_raw`, `layer`: where the expression is read (as scanpy).
    - `key_added`: `uns` key (default `"rank_genes_groups"`).
    - `options`: scanpy's `n_genes` (the top genes kept in the records; None: all), `rankby_abs` (rank by
      |score|) and `pts` (also write each gene's fraction of cells expressing it per group, `pts`, and, against
      the rest, in the rest, `pts_rest`).

    **Writes:** `uns[key_added]` with `params` and the record arrays `names`, `scores` (float32), `pvals`,
    `pvals_adj`, `logfoldchanges` (float32), one field per group, genes sorted by score as scanpy sorts them
    (adjusted over all genes before the top `n_genes` are kept); with `pts`, the gene x group tables `pts` (every
    group compared, the reference too) and `pts_rest`. `scanpy.pl.rank_genes_groups` and
    `scanpy.get.rank_genes_groups_df` read it.
    """
    from ._de._markers import rank_genes

    if corr_method not in ("benjamini-hochberg", "bonferroni"):
        raise ValueError(f"corr_method: {corr_method!r} is not 'benjamini-hochberg' or 'bonferroni'")
    options = _marker_options(options)
    x, names, masks, used_raw, var_names = _marker_inputs(check_adata(adata), groupby, groups, reference, use_raw,
                                                          layer)
    keep = [i for i, n in enumerate(names) if reference == "rest" or n != reference]
    tested = masks[keep]
    rests = ~tested if reference == "rest" else np.repeat(masks[names.index(reference)][None], len(keep), axis=0)
    base = adata.uns.get("log1p", {}).get("base")
    log_base = 1.0 if base is None else float(np.log(base))
    # float64 statistics whatever jax_enable_x64, as scanpy computes them: in float32 the scores differ from
    # scanpy's by up to 3e-6 (Wilcoxon) and 8e-4 (t-test) relative, the p-values by up to 7e-5
    with jax.enable_x64(True):
        result = rank_genes(jnp.asarray(x), jnp.asarray(tested), jnp.asarray(rests), jnp.float64(log_base),
                            method=method, tie_correct=tie_correct, vs_rest=reference == "rest")
    pvals = np.asarray(result.pvals)
    adjusted = (np.asarray(result.pvals_adj) if corr_method == "benjamini-hochberg"
                else np.minimum(pvals * x.shape[1], 1.0))
    columns = {"scores": np.asarray(result.scores), "pvals": pvals, "pvals_adj": adjusted,
               "logfoldchanges": np.asarray(result.logfoldchanges)}
    records = _marker_records([names[i] for i in keep], var_names, columns, n_genes=options["n_genes"],
                              rankby_abs=options["rankby_abs"])
    if options["pts"]:
        records.update(_expressed_fractions(x, names, masks, var_names, reference))
    adata.uns[key_added or "rank_genes_groups"] = {
        "params": {"groupby": groupby, "reference": reference, "method": method, "use_raw": used_raw,
                   "layer": layer, "corr_method": corr_method}, **records}


#: scanpy's options that shape `rank_genes_groups`' records, with its defaults.
MARKER_OPTIONS = {"n_genes": None, "rankby_abs": False, "pts": False}


def _marker_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(MARKER_OPTIONS))
    if unknown:
        raise TypeError(f"rank_genes_groups: unexpected keyword argument {unknown[0]!r} (options: "
                        f"{sorted(MARKER_OPTIONS)})")
    if options.get("n_genes") is not None:
        check_whole(options["n_genes"], "n_genes")
    return {**MARKER_OPTIONS, **options}


def _expressed_fractions(x: np.ndarray, names: list[str], masks: np.ndarray, var_names: pd.Index,
                         reference: str) -> dict[str, pd.DataFrame]:
    """scanpy's `pts` (share of each group's cells with a nonzero value, every group compared) and, against the
    rest, `pts_rest` (the same among all other cells)."""
    nonzero = x != 0
    fractions = {"pts": np.stack([nonzero[m].mean(axis=0) for m in masks], axis=1)}
    if reference == "rest":
        fractions["pts_rest"] = np.stack([nonzero[~m].mean(axis=0) for m in masks], axis=1)
    return {name: pd.DataFrame(f, index=var_names, columns=pd.Index(names)) for name, f in fractions.items()}


def _marker_records(group_names: list[str], var_names: pd.Index, columns: dict[str, np.ndarray], *,
                    n_genes: int | None = None, rankby_abs: bool = False) -> dict[str, Any]:
    """scanpy's record arrays: per group, the top `n_genes` genes by descending score (or |score|), its
    argpartition + argsort."""
    n_genes = len(var_names) if n_genes is None else min(n_genes, len(var_names))
    dtypes = {"names": "O", "scores": "float32", "logfoldchanges": "float32", "pvals": "float64",
              "pvals_adj": "float64"}
    frames: dict[str, dict[str, np.ndarray]] = {name: {} for name in dtypes}
    for g, group in enumerate(group_names):
        scores = np.abs(columns["scores"][g]) if rankby_abs else columns["scores"][g]
        partition = np.argpartition(scores, -n_genes)[-n_genes:]
        order = partition[np.argsort(scores[partition])[::-1]]
        frames["names"][group] = np.asarray(var_names[order], dtype=object)
        for name in ("scores", "pvals", "pvals_adj", "logfoldchanges"):
            frames[name][group] = columns[name][g][order]
    return {name: pd.DataFrame(frames[name]).to_records(index=False, column_dtypes=dtypes[name])
            for name in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj")}


def _pseudobulk(adata: ad.AnnData, sample_key: str, condition_key: str, layer: str | None
                ) -> tuple[np.ndarray, pd.Series]:
    """Counts summed per sample, and each sample's condition (one per sample, else a ValueError)."""
    for argument, column in (("sample_key", sample_key), ("condition_key", condition_key)):
        if column not in adata.obs:
            raise ValueError(f"{argument}: {column!r} is not a column of adata.obs")
        missing = int(adata.obs[column].isna().sum())
        if missing:  # pydeseq2 refuses missing design factors too
            raise ValueError(f"{argument}: adata.obs[{column!r}] has {missing} missing values; drop those cells or "
                             "fill them in")
    samples = adata.obs[sample_key].astype(str).to_numpy()
    names, codes = np.unique(samples, return_inverse=True)
    matrix, name = _layer_matrix(adata, layer)
    indicator = np.zeros((len(names), len(samples)))
    indicator[codes, np.arange(len(samples))] = 1.0
    summed = np.asarray(indicator @ matrix if not hasattr(matrix, "toarray") else (matrix.T @ indicator.T).T)
    if np.any(summed < 0) or not np.all(np.isfinite(summed)) or np.any(summed != np.round(summed)):
        raise ValueError(f"{name}: pseudobulk_de needs non-negative whole-number counts (use layer= for raw "
                         "counts)")
    per_sample = pd.DataFrame({"s": samples, "c": adata.obs[condition_key].astype(str).to_numpy()})
    levels = per_sample.groupby("s")["c"].nunique()
    mixed = [sample for sample, count in levels.items() if count > 1]
    if mixed:
        raise ValueError(f"condition_key: sample {mixed[0]!r} holds more than one condition")
    return summed, per_sample.groupby("s")["c"].first().loc[names]


def pseudobulk_de(
    adata: ad.AnnData,
    sample_key: str,
    condition_key: str,
    *,
    reference: str,
    test: str,
    layer: str | None = None,
    options: DESeq2Options | None = None,
    key_added: str = "pseudobulk_de",
) -> pd.DataFrame:
    """Pseudobulk DESeq2 of `test` against `reference`, as pydeseq2 (`~condition`, Wald test, BH).

    Counts are summed per sample; the design is an intercept plus one indicator per non-reference condition
    (pydeseq2's treatment coding). See `diffbio_eqx._de._deseq2` for each step as pydeseq2 runs it, with its
    defaults: Cook's outliers replaced and refitted in conditions of 7 or more samples, p-values of remaining
    outliers NaN, independent filtering on `baseMean` at `alpha`. It runs in float64, as pydeseq2, whether or not
    `jax_enable_x64` is set.

    **Arguments:**

    - `adata`: raw counts in `X` or `layer`.
    - `sample_key`, `condition_key`: `obs` columns of the replicate sample and of its condition.
    - `reference`, `test`: the two conditions compared (log2 fold change of `test` over `reference`).
    - `layer`: read counts from this layer. `key_added`: `uns` key of the table.
    - `options`: a `DESeq2Options` (`refit_cooks`, `cooks_filter`, `independent_filter`, `alpha`,
      `min_replicates`, as pydeseq2's `DeseqDataSet` and `DeseqStats`); None: pydeseq2's defaults.

    **Returns:** a table indexed by gene with pydeseq2's `results_df` columns `baseMean`, `log2FoldChange`,
    `lfcSE`, `stat`, `pvalue`, `padj`; also stored in `uns[key_added]["results"]` with the size factors.
    """
    from ._de._deseq2 import deseq2

    if str(test) == str(reference):
        raise ValueError(f"test: must differ from reference (both {test!r})")
    summed, conditions = _pseudobulk(check_adata(adata), sample_key, condition_key, layer)
    levels = [reference] + sorted(set(conditions) - {reference})
    for field, value in (("reference", reference), ("test", test)):
        if value not in set(conditions):
            raise ValueError(f"{field}: {value!r} is not a condition in adata.obs[{condition_key!r}]")
    design = np.column_stack([np.ones(len(conditions))] + [(conditions == c).to_numpy(float) for c in levels[1:]])
    if len(conditions) <= design.shape[1]:
        raise ValueError(f"sample_key: {len(conditions)} samples leave no replicate for {design.shape[1]} design "
                         "columns")
    if not np.all(summed > 0, axis=0).any():
        raise ValueError("X: every gene has a zero in some sample; median-of-ratios size factors need one without")
    contrast = np.array([0.0] + [1.0 if c == test else 0.0 for c in levels[1:]])
    linear_mu = len(np.unique(design, axis=0)) == design.shape[1]
    options = DESeq2Options() if options is None else options
    with jax.enable_x64(True):  # as pydeseq2, float64: in float32 the NB likelihood near alpha 1e-8 is noise
        result = deseq2(jnp.asarray(summed, jnp.float64), jnp.asarray(design, jnp.float64),
                        jnp.asarray(contrast, jnp.float64), linear_mu=linear_mu, options=options)
    table = pd.DataFrame({name: np.asarray(getattr(result, field)) for name, field in (
        ("baseMean", "base_mean"), ("log2FoldChange", "log2_fold_change"), ("lfcSE", "lfc_se"), ("stat", "stat"),
        ("pvalue", "pvalue"), ("padj", "padj"))}, index=adata.var_names.copy())
    adata.uns[key_added] = {"params": {"sample_key": sample_key, "condition_key": condition_key,
                                       "reference": reference, "test": test, **dataclasses.asdict(options)},
                            "results": table, "size_factors": np.asarray(result.size_factors)}
    return table


def switch_de(
    adata: ad.AnnData,
    pseudotime_key: str = "dpt_pseudotime",
    *,
    layer: str | None = None,
    zero_inflated: bool = False,
    key_added: str = "switch_de",
) -> pd.DataFrame:
    """SwitchDE along pseudotime: a sigmoid per gene and its likelihood-ratio test (switchde's `testDE`).

    It runs in float64, as switchde (R), whether or not `jax_enable_x64` is set.

    **Arguments:**

    - `adata`: log-normalised expression in `X` or `layer`.
    - `pseudotime_key`: `obs` column of the pseudotime.
    - `zero_inflated`: fit switchde's zero-inflated (dropout) model.
    - `key_added`: prefix of the `var` columns and the `uns` key.

    **Returns:** a table indexed by gene with switchde's columns `pval`, `qval`, `mu0`, `k`, `t0`; also written to
    `var[f"{key_added}_{column}"]`, with the settings in `uns[key_added]`.
    """
    from ._de._switchde import switch_de as fit_switch

    check_adata(adata)
    if pseudotime_key not in adata.obs:
        raise ValueError(f"pseudotime_key: {pseudotime_key!r} is not a column of adata.obs")
    t = np.asarray(adata.obs[pseudotime_key], dtype=float)
    matrix, name = _layer_matrix(adata, layer)
    y = _dense(matrix)
    if not np.all(np.isfinite(t)):
        raise ValueError(f"pseudotime_key: adata.obs[{pseudotime_key!r}] must be finite")
    if not np.ptp(t) > 0:
        raise ValueError(f"pseudotime_key: adata.obs[{pseudotime_key!r}] is constant; a switch needs cells along a "
                         "pseudotime")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name}: switch_de needs finite expression values")
    # float64 as switchde (R): in float32 BFGS stops short on the zero-inflated likelihood (log-likelihoods up
    # to 0.9 low, p-values off by up to 0.5, null p-values not uniform)
    with jax.enable_x64(True):
        result = fit_switch(jnp.asarray(y, jnp.float64), jnp.asarray(t, jnp.float64), zero_inflated=zero_inflated)
    table = pd.DataFrame({"pval": np.asarray(result.pvalue), "qval": np.asarray(result.qvalue),
                          "mu0": np.asarray(result.mu0), "k": np.asarray(result.k), "t0": np.asarray(result.t0)},
                         index=adata.var_names.copy())
    for column in table.columns:
        adata.var[f"{key_added}_{column}"] = table[column].to_numpy()
    adata.uns[key_added] = {"params": {"pseudotime_key": pseudotime_key, "zero_inflated": zero_inflated}}
    return table


def differential_distribution(
    adata: ad.AnnData,
    condition_key: str,
    *,
    first: str,
    key: PRNGKeyArray,
    layer: str | None = None,
    n_permutations: int = 1000,
    alpha: float = 0.05,
    key_added: str = "differential_distribution",
) -> pd.DataFrame:
    """Differentially distributed genes between the `first` condition and the others: the KS statistic (SciPy's
    `ks_2samp`), permutation p-values, BH q-values and scDD's pattern class (EE, DE, DP, DM, DB).

    It runs in float64, as SciPy, whether or not `jax_enable_x64` is set.

    **Arguments:**

    - `adata`: log-normalised expression in `X` or `layer`.
    - `condition_key`: `obs` column of the condition; `first`: the level compared with all other cells.
    - `key`: PRNG key for the permutations. `n_permutations`: per gene. `alpha`: FDR for calling a gene DD.
    - `key_added`: `uns` key of the table.

    **Returns:** a table indexed by gene: `statistic`, `pvalue`, `qvalue`, `pattern`, `n_modes_first`,
    `n_modes_rest`; also in `uns[key_added]["results"]`.
    """
    from ._de._distribution import PATTERNS, differential_distribution as fit_dd

    check_adata(adata)
    if condition_key not in adata.obs:
        raise ValueError(f"condition_key: {condition_key!r} is not a column of adata.obs")
    if n_permutations < 1:
        raise ValueError(f"n_permutations: must be at least 1, got {n_permutations}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: must be in (0, 1), got {alpha}")
    labels = adata.obs[condition_key].astype(str).to_numpy()
    in_first = labels == str(first)
    if in_first.sum() < 2 or (~in_first).sum() < 2:
        raise ValueError(f"first: {first!r} must leave at least 2 cells on each side of adata.obs[{condition_key!r}]")
    matrix, name = _layer_matrix(adata, layer)
    x = _dense(matrix)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: differential_distribution needs finite expression values")
    with jax.enable_x64(True):  # as SciPy's ks_2samp: in float32 the statistic rounds off SciPy's
        result = fit_dd(jnp.asarray(x, jnp.float64), jnp.asarray(in_first), key=key, n_permutations=n_permutations,
                        alpha=alpha)
    modes = np.asarray(result.n_modes)
    table = pd.DataFrame({"statistic": np.asarray(result.statistic), "pvalue": np.asarray(result.pvalue),
                          "qvalue": np.asarray(result.qvalue),
                          "pattern": pd.Categorical(np.asarray(PATTERNS)[np.asarray(result.pattern)],
                                                    categories=list(PATTERNS)),
                          "n_modes_first": modes[:, 0], "n_modes_rest": modes[:, 1]}, index=adata.var_names.copy())
    adata.uns[key_added] = {"params": {"condition_key": condition_key, "first": str(first),
                                       "n_permutations": n_permutations, "alpha": alpha}, "results": table}
    return table


def archetypes(
    adata: ad.AnnData,
    n_archetypes: int,
    *,
    key: PRNGKeyArray,
    use_rep: str | None = None,
    max_iter: int = 500,
    key_added: str = "archetypes",
) -> None:
    """Archetypal analysis by PCHA (py_pcha's algorithm, seeded) on a representation.

    **Arguments:**

    - `adata`: the cells. `n_archetypes`: how many archetypes.
    - `key`: PRNG key of the furthest-sum start and the initial weights.
    - `use_rep`: `obsm` key or `"X"` (default: the corrected latent, the VAE's, or PCA).
    - `max_iter`: outer PCHA iterations at most. `key_added`: `obsm[f"X_{key_added}"]` and `uns[key_added]`.

    **Writes:** `obsm[f"X_{key_added}"]` each cell's weights on the archetypes (rows on the simplex);
    `uns[key_added]` with `archetypes` (in the representation's coordinates), `c` (each archetype's convex
    weights over the cells), `variance_explained` and `params`.
    """
    from ._archetypes._pcha import pcha

    x, rep = representation(check_adata(adata), use_rep)
    if check_whole(n_archetypes, "n_archetypes") > x.shape[0]:
        raise ValueError(f"n_archetypes: {n_archetypes} must be between 1 and the number of cells ({x.shape[0]})")
    if not np.any(np.ptp(np.asarray(x), axis=0) > 0):
        raise ValueError(f"use_rep: the cells' {rep} coordinates are all identical; archetypes need spread")
    result = pcha(jnp.asarray(x, dtype=jnp.zeros(()).dtype), n_archetypes, key=key, max_iter=max_iter)
    adata.obsm[f"X_{key_added}"] = host_array(result.weights)
    adata.uns[key_added] = {"params": {"n_archetypes": n_archetypes, "use_rep": rep, "max_iter": max_iter},
                            "archetypes": host_array(result.archetypes), "c": host_array(result.c).T,
                            "variance_explained": float(result.variance_explained)}


def _reference_code(reference_batch: str | int, categories: list[str], batch_key: str) -> int:
    """The code of `reference_batch`, a category name or a code, among `batch_key`'s `categories`."""
    if isinstance(reference_batch, str):
        if reference_batch not in categories:
            raise ValueError(f"reference_batch: {reference_batch!r} is not a category of {batch_key!r}")
        return categories.index(reference_batch)
    reference = check_whole(reference_batch, "reference_batch", minimum=0)
    if reference >= len(categories):
        raise ValueError(f"reference_batch: code {reference} is not one of {batch_key!r}'s {len(categories)} batches")
    return reference


def integrate(
    adata: ad.AnnData,
    method: str = "mmd",
    *,
    batch_key: str,
    key: PRNGKeyArray,
    model: VAENormalizer | Harmony | None = None,
    reference_batch: str | int = 0,
    layer: str | None = None,
    use_rep: str | None = None,
    **fit_settings: Any,
) -> Any:
    """Batch correction by `method`, written as `obsm["X_diffbio_corrected"]`.

    - `"harmony"`: Harmony on an existing embedding (`use_rep`; default `obsm["X_diffbio"]`, else `X_pca`),
      as `harmony`.
    - `"mmd"`: scVI's VAE trained on the counts with trVAE's MMD penalty between every pair of batches
      (`fit_mmd_vae`); `fit_settings` go to it (`beta=`, `mmd_on=`, `settings=TrainSettings(...)`, ...).
    - `"adversarial"`: the VAE trained against a WGAN-GP batch critic on its latent (`fit_adversarial_vae`;
      `adversarial_weight=`, `critic=CriticSettings(...)`, ...).

    For the trained correctors the corrected embedding is the latent (posterior means), and
    `layers["diffbio_corrected"]` holds every cell's expression decoded into `reference_batch` (a category of
    `batch_key` or its code). `uns["diffbio_integrate"]` records the settings and the loss curve.

    **Arguments:**

    - `adata`: cells x genes with raw counts in `X` (or `layers[layer]`).
    - `method`: `"harmony"`, `"mmd"` or `"adversarial"`.
    - `batch_key`: `obs` column with each cell's batch. (Keyword only argument.)
    - `key`: PRNG key.
    - `model`: a `VAENormalizer` carrying the settings (None: `VAENormalizer(n_vars, n_batches)`), or for
      `"harmony"` a `Harmony` (None: `Harmony()`).
    - `reference_batch`, `layer`, `use_rep`: see above.

    **Returns:** the trained `VAENormalizer` (`"mmd"`, `"adversarial"`) or the `HarmonyResult`.
    """
    from ._integration._adversarial import fit_adversarial_vae
    from ._integration._common import corrected_expression
    from ._integration._mmd_vae import fit_mmd_vae

    if method == "harmony":
        if fit_settings:
            raise ValueError(f"fit_settings: method='harmony' takes none, got {sorted(fit_settings)}")
        if model is not None and not isinstance(model, Harmony):  # a model given is used, never dropped
            raise ValueError(f"model: method='harmony' takes a Harmony (or None), got {type(model).__name__}")
        return harmony(adata, batch_key, model, use_rep=use_rep, key=key)
    if isinstance(model, Harmony):
        raise ValueError(f"model: a Harmony is for method='harmony'; method={method!r} takes a VAENormalizer")
    if method not in ("mmd", "adversarial"):
        raise ValueError(f"method: must be 'harmony', 'mmd' or 'adversarial', got {method!r}")
    fit_settings = fit_keywords(fit_settings, "fit_mmd_vae" if method == "mmd" else "fit_adversarial_vae")
    genes = None if model is None else model.genes
    arrays = from_anndata(check_adata(adata), layer=layer, batch_key=batch_key, genes=genes,
                          genes_owner="the model's")
    categories = list(arrays.batch_categories or ())
    if arrays.batch_labels is None or np.unique(arrays.batch_labels).size < 2:  # cells in two batches, not categories
        raise ValueError(f"batch_key: {batch_key!r} must hold cells of at least two batches")
    reference = _reference_code(reference_batch, categories, batch_key)
    init_key, fit_key = jr.split(key)
    if model is None:
        model = VAENormalizer(adata.n_vars, len(categories), genes=arrays.genes, key=init_key)
    if method == "mmd":
        fitted = fit_mmd_vae(model, arrays.counts, arrays.batch_labels, key=fit_key, **fit_settings)
    else:
        fitted = fit_adversarial_vae(model, arrays.counts, arrays.batch_labels, key=fit_key, **fit_settings).fit
    trained = fitted.model
    output = vae_transform(trained, arrays.counts, arrays.batch_labels)
    corrected = host_array(corrected_expression(trained, arrays.counts, arrays.batch_labels,
                                                reference_batch=reference))
    if arrays.columns is not None:
        full = np.full((adata.n_obs, adata.n_vars), np.nan, np.float32)
        full[:, arrays.columns] = corrected
        corrected = full
    to_anndata(adata, {"corrected_embeddings": output.latent}, copy=False)
    adata.layers["diffbio_corrected"] = corrected
    params = {"method": method, "batch_key": batch_key, "layer": layer, "reference_batch": categories[reference],
              "batch_categories": categories, **{k: v for k, v in fit_settings.items() if k != "settings"}}
    _record(adata, "integrate", params, train_loss=fitted.train_loss)
    return trained
