"""Scale helpers: the chunked sparse simulator, device CSR rows, latent-only and per-cell chunked inference."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.sparse as sp

import diffbio_eqx as dx
from diffbio_eqx._core._train import sparse_rows_from_csr, take_rows


@pytest.fixture(scope="module")
def simulated():
    return dx.simulate_sparse(jr.key(0), n_cells=6000, n_genes=300, n_groups=3, n_batches=2, chunk_size=1024)


def test_simulate_sparse_shapes_and_format(simulated):
    counts = simulated.counts
    assert sp.isspmatrix_csr(counts) and counts.shape == (6000, 300) and counts.dtype == np.float32
    assert counts.has_canonical_format and np.all(counts.data > 0), "no explicit zeros, sorted, no duplicates"
    assert np.array_equal(counts.data, np.rint(counts.data))
    assert simulated.groups.shape == simulated.batches.shape == (6000,)
    assert set(np.unique(simulated.groups)) == {0, 1, 2} and set(np.unique(simulated.batches)) == {0, 1}
    assert 0.1 < counts.nnz / (6000 * 300) < 0.6


def test_simulate_sparse_matches_its_expected_means(simulated):
    """Per group and batch, the pooled counts of each gene match the model's expected share of the library."""
    genes = simulated.genes
    counts = simulated.counts
    for group in range(3):
        for batch in range(2):
            rows = np.flatnonzero((simulated.groups == group) & (simulated.batches == batch))
            share = np.asarray(genes.gene_mean * genes.de_factors[group] * genes.batch_factors[batch])
            share = share / share.sum()
            expected = share * simulated.library_size[rows].sum()
            observed = np.asarray(counts[rows].sum(axis=0)).ravel()
            strong = expected > 2000
            assert strong.sum() > 10
            # Gamma-Poisson (Splatter's BCV is about 1 at these means) pooled over ~1000 cells: a few per cent
            # of relative error per gene, up to ~10 % at three standard deviations.
            relative = np.abs(observed[strong] / expected[strong] - 1)
            assert relative.max() < 0.2 and np.median(relative) < 0.05
            assert np.corrcoef(np.log1p(observed), np.log1p(expected))[0, 1] > 0.99
    # Groups differ where the DE factors say so: the most up-regulated gene of group 1 vs group 0.
    ratio = np.asarray(genes.de_factors[1] / genes.de_factors[0])
    gene = int(np.argmax(ratio))
    mean_1 = counts[simulated.groups == 1][:, gene].mean() / simulated.library_size[simulated.groups == 1].mean()
    mean_0 = counts[simulated.groups == 0][:, gene].mean() / simulated.library_size[simulated.groups == 0].mean()
    assert mean_1 / mean_0 > 0.5 * ratio[gene]


def test_simulate_sparse_is_reproducible_and_chunks_share_genes():
    a = dx.simulate_sparse(jr.key(3), n_cells=700, n_genes=50, chunk_size=300)
    b = dx.simulate_sparse(jr.key(3), n_cells=700, n_genes=50, chunk_size=300)
    c = dx.simulate_sparse(jr.key(3), n_cells=700, n_genes=50, chunk_size=200)
    assert (a.counts != b.counts).nnz == 0 and np.array_equal(a.groups, b.groups)
    np.testing.assert_array_equal(a.genes.gene_mean, c.genes.gene_mean)  # gene draws do not depend on chunking
    np.testing.assert_array_equal(a.genes.de_factors, c.genes.de_factors)
    # The first chunk is the same whatever comes after it.
    d = dx.simulate_sparse(jr.key(3), n_cells=300, n_genes=50, chunk_size=300)
    assert (a.counts[:300] != d.counts).nnz == 0
    with pytest.raises(ValueError, match="n_cells"):
        dx.simulate_sparse(jr.key(3), n_cells=0)


def test_sparse_rows_hold_only_the_nonzeros(simulated):
    counts = simulated.counts[:500]
    rows = sparse_rows_from_csr(counts)
    assert rows.data.shape == (counts.nnz,) and rows.indices.dtype == jnp.int16
    assert rows.shape == (500, 300) and rows.max_nnz == int(np.diff(counts.indptr).max())
    index = jnp.array([499, 0, 7, 7, 250])
    np.testing.assert_array_equal(take_rows(rows, index), counts.toarray()[np.asarray(index)])
    empty = sparse_rows_from_csr(sp.csr_matrix((4, 3), dtype=np.float32))
    np.testing.assert_array_equal(take_rows(empty, jnp.array([0, 3])), np.zeros((2, 3)))
    wide = sp.random(5, 40_000, density=1e-3, format="csr", dtype=np.float32, random_state=0)
    wide_rows = sparse_rows_from_csr(wide)
    assert wide_rows.indices.dtype == jnp.int32
    np.testing.assert_array_equal(take_rows(wide_rows, jnp.arange(5)), wide.toarray())


def test_vae_latent_equals_transform_latent(simulated):
    counts, batches = simulated.counts[:900], simulated.batches[:900]
    vae = dx.VAENormalizer(300, 2, hidden_dims=(16,), latent_dim=4, key=jr.key(1))
    vae = dx.fit_vae(vae, counts, batches, key=jr.key(2), settings=dx.TrainSettings(n_epochs=2, progress=False)).model
    latent = dx.vae_latent(vae, counts, batches, chunk_size=256)
    np.testing.assert_allclose(latent, dx.vae_transform(vae, counts.toarray(), batches, chunk_size=900).latent,
                               rtol=1e-10, atol=1e-12)


def test_run_pipeline_in_chunks_needs_a_reference():
    pipeline = dx.create_single_cell_pipeline(n_genes=20, n_batches=2, key=jr.key(0))
    data = {"counts": np.ones((30, 20)), "batch_labels": np.arange(30) % 2, "ambient_profile": np.ones(20)}
    with pytest.raises(ValueError, match="harmony_reference"):
        dx.run_pipeline_in_chunks(pipeline, data, key=jr.key(1))
    off = dx.create_single_cell_pipeline(n_genes=20, n_batches=2, enable_batch_correction=False, n_clusters=3,
                                         key=jr.key(0))
    with pytest.raises(ValueError, match="outputs"):
        dx.run_pipeline_in_chunks(off, data, key=jr.key(1), outputs=("nope",))
    out = dx.run_pipeline_in_chunks(off, data, key=jr.key(1), chunk_size=7)
    whole = dx.run_pipeline(off, data, key=jr.key(1))
    for name, value in out.items():
        np.testing.assert_allclose(value, whole[name], rtol=1e-9, atol=1e-12)
