"""Shared helpers of the benchmark scripts: environment record, timing, peak memory, JSON merging."""

import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any


ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEMORY_METHOD_CPU = (
    "peak resident set (VmHWM) of the run minus the resident set just before it, in a child process per stage "
    "(sizes ascending); the high-water mark is reset through /proc/self/clear_refs after a warm-up run, so the "
    "figure is the working memory of one steady-state call on top of its inputs and the compiled program"
)
MEMORY_METHOD_GPU = (
    "device peak_bytes_in_use (jax memory_stats) after the run, in a child process per stage with sizes "
    "ascending, minus the bytes in use before it: the working memory of one call on top of its inputs"
)


def error_mode() -> str:
    """Equinox's runtime-check mode of this process (`EQX_ON_ERROR`, read once when equinox is imported): "raise",
    equinox's default and what users run, or "nan", which skips the checks' host callbacks."""
    return os.environ.get("EQX_ON_ERROR", "raise")


def ratio_summary(peer: Iterable[float], ours: Iterable[float]) -> dict[str, Any]:
    """`peer / ours` per interleaved repeat (above 1: ours is faster), with the median and the range."""
    ratios = [float(p) / float(o) for p, o in zip(peer, ours, strict=True)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "n_repeats": len(ratios),
            "per_repeat": ratios}


def median(values: Iterable[float]) -> float:
    ordered = sorted(float(v) for v in values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def in_subprocess(target: Callable[..., None], *args: Any, env: dict[str, str] | None = None) -> dict:
    """Run `target(*args, queue)` in a spawned process (its own peak memory; `env` set before it starts, so
    `EQX_ON_ERROR` and `XLA_FLAGS` apply) and return what it put on the queue. A child that dies fails loudly."""
    import multiprocessing

    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=target, args=(*args, queue))
        process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except Exception:
                if not process.is_alive():
                    raise RuntimeError(f"{target.__name__}: child process exited with {process.exitcode}") from None
    finally:
        process.join()


def versions(*names: str) -> dict[str, str]:
    found = {}
    for name in ("jax", "jaxlib", "equinox", "optax", "numpy", *names):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def environment(*packages: str) -> dict[str, Any]:
    """Machine, backend, devices, versions, date and load: recorded with every result."""
    import jax

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "error_mode": error_mode(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "n_devices": jax.device_count(),
        "x64": bool(jax.config.jax_enable_x64),
        "python": platform.python_version(),
        "versions": versions(*packages),
    }


def block(value: Any) -> Any:
    import jax

    return jax.block_until_ready(value)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = block(fn())
    return out, time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = [timed(fn)[1] for _ in range(max(1, repeats))]
    return min(times), times


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _device_stats() -> dict[str, int] | None:
    import jax

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # CPU devices have no allocator statistics
        return None


def reset_peak() -> dict[str, int]:
    """Free what can be freed and reset the high-water mark; returns the baseline to pass to `peak_since`."""
    gc.collect()
    stats = _device_stats()
    if stats is not None and "peak_bytes_in_use" in stats:
        return {"device_in_use": int(stats.get("bytes_in_use", 0))}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the next peak is not hidden by it
    except OSError:
        pass
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return {"rss_kib": _status_kib("VmRSS")}


def peak_since(baseline: dict[str, int]) -> dict[str, Any]:
    if "device_in_use" in baseline:
        stats = _device_stats() or {}
        peak = int(stats.get("peak_bytes_in_use", 0))
        return {"peak_bytes": max(peak - baseline["device_in_use"], 0), "baseline_bytes": baseline["device_in_use"],
                "memory_method": MEMORY_METHOD_GPU}
    peak = _status_kib("VmHWM")
    return {"peak_bytes": (peak - baseline["rss_kib"]) * 1024, "baseline_bytes": baseline["rss_kib"] * 1024,
            "memory_method": MEMORY_METHOD_CPU}


def process_peak_bytes() -> int:
    """Peak resident set of this whole process (VmHWM), bytes."""
    return _status_kib("VmHWM") * 1024


def merge_runs(path: pathlib.Path, new_runs: Iterable[dict[str, Any]], key_fields: tuple[str, ...]) -> list[dict]:
    """Runs already in `path` (under "runs") whose key differs from every new run, then the new runs.

    So a quick run (small sizes) does not erase the one-off large-size records, and a GPU run does not erase
    the CPU ones.
    """
    new_runs = list(new_runs)
    keys = {tuple(run.get(k) for k in key_fields) for run in new_runs}
    old: list[dict] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("runs", [])
        except (ValueError, AttributeError):
            old = []
    kept = [run for run in old if tuple(run.get(k) for k in key_fields) not in keys]
    return kept + new_runs


def write_json(path: pathlib.Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=1, default=float))
    os.replace(temporary, path)


def simulated_counts(n_cells: int, *, n_genes: int = 2000, n_groups: int = 10, n_batches: int = 4,
                     base_cells: int = 10_000, max_distinct: int = 10, seed: int = 0):
    """Simulated counts (float32), groups and batches.

    `diffbio_eqx.simulate` holds several `(n_cells, n_genes)` intermediates (about 34 GB for 100k x 2,000 on
    CPU), so above `base_cells` it simulates `base_cells` cells once and draws the others from that simulation's
    expression profile of each (group, batch) pair: a group and batch uniformly (as the simulator does), a library
    size from the simulated cells, Poisson counts. Every cell is a distinct draw (near-copies of the same cells
    would make kNN graphs of tiny cliques). Above `max_distinct * base_cells` cells the draws repeat (a 1M-cell
    throughput benchmark does not need a million distinct cells, and drawing them would take minutes).
    """
    import jax.random as jr
    import numpy as np

    import diffbio_eqx as dx

    base = min(n_cells, base_cells)
    sim = dx.simulate(jr.key(seed), n_cells=base, n_genes=n_genes, n_groups=n_groups, n_batches=n_batches)
    counts = np.array(sim.counts, dtype=np.float32)
    groups = np.asarray(sim.groups, dtype=np.int32)
    batches = np.asarray(sim.batches, dtype=np.int32)
    if n_cells > base:
        rng = np.random.default_rng(seed)
        profiles = np.zeros((n_groups, n_batches, n_genes))
        for g in range(n_groups):
            for b in range(n_batches):
                rows = counts[(groups == g) & (batches == b)]
                pooled = rows.sum(axis=0, dtype=np.float64) + 1e-3
                profiles[g, b] = pooled / pooled.sum()
        library = counts.sum(axis=1)
        chunks = [(counts, groups, batches)]
        for _ in range(min(-(-n_cells // base), max_distinct) - 1):
            g, b = rng.integers(0, n_groups, base), rng.integers(0, n_batches, base)
            means = profiles[g, b] * rng.choice(library, base)[:, None]
            chunks.append((rng.poisson(means).astype(np.float32), g.astype(np.int32), b.astype(np.int32)))
        reps = -(-n_cells // base)
        counts, groups, batches = (np.concatenate([chunks[i % len(chunks)][j] for i in range(reps)])[:n_cells]
                                   for j in range(3))
    empty = counts.sum(axis=1) == 0
    if empty.any():  # a cell with no counts is rejected by the validators; give it one count
        counts[empty, 0] = 1.0
    return counts, groups, batches


def gaussian_embedding(n_cells: int, *, n_dims: int = 50, n_groups: int = 20, n_batches: int = 4, seed: int = 0):
    """A 50-D Gaussian mixture with a shift per batch (float32) and batch codes, as in bench_harmony."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_groups, n_dims)) * 3
    shifts = rng.normal(size=(n_batches, n_dims))
    groups = rng.integers(0, n_groups, n_cells)
    batches = rng.integers(0, n_batches, n_cells).astype(np.int32)
    x = centers[groups] + shifts[batches] + rng.normal(size=(n_cells, n_dims))
    return x.astype(np.float32), batches
