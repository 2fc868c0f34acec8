"""dbx.pp.magic and dbx.pp.denoise over AnnData: the keys they write equal the array API's results."""

import anndata as ad
import jax.random as jr
import numpy as np
import pytest
import scipy.sparse as sp

import diffbio_eqx as dx
from diffbio_eqx._core._train import TrainSettings
from diffbio_eqx.io import layer_names


@pytest.fixture
def adata():
    sim = dx.simulate(jr.key(5), n_cells=200, n_genes=40, n_groups=3, lib_loc=6.0)
    cells = ad.AnnData(X=sp.csr_matrix(np.asarray(sim.counts, dtype=np.float32)))
    cells.var_names = [f"gene{i}" for i in range(cells.n_vars)]
    return cells


def test_pp_magic_writes_the_layer_and_settings(adata):
    before = set(layer_names(adata)), set(adata.obsm.keys())
    result = dx.pp.magic(adata, dx.Magic(n_pca=20))
    np.testing.assert_array_equal(adata.layers["magic"], result.imputed)
    np.testing.assert_allclose(result.imputed, dx.magic(adata.X, dx.Magic(n_pca=20)).imputed, rtol=1e-6)
    settings = adata.uns["diffbio_magic"]
    assert settings["params"]["knn"] == 5 and settings["params"]["knn_max"] == 15 and int(settings["t"]) == 3
    assert set(layer_names(adata)) == before[0] | {"magic"} and set(adata.obsm.keys()) == before[1]
    subset = dx.pp.magic(adata, dx.Magic(n_pca=20), genes=["gene7", "gene2"], key_added="some")
    np.testing.assert_allclose(adata.obsm["X_some"], result.imputed[:, [7, 2]], rtol=1e-5, atol=1e-6)
    assert list(adata.uns["diffbio_magic"]["genes"]) == ["gene7", "gene2"] and subset.t == 3
    with pytest.raises(ValueError, match="^genes:.*nope"):
        dx.pp.magic(adata, genes=["nope"])
    with pytest.raises(ValueError, match="^layer:"):
        dx.pp.magic(adata, dx.Magic(normalize=False), layer="missing")


def test_pp_denoise_writes_expected_counts(adata):
    model = dx.pp.denoise(adata, key=jr.key(0), settings=TrainSettings(n_epochs=2, progress=False))
    denoised = adata.layers["denoised"]
    assert denoised.shape == adata.shape and np.all(np.isfinite(denoised))
    np.testing.assert_allclose(denoised, dx.denoise(model, adata.X), rtol=1e-5)
    np.testing.assert_allclose(denoised.sum(1), np.asarray(adata.X.sum(1)).ravel(), rtol=1e-4)
    assert model.genes == tuple(adata.var_names)
    assert adata.uns["diffbio_denoise"]["params"]["n_genes"] == adata.n_vars
    assert adata.uns["diffbio_denoise"]["train_loss"].shape == (2,)
    with pytest.raises(ValueError, match="^n_epochs:"):
        dx.pp.denoise(adata, key=jr.key(0), n_epochs=2)
