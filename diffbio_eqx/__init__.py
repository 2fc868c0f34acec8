import importlib.metadata

from . import datasets as datasets, io as io
from ._harmony import (
    harmony as harmony,
    harmony_early_exit as harmony_early_exit,
    harmony_transform as harmony_transform,
    HarmonyResult as HarmonyResult,
)
from ._stages._harmony import Harmony as Harmony
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
