"""No recompiles across hyperparameter values at the public compiled entry points.

Each test swaps one module-level `eqx.filter_jit` entry point for the same function under
`eqx.debug.assert_max_traces(max_traces=1)` and calls the public API with several hyperparameter values; a second
trace raises. A negative control (changing a shape-fixing setting) shows that the check does fire.
"""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffbio_eqx as dx
from diffbio_eqx._core import _train
from diffbio_eqx._harmony import _stage as _harmony
from diffbio_eqx._pipeline import _run, _sweep


@pytest.fixture
def traced_once(monkeypatch):
    """Replace `module.name` (an `eqx.filter_jit` function) by one that may trace only once."""

    def patch(module, name):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, eqx.filter_jit(eqx.debug.assert_max_traces(original.__wrapped__,
                                                                                      max_traces=1)))

    return patch


def _embedding(n_cells=300, n_dims=6, n_batches=3, seed=0):
    rng = np.random.default_rng(seed)
    batches = rng.integers(0, n_batches, n_cells)
    x = rng.normal(size=(n_cells, n_dims)) + rng.normal(size=(n_batches, n_dims))[batches]
    return x, batches


def test_harmony_hyperparameters_do_not_retrace_and_shape_settings_do(traced_once):
    traced_once(_harmony, "_harmony_jit")
    x, batches = _embedding()
    outputs = [
        np.asarray(dx.harmony(x, batches, key=jr.key(0), theta=theta, sigma=sigma, lamb=lamb, epsilon_harmony=eps,
                              max_iter_harmony=3, n_clusters=8).z_corr)
        for theta, sigma, lamb, eps in ((0.0, 0.1, 1.0, 1e-4), (2.0, 0.2, 0.5, 1e-3), (4.0, 0.05, -1.0, -np.inf))
    ]
    # The values do reach the computation: different settings give different corrections.
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])
    # The negative control: a shape-fixing setting (the number of clusters) does trace again.
    with pytest.raises(RuntimeError, match="can only be traced 1 times"):
        dx.harmony(x, batches, key=jr.key(0), max_iter_harmony=3, n_clusters=9)


def _small_pipeline_and_data():
    sim = dx.simulate(jr.key(0), n_cells=120, n_genes=40, n_groups=3, n_batches=2)
    counts = np.array(sim.counts)
    counts[counts.sum(axis=1) == 0, 0] = 1.0
    data = {"counts": counts, "batch_labels": np.asarray(sim.batches),
            "ambient_profile": counts.sum(axis=0) + 1.0}
    config = dx.SingleCellPipelineConfig(n_genes=40, n_batches=2, latent_dim=4, hidden_dims=(8,), n_clusters=3,
                                         batch_correction_clusters=4, umap_hidden_size=8, ambient_hidden_dim=8,
                                         ambient_latent_dim=3)
    return dx.SingleCellPipeline(config, key=jr.key(1)), data


def _with_values(pipeline, theta, temperature, sigma):
    return eqx.tree_at(lambda p: (p.batch_correction.theta, p.batch_correction.sigma, p.clustering.temperature),
                       pipeline, (jnp.asarray(theta), jnp.asarray(sigma), jnp.asarray(temperature)))


@pytest.mark.parametrize("with_reference", [False, True])
def test_pipeline_hyperparameters_do_not_retrace(traced_once, with_reference):
    traced_once(_run, "_run_compiled")
    pipeline, data = _small_pipeline_and_data()
    if with_reference:
        d = pipeline.config.latent_dim
        reference = dx.HarmonyReference(jnp.eye(4, d), jnp.zeros((4, 2, d)), jnp.asarray(0.1), (2,))
        pipeline = eqx.tree_at(lambda p: p.harmony_reference, pipeline, reference, is_leaf=lambda n: n is None)
    assignments = [
        dx.run_pipeline(_with_values(pipeline, theta, temperature, sigma), data, key=jr.key(2),
                        inference=with_reference).cluster_assignments
        for theta, temperature, sigma in ((1.0, 0.5, 0.1), (3.0, 2.0, 0.3))
    ]
    assert not np.allclose(assignments[0], assignments[1])


def test_sweep_pipeline_does_not_retrace_across_grids(traced_once):
    traced_once(_sweep, "_sweep_compiled")
    pipeline, data = _small_pipeline_and_data()
    first = dx.sweep_pipeline(pipeline, data, key=jr.key(0), theta=np.array([0.0, 2.0]),
                              temperature=np.array([0.5, 1.0]))
    second = dx.sweep_pipeline(pipeline, data, key=jr.key(0), theta=np.array([1.0, 3.0]),
                               temperature=np.array([0.25, 4.0]))
    assert first.cluster_assignments.shape == second.cluster_assignments.shape == (2, 2, 120, 3)


def _tiny_vae_and_counts():
    sim = dx.simulate(jr.key(0), n_cells=64, n_genes=30, n_groups=2)
    counts = np.array(sim.counts)
    counts[counts.sum(axis=1) == 0, 0] = 1.0
    return dx.VAENormalizer(30, hidden_dims=(8,), latent_dim=3, key=jr.key(0)), counts


def test_vae_training_and_optimiser_settings_do_not_retrace(traced_once):
    traced_once(_train, "_train_epoch")
    vae, counts = _tiny_vae_and_counts()
    losses = [
        np.asarray(dx.fit_vae(vae, counts, key=jr.key(1), n_epochs_kl_warmup=warmup, max_kl_weight=top,
                              settings=dx.TrainSettings(n_epochs=2, batch_size=32, progress=False, hyperparameters={
                                  "learning_rate": rate, "weight_decay": decay, "eps": eps})).train_loss)
        for warmup, top, rate, decay, eps in ((1, 1.0, 1e-3, 1e-6, 0.01), (4, 0.25, 3e-2, 1e-2, 1e-4))
    ]
    assert not np.allclose(losses[0], losses[1])

    # The learning rate is an array in the optimiser state: a larger one must move the weights further (same
    # compiled epoch: the patch above still allows no second trace).
    def moved(rate):
        settings = dx.TrainSettings(n_epochs=1, batch_size=32, hyperparameters={"learning_rate": rate}, progress=False)
        trained = dx.fit_vae(vae, counts, key=jr.key(1), settings=settings).model
        return float(np.abs(np.asarray(trained.scale_head.weight) - np.asarray(vae.scale_head.weight)).max())

    small, large = moved(1e-4), moved(1e-2)
    assert large > 20 * small > 0


def test_ambient_training_settings_do_not_retrace(traced_once):
    traced_once(_train, "_train_epoch")
    sim = dx.simulate(jr.key(0), n_cells=80, n_genes=40, n_groups=2, contamination=0.1)
    counts = np.array(sim.counts)
    stage = dx.AmbientRemoval(40, key=jr.key(0))
    fits = [dx.fit_ambient_removal(stage, counts, np.asarray(sim.ambient_profile), key=jr.key(1),
                                   settings=dx.TrainSettings(n_epochs=2, batch_size=32, progress=False,
                                                             hyperparameters={"learning_rate": rate})).model
            for rate in (3e-3, 3e-2)]
    assert not eqx.tree_equal(fits[0], fits[1])


def test_umap_fit_does_not_retrace_across_calls(traced_once):
    traced_once(_train, "_train_epoch")
    x, _ = _embedding(n_cells=120)
    umap = dx.ParametricUMAP(x.shape[1], n_neighbors=8, key=jr.key(0))
    settings = dx.TrainSettings(n_epochs=2, progress=False)
    losses = [dx.fit_umap(umap, x, key=jr.key(seed), settings=settings).train_loss for seed in (1, 2)]
    assert not np.allclose(losses[0], losses[1])


def test_soft_kmeans_temperature_does_not_retrace(traced_once):
    from diffbio_eqx._clustering import _stage as _clustering

    traced_once(_clustering, "_fit_centroids")
    x, _ = _embedding()
    centroids = [dx.fit_soft_kmeans(dx.SoftKMeans(x[:4], temperature=t), x, key=jr.key(0), n_iter=10).model.centroids
                 for t in (0.1, 1.0, 5.0)]
    assert not np.allclose(centroids[0], centroids[2])


def test_fit_pipeline_learning_rate_does_not_retrace(monkeypatch):
    # Every training stage (ambient, VAE, UMAP encoder, end-to-end fine-tuning) goes through `_train_epoch`, each
    # with its own loss, so the first `fit_pipeline` traces it once per stage; a second call with another
    # learning rate must trace nothing new.
    traces = []
    original = _train._train_epoch.__wrapped__

    def counted(*args, **kwargs):
        traces.append(kwargs["steps"].loss_fn)
        return original(*args, **kwargs)

    monkeypatch.setattr(_train, "_train_epoch", eqx.filter_jit(counted))
    pipeline, data = _small_pipeline_and_data()
    settings = dict(ambient_epochs=1, vae_epochs=1, umap_epochs=1, fine_tune_epochs=1, clustering_iterations=5,
                    batch_size=32, progress=False)
    first = dx.fit_pipeline(pipeline, data, key=jr.key(3), learning_rate=1e-3, **settings)
    n_first = len(traces)
    assert n_first >= 3
    second = dx.fit_pipeline(pipeline, data, key=jr.key(3), learning_rate=3e-2, **settings)
    assert len(traces) == n_first
    assert not eqx.tree_equal(first.pipeline.vae_normalizer, second.pipeline.vae_normalizer)
