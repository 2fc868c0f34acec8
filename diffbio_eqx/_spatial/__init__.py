"""Spatial transcriptomics: STAGATE-style spatial domains and PASTE slice alignment (fused Gromov-Wasserstein
through ott-jax)."""
