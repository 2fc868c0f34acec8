"""Run the whole benchmark suite, then render the summary table, the scaling plot and the README section.

Usage: `python benchmarks/run.py [--out benchmarks/results] [--only NAME ...] [--full] [--sizes-gpu]
[--no-readme]`.

- Default (`make bench`): sizes that fit the project's 2-core CPU in under 20 minutes (scaling at 1k and 10k
  cells, the scanpy comparison at 5k, Harmony and UMAP at 10k, the VAE at 5k cells, ambient removal without
  CellBender, which takes ~15 minutes per run on that machine).
- `--full`: each script's own sizes (scaling at 1k/10k/100k, scanpy comparison at 10k and 100k, Harmony at 10k
  and 100k, UMAP at 10k and 50k, CellBender on): the recorded CPU figures; about an hour on that machine.
- `--gpu`: the GPU sizes (scaling up to 1M cells; see benchmarks/gpu.sh, which calls this).

Each script compares diffbio_eqx with its peer tool in the same run, in interleaved rounds (ratios are medians over
at least 3 rounds, with their range), in equinox's default error mode (`EQX_ON_ERROR` unset: "raise", what users
run; the VAE and pipeline scripts also time ours with "nan" to show what the runtime checks cost), and writes
`<out>/<name>.json`. Records at
sizes a run did not repeat are kept (marked `carried_over_from` with their date), so a quick run never erases the
one-off large-size records. The wall time of the whole run and the load average are written to
`<out>/bench_run.json`.
"""

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import sys
import time
import traceback


HERE = pathlib.Path(__file__).resolve().parent
ORDER = ("scaling", "vmap", "harmony", "vae", "umap", "pipeline", "ambient")
QUICK = {
    "scaling": {"sizes": (1000, 10_000)},
    "vmap": {"harmony_cells": 5000, "vae_cells": 2000},
    "harmony": {"sizes": (10_000,), "sweep_cells": 0},
    "vae": {"sizes": ((5000, 2000, 20),)},
    "umap": {"sizes": (10_000,), "knn_only_sizes": ()},
    "pipeline": {"sizes": (5000,)},
    "ambient": {"sizes": (1000,), "cellbender": False},
}
FULL = {
    "scaling": {"sizes": (1000, 10_000, 100_000)},
    "vmap": {"harmony_cells": 10_000, "vae_cells": 5000},
    "harmony": {"sweep_cells": 0},
    "vae": {},
    "umap": {},
    "pipeline": {"sizes": (10_000, 100_000)},
    "ambient": {},
}
GPU = {
    # 10k to 1M cells; the stages on counts up to 100k (an epoch of 1M cells at batch 128 is 7,800 steps, and the
    # host work per call on 1M x 2,000 counts, simulation, count checks and log-factorials of 2e9 entries, would
    # take most of a lease: 15 minutes in all). Batch 1024 first; a stage cut off by its timeout keeps the sizes
    # it finished.
    "scaling": {"sizes": (10_000, 100_000, 1_000_000), "vae_batch_sizes": (1024, 128), "timeout_s": 100,
                "stage_max_cells": {"vae_train": 100_000, "pipeline_infer": 100_000, "vae_infer": 100_000},
                "stages": ("harmony", "vae_train", "pipeline_infer", "vae_infer", "umap_embed", "soft_kmeans")},
    "vmap": {"harmony_cells": 100_000, "vae_cells": 20_000},
    "harmony": {"sizes": (100_000,), "repeats": 2, "sweep_cells": 0},
    "umap": {"sizes": (10_000,), "knn_only_sizes": (100_000,)},
    # scanpy's side runs on the CPU: at 100k its UMAP and harmonypy alone outlast the step's share of a lease
    "pipeline": {"sizes": (20_000,), "repeats": 1},
}
LISTS = ("sizes", "runs", "knn_only")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _date(record: dict) -> str:
    env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    return str(record.get("date") or env.get("date") or "?")


def carry_over(old: dict, new: dict) -> dict:
    """Entries of `old` (per n_cells) that `new` did not re-measure, appended to `new` with their date.

    Applies to the per-size lists of the stage scripts (`sizes`, `runs`, `knn_only`). A re-measured size whose
    peer was skipped this time (CellBender in quick runs) keeps the earlier peer record.
    """
    for key in LISTS:
        if not isinstance(new.get(key), list) or not isinstance(old.get(key), list):
            continue
        if any("backend" in entry for entry in new[key]):
            continue  # scaling/pipeline/vmap merge their own runs (keyed by backend too)
        measured = {entry.get("n_cells"): entry for entry in new[key] if isinstance(entry, dict)}
        for entry in old[key]:
            if not isinstance(entry, dict):
                continue
            n = entry.get("n_cells")
            if n not in measured:
                new[key].append({**entry, "carried_over_from": entry.get("carried_over_from", _date(old))})
                continue
            for peer, value in entry.items():
                fresh = measured[n].get(peer)
                skipped_now = isinstance(fresh, dict) and "skipped" in fresh
                if isinstance(value, dict) and skipped_now and "skipped" not in value:
                    measured[n][peer] = {**value, "carried_over_from": value.get("carried_over_from", _date(old))}
        new[key].sort(key=lambda entry: entry.get("n_cells", 0) if isinstance(entry, dict) else 0)
    return new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="each script's full sizes (the recorded CPU figures)")
    mode.add_argument("--gpu", action="store_true", help="GPU sizes (scaling up to 1M cells)")
    parser.add_argument("--no-readme", action="store_true", help="render summary.md and the plot only")
    arguments = parser.parse_args()
    out = pathlib.Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE.parent))
    settings = FULL if arguments.full else GPU if arguments.gpu else QUICK
    mode_name = "full" if arguments.full else "gpu" if arguments.gpu else "quick"
    started_all = time.perf_counter()
    load_start = list(os.getloadavg())
    failures, seconds = [], {}
    for name in arguments.only:
        if name not in settings:
            continue
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        path = out / f"{name}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        try:
            _load(name).main(out_dir=str(out), **settings[name])
        except Exception as error:  # one failing peer tool should not lose the other results
            failures.append({"benchmark": name, "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
            print(f"{name}: failed ({type(error).__name__}: {error})", flush=True)
        if old is not None and path.is_file():
            path.write_text(json.dumps(carry_over(old, json.loads(path.read_text())), indent=1))
        seconds[name] = time.perf_counter() - started
        print(f"== {name} took {seconds[name]:.0f} s", flush=True)
    import jax

    record = {
        "benchmark": "bench_run", "mode": mode_name, "benchmarks": list(seconds),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "wall_seconds": time.perf_counter() - started_all, "seconds": seconds,
        "load_average_start": load_start, "load_average_end": list(os.getloadavg()), "failures": failures,
    }
    if set(seconds) == set(ORDER):  # a partial run (--only) must not replace the whole suite's record
        (out / f"bench_run_{mode_name}_{record['backend']}.json").write_text(json.dumps(record, indent=1))
    print(f"== suite took {record['wall_seconds']:.0f} s (load average {load_start[0]:.1f} -> "
          f"{record['load_average_end'][0]:.1f})", flush=True)
    render = _load_render()
    render.main(out, None if arguments.no_readme else HERE.parent / "README.md")
    print(f"results in {out}")
    return 1 if failures else 0


def _load_render():
    spec = importlib.util.spec_from_file_location("render", HERE / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(main())
