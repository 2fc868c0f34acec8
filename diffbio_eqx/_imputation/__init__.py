"""Imputation: MAGIC diffusion (magic-impute-faithful), a masked-gene transformer denoiser, molecular
cross-validation."""

from ._magic import DiffusionOperator as DiffusionOperator
from ._magic import Magic as Magic
from ._magic import MagicResult as MagicResult
from ._magic import magic as magic
from ._magic import magic_operator as magic_operator
from ._mcv import MCVResult as MCVResult
from ._mcv import magic_denoiser as magic_denoiser
from ._mcv import molecular_cross_validation as molecular_cross_validation
from ._mcv import split_molecules as split_molecules
from ._transformer import MaskedGeneTransformer as MaskedGeneTransformer
from ._transformer import denoise as denoise
from ._transformer import fit_masked_gene_transformer as fit_masked_gene_transformer
