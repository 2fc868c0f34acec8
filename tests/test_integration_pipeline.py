"""The MMD and adversarial correctors inside the pipeline: fit, run, chunked projection of new cells, sweep, save."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tree_identical

import diffbio_eqx as dbx
from diffbio_eqx import SingleCellPipelineConfig, create_single_cell_pipeline, fit_pipeline, run_pipeline
from diffbio_eqx._core._neighbors import exact_knn
from diffbio_eqx._pipeline._loss import pipeline_loss


TINY: dict[str, Any] = dict(n_genes=60, n_clusters=3, n_batches=2, latent_dim=4, hidden_dims=(16,),
                            enable_ambient_removal=False, enable_dim_reduction=False, enable_clustering=False)


def test_config_batch_correction_choices():
    assert SingleCellPipelineConfig().batch_correction_method == "harmony"
    with pytest.raises(ValueError, match="enable_batch_correction=False"):
        SingleCellPipelineConfig(batch_correction="none")  # one switch turns correction off: enable_*
    assert SingleCellPipelineConfig(batch_correction="mmd", enable_batch_correction=False).batch_correction_method \
        is None
    with pytest.raises(ValueError, match="batch_correction"):
        SingleCellPipelineConfig(batch_correction="scvi")
    with pytest.raises(ValueError, match="mmd_beta"):
        SingleCellPipelineConfig(mmd_beta=-1.0)


@pytest.mark.parametrize("method", ["mmd", "adversarial"])
def test_pipeline_with_a_trained_corrector(method, tmp_path):
    rng = np.random.default_rng(0)
    batches, types = np.arange(150) % 2, rng.integers(0, 3, 150)
    means = rng.gamma(1.0, 1.0, (3, 60))[types] * np.exp(rng.normal(0.0, 0.5, (2, 60)))[batches] * 5
    counts = rng.poisson(means).astype(np.float32)
    data = {"counts": counts, "ambient_profile": counts.sum(0) / counts.sum(), "batch_labels": batches}
    pipeline = create_single_cell_pipeline(key=jr.key(1), batch_correction=method, **TINY)
    assert pipeline.batch_correction is None  # no Harmony stage: the correction is in the VAE's training
    fitted = fit_pipeline(pipeline, data, key=jr.key(2), vae_epochs=3, progress=False)
    trained = fitted.pipeline
    assert trained.config.batch_correction_method == method
    out = run_pipeline(trained, data, key=jr.key(3))
    np.testing.assert_array_equal(out["corrected_embeddings"], out["latent"])
    if method == "mmd":  # the rest does not depend on which corrector trained the VAE
        return
    # new cells: projected chunk by chunk with the trained encoder, the same numbers as the whole run
    chunked = dbx.run_pipeline_in_chunks(trained, data, key=jr.key(3), chunk_size=64)
    np.testing.assert_allclose(chunked["corrected_embeddings"], out["corrected_embeddings"], rtol=1e-5, atol=1e-6)
    swept = dbx.sweep_pipeline(trained, data, key=jr.key(3), theta=np.array([1.0, 2.0]),
                               temperature=np.array([1.0]))
    assert swept.corrected_embeddings.shape == (2, 1, 150, 4)
    dbx.save_pipeline(tmp_path / "p.eqx", trained)
    assert dbx.load_pipeline(tmp_path / "p.eqx").config == trained.config



def _shifted_data(n_cells: int = 150, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batches, types = np.arange(n_cells) % 2, rng.integers(0, 3, n_cells)
    means = rng.gamma(1.0, 1.0, (3, 60))[types] * np.exp(rng.normal(0.0, 0.7, (2, 60)))[batches] * 5
    counts = rng.poisson(means).astype(np.float32)
    return {"counts": counts, "ambient_profile": counts.sum(0) / counts.sum(), "batch_labels": batches}


def test_fine_tune_loss_keeps_the_mmd_penalty():
    # The same pipeline (same key) with mmd_beta 0 and 2: the VAE term of the end-to-end loss differs by exactly
    # 2 x the MMD (non-zero; the unbiased estimate may be negative at initialisation).
    data = _shifted_data()
    args = (jnp.asarray(data["counts"]), jnp.asarray(data["ambient_profile"]), jnp.asarray(data["batch_labels"]))
    loss = eqx.filter_jit(lambda p: pipeline_loss(p, *args, key=jr.key(2), kl_weight=0.5)[1])
    losses = {beta: loss(create_single_cell_pipeline(key=jr.key(1), batch_correction="mmd", mmd_beta=beta, **TINY))
              for beta in (0.0, 2.0)}
    mmd = float(losses[2.0]["mmd"])
    assert abs(mmd) > 1e-3
    np.testing.assert_allclose(float(losses[0.0]["mmd"]), mmd, rtol=1e-6)
    np.testing.assert_allclose(float(losses[2.0]["vae"] - losses[0.0]["vae"]), 2.0 * mmd, rtol=1e-4)


@pytest.mark.slow  # three pipeline fits (197 s at load average ~20)
def test_adversarial_fine_tune_keeps_the_batch_mixing():
    # The end-to-end fine-tune has no critic (README): on the ELBO alone the encoder learned the batches back (iLISI
    # of the latent 0.55 -> 0.08 and 0.44 -> 0.26 in 10 epochs at two of three seeds, to 0.03 or less at all three
    # in float32), so it holds the encoder, which carries the correction, and trains the rest.
    data = _shifted_data()
    pipeline = create_single_cell_pipeline(key=jr.key(1), batch_correction="adversarial", **TINY)
    fits, mixing = {}, {}
    for name, epochs in (("corrected", 0), ("fine_tuned", 10)):
        fits[name] = fit_pipeline(pipeline, data, key=jr.key(7), vae_epochs=40, fine_tune_epochs=epochs,
                                  progress=False).pipeline
        latent = run_pipeline(fits[name], data, key=jr.key(3))["latent"]
        mixing[name] = dbx.ilisi(*exact_knn(latent, latent, 30), data["batch_labels"])
    plain = create_single_cell_pipeline(key=jr.key(1), enable_batch_correction=False, **TINY)
    latent = run_pipeline(fit_pipeline(plain, data, key=jr.key(7), vae_epochs=40, progress=False).pipeline, data,
                          key=jr.key(3))["latent"]
    mixing["uncorrected"] = dbx.ilisi(*exact_knn(latent, latent, 30), data["batch_labels"])
    encoder = lambda p: (p.vae_normalizer.encoder, p.vae_normalizer.mean_head, p.vae_normalizer.log_variance_head)
    assert tree_identical(eqx.filter(encoder(fits["corrected"]), eqx.is_array),
                          eqx.filter(encoder(fits["fine_tuned"]), eqx.is_array))
    assert not tree_identical(eqx.filter(fits["corrected"].vae_normalizer.decoder, eqx.is_array),
                              eqx.filter(fits["fine_tuned"].vae_normalizer.decoder, eqx.is_array))
    assert mixing["corrected"] > mixing["uncorrected"] + 0.05, mixing
    assert mixing["fine_tuned"] == mixing["corrected"], mixing
