"""Shared jaxtyping aliases.

Dimension names are fixed across the package: `n_cells n_genes n_dims n_clusters n_batches n_covariates n_iter`.
Layout is cells-major.
"""

from typing import TYPE_CHECKING, TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Shaped


if TYPE_CHECKING:
    Counts: TypeAlias = Array
    CountsLike: TypeAlias = ArrayLike
    Expression: TypeAlias = Array
    Embedding: TypeAlias = Array
    Latent: TypeAlias = Array
    BatchLabels: TypeAlias = Array
    GroupLabels: TypeAlias = Array
    AmbientProfile: TypeAlias = Array
    Responsibilities: TypeAlias = Array
    Centroids: TypeAlias = Array
    Scalar: TypeAlias = Array
    ScalarLike: TypeAlias = ArrayLike
    CellMask: TypeAlias = Array
else:
    #: Raw counts, stored as floats holding whole numbers (or any real for a relaxed input).
    Counts = Float[Array, "n_cells n_genes"]
    #: Counts as given by a user, before conversion.
    CountsLike = Shaped[ArrayLike, "n_cells n_genes"]
    #: Any per-gene real matrix (normalized expression, rates).
    Expression = Float[Array, "n_cells n_genes"]
    #: A low-dimensional representation of cells (PCs, corrected embeddings).
    Embedding = Float[Array, "n_cells n_dims"]
    #: The VAE latent space.
    Latent = Float[Array, "n_cells latent_dim"]
    #: Integer batch code per cell, in `[0, n_batches)`.
    BatchLabels = Int[Array, " n_cells"]
    #: Integer group (cell type) code per cell.
    GroupLabels = Int[Array, " n_cells"]
    #: Ambient RNA profile: non-negative, sums to one.
    AmbientProfile = Float[Array, " n_genes"]
    #: Soft cluster assignments, rows on the simplex.
    Responsibilities = Float[Array, "n_cells n_clusters"]
    Centroids = Float[Array, "n_clusters n_dims"]
    Scalar = Float[Array, ""]
    ScalarLike = Float[ArrayLike, ""]
    CellMask = Bool[Array, " n_cells"]

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "PRNGKeyArray",
    "Shaped",
    "Counts",
    "CountsLike",
    "Expression",
    "Embedding",
    "Latent",
    "BatchLabels",
    "GroupLabels",
    "AmbientProfile",
    "Responsibilities",
    "Centroids",
    "Scalar",
    "ScalarLike",
    "CellMask",
]
