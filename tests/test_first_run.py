"""A cleaner first run (issue 24): a redirected log gets plain lines (no carriage returns), the output files get
the mode a plain `open()` gives, a one-point curve is drawn visibly, and the report names the versions and the
seed."""

import importlib.metadata
import os
import pathlib
import re
import stat
import subprocess
import sys

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import diffbio_eqx as dx
from diffbio_eqx import pl
from diffbio_eqx._core._checkpoint import save_leaves


ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = ["pipeline.eqx", "report.md", "result.h5ad", "training.png", "umap.png"]


def _cells(path: pathlib.Path) -> pathlib.Path:
    sim = dx.simulate(jr.key(3), n_cells=120, n_genes=40, n_groups=3, n_batches=2)
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(np.asarray(sim.batches) == 0, "a", "b"))},
                       index=[f"cell{i}" for i in range(120)])
    adata = ad.AnnData(sp.csr_matrix(np.asarray(sim.counts, np.float32)), obs=obs,
                       var=pd.DataFrame(index=[f"g{j}" for j in range(40)]))
    adata.write_h5ad(path)
    return path


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_redirected_run_logs_plain_lines_writes_0644_files_and_reports_versions(tmp_path):
    source, out = _cells(tmp_path / "cells.h5ad"), tmp_path / "out"
    previous = os.umask(0o022)  # inherited by the command
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "diffbio_eqx.cli", "run", str(source), "--batch-key", "batch", "--out", str(out),
             "--seed", "7", "--vae-epochs", "3", "--ambient-epochs", "2", "--umap-epochs", "2"],
            cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
    finally:
        os.umask(previous)
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = completed.stdout + completed.stderr
    assert "\r" not in log
    assert re.search(r"^\S.*: epoch 3/3, loss \d", completed.stderr, re.MULTILINE), completed.stderr
    assert all(line.isprintable() for line in completed.stderr.splitlines())
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert {name: oct(_mode(out / name)) for name in FILES} == {name: "0o644" for name in FILES}
    report = (out / "report.md").read_text()
    assert "Seed: 7." in report
    assert f"| jax | {importlib.metadata.version('jax')} |" in report
    assert f"| diffbio_eqx | {importlib.metadata.version('diffbio_eqx')} |" in report


@pytest.mark.slow  # a whole run of the job (about 50 s); the redirected-run test above covers the log's form
def test_quiet_prints_no_progress(tmp_path, capsys):
    from diffbio_eqx import cli

    code = cli.main(["run", str(_cells(tmp_path / "cells.h5ad")), "--batch-key", "batch", "--out",
                     str(tmp_path / "out"), "--vae-epochs", "2", "--ambient-epochs", "1", "--umap-epochs", "1",
                     "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert "epoch" not in captured.out


def test_saved_pipelines_and_checkpoints_get_the_plain_mode(tmp_path):
    pipeline = dx.create_single_cell_pipeline(config=dx.SingleCellPipelineConfig(n_genes=8, n_batches=1,
                                                                                    n_clusters=2), key=jr.key(0))
    previous = os.umask(0o022)
    try:
        saved = dx.save_pipeline(tmp_path / "pipeline.eqx", pipeline)
        checkpoint = save_leaves(tmp_path / "state.eqx", {"w": np.zeros(3)})
        os.umask(0o077)
        private = save_leaves(tmp_path / "private.eqx", {"w": np.zeros(3)})
    finally:
        os.umask(previous)
    assert (_mode(saved), _mode(checkpoint), _mode(private)) == (0o644, 0o644, 0o600)


def test_a_one_point_curve_is_drawn_with_a_marker():
    figure = pl.training({"harmony": {"objective": np.array([3.0])},
                          "vae": {"train": np.linspace(3, 1, 50), "validation": np.full(50, np.nan)}})
    harmony, vae = figure.axes
    (line,) = harmony.get_lines()
    assert line.get_marker() == "o" and line.get_xydata().shape == (1, 2)
    assert [line.get_marker() for line in vae.get_lines()] in (["None"], [""], [None])
    import matplotlib.pyplot as plt

    plt.close(figure)
