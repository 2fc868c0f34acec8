"""End-to-end training recipes: the masked supervised loss, the supervised start of the clusters, the soft gene
gate, and (slow) whether the supervised recipe beats logistic regression on the frozen stage-wise latent."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffbio_eqx as dbx
from diffbio_eqx._clustering._mixture_stage import GaussianMixture
from diffbio_eqx._pipeline._loss import cell_type_cross_entropy
from diffbio_eqx._pipeline._supervised import SoftGeneGate, clustering_from_labels


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
