"""The MMD and adversarial correctors inside the pipeline: fit, run, chunked projection of new cells, sweep, save."""

from typing import Any

import jax.random as jr
import numpy as np
import pytest

import diffbio_eqx as dbx
from diffbio_eqx import SingleCellPipelineConfig, create_single_cell_pipeline, fit_pipeline, run_pipeline


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

