"""Numerical safety: long training on real data without NaN, library sizes from 1 to 1e6 in one matrix, genes with
no counts anywhere, float32 throughout (what users get, x64 off) and float64 when asked for."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import diffbio_eqx as dx


SMALL = dict(latent_dim=4, hidden_dims=(32,), umap_hidden_size=16, umap_depth=2, ambient_hidden_dim=16,
             ambient_latent_dim=3, batch_correction_clusters=3, batch_correction_iterations=3)
FIT = dict(ambient_epochs=5, vae_epochs=20, umap_epochs=3, clustering_iterations=30, batch_size=16, progress=False)
ZERO_GENES = [0, 7, 23]


def _float_leaves(tree) -> list[np.ndarray]:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return [np.asarray(leaf) for leaf in leaves]


def _assert_all_finite(tree, what: str) -> None:
    leaves = _float_leaves(tree)
    assert leaves, what
    for leaf in leaves:
        assert np.all(np.isfinite(leaf)), f"{what}: non-finite values"


def _wide_library_counts(n_cells: int = 64, n_genes: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three cell types; library sizes log-spaced from 1 to 1e6 (shuffled); genes `ZERO_GENES` never counted."""
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.6, 1.0, size=(3, n_genes))
    profiles[:, ZERO_GENES] = 0.0
    profiles /= profiles.sum(axis=1, keepdims=True)
    groups = np.arange(n_cells) % 3
    totals = rng.permutation(np.rint(np.logspace(0, 6, n_cells)).astype(np.int64))
    counts = np.stack([rng.multinomial(t, profiles[g]) for t, g in zip(totals, groups)]).astype(np.float32)
    assert counts.sum(axis=1).min() == 1 and counts.sum(axis=1).max() == 1_000_000
    return counts, groups


@pytest.fixture(scope="module")
def wide():
    return _wide_library_counts()


def test_library_sizes_from_1_to_1e6_and_empty_genes_through_every_stage_in_float32(wide):
    counts, _ = wide
    with jax.enable_x64(False):
        profile = np.full(counts.shape[1], 1.0 / counts.shape[1])
        ambient = dx.AmbientRemoval(counts.shape[1], latent_dim=3, hidden_dim=16, key=jr.key(0))
        fitted = dx.fit_ambient_removal(ambient, counts, profile, key=jr.key(1),
                                        settings=dx.TrainSettings(n_epochs=10, batch_size=16, progress=False))
        assert np.all(np.isfinite(np.asarray(fitted.train_loss)))
        _assert_all_finite(fitted.model, "ambient model")
        cleaned = dx.remove_ambient(fitted.model, counts, profile)
        decontaminated = np.asarray(cleaned.decontaminated_counts)
        assert decontaminated.dtype == np.float32
        assert np.all(np.isfinite(decontaminated)) and np.all(decontaminated >= 0)
        assert np.all(decontaminated <= counts * (1 + 1e-5) + 1e-3), "never more than was observed"
        assert np.all(decontaminated[:, ZERO_GENES] == 0)

        vae = dx.VAENormalizer(counts.shape[1], hidden_dims=(32,), latent_dim=4, key=jr.key(2))
        trained = dx.fit_vae(vae, counts, key=jr.key(3),
                             settings=dx.TrainSettings(n_epochs=30, batch_size=16, progress=False))
        assert np.all(np.isfinite(np.asarray(trained.train_loss)))
        assert np.all(np.isfinite(np.asarray(trained.validation_loss)))
        _assert_all_finite(trained.model, "VAE")
        out = dx.vae_transform(trained.model, counts)
        for name in ("latent", "normalized"):
            value = np.asarray(out[name])
            assert value.dtype == np.float32 and np.all(np.isfinite(value)), name
        # Normalised expression is library-size free: each cell's expected frequencies x 1e4 sum to 1e4, for the
        # one-count cell as for the million-count cell.
        np.testing.assert_allclose(np.asarray(out["normalized"]).sum(axis=1), 1e4, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_pipeline_on_library_sizes_from_1_to_1e6_keeps_the_dtype_and_stays_finite(wide, dtype):
    """float32 is what users get (x64 off); float64 is optional (x64 on and `dtype=float64`): the dtype flows from
    the configuration to every trained leaf and every output."""
    counts, groups = wide
    config = dx.SingleCellPipelineConfig(n_genes=counts.shape[1], n_clusters=3, **SMALL)
    with jax.enable_x64(dtype == "float64"):
        pipeline = dx.SingleCellPipeline(config, key=jr.key(0), dtype=dtype)
        data = {"counts": counts, "ambient_profile": np.full(counts.shape[1], 1.0)}
        fitted = dx.fit_pipeline(pipeline, data, key=jr.key(1), **FIT)
        for stage, curves in fitted.curves.items():
            for name, curve in curves.items():
                assert np.all(np.isfinite(curve)), (stage, name)
        output = dx.run_pipeline(fitted.pipeline, data, key=jr.key(2))
    for leaf in _float_leaves(fitted.pipeline):
        assert leaf.dtype == np.dtype(dtype) and np.all(np.isfinite(leaf))
    for name, value in output.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            assert value.dtype == np.dtype(dtype), name
            assert np.all(np.isfinite(value)), name
    assert np.all(np.asarray(output["decontaminated_counts"])[:, ZERO_GENES] == 0)
    np.testing.assert_allclose(np.asarray(output["cluster_assignments"]).sum(axis=1), 1.0, rtol=1e-5)


def test_20000_vae_steps_on_pbmc68k_stay_finite():
    """20,000 AdamW steps (400 epochs of 50 minibatches of 14 cells) on the real PBMC 68k counts, float32: the loss
    of every epoch and every parameter stay finite, and the model learns."""
    counts = dx.datasets.pbmc68k().X
    assert counts.shape == (700, 765)
    with jax.enable_x64(False):
        vae = dx.VAENormalizer(counts.shape[1], key=jr.key(0))
        result = dx.fit_vae(vae, counts, key=jr.key(1), settings=dx.TrainSettings(
            n_epochs=400, batch_size=14, validation_fraction=0.0, progress=False))
    steps = result.n_epochs_run * (counts.shape[0] // 14)
    assert steps == 20_000
    loss = np.asarray(result.train_loss)
    assert loss.dtype == np.float32 and np.all(np.isfinite(loss))  # a NaN in any step makes its epoch mean NaN
    _assert_all_finite(result.model, "VAE after 20,000 steps")
    for leaf in _float_leaves(result.model):
        assert leaf.dtype == np.float32
    elbo = np.asarray(result.train_aux["elbo"]) if "elbo" in result.train_aux else -loss
    print(f"20,000 steps: mean loss of the first 5 epochs {np.mean(loss[:5]):.1f}, last 20 {np.mean(loss[-20:]):.1f}")
    assert np.mean(loss[-20:]) < np.mean(loss[:5]), "the loss went down"
    assert np.all(np.isfinite(elbo))
    latent = np.asarray(dx.vae_transform(result.model, counts).latent)
    assert np.all(np.isfinite(latent)) and latent.std(axis=0).min() > 1e-3


def test_float32_inputs_stay_float32_with_x64_on():
    """With x64 on, float32 parameters and float32 counts never get promoted to float64 (no hard-coded float64)."""
    counts, _ = _wide_library_counts(n_cells=32, n_genes=30, seed=1)
    vae = dx.VAENormalizer(30, hidden_dims=(8,), latent_dim=2, dtype="float32", key=jr.key(0))
    settings = dx.TrainSettings(n_epochs=2, batch_size=8, progress=False)
    trained = dx.fit_vae(vae, counts, key=jr.key(1), settings=settings)
    out = dx.vae_transform(trained.model, counts)
    assert {leaf.dtype for leaf in _float_leaves(trained.model)} == {np.dtype(np.float32)}
    assert out.latent.dtype == jnp.float32 and out.normalized.dtype == jnp.float32


def test_a_float32_pipeline_saved_without_x64_loads_with_x64_and_back(tmp_path, wide):
    # The configuration of the pipeline tests above: building it compiles nothing new.
    config = dx.SingleCellPipelineConfig(n_genes=wide[0].shape[1], n_clusters=3, **SMALL)
    with jax.enable_x64(False):
        saved = dx.save_pipeline(tmp_path / "float32.eqx", dx.SingleCellPipeline(config, key=jr.key(0)))
    loaded = dx.load_pipeline(saved)  # this session runs with x64 on
    assert {leaf.dtype for leaf in _float_leaves(loaded)} == {np.dtype(np.float32)}
    built = dx.SingleCellPipeline(config, key=jr.key(0), dtype="float32")  # float32 with x64 on: every leaf
    assert {leaf.dtype for leaf in _float_leaves(built)} == {np.dtype(np.float32)}
    dx.save_pipeline(tmp_path / "x64.eqx", built)
    with jax.enable_x64(False):
        assert eqx.tree_equal(dx.load_pipeline(tmp_path / "x64.eqx"), built)
