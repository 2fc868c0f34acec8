# Two commands for a new user: `make run` (the main job on real data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: install run test test-slow test-float32 lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[example]'

run: install
	$(BIN)/diffbio-eqx run --out $(OUT)

# The house rules first (ARCHITECTURE.md): layers and family independence, ruff, pyright; then the tests.
lint: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/pyright

# `make test` (the quick suite, under 30 min on 2 cores) leaves out tests marked slow: the reference tools'
# training runs and the quality figures over several seeds; `make test-slow` runs only those; CI runs both.
# Test files run four to a process, two processes at a time: each process pays ~20 CPU-s to start (imports, and
# jaxtyping instrumenting every function of the package), and processes that ran for the whole suite occasionally
# segfaulted inside XLA compilation; a larger stack is cheap insurance for deep compiles. The processes share one
# JAX compilation cache (the command line's too, instead of the user's folder), emptied first so a run costs what
# it costs on a fresh machine. The quick suite compiles thousands of programs and runs most of them a few times:
# XLA's backend optimisation costs more there than it saves (about a quarter of the CPU time of the pipeline
# tests), so it is off for them; the slow suite (quality figures, long training runs) compiles as users do.
TEST_CACHE := $(CURDIR)/.cache/jax-tests
PYTEST := env JAX_COMPILATION_CACHE_DIR=$(TEST_CACHE) JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.3 \
	DIFFBIO_EQX_COMPILATION_CACHE=$(TEST_CACHE) \
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider $(PYTEST_ARGS)
QUICK_XLA_FLAGS := $(XLA_FLAGS) --xla_backend_optimization_level=0

test: lint
	rm -rf $(TEST_CACHE)
	ulimit -s unlimited 2>/dev/null || ulimit -s 65536 2>/dev/null || true; \
	ls tests/test_*.py | XLA_FLAGS="$(QUICK_XLA_FLAGS)" xargs -P 2 -n 4 $(PYTEST) -m "not slow"

test-slow: lint
	rm -rf $(TEST_CACHE)
	ulimit -s unlimited 2>/dev/null || ulimit -s 65536 2>/dev/null || true; \
	grep -l "mark.slow" tests/test_*.py | xargs -P 2 -n 4 $(PYTEST) -m slow

# The suite runs with jax_enable_x64 on (finite differences, float64 parity); users run JAX's default float32.
# `make test-float32` runs the files that test the user-facing faces, the main job, determinism and resume, MAGIC,
# Solo, the metrics and the training loop again with x64 off (CI runs it after the other two): what breaks or warns only in float32
# fails there. The other files hold float64 tolerances or float64 draws by design (`DIFFBIO_EQX_TEST_X64=0` runs
# any of them the same way).
FLOAT32_TESTS := tests/test_faces.py tests/test_faces_bad_input.py tests/test_doublets_faces.py \
	tests/test_imputation_faces.py tests/test_trajectory_faces.py tests/test_annotation.py \
	tests/test_integration_pipeline.py tests/test_communication_ncem.py tests/test_end_to_end.py tests/test_cli.py \
	tests/test_first_run.py tests/test_h5ad_inputs.py tests/test_io.py tests/test_report.py \
	tests/test_determinism.py tests/test_resume.py tests/test_imputation.py tests/test_imputation_transformer.py \
	tests/test_doublets_solo.py tests/test_metrics.py tests/test_train.py
test-float32: lint
	rm -rf $(TEST_CACHE)
	ulimit -s unlimited 2>/dev/null || ulimit -s 65536 2>/dev/null || true; \
	ls $(FLOAT32_TESTS) | DIFFBIO_EQX_TEST_X64=0 XLA_FLAGS="$(QUICK_XLA_FLAGS)" xargs -P 2 -n 10 $(PYTEST) -m "not slow"

# CPU suite at quick sizes (< 20 min on 2 cores), then summary.md, scaling.png and the README's Performance section.
# `make bench BENCH_ARGS=--full` for the recorded sizes; on a GPU machine: `benchmarks/gpu.sh OUT_DIR`.
bench: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/run.py --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache .cache
