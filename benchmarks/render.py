"""Render the benchmark JSON into a markdown summary, a log-log scaling plot and the README's Performance section.

Reads every `*.json` under the results folder (subfolders included, e.g. a GPU run's folder copied there), then
writes `<results>/summary.md` (every target of the benchmarks issue with its measured figure and whether it is
met, then one table per benchmark), `<results>/scaling.png` (time against cells, log-log, per stage: ours and
the peers) and replaces the README between `<!-- performance:start -->` and `<!-- performance:end -->`.

Usage: `python benchmarks/render.py [--results benchmarks/results] [--readme README.md] [--no-readme]`.
"""

import argparse
import json
import pathlib
import sys
from typing import Any


HERE = pathlib.Path(__file__).resolve().parent
START, END = "<!-- performance:start -->", "<!-- performance:end -->"


def load(results: pathlib.Path) -> dict[str, list[tuple[pathlib.Path, dict]]]:
    """Every JSON record under `results`, grouped by file stem (`scaling`, `harmony`, ...)."""
    found: dict[str, list[tuple[pathlib.Path, dict]]] = {}
    for path in sorted(results.rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            found.setdefault(path.stem, []).append((path, json.loads(path.read_text())))
        except ValueError:
            print(f"render: skipping unreadable {path}", file=sys.stderr)
    return found


def runs_of(records: dict, stem: str) -> list[dict]:
    return [run for _, record in records.get(stem, []) for run in record.get("runs", [])]


def _backend(record: dict) -> str:
    env = record.get("environment", {})
    return str(record.get("backend") or env.get("backend") or "cpu")


def _device(record: dict) -> str:
    env = record.get("environment", {})
    return str(env.get("device") or (env.get("devices") or ["cpu"])[0])


def _fmt(value: float, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e5 or (abs(value) < 1e-2 and value != 0):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _date(record: dict) -> str:
    env = record.get("environment", {})
    return str(env.get("date") or record.get("date") or "?")[:10]


# ---------------------------------------------------------------------------------------------------------------
# Targets


def _target(name: str, goal: str, measured: str, met: bool | None, source: str, quality: str = "-",
            mode: str = "-") -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": measured, "quality": quality, "error_mode": mode,
            "met": "not measured" if met is None else ("met" if met else "not met"), "source": source}


def _spread(summary: dict | None, digits: int = 2) -> str:
    """`median (range lo-hi, n rounds)` of a `ratio_summary`, or a note that the record predates the protocol."""
    if not summary:
        return " (one round: recorded before interleaved repeats)"
    return f" (range {summary['min']:.{digits}f}-{summary['max']:.{digits}f}, {summary['n_repeats']} rounds)"


def _median(runs: list[dict], field: str) -> float:
    ordered = sorted(float(run[field]) for run in runs)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _mode(record: dict) -> str:
    env = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    return str(record.get("error_mode") or env.get("error_mode") or "nan (before issue 27)")


def _harmony_row(records: dict) -> dict[str, Any]:
    harmony = [(path, rec) for path, rec in records.get("harmony", []) if _backend(rec) == "cpu"]
    sizes = [(s, rec) for _, rec in harmony for s in rec.get("sizes", [])]
    at = [(s, rec) for s, rec in sizes if s["n_cells"] == 100_000] or sorted(sizes, key=lambda t: t[0]["n_cells"])[-1:]
    if not at:
        return _target("Harmony time vs harmonypy, 100k cells, CPU", "<= 1.0x", "-", None, "harmony.json")
    s, rec = at[-1]
    quality = (f"median per-PC r with harmonypy {s['agreement_median_pc_r']:.4f}" if "agreement_median_pc_r" in s
               else "-")
    return _target(
        "Harmony time vs harmonypy 2.1 (10 fixed rounds), 100k cells x 50 PCs, CPU", "<= 1.0x",
        f"{s['ratio']:.2f}x{_spread(s.get('time_ratio'))} ({s['ours_seconds']:.2f} s vs {s['harmonypy_seconds']:.2f} s)"
        + ("" if s["n_cells"] == 100_000 else f" at {s['n_cells']} cells"),
        s["ratio"] <= 1.0 if s["n_cells"] == 100_000 else None,
        f"harmony.json, {str(s.get('carried_over_from', _date(rec)))[:10]}", quality,
        s.get("error_mode", "nan (before issue 27)"))


def _vae_row(records: dict) -> dict[str, Any] | None:
    vae = [(run, rec) for _, rec in records.get("vae", []) for run in rec.get("runs", [])]
    if not vae:
        return None
    run, rec = max(vae, key=lambda t: t[0]["n_cells"])
    where = f"vae.json, {str(run.get('carried_over_from', _date(rec)))[:10]}"
    name = (f"VAE training vs scvi-tools SCVI (same architecture), {run['n_cells']} cells x {run['n_genes']} genes, "
            f"{run['n_epochs']} epochs, CPU")
    quality = f"held-out NB log-lik/cell {100 * run['heldout_loglik_relative_gap']:+.2f} % vs scvi-tools"
    if "steady_epoch_speedup" not in run:  # a record of the former protocol
        return _target(name, ">= 5x", f"{run['cells_per_s_ratio']:.1f}x{_spread(None)}", run["cells_per_s_ratio"] >= 5,
                       where, quality, _mode(rec))
    steady, e2e, nan = run["steady_epoch_speedup"], run["end_to_end_speedup"], run["nan_mode_speedup_over_raise"]
    measured = (f"steady epochs {steady['median']:.1f}x{_spread(steady, 1)}; end to end with our compile "
                f"{e2e['median']:.1f}x{_spread(e2e, 1)}")
    mode = f"raise (nan mode {nan['median']:.2f}x faster)"
    return _target(name, ">= 5x", measured, steady["median"] >= 5, where, quality, mode)


def _umap_row(records: dict) -> dict[str, Any] | None:
    umap = [(s, rec) for _, rec in records.get("umap", []) for s in rec.get("sizes", [])]
    if not umap:
        return None
    worst, rec = min(umap, key=lambda t: t[0]["embed_speedup"])
    listing = "; ".join(f"{s['embed_speedup']:.0f}x{_spread(s.get('embed_speedup_summary'), 0)} at {s['n_cells']}"
                        for s, _ in umap)
    quality = "; ".join(
        f"15-NN preservation at {s['n_cells']}: fit {s['ours_knn_preservation']:.3f} vs "
        f"{s['umap_learn_knn_preservation']:.3f}"
        + (f", new cells {s['ours_new_cells_knn_preservation']:.3f} vs {s['umap_learn_new_cells_knn_preservation']:.3f}"
           if "ours_new_cells_knn_preservation" in s else "") for s, _ in umap)
    return _target("UMAP: embedding new cells vs umap-learn `transform`", ">= 100x", listing,
                   worst["embed_speedup"] >= 100, f"umap.json, {_date(rec)}", quality, _mode(rec))


def _pipeline_row(records: dict) -> dict[str, Any]:
    pipeline = [run for run in runs_of(records, "pipeline") if run.get("backend", "cpu") == "cpu"]
    at = [run for run in pipeline if run["n_cells"] == 100_000] or sorted(pipeline, key=lambda r: r["n_cells"])[-1:]
    if not at:
        return _target("End to end vs the scanpy pipeline, 100k cells, CPU", "> 1x", "-", None, "pipeline.json")
    run = at[-1]
    ours, theirs = run["diffbio_eqx"], run["scanpy"]
    full = run["n_cells"] == 100_000
    summary = run.get("speedup_train_and_infer_summary")
    nan = run.get("nan_mode_speedup_over_raise")
    return _target(
        "Whole workflow: our training + inference (compiles included) vs the scanpy workflow, 100k cells, CPU",
        "> 1x (faster)",
        f"{run['speedup_train_and_infer']:.2f}x{_spread(summary)} ({ours['total_seconds']:.0f} s vs "
        f"{theirs['total_seconds']:.0f} s)" + ("" if full else f" at {run['n_cells']} cells"),
        run["speedup_train_and_infer"] > 1 if full else None, f"pipeline.json, {_date(run)}",
        f"ARI vs simulated groups {run.get('ours_ari_median', ours['ari']):.2f} vs "
        f"{run.get('scanpy_ari_median', theirs['ari']):.2f}",
        (f"raise (nan mode {nan['median']:.2f}x faster)" if nan else _mode(run)))


def targets(records: dict) -> list[dict[str, Any]]:
    rows = [_harmony_row(records)]
    rows += [row for row in (_vae_row(records), _umap_row(records)) if row is not None]
    rows.append(_pipeline_row(records))
    # GPU targets from the scaling runs.
    scaling = runs_of(records, "scaling")
    gpu = [run for run in scaling if run.get("backend") == "gpu"]

    def gpu_row(name, goal, stage_prefix, pick, check):
        candidates = [run for run in gpu if run["stage"].startswith(stage_prefix)]
        if not candidates:
            rows.append(_target(name, goal, "no GPU run recorded", None, "scaling.json"))
            return
        run = pick(candidates)
        figure, met = check(run)
        rows.append(_target(name, goal, f"{figure} ({run['stage']}, {run['n_cells']} cells, {_device(run)})", met,
                            f"scaling.json, {_date(run)}"))

    gpu_row("Harmony on 1M cells x 50 PCs, 10 rounds, GPU", "< 1 s", "harmony",
            lambda c: max(c, key=lambda r: r["n_cells"]),
            lambda r: (f"{r['steady_seconds']:.2f} s",
                       r["steady_seconds"] < 1.0 if r["n_cells"] >= 1_000_000 else None))
    gpu_row("VAE training throughput, GPU", ">= 300k cells/s", "vae_train",
            lambda c: max(c, key=lambda r: r["cells_per_s"]),
            lambda r: (f"{r['cells_per_s']:.3g} cells/s (batch {r.get('batch_size', 128)})", r["cells_per_s"] >= 3e5))
    gpu_row("Inference of the trained pipeline, GPU", ">= 1M cells/s", "pipeline_infer",
            lambda c: max(c, key=lambda r: r["n_cells"]),
            lambda r: (f"{r['cells_per_s']:.3g} cells/s", r["cells_per_s"] >= 1e6))
    # No recompiles.
    vmap = runs_of(records, "vmap")
    if vmap:
        checks = {k: v for run in vmap for k, v in run.get("retrace_checks", {}).items()}
        passed = all(v["passed"] for v in checks.values())
        rows.append(_target("No recompiles across hyperparameter values (`eqx.debug.assert_max_traces`)",
                            "1 trace", f"{sum(v['passed'] for v in checks.values())}/{len(checks)} checks pass: "
                            + ", ".join(checks), passed, "vmap.json; tests/test_retrace.py"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def targets_table(rows: list[dict]) -> list[str]:
    return _table(["target", "goal", "measured (median of rounds)", "quality beside it", "error mode", "status",
                   "source"],
                  [[r["target"], r["goal"], r["measured"], r["quality"], r["error_mode"], f"**{r['met']}**",
                    r["source"]] for r in rows])


def scaling_table(records: dict) -> list[str]:
    runs = sorted(runs_of(records, "scaling"), key=lambda r: (r.get("backend", ""), r["stage"], r["n_cells"]))
    rows = [[f"{r['stage']}", r.get("backend", "cpu") + ("" if r.get("backend") == "cpu" else f" ({_device(r)})"),
             f"{r['n_cells']:,}", _fmt(r["compile_seconds"]), _fmt(r["steady_seconds"]), _fmt(r["cells_per_s"]),
             f"{r['peak_bytes'] / 1e6:.0f}"] for r in runs]
    return _table(["stage", "backend", "cells", "compile s", "steady s", "cells/s", "peak MB"], rows)


def pipeline_table(records: dict) -> list[str]:
    rows = []
    for run in sorted(runs_of(records, "pipeline"), key=lambda r: (r.get("backend", ""), r["n_cells"])):
        ours, theirs = run["diffbio_eqx"], run["scanpy"]
        steps = ", ".join(f"{k} {v:.1f}" for k, v in theirs["steps_seconds"].items())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in ours["stage_seconds"].items())
        rows.append([f"{run['n_cells']:,}", run.get("backend", "cpu"),
                     f"{theirs['total_seconds']:.1f} s ({steps}); ARI {theirs['ari']:.3f}; "
                     f"{theirs['peak_rss_bytes'] / 1e9:.1f} GB",
                     f"{ours['total_seconds']:.1f} s = train {ours['fit_seconds']:.1f} ({stages}) + infer "
                     f"{ours['infer_first_call_seconds']:.1f}; ARI {ours['ari']:.3f}; "
                     f"{ours['peak_rss_bytes'] / 1e9:.1f} GB",
                     f"{run['speedup_train_and_infer']:.2f}x{_spread(run.get('speedup_train_and_infer_summary'))}",
                     f"{ours['infer_seconds']:.2f} s ({ours['infer_cells_per_s']:.3g} cells/s)"])
    return _table(["cells", "backend", "scanpy pipeline (round with the median speedup)",
                   "diffbio_eqx (train + infer)", "speedup, whole workflows",
                   "our trained-pipeline inference (no scanpy counterpart)"], rows)


def vmap_table(records: dict) -> list[str]:
    rows = []
    for run in runs_of(records, "vmap"):
        sweep, ens = run["theta_sweep"], run["vae_ensemble"]
        rows.append([f"Harmony {sweep['n_thetas']}-theta sweep, {sweep['n_cells']:,} cells", run["backend"],
                     f"{sweep['vmap_seconds']:.2f} s", f"{sweep['loop_seconds']:.2f} s",
                     f"{sweep['loop_seconds'] / sweep['vmap_seconds']:.2f}x",
                     f"{sweep['vmap_compile_seconds']:.1f} / {sweep['loop_compile_seconds']:.1f} s"])
        rows.append([f"VAE {ens['n_members']}-seed ensemble, {ens['n_cells']:,} cells x {ens['n_genes']} genes, "
                     f"{ens['n_epochs']} epoch(s)", run["backend"], f"{ens['vmap_seconds']:.2f} s",
                     f"{ens['loop_seconds']:.2f} s", f"{ens['loop_over_vmap']:.2f}x",
                     f"{ens['vmap_compile_seconds']:.1f} / {ens['loop_compile_seconds']:.1f} s"])
    return _table(["study", "backend", "vmapped", "loop", "speedup", "compile (vmap / loop)"], rows)


def peers_table(records: dict) -> list[str]:
    rows = []
    for _, rec in records.get("harmony", []):
        for s in rec.get("sizes", []):
            rows.append(["Harmony", _backend(rec), f"{s['n_cells']:,} cells x 50", f"{s['ours_seconds']:.2f} s",
                         f"harmonypy {s['harmonypy_seconds']:.2f} s", f"{s['ratio']:.2f}x time"])
    for _, rec in records.get("vae", []):
        for run in rec.get("runs", []):
            if "steady_epoch_speedup" not in run:  # the former protocol: one round
                rows.append(["VAE training", _backend(rec), f"{run['n_cells']:,} x {run['n_genes']}, "
                             f"{run['n_epochs']} ep", f"{run['diffbio_eqx']['cells_per_s']:.3g} cells/s",
                             f"scvi-tools {run['scvi_tools']['cells_per_s']:.3g} cells/s",
                             f"{run['cells_per_s_ratio']:.1f}x{_spread(None)}"])
                continue
            for label, field, key in (("VAE training, steady epochs", "median_epoch_seconds", "steady_epoch_speedup"),
                                      ("VAE training, end to end", "train_seconds", "end_to_end_speedup")):
                rows.append([label, _backend(rec), f"{run['n_cells']:,} x {run['n_genes']}, {run['n_epochs']} ep",
                             f"{_median(run['diffbio_eqx'], field):.3g} s",
                             f"scvi-tools {_median(run['scvi_tools'], field):.3g} s",
                             f"{run[key]['median']:.1f}x{_spread(run[key], 1)}"])
    for _, rec in records.get("umap", []):
        for s in rec.get("sizes", []):
            rows.append(["UMAP embed new cells", _backend(rec), f"fit on {s['n_cells']:,}",
                         f"{s['ours_embed_cells_per_s']:.3g} cells/s",
                         f"umap-learn transform {s['umap_learn_transform_cells_per_s']:.3g} cells/s",
                         f"{s['embed_speedup']:.0f}x"])
            fit_ratio = s.get("fit_time_ratio")
            rows.append(["UMAP fit", _backend(rec), f"{s['n_cells']:,}", f"{s['ours_fit_s']:.1f} s",
                         f"umap-learn {s['umap_learn_fit_s']:.1f} s",
                         f"{fit_ratio['median'] if fit_ratio else s['ours_fit_s'] / s['umap_learn_fit_s']:.2f}x time"
                         f"{_spread(fit_ratio)}"])
    for _, rec in records.get("ambient", []):
        for run in rec.get("runs", []):
            ours, theirs = run["diffbio_eqx"], run.get("cellbender", {})
            peer = (f"CellBender {theirs['total_s']:.0f} s end to end" if "total_s" in theirs else "CellBender not run")
            if "carried_over_from" in theirs:
                peer += f" (recorded {theirs['carried_over_from'][:10]})"
            same_epochs = ours.get("end_to_end_s_at_cellbender_epochs")
            mine = (f"{same_epochs:.0f} s end to end at CellBender's epochs (compile included); steady "
                    if same_epochs is not None else "steady ") + f"{ours['train_cells_per_s']:.3g} cells/s per epoch"
            ratio = (f"{theirs['total_s'] / same_epochs:.1f}x, end to end" if same_epochs and "total_s" in theirs
                     else "")
            rows.append(["ambient removal", _backend(rec), f"{run['n_cells']:,} cells", mine, peer, ratio])
    return _table(["stage", "backend", "workload", "diffbio_eqx", "peer", "ratio"], rows)


# ---------------------------------------------------------------------------------------------------------------
# Plot


def plot(records: dict, path: pathlib.Path) -> bool:
    try:
        return _plot(records, path)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        print(f"render: plot not drawn ({type(error).__name__}: {error})", file=sys.stderr)
        return False


def _plot(records: dict, path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for run in runs_of(records, "scaling"):
        label = f"ours: {run['stage']} ({run.get('backend', 'cpu')})"
        series.setdefault(label, []).append((run["n_cells"], run["steady_seconds"]))
    for _, rec in records.get("harmony", []):
        for s in rec.get("sizes", []):
            label = f"peer: harmonypy ({_backend(rec)} host)"
            series.setdefault(label, []).append((s["n_cells"], s["harmonypy_seconds"]))
    for run in runs_of(records, "pipeline"):
        backend = run.get("backend", "cpu")
        series.setdefault(f"ours: pipeline train+infer ({backend})", []).append(
            (run["n_cells"], run["diffbio_eqx"]["total_seconds"]))
        series.setdefault(f"peer: scanpy pipeline ({backend} host)", []).append(
            (run["n_cells"], run["scanpy"]["total_seconds"]))
    for _, rec in records.get("vae", []):
        for run in rec.get("runs", []):
            n, theirs = run["n_train_cells"], run["scvi_tools"]
            epoch = (_median(theirs, "median_epoch_seconds") if isinstance(theirs, list)
                     else n / theirs["cells_per_s"])
            series.setdefault("peer: scvi-tools epoch (cpu)", []).append((n, epoch))
    for _, rec in records.get("umap", []):
        for s in rec.get("sizes", []):
            label = f"peer: umap-learn fit ({_backend(rec)} host)"
            series.setdefault(label, []).append((s["n_cells"], s["umap_learn_fit_s"]))
    families = {"harmony": "C0", "vae_train": "C1", "scvi": "C1", "vae_infer": "C5", "umap": "C2",
                "pipeline train": "C3", "scanpy": "C3", "pipeline_infer": "C4", "kmeans": "C6"}
    for label, points in sorted(series.items()):
        points = sorted(dict(points).items())
        xs, ys = zip(*points)
        style = "--" if label.startswith("peer") else "-"
        marker = "s" if "gpu" in label else "o"
        color = next((c for word, c in families.items() if word in label), None)
        ax.plot(xs, ys, style, marker=marker, label=label, linewidth=1.2, markersize=4, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cells")
    ax.set_ylabel("seconds (steady state; VAE train: one epoch)")
    ax.set_title("Time against cells (solid: diffbio_eqx, dashed: peer tools)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def machines(records: dict) -> list[str]:
    seen = {}
    for stem, items in records.items():
        for _, rec in items:
            runs = rec.get("runs", [rec]) if isinstance(rec, dict) else []
            for run in runs if isinstance(runs, list) else [rec]:
                if not isinstance(run, dict):  # some records list run names or paths, not run records
                    run = {}
                env = run.get("environment") or rec.get("environment") or {}
                if not env:
                    continue
                backend = env.get("backend") or "cpu"
                key = (backend, "" if backend == "cpu" else _device({"environment": env}), env.get("cpu_count"))
                load = env.get("load_average")
                entry = seen.setdefault(key, {"dates": set(), "loads": [], "env": env})
                entry["dates"].add(str(env.get("date", "?"))[:10])
                if load:
                    entry["loads"].append(load[0])
    lines = []
    for (backend, device, cpus), entry in seen.items():
        env = entry["env"]
        loads = entry["loads"]
        load = f", load average {min(loads):.1f}-{max(loads):.1f} while measuring" if loads else ""
        versions = env.get("versions", {})
        lines.append(f"{backend}{f' ({device})' if device else ''}, {cpus} CPU cores, "
                     f"{env.get('platform', env.get('machine', ''))}, "
                     f"jax {versions.get('jax', '?')}, dates {', '.join(sorted(entry['dates']))}{load}")
    return lines


def _suite_lines(records: dict) -> list[str]:
    lines = []
    for stem in sorted(records):
        if not stem.startswith("bench_run"):
            continue
        for _, rec in records[stem]:
            lines += ["", f"Whole suite (`benchmarks/run.py`, {rec['mode']} sizes, {rec['backend']}): "
                      f"{rec['wall_seconds'] / 60:.1f} min on {rec['date'][:16]} UTC, load average "
                      f"{rec['load_average_start'][0]:.1f} at the start and {rec['load_average_end'][0]:.1f} at the "
                      "end; per benchmark: " + ", ".join(f"{k} {v:.0f} s" for k, v in rec["seconds"].items()) + "."]
    return lines


def _safe(table, records: dict) -> list[str]:
    """A table, or one line saying why it could not be rendered (a JSON file of another format)."""
    try:
        return table(records)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        return [f"(not rendered: {type(error).__name__}: {error})"]


def summary(records: dict, rows: list[dict], plotted: bool) -> str:
    lines = ["# Benchmark results", "", "Rendered by `benchmarks/render.py` from the JSON files in this folder.", "",
             "Machines:", ""] + [f"- {m}" for m in machines(records)] + ["", "## Targets", ""]
    lines += targets_table(rows) + _suite_lines(records) + ["", "## Scaling (bench_scaling.py)", ""]
    lines += _safe(scaling_table, records) + ["", "Peak memory: " + next(
        (r["memory_method"] for r in runs_of(records, "scaling") if "memory_method" in r), "-"), ""]
    if plotted:
        lines += ["![time against cells](scaling.png)", ""]
    lines += ["## Whole pipeline vs scanpy (bench_pipeline.py)", ""] + _safe(pipeline_table, records)
    lines += ["", "## vmapped studies (bench_vmap.py)", ""] + _safe(vmap_table, records)
    lines += ["", "## Stages vs peer tools (bench_harmony/vae/umap/ambient.py)", ""] + _safe(peers_table, records)
    lines += [""]
    return "\n".join(lines)


def readme_section(records: dict, rows: list[dict], plotted: bool, results: pathlib.Path, root: pathlib.Path) -> str:
    try:
        relative = results.resolve().relative_to(root.resolve())
    except ValueError:
        relative = results
    lines = [
        START,
        "",
        "Every figure below is measured side by side with the peer tool in the same run, on the same data "
        "(`make bench` runs the suite at CPU-friendly sizes and re-renders this section; `benchmarks/gpu.sh OUT` "
        "runs it on a GPU). The tools alternate over at least three rounds with the same treatment (warm-up, "
        "threads, compiles reported apart); each ratio is the median of the rounds, with its range, and the "
        "quality of the same runs stands beside it. Ours runs in equinox's default error mode (`raise`, what users "
        "run); where the `nan` mode was timed as well, the row says what the runtime checks cost. Machines:",
        "",
    ] + [f"- {m}" for m in machines(records)] + ["", "Targets of the benchmarks issue, met or not:", ""]
    lines += targets_table(rows)
    if not any(run.get("backend") == "gpu" for run in runs_of(records, "scaling")):
        lines += ["", "No GPU run is recorded: no GPU was available when these figures were measured, and "
                  "`benchmarks/gpu.sh` has not been run on one yet."]
    lines += _suite_lines(records)
    lines += ["", f"Full tables (scaling per stage with compile time, steady-state cells/s and peak memory; the "
              f"scanpy pipeline step by step; vmapped studies): [`{relative}/summary.md`]({relative}/summary.md)."]
    if plotted:
        lines += ["", f"![time against cells, log-log]({relative}/scaling.png)"]
    lines += ["", END]
    return "\n".join(lines)


def update_readme(readme: pathlib.Path, section: str) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"render: {readme} has no {START} / {END} markers; not updated", file=sys.stderr)
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + section + tail)
    return True


def main(results: str | pathlib.Path = HERE / "results", readme: str | pathlib.Path | None = HERE.parent / "README.md"
         ) -> list[dict]:
    results = pathlib.Path(results)
    records = load(results)
    try:
        rows = targets(records)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        print(f"render: targets not rendered ({type(error).__name__}: {error})", file=sys.stderr)
        rows = []
    plotted = plot(records, results / "scaling.png")
    (results / "summary.md").write_text(summary(records, rows, plotted))
    if readme is not None:
        update_readme(pathlib.Path(readme), readme_section(records, rows, plotted, results, HERE.parent))
    for row in rows:
        print(f"{row['met']:>12}  {row['target']}: {row['measured']} (goal {row['goal']})")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--readme", default=str(HERE.parent / "README.md"))
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    main(args.results, None if args.no_readme else args.readme)
