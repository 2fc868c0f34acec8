import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

import diffbio_eqx as dbx
from diffbio_eqx.datasets import _PBMC68K_FILE, _scanpy_file, restore_pbmc68k_counts


def test_pbmc68k_has_exact_integer_counts_and_labels():
    adata = dbx.datasets.pbmc68k()
    assert adata.shape == (700, 765)
    assert sp.issparse(adata.X)
    values = adata.X.data
    np.testing.assert_array_equal(values, np.rint(values))
    assert values.min() >= 1
    assert adata.obs["bulk_labels"].cat.categories.size == 10
    assert adata.obs["bulk_labels"].value_counts()["Dendritic"] == 240
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    assert totals.min() > 0
    # 765 of the genes were kept, so restored totals are below the original library sizes.
    assert np.all(totals <= adata.obs["n_counts"].to_numpy() + 0.5)


def test_pbmc68k_inversion_is_near_integer_before_rounding():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        source = ad.read_h5ad(_scanpy_file(_PBMC68K_FILE))
    counts, near_integer = restore_pbmc68k_counts(source.raw.X, source.obs["n_counts"].to_numpy())
    assert near_integer > 0.9999
    # Re-normalising the restored counts gives back the stored log-normalised values.
    renormalised = np.log1p(counts.toarray() / source.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(renormalised, source.raw.X.toarray(), atol=0.05)


def test_pbmc68k_returns_a_fresh_copy_each_time():
    first = dbx.datasets.pbmc68k()
    first.X.data[:] = 0
    second = dbx.datasets.pbmc68k()
    assert second.X.data.min() >= 1


def test_simulated_batch_split_is_visible_and_leaves_batch0_alone():
    from helpers import knn_batch_purity, log_normalized_pca

    adata = dbx.datasets.pbmc68k()
    split = dbx.datasets.add_simulated_batches(adata, seed=0)
    codes = split.obs["batch"].cat.codes.to_numpy()
    assert set(codes) == {0, 1}
    assert "batch" not in adata.obs  # input untouched
    untouched = codes == 0
    np.testing.assert_array_equal(split.X[untouched].toarray(), adata.X[untouched].toarray())
    assert np.all(np.asarray(split.X.sum(axis=1)).ravel() > 0)
    np.testing.assert_array_equal(split.X.data, np.rint(split.X.data))
    before = knn_batch_purity(log_normalized_pca(adata.X.toarray(), 50), codes)
    after = knn_batch_purity(log_normalized_pca(split.X.toarray(), 50), codes)
    assert before < 0.55 < 0.7 < after
