"""Harmony (diffbio_eqx) against harmonypy 2.1 on the same CPU, in one run.

Both run 10 fixed outer rounds of 4 clustering rounds (tolerances -inf, so neither stops early) on simulated
50-PC embeddings with 4 batches; times include the k-means++ initialisation, compile time is reported apart.
Peak memory is measured in a fresh subprocess per tool and size: the peak resident set of one run above the
resident set just before it (after a warm-up run, with the kernel's high-water mark reset through
/proc/self/clear_refs), scaled to a million cells. The sweep compares one vmapped call over 16 theta values
with a Python loop of 16 calls of one compiled function.

Timed rounds alternate between the tools (`repeats` of them); `ratio` is the median of the per-round time ratios
(ours / harmonypy), `time_ratio` holds its range; `agreement_median_pc_r` is the quality beside it. The process
runs in equinox's default error mode unless `EQX_ON_ERROR` says otherwise (recorded as `error_mode`).

Usage: `python benchmarks/bench_harmony.py [--sizes 10000 100000] [--out benchmarks/results]`.

Typical printout (2 CPU cores shared with other jobs, load average ~10, x86-64, jax 0.10.2 CPU, float32; the
10k ratio moved between 0.38 and 0.90 over runs with the load, the 100k one between 0.59 and 0.66):

    n_cells=10000: harmonypy 0.79 s, ours 0.71 s (ratio 0.90), compile 11.9 s; peak memory per million cells:
    ours 2.08 GB, harmonypy 1.80 GB
    n_cells=100000: harmonypy 15.20 s, ours 10.03 s (ratio 0.66), compile 8.7 s; peak memory per million cells:
    ours 1.98 GB, harmonypy 1.71 GB
    16-theta sweep at 10000 cells: vmap 11.92 s, loop of compiled calls 9.96 s (vmap/loop 1.20), max |diff| 1.1e-05
"""

import argparse
import datetime
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


N_DIMS = 50
N_BATCHES = 4
MAX_ITER_HARMONY = 10
MAX_ITER_KMEANS = 4


def make_data(n_cells: int, seed: int = 0):
    """A 50-dimensional Gaussian mixture (20 groups) with a shift per batch (4 batches), float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, N_DIMS)) * 3
    shifts = rng.normal(size=(N_BATCHES, N_DIMS))
    groups = rng.integers(0, 20, n_cells)
    batches = rng.integers(0, N_BATCHES, n_cells).astype(np.int32)
    x = centers[groups] + shifts[batches] + rng.normal(size=(n_cells, N_DIMS))
    return x.astype(np.float32), batches


def run_harmonypy(x, batches, seed: int = 0):
    import harmonypy
    import numpy as np
    import pandas as pd

    logging.getLogger("harmonypy").setLevel(logging.WARNING)
    meta = pd.DataFrame({"batch": batches.astype(str)})
    return harmonypy.run_harmony(
        x.astype(np.float64), meta, "batch", max_iter_harmony=MAX_ITER_HARMONY, max_iter_kmeans=MAX_ITER_KMEANS,
        epsilon_cluster=-np.inf, epsilon_harmony=-np.inf, verbose=False, random_state=seed,
    )


def run_ours(x, batches, seed: int = 0, theta=None):
    import jax
    import jax.random as jr
    import numpy as np

    import diffbio_eqx as dbx

    result = dbx.harmony(
        x, batches, key=jr.key(seed), theta=theta, max_iter_harmony=MAX_ITER_HARMONY,
        max_iter_kmeans=MAX_ITER_KMEANS, epsilon_cluster=-np.inf, epsilon_harmony=-np.inf,
    )
    return jax.block_until_ready(result)


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_worker(tool: str, n_cells: int) -> None:
    """Subprocess body: warm up, reset the high-water mark, run once, print the peak above the baseline."""
    import ctypes
    import gc

    x, batches = make_data(n_cells)
    run = run_ours if tool == "ours" else run_harmonypy
    result = run(x, batches)  # warm-up: compiles ours
    record = {}
    if tool == "ours":
        record["xla_memory_analysis"] = _xla_memory(x, batches)
    del result
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next peak is not hidden by it
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    result = run(x, batches, seed=1)
    peak = _status_kib("VmHWM")
    record.update(baseline_bytes=baseline * 1024, peak_bytes=(peak - baseline) * 1024)
    print(json.dumps(record))
    del result


def _xla_memory(x, batches) -> dict:
    """XLA's buffer assignment for the compiled Harmony call: arguments, outputs and temporaries (bytes)."""
    from diffbio_eqx._harmony import _stage as _harmony

    captured = {}
    compiled_fn = _harmony._harmony_jit
    _harmony._harmony_jit = lambda *args, **kwargs: captured.update(args=args, kwargs=kwargs)
    try:
        import jax.random as jr
        import numpy as np

        _harmony.harmony(
            x, batches, key=jr.key(0), max_iter_harmony=MAX_ITER_HARMONY, max_iter_kmeans=MAX_ITER_KMEANS,
            epsilon_cluster=-np.inf, epsilon_harmony=-np.inf,
        )
    finally:
        _harmony._harmony_jit = compiled_fn
    analysis = compiled_fn.lower(*captured["args"], **captured["kwargs"]).compile().compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {name: int(getattr(analysis, name)) for name in fields}


def measure_peak(tool: str, n_cells: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-worker", tool, str(n_cells)], capture_output=True, text=True, check=True,
        # the checkout first, the caller's path kept (gpu.sh's carried packages live there)
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(pathlib.Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])},
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["per_million_cells_gb"] = record["peak_bytes"] / n_cells * 1e6 / 1e9
    return record


def _best(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def _agreement(ours, theirs) -> float:
    """Median over PCs of the Pearson r between our corrected embedding and harmonypy's (different k-means++
    draws, so below the 0.9999 of the same-start parity test)."""
    import numpy as np

    a = np.asarray(ours, np.float64)
    b = np.asarray(theirs, np.float64)
    b = b.T if b.shape != a.shape else b
    return float(np.median([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]))


def bench_size(n_cells: int, repeats: int) -> dict:
    x, batches = make_data(n_cells)
    start = time.perf_counter()
    first = run_ours(x, batches)
    first_call = time.perf_counter() - start
    assert int(first.n_rounds) == MAX_ITER_HARMONY
    theirs = run_harmonypy(x, batches)
    assert list(theirs.kmeans_rounds) == [MAX_ITER_KMEANS] * MAX_ITER_HARMONY, theirs.kmeans_rounds
    # Interleave the two tools so that load from other processes hits both alike; every ratio is per round.
    ours_times, theirs_times = [], []
    for i in range(repeats):
        ours_times.append(_best(lambda: run_ours(x, batches, seed=i + 1), 1)[0])
        theirs_times.append(_best(lambda: run_harmonypy(x, batches, seed=i + 1), 1)[0])
    time_ratio = _common.ratio_summary(ours_times, theirs_times)
    record = {
        "n_cells": n_cells,
        "n_dims": N_DIMS,
        "n_batches": N_BATCHES,
        "n_clusters": int(first.centroids.shape[0]),
        "ours_seconds": _common.median(ours_times),
        "harmonypy_seconds": _common.median(theirs_times),
        "ratio": time_ratio["median"],
        "time_ratio": time_ratio,
        "ours_all_seconds": ours_times,
        "harmonypy_all_seconds": theirs_times,
        "ours_compile_seconds": max(first_call - _common.median(ours_times), 0.0),
        "agreement_median_pc_r": _agreement(first.z_corr, theirs.Z_corr),
        "error_mode": _common.error_mode(),
    }
    for tool in ("ours", "harmonypy"):
        record[f"{tool}_memory"] = measure_peak(tool, n_cells)
    return record


def bench_sweep(n_cells: int, n_thetas: int) -> dict:
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import diffbio_eqx as dbx

    x, batches = make_data(n_cells)
    thetas = jnp.linspace(0.0, 4.0, n_thetas, dtype=jnp.float32)
    key = jr.key(0)

    def single(theta):
        return dbx.harmony(
            x, batches, key=key, theta=theta, max_iter_harmony=MAX_ITER_HARMONY, max_iter_kmeans=MAX_ITER_KMEANS,
            epsilon_cluster=-np.inf, epsilon_harmony=-np.inf,
        ).z_corr

    swept_fn = jax.vmap(single)
    start = time.perf_counter()
    jax.block_until_ready(swept_fn(thetas))
    vmap_first = time.perf_counter() - start
    vmap_seconds, _ = _best(lambda: jax.block_until_ready(swept_fn(thetas)), 2)
    start = time.perf_counter()
    jax.block_until_ready(single(thetas[0]))
    loop_first = time.perf_counter() - start
    loop_seconds, _ = _best(lambda: [jax.block_until_ready(single(t)) for t in thetas], 2)
    swept = swept_fn(thetas)
    looped = jnp.stack([single(t) for t in thetas])
    return {
        "n_cells": n_cells,
        "n_thetas": n_thetas,
        "vmap_seconds": vmap_seconds,
        "loop_seconds": loop_seconds,
        "vmap_over_loop": vmap_seconds / loop_seconds,
        "vmap_compile_seconds": vmap_first - vmap_seconds,
        "loop_compile_seconds": loop_first - loop_seconds / n_thetas,
        "max_abs_difference": float(jnp.max(jnp.abs(swept - looped))),
    }


def _environment() -> dict:
    import importlib.metadata

    import jax

    versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "equinox", "harmonypy", "numpy")}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "dtype": "float32 (ours), float32 internally (harmonypy C++)",
        "error_mode": _common.error_mode(),
        "versions": versions,
    }


def main(out_dir: str = "benchmarks/results", sizes=(10_000, 100_000), repeats: int = 3,
         sweep_cells: int = 10_000, n_thetas: int = 16) -> dict:
    results = {"environment": _environment(), "sizes": [], "sweep": None}
    for n_cells in sizes:
        record = bench_size(n_cells, repeats)
        results["sizes"].append(record)
        print(
            f"n_cells={n_cells}: harmonypy {record['harmonypy_seconds']:.2f} s, ours {record['ours_seconds']:.2f} s "
            f"(ratio {record['ratio']:.2f}), compile {record['ours_compile_seconds']:.1f} s; peak memory per "
            f"million cells: ours {record['ours_memory']['per_million_cells_gb']:.2f} GB, harmonypy "
            f"{record['harmonypy_memory']['per_million_cells_gb']:.2f} GB",
            flush=True,
        )
    if sweep_cells:  # 0: skip (benchmarks/bench_vmap.py runs the same sweep)
        sweep = bench_sweep(sweep_cells, n_thetas)
        results["sweep"] = sweep
        print(
            f"{n_thetas}-theta sweep at {sweep_cells} cells: vmap {sweep['vmap_seconds']:.2f} s, loop of compiled "
            f"calls {sweep['loop_seconds']:.2f} s (vmap/loop {sweep['vmap_over_loop']:.2f}), max |diff| "
            f"{sweep['max_abs_difference']:.1e}",
            flush=True,
        )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harmony.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-cells", type=int, default=10_000)
    parser.add_argument("--peak-worker", nargs=2, metavar=("TOOL", "N_CELLS"))
    args = parser.parse_args()
    if args.peak_worker:
        _peak_worker(args.peak_worker[0], int(args.peak_worker[1]))
    else:
        main(args.out, tuple(args.sizes), args.repeats, args.sweep_cells)
