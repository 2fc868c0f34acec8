"""diffbio_eqx: differentiable single-cell RNA-seq workflows in pure JAX, built from immutable Equinox modules.

This namespace holds the user-level API. The package is layered (ARCHITECTURE.md; import-linter keeps it so):
`_core` (input checks, distributions, network blocks, the training loop, checkpoints, the neighbour graph,
metrics, the stage contract) at the bottom; one package per method family above it (`_ambient`, `_vae`,
`_harmony`, `_umap`, `_clustering`); the pipeline (`_pipeline`) above them; and the faces at the top (`io`, `pp`,
`tl`, `pl`, `datasets`, the simulators, the command line). Internals stay reachable from their modules.
"""

import importlib.metadata

from . import datasets as datasets, io as io, pl as pl, pp as pp, tl as tl
from ._ambient._stage import (
    AmbientProfileWarning as AmbientProfileWarning,
    AmbientRemoval as AmbientRemoval,
    AmbientResult as AmbientResult,
    estimate_ambient_profile as estimate_ambient_profile,
    fit_ambient_removal as fit_ambient_removal,
    remove_ambient as remove_ambient,
)
from ._annotation._cellassign import (
    CellAssign as CellAssign,
    cellassign_data as cellassign_data,
    cellassign_probabilities as cellassign_probabilities,
    fit_cellassign as fit_cellassign,
    init_cellassign as init_cellassign,
)
from ._annotation._celltypist import (
    CellTypistModel as CellTypistModel,
    CellTypistPrediction as CellTypistPrediction,
    MissingGenesWarning as MissingGenesWarning,
    load_celltypist as load_celltypist,
    predict_celltypist as predict_celltypist,
    save_celltypist as save_celltypist,
    train_celltypist as train_celltypist,
)
from ._annotation._scanvi import (
    SCANVI as SCANVI,
    fit_scanvi as fit_scanvi,
    label_codes as label_codes,
    scanvi_from_vae as scanvi_from_vae,
    scanvi_probabilities as scanvi_probabilities,
)
from ._clustering._kmeans import (
    SoftKMeansResult as SoftKMeansResult,
    kmeans_plus_plus as kmeans_plus_plus,
    soft_kmeans as soft_kmeans,
)
from ._clustering._loss import ClusteringCompactnessLoss as ClusteringCompactnessLoss
from ._clustering._mixture_stage import (
    GaussianMixture as GaussianMixture,
    fit_gaussian_mixture as fit_gaussian_mixture,
    select_n_clusters as select_n_clusters,
    silhouette_partition as silhouette_partition,
)
from ._clustering._stage import SoftKMeans as SoftKMeans, fit_soft_kmeans as fit_soft_kmeans
from ._communication import (
    LigandReceptor as LigandReceptor,
    LigandReceptorResult as LigandReceptorResult,
    SpatialNCEM as SpatialNCEM,
    fit_ncem as fit_ncem,
    index_resource as index_resource,
    ligand_receptor_table as ligand_receptor_table,
    score_ligand_receptor as score_ligand_receptor,
)
from ._core._distributions import (
    negative_binomial_log_prob as negative_binomial_log_prob,
    poisson_log_prob as poisson_log_prob,
    zero_inflated_negative_binomial_log_prob as zero_inflated_negative_binomial_log_prob,
)
from ._core._metrics import (
    adjusted_rand_index as adjusted_rand_index,
    clisi as clisi,
    ilisi as ilisi,
    lisi as lisi,
    normalized_mutual_info as normalized_mutual_info,
    silhouette_label as silhouette_label,
    silhouette_width as silhouette_width,
)
from ._core._neighbors import (
    FuzzyGraph as FuzzyGraph,
    NeighborGraph as NeighborGraph,
    neighbor_graph as neighbor_graph,
)
from ._core._train import FitResult as FitResult, TrainSettings as TrainSettings, fit as fit
from ._core._validate import NonIntegerCountsWarning as NonIntegerCountsWarning
from ._de._deseq2 import DESeq2Options as DESeq2Options
from ._doublets._run import ScrubletSettings as ScrubletSettings
from ._doublets._scrublet import Scrublet as Scrublet, ScrubletScores as ScrubletScores
from ._doublets._solo import SoloClassifier as SoloClassifier, fit_solo_classifier as fit_solo_classifier
from ._grn import AdditiveGRN as AdditiveGRN, grn_importances as grn_importances, grn_table as grn_table
from ._harmony._math import HarmonyResult as HarmonyResult, map_to_reference as map_to_reference
from ._harmony._stage import Harmony as Harmony, harmony as harmony, harmony_transform as harmony_transform
from ._imputation import (
    Magic as Magic,
    MagicResult as MagicResult,
    MaskedGeneTransformer as MaskedGeneTransformer,
    MCVResult as MCVResult,
    denoise as denoise,
    fit_masked_gene_transformer as fit_masked_gene_transformer,
    magic as magic,
    magic_denoiser as magic_denoiser,
    molecular_cross_validation as molecular_cross_validation,
    split_molecules as split_molecules,
)
from ._integration import (
    AdversarialFit as AdversarialFit,
    BatchCritic as BatchCritic,
    CriticSettings as CriticSettings,
    MMDVAELoss as MMDVAELoss,
    batch_mmd_penalty as batch_mmd_penalty,
    corrected_expression as corrected_expression,
    fit_adversarial_vae as fit_adversarial_vae,
    fit_mmd_vae as fit_mmd_vae,
)
from ._pipeline import (
    FitSettings as FitSettings,
    HarmonyReference as HarmonyReference,
    PipelineFit as PipelineFit,
    PipelineLossWeights as PipelineLossWeights,
    PipelineOutput as PipelineOutput,
    SingleCellPipeline as SingleCellPipeline,
    SingleCellPipelineConfig as SingleCellPipelineConfig,
    create_single_cell_pipeline as create_single_cell_pipeline,
    fit_pipeline as fit_pipeline,
    load_pipeline as load_pipeline,
    pipeline_chunks as pipeline_chunks,
    pipeline_loss as pipeline_loss,
    run_pipeline as run_pipeline,
    run_pipeline_in_chunks as run_pipeline_in_chunks,
    save_pipeline as save_pipeline,
    sweep_pipeline as sweep_pipeline,
)
from ._simulate._doublets import DoubletSimulation as DoubletSimulation, simulate_doublets as simulate_doublets
from ._simulate._network import (
    SimulatedNetwork as SimulatedNetwork,
    SimulatedSpatialCommunication as SimulatedSpatialCommunication,
    simulate_grn as simulate_grn,
    simulate_spatial_communication as simulate_spatial_communication,
)
from ._simulate._scale import SparseSimulation as SparseSimulation, simulate_sparse as simulate_sparse
from ._simulate._simulate import SimulatedData as SimulatedData, simulate as simulate
from ._simulate._spatial import (
    SpatialSlice as SpatialSlice,
    simulate_spatial as simulate_spatial,
    simulate_spatial_slices as simulate_spatial_slices,
)
from ._simulate._trajectory import (
    BranchingTrajectory as BranchingTrajectory,
    TimeCourse as TimeCourse,
    simulate_branching as simulate_branching,
    simulate_time_course as simulate_time_course,
)
from ._spatial import (
    STAGATE as STAGATE,
    AlignmentResult as AlignmentResult,
    PasteAlignment as PasteAlignment,
    center_align as center_align,
    fit_stagate as fit_stagate,
    mapping_accuracy as mapping_accuracy,
    pairwise_align as pairwise_align,
    spatial_graph as spatial_graph,
)
from ._trajectory import (
    DiffusionMap as DiffusionMap,
    DPTResult as DPTResult,
    FateResult as FateResult,
    OTSettings as OTSettings,
    TransportMap as TransportMap,
    compute_diffusion_map as compute_diffusion_map,
    diffusion_pseudotime as diffusion_pseudotime,
    find_terminal_states as find_terminal_states,
    interpolate as interpolate,
    pull_back as pull_back,
    push_forward as push_forward,
    transport_map as transport_map,
)
from ._umap._loss import umap_loss as umap_loss
from ._umap._stage import ParametricUMAP as ParametricUMAP, UMAPFitResult as UMAPFitResult, fit_umap as fit_umap
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


try:
    __version__ = importlib.metadata.version("diffbio_eqx")
except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed (benchmarks/gpu.sh)
    __version__ = "unknown (not installed)"
