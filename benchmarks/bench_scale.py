"""The pipeline at a million cells on one machine: time and peak memory per stage.

Typical printout: see `benchmarks/results/scale.json` and the README section "Scale and several devices".

1,000,000 simulated cells x 2,000 genes, held sparse (about a quarter of the entries non-zero), go through:

1. `simulate`: `simulate_sparse`, chunk by chunk into CSR (never a dense 8 GB matrix).
2. `vae_train`: the VAE (`fit_vae`, the pipeline's default architecture with a 50-dimensional latent) trained by
   minibatch for one epoch, the counts on the device as CSR and densified one minibatch at a time.
3. `vae_infer`: the posterior means of every cell in chunks (`vae_latent`): 1M x 50.
4. `harmony`: Harmony on the whole 1M x 50 latent with the pipeline's settings (K = 100, at most 10 rounds of at
   most 4 clustering rounds), once stopping at the pipeline's tolerance and once with every round run (the
   timed, fixed workload whose output the next stages use).
5. `umap`: the UMAP graph and the parametric encoder on a random subsample (50,000 cells), then the trained
   encoder embeds every cell.
6. `clustering`: soft k-means (k-means++ then 100 iterations, the pipeline's default) on every corrected cell.

Each stage runs in its own subprocess, reading its inputs from (and writing its outputs to) a scratch folder, so
its peak resident memory (VmHWM) is its own. Reported per stage: wall seconds of the work (inputs loaded
separately), the process's peak RSS, the RSS after importing JAX (the runtime's fixed cost), and
`(peak - runtime) / n_cells * 1e6` as GB per million cells. Compilation is inside the stage times (seconds,
small against minutes at this size).
Run: `python benchmarks/bench_scale.py [--n-cells 1000000] [--out benchmarks/results]`.
"""

import os


os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import datetime
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("simulate", "vae_train", "vae_infer", "harmony", "umap", "clustering")
N_GENES = 2000
N_GROUPS = 10
N_BATCHES = 2
LATENT_DIM = 50
UMAP_SUBSAMPLE = 50_000
SEED = 0


def _status_gb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


def _save_csr(work: pathlib.Path, matrix) -> None:
    import numpy as np

    for name in ("data", "indices", "indptr"):
        np.save(work / f"counts_{name}.npy", getattr(matrix, name))
    (work / "counts_shape.json").write_text(json.dumps(list(matrix.shape)))


def _load_csr(work: pathlib.Path):
    import numpy as np
    import scipy.sparse as sp

    parts = [np.load(work / f"counts_{name}.npy") for name in ("data", "indices", "indptr")]
    shape = tuple(json.loads((work / "counts_shape.json").read_text()))
    return sp.csr_matrix(tuple(parts), shape=shape, copy=False)


def _config():
    import diffbio_eqx as dx

    # The pipeline's defaults, with a 50-dimensional latent (Harmony on 1M x 50).
    return dx.SingleCellPipelineConfig(n_genes=N_GENES, n_clusters=N_GROUPS, n_batches=N_BATCHES,
                                       latent_dim=LATENT_DIM)


def run_stage(stage: str, work: pathlib.Path, n_cells: int) -> dict:
    """Run one stage in this process (meant to be a fresh subprocess) and return its record."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import diffbio_eqx as dx

    jax.devices()  # initialise the backend before measuring the runtime's footprint
    runtime_gb = _status_gb("VmRSS")
    keys = dict(zip(STAGES, jr.split(jr.key(SEED), len(STAGES))))
    config = _config()
    record: dict = {"stage": stage}
    started = time.perf_counter()
    if stage == "simulate":
        load_seconds = 0.0
        sim = dx.simulate_sparse(keys["simulate"], n_cells=n_cells, n_genes=N_GENES, n_groups=N_GROUPS,
                                 n_batches=N_BATCHES)
        seconds = time.perf_counter() - started
        _save_csr(work, sim.counts)
        np.save(work / "groups.npy", sim.groups)
        np.save(work / "batches.npy", sim.batches)
        record.update(nnz=int(sim.counts.nnz), density=sim.counts.nnz / (n_cells * N_GENES),
                      mean_counts_per_cell=float(sim.counts.sum() / n_cells),
                      csr_gb=(sim.counts.data.nbytes + sim.counts.indices.nbytes + sim.counts.indptr.nbytes) / 1e9)
    elif stage == "vae_train":
        counts, batches = _load_csr(work), np.load(work / "batches.npy")
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        pipeline = dx.SingleCellPipeline(config.replace(enable_ambient_removal=False), key=keys["vae_train"])
        batch_size = 128
        fitted = dx.fit_vae(pipeline.vae_normalizer, counts, batches, key=keys["vae_train"], settings=dx.TrainSettings(
            n_epochs=1, batch_size=batch_size, validation_fraction=0.0, progress=False))
        jax.block_until_ready(fitted.model)
        seconds = time.perf_counter() - started
        dx.save_vae(work / "vae.eqx", fitted.model)
        record.update(epochs=1, batch_size=batch_size, cells_per_second=n_cells / seconds,
                      train_loss=float(fitted.train_loss[0]), hidden_dims=list(config.hidden_dims),
                      latent_dim=LATENT_DIM)
    elif stage == "vae_infer":
        counts, batches = _load_csr(work), np.load(work / "batches.npy")
        vae = dx.load_vae(work / "vae.eqx")
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        latent = np.asarray(dx.vae_latent(vae, counts, batches, chunk_size=8192))
        seconds = time.perf_counter() - started
        np.save(work / "latent.npy", latent)
        record.update(chunk_size=8192, cells_per_second=n_cells / seconds, latent_shape=list(latent.shape))
    elif stage == "harmony":
        latent, batches = np.load(work / "latent.npy"), np.load(work / "batches.npy")
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        harmony = dx.SingleCellPipeline(config.replace(enable_ambient_removal=False),
                                        key=keys["harmony"]).batch_correction
        # First as the pipeline runs it (stops at its convergence tolerance), then with every round run
        # (tolerances -inf: 10 rounds x 4 clustering rounds), the fixed workload whose output goes on.
        result = harmony.run(latent, batches, key=keys["harmony"])
        jax.block_until_ready(result.z_corr)
        record.update(default_tolerance_seconds_with_compile=time.perf_counter() - started,
                      default_tolerance_rounds=int(result.n_rounds), default_tolerance_converged=bool(result.converged))
        del result
        started = time.perf_counter()
        never = jnp.asarray(-jnp.inf, harmony.epsilon_harmony.dtype)
        fixed = eqx.tree_at(lambda h: (h.epsilon_harmony, h.epsilon_cluster), harmony, (never, never))
        result = fixed.run(latent, batches, key=keys["harmony"])
        corrected = np.asarray(result.z_corr)
        seconds = time.perf_counter() - started
        np.save(work / "corrected.npy", corrected)
        record.update(n_clusters=int(result.centroids.shape[0]), rounds=int(result.n_rounds),
                      kmeans_rounds=int(np.sum(np.asarray(result.kmeans_rounds))),
                      max_rounds=config.batch_correction_iterations)
    elif stage == "umap":
        corrected = np.load(work / "corrected.npy")
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        rows = np.sort(np.random.default_rng(SEED).choice(n_cells, min(UMAP_SUBSAMPLE, n_cells), replace=False))
        umap = dx.SingleCellPipeline(config.replace(enable_ambient_removal=False),
                                     key=keys["umap"]).dim_reduction
        fitted = dx.fit_umap(umap, corrected[rows], key=keys["umap"], settings=dx.TrainSettings(progress=False))
        jax.block_until_ready(fitted.model)
        train_seconds = time.perf_counter() - started
        embedding = np.asarray(fitted.model.embed(corrected))
        seconds = time.perf_counter() - started
        np.save(work / "embedding.npy", embedding)
        record.update(subsample=int(rows.size), graph_and_train_seconds=train_seconds,
                      embed_all_seconds=seconds - train_seconds, n_epochs=int(fitted.train_loss.shape[0]),
                      embedding_shape=list(embedding.shape))
    elif stage == "clustering":
        corrected, groups = np.load(work / "corrected.npy"), np.load(work / "groups.npy")
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        start = dx.SoftKMeans(np.zeros((N_GROUPS, corrected.shape[1]), corrected.dtype),
                              temperature=config.clustering_temperature)
        clustering = dx.fit_soft_kmeans(start, corrected, key=keys["clustering"], n_iter=100).model
        labels = np.asarray(clustering.hard_assign(corrected))
        seconds = time.perf_counter() - started
        from sklearn.metrics import adjusted_rand_score

        record.update(n_clusters=N_GROUPS, n_iter=100,
                      ari_vs_simulated_groups=float(adjusted_rand_score(groups, labels)))
    else:
        raise ValueError(f"unknown stage {stage!r}")
    peak_gb = _status_gb("VmHWM")
    record.update(seconds=seconds, load_seconds=load_seconds, peak_rss_gb=peak_gb, runtime_rss_gb=runtime_gb,
                  gb_per_million_cells=(peak_gb - runtime_gb) / n_cells * 1e6)
    return record


def _environment() -> dict:
    import importlib.metadata

    import jax

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().machine,
        "cpu_count": os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "load_average": os.getloadavg(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "dtype": "float32",
        "versions": {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "equinox", "optax", "numpy", "scipy")},
    }


def main(out_dir: str | os.PathLike[str] = ROOT / "benchmarks" / "results", n_cells: int = 1_000_000,
         work_dir: str | os.PathLike[str] | None = None) -> dict:
    """Run every stage in its own subprocess at `n_cells` x 2,000 genes and write `scale.json` (`scale_<n>.json`
    for sizes other than a million)."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="diffbio_scale_", dir=work_dir))
    results: dict = {"environment": _environment(), "n_cells": n_cells, "n_genes": N_GENES, "n_groups": N_GROUPS,
                     "n_batches": N_BATCHES, "stages": []}
    total = time.perf_counter()
    try:
        for stage in STAGES:
            command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--stage", stage, "--work", str(work),
                       "--n-cells", str(n_cells)]
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"stage {stage} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
            record = json.loads((work / f"{stage}.json").read_text())
            results["stages"].append(record)
            print(f"{stage:>10}: {record['seconds']:8.1f} s (+{record['load_seconds']:.1f} s loading), peak RSS "
                  f"{record['peak_rss_gb']:.2f} GB, {record['gb_per_million_cells']:.2f} GB per million cells",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - total
    results["max_peak_rss_gb"] = max(r["peak_rss_gb"] for r in results["stages"])
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "scale.json" if n_cells == 1_000_000 else f"scale_{n_cells}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(f"total {results['total_seconds']:.0f} s; largest stage peak {results['max_peak_rss_gb']:.2f} GB",
          flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.stage:
        stage_record = run_stage(args.stage, pathlib.Path(args.work), args.n_cells)
        (pathlib.Path(args.work) / f"{args.stage}.json").write_text(json.dumps(stage_record))
    else:
        main(args.out, args.n_cells, args.work_dir)
