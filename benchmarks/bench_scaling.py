"""Scaling of every stage with the number of cells: compile time, steady-state cells/s and peak memory.

Stages (2,000 genes, 50-D embeddings, float32, simulated data):

- `harmony`: `diffbio_eqx.harmony` on a 50-D embedding with 4 batches, 10 fixed outer rounds of 4 clustering
  rounds (tolerances -inf), k-means++ initialisation included.
- `vae_train`: `fit_vae` (1 hidden layer of 128, latent 50, NB, batch 128, no validation split). Steady state is
  one epoch: `t(2 epochs) - t(1 epoch)`; the per-call host work (count checks, log-factorials) is reported as
  `host_overhead_seconds`.
- `vae_infer`: `vae_transform` (posterior means and normalised expression, chunks of 4,096 cells).
- `umap_embed`: `ParametricUMAP.embed` of 50-D cells (umap-learn's 3 x 100 encoder).
- `soft_kmeans`: `SoftKMeans.from_data` (k-means++ then 100 soft k-means iterations, 20 clusters, 50-D).
- `pipeline_infer`: the whole pipeline (ambient removal, VAE, Harmony mapping onto a stored reference,
  parametric UMAP, soft k-means) in its one compiled call on device-resident inputs; `run_pipeline` (host
  validation and transfer included) is reported as `public_seconds`. The weights are untrained (same shapes and
  cost as trained ones).

Each stage runs in its own child process with sizes ascending; compile time is the first call minus the
steady-state call (best of a few); peak memory is measured around one steady-state call (see `memory_method` in
the JSON). Results are merged into `<out>/scaling.json` keyed by (stage, n_cells, backend), so a quick run does not
erase larger records.

Usage: `python benchmarks/bench_scaling.py [--sizes 1000 10000 100000] [--stages ...] [--out benchmarks/results]`.

Recorded printout (2-core x86-64 VM shared with other jobs, jax 0.10.2 CPU, float32; harmony, umap_embed and
soft_kmeans at load average 6-13, which slows everything 2-5x against an idle machine; the VAE and pipeline lines
re-measured on 2026-11-26 at load ~2 after the fused likelihood, the tuned XLA options and the block-wise count
checks, which took vae_infer from 8.9e3 and pipeline_infer from 1.13e4 cells/s):

    harmony          n=  100000: compile  19.6 s, steady 6.326 s, 1.58e+04 cells/s, peak +159 MB
    vae_train        n=  100000: compile   2.6 s, epoch 1.510 s, 6.62e+04 cells/s, peak +2402 MB
    vae_infer        n=  100000: compile   0.7 s, steady 1.763 s, 5.67e+04 cells/s, peak +2750 MB
    umap_embed       n=  100000: compile   0.7 s, steady 0.094 s, 1.06e+06 cells/s, peak +25 MB
    soft_kmeans      n=  100000: compile   2.8 s, steady 3.974 s, 2.52e+04 cells/s, peak +69 MB
    pipeline_infer   n=  100000: compile   0.8 s, steady 3.128 s, 3.2e+04 cells/s, peak +3459 MB
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time


HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402


STAGES = ("harmony", "vae_train", "vae_infer", "umap_embed", "soft_kmeans", "pipeline_infer")
N_GENES, N_DIMS, N_BATCHES = 2000, 50, 4


def _repeats(n_cells: int) -> int:
    return 3 if n_cells <= 20_000 else 2 if n_cells <= 200_000 else 1


def _harmony(n_cells: int) -> dict:
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import diffbio_eqx as dx

    x, batches = _common.gaussian_embedding(n_cells, n_dims=N_DIMS, n_batches=N_BATCHES)
    x, batches = jnp.asarray(x), jnp.asarray(batches)

    def run():
        return dx.harmony(x, batches, key=jr.key(0), max_iter_harmony=10, max_iter_kmeans=4,
                          epsilon_cluster=-np.inf, epsilon_harmony=-np.inf, n_batches=N_BATCHES).z_corr

    return {"run": run, "cells": n_cells, "setup": "10 outer x 4 clustering rounds, 4 batches, K=min(N/30,100)"}


def _vae(n_cells: int):
    import jax.random as jr

    import diffbio_eqx as dx

    counts, _, _ = _common.simulated_counts(n_cells, n_genes=N_GENES)
    vae = dx.VAENormalizer(N_GENES, hidden_dims=(128,), latent_dim=N_DIMS, likelihood="nb", key=jr.key(0))
    return counts, vae


def _vae_train(n_cells: int, batch_size: int = 128) -> dict:
    import jax.random as jr

    import diffbio_eqx as dx

    counts, vae = _vae(n_cells)

    def run(n_epochs: int = 1):
        settings = dx.TrainSettings(n_epochs=n_epochs, batch_size=batch_size, validation_fraction=0.0, progress=False)
        return dx.fit_vae(vae, counts, key=jr.key(1), settings=settings).model

    return {"run": run, "cells": n_cells, "epoch_difference": True,
            "setup": f"hidden 128, latent {N_DIMS}, NB, gene dispersion, batch {batch_size}, AdamW"}


def _vae_infer(n_cells: int) -> dict:
    import diffbio_eqx as dx

    counts, vae = _vae(n_cells)
    return {"run": lambda: dx.vae_transform(vae, counts).latent, "cells": n_cells,
            "setup": f"posterior means + normalised expression, chunks of 4096, latent {N_DIMS}"}


def _umap_embed(n_cells: int) -> dict:
    import jax.numpy as jnp
    import jax.random as jr

    import diffbio_eqx as dx

    x, _ = _common.gaussian_embedding(n_cells, n_dims=N_DIMS)
    x = jnp.asarray(x)
    model = dx.ParametricUMAP(N_DIMS, key=jr.key(0))
    return {"run": lambda: model.embed(x), "cells": n_cells, "setup": "3 x 100 ReLU encoder, chunks of 8192"}


def _soft_kmeans(n_cells: int) -> dict:
    import jax.numpy as jnp
    import jax.random as jr

    import diffbio_eqx as dx

    x, _ = _common.gaussian_embedding(n_cells, n_dims=N_DIMS)
    x = jnp.asarray(x)
    start = dx.SoftKMeans(jnp.zeros((20, x.shape[1]), x.dtype))
    return {"run": lambda: dx.fit_soft_kmeans(start, x, key=jr.key(0), n_iter=100).model.centroids, "cells": n_cells,
            "setup": "k-means++ + 100 soft k-means iterations, 20 clusters"}


def trained_shape_pipeline(n_genes: int = N_GENES, n_batches: int = N_BATCHES, latent_dim: int = N_DIMS):
    """A pipeline with every stage on and a stored Harmony reference (untrained values, trained shapes)."""
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    import diffbio_eqx as dx

    config = dx.SingleCellPipelineConfig(n_genes=n_genes, n_batches=n_batches, latent_dim=latent_dim,
                                         hidden_dims=(128,), n_clusters=10)
    pipeline = dx.SingleCellPipeline(config, key=jr.key(0))
    centroids = jr.normal(jr.key(1), (100, latent_dim))
    centroids = centroids / jnp.linalg.norm(centroids, axis=1, keepdims=True)
    reference = dx.HarmonyReference(centroids, 0.01 * jr.normal(jr.key(2), (100, n_batches, latent_dim)),
                                    jnp.asarray(0.1), (n_batches,))
    return eqx.tree_at(lambda p: p.harmony_reference, pipeline, reference, is_leaf=lambda node: node is None)


def _pipeline_infer(n_cells: int) -> dict:
    import jax.random as jr
    import numpy as np

    import diffbio_eqx as dx
    from diffbio_eqx import _pipeline
    from diffbio_eqx._pipeline._run import _run_compiled

    counts, _, batches = _common.simulated_counts(n_cells, n_genes=N_GENES, n_batches=N_BATCHES)
    pipeline = trained_shape_pipeline()
    data = {"counts": counts, "batch_labels": batches,
            "ambient_profile": counts.sum(axis=0, dtype=np.float64) / counts.sum()}
    arrays = _pipeline.prepare_inputs(pipeline, data)
    key = jr.key(0)

    def run():
        return _run_compiled(pipeline, *arrays, key, True).cluster_assignments

    def public():
        return dx.run_pipeline(pipeline, data, key=key).cluster_assignments

    return {"run": run, "public": public, "cells": n_cells,
            "setup": "ambient removal + VAE (128, latent 50) + Harmony reference mapping (K=100) + parametric UMAP "
                     "+ soft k-means (10); inputs on the device"}


BUILDERS = {
    "harmony": _harmony, "vae_train": _vae_train, "vae_infer": _vae_infer, "umap_embed": _umap_embed,
    "soft_kmeans": _soft_kmeans, "pipeline_infer": _pipeline_infer,
}


#: Epochs timed on top of one call's: at least this many cell passes, more while they take under half of one
#: call's time (the per-call host work, count checks and log-factorials, is seconds at 100k cells, and an epoch on
#: a GPU a fraction of that: with one epoch on top, a GPU run read a negative epoch time), at most MAX_EXTRA_EPOCHS.
TIMED_CELL_PASSES, MAX_EXTRA_EPOCHS = 20_000, 64


def _extra_epochs(run, n_cells: int, one: float) -> tuple[int, float, dict]:
    """`(extra, seconds of 1 + extra epochs, peak memory of that call)` with the extra epochs resolved against
    one call's time; an error when even `MAX_EXTRA_EPOCHS` take no longer than one."""
    extra = max(1, math.ceil(TIMED_CELL_PASSES / n_cells))
    while True:
        baseline = _common.reset_peak()
        _, more = _common.timed(lambda: run(1 + extra))
        peak = _common.peak_since(baseline)
        if more - one >= one / 2 or extra >= MAX_EXTRA_EPOCHS:
            break
        extra = min(4 * extra, MAX_EXTRA_EPOCHS)
    if more <= one:
        raise RuntimeError(f"{1 + extra} epochs took {more:.3f} s, no longer than 1 epoch ({one:.3f} s)")
    return extra, more, peak


def measure(stage: str, n_cells: int, *, vae_batch_size: int = 128) -> dict:
    """Compile time, steady-state time and peak memory of one stage at one size (in this process)."""
    builder = BUILDERS[stage]
    spec = builder(n_cells, vae_batch_size) if stage == "vae_train" else builder(n_cells)
    run = spec["run"]
    repeats = _repeats(n_cells)
    _, first = _common.timed(run)
    record = {"stage": stage, "n_cells": n_cells, "setup": spec["setup"], "first_call_seconds": first}
    if spec.get("epoch_difference"):
        one, _ = _common.best_of(lambda: run(1), repeats - 1)
        extra, more, peak = _extra_epochs(run, n_cells, one)
        record.update(peak)
        epoch = (more - one) / extra
        record.update(steady_seconds=epoch, host_overhead_seconds=max(one - epoch, 0.0),
                      compile_seconds=max(first - one, 0.0), batch_size=vae_batch_size, timed_epochs=1 + extra,
                      cells_per_s_with_overhead=(1 + extra) * n_cells / more)
    else:
        steady, times = _common.best_of(run, repeats)
        baseline = _common.reset_peak()
        _common.timed(run)
        record.update(_common.peak_since(baseline))
        record.update(steady_seconds=steady, all_seconds=times, compile_seconds=max(first - steady, 0.0))
    if "public" in spec:
        _common.timed(spec["public"])
        record["public_seconds"], _ = _common.best_of(spec["public"], repeats - 1)
        record["public_cells_per_s"] = n_cells / record["public_seconds"]
    record["cells_per_s"] = spec["cells"] / record["steady_seconds"]
    record["peak_bytes_per_cell"] = record["peak_bytes"] / n_cells
    return record


def _worker(stage: str, sizes: list[int], vae_batch_size: int, out_path: str) -> None:
    environment = _common.environment()
    records = []
    for n_cells in sorted(sizes):
        started = time.perf_counter()
        record = measure(stage, n_cells, vae_batch_size=vae_batch_size)
        record["environment"] = environment | {"load_average": list(os.getloadavg())}
        record["wall_seconds"] = time.perf_counter() - started
        records.append(record)
        pathlib.Path(out_path).write_text(json.dumps(records, default=float))  # partial results survive a crash


def _print(record: dict) -> None:
    label = "epoch" if record["stage"].startswith("vae_train") else "steady"
    print(
        f"{record['stage']:<16} n={record['n_cells']:>8}: compile {record['compile_seconds']:5.1f} s, {label} "
        f"{record['steady_seconds']:.3f} s, {record['cells_per_s']:.3g} cells/s, "
        f"peak +{record['peak_bytes'] / 1e6:.0f} MB",
        flush=True,
    )


def main(out_dir: str | os.PathLike[str] = HERE / "results", sizes=(1000, 10_000, 100_000), stages=STAGES,
         vae_batch_sizes=(128,), stage_max_cells: dict[str, int] | None = None, timeout_s: float = 1800) -> dict:
    """Run each stage in a child process over `sizes` (capped per stage by `stage_max_cells`); merge the results
    into `<out_dir>/scaling.json` after every stage, so a run stopped part-way keeps what it measured."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    caps = stage_max_cells or {}
    failures: list[dict] = []
    jobs = [(stage, b) for stage in stages for b in (vae_batch_sizes if stage == "vae_train" else (128,))]
    record: dict = {}
    for stage, batch_size in jobs:
        stage_sizes = [n for n in sizes if n <= caps.get(stage, n)]
        partial = out / f".scaling_{stage}_{batch_size}.json"
        partial.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--worker", stage, "--sizes", *map(str, stage_sizes),
                   "--vae-batch-size", str(batch_size), "--partial", str(partial)]
        try:
            done = subprocess.run(command, timeout=timeout_s, capture_output=True, text=True)
            error = None if done.returncode == 0 else done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s} s"
        runs = json.loads(partial.read_text()) if partial.is_file() else []
        partial.unlink(missing_ok=True)
        for run in runs:
            run["backend"] = run["environment"]["backend"]
            if stage == "vae_train" and batch_size != 128:
                run["stage"] = f"vae_train_b{batch_size}"
            _print(run)
        if error is not None:
            failures.append({"stage": stage, "batch_size": batch_size, "error": error})
            print(f"{stage}: failed: {error}", flush=True)
        record = {
            "benchmark": "scaling",
            "environment": _common.environment(),
            "n_genes": N_GENES, "n_dims": N_DIMS, "dtype": "float32",
            "runs": _common.merge_runs(path, runs, ("stage", "n_cells", "backend")),
            "failures": failures,
        }
        _common.write_json(path, record)
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--vae-batch-size", type=int, nargs="+", default=[128])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage (child process)")
    parser.add_argument("--worker", choices=STAGES)
    parser.add_argument("--partial")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.sizes, args.vae_batch_size[0], args.partial)
    else:
        main(args.out, tuple(args.sizes), tuple(args.stages), tuple(args.vae_batch_size),
             timeout_s=args.timeout)
