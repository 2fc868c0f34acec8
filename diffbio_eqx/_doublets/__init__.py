"""Doublet detection: Scrublet (faithful to scanpy.pp.scrublet) and Solo (faithful to scvi-tools SOLO) on the
package's VAE."""
