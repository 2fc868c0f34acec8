"""The main job's optional steps (`diffbio-eqx run --doublets --impute --reference`): a doublet filter before the
pipeline, MAGIC written as a layer, annotation from a labelled reference; and their bad input, refused before any
numerical work with nothing written.

One small job runs every step at once (the pipeline is cut to the VAE and soft k-means, so it compiles quickly);
the steps' results are compared with the faces (`pp.scrublet`, `pp.magic`, `tl.annotate`) run on the same cells
with the same keys."""

import json
import pathlib

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from diffbio_eqx import cli, pp, tl
from diffbio_eqx._core._train import TrainSettings
from diffbio_eqx._job_steps import (
    DoubletCall,
    JobSteps,
    StepsDone,
    annotate,
    call_doublets,
    check_steps,
    filter_doublets,
)
from diffbio_eqx._simulate._doublets import simulate_doublets


SEED = 1
N_QUERY, N_REFERENCE = 170, 120
EPOCHS = ["--vae-epochs", "2", "--quiet", "--seed", str(SEED)]
# The pipeline cut to what the steps need: the VAE and soft k-means (the other stages have their own tests).
SMALL = {"enable_ambient_removal": False, "enable_batch_correction": False, "enable_dim_reduction": False,
         "n_clusters": 3, "clustering_method": "soft_kmeans", "latent_dim": 5, "hidden_dims": [32]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Query droplets with heterotypic doublets (the doublet simulator), a labelled reference of singlets from
    the same simulation, and the small pipeline config."""
    folder = tmp_path_factory.mktemp("steps")
    sim = simulate_doublets(jr.key(0), n_cells=N_QUERY + N_REFERENCE, n_genes=60, n_groups=3, doublet_rate=0.12,
                            heterotypic_only=True)
    counts, groups, truth = np.asarray(sim.counts, np.float32), np.asarray(sim.groups), np.asarray(sim.is_doublet)
    genes = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(counts.shape[1])]))
    query = slice(0, N_QUERY)
    names = np.array([f"t{g}" for g in groups[query]], dtype=object)
    # The query's own labels under the reference's label key: the singlets' groups, none for the doublets.
    obs = pd.DataFrame({"group": pd.Categorical(names), "doublet": truth[query],
                        "label": pd.Categorical(pd.Series(names).where(~truth[query]))},
                       index=pd.Index([f"cell{i}" for i in range(N_QUERY)]))
    # Results of an earlier run in the file: the job's own replace them, for the left-out cells too.
    obs["diffbio_cluster"] = pd.Categorical(["earlier"] * N_QUERY)
    stale = {"X_diffbio": np.zeros((N_QUERY, SMALL["latent_dim"]), np.float32)}
    ad.AnnData(sp.csr_matrix(counts[query]), obs=obs, var=genes, obsm=stale).write_h5ad(folder / "query.h5ad")
    reference = N_QUERY + np.flatnonzero(~truth[N_QUERY:])  # its singlets
    ref_obs = pd.DataFrame({"label": pd.Categorical([f"t{g}" for g in groups[reference]])},
                           index=pd.Index([f"ref{i}" for i in range(reference.size)]))
    ad.AnnData(sp.csr_matrix(counts[reference]), obs=ref_obs, var=genes).write_h5ad(folder / "reference.h5ad")
    (folder / "small.json").write_text(json.dumps(SMALL))
    return {"query": folder / "query.h5ad", "reference": folder / "reference.h5ad", "config": folder / "small.json",
            "folder": folder}


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["run", *map(str, argv), *EPOCHS])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def job(files) -> pathlib.Path:
    """One job with every step: Scrublet, MAGIC and CellTypist-mode annotation from the reference, whose labels
    are obs['label'] (the query's own column of that name scores the clusters and the annotation)."""
    out = files["folder"] / "out"
    code = cli.main(["run", str(files["query"]), "--config", str(files["config"]), "--doublets", "scrublet",
                     "--impute", "magic", "--reference", str(files["reference"]), "--label-key", "label",
                     "--out", str(out), *EPOCHS])
    assert code == 0
    return out


def test_doublet_filter_scores_every_cell_and_fits_the_others(files, job):
    result = ad.read_h5ad(job / "result.h5ad")
    query = ad.read_h5ad(files["query"])
    assert list(result.obs_names) == list(query.obs_names), "every input cell, in order"
    # The call is dbx.pp.scrublet's on the same counts with the job's key.
    expected = query.copy()
    pp.scrublet(expected, key=jr.fold_in(jr.key(SEED), 15))
    np.testing.assert_array_equal(result.obs["doublet_score"], expected.obs["doublet_score"])
    np.testing.assert_array_equal(result.obs["predicted_doublet"], expected.obs["predicted_doublet"])
    called = np.asarray(result.obs["predicted_doublet"], dtype=bool)
    assert 0 < called.sum() < called.size
    truth = np.asarray(result.obs["doublet"], dtype=bool)
    assert truth[called].mean() > 2 * truth.mean(), "the called cells are enriched in the simulated doublets"
    # The pipeline's results exist for the kept cells only; the left-out cells' are missing.
    latent = result.obsm["X_diffbio"]
    assert np.isfinite(latent[~called]).all() and np.isnan(latent[called]).all()
    assert np.all(np.abs(latent[~called]).sum(axis=1) > 0), "the earlier run's latent is replaced"
    assert result.obs["diffbio_cluster"].isna().to_numpy().tolist() == called.tolist()
    assert np.isnan(result.layers["diffbio_normalized"][called]).all()
    assert result.uns["scrublet"]["threshold_method"] in ("minimum", "otsu")
    report = (job / "report.md").read_text()
    rate = f"{called.sum()} called doublets ({100 * called.mean():.1f} %)"
    assert "## Doublets" in report and rate in report, report
    table = report.split("## Doublets")[1].split("## ")[0]
    counts = [int(line.split("|")[2]) for line in table.splitlines() if line.startswith("| 0.")]
    assert len(counts) == 10 and sum(counts) == called.size, "the histogram counts every cell once"
    assert (job / "doublets.png").stat().st_size > 0 and "doublet filter (scrublet)" in report


def test_magic_layer_of_the_kept_cells(files, job):
    result = ad.read_h5ad(job / "result.h5ad")
    kept = ~np.asarray(result.obs["predicted_doublet"], dtype=bool)
    expected = ad.read_h5ad(files["query"])[kept].copy()
    magic = pp.magic(expected, key=jr.fold_in(jr.key(SEED), 16))
    np.testing.assert_allclose(result.layers["magic"][kept], expected.layers["magic"], rtol=1e-6)
    assert np.isnan(result.layers["magic"][~kept]).all()
    assert result.uns["diffbio_magic"]["t"] == magic.t
    # The counts the VAE models are untouched: X is the input's.
    assert abs(sp.csr_matrix(result.X) - sp.csr_matrix(ad.read_h5ad(files["query"]).X)).sum() == 0
    assert "## Imputation" in (job / "report.md").read_text()


def test_annotation_from_the_reference(files, job):
    result = ad.read_h5ad(job / "result.h5ad")
    kept = ~np.asarray(result.obs["predicted_doublet"], dtype=bool)
    expected = ad.read_h5ad(files["query"])[kept].copy()
    tl.annotate(expected, "celltypist", reference=ad.read_h5ad(files["reference"]), label_key="label",
                key=jr.fold_in(jr.key(SEED), 18))
    predicted = result.obs["cell_type"]
    assert predicted.isna().to_numpy().tolist() == (~kept).tolist()
    assert predicted[kept].astype(str).tolist() == expected.obs["cell_type"].astype(str).tolist()
    np.testing.assert_allclose(result.obs["cell_type_confidence"][kept], expected.obs["cell_type_confidence"])
    singlets = kept & ~np.asarray(result.obs["doublet"], dtype=bool)
    true_types = ad.read_h5ad(files["query"]).obs["group"].astype(str).to_numpy()
    accuracy = np.mean(np.asarray(predicted[singlets].astype(str)) == true_types[singlets])
    assert accuracy >= 0.9, accuracy
    report = (job / "report.md").read_text()
    assert "## Annotation" in report
    assert f"Agreement with the input's own labels (the share of labelled cells given their label): " \
           f"{accuracy:.3f}." in report, "the query's labels (its singlets) score the annotation"
    assert "ARI (clusters vs labels)" in report
    n_reference = ad.read_h5ad(files["reference"]).n_obs
    assert f"Mode celltypist from a reference of {n_reference} cells labelled by obs['label']" in report


# --- bad input: a clear error naming the flag, before any numerical work, nothing written -------------------------
@pytest.fixture
def no_numerical_work(monkeypatch):
    """Make the steps and the training fail loudly if the job reaches them."""
    from diffbio_eqx import _job

    def refuse(*args, **kwargs):
        raise AssertionError("numerical work started before the bad input was refused")

    monkeypatch.setattr(_job, "_steps_before", refuse)
    monkeypatch.setattr(_job, "_train", refuse)


@pytest.mark.parametrize(("flags", "message"), [
    (["--doublets", "doubletfinder"], "--doublets: must be one of scrublet, solo, none, got 'doubletfinder'"),
    (["--impute", "knn"], "--impute: must be one of magic, none, got 'knn'"),
    (["--reference", "{reference}"], "--label-key: --reference needs the reference's obs column of cell types"),
    (["--reference", "{reference}", "--label-key", "group"], "--label-key: 'group' is not a column of the "
                                                              "reference's obs"),
    (["--reference", "{reference}", "--label-key", "label", "--annotation-mode", "svm"],
     "--annotation-mode: must be one of celltypist, cellassign, scanvi, got 'svm'"),
    (["--reference", "{folder}/missing.h5ad", "--label-key", "label"], "--reference: "),
    (["--annotation-mode", "scanvi"], "--annotation-mode: 'scanvi' needs --reference and --label-key"),
    (["--reference", "{reference}", "--label-key", "label", "--annotation-mode", "cellassign"],
     "--markers: annotation mode 'cellassign' needs marker genes"),
    (["--reference", "{reference}", "--label-key", "label", "--markers", "{folder}/markers.json"],
     "--markers: only for --annotation-mode cellassign"),
    (["--config", "{folder}/bad_config.json"], "doublet_filter: must be 'scrublet', 'solo' or 'none', got 'scrubble'"),
    (["--reference", "{folder}/other_genes.h5ad", "--label-key", "label"], "--reference: none of its 60 genes is "
                                                                            "among the input's 60"),
    (["--reference", "{folder}/log_reference.h5ad", "--label-key", "label"], "--reference: adata.X: holds "
                                                                              "non-integer values"),
])
def test_bad_step_settings_are_refused_naming_the_flag(capsys, files, tmp_path, no_numerical_work, flags, message):
    folder = files["folder"]
    if not (folder / "bad_config.json").exists():
        (folder / "bad_config.json").write_text(json.dumps({**SMALL, "doublet_filter": "scrubble"}))
        (folder / "markers.json").write_text(json.dumps({"t0": ["gene0"], "t1": ["gene1"]}))
        other = ad.read_h5ad(files["reference"])
        other.var_names = [f"other{j}" for j in range(other.n_vars)]
        other.write_h5ad(folder / "other_genes.h5ad")
        logged = ad.read_h5ad(files["reference"])
        logged.X = sp.csr_matrix(np.log1p(sp.csr_matrix(logged.X).toarray()))
        logged.write_h5ad(folder / "log_reference.h5ad")
    flags = [flag.format(reference=files["reference"], folder=folder) for flag in flags]
    code, err = _run(capsys, files["query"], *flags, "--out", tmp_path / "out")
    assert code == 2, err
    assert err.startswith("diffbio-eqx: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists(), "nothing is written"


# --- Solo, and the result of a chunked (streamed) run, at the level of the steps ----------------------------------
@pytest.mark.slow  # trains a VAE and Solo's classifier (make test-slow)
def test_solo_call_is_the_faces_and_reports_its_histogram(files, tmp_path):
    query = ad.read_h5ad(files["query"])
    call = call_doublets("solo", query.X, tuple(query.var_names), query.obs_names, None, seed=SEED, vae_epochs=2,
                         solo_epochs=3, progress=False)
    assert call is not None
    expected = query.copy()
    pp.solo(expected, key=jr.fold_in(jr.key(SEED), 15), vae_settings=TrainSettings(n_epochs=2, progress=False),
            settings=TrainSettings(n_epochs=3, progress=False))
    np.testing.assert_array_equal(call.score, expected.obs["doublet_score"])
    np.testing.assert_array_equal(call.called, call.score > 0.5)
    assert call.scores_sim.shape == (2 * N_QUERY,)
    done = StepsDone()
    files_written = filter_doublets(call, done, tmp_path)
    assert files_written["doublets"].stat().st_size > 0
    section = "\n".join(done.sections)
    assert f"Solo (as scvi-tools SOLO) on all {N_QUERY} input cells: **{int(call.called.sum())} called" in section
    assert "threshold 0.5 (SOLO.predict(soft=False): doublet probability above it)" in section
    assert done.metrics["doublet rate called"] == pytest.approx(call.called.mean())


def test_streamed_layers_are_written_at_every_input_cells_rows(tmp_path):
    """A chunked run's layers (blocks of the kept cells' rows) land on the kept cells' rows of the full file; the
    cells left out get NaN rows."""
    called = np.array([False, True, False, False, True, True, False, False])
    call = DoubletCall("scrublet", np.zeros(8), called, np.zeros(4), {"": 0.5}, "user", "scrublet", {}, 0.0,
                       ad.AnnData(np.zeros((8, 1), np.float32)))
    done = StepsDone(doublets=call)
    kept_values = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)

    def stream():
        yield 0, {"diffbio_normalized": kept_values[:3]}
        yield 3, {"diffbio_normalized": kept_values[3:]}

    full = np.zeros((8, 3), np.float32)
    for start, chunk in done.expand_stream(stream)():
        block = chunk["diffbio_normalized"]
        full[start:start + block.shape[0]] = block
    np.testing.assert_array_equal(full[~called], kept_values)
    assert np.isnan(full[called]).all()


def test_scrublet_within_batches_and_its_histogram(files, tmp_path):
    query = ad.read_h5ad(files["query"])
    batches = np.where(np.arange(query.n_obs) % 2 == 0, "a", "b").astype(object)
    call = call_doublets("scrublet", query.X, tuple(query.var_names), query.obs_names, batches, seed=SEED,
                         vae_epochs=None, solo_epochs=None, progress=False)
    assert call is not None
    expected = query.copy()
    expected.obs["batch"] = batches
    pp.scrublet(expected, key=jr.fold_in(jr.key(SEED), 15), batch_key="batch")
    np.testing.assert_array_equal(call.score, expected.obs["doublet_score"])
    assert set(call.thresholds) == {"a", "b"}
    done = StepsDone()
    assert filter_doublets(call, done, tmp_path)["doublets"].stat().st_size > 0
    assert "threshold a: " in "\n".join(done.sections)


@pytest.fixture
def seen(monkeypatch) -> dict:
    """`tl.annotate` replaced by a stand-in that records what the step passes it (the wiring; the annotators
    themselves are tested in test_annotation.py, and too slow to train here)."""
    from diffbio_eqx import _job_steps

    record: dict = {}

    def fake_annotate(cells, mode, *, reference, label_key, key, **options):
        record.update(mode=mode, reference=reference, label_key=label_key, **options)
        cells.obs["cell_type"] = pd.Categorical(["t0"] * cells.n_obs)
        cells.obs["cell_type_confidence"] = np.ones(cells.n_obs)
        cells.obsm["cell_type_probabilities"] = np.ones((cells.n_obs, 1))
        cells.uns["cell_type"] = {"cell_types": ["t0"]}

    monkeypatch.setattr(_job_steps.tl, "annotate", fake_annotate)
    return record


def test_cellassign_reads_its_markers_file(files, tmp_path, seen):
    """`--annotation-mode cellassign --markers FILE` (no reference): the markers reach `tl.annotate`, from JSON or
    from a CSV of 0/1 (marker genes x cell types)."""
    markers = {"t0": ["gene1", "gene2"], "t1": ["gene3"]}
    (tmp_path / "markers.json").write_text(json.dumps(markers))
    matrix = pd.DataFrame([[1, 0], [1, 0], [0, 1]], index=pd.Index(["gene1", "gene2", "gene3"]),
                          columns=pd.Index(["t0", "t1"]))
    matrix.to_csv(tmp_path / "markers.csv")
    cells = ad.read_h5ad(files["query"])
    for path in (tmp_path / "markers.json", tmp_path / "markers.csv"):
        annotator = check_steps(JobSteps(annotation_mode="cellassign", markers=path), None)
        assert annotator is not None and annotator.reference is None
        done = StepsDone()
        annotate(annotator, cells, cells.X, tuple(cells.var_names), done, labels=None, known=None, seed=SEED,
                 vae_epochs=None, progress=False)
        assert seen["mode"] == "cellassign" and seen["reference"] is None
        given = seen["markers"]
        assert given == markers if path.suffix == ".json" else given.equals(matrix)
        assert "Mode cellassign from marker genes (CellAssign)" in "\n".join(done.sections)


def test_scanvi_mode_trains_its_vae_for_the_jobs_epochs(files, seen):
    """The wiring of `--annotation-mode scanvi`: the reference and its label key reach `tl.annotate`, and its VAE
    trains for the job's VAE epochs."""
    annotator = check_steps(JobSteps(reference=files["reference"], annotation_mode="scanvi"), "label")
    assert annotator is not None
    cells = ad.read_h5ad(files["query"])
    done = StepsDone()
    annotate(annotator, cells, cells.X, tuple(cells.var_names), done, labels=None, known=None, seed=SEED,
             vae_epochs=7, progress=False)
    assert seen["mode"] == "scanvi" and seen["label_key"] == "label"
    assert seen["reference"].n_obs == ad.read_h5ad(files["reference"]).n_obs
    assert seen["vae_settings"].n_epochs == 7
    assert "Mode scanvi from a reference" in "\n".join(done.sections)


def test_run_help_lists_the_step_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--doublets", "--solo-epochs", "--impute", "--reference", "--annotation-mode", "--markers"):
        assert flag in out
