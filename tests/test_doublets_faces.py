"""dbx.pp.scrublet / dbx.pl.scrublet_histogram over AnnData: the keys scanpy writes, batches, and bad input that
writes nothing."""

import anndata as ad
import jax.random as jr
import numpy as np
import pytest
import skimage  # noqa: E402, F401  (scanpy.pp.scrublet needs it; test extra, never skipped)

from diffbio_eqx import pl, pp
from diffbio_eqx._simulate._doublets import simulate_doublets


@pytest.fixture(scope="module")
def adata():
    sim = simulate_doublets(jr.key(0), n_cells=600, n_genes=400, n_groups=4, doublet_rate=0.1)
    data = ad.AnnData(np.asarray(sim.counts, dtype=np.float32))
    data.obs["sample"] = np.repeat(["s1", "s2"], 300)
    data.obs["truth"] = np.asarray(sim.is_doublet)
    return data


def test_scrublet_face_writes_scanpys_keys(adata, tmp_path):
    data = adata.copy()
    pp.scrublet(data, key=jr.key(0))
    assert data.obs["doublet_score"].between(0, 1).all()
    assert data.obs["predicted_doublet"].dtype == bool
    record = data.uns["scrublet"]
    assert record["doublet_scores_sim"].shape == (1200,)
    assert record["doublet_parents"].shape == (1200, 2)
    assert set(record["doublet_parents"].ravel()) <= set(data.obs_names)
    assert record["parameters"]["n_neighbors"] == round(0.5 * np.sqrt(600))
    assert record["threshold_method"] in ("minimum", "otsu")
    np.testing.assert_array_equal(data.obs["predicted_doublet"], data.obs["doublet_score"] > record["threshold"])
    written = pl.scrublet_histogram(data, tmp_path / "hist.png")
    assert written.exists()


def test_scrublet_face_batches_and_threshold(adata, tmp_path):
    data = adata.copy()
    pp.scrublet(data, key=jr.key(0), batch_key="sample", threshold=0.25)
    record = data.uns["scrublet"]
    assert record["batched_by"] == "sample" and set(record["batches"]) == {"s1", "s2"}
    assert all(b["threshold"] == 0.25 and b["threshold_method"] == "user" for b in record["batches"].values())
    np.testing.assert_array_equal(data.obs["predicted_doublet"], data.obs["doublet_score"] > 0.25)
    assert pl.scrublet_histogram(data, tmp_path / "batches.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": 2.0}, "threshold"), ({"n_neighbors": 700}, "n_neighbors"), ({"batch_key": "nope"}, "batch_key")],
)
def test_scrublet_face_bad_input_writes_nothing(adata, kwargs, match):
    data = adata.copy()
    with pytest.raises(ValueError, match=match):
        pp.scrublet(data, key=jr.key(0), **kwargs)
    assert "doublet_score" not in data.obs and "scrublet" not in data.uns


def test_scrublet_face_refuses_a_one_cell_batch_and_empty_cells(adata):
    data = adata.copy()
    data.obs["sample"] = ["s1"] * 599 + ["s2"]
    with pytest.raises(ValueError, match="batch_key"):
        pp.scrublet(data, key=jr.key(0), batch_key="sample")
    empty = adata.copy()
    empty.X[5] = 0
    with pytest.raises(ValueError, match=r"adata.X: cells .*\[5\]"):
        pp.scrublet(empty, key=jr.key(0))
    assert "doublet_score" not in empty.obs and "doublet_score" not in data.obs
