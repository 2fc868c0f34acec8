"""The benchmark protocol's arithmetic and rendering (issue 27): per-round ratios, medians with their range, and the
targets table's quality and error-mode columns, on hand-made records (no benchmark is run)."""

import importlib.util
import pathlib
import sys

import pytest


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_summary_is_per_round_median_with_range():
    common = _module("_common")
    summary = common.ratio_summary([10.0, 30.0, 8.0], [2.0, 3.0, 4.0])  # rounds: 5x, 10x, 2x
    assert summary["per_repeat"] == [5.0, 10.0, 2.0]
    assert (summary["median"], summary["min"], summary["max"], summary["n_repeats"]) == (5.0, 2.0, 10.0, 3)
    assert common.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        common.ratio_summary([1.0, 2.0], [1.0])  # rounds must pair up


def test_targets_show_median_range_quality_and_error_mode():
    render = _module("render")
    tool_run = {"median_epoch_seconds": 1.0, "train_seconds": 10.0, "heldout_nb_loglik_per_cell": -100.0}
    vae = {"n_cells": 5000, "n_genes": 2000, "n_epochs": 20, "n_train_cells": 4500,
           "steady_epoch_speedup": {"median": 6.0, "min": 4.5, "max": 7.25, "n_repeats": 3},
           "end_to_end_speedup": {"median": 2.0, "min": 1.5, "max": 2.5, "n_repeats": 3},
           "nan_mode_speedup_over_raise": {"median": 1.1, "min": 1.0, "max": 1.2, "n_repeats": 3},
           "heldout_loglik_relative_gap": 0.001, "diffbio_eqx": [tool_run], "scvi_tools": [tool_run]}
    records = {"vae": [(pathlib.Path("vae.json"), {"environment": {"date": "2026-12-01"}, "runs": [vae]})]}
    rows = render.targets(records)
    row = next(r for r in rows if r["target"].startswith("VAE training"))
    assert "6.0x (range 4.5-7.2, 3 rounds)" in row["measured"] or "6.0x (range 4.5-7.3, 3 rounds)" in row["measured"]
    assert "end to end" in row["measured"] and row["met"] == "met"
    assert "+0.10 %" in row["quality"] and row["error_mode"].startswith("raise (nan mode 1.10x")
    table = "\n".join(render.targets_table(rows))
    assert "quality beside it" in table and "error mode" in table
    vae["steady_epoch_speedup"]["median"] = 4.9
    assert next(r for r in render.targets(records) if r["target"].startswith("VAE"))["met"] == "not met"
