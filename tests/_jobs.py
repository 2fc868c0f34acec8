"""Small training jobs run in fresh Python processes by `test_determinism.py` and `test_resume.py`.

`python -c "import _jobs; _jobs.main()" JOB OUT.json [ARGS]` (with `tests/` on the path) runs JOB with JAX's defaults
(float32, no type-checking hook: what users get) and writes a JSON object of SHA-256 digests of every output array
and trained leaf, so two processes can be compared bit for bit. `JOB OUT.json [ARGS] + JOB OUT.json [ARGS] ...` runs
several jobs one after the other in the one process.
"""

import hashlib
import json
import os
import pathlib
import sys
import warnings
from typing import Any

import numpy as np


def digest(*trees: Any) -> str:
    """SHA-256 over the dtype, shape and bytes of every array leaf of `trees`, in order."""
    import equinox as eqx
    import jax

    h = hashlib.sha256()
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array_like)):
            array = np.asarray(leaf)
            if array.dtype == object:
                continue
            if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
                array = np.asarray(jax.random.key_data(leaf))
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _data(n_cells: int = 150, n_genes: int = 50):
    import jax.random as jr

    import diffbio_eqx as dx

    sim = dx.simulate(jr.key(0), n_cells=n_cells, n_genes=n_genes, n_groups=3, n_batches=2, contamination=0.05)
    return np.asarray(sim.counts), np.asarray(sim.batches).astype(np.int32), np.asarray(sim.ambient_profile)


SMALL = dict(latent_dim=5, hidden_dims=(32,), umap_hidden_size=16, umap_depth=2, ambient_hidden_dim=16,
             ambient_latent_dim=3, batch_correction_clusters=5, batch_correction_iterations=3)
PIPELINE_FIT = dict(ambient_epochs=2, vae_epochs=3, umap_epochs=2, clustering_iterations=20, progress=False)


def stages(seed: int) -> dict[str, str]:
    """Every stage on its own, chained as in the pipeline: ambient -> VAE -> Harmony -> UMAP and clustering."""
    import jax.random as jr

    import diffbio_eqx as dx

    counts, batches, profile = _data()
    keys = jr.split(jr.key(seed), 10)
    out = {}
    ambient = dx.AmbientRemoval(counts.shape[1], latent_dim=3, hidden_dim=16, key=keys[0])
    fitted = dx.fit_ambient_removal(ambient, counts, profile, key=keys[1],
                                    settings=dx.TrainSettings(n_epochs=3, progress=False))
    cleaned = dx.remove_ambient(fitted.model, counts, profile)
    out["ambient"] = digest(fitted.model, fitted.train_loss, cleaned)
    x = np.asarray(cleaned.decontaminated_counts)
    vae = dx.VAENormalizer(counts.shape[1], 2, hidden_dims=(32,), latent_dim=5, key=keys[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dx.NonIntegerCountsWarning)
        trained = dx.fit_vae(vae, x, batches, key=keys[3], settings=dx.TrainSettings(n_epochs=5, progress=False))
        transformed = dx.vae_transform(trained.model, x, batches)
    out["vae"] = digest(trained.model, trained.train_loss, trained.validation_loss, transformed)
    harmonized = dx.harmony(transformed.latent, batches, key=keys[4], n_clusters=5)
    out["harmony"] = digest(harmonized)
    corrected = np.asarray(harmonized.z_corr)
    umap = dx.ParametricUMAP(corrected.shape[1], hidden_size=16, depth=2, key=keys[5])
    mapped = dx.fit_umap(umap, corrected, key=keys[6], settings=dx.TrainSettings(n_epochs=3, progress=False))
    out["umap"] = digest(mapped.model, mapped.graph, mapped.train_loss, mapped.model.embed(corrected))
    clustering = dx.fit_soft_kmeans(dx.SoftKMeans(np.zeros((3, corrected.shape[1]), corrected.dtype)), corrected,
                                    key=keys[7], n_iter=30).model
    out["clustering"] = digest(clustering, clustering(corrected))
    # Another key (same shapes, nothing recompiles) must change the digests: they see the data.
    out["harmony, other key"] = digest(dx.harmony(transformed.latent, batches, key=keys[8], n_clusters=5))
    other = dx.fit_soft_kmeans(clustering, corrected, key=keys[9], n_iter=30).model
    out["clustering, other key"] = digest(other, other(corrected))
    return out


def _exit_on_call(module: Any, name: str, when: Any) -> None:
    """Replace `module.name` so that the call for which `when(*args)` is true ends the process at once, like a
    kill: no exception handler, `finally` block or atexit hook runs."""
    original = getattr(module, name)

    def patched(*args, **kwargs):
        if when(*args, **kwargs):
            os._exit(3)
        return original(*args, **kwargs)

    setattr(module, name, patched)


def half_written(n: int, then: Any) -> Any:
    """A stand-in for `eqx.tree_serialise_leaves` whose n-th call (0-based) writes half of its bytes and then calls
    `then()` (which ends the process or raises)."""
    import io

    import equinox as eqx

    original = eqx.tree_serialise_leaves
    calls = [0]

    def serialise(target, tree):
        if calls[0] == n:
            buffer = io.BytesIO()
            original(buffer, tree)
            data = buffer.getvalue()
            target.write(data[: len(data) // 2])
            target.flush()
            then()
        calls[0] += 1
        return original(target, tree)

    return serialise


def vae_training(mode: str, folder: str) -> dict[str, str]:
    """`fit_vae` for 6 epochs: `full` (no checkpoint), `stop-after-3` (the process dies before epoch 3),
    `kill-in-write-4` (dies half way through writing epoch 4's checkpoint), `resume` (a fresh process continues
    from the checkpoint)."""
    import jax.random as jr

    import diffbio_eqx as dx
    import diffbio_eqx._vae._stage as vae_module

    counts, batches, _ = _data()
    vae = dx.VAENormalizer(counts.shape[1], 2, hidden_dims=(32,), latent_dim=5, key=jr.key(1))
    path = pathlib.Path(folder) / "vae.training.eqx"
    settings = dict(n_epochs=6, progress=False)
    if mode == "stop-after-3":
        _exit_on_call(vae_module, "kl_warmup_weight", lambda epoch, *a, **k: epoch == 3)
    elif mode == "kill-in-write-4":
        import equinox as eqx

        eqx.tree_serialise_leaves = half_written(4, lambda: os._exit(3))
    if mode != "full":
        settings.update(checkpoint_path=path, resume=mode == "resume")
    fitted = dx.fit_vae(vae, counts, batches, key=jr.key(2), settings=dx.TrainSettings(**settings))
    return {"vae": digest(fitted.model, fitted.train_loss, fitted.validation_loss)}


def pipeline_training(mode: str, folder: str) -> dict[str, str]:
    """`fit_pipeline`: `full` (no checkpoints), `stop-before-umap` (the process dies once the ambient model, the
    VAE, Harmony and the clustering are done), `resume` (a fresh process continues from the checkpoint folder)."""
    import jax.random as jr

    import diffbio_eqx as dx

    counts, batches, profile = _data()
    build, fit_key = jr.split(jr.key(5), 2)
    model = dx.create_single_cell_pipeline(n_genes=counts.shape[1], n_clusters=3, n_batches=2, key=build, **SMALL)
    data = {"counts": counts, "batch_labels": batches, "ambient_profile": profile}
    settings = dict(PIPELINE_FIT)
    if mode == "stop-before-umap":
        import diffbio_eqx._umap._stage as umap_module

        _exit_on_call(umap_module, "fit_umap", lambda *a, **k: True)
    if mode != "full":
        settings["checkpoint_dir"] = folder
    fitted = dx.fit_pipeline(model, data, key=fit_key, **settings)
    # The curves of the stages finished before an interruption come back from the checkpoint's JSON as float64.
    curves = {stage: {k: np.asarray(v, np.float64) for k, v in c.items()} for stage, c in fitted.curves.items()}
    return {"pipeline": digest(fitted.pipeline), "curves": digest(curves)}


JOBS = {"stages": stages, "vae_training": vae_training, "pipeline_training": pipeline_training}


def main() -> None:
    """`JOB OUT [ARGS] [+ JOB OUT [ARGS] ...]`: each job in turn, in this one process (one interpreter start)."""
    argv = sys.argv[1:]
    while argv:
        end = argv.index("+") if "+" in argv else len(argv)
        (job, out, *args), argv = argv[:end], argv[end + 1:]
        result = JOBS[job](*[int(a) if a.isdigit() else a for a in args])
        pathlib.Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
