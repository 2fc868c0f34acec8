"""Imputation: MAGIC diffusion (magic-impute-faithful), a masked-gene transformer denoiser, molecular
cross-validation."""
