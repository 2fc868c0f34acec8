import importlib.metadata

from . import datasets as datasets, io as io
from ._simulate import SimulatedData as SimulatedData, simulate as simulate
from ._validate import (
    check_ambient_profile as check_ambient_profile,
    check_batch_labels as check_batch_labels,
    check_counts as check_counts,
    check_embedding as check_embedding,
    check_n_clusters as check_n_clusters,
    NonIntegerCountsWarning as NonIntegerCountsWarning,
)


__version__ = importlib.metadata.version("diffbio_eqx")
from ._metrics import (
    adjusted_rand_index as adjusted_rand_index,
    clisi as clisi,
    ilisi as ilisi,
    lisi as lisi,
    normalized_mutual_info as normalized_mutual_info,
    silhouette_label as silhouette_label,
)
from ._train import FitResult as FitResult, fit as fit, map_in_chunks as map_in_chunks, scvi_optimizer as scvi_optimizer
