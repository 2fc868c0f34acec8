import importlib.metadata

from . import datasets as datasets, io as io
from ._stages._ambient import (
    AmbientProfileWarning as AmbientProfileWarning,
    AmbientRemoval as AmbientRemoval,
    AmbientResult as AmbientResult,
    empty_droplet_threshold as empty_droplet_threshold,
    estimate_ambient_profile as estimate_ambient_profile,
    fit_ambient_removal as fit_ambient_removal,
    remove_ambient as remove_ambient,
    resolve_ambient_profile as resolve_ambient_profile,
)
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
