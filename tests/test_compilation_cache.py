"""Warm starts: the command line switches on JAX's persistent compilation cache, and a second run finds its
programs there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache

from diffbio_eqx import cli


@pytest.fixture
def restore_cache_config():
    saved = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_the_cache_folder_follows_flag_then_variable_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.COMPILATION_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compilation_cache_dir() == tmp_path / "xdg" / "diffbio-eqx" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.compilation_cache_dir() == tmp_path / "home" / ".cache" / "diffbio-eqx" / "jax"
    monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, str(tmp_path / "env"))
    assert cli.compilation_cache_dir() == tmp_path / "env"
    assert cli.compilation_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert cli.compilation_cache_dir("none") is None
    monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, "none")
    assert cli.compilation_cache_dir() is None


def test_a_second_run_loads_the_first_runs_programs(monkeypatch, tmp_path, restore_cache_config):
    """`diffbio-eqx run --compilation-cache DIR` sets JAX's cache folder before the job compiles; the job's
    programs land there, and a second invocation (in-memory caches cleared, as in a new process) hits them."""
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    seen = []

    def job(arguments):  # stands in for the main job: one small program of its own
        seen.append(getattr(jax.config, "jax_compilation_cache_dir"))
        value = jax.jit(lambda v: jnp.tanh(v) * 3.0 + jnp.cumsum(v))(jnp.arange(7.0))
        np.testing.assert_allclose(value, np.tanh(np.arange(7.0)) * 3 + np.cumsum(np.arange(7.0)), rtol=1e-6)
        return 0

    monkeypatch.setattr(cli, "_run", job)
    folder = tmp_path / "cache"
    compilation_cache.reset_cache()
    jax.clear_caches()
    assert cli.main(["run", "--quiet", "--compilation-cache", str(folder)]) == 0
    assert seen == [str(folder)]
    entries = list(folder.iterdir())
    assert entries, "the first run wrote no cache entries"
    jax.clear_caches()  # forget the compiled programs in memory, as a new process would
    n_hits = len(hits)
    assert cli.main(["run", "--quiet", "--compilation-cache", str(folder)]) == 0
    assert len(hits) > n_hits
    assert sorted(folder.iterdir()) == sorted(entries)  # nothing new compiled


def test_none_leaves_the_cache_off(monkeypatch, restore_cache_config):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setattr(cli, "_run", lambda arguments: 0)
    assert cli.main(["run", "--compilation-cache", "none"]) == 0
    assert getattr(jax.config, "jax_compilation_cache_dir") is None


# ---------------------------------------------------------------------------------------------------------------
# No host callbacks in the main job's programs
#
# JAX never writes a program holding a host callback to the persistent cache (`jax._src.compiler._cache_write`), and
# `eqx.error_if` raises through one. The host entry points check concrete inputs and settings first and compile
# their programs without in-program checks; traced inputs (under the user's `jit`/`vmap`) keep them.


def _lowered_text(function, *args, **kwargs) -> str:
    return function.lower(*args, **kwargs).as_text()


def _has_callback(text: str) -> bool:
    return "callback" in text


class _Stop(Exception):
    """Raised by a spy once it has seen the arguments of a compiled call (nothing runs)."""


@pytest.fixture(scope="module")
def ambient_inputs():
    import jax.random as jr

    import diffbio_eqx as dx

    rng = np.random.default_rng(5)
    counts = jnp.asarray(rng.poisson(3.0, size=(32, 12)), jnp.float32)
    profile = jnp.asarray(rng.dirichlet(np.ones(12)), jnp.float32)
    return dx.AmbientRemoval(12, latent_dim=2, hidden_dim=8, dtype=jnp.float32, key=jr.key(6)), counts, profile


def test_ambient_epoch_and_chunk_programs_hold_no_callback(ambient_inputs):
    import equinox as eqx
    import jax.random as jr

    from diffbio_eqx._ambient import _stage as ambient_stage

    stage, counts, profile = ambient_inputs
    checked_loss = eqx.filter_jit(lambda s, c, p, k: s.loss((c, p), key=k))
    assert _has_callback(_lowered_text(checked_loss, stage, counts, profile, jr.key(0)))  # the checks are there
    epoch_loss = eqx.filter_jit(lambda s, c, p, k: ambient_stage._ambient_loss(s, (c,), p, key=k))
    assert not _has_callback(_lowered_text(epoch_loss, stage, counts, profile, jr.key(0)))
    assert not _has_callback(_lowered_text(ambient_stage._remove_chunk, (counts,), (stage, profile, False)))


def test_harmony_on_concrete_inputs_compiles_without_checks(monkeypatch):
    import jax.random as jr

    import diffbio_eqx as dx
    from diffbio_eqx._harmony import _stage as harmony_stage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    batches = (np.arange(40) % 2).astype(np.int32)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["check"])
        raise _Stop

    real = harmony_stage._harmony_jit
    monkeypatch.setattr(harmony_stage, "_harmony_jit", spy)
    args: dict = {"n_clusters": 3, "max_iter_harmony": 1, "max_iter_kmeans": 2}
    with pytest.raises(_Stop):
        dx.harmony(x, batches, key=jr.key(0), **args)
    with pytest.raises(_Stop):
        jax.jit(lambda v: dx.harmony(v, batches, key=jr.key(0), n_batches=2, **args).z_corr)(jnp.asarray(x))
    assert seen == [False, True]  # concrete: checked on the host; traced: checked in the program
    with pytest.raises(ValueError, match="sigma: must be > 0"):
        dx.harmony(x, batches, key=jr.key(0), sigma=-0.1, **args)
    settings = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jnp.float32), harmony_stage.Harmony(**args))
    x32, labels = jnp.asarray(x, jnp.float32), jnp.asarray(batches)[:, None]
    shapes = harmony_stage._Shapes((2,), 3, (20, 20))
    for check in (True, False):
        text = _lowered_text(real, settings, x32, labels, None, key=jr.key(0), shapes=shapes, check=check)
        assert _has_callback(text) == check


@pytest.mark.slow  # traces and lowers the whole pipeline twice (about 15 s)
def test_run_pipeline_compiles_without_checks_after_host_checks(monkeypatch):
    import equinox as eqx
    import jax.random as jr

    import diffbio_eqx as dx
    from diffbio_eqx._pipeline import _run

    rng = np.random.default_rng(1)
    data = {"counts": rng.poisson(2.0, size=(30, 10)).astype(np.float32),
            "batch_labels": (np.arange(30) % 2).astype(np.int32), "ambient_profile": np.full(10, 0.1)}
    pipeline = dx.create_single_cell_pipeline(n_genes=10, n_batches=2, n_clusters=3, latent_dim=2,
                                              hidden_dims=(8,), enable_batch_correction=False,
                                              enable_dim_reduction=False, key=jr.key(0))
    seen = []

    def spy(*args):
        seen.append(args)
        raise _Stop

    real = _run._run_compiled
    monkeypatch.setattr(_run, "_run_compiled", spy)
    with pytest.raises(_Stop):
        dx.run_pipeline(pipeline, data, key=jr.key(1))
    *args, check = seen[0]
    assert check is False
    assert not _has_callback(_lowered_text(real, *args, False))
    assert _has_callback(_lowered_text(real, *args, True))
    cold = eqx.tree_at(lambda p: p.clustering.temperature, pipeline, jnp.asarray(0.0, pipeline.dtype))
    with pytest.raises(ValueError, match="temperature: must be > 0"):
        dx.run_pipeline(cold, data, key=jr.key(1))
