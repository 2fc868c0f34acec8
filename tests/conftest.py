import os

import jax
import jax.random as jr
import pytest


# float64 for finite differences; DIFFBIO_EQX_TEST_X64=0 runs the float32 leg (JAX's default, what users run)
X64 = os.environ.get("DIFFBIO_EQX_TEST_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(0), 1000))
    return lambda: next(keys)


# make test runs one process per file and shares JAX's persistent compilation cache between them (the Makefile
# sets JAX_COMPILATION_CACHE_DIR); this reports what the cache saved in each file's summary.
_compile_seconds = {"compiled": 0.0, "saved": 0.0}


def _record_duration(event: str, seconds: float, **_: object) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compile_seconds["compiled"] += seconds
    elif event == "/jax/compilation_cache/compile_time_saved_sec":
        _compile_seconds["saved"] += seconds


jax.monitoring.register_event_duration_secs_listener(_record_duration)


def pytest_terminal_summary(terminalreporter):
    if jax.config.jax_compilation_cache_dir:
        terminalreporter.write_line(
            f"XLA compile {_compile_seconds['compiled']:.0f} s; the shared compilation cache saved "
            # JAX reports compile time minus retrieval time per hit: negative when reading was slower.
            + (f"{round(_compile_seconds['saved']):+d} s" if round(_compile_seconds["saved"]) else "0 s")
        )


def pytest_sessionfinish(session, exitstatus):
    # make test deselects slow tests file by file, make test-slow keeps only them: a file left with no test to
    # run is not a failure of either.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
