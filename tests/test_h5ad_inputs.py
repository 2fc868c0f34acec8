"""Real h5ad files as users hold them: log-normalised `X` with the counts in `layers["counts"]` (scvi-tools) or in
`.raw` (scanpy); gene names from a `var` column; labels with missing values; a batch column with one category.

The command line refuses a matrix that is not counts with one line naming the flag that reads the counts, and
writes nothing; with the flag, the results equal those of the counts-in-X file bit for bit."""

import pathlib
import warnings

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import diffbio_eqx as dx
from diffbio_eqx import cli
from diffbio_eqx.io import layer_names


EPOCHS = ["--vae-epochs", "2", "--ambient-epochs", "1", "--umap-epochs", "1", "--quiet", "--seed", "1"]


def _log_normalised(counts: sp.csr_matrix) -> sp.csr_matrix:
    """scanpy's `normalize_total(target_sum=1e4)` then `log1p`."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    out.data = np.log1p(out.data / np.repeat(totals, np.diff(out.indptr)) * 1e4).astype(np.float32)
    return out


def _three_ways(counts: ad.AnnData, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """`counts` written three ways: counts in X; log-normalised X with the counts in layers["counts"]; and with the
    counts in .raw."""
    folder.mkdir(exist_ok=True)
    files = {"x": folder / "counts_in_x.h5ad", "layer": folder / "counts_in_layer.h5ad",
             "raw": folder / "counts_in_raw.h5ad"}
    counts.write_h5ad(files["x"])
    log = _log_normalised(counts.X)
    in_layer = ad.AnnData(log, obs=counts.obs.copy(), var=counts.var.copy(), layers={"counts": counts.X.copy()})
    in_layer.uns["log1p"] = {"base": "e"}
    in_layer.write_h5ad(files["layer"])
    in_raw = ad.AnnData(log.copy(), obs=counts.obs.copy(), var=counts.var.copy())
    in_raw.raw = ad.AnnData(counts.X.copy(), obs=counts.obs.copy(), var=counts.var.copy())
    in_raw.write_h5ad(files["raw"])
    return files


@pytest.fixture(scope="module")
def pbmc_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """pbmc68k three ways (`_three_ways`)."""
    return _three_ways(dx.datasets.pbmc68k(), tmp_path_factory.mktemp("pbmc"))


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["run", *map(str, argv), *EPOCHS])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind, flag", [("layer", "--layer counts"), ("raw", "--use-raw")])
def test_log_normalised_x_is_refused_naming_the_flag(capsys, pbmc_files, tmp_path, kind, flag):
    source = pbmc_files[kind]
    before = source.read_bytes()
    code, err = _run(capsys, source, "--label-key", "bulk_labels", "--out", tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffbio-eqx: error: adata.X: holds non-integer values"), err
    assert "looks log-transformed" in lines[0] and flag in lines[0], err
    assert "Warning" not in err and ".py:" not in err
    assert not (tmp_path / "out").exists(), "nothing is written"
    assert source.read_bytes() == before


def _results(folder: pathlib.Path) -> tuple[dict[str, bytes], bytes]:
    result = ad.read_h5ad(folder / "result.h5ad")
    arrays = {f"obsm/{k}": np.asarray(v).tobytes() for k, v in result.obsm.items()}
    arrays |= {f"layers/{k}": np.asarray(result.layers[k]).tobytes() for k in layer_names(result)
               if k.startswith("diffbio")}
    arrays["obs/diffbio_cluster"] = result.obs["diffbio_cluster"].to_numpy().astype(str).tobytes()
    return arrays, (folder / "pipeline.eqx").read_bytes()


def test_layer_and_raw_flags_equal_counts_in_x_bit_for_bit(capsys, tmp_path):
    # The small simulated cells with two batches and labels: the three runs share their compiled programs with the
    # labels test below (the same shapes and settings); every stage runs, Harmony included.
    files = _three_ways(_small(), tmp_path / "input")
    runs = {"x": [], "layer": ["--layer", "counts"], "raw": ["--use-raw"]}
    results = {}
    for kind, flags in runs.items():
        code, err = _run(capsys, files[kind], *flags, "--batch-key", "batch", "--label-key", "cell_type", "--out",
                         tmp_path / kind)
        assert code == 0, err
        assert err == "", err
        results[kind] = _results(tmp_path / kind)
    reference_arrays, reference_pipeline = results["x"]
    assert {"obsm/X_diffbio", "obsm/X_diffbio_corrected", "obsm/X_umap", "layers/diffbio_normalized",
            "layers/diffbio_decontaminated"} <= set(reference_arrays)
    for kind in ("layer", "raw"):
        arrays, pipeline = results[kind]
        assert arrays == reference_arrays, kind
        assert pipeline == reference_pipeline, kind
    assert "Counts from layers['counts']." in (tmp_path / "layer" / "report.md").read_text()
    assert "Counts from .raw." in (tmp_path / "raw" / "report.md").read_text()


# --- small simulated files --------------------------------------------------------------------------------------
def _small(**obs_columns) -> ad.AnnData:
    sim = dx.simulate(jr.key(3), n_cells=120, n_genes=40, n_groups=3, n_batches=2)
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(np.asarray(sim.batches) == 0, "a", "b")),
                        "cell_type": pd.Categorical([f"t{g}" for g in np.asarray(sim.groups)]), **obs_columns},
                       index=[f"cell{i}" for i in range(120)])
    var = pd.DataFrame({"symbol": [f"SYM{j % 30}" for j in range(40)]}, index=[f"ENSG{j:011d}" for j in range(40)])
    return ad.AnnData(sp.csr_matrix(np.asarray(sim.counts, np.float32)), obs=obs, var=var)


def _write(adata: ad.AnnData, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(exist_ok=True)
    adata.write_h5ad(folder / "cells.h5ad")
    return folder / "cells.h5ad"


def test_allow_non_integer_runs_and_says_so(capsys, tmp_path):
    adata = _small()
    adata.X = _log_normalised(adata.X)
    source = _write(adata, tmp_path / "input")
    code, err = _run(capsys, source, "--out", tmp_path / "refused")
    assert code == 2 and "no layer or .raw holds counts either; --allow-non-integer" in err, err
    code, err = _run(capsys, source, "--allow-non-integer", "--out", tmp_path / "out")
    assert code == 0, err
    assert err == "", "no raw Python warning with a source line"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Not raw counts** (run with --allow-non-integer): adata.X: holds non-integer values" in report


def test_gene_key_names_the_stored_pipeline_and_the_report(capsys, tmp_path):
    source = _write(_small(), tmp_path / "input")
    code, err = _run(capsys, source, "--gene-key", "symbol", "--out", tmp_path / "out")
    assert code == 0, err
    expected = [f"SYM{j}" for j in range(30)] + [f"SYM{j}-1" for j in range(10)]
    assert list(dx.load_pipeline(tmp_path / "out" / "pipeline.eqx").genes) == expected
    assert list(ad.read_h5ad(tmp_path / "out" / "result.h5ad").var_names) == expected
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Genes named by var['symbol'] (first: SYM0, SYM1, SYM2, SYM3, SYM4)." in report
    assert "10 gene name(s) occur more than once (e.g. SYM0, SYM1, SYM2, SYM3, SYM4); made unique" in report
    code, err = _run(capsys, source, "--gene-key", "gene_symbols", "--out", tmp_path / "bad")
    assert code == 2 and "--gene-key: 'gene_symbols' is not a column of adata.var" in err, err


def test_labels_with_missing_values_are_left_out_of_the_label_scores(capsys, tmp_path):
    adata = _small()
    labels = adata.obs["cell_type"].astype(object).to_numpy().copy()  # pandas 3 (copy-on-write): a read-only view
    labels[::10] = np.nan
    adata.obs["cell_type"] = pd.Categorical(labels)
    source = _write(adata, tmp_path / "input")
    code, err = _run(capsys, source, "--batch-key", "batch", "--label-key", "cell_type", "--out", tmp_path / "out")
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "12 of 120 cells have no label in obs['cell_type']; they are left out of the label scores" in report
    assert "ARI (clusters vs labels)" in report and "nan" not in report.split("## Quality")[1].split("## Files")[0]
    # The number of clusters is chosen from the data (labels only score), and the saved config holds it.
    pipeline = dx.load_pipeline(tmp_path / "out" / "pipeline.eqx")
    assert pipeline.config.n_clusters == pipeline.clustering.n_clusters >= 1


def test_a_batch_column_with_one_category_runs_without_batch_correction(capsys, tmp_path):
    source = _write(_small(donor=pd.Categorical(["d1"] * 120)), tmp_path / "input")
    code, err = _run(capsys, source, "--batch-key", "donor", "--out", tmp_path / "out")
    assert code == 0, err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "obs['donor'] has a single batch ('d1'): no batch correction (Harmony is off)." in report
    pipeline = dx.load_pipeline(tmp_path / "out" / "pipeline.eqx")
    assert pipeline.harmony_reference is None and not pipeline.config.enable_batch_correction


def test_layer_and_raw_flags_are_checked(capsys, tmp_path):
    source = _write(_small(), tmp_path / "input")
    for flags, message in ((["--layer", "counts", "--use-raw"], "--layer and --use-raw: both name where the counts "
                                                                 "are; choose one"),
                           (["--layer", "counts"], "layer: 'counts' is not in adata.layers (has [])"),
                           (["--use-raw"], "--use-raw: the input has no .raw")):
        code, err = _run(capsys, source, *flags, "--out", tmp_path / "out")
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()
    code, err = _run(capsys, "--layer", "counts", "--out", tmp_path / "out")
    assert code == 2 and "--layer: needs an INPUT file" in err


# --- the Python API -----------------------------------------------------------------------------------------------
def test_python_api_warns_once_naming_the_field_and_the_counts():
    adata = _small()
    adata.layers["counts"] = adata.X.copy()
    adata.X = _log_normalised(adata.X)
    with pytest.warns(dx.NonIntegerCountsWarning) as caught:
        dx.io.from_anndata(adata)
    assert len(caught) == 1
    assert str(caught[0].message).startswith("adata.X: holds non-integer values (largest ")
    assert "counts are in adata.layers['counts'] (layer='counts')" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arrays = dx.io.from_anndata(adata, layer="counts")
    assert (arrays.counts != adata.layers["counts"]).nnz == 0
    assert dx.io.not_counts(adata, layer="counts") is None
    adata.raw = ad.AnnData(adata.layers["counts"], var=adata.var)
    assert "adata.raw (use_raw=True)" in (dx.io.not_counts(adata) or "")
    assert (dx.io.from_anndata(adata, use_raw=True).counts != adata.layers["counts"]).nnz == 0
