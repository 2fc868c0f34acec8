"""Cell-cell communication: CellPhoneDB- and CellChat-style ligand-receptor scoring (as LIANA runs them) and an
NCEM-style spatial model."""
