"""Doublet detection: Scrublet (scanpy.pp.scrublet-faithful) and Solo (scvi-tools SOLO-faithful) on the package's VAE."""
