"""Several devices: data-parallel training and chunked inference over a `jax.sharding` mesh equal one device, with
the training data split along cells (each device holds a quarter of the rows, read from the arrays' shardings).

XLA's host platform is split into 4 CPU devices with `XLA_FLAGS=--xla_force_host_platform_device_count=4`, which
must be set before JAX initialises its backends, so the work runs in a subprocess. The subprocess runs under the
same jaxtyping/beartype import hook and promotion rules as the test suite, checks, and prints what it measured.

Tolerances: with a mesh, each device sums the gradient of its quarter of the minibatch and XLA all-reduces the
four partial sums, so the float additions happen in another order than on one device (about one ulp per sum);
Adam then carries such differences through the epochs. Hence float64 runs are compared at rtol 1e-10 and float32
runs at rtol 1e-5 for the losses and 2e-5 for the worst parameter element (a few ulps amplified over ~40 steps;
4.8e-6 measured on this machine's CPU). Inference has no reduction across cells, so it is
compared at 1e-12 (float64).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest


# Slow (about 95 s of one process: a subprocess that compiles the sharded programs for 4 forced devices): the quick
# suite is at its 30-minute budget on 2 cores, and CI runs the slow suite too.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, sys
    import jaxtyping
    with jaxtyping.install_import_hook(["diffbio_eqx"], "beartype.beartype"):
        import diffbio_eqx as dx
        from diffbio_eqx._core._train import map_in_chunks
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import jax.tree_util as jtu
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    out = {"devices": len(jax.devices())}

    def max_relative(a, b, floor):
        leaves_a = jtu.tree_leaves(eqx.filter(a, eqx.is_inexact_array))
        leaves_b = jtu.tree_leaves(eqx.filter(b, eqx.is_inexact_array))
        assert len(leaves_a) == len(leaves_b) > 0
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / (np.abs(np.asarray(y)) + floor)))
                   for x, y in zip(leaves_a, leaves_b))

    def device_count(tree):
        return min(len(leaf.sharding.device_set) for leaf in jtu.tree_leaves(eqx.filter(tree, eqx.is_array)))

    # Every array `fit` trains on goes through `shard_rows`: record what it placed, to read the shardings.
    from diffbio_eqx._core import _train
    placed = []
    original_shard_rows = _train.shard_rows
    def spy(rows, mesh):
        result = original_shard_rows(rows, mesh)
        placed.append(result)
        return result
    _train.shard_rows = spy

    sim = dx.simulate_sparse(jr.key(0), n_cells=640, n_genes=120, n_groups=3, n_batches=2, chunk_size=300)
    counts, batches = sim.counts, sim.batches

    # 1. VAE training, float64 and float32 parameters, one device vs a 4-device mesh.
    for name, dtype in (("float64", jnp.float64), ("float32", jnp.float32)):
        vae = dx.VAENormalizer(120, 2, hidden_dims=(32,), latent_dim=6, dtype=dtype, key=jr.key(1))
        settings = dict(n_epochs=4, batch_size=64, progress=False)
        one = dx.fit_vae(vae, counts, batches, key=jr.key(2), settings=dx.TrainSettings(**settings))
        many = dx.fit_vae(vae, counts, batches, key=jr.key(2), settings=dx.TrainSettings(devices="all", **settings))
        out[f"vae_{name}_param_rel"] = max_relative(many.model, one.model, 1e-3)
        ratio = np.asarray(many.train_loss) / np.asarray(one.train_loss)
        out[f"vae_{name}_loss_rel"] = float(np.max(np.abs(ratio - 1)))
        out[f"vae_{name}_validation_rel"] = float(np.max(np.abs(
            np.asarray(many.validation_loss) / np.asarray(one.validation_loss) - 1)))
        out[f"vae_{name}_loss_moved"] = float(one.train_loss[0] - one.train_loss[-1])
        out[f"vae_{name}_model_devices"] = device_count(many.model)
        out[f"vae_{name}_dtype"] = str(many.model.dtype)
    trained = one.model

    # XLA, not our code, inserted the gradient all-reduce: look for it in the optimised HLO of the epoch.
    dumped = [p for p in pathlib.Path(os.environ["DUMP_DIR"]).glob("*train_epoch*after_optimizations.txt")]
    out["epoch_programs"] = len(dumped)
    out["epoch_programs_with_all_reduce"] = sum("all-reduce" in p.read_text() for p in dumped)

    # 2. Chunked inference: VAE posterior means and a bare map_in_chunks, sharded vs not.
    vae64 = dx.fit_vae(dx.VAENormalizer(120, 2, hidden_dims=(32,), latent_dim=6, key=jr.key(1)), counts, batches,
                       key=jr.key(2), settings=dx.TrainSettings(n_epochs=2, batch_size=64, progress=False)).model
    one = dx.vae_latent(vae64, counts, batches, chunk_size=100)
    many = dx.vae_latent(vae64, counts, batches, chunk_size=100, devices="all")
    out["latent_rel"] = max_relative(many, one, 1e-3)
    out["latent_shape"] = list(many.shape)
    normalized_one = dx.vae_transform(vae64, counts, batches, chunk_size=128).normalized
    normalized_many = dx.vae_transform(vae64, counts, batches, chunk_size=128, devices=jax.devices()[:2]).normalized
    out["normalized_two_devices_rel"] = max_relative(normalized_many, normalized_one, 1e-6)

    chunk_devices = []
    def scaled(batch, context):  # eager, to read the concrete sharding of each chunk
        chunk_devices.append(len(batch[0].sharding.device_set))
        return batch[0] * context
    x = np.asarray(jr.normal(jr.key(3), (103, 3)))
    y = map_in_chunks(scaled, (x,), chunk_size=25, context=jnp.asarray(2.0), devices="all")
    out["map_in_chunks_exact"] = bool(np.array_equal(np.asarray(y), 2.0 * x))
    out["map_in_chunks_chunk_devices"] = chunk_devices

    # 3. The trained pipeline's inference, chunked: sharded vs one device vs the whole-data run.
    config = dx.SingleCellPipelineConfig(n_genes=120, n_clusters=3, latent_dim=6, hidden_dims=(32,), n_batches=2,
                                         batch_correction_clusters=6, umap_hidden_size=16, ambient_hidden_dim=16,
                                         ambient_latent_dim=3)
    data = {"counts": counts, "batch_labels": batches, "ambient_profile": np.asarray(counts.sum(axis=0)).ravel() + 1.0}
    fitted = dx.fit_pipeline(dx.SingleCellPipeline(config, key=jr.key(4)), data, key=jr.key(5), ambient_epochs=2,
                             vae_epochs=2, umap_epochs=1, clustering_iterations=5, batch_size=64, progress=False)
    names = ("latent", "corrected_embeddings", "embeddings_2d", "cluster_assignments", "normalized")
    one = dx.run_pipeline_in_chunks(fitted.pipeline, data, key=jr.key(6), chunk_size=200, outputs=names)
    many = dx.run_pipeline_in_chunks(fitted.pipeline, data, key=jr.key(6), chunk_size=200, outputs=names,
                                     devices="all")
    whole = dx.run_pipeline(fitted.pipeline, {**data, "counts": counts.toarray()}, key=jr.key(6))
    for name in names:
        out[f"pipeline_{name}_sharded_rel"] = max_relative(many[name], one[name], 1e-3)
        out[f"pipeline_{name}_whole_rel"] = max_relative(one[name], whole[name], 1e-3)

    # 5. The training data are split along cells: each device holds a quarter of the rows (from the shardings of
    # what `fit` trained on: the CSR runs of section 1, then dense counts here), and the sharded fit of dense
    # counts equals the one-device fit too.
    settings = dict(n_epochs=1, batch_size=64, progress=False)
    vae = dx.VAENormalizer(120, 2, hidden_dims=(16,), latent_dim=4, key=jr.key(7))
    dense_counts = np.asarray(counts.toarray(), np.float64)
    one = dx.fit_vae(vae, dense_counts, batches, key=jr.key(8), settings=dx.TrainSettings(**settings))
    many = dx.fit_vae(vae, dense_counts, batches, key=jr.key(8), settings=dx.TrainSettings(devices="all", **settings))
    _train.shard_rows = original_shard_rows
    out["dense_sharded_param_rel"] = max_relative(many.model, one.model, 1e-3)
    shares = []
    for tree in placed:
        for leaf in jtu.tree_leaves(eqx.filter(tree, eqx.is_array)):
            rows = [shard.data.shape[0] for shard in leaf.addressable_shards]
            shares.append({"rows": int(leaf.shape[0]), "per_device": rows,
                           "devices": sorted({shard.device.id for shard in leaf.addressable_shards}),
                           "spec": str(leaf.sharding.spec)})
    out["data_shares"] = shares

    # 4. A minibatch that does not split evenly over the devices is refused.
    try:
        dx.fit_vae(vae64, counts, batches, key=jr.key(2),
                   settings=dx.TrainSettings(n_epochs=1, batch_size=66, devices="all", progress=False))
        out["uneven_batch_error"] = None
    except ValueError as error:
        out["uneven_batch_error"] = str(error)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    dump = tmp_path_factory.mktemp("hlo")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 --xla_dump_to={dump}"
    env["DUMP_DIR"] = str(dump)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"subprocess failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_four_devices_are_seen(measured):
    assert measured["devices"] == 4


@pytest.mark.parametrize("dtype, rtol, param_rtol", [("float64", 1e-10, 1e-10), ("float32", 1e-5, 2e-5)])
def test_data_parallel_training_equals_one_device(measured, dtype, rtol, param_rtol):
    assert measured[f"vae_{dtype}_dtype"] == dtype
    assert measured[f"vae_{dtype}_model_devices"] == 4, "the trained parameters live (replicated) on 4 devices"
    assert measured[f"vae_{dtype}_loss_moved"] > 0, "the VAE trained (its loss went down)"
    # Worst parameter element measured here: 8.7e-15 (float64), 4.8e-6 (float32); losses 1e-16 and 1.5e-7.
    assert measured[f"vae_{dtype}_param_rel"] < param_rtol
    assert measured[f"vae_{dtype}_loss_rel"] < rtol
    assert measured[f"vae_{dtype}_validation_rel"] < rtol


def test_xla_inserts_the_gradient_all_reduce(measured):
    assert measured["epoch_programs"] >= 1
    assert measured["epoch_programs_with_all_reduce"] >= 1


def test_sharded_chunked_inference_equals_unsharded(measured):
    assert measured["latent_shape"] == [640, 6]
    assert measured["latent_rel"] < 1e-12
    assert measured["normalized_two_devices_rel"] < 1e-12
    assert measured["map_in_chunks_exact"]
    # 25-row chunks are rounded up to 28 so that each of the 4 devices gets 7 rows.
    assert set(measured["map_in_chunks_chunk_devices"]) == {4}


@pytest.mark.parametrize("name", ["latent", "corrected_embeddings", "embeddings_2d", "cluster_assignments",
                                  "normalized"])
def test_pipeline_inference_sharded_equals_unsharded_and_whole(measured, name):
    assert measured[f"pipeline_{name}_sharded_rel"] < 1e-12
    # Chunked (one device) against the one-call whole-data run: the same per-cell maths, other batch shapes.
    assert measured[f"pipeline_{name}_whole_rel"] < 1e-9


def test_training_data_is_split_along_cells(measured):
    # CSR counts (`SparseRows`: non-zeros, their columns, row pointers) and batch codes of the sharded VAE fits, then
    # dense counts and batch codes: every array is split in four equal shares, one per device.
    shares = measured["data_shares"]
    assert len(shares) >= 4 + 2
    for share in shares:
        assert share["devices"] == [0, 1, 2, 3], share
        assert share["per_device"] == [share["rows"] // 4] * 4, share
        assert "('cells'" in share["spec"], share
    # 640 cells, 120 genes: each device holds 160 rows of the dense counts (and 160 or 161 row pointers of the CSR)
    assert {"rows": 640, "per_device": [160] * 4} in [{k: s[k] for k in ("rows", "per_device")} for s in shares]
    assert any(share["rows"] == 644 and share["per_device"] == [161] * 4 for share in shares)
    # float64: the split data give the one-device fit (measured 0 to a few ulps)
    assert measured["dense_sharded_param_rel"] < 1e-10


def test_uneven_minibatch_is_refused(measured):
    assert measured["uneven_batch_error"] is not None
    assert "batch_size" in measured["uneven_batch_error"] and "4 devices" in measured["uneven_batch_error"]
