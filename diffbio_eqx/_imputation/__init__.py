"""Imputation: MAGIC diffusion (magic-impute-faithful), a masked-gene transformer denoiser, molecular
cross-validation."""

from ._magic import (
    DiffusionOperator as DiffusionOperator,
    Magic as Magic,
    MagicResult as MagicResult,
    magic as magic,
    magic_operator as magic_operator,
)
from ._mcv import (
    MCVResult as MCVResult,
    magic_denoiser as magic_denoiser,
    molecular_cross_validation as molecular_cross_validation,
    split_molecules as split_molecules,
)
from ._transformer import (
    MaskedGeneTransformer as MaskedGeneTransformer,
    denoise as denoise,
    fit_masked_gene_transformer as fit_masked_gene_transformer,
)
