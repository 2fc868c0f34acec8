import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from diffbio_eqx._core._validate import (
    NonIntegerCountsWarning,
    check_ambient_profile,
    check_batch_labels,
    check_counts,
    check_embedding,
    check_n_clusters,
)


def _counts():
    return np.array([[1, 0, 3], [0, 2, 0], [4, 1, 1]], dtype=np.int64)


@pytest.mark.parametrize("sparse", [False, True])
def test_valid_counts_pass_and_are_copied(sparse):
    counts = _counts()
    given = sp.csr_matrix(counts) if sparse else counts
    checked = check_counts(given)
    assert checked.dtype == np.float32
    assert sp.issparse(checked) == sparse
    np.testing.assert_array_equal(checked.toarray() if sparse else checked, counts)
    assert checked is not given


def test_counts_must_be_2d():
    with pytest.raises(ValueError, match=r"counts: expected a 2-D matrix \(n_cells, n_genes\), got shape \(3,\)"):
        check_counts(np.ones(3))


def test_counts_must_be_numeric():
    with pytest.raises(ValueError, match="counts: expected a numeric array, got dtype <U1"):
        check_counts(np.array([["a", "b"]]))


def test_counts_must_not_be_empty():
    with pytest.raises(ValueError, match=r"counts: empty matrix of shape \(0, 5\)"):
        check_counts(np.zeros((0, 5)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("sparse", [False, True])
def test_counts_must_be_finite(bad, sparse):
    counts = _counts().astype(float)
    counts[2, 1] = bad
    given = sp.csr_matrix(counts) if sparse else counts
    with pytest.raises(ValueError, match=r"counts: 1 non-finite value\(s\) \(NaN or Inf\), first at cell 2, gene 1"):
        check_counts(given)


@pytest.mark.parametrize("sparse", [False, True])
def test_counts_must_be_nonnegative(sparse):
    counts = _counts().astype(float)
    counts[1, 2] = -2.0
    given = sp.csr_matrix(counts) if sparse else counts
    with pytest.raises(ValueError, match=r"counts: 1 negative value\(s\), first -2.0 at cell 1, gene 2"):
        check_counts(given)


def test_non_integer_counts_warn_once_per_call():
    counts = _counts().astype(float)
    counts[0, 0] = 0.5
    counts[2, 2] = 1.5
    with pytest.warns(NonIntegerCountsWarning, match="counts: contains non-integer values") as record:
        check_counts(counts)
    assert len(record) == 1


def test_zero_total_cells_are_named():
    counts = _counts()
    counts[1] = 0
    with pytest.raises(ValueError, match=r"counts: cells with zero total counts at indices \[1\]"):
        check_counts(counts)
    assert check_counts(counts, allow_empty_cells=True).shape == (3, 3)


def test_gene_count_must_match_model():
    with pytest.raises(ValueError, match="counts: has 3 genes but the model was built for 5"):
        check_counts(_counts(), n_genes=5)


def test_counts_field_name_is_used():
    with pytest.raises(ValueError, match=r"^adata.X: "):
        check_counts(np.ones(4), field="adata.X")


def test_traced_counts_get_shape_checks_only():
    out = jax.jit(lambda c: check_counts(c) * 2)(jnp.asarray(_counts(), dtype=jnp.float32))
    np.testing.assert_array_equal(out, 2 * _counts())
    with pytest.raises(ValueError, match="counts: expected a 2-D matrix"):
        jax.jit(lambda c: check_counts(c))(jnp.ones(3))


def test_batch_labels_valid():
    labels = check_batch_labels(np.array([0, 1, 1]), 3, n_batches=2)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 1, 1])


def test_batch_labels_out_of_range():
    with pytest.raises(ValueError, match=r"batch_labels: value 2 at cell 1 is out of range \[0, 2\)"):
        check_batch_labels(np.array([0, 2, 1]), 3, n_batches=2)
    with pytest.raises(ValueError, match=r"batch_labels: value -1 at cell 0 is out of range"):
        check_batch_labels(np.array([-1, 0, 1]), 3)


def test_batch_labels_wrong_length():
    with pytest.raises(ValueError, match="batch_labels: has length 2 but there are 3 cells"):
        check_batch_labels(np.array([0, 1]), 3)


def test_batch_labels_must_be_integers():
    with pytest.raises(ValueError, match="batch_labels: expected integer codes, got dtype float64"):
        check_batch_labels(np.array([0.0, 1.0, 1.0]), 3)


def test_batch_labels_wrong_rank():
    with pytest.raises(ValueError, match=r"batch_labels: expected shape \(n_cells,\) or \(n_cells, n_covariates\)"):
        check_batch_labels(np.zeros((3, 1, 1), dtype=int), 3)


def test_batch_labels_several_covariates():
    labels = np.array([[0, 0], [1, 2], [1, 1]])
    assert check_batch_labels(labels, 3, n_batches=[2, 3]).shape == (3, 2)
    with pytest.raises(ValueError, match=r"batch_labels \(covariate 1\): value 2 at cell 1 is out of range \[0, 2\)"):
        check_batch_labels(labels, 3, n_batches=[2, 2])


def test_ambient_profile_is_normalised():
    profile = check_ambient_profile(np.array([1.0, 3.0, 0.0]), 3)
    np.testing.assert_allclose(profile, [0.25, 0.75, 0.0])


def test_ambient_profile_wrong_length():
    with pytest.raises(ValueError, match=r"ambient_profile: expected one value per gene, shape \(3,\), got \(2,\)"):
        check_ambient_profile(np.ones(2), 3)


def test_ambient_profile_negative():
    with pytest.raises(ValueError, match="ambient_profile: negative value -1.0 at gene 1"):
        check_ambient_profile(np.array([1.0, -1.0, 2.0]), 3)


def test_ambient_profile_all_zero():
    with pytest.raises(ValueError, match="ambient_profile: all zeros"):
        check_ambient_profile(np.zeros(3), 3)


def test_ambient_profile_not_finite():
    with pytest.raises(ValueError, match="ambient_profile: non-finite value at gene 0"):
        check_ambient_profile(np.array([np.nan, 1.0, 1.0]), 3)


def test_too_few_cells_for_clusters():
    with pytest.raises(ValueError, match="n_clusters: asked for 10 clusters but there are only 3 cells"):
        check_n_clusters(3, 10)
    with pytest.raises(ValueError, match="n_clusters: must be >= 1, got 0"):
        check_n_clusters(3, 0)
    check_n_clusters(3, 3)


def test_embedding_checks():
    with pytest.raises(ValueError, match="x: 1 non-finite value\\(s\\), first at cell 1, dim 0"):
        check_embedding(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match=r"latent: expected a 2-D matrix \(n_cells, n_dims\)"):
        check_embedding(np.ones(3), field="latent")
    with pytest.raises(ValueError, match="x: has 2 dimensions, expected 3"):
        check_embedding(np.ones((4, 2)), n_dims=3)


def test_input_array_is_never_modified():
    counts = _counts().astype(float)
    before = counts.copy()
    checked = check_counts(counts)
    checked[0, 0] = 100.0
    np.testing.assert_array_equal(counts, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ambient_profile(before[0], 3)
    np.testing.assert_array_equal(counts, before)


@pytest.mark.parametrize("sparse", [False, True])
def test_block_scan_finds_problems_in_any_block(monkeypatch, sparse):
    # check_counts scans large matrices in blocks; with 8-value blocks a 40 x 6 matrix spans many of them, and a
    # problem in the last block must still be found and named at its global position.
    import diffbio_eqx._core._validate as validate

    monkeypatch.setattr(validate, "_SCAN_BLOCK_VALUES", 8)
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 5, size=(40, 6)).astype(np.float64)

    def given(matrix):
        return sp.csr_matrix(matrix) if sparse else matrix

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(sp.csr_matrix(check_counts(given(counts))).toarray()), counts)
    for value, message in ((np.nan, r"1 non-finite value\(s\) \(NaN or Inf\), first at cell 38, gene 4"),
                           (-1.0, r"1 negative value\(s\), first -1.0 at cell 38, gene 4")):
        bad = counts.copy()
        bad[38, 4] = value
        with pytest.raises(ValueError, match=message):
            check_counts(given(bad))
    fractional = counts.copy()
    fractional[39, 5] = 2.5
    with pytest.warns(NonIntegerCountsWarning):
        check_counts(given(fractional))
    empty = counts.copy()
    empty[[17, 39]] = 0.0
    with pytest.raises(ValueError, match=r"cells with zero total counts at indices \[17, 39\]"):
        check_counts(given(empty))


def test_float64_beyond_float32_range_is_refused_and_float32_passes_unchanged():
    counts = _counts().astype(np.float64)
    counts[1, 1] = 1e39
    with pytest.raises(ValueError, match="counts: value 1e\\+39 at cell 1, gene 1 exceeds the float32 range"):
        check_counts(counts)
    largest = np.full((2, 2), np.finfo(np.float32).max, dtype=np.float32)
    np.testing.assert_array_equal(check_counts(largest), largest)
