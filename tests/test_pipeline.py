import dataclasses
import json

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import knn_batch_purity, tree_identical
from sklearn.metrics import adjusted_rand_score

import diffbio_eqx as dbx
import diffbio_eqx._umap._stage as umap_module
from diffbio_eqx import (
    PipelineLossWeights,
    SingleCellPipeline,
    SingleCellPipelineConfig,
    create_single_cell_pipeline,
    fit_pipeline,
    load_pipeline,
    pipeline_loss,
    run_pipeline,
    save_pipeline,
)
from diffbio_eqx._core._neighbors import exact_knn


SMALL = dict(latent_dim=10, hidden_dims=(128,), umap_hidden_size=16, umap_depth=2, ambient_hidden_dim=32,
             ambient_latent_dim=4, batch_correction_clusters=10, batch_correction_iterations=5)
FAST_FIT = dict(ambient_epochs=30, vae_epochs=None, umap_epochs=5, progress=False)


def _data(seed=0, n_cells=400, n_genes=200, n_batches=2, contamination=0.05):
    sim = dbx.simulate(jr.key(seed), n_cells=n_cells, n_genes=n_genes, n_groups=4, n_batches=n_batches,
                       contamination=contamination)
    data = {"counts": np.asarray(sim.counts), "ambient_profile": np.asarray(sim.ambient_profile),
            "batch_labels": np.asarray(sim.batches)}
    return data, sim


@pytest.fixture(scope="module")
def trained():
    data, sim = _data()
    pipeline = create_single_cell_pipeline(n_genes=200, n_clusters=4, n_batches=2, key=jr.key(1), **SMALL)
    fitted = fit_pipeline(pipeline, data, key=jr.key(2), **FAST_FIT)
    return fitted, data, sim


def test_config_has_the_seed_defaults():
    config = SingleCellPipelineConfig()
    assert (config.n_genes, config.n_clusters, config.latent_dim, config.hidden_dims) == (2000, 10, 64, (128, 64))
    assert (config.umap_n_components, config.batch_correction_clusters, config.batch_correction_iterations) == (
        2, 100, 10)
    assert config.clustering_temperature == 1.0
    assert config.enable_ambient_removal and config.enable_batch_correction
    assert config.enable_dim_reduction and config.enable_clustering
    assert SingleCellPipelineConfig.from_dict(config.to_dict()) == config


def test_config_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="n_clusters: must be a positive integer or None, got 0"):
        SingleCellPipelineConfig(n_clusters=0)
    with pytest.raises(ValueError, match="clustering_temperature: must be > 0"):
        SingleCellPipelineConfig(clustering_temperature=0.0)
    with pytest.raises(ValueError, match=r"config: unknown setting\(s\) \['n_gene'\]"):
        SingleCellPipelineConfig.from_dict({"n_gene": 5})
    path = tmp_path / "config.toml"
    path.write_text("[pipeline]\nn_genes = 50\nhidden_dims = [16]\n")
    assert SingleCellPipelineConfig.from_file(path).hidden_dims == (16,)
    path.write_text("n_genes = ")
    with pytest.raises(ValueError, match="could not be parsed"):
        SingleCellPipelineConfig.from_file(path)


def test_stages_are_reachable_and_none_when_disabled():
    pipeline = create_single_cell_pipeline(n_genes=30, n_clusters=3, key=jr.key(0), **SMALL)
    assert pipeline.clustering.means.shape == (3, 10)
    assert isinstance(pipeline.vae_normalizer, dbx.VAENormalizer)
    off = create_single_cell_pipeline(n_genes=30, enable_ambient_removal=False, enable_batch_correction=False,
                                      enable_dim_reduction=False, enable_clustering=False, key=jr.key(0), **SMALL)
    assert off.ambient_removal is None and off.batch_correction is None
    assert off.dim_reduction is None and off.clustering is None


def test_output_keys_shapes_and_disabled_stages_pass_through(trained):
    fitted, data, _ = trained
    out = run_pipeline(fitted.pipeline, data, key=jr.key(3))  # the program the other tests of `trained` compile
    assert out["counts"].shape == (400, 200)
    assert out["decontaminated_counts"].shape == (400, 200)
    assert out["normalized"].shape == (400, 200)
    assert out["latent"].shape == out["corrected_embeddings"].shape == (400, 10)
    assert out["embeddings_2d"].shape == (400, 2)
    assert out["cluster_assignments"].shape == (400, 4)
    np.testing.assert_allclose(np.asarray(out["cluster_assignments"]).sum(1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(out["decontaminated_counts"]) <= data["counts"] + 1e-9)
    off = create_single_cell_pipeline(n_genes=200, n_batches=2, enable_ambient_removal=False,
                                      enable_batch_correction=False, enable_dim_reduction=False,
                                      enable_clustering=False, key=jr.key(0), **SMALL)
    out = run_pipeline(off, data, key=jr.key(1))
    assert "decontaminated_counts" not in out
    with pytest.raises(KeyError, match="decontaminated_counts"):
        out["decontaminated_counts"]
    np.testing.assert_array_equal(out["corrected_embeddings"], out["latent"])
    np.testing.assert_array_equal(out["embeddings_2d"], out["corrected_embeddings"])
    np.testing.assert_array_equal(out["cluster_assignments"], out["corrected_embeddings"])


def test_bad_input_is_named():
    data, _ = _data()  # the shapes of `trained`'s data (the simulator compiles once), first 50 cells
    data = {k: v if k == "ambient_profile" else v[:50] for k, v in data.items()}
    pipeline = create_single_cell_pipeline(n_genes=200, n_clusters=3, n_batches=2, key=jr.key(0), **SMALL)
    with pytest.raises(ValueError, match="counts: has 200 genes but the model was built for 30"):
        run_pipeline(create_single_cell_pipeline(n_genes=30, key=jr.key(0), **SMALL), data, key=jr.key(0))
    bad = dict(data, batch_labels=np.full(50, 2))
    with pytest.raises(ValueError, match=r"batch_labels: value 2 at cell 0 is out of range \[0, 2\)"):
        run_pipeline(pipeline, bad, key=jr.key(0))
    with pytest.raises(ValueError, match="ambient_profile: all zeros"):
        run_pipeline(pipeline, dict(data, ambient_profile=np.zeros(200)), key=jr.key(0))
    # Assigning 2 cells to 3 clusters is fine (test_io projects 2 cells); running Harmony on them is not.
    with pytest.raises(ValueError, match="batch_correction_clusters: Harmony asked for 10 clusters but there are only "
                                         "2 cells"):
        run_pipeline(pipeline, {k: v if k == "ambient_profile" else v[:2] for k, v in data.items()}, key=jr.key(0))
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['count'\]"):
        run_pipeline(pipeline, {"count": data["counts"]}, key=jr.key(0))


def test_training_recovers_groups_and_mixes_batches(trained):
    fitted, data, sim = trained
    out = run_pipeline(fitted.pipeline, data, key=jr.key(3))
    clusters = np.argmax(np.asarray(out["cluster_assignments"]), axis=1)
    assert adjusted_rand_score(np.asarray(sim.groups), clusters) >= 0.8
    indices, distances = exact_knn(out["corrected_embeddings"], out["corrected_embeddings"], 45)
    mixed = dbx.ilisi(indices, distances, data["batch_labels"])
    indices, distances = exact_knn(out["latent"], out["latent"], 45)
    before = dbx.ilisi(indices, distances, data["batch_labels"])
    # Harmony must improve batch mixing, not merely keep it: the simulated batches scale every gene by
    # exp(N(0, 0.15)), which the VAE latent keeps in part. Measured iLISI 0.845 -> 0.856 here (and 0.804 -> 0.887
    # with batch_fac_scale=0.5).
    assert mixed >= before + 0.005, (before, mixed)
    assert set(fitted.curves) >= {"ambient_removal", "vae_normalizer", "batch_correction", "dim_reduction"}
    assert fitted.curves["vae_normalizer"]["train"][-1] < fitted.curves["vae_normalizer"]["train"][0]


def test_gradients_of_the_pipeline_loss_reach_every_stage(trained):
    fitted, data, _ = trained
    pipeline = fitted.pipeline
    inputs = (jnp.asarray(data["counts"][:64]), jnp.asarray(data["ambient_profile"]),
              jnp.asarray(data["batch_labels"][:64]))

    @eqx.filter_jit  # one compiled program per pipeline structure (eagerly, every operation compiles on its own)
    @eqx.filter_value_and_grad
    def loss(p, counts, profile, labels):
        return pipeline_loss(p, counts, profile, labels, key=jr.key(0))[0]

    value, grads = loss(pipeline, *inputs)
    assert np.isfinite(float(value))

    def norm(tree):
        leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
        return float(sum(np.sum(np.abs(np.asarray(leaf))) for leaf in leaves))

    for stage in ("ambient_removal", "vae_normalizer", "dim_reduction", "clustering"):
        assert norm(getattr(grads, stage)) > 0, stage
    # Without a stored reference Harmony runs on the batch, and its theta gets a gradient too.
    unreferenced = eqx.tree_at(lambda p: p.harmony_reference, pipeline, None)
    _, grads = loss(unreferenced, *inputs)
    assert float(np.abs(np.asarray(grads.batch_correction.theta))) > 0


def test_same_key_same_result_and_checkpoint_roundtrip(trained, tmp_path):
    fitted, data, _ = trained
    first = run_pipeline(fitted.pipeline, data, key=jr.key(4))
    second = run_pipeline(fitted.pipeline, data, key=jr.key(4))
    assert tree_identical(first, second)
    path = save_pipeline(tmp_path / "pipeline.eqx", fitted.pipeline)
    loaded = load_pipeline(path)
    assert tree_identical(run_pipeline(loaded, data, key=jr.key(4)), first)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="could not be read"):
        load_pipeline(path)


def test_new_cells_are_mapped_onto_the_reference(trained):
    fitted, _, _ = trained
    # Same key, more cells: gene means, group and batch effects come from the same random streams (their shapes do
    # not depend on n_cells), so these are new cells of the same biology; the training cells are not among them.
    # 400 new cells, as many as the training cells: the run is the program the other tests compiled.
    fresh = dbx.simulate(jr.key(0), n_cells=800, n_genes=200, n_groups=4, n_batches=2, contamination=0.05)
    query = {"counts": np.asarray(fresh.counts[400:]), "ambient_profile": np.asarray(fresh.ambient_profile),
             "batch_labels": np.asarray(fresh.batches[400:])}
    out = run_pipeline(fitted.pipeline, query, key=jr.key(5))
    clusters = np.argmax(np.asarray(out["cluster_assignments"]), axis=1)
    assert adjusted_rand_score(np.asarray(fresh.groups[400:]), clusters) >= 0.7


def test_supervised_fine_tuning_lowers_the_cell_type_loss():
    # `trained`'s shapes and settings (its stages' programs compile once), other data and keys
    data, sim = _data(seed=6)
    pipeline = create_single_cell_pipeline(n_genes=200, n_clusters=4, n_batches=2, key=jr.key(7), **SMALL)
    groups = np.asarray(sim.groups)
    tuned = fit_pipeline(pipeline, data, key=jr.key(8), fine_tune_epochs=5, cell_type_labels=groups,
                         fine_tune_weights=PipelineLossWeights(supervised=10.0), **FAST_FIT)
    assert "end_to_end" in tuned.curves
    curve = tuned.curves["end_to_end"]["train"]
    assert np.all(np.isfinite(curve)) and curve[-1] < curve[0]


def test_vmapped_study_equals_the_loop(trained):
    fitted, data, _ = trained
    pipeline = eqx.tree_at(lambda p: p.harmony_reference, fitted.pipeline, None)
    thetas = jnp.array([0.0, 2.0])
    temperatures = jnp.array([0.5, 2.0])

    def assignments(theta, temperature):
        p = eqx.tree_at(lambda p: (p.batch_correction.theta, p.clustering.temperature), pipeline,
                        (theta, temperature))
        return run_pipeline(p, data, key=jr.key(9))["cluster_assignments"]

    grid = dbx.sweep_pipeline(pipeline, data, key=jr.key(9), theta=thetas, temperature=temperatures)
    grid = grid["cluster_assignments"]
    assert grid.shape == (2, 2, 400, 4)
    for i, theta in enumerate(thetas):
        for j, temperature in enumerate(temperatures):
            np.testing.assert_allclose(grid[i, j], assignments(theta, temperature), rtol=1e-5, atol=1e-6)


def test_umap_encoder_trained_on_a_subsample_embeds_every_cell(trained):
    """`umap_max_cells`: the graph is built on a random subsample; the encoder still places all cells by group."""
    full, data, sim = trained
    pipeline = create_single_cell_pipeline(n_genes=200, n_clusters=4, n_batches=2, key=jr.key(1), **SMALL)
    subsampled = fit_pipeline(pipeline, data, key=jr.key(2), umap_max_cells=120, **FAST_FIT)
    groups = np.asarray(sim.groups)
    purity = {}
    for name, fitted in (("full", full), ("subsample", subsampled)):
        embedding = np.asarray(run_pipeline(fitted.pipeline, data, key=jr.key(3))["embeddings_2d"])
        assert embedding.shape == (400, 2)
        purity[name] = knn_batch_purity(embedding, groups)  # share of each cell's 2-D neighbours in its group
    # the stages before UMAP are the same run, so only the graph's cells differ
    assert tree_identical(eqx.filter(subsampled.pipeline.clustering, eqx.is_array),
                          eqx.filter(full.pipeline.clustering, eqx.is_array))
    chance = float(np.sum((np.bincount(groups) / len(groups)) ** 2))
    # measured: full graph 0.704, graph on 120 of the 400 cells 0.699 (chance 0.25; 5 UMAP epochs)
    assert purity["subsample"] >= max(2 * chance, purity["full"] - 0.05), (purity, chance)
    with pytest.raises(ValueError, match="umap_max_cells"):
        fit_pipeline(pipeline, data, key=jr.key(2), umap_max_cells=10, **FAST_FIT)


def test_replace_of_config_keeps_it_hashable():
    config = SingleCellPipelineConfig(n_genes=30)
    assert hash(config.replace(n_clusters=4)) != hash(config)
    assert dataclasses.is_dataclass(config)
    assert isinstance(SingleCellPipeline(config.replace(**SMALL), key=jr.key(0)), eqx.Module)


def test_fit_anndata_writes_scanpy_conventions():
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    data, sim = _data(seed=3)  # `trained`'s shapes and settings: the stages' programs compile once
    obs = pd.DataFrame({"sample": np.where(data["batch_labels"] == 0, "donor_a", "donor_b")})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=sp.csr_matrix(data["counts"].astype(np.float32)), obs=obs)
    config = SingleCellPipelineConfig(n_clusters=4, **SMALL)
    annotated, fitted = dbx.fit_anndata(adata, batch_key="sample", key=jr.key(0), config=config,
                                        ambient_profile=data["ambient_profile"], **FAST_FIT)
    assert "X_umap" not in adata.obsm  # the input is untouched
    assert annotated.obsm["X_umap"].shape == (400, 2)
    assert annotated.obsm["X_diffbio_corrected"].shape == (400, 10)
    assert annotated.layers["diffbio_decontaminated"].shape == (400, 200)
    assert annotated.uns["diffbio_batch_categories"] == ["donor_a", "donor_b"]
    clusters = annotated.obs["diffbio_cluster"].to_numpy()
    assert adjusted_rand_score(np.asarray(sim.groups), clusters) >= 0.7
    assert fitted.pipeline.config.n_batches == 2


def test_interrupted_training_resumes_to_the_same_pipeline(tmp_path, monkeypatch):
    data, _ = _data(seed=4)  # `trained`'s shapes: the stages' programs compile once
    pipeline = create_single_cell_pipeline(n_genes=200, n_clusters=4, n_batches=2, key=jr.key(1), **SMALL)
    settings = dict(ambient_epochs=5, vae_epochs=20, umap_epochs=2, progress=False)
    uninterrupted = fit_pipeline(pipeline, data, key=jr.key(2), **settings)

    class Interrupted(Exception):
        pass

    def interrupt(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(umap_module, "fit_umap", interrupt)  # stop after the VAE and Harmony
        with pytest.raises(Interrupted):
            fit_pipeline(pipeline, data, key=jr.key(2), checkpoint_dir=tmp_path, **settings)
    assert (tmp_path / "pipeline.eqx").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = fit_pipeline(pipeline, data, key=jr.key(2), checkpoint_dir=tmp_path, **settings)
    assert tree_identical(resumed.pipeline, uninterrupted.pipeline)
    assert set(resumed.curves) == set(uninterrupted.curves)


def test_settings_are_read_from_the_stages(tmp_path):
    """The config says how the pipeline was built; `settings()` says what runs, after `eqx.tree_at` too, and the
    saved file's header carries those settings."""
    # 30 genes and 3 clusters, as the other tests that only build pipelines: their initialisers compile once
    pipeline = create_single_cell_pipeline(n_genes=30, n_clusters=3, harmony_theta=1.0, key=jr.key(0), **SMALL)
    assert pipeline.settings()["harmony_theta"] == 1.0
    changed = eqx.tree_at(lambda p: (p.batch_correction.theta, p.clustering.temperature), pipeline,
                          (jnp.asarray(3.5, pipeline.dtype), jnp.asarray(0.25, pipeline.dtype)))
    settings = changed.settings()
    assert settings["harmony_theta"] == 3.5 and settings["clustering_temperature"] == 0.25
    assert settings["n_genes"] == 30 and settings["harmony_sigma"] == changed.config.harmony_sigma
    assert {"harmony_lamb", "umap_a", "vae_target_library_size"} <= set(settings)
    path = save_pipeline(tmp_path / "pipeline.eqx", changed)
    header = json.loads(path.open("rb").readline())
    assert header["settings"]["harmony_theta"] == 3.5
    assert load_pipeline(path).settings() == settings


def test_genes_are_kept_and_saved(tmp_path):
    genes = [f"gene{j}" for j in range(30)]
    pipeline = create_single_cell_pipeline(n_genes=30, n_clusters=3, genes=genes, key=jr.key(0), **SMALL)
    assert pipeline.genes == tuple(genes)
    loaded = load_pipeline(save_pipeline(tmp_path / "pipeline.eqx", pipeline))
    assert loaded.genes == tuple(genes) and tree_identical(loaded, pipeline)
    assert load_pipeline(save_pipeline(tmp_path / "none.eqx", SingleCellPipeline(pipeline.config, key=jr.key(0)))
                         ).genes is None
    with pytest.raises(ValueError, match="genes: 29 names for a model of 30 genes"):
        create_single_cell_pipeline(n_genes=30, genes=genes[:29], key=jr.key(0), **SMALL)
    with pytest.raises(ValueError, match=r"genes: names must be unique; 1 repeated, e.g. \['gene0'\]"):
        create_single_cell_pipeline(n_genes=30, genes=["gene0", *genes[:29]], key=jr.key(0), **SMALL)


def test_fit_settings_object_equals_the_keywords():
    data, _ = _data(seed=5)  # `trained`'s shapes: the stages' programs compile once
    pipeline = create_single_cell_pipeline(n_genes=200, n_clusters=4, n_batches=2, key=jr.key(0), **SMALL)
    tiny = dict(ambient_epochs=1, vae_epochs=2, umap_epochs=1, clustering_iterations=5)
    by_keywords = fit_pipeline(pipeline, data, key=jr.key(1), progress=False, **tiny)
    by_object = fit_pipeline(pipeline, data, key=jr.key(1), progress=False,
                             settings=dbx.FitSettings(**(tiny | {"umap_epochs": 7})), umap_epochs=1)
    assert tree_identical(by_keywords.pipeline, by_object.pipeline)
    assert set(by_keywords.curves) == set(by_object.curves) == set(by_object.seconds)  # EM curve included
    with pytest.raises(ValueError, match=r"fit_pipeline: unknown setting\(s\) \['vae_epoch'\]"):
        fit_pipeline(pipeline, data, key=jr.key(1), vae_epoch=3)
