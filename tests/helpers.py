import pathlib

import equinox as eqx
import jax
import numpy as np


SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _on_host(tree):
    """Concrete JAX leaves as NumPy arrays, tagged so that a JAX array still never equals a NumPy one: comparing
    them eagerly would compile an XLA program for every leaf shape (~50-100 ms each)."""
    def host(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return ("jax key", str(leaf.dtype), np.asarray(jax.random.key_data(leaf)))
        return ("jax", np.asarray(leaf))
    return jax.tree.map(host, tree)


def tree_allclose(a, b, *, rtol=1e-5, atol=1e-8) -> bool:
    return bool(eqx.tree_equal(_on_host(a), _on_host(b), typematch=True, rtol=rtol, atol=atol))


def tree_identical(a, b) -> bool:
    """Bitwise equality of every leaf (and equal structure)."""
    return bool(eqx.tree_equal(_on_host(a), _on_host(b), typematch=True))


def knn_batch_purity(x: np.ndarray, batches: np.ndarray, k: int = 15) -> float:
    """Mean share of each cell's k nearest neighbours (exact, Euclidean) that share its batch."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    return float(np.mean(batches[index] == batches[:, None]))


def log_normalized_pca(counts: np.ndarray, n_components: int = 20, seed: int = 0) -> np.ndarray:
    """scanpy's default preprocessing: normalize_total(1e4), log1p, PCA."""
    from sklearn.decomposition import PCA

    counts = np.asarray(counts, dtype=np.float64)
    normalized = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    return PCA(n_components=n_components, random_state=seed).fit_transform(normalized)
