"""`diffbio-eqx run` through the front door at 10k, 100k and 1M cells x 2,000 genes: wall time and peak memory.

Typical printout: see `benchmarks/results/front_door.json` and the README rows "Front door (diffbio-eqx run)".

1. A simulated h5ad per size (Splatter-like counts, `simulate_sparse`'s generator: 10 groups, 2 batches, about a
   quarter of the entries non-zero) is written chunk by chunk (5,000 cells at a time) straight into the file's CSR
   arrays with h5py, so no size is ever whole in memory while it is written.
2. `diffbio-eqx run FILE --batch-key batch --label-key group` runs in a child process under `/usr/bin/time -v`
   (its "Maximum resident set size" is the child's peak RSS; the job's VmHWM is also sampled every 5 s), twice on
   the same file into two folders: the first and the second run (the second reuses the compilation cache).
3. Each run's outputs are checked: `result.h5ad` with `obsm` `X_diffbio`, `X_diffbio_corrected`, `X_umap`,
   `obs["diffbio_cluster"]` and the `layers`, `umap.png`, `training.png`, `report.md`, `pipeline.eqx`.

The epochs are fixed small (`--ambient-epochs 1 --vae-epochs 1 --umap-epochs 2` unless given): this measures what
the front door costs (reading, a pass of each stage, chunked inference and writing) as the cells grow, not the
model's quality (the job's defaults train longer: scVI's heuristic, about 3,000 UMAP steps).

Run: `python benchmarks/bench_front_door.py --sizes 10000 100000 [--sizes 1000000] [--work DIR]`; results are merged
into `benchmarks/results/front_door.json` by size.

`--warm-start 5000 [--rounds R] [--training-floor]`: the job's first and second run (cold and warm compilation
cache) against scanpy's workflow at 5,000 cells; `--training-floor` adds, per round, how fast the second run could
be at the job's default training lengths on this machine (`training_floor`: the networks' bare matrix products per
step times the steps, umap-learn's time for the map), the bound behind issue 23's two timing goals.
"""

import os


os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import pathlib
import re
import shlex
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _common import environment, merge_runs, write_json  # noqa: E402


N_GENES = 2000
N_GROUPS = 10
N_BATCHES = 2
WRITE_CHUNK = 5000
EPOCHS = ("--ambient-epochs", "1", "--vae-epochs", "1", "--umap-epochs", "2")
OUTPUTS = ("result.h5ad", "pipeline.eqx", "umap.png", "training.png", "report.md")


def write_h5ad(path: pathlib.Path, n_cells: int, *, seed: int = 0, chunk: int = WRITE_CHUNK) -> dict:
    """Simulate `n_cells` x 2,000 counts chunk by chunk into an h5ad's CSR `X` (float32 counts, int32 indices,
    int64 row pointers), with `obs["batch"]` and `obs["group"]`; returns the file's figures."""
    import anndata as ad
    import h5py
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    import pandas as pd

    from diffbio_eqx._simulate._scale import _gamma_poisson, cell_means, draw_gene_parameters

    started = time.perf_counter()
    gene_key, cell_key = jr.split(jr.key(seed))
    genes = draw_gene_parameters(gene_key, n_genes=N_GENES, n_groups=N_GROUPS, n_batches=N_BATCHES)
    dtype = genes.gene_mean.dtype
    scalars = tuple(jnp.asarray(v, dtype=dtype) for v in (7.0, 0.3, 0.1))  # simulate_sparse's defaults
    groups, batches = np.empty(n_cells, np.int32), np.empty(n_cells, np.int32)
    partial = path.with_suffix(".partial")
    with h5py.File(partial, "w") as file:
        x = file.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, N_GENES)})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = x.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz = 0
        for index, start in enumerate(range(0, n_cells, chunk)):
            size = min(chunk, n_cells - start)
            chunk_key = jr.fold_in(cell_key, index)
            means, shape, chunk_groups, chunk_batches, _ = cell_means(chunk_key, genes, *scalars, n_cells=size)
            seed_words = np.asarray(jr.key_data(jr.fold_in(chunk_key, 1)), dtype=np.uint32)
            block = _gamma_poisson(seed_words, np.asarray(means), np.asarray(shape))
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:] = block.data
            indices[nnz:] = block.indices.astype(np.int32)
            indptr[start + 1 : start + size + 1] = block.indptr[1:].astype(np.int64) + nnz
            nnz += block.nnz
            groups[start : start + size] = np.asarray(chunk_groups)
            batches[start : start + size] = np.asarray(chunk_batches)
        obs = pd.DataFrame({"batch": pd.Categorical([f"batch{b}" for b in batches]),
                            "group": pd.Categorical([f"group{g}" for g in groups])},
                           index=pd.Index([f"cell{i}" for i in range(n_cells)]))
        var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(N_GENES)]))
        ad.io.write_elem(file, "obs", obs)
        ad.io.write_elem(file, "var", var)
        for name in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(file, name, {})
        file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    partial.rename(path)
    return {"n_cells": n_cells, "n_genes": N_GENES, "nnz": int(nnz), "density": nnz / (n_cells * N_GENES),
            "file_gb": path.stat().st_size / 1e9, "write_seconds": time.perf_counter() - started}


def _file_figures(path: pathlib.Path) -> dict:
    """The figures of an h5ad written earlier by `write_h5ad` (its write time is not known any more)."""
    import h5py

    with h5py.File(path, "r") as file:
        n_cells, n_genes = (int(n) for n in file["X"].attrs["shape"])
        nnz = int(file["X"]["indptr"][-1])
    return {"n_cells": n_cells, "n_genes": n_genes, "nnz": nnz, "density": nnz / (n_cells * n_genes),
            "file_gb": path.stat().st_size / 1e9}


def _time_v(stderr: str, label: str) -> str:
    match = re.search(rf"{re.escape(label)}: (.+)", stderr)
    return match.group(1).strip() if match else ""


def _descendant_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (GB) of the deepest descendant of `pid` (the job under `/usr/bin/time`), or {}."""
    current = pid
    for _ in range(4):
        children = pathlib.Path(f"/proc/{current}/task/{current}/children")
        try:
            found = children.read_text().split()
        except OSError:
            break
        if not found:
            break
        current = int(found[0])
    try:
        lines = pathlib.Path(f"/proc/{current}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = float(rest.split()[0]) * 1024 / 1e9
    return values


def run_job(source: pathlib.Path, out: pathlib.Path, *, epochs: tuple[str, ...], timeout: float,
            extra: tuple[str, ...] = ()) -> dict:
    """`diffbio-eqx run` in a child under `/usr/bin/time -v`: wall seconds, peak RSS, and the outputs written.

    The child's stderr (progress lines, then `time -v`'s figures) goes to `out`'s sibling `.log` file, and every
    5 s the job's VmHWM is sampled into a `.progress.json` beside it, so a run stopped by `timeout` still leaves
    its peak memory so far and how far it got.
    """
    # Without GNU time (some device machines lack it) the peak memory comes from the 5 s samples alone.
    timer = ["/usr/bin/time", "-v"] if pathlib.Path("/usr/bin/time").is_file() else []
    command = [*timer, sys.executable, "-m", "diffbio_eqx.cli", "run", str(source), "--batch-key",
               "batch", "--label-key", "group", "--out", str(out), *epochs, *extra]
    log = out.with_name(out.name + ".log")
    progress = out.with_name(out.name + ".progress.json")
    started = time.perf_counter()
    sampled: dict[str, float] = {"peak_rss_gb_sampled": 0.0}
    with open(log, "w") as stderr_file:
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr_file)
        code: int | str | None = None
        while code is None:
            try:
                code = child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                status = _descendant_status(child.pid)
                if status:
                    sampled["peak_rss_gb_sampled"] = max(sampled["peak_rss_gb_sampled"], status.get("VmHWM", 0.0))
                    sampled["rss_gb_last"] = status.get("VmRSS", 0.0)
                sampled["elapsed_seconds"] = time.perf_counter() - started
                progress.write_text(json.dumps(sampled))
                if time.perf_counter() - started > timeout:
                    child.kill()
                    child.wait()
                    code = "timeout"
    seconds = time.perf_counter() - started
    stderr = log.read_text()
    peak_kb = _time_v(stderr, "Maximum resident set size (kbytes)")
    record = {"returncode": code, "wall_seconds": seconds,
              "peak_rss_gb": int(peak_kb) * 1024 / 1e9 if peak_kb else None, **sampled,
              "user_seconds": float(_time_v(stderr, "User time (seconds)") or "nan"),
              "system_seconds": float(_time_v(stderr, "System time (seconds)") or "nan"),
              "outputs": {name: (out / name).is_file() for name in OUTPUTS}}
    if code != 0:
        record["stderr_tail"] = stderr[-3000:]
        return record
    record.update(_check_result(out / "result.h5ad"))
    report = (out / "report.md").read_text()
    record["stage_seconds"] = _stage_seconds(report)
    return record


def _check_result(path: pathlib.Path) -> dict:
    """What `result.h5ad` holds, read in backed mode (the layers are not loaded)."""
    import anndata as ad

    result = ad.read_h5ad(path, backed="r")
    try:
        return {"result_obsm": {key: list(result.obsm[key].shape) for key in result.obsm.keys()},
                "result_layers": sorted(result.layers.keys()) if result.layers is not None else [],
                "result_clusters": int(result.obs["diffbio_cluster"].nunique()) if "diffbio_cluster" in result.obs
                else None,
                "result_gb": path.stat().st_size / 1e9}
    finally:
        result.file.close()


def _stage_seconds(report: str) -> dict[str, float]:
    """The report's "Time per stage" table as `{stage: seconds}`."""
    rows = {}
    section = report.split("## Time per stage", 1)[-1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] not in ("stage", "") and not set(cells[0]) <= set("-: "):
            try:
                rows[cells[0]] = float(cells[1])
            except ValueError:
                continue
    return rows


def scanpy_child(source: str, out: str) -> None:
    """The scanpy workflow bench_pipeline times (normalise, log1p, 50 PCs, harmonypy, neighbours, UMAP, Leiden) as
    a user's script runs it: read the h5ad, run the steps, write the result; prints its steps' seconds as JSON.
    Run in a fresh process (`--scanpy-child FILE OUT`), so its imports and numba's JIT count as ours do."""
    import anndata as ad
    import numpy as np
    from bench_pipeline import _ari, _scanpy_steps

    started = time.perf_counter()
    adata = ad.read_h5ad(source)
    read = time.perf_counter() - started
    steps, result = _scanpy_steps(adata.X, adata.obs["batch"].to_numpy())
    result.write_h5ad(out)
    leiden = result.obs["leiden"].astype(int).to_numpy()
    print(json.dumps({"read_seconds": read, "steps_seconds": steps, "steps_total_seconds": sum(steps.values()),
                      "ari": _ari(leiden, adata.obs["group"].astype(str).to_numpy()),
                      "n_clusters": int(np.max(leiden) + 1)}))


def _scanpy_run(source: pathlib.Path, out: pathlib.Path, timeout: float) -> dict:
    """`scanpy_child` in a fresh process: its wall seconds (start to exit) and what it printed."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--scanpy-child", str(source),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"returncode": done.returncode, "wall_seconds": seconds, "stderr_tail": done.stderr[-3000:]}
    return {"returncode": 0, "wall_seconds": seconds, **json.loads(done.stdout.strip().splitlines()[-1])}


def warm_start(n_cells: int, work: pathlib.Path, rounds: int, timeout: float, *, scanpy: bool = True,
               extra: tuple[str, ...] = ()) -> dict:
    """Issue 23's warm-start figure: per round, `diffbio-eqx run` (the job's default epochs, plus `extra` flags)
    twice on the same file with a compilation cache folder new to the round (first run: cold; second: the cache the
    first wrote), then (unless not `scanpy`) the scanpy workflow in a fresh process (`scanpy_child`); `rounds`
    interleaved rounds, ratios per round, in wall and in CPU seconds (user + system, less sensitive to the machine's
    load). `cache_entries_after` counts the cache folder's entries after each run: JAX writes an entry for each
    program it compiles, so the second run's new entries are the programs it compiled again."""
    import shutil

    from _common import median, ratio_summary

    source = work / f"cells_{n_cells}.h5ad"
    figures = write_h5ad(source, n_cells) if not source.is_file() else _file_figures(source)
    rounds_out = []
    for index in range(rounds):
        cache = work / f"cache_{n_cells}_{index}"
        shutil.rmtree(cache, ignore_errors=True)
        record: dict = {}
        for run in ("first", "second"):
            folder = work / f"warm_{n_cells}_{index}_{run}"
            shutil.rmtree(folder, ignore_errors=True)
            record[run] = run_job(source, folder, epochs=(), timeout=timeout,
                                  extra=("--compilation-cache", str(cache), *extra))
            record[run]["cache_entries_after"] = sum(1 for _ in cache.glob("*")) if cache.is_dir() else 0
            shutil.rmtree(folder, ignore_errors=True)
        if scanpy:
            record["scanpy"] = _scanpy_run(source, work / f"scanpy_{n_cells}_{index}.h5ad", timeout)
            (work / f"scanpy_{n_cells}_{index}.h5ad").unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        print(json.dumps({"round": index, **{run: record[run]["wall_seconds"] for run in ("first", "second")},
                          **{f"{run}_cpu": _cpu_seconds(record[run]) for run in ("first", "second")},
                          "new_cache_entries_second": record["second"]["cache_entries_after"]
                          - record["first"]["cache_entries_after"],
                          "second_stages": record["second"].get("stage_seconds"),
                          "scanpy": record.get("scanpy", {}).get("wall_seconds"),
                          "scanpy_steps": record.get("scanpy", {}).get("steps_seconds")}), flush=True)
        rounds_out.append(record)
    wall = lambda run: [r[run]["wall_seconds"] for r in rounds_out]  # noqa: E731
    cpu = lambda run: [_cpu_seconds(r[run]) for r in rounds_out]  # noqa: E731
    entry = {"n_cells": n_cells, "n_genes": N_GENES, "input": figures, "extra_flags": list(extra),
             "rounds": rounds_out,
             "first_over_second": ratio_summary(wall("first"), wall("second")),
             "first_over_second_cpu": ratio_summary(cpu("first"), cpu("second")),
             "first_seconds_median": median(wall("first")), "second_seconds_median": median(wall("second")),
             "first_cpu_seconds_median": median(cpu("first")), "second_cpu_seconds_median": median(cpu("second"))}
    if scanpy:
        scanpy_steps = [r["scanpy"].get("steps_total_seconds", float("nan")) for r in rounds_out]
        entry |= {"second_over_scanpy_process": ratio_summary(wall("second"), wall("scanpy")),
                  "second_over_scanpy_steps": ratio_summary(wall("second"), scanpy_steps),
                  "scanpy_process_seconds_median": median(wall("scanpy"))}
    return {**entry,
            "note": "first/second: `diffbio-eqx run FILE --batch-key batch --label-key group` with the job's default "
                    "epochs, wall seconds of the process; scanpy_process: a fresh process reading the h5ad, running "
                    "the workflow and writing the result (imports and numba's JIT included, as ours includes its "
                    "imports); scanpy_steps: the workflow's steps only. Ratios above 1 mean the first named is "
                    "slower."}


def _dense_chain_step_seconds(widths: tuple[int, ...], batch: int = 128, repeats: int = 200) -> float:
    """Seconds of one forward and backward pass of a bare chain of dense layers (`widths` from input to output,
    ReLU between, the output summed): the matrix products a training step of that network cannot avoid, without
    its likelihood, sampling or optimiser. The median of 5 blocks of `repeats` steps."""
    import jax
    import jax.numpy as jnp

    weights = [jnp.full((m, n), 0.01, jnp.float32) for m, n in zip(widths[:-1], widths[1:])]
    x = jnp.ones((batch, widths[0]), jnp.float32)

    def loss(ws):
        h = x
        for w in ws[:-1]:
            h = jax.nn.relu(h @ w)
        return jnp.sum(h @ ws[-1])

    step = jax.jit(lambda ws: sum(jnp.sum(g) for g in jax.grad(loss)(ws)))
    step(weights).block_until_ready()
    blocks = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            out = step(weights)
        out.block_until_ready()
        blocks.append((time.perf_counter() - started) / repeats)
    return sorted(blocks)[2]


def training_floor(n_cells: int, record: dict) -> dict:
    """Issue 23: how fast the job's second run could be at its default training lengths on this machine. Each
    network's bare matrix products (`_dense_chain_step_seconds`, batch 128, the widths of the job's own settings:
    the ambient model 2,000-128-21, its latent's mean and log-variance and the fraction, and 10-128-2,000; the VAE
    2,000-128-128-20 and 10-128-128-2,000) times the steps the job's default epochs take
    (`ambient_default_epochs`, scVI's heuristic capped at 100 with a 10 % validation split, forward passes counted
    as a third of a step), plus umap-learn's own optimisation time (scanpy's `umap` step in the same round) for
    the map, plus the second run's measured time outside training. Compared with 2x scanpy's process and with the
    first run's compilation (first minus second)."""
    import math

    if "steps_seconds" not in record.get("scanpy", {}) or "stage_seconds" not in record["second"]:
        return {"n_cells": n_cells, "skipped": "scanpy's workflow or our second run did not finish"}
    from types import SimpleNamespace

    import anndata as ad
    import numpy as np

    from diffbio_eqx._ambient._stage import ambient_default_epochs
    from diffbio_eqx._job import _epochs, _settings

    # the job's settings read where the job reads them (they depend on the data only through these two shapes)
    config, _ = _settings(ad.AnnData(np.zeros((1, N_GENES), np.float32)), SimpleNamespace(n_batches=N_BATCHES), None)
    ambient_latent, ambient_hidden = config.ambient_latent_dim, config.ambient_hidden_dim
    ambient_step = sum(_dense_chain_step_seconds(w) for w in ((N_GENES, ambient_hidden, 2 * ambient_latent + 1),
                                                              (ambient_latent, ambient_hidden, N_GENES)))
    hidden = tuple(config.hidden_dims)
    vae_step = sum(_dense_chain_step_seconds(w) for w in ((N_GENES, *hidden, 2 * config.latent_dim),
                                                          (config.latent_dim, *hidden[::-1], N_GENES)))
    ambient_epochs, vae_epochs = ambient_default_epochs(n_cells), _epochs(n_cells, None)[0]["vae_epochs"]
    ambient_steps = ambient_epochs * math.ceil(n_cells / 128)
    vae_steps = vae_epochs * (math.ceil(0.9 * n_cells / 128) + math.ceil(0.1 * n_cells / 128) / 3)
    umap = record["scanpy"]["steps_seconds"]["umap"]
    floors = {"ambient_removal": ambient_steps * ambient_step, "vae_normalizer": vae_steps * vae_step,
              "dim_reduction (umap-learn's time)": umap}
    second = record["second"]
    outside_training = second["wall_seconds"] - second["stage_seconds"]["training, all stages"]
    second_floor = sum(floors.values()) + outside_training
    compilation = record["first"]["wall_seconds"] - second["wall_seconds"]
    return {"n_cells": n_cells, "epochs": {"ambient": ambient_epochs, "vae": vae_epochs},
            "step_seconds": {"ambient (bare products)": ambient_step, "vae (bare products)": vae_step},
            "training_floor_seconds": floors, "measured_stage_seconds": second["stage_seconds"],
            "second_outside_training_seconds": outside_training, "second_floor_seconds": second_floor,
            "second_measured_seconds": second["wall_seconds"], "first_minus_second_seconds": compilation,
            "scanpy_process_seconds": record["scanpy"]["wall_seconds"],
            "second_floor_over_scanpy": second_floor / record["scanpy"]["wall_seconds"],
            "first_over_second_at_floor": (second_floor + compilation) / second_floor,
            "note": "goals: second over scanpy <= 2, first over second >= 2; a floor above the first or below the "
                    "second means the goal cannot be met at these training lengths on this machine"}


def _cpu_seconds(record: dict) -> float:
    """User plus system CPU seconds of a run (`/usr/bin/time -v`)."""
    return record.get("user_seconds", float("nan")) + record.get("system_seconds", float("nan"))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--scanpy-child":
        scanpy_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "front_door_runs"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "front_door.json"))
    parser.add_argument("--runs", type=int, default=2, help="runs per size (first, second, ...)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    parser.add_argument("--epochs", nargs="*", default=list(EPOCHS),
                        help="epoch flags passed to diffbio-eqx run (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the simulated files and the runs' folders")
    parser.add_argument("--warm-start", type=int, default=None, metavar="N_CELLS",
                        help="only the warm-start comparison at N_CELLS (first vs second run vs scanpy, interleaved)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the warm-start comparison")
    parser.add_argument("--no-scanpy", action="store_true",
                        help="warm start: time only our first and second runs (not the scanpy workflow)")
    parser.add_argument("--training-floor", action="store_true",
                        help="warm start: also the floor of the second run at the default epochs (issue 23)")
    parser.add_argument("--job-flags", default="",
                        help="warm start: extra flags for diffbio-eqx run, one string (e.g. '--vae-epochs 50')")
    args = parser.parse_args()
    if args.training_floor and (args.warm_start is None or args.no_scanpy):
        parser.error("--training-floor: needs --warm-start N_CELLS and scanpy's run (no --no-scanpy)")
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out)
    if args.warm_start is not None:
        entry = warm_start(args.warm_start, work, args.rounds, args.timeout, scanpy=not args.no_scanpy,
                           extra=tuple(shlex.split(args.job_flags)))
        previous = json.loads(out.read_text()) if out.is_file() else {}
        previous["warm_start"] = [r for r in previous.get("warm_start", []) if r["n_cells"] != args.warm_start]
        previous["warm_start"] = sorted([*previous["warm_start"], entry], key=lambda r: r["n_cells"])
        previous["warm_start_environment"] = environment("anndata", "scipy", "scanpy", "harmonypy", "umap-learn")
        if args.training_floor:
            previous["training_floor"] = [training_floor(args.warm_start, r) for r in entry["rounds"]]
            print(json.dumps(previous["training_floor"], indent=1, default=float), flush=True)
        write_json(out, previous)
        return
    for n_cells in args.sizes:
        source = work / f"cells_{n_cells}.h5ad"
        figures = None
        if not source.is_file():
            figures = write_h5ad(source, n_cells)
            print(f"{n_cells} cells: wrote {source} ({figures['file_gb']:.2f} GB, {figures['nnz']} non-zeros) in "
                  f"{figures['write_seconds']:.0f} s", flush=True)
        runs = []
        for index in range(args.runs):
            folder = work / f"out_{n_cells}_{index}"
            record = run_job(source, folder, epochs=tuple(args.epochs), timeout=args.timeout)
            record["run"] = "first" if index == 0 else ("second" if index == 1 else f"run {index + 1}")
            runs.append(record)
            peak = record["peak_rss_gb"]
            print(f"{n_cells} cells, {record['run']} run: exit {record['returncode']}, {record['wall_seconds']:.0f} s, "
                  f"peak RSS {peak if peak is None else round(peak, 2)} GB", flush=True)
            if record["returncode"] != 0:
                print(record.get("stderr_tail", ""), flush=True)
                break
        entry = {"n_cells": n_cells, "n_genes": N_GENES, "epochs": list(args.epochs),
                 "input": figures or _file_figures(source), "runs": runs}
        if runs and runs[0].get("peak_rss_gb"):
            entry["peak_rss_gb_per_million_cells"] = runs[0]["peak_rss_gb"] / n_cells * 1e6
        merged = merge_runs(out, [entry], ("n_cells",))
        kept = {k: v for k, v in (json.loads(out.read_text()) if out.is_file() else {}).items()
                if k.startswith("warm_start")}  # the warm-start comparison's records stay
        write_json(out, {"environment": environment("anndata", "scipy"), "command": "diffbio-eqx run FILE "
                         "--batch-key batch --label-key group " + " ".join(args.epochs), "runs": merged, **kept})
        if not args.keep:
            for index in range(args.runs):
                for name in ("result.h5ad",):
                    (work / f"out_{n_cells}_{index}" / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
