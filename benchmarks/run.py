"""Run the benchmark scripts at sizes that fit this 2-core CPU in about a quarter of an hour, and tabulate.

Usage: `python benchmarks/run.py [--out benchmarks/results] [--only harmony umap vae ambient] [--full]`.
`--full` uses each script's own (issue-sized) defaults: Harmony at 10k and 100k cells, UMAP at 10k and 50k.
Each script compares diffbio_eqx with its peer tool in the same run and writes `<out>/<stage>.json`; this
runner then writes `<out>/summary.md` from the JSON files.
"""

import os


os.environ.setdefault("EQX_ON_ERROR", "nan")

import argparse
import importlib.util
import json
import pathlib
import sys
import time


HERE = pathlib.Path(__file__).resolve().parent
QUICK = {
    "harmony": {"sizes": (10_000,)},
    "umap": {"sizes": (10_000,), "knn_only_sizes": ()},
    "vae": {"sizes": ((5000, 2000, 20),)},
    "ambient": {"sizes": (1000,)},
}


def _load(stage: str):
    spec = importlib.util.spec_from_file_location(f"bench_{stage}", HERE / f"bench_{stage}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _summary(out: pathlib.Path) -> str:
    lines = ["# Benchmark results", ""]
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        lines += [f"## {path.stem}", "", "```json", json.dumps(record, indent=1)[:4000], "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", nargs="+", choices=sorted(QUICK), default=sorted(QUICK))
    parser.add_argument("--full", action="store_true", help="each script's full sizes")
    arguments = parser.parse_args()
    out = pathlib.Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE.parent))
    failures = []
    for stage in arguments.only:
        started = time.perf_counter()
        print(f"== {stage}", flush=True)
        try:
            module = _load(stage)
            module.main(out_dir=str(out), **({} if arguments.full else QUICK[stage]))
        except Exception as error:  # one failing peer tool should not lose the other results
            failures.append(stage)
            print(f"{stage}: failed ({type(error).__name__}: {error})", flush=True)
        print(f"== {stage} took {time.perf_counter() - started:.0f} s", flush=True)
    (out / "summary.md").write_text(_summary(out))
    print(f"results in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
