"""Solo against scvi-tools' SOLO on the same simulated droplets (reference probabilities stored by
benchmarks/make_doublet_reference.py, so torch stays out of the tests), and its face."""

import json
import pathlib

import anndata as ad
import jax
import jax.random as jr
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from diffbio_eqx import pp
from diffbio_eqx._core._train import TrainSettings
from diffbio_eqx._doublets._solo import SoloClassifier, solo_training_settings
from diffbio_eqx._simulate._doublets import simulate_doublets


REFERENCE = pathlib.Path(__file__).parent / "data" / "doublets_solo_reference.npz"


# The droplets of benchmarks/make_doublet_reference.py (which stores scvi-tools SOLO's result on them).
N_CELLS, N_GENES, VAE_EPOCHS = 1000, 500, 100


@pytest.fixture(scope="module")
def solo_run():
    with jax.enable_x64(False):  # float32, as the reference script drew them
        sim = simulate_doublets(jr.key(0), n_cells=N_CELLS, n_genes=N_GENES, n_groups=5, doublet_rate=0.1)
    adata = ad.AnnData(np.asarray(sim.counts, dtype=np.float32))
    result = pp.solo(adata, key=jr.key(1), vae_settings=TrainSettings(n_epochs=VAE_EPOCHS, progress=False),
                     settings=TrainSettings(progress=False))
    return adata, result, np.asarray(sim.is_doublet)


def test_solo_finds_the_simulated_doublets(solo_run):
    adata, _, truth = solo_run
    assert average_precision_score(truth, adata.obs["doublet_score"]) >= 0.6


def test_solo_auprc_at_least_scvi_tools(solo_run):
    # The reference is committed; a missing file fails (it never skips).
    assert REFERENCE.is_file(), f"{REFERENCE} is missing: run benchmarks/make_doublet_reference.py"
    reference = np.load(REFERENCE)
    settings = json.loads(str(reference["settings"]))
    assert (settings["n_cells"], settings["n_genes"], settings["scvi_epochs"]) == (N_CELLS, N_GENES, VAE_EPOCHS)
    adata, _, truth = solo_run
    # The reference's droplets. The sampler's draws move with XLA's float rounding, which follows its backend
    # optimisation level (`make test` turns it off): 6 of the 3.56 M counts differ there; a different simulation
    # would differ by far more.
    np.testing.assert_allclose(adata.X.sum(), reference["counts_sum"], rtol=1e-5)
    np.testing.assert_array_equal(truth, reference["truth"])
    ours = average_precision_score(truth, adata.obs["doublet_score"])
    assert ours >= float(reference["auprc"]) - 0.02, (ours, float(reference["auprc"]))


def test_solo_face_and_training(solo_run):
    adata, result, _ = solo_run
    score = adata.obs["doublet_score"].to_numpy()
    assert np.all((score >= 0) & (score <= 1))
    np.testing.assert_array_equal(adata.obs["predicted_doublet"], score > 0.5)
    assert adata.uns["solo"]["params"]["doublet_ratio"] == 2
    assert result.parents.shape == (2 * adata.n_obs, 2)
    assert result.fit.n_epochs_run <= 400
    assert np.isfinite(np.asarray(result.fit.validation_loss)[: result.fit.n_epochs_run]).all()
    # the simulated doublets are recognised better than the observed cells are called doublets
    assert result.doublet_probability_sim.mean() > result.doublet_probability.mean()


def test_solo_defaults_are_scvi_tools():
    settings = solo_training_settings(None)
    assert (settings.n_epochs, settings.batch_size, settings.validation_fraction,
            settings.early_stopping_patience) == (400, 128, 0.1, 30)
    classifier = SoloClassifier(11, key=jr.key(0))
    assert classifier.hidden.out_features == 128 and classifier.output.out_features == 2


def test_solo_bad_input_writes_nothing():
    adata = ad.AnnData(np.ones((20, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="doublet_ratio"):
        pp.solo(adata, key=jr.key(0), doublet_ratio=0)
    adata.X[3] = 0
    with pytest.raises(ValueError, match="adata.X: cells"):
        pp.solo(adata, key=jr.key(0))
    assert "doublet_score" not in adata.obs and "solo" not in adata.uns
