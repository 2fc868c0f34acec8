"""End-to-end training recipes: the masked supervised loss, the supervised start of the clusters, the soft gene
gate, and (slow) whether the supervised recipe beats logistic regression on the frozen stage-wise latent."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffbio_eqx as dbx
from diffbio_eqx._clustering._mixture_stage import GaussianMixture
from diffbio_eqx._core._train import TrainSettings
from diffbio_eqx._pipeline._loss import cell_type_cross_entropy
from diffbio_eqx._pipeline._supervised import (
    GatedClassifier,
    SoftGeneGate,
    clustering_from_labels,
    fit_gated_classifier,
    gated_classifier_loss,
)


def test_unlabelled_cells_add_nothing_to_the_cross_entropy():
    assignments = jax.nn.softmax(jr.normal(jr.key(0), (6, 3)), axis=1)
    labels = jnp.array([0, 2, -1, 1, -1, 2])
    known = labels >= 0
    expected = cell_type_cross_entropy(assignments[known], labels[known])
    np.testing.assert_allclose(cell_type_cross_entropy(assignments, labels), expected, rtol=1e-6)
    assert float(cell_type_cross_entropy(assignments, jnp.full(6, -1))) == 0.0


def test_every_cell_unlabelled_is_refused_before_training():
    pipeline = dbx.create_single_cell_pipeline(key=jr.key(0), n_genes=20, n_clusters=3, enable_ambient_removal=False,
                                               enable_dim_reduction=False, enable_batch_correction=False)
    counts = np.ones((40, 20), np.float32)
    with pytest.raises(ValueError, match="cell_type_labels"):
        dbx.fit_pipeline(pipeline, {"counts": counts}, key=jr.key(1), fine_tune_epochs=1, vae_epochs=1,
                         cell_type_labels=np.full(40, -1), progress=False)
    with pytest.raises(ValueError, match="cell_type_labels"):
        dbx.fit_pipeline(pipeline, {"counts": counts}, key=jr.key(1), fine_tune_epochs=1, vae_epochs=1,
                         cell_type_labels=np.full(40, -2), progress=False)


def test_clustering_from_labels_puts_cluster_k_on_type_k():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    labels = np.repeat([0, 1, 2], 50)
    x = centres[labels] + rng.normal(size=(150, 2))
    hidden = labels.copy()
    hidden[::3] = -1
    start = GaussianMixture(jnp.zeros((3, 2)))
    stage = clustering_from_labels(start, x, hidden)
    assert isinstance(stage, GaussianMixture)
    for k in range(3):
        np.testing.assert_allclose(stage.means[k], x[hidden == k].mean(0), rtol=1e-5)
    assert np.mean(np.asarray(stage(jnp.asarray(x, stage.means.dtype))).argmax(1) == labels) > 0.95


def test_hard_concrete_gate():
    gate = SoftGeneGate(50, initial_open=0.9)
    drawn = gate(key=jr.key(0))
    assert drawn.shape == (50,) and float(drawn.min()) >= 0.0 and float(drawn.max()) <= 1.0
    assert np.mean(np.asarray(drawn) == 1.0) > 0.5  # stretched and clipped: exact ones (and zeros) occur
    np.testing.assert_array_equal(gate(), gate())  # inference gate is deterministic
    closing = jax.grad(lambda g: g.expected_open())(gate)
    assert np.all(np.asarray(closing.log_alpha) > 0)  # the L0 penalty pushes every log_alpha down
    with pytest.raises(ValueError, match="initial_open"):
        SoftGeneGate(5, initial_open=1.0)


def test_gated_classifier_shares_the_vae_elbo_and_learns_the_labels():
    """Without a gate the classifier's ELBO term is the VAE's own validation loss (one implementation of the
    terms), its cross-entropy ignores unlabelled cells, and a short fit predicts held-out cells well."""
    sim = dbx.simulate(jr.key(2), n_cells=300, n_genes=60, n_groups=3, n_batches=2, de_prob=0.3, lib_loc=7.0)
    counts, batches, groups = (np.asarray(sim.counts, np.float32), np.asarray(sim.batches), np.asarray(sim.groups))
    vae = dbx.VAENormalizer(60, latent_dim=5, n_batches=2, key=jr.key(3))
    model = GatedClassifier(vae, 3, key=jr.key(4), gate=False)
    batch = (jnp.asarray(counts), jnp.asarray(batches), jnp.full(300, -1))
    loss, aux = gated_classifier_loss(model, batch, (jnp.asarray(10.0), jnp.asarray(1.0)), key=jr.key(5))  # type: ignore[arg-type]
    _, vae_key = jr.split(jr.key(5))
    _, vae_aux = vae.loss(batch[:2], key=vae_key, inference=True)
    np.testing.assert_allclose(float(aux["elbo"]), -float(vae_aux["elbo"]), rtol=1e-5)
    assert float(aux["cross_entropy"]) == 0.0 and float(aux["open_share"]) == 0.0
    assert float(loss) == pytest.approx(float(aux["elbo"]))
    train = np.random.default_rng(0).random(300) < 0.5
    fitted = fit_gated_classifier(GatedClassifier(vae, 3, key=jr.key(4)), counts, batches,
                                  np.where(train, groups, -1), key=jr.key(6),
                                  settings=TrainSettings(n_epochs=100, batch_size=64, progress=False))
    predicted = np.asarray(fitted.model.predict(counts, batches))
    assert np.mean(predicted[~train] == groups[~train]) > 0.95  # logistic regression on log1p: 1.0
    assert fitted.model.latent(counts, batches).shape == (300, 5)


@pytest.mark.slow
def test_supervised_recipe_beats_logistic_regression_on_the_frozen_latent():
    """The proof of `study_end_to_end.py` in small: on simulated data with sparse, weak group genes, fine-tuning the
    pipeline end to end with the cross-entropy through the clusters on half of the cells predicts the other half
    better than logistic regression on the stage-wise latent (same VAE, same epochs, same key)."""
    from sklearn.linear_model import LogisticRegression

    sim = dbx.simulate(jr.key(0), n_cells=1200, n_genes=500, n_groups=6, n_batches=2, de_prob=0.05, de_fac_loc=0.5,
                       lib_loc=7.0, batch_fac_scale=0.3)
    counts, batches, groups = (np.asarray(sim.counts, np.float32), np.asarray(sim.batches), np.asarray(sim.groups))
    train = np.random.default_rng(0).random(groups.shape[0]) < 0.5
    data = {"counts": counts, "batch_labels": batches}

    def pipeline():
        return dbx.create_single_cell_pipeline(key=jr.key(1), n_genes=500, n_clusters=6, n_batches=2, latent_dim=10,
                                               hidden_dims=(128,), batch_correction_clusters=None,
                                               enable_ambient_removal=False, enable_dim_reduction=False)

    settings: dict[str, Any] = dict(vae_epochs=40, progress=False)
    staged = dbx.fit_pipeline(pipeline(), data, key=jr.key(2), **settings).pipeline
    latent = np.asarray(dbx.run_pipeline(staged, data, key=jr.key(3)).corrected_embeddings)
    baseline = LogisticRegression(max_iter=1000).fit(latent[train], groups[train]).score(latent[~train], groups[~train])
    tuned = dbx.fit_pipeline(pipeline(), data, key=jr.key(2), fine_tune_epochs=20,
                             cell_type_labels=np.where(train, groups, -1),
                             fine_tune_weights=dbx.PipelineLossWeights(supervised=10.0), **settings).pipeline
    predicted = np.asarray(dbx.run_pipeline(tuned, data, key=jr.key(3)).cluster_assignments).argmax(1)
    accuracy = np.mean(predicted[~train] == groups[~train])
    assert accuracy > baseline + 0.1, (accuracy, baseline)
