"""The sparse front door: SciPy sparse and backed h5ad input give the dense results without a dense n x g matrix.

- `fit_pipeline` keeps CSR counts sparse (the ambient model, the decontaminated counts and the VAE densify one
  minibatch or chunk at a time) and trains exactly as on the dense counts.
- `diffbio-eqx run` on an h5ad above `io.CHUNKED_ABOVE` reads `X` in blocks of rows (anndata's backed mode), runs
  inference in chunks and streams the `(n_cells, n_genes)` layers into `result.h5ad`; a spy on every densification
  (`toarray`) and every dense count scan sees nothing wider than a chunk, and the results equal the whole-data job's.
"""

import pathlib

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import diffbio_eqx as dx
from diffbio_eqx import cli, io
from diffbio_eqx._core import _validate
from diffbio_eqx._pipeline import _fit


N_CELLS, N_GENES, CHUNK = 300, 40, 64
EPOCHS = ["--vae-epochs", "2", "--ambient-epochs", "1", "--umap-epochs", "1", "--quiet", "--seed", "1"]


@pytest.fixture(scope="module")
def simulated():
    sim = dx.simulate(jr.key(7), n_cells=N_CELLS, n_genes=N_GENES, n_groups=3, n_batches=2, contamination=0.05)
    return np.asarray(sim.counts, np.float32), np.asarray(sim.batches).astype(np.int32), sim


def _write_input(sim, path: pathlib.Path, *, sparse: bool) -> pathlib.Path:
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(np.asarray(sim.batches) == 0, "a", "b")),
                        "cell_type": pd.Categorical([f"t{g}" for g in np.asarray(sim.groups)])},
                       index=[f"cell{i}" for i in range(N_CELLS)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])
    # Sparse: int64 counts stored as CSR, as many atlases are (read in blocks into float32); else dense float32.
    counts = np.asarray(sim.counts)
    matrix = sp.csr_matrix(counts.astype(np.int64)) if sparse else counts.astype(np.float32)
    ad.AnnData(matrix, obs=obs, var=var).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def jobs(simulated, tmp_path_factory):
    """The same job twice: on dense `X` as it runs on small data (whole-data inference), and on the same counts
    as int64 CSR through the chunked front door, with spies on every densification."""
    _, _, sim = simulated
    folder = tmp_path_factory.mktemp("front_door")
    dense = _write_input(sim, folder / "dense.h5ad", sparse=False)
    source = _write_input(sim, folder / "cells.h5ad", sparse=True)
    args = ["--batch-key", "batch", "--label-key", "cell_type", *EPOCHS]
    assert cli.main(["run", str(dense), *args, "--out", str(folder / "whole")]) == 0
    widest: dict[str, int] = {"toarray": 0, "scan": 0}
    patch = pytest.MonkeyPatch()
    original_toarray, original_scan = sp.csr_matrix.toarray, _validate._scan_values

    def toarray(self, *a, **k):
        widest["toarray"] = max(widest["toarray"], self.shape[0])
        return original_toarray(self, *a, **k)

    def scan(values):
        if values.ndim == 2:  # a dense count matrix being checked
            widest["scan"] = max(widest["scan"], values.shape[0])
        return original_scan(values)

    try:
        patch.setattr(io, "CHUNKED_ABOVE", 1000)
        patch.setattr(io, "CHUNK_ROWS", CHUNK)
        patch.setattr(_fit, "CHUNK_CELLS", CHUNK)
        patch.setattr(sp.csr_matrix, "toarray", toarray)
        patch.setattr(_validate, "_scan_values", scan)
        assert cli.main(["run", str(source), *args, "--out", str(folder / "chunked")]) == 0
    finally:
        patch.undo()
    return folder, widest


@pytest.mark.slow  # two whole jobs through the chunked path (make test-slow)
def test_backed_h5ad_runs_without_densifying(jobs):
    folder, widest = jobs
    # Nothing wider than a chunk of cells (CHUNK = 64 of the 300) is ever dense: reading, decontamination, the
    # latent, inference and the streamed layers all go a chunk at a time.
    assert 0 < widest["toarray"] <= CHUNK
    assert widest["scan"] == 0
    result = ad.read_h5ad(folder / "chunked" / "result.h5ad")
    for key in ("X_diffbio", "X_diffbio_corrected", "X_umap", "diffbio_cluster_probabilities"):
        assert result.obsm[key].shape[0] == N_CELLS
    assert "diffbio_cluster" in result.obs
    assert result.layers["diffbio_normalized"].shape == (N_CELLS, N_GENES)
    for name in ("umap.png", "training.png", "report.md", "pipeline.eqx"):
        assert (folder / "chunked" / name).is_file()


@pytest.mark.slow  # two whole jobs through the chunked path (make test-slow)
def test_sparse_chunked_job_equals_dense_whole_data_job(jobs):
    """Training on CSR (minibatches densified on the device, decontaminated counts kept sparse) equals training on
    the dense matrix; chunked inference with the stored Harmony reference equals the whole-data call."""
    folder, _ = jobs
    whole = ad.read_h5ad(folder / "whole" / "result.h5ad")
    chunked = ad.read_h5ad(folder / "chunked" / "result.h5ad")
    for key in ("X_diffbio", "X_diffbio_corrected", "X_umap", "diffbio_cluster_probabilities"):
        np.testing.assert_allclose(chunked.obsm[key], whole.obsm[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key in ("diffbio_normalized", "diffbio_decontaminated"):
        np.testing.assert_allclose(np.asarray(chunked.layers[key]), np.asarray(whole.layers[key]), rtol=1e-4,
                                   atol=1e-4, err_msg=key)
    np.testing.assert_array_equal(np.asarray(chunked.X.toarray()), np.asarray(whole.X))
