"""Spatial transcriptomics: STAGATE-style spatial domains and PASTE slice alignment (fused Gromov-Wasserstein
through ott-jax)."""

from ._center import CenterResult as CenterResult, center_align as center_align
from ._domains import DomainResult as DomainResult, spatial_domains as spatial_domains
from ._paste import (
    AlignmentResult as AlignmentResult,
    PasteAlignment as PasteAlignment,
    mapping_accuracy as mapping_accuracy,
    pairwise_align as pairwise_align,
)
from ._stagate import (
    STAGATE as STAGATE,
    SpatialGraph as SpatialGraph,
    fit_stagate as fit_stagate,
    spatial_graph as spatial_graph,
)
