"""The pipeline floor: `SingleCellPipeline` and its config, the compiled entry points, losses, training, sweeps and
files. It imports the method families and the core, never a face (AnnData, the job, the command line)."""

from ._config import SingleCellPipelineConfig as SingleCellPipelineConfig
from ._fit import FitSettings as FitSettings, PipelineFit as PipelineFit, fit_pipeline as fit_pipeline
from ._loss import (
    PipelineLossWeights as PipelineLossWeights,
    cell_type_cross_entropy as cell_type_cross_entropy,
    pipeline_loss as pipeline_loss,
    umap_graph_loss as umap_graph_loss,
)
from ._model import (
    HarmonyReference as HarmonyReference,
    PipelineOutput as PipelineOutput,
    SingleCellPipeline as SingleCellPipeline,
    create_single_cell_pipeline as create_single_cell_pipeline,
)
from ._run import (
    CELL_OUTPUTS as CELL_OUTPUTS,
    pipeline_chunks as pipeline_chunks,
    prepare_inputs as prepare_inputs,
    run_pipeline as run_pipeline,
    run_pipeline_in_chunks as run_pipeline_in_chunks,
)
from ._serialise import load_pipeline as load_pipeline, save_pipeline as save_pipeline
from ._sweep import sweep_pipeline as sweep_pipeline
