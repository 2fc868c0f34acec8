"""Resuming interrupted training: a run killed after epoch k (or half way through writing a checkpoint) and resumed
from its checkpoint in a fresh process ends bit for bit where the uninterrupted run ends; a failed checkpoint
write never replaces the previous checkpoint. (`test_train.py`, `test_vae.py` and `test_pipeline.py` check
in-process resumption after an exception.)"""

import json
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax.random as jr
import numpy as np
import optax
import pytest
from _jobs import half_written
from test_train import _regression, _regression_loss

import diffbio_eqx as dx


ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB = "import sys; sys.path.insert(0, 'tests'); import _jobs; _jobs.main()"
KILLED = 3  # the exit status of a job that `tests/_jobs.py` ends on purpose (`os._exit(3)`)


def start(cache: pathlib.Path, *jobs: tuple[str | pathlib.Path, ...]) -> subprocess.Popen:
    """Start jobs (`(job, out, *args)`, run one after the other) in a fresh process. The processes of this file
    share a persistent XLA compilation cache (the uninterrupted runs fill it), so the killed and resumed runs execute
    the very programs the uninterrupted runs compiled, as a resumed run on the same machine would; that fresh
    compilations give the same bits is `test_determinism.py`'s subject."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    argv = [str(arg) for i, job in enumerate(jobs) for arg in ((("+",) if i else ()) + job)]
    return subprocess.Popen([sys.executable, "-c", JOB, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, expected: int = 0) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == expected, stderr[-3000:]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The uninterrupted VAE and pipeline runs, one after the other in one fresh process (one interpreter start);
    they fill the compilation cache that the killed and resumed processes of both tests read."""
    folder = tmp_path_factory.mktemp("full")
    runs = {"cache": folder / "xla-cache", "vae": folder / "vae.json", "pipeline": folder / "pipeline.json"}
    finish(start(runs["cache"], ("vae_training", runs["vae"], "full", folder),
                 ("pipeline_training", runs["pipeline"], "full", folder)))
    return runs


def test_vae_training_killed_and_resumed_in_a_new_process_is_bitwise_identical(tmp_path, full):
    stopped, killed = tmp_path / "stopped", tmp_path / "killed"
    stopped.mkdir()
    killed.mkdir()
    cache = full["cache"]
    runs = [start(cache, ("vae_training", tmp_path / "never.json", "stop-after-3", stopped)),
            start(cache, ("vae_training", tmp_path / "never.json", "kill-in-write-4", killed))]
    finish(runs[0], KILLED)
    finish(runs[1], KILLED)
    # Killed half way through writing epoch 4's checkpoint: the half-written bytes are in the temporary file
    # only, and the checkpoint itself is still epoch 3's, complete.
    partial = killed / ".vae.training.eqx.tmp"
    assert partial.is_file() and 0 < partial.stat().st_size < (killed / "vae.training.eqx").stat().st_size
    assert not (tmp_path / "never.json").exists()
    # Both resume in one fresh process (each from its own checkpoint only), one after the other.
    finish(start(cache, *[("vae_training", tmp_path / f"{folder.name}.json", "resume", folder)
                          for folder in (stopped, killed)]))
    expected = json.loads(full["vae"].read_text())
    assert json.loads((tmp_path / "stopped.json").read_text()) == expected
    assert json.loads((tmp_path / "killed.json").read_text()) == expected
    assert sorted(p.name for p in killed.iterdir()) == ["vae.training.eqx"], "the stale temporary file is gone"


def test_pipeline_training_killed_and_resumed_in_a_new_process_is_bitwise_identical(tmp_path, full):
    folder = tmp_path / "checkpoints"
    cache = full["cache"]
    finish(start(cache, ("pipeline_training", tmp_path / "never.json", "stop-before-umap", folder)), KILLED)
    assert sorted(p.name for p in folder.iterdir()) == ["ambient.training.eqx", "pipeline.eqx", "vae.training.eqx"]
    header = json.loads((folder / "pipeline.eqx").open("rb").readline())
    assert header["progress"]["done"] == ["ambient_removal", "vae_normalizer"]
    finish(start(cache, ("pipeline_training", tmp_path / "resumed.json", "resume", folder)))
    assert json.loads((tmp_path / "resumed.json").read_text()) == json.loads(full["pipeline"].read_text())


def _fail_on_write(monkeypatch, n: int) -> None:
    """The n-th (0-based) checkpoint write writes half of its bytes, then raises."""

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", half_written(n, disk_full))


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    x, y, _, model = _regression(iter(jr.split(jr.key(0), 3)).__next__, n=64, d=3)
    settings = dict(n_epochs=6, batch_size=16, optimizer=optax.adam(0.05), progress=False)
    full = dx.fit(model, _regression_loss, (x, y), key=jr.key(1), settings=dx.TrainSettings(**settings))
    path = tmp_path / "training.eqx"
    with monkeypatch.context() as patch:
        _fail_on_write(patch, 3)  # epochs 0-2 are saved; epoch 3's write fails half way
        with pytest.raises(OSError, match="No space left on device"):
            dx.fit(model, _regression_loss, (x, y), key=jr.key(1),
                   settings=dx.TrainSettings(checkpoint_path=path, **settings))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training.eqx"], "no temporary file is left"
    resumed = dx.fit(model, _regression_loss, (x, y), key=jr.key(1),
                     settings=dx.TrainSettings(checkpoint_path=path, resume=True, **settings))
    assert eqx.tree_equal(resumed.model, full.model, typematch=True)
    np.testing.assert_array_equal(resumed.train_loss, full.train_loss)


def test_a_failed_pipeline_save_keeps_the_previous_file(tmp_path, monkeypatch):
    first = dx.create_single_cell_pipeline(n_genes=20, n_clusters=2, latent_dim=3, hidden_dims=(8,), key=jr.key(0))
    second = dx.create_single_cell_pipeline(n_genes=20, n_clusters=2, latent_dim=3, hidden_dims=(8,), key=jr.key(1))
    path = dx.save_pipeline(tmp_path / "pipeline.eqx", first)
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        _fail_on_write(patch, 0)
        with pytest.raises(OSError, match="No space left on device"):
            dx.save_pipeline(path, second)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.eqx"], "no temporary file is left"
    assert eqx.tree_equal(dx.load_pipeline(path), first, typematch=True)
