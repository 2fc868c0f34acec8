"""Differential expression: markers (rank_genes_groups-faithful), pseudobulk DESeq2, SwitchDE and differential
distributions."""
