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
