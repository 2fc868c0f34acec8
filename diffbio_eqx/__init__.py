import importlib.metadata

from . import datasets as datasets, io as io
from ._distributions import (
    negative_binomial_log_prob as negative_binomial_log_prob,
    negative_binomial_log_prob_logspace as negative_binomial_log_prob_logspace,
    poisson_log_prob as poisson_log_prob,
    poisson_log_prob_logspace as poisson_log_prob_logspace,
    zero_inflated_negative_binomial_log_prob as zero_inflated_negative_binomial_log_prob,
    zero_inflated_negative_binomial_log_prob_logspace as zero_inflated_negative_binomial_log_prob_logspace,
)
from ._harmony import (
    harmony as harmony,
    harmony_early_exit as harmony_early_exit,
    harmony_transform as harmony_transform,
    HarmonyResult as HarmonyResult,
    map_to_reference as map_to_reference,
)
from ._kmeans import (
    annealing_schedule as annealing_schedule,
    free_energy as free_energy,
    hard_assign as hard_assign,
    inertia as inertia,
    kmeans_plus_plus as kmeans_plus_plus,
    soft_assign as soft_assign,
    soft_kmeans as soft_kmeans,
    SoftKMeansResult as SoftKMeansResult,
    squared_distances as squared_distances,
    update_centroids as update_centroids,
)
from ._losses import (
    clustering_compactness_loss as clustering_compactness_loss,
    ClusteringCompactnessLoss as ClusteringCompactnessLoss,
    umap_loss as umap_loss,
)
from ._metrics import (
    adjusted_rand_index as adjusted_rand_index,
    clisi as clisi,
    ilisi as ilisi,
    lisi as lisi,
    normalized_mutual_info as normalized_mutual_info,
    silhouette_label as silhouette_label,
)
from ._nn import CovariateMLP as CovariateMLP
from ._pipeline import (
    cell_type_cross_entropy as cell_type_cross_entropy,
    create_single_cell_pipeline as create_single_cell_pipeline,
    fit_anndata as fit_anndata,
    fit_pipeline as fit_pipeline,
    HarmonyReference as HarmonyReference,
    load_pipeline as load_pipeline,
    pipeline_loss as pipeline_loss,
    PipelineFit as PipelineFit,
    PipelineLossWeights as PipelineLossWeights,
    PipelineOutput as PipelineOutput,
    run_pipeline as run_pipeline,
    run_pipeline_in_chunks as run_pipeline_in_chunks,
    save_pipeline as save_pipeline,
    SingleCellPipeline as SingleCellPipeline,
    SingleCellPipelineConfig as SingleCellPipelineConfig,
    sweep_pipeline as sweep_pipeline,
    umap_graph_loss as umap_graph_loss,
)
from ._simulate import SimulatedData as SimulatedData, simulate as simulate
from ._stages._ambient import (
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
from ._stages._clustering import SoftKMeans as SoftKMeans
from ._stages._harmony import Harmony as Harmony
from ._stages._umap import (
    ParametricUMAP as ParametricUMAP,
    umap_graph as umap_graph,
    UMAPFitResult as UMAPFitResult,
)
from ._stages._vae import (
    fit_vae as fit_vae,
    load_vae as load_vae,
    save_vae as save_vae,
    VAELoss as VAELoss,
    VAENormalizer as VAENormalizer,
    VAEOutput as VAEOutput,
    vae_latent as vae_latent,
    vae_log_likelihood as vae_log_likelihood,
    vae_transform as vae_transform,
)
from ._train import (
    data_mesh as data_mesh,
    fit as fit,
    FitResult as FitResult,
    map_in_chunks as map_in_chunks,
    scvi_optimizer as scvi_optimizer,
    SparseRows as SparseRows,
)
from ._scale import (
    GeneParameters as GeneParameters,
    simulate_sparse as simulate_sparse,
    SparseSimulation as SparseSimulation,
)
from ._umap_graph import (
    exact_knn as exact_knn,
    find_ab_params as find_ab_params,
    fuzzy_simplicial_set as fuzzy_simplicial_set,
    FuzzyGraph as FuzzyGraph,
    membership_strengths as membership_strengths,
    smooth_knn_dist as smooth_knn_dist,
)
from ._validate import (
    check_ambient_profile as check_ambient_profile,
    check_batch_labels as check_batch_labels,
    check_counts as check_counts,
    check_embedding as check_embedding,
    check_n_clusters as check_n_clusters,
    NonIntegerCountsWarning as NonIntegerCountsWarning,
)


__version__ = importlib.metadata.version("diffbio_eqx")
