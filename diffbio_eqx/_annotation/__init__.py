"""Cell annotation: CellTypist-style logistic regression, CellAssign and scANVI on the package's VAE."""
