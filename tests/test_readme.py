import pathlib
import re
import warnings

import jax
import pytest

import diffbio_eqx as dbx


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_examples():
    text = README.read_text()
    for heading in ("## Quick start", "## Configuration", "## Training", "## Inference", "## New data projection",
                    "## Hyperparameter studies", "## AnnData"):
        assert heading in text, heading
    assert "make run" in text and "make test" in text
    assert len(_python_blocks()) >= 7


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # README code is user code: run it under JAX's default promotion rules, not the suite's strict ones.
    with warnings.catch_warnings(), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        # The AnnData example gives no ambient profile, on purpose: the pipeline says so with this warning.
        warnings.simplefilter("ignore", dbx.AmbientProfileWarning)
        for number, block in enumerate(_python_blocks()):
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    assert namespace["out"]["cluster_assignments"].shape == (600, 4)
    assert namespace["projected"]["embeddings_2d"].shape == (300, 2)
    assert (tmp_path / "pbmc_diffbio.h5ad").is_file() and (tmp_path / "pipeline.eqx").is_file()
    assert "X_umap" in namespace["annotated"].obsm
    # ambient example (no absent genes, 100 epochs: the empty droplets' prior sets the level; measured 0.099 vs
    # 0.107, correlation 0.73)
    estimate, truth = namespace["cleaned"].contamination_fraction, namespace["sim"].contamination_fraction
    assert abs(float(estimate.mean()) - float(truth.mean())) <= 0.02
    assert float(jax.numpy.corrcoef(estimate, truth)[0, 1]) >= 0.6
    assert namespace["grid"]["cluster_assignments"].shape == (3, 2, 600, 4)
    # the pp/tl/pl example: every face wrote its keys, and its clusters recover the simulated groups (1.0 measured)
    cells = namespace["demo"]
    assert {"X_diffbio", "X_diffbio_corrected", "X_umap", "diffbio_cluster_probabilities"} <= set(cells.obsm)
    assert {"distances", "connectivities"} <= set(cells.obsp) and "diffbio_normalized" in cells.layers
    assert namespace["face_ari"] >= 0.9
    assert (tmp_path / "cells_umap.png").is_file()
