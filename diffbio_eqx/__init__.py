import importlib.metadata

from . import datasets as datasets, io as io, pl as pl, pp as pp, tl as tl
from ._ambient._stage import (
    AmbientProfileWarning as AmbientProfileWarning,
    AmbientRemoval as AmbientRemoval,
    AmbientResult as AmbientResult,
    empty_droplet_threshold as empty_droplet_threshold,
    estimate_ambient_count as estimate_ambient_count,
    estimate_ambient_profile as estimate_ambient_profile,
    fit_ambient_removal as fit_ambient_removal,
    remove_ambient as remove_ambient,
    resolve_ambient_profile as resolve_ambient_profile,
)
from ._clustering._kmeans import (
    SoftKMeansResult as SoftKMeansResult,
    annealing_schedule as annealing_schedule,
    free_energy as free_energy,
    hard_assign as hard_assign,
    inertia as inertia,
    kmeans_plus_plus as kmeans_plus_plus,
    soft_assign as soft_assign,
    soft_kmeans as soft_kmeans,
    update_centroids as update_centroids,
)
from ._clustering._loss import (
    ClusteringCompactnessLoss as ClusteringCompactnessLoss,
    clustering_compactness_loss as clustering_compactness_loss,
)
from ._clustering._stage import SoftKMeans as SoftKMeans, fit_soft_kmeans as fit_soft_kmeans
from ._core._distributions import (
    negative_binomial_log_prob as negative_binomial_log_prob,
    negative_binomial_log_prob_logspace as negative_binomial_log_prob_logspace,
    poisson_log_prob as poisson_log_prob,
    poisson_log_prob_logspace as poisson_log_prob_logspace,
    zero_inflated_negative_binomial_log_prob as zero_inflated_negative_binomial_log_prob,
    zero_inflated_negative_binomial_log_prob_logspace as zero_inflated_negative_binomial_log_prob_logspace,
)
from ._core._geometry import squared_distances as squared_distances
from ._core._metrics import (
    adjusted_rand_index as adjusted_rand_index,
    clisi as clisi,
    ilisi as ilisi,
    lisi as lisi,
    normalized_mutual_info as normalized_mutual_info,
    silhouette_label as silhouette_label,
)
from ._core._neighbors import (
    FuzzyGraph as FuzzyGraph,
    NeighborGraph as NeighborGraph,
    exact_knn as exact_knn,
    fuzzy_simplicial_set as fuzzy_simplicial_set,
    membership_strengths as membership_strengths,
    neighbor_graph as neighbor_graph,
    smooth_knn_dist as smooth_knn_dist,
)
from ._core._nn import CovariateMLP as CovariateMLP
from ._core._train import (
    FitResult as FitResult,
    SparseRows as SparseRows,
    TrainSettings as TrainSettings,
    TrainState as TrainState,
    data_mesh as data_mesh,
    fit as fit,
    map_in_chunks as map_in_chunks,
    scvi_optimizer as scvi_optimizer,
)
from ._core._validate import (
    NonIntegerCountsWarning as NonIntegerCountsWarning,
    check_ambient_profile as check_ambient_profile,
    check_batch_labels as check_batch_labels,
    check_counts as check_counts,
    check_embedding as check_embedding,
    check_n_clusters as check_n_clusters,
)
from ._harmony._math import HarmonyResult as HarmonyResult, map_to_reference as map_to_reference
from ._harmony._stage import Harmony as Harmony, harmony as harmony, harmony_transform as harmony_transform
from ._pipeline import (
    FitSettings as FitSettings,
    HarmonyReference as HarmonyReference,
    PipelineFit as PipelineFit,
    PipelineLossWeights as PipelineLossWeights,
    PipelineOutput as PipelineOutput,
    SingleCellPipeline as SingleCellPipeline,
    SingleCellPipelineConfig as SingleCellPipelineConfig,
    cell_type_cross_entropy as cell_type_cross_entropy,
    create_single_cell_pipeline as create_single_cell_pipeline,
    fit_pipeline as fit_pipeline,
    load_pipeline as load_pipeline,
    pipeline_loss as pipeline_loss,
    run_pipeline as run_pipeline,
    run_pipeline_in_chunks as run_pipeline_in_chunks,
    save_pipeline as save_pipeline,
    sweep_pipeline as sweep_pipeline,
    umap_graph_loss as umap_graph_loss,
)
from ._simulate._scale import (
    GeneParameters as GeneParameters,
    SparseSimulation as SparseSimulation,
    simulate_sparse as simulate_sparse,
)
from ._simulate._simulate import SimulatedData as SimulatedData, simulate as simulate
from ._umap._graph import find_ab_params as find_ab_params
from ._umap._loss import umap_loss as umap_loss
from ._umap._stage import (
    ParametricUMAP as ParametricUMAP,
    UMAPFitResult as UMAPFitResult,
    fit_umap as fit_umap,
    umap_graph as umap_graph,
)
from ._vae._stage import (
    VAELoss as VAELoss,
    VAENormalizer as VAENormalizer,
    VAEOptions as VAEOptions,
    VAEOutput as VAEOutput,
    fit_vae as fit_vae,
    load_vae as load_vae,
    save_vae as save_vae,
    vae_latent as vae_latent,
    vae_log_likelihood as vae_log_likelihood,
    vae_transform as vae_transform,
)
from .io import fit_anndata as fit_anndata, run_anndata as run_anndata


__version__ = importlib.metadata.version("diffbio_eqx")
