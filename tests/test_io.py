import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from diffbio_eqx import io


def _adata(n_cells=6, n_genes=4, sparse=True):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (n_cells, n_genes)).astype(np.float32) + 1
    obs = pd.DataFrame({"sample": ["b", "a", "b", "c", "a", "b"][:n_cells]},
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, obs=obs)


def test_from_anndata_keeps_sparse_and_codes_batches():
    adata = _adata()
    before = adata.X.copy()
    arrays = io.from_anndata(adata, batch_key="sample")
    assert sp.issparse(arrays.counts)
    np.testing.assert_array_equal(arrays.counts.toarray(), adata.X.toarray())
    assert arrays.batch_categories == ("a", "b", "c")
    np.testing.assert_array_equal(arrays.batch_labels, [1, 0, 1, 2, 0, 1])
    assert arrays.n_batches == 3
    # A float32 CSR X may be shared rather than copied (issue 23: no copy of a canonical matrix); it is not modified.
    np.testing.assert_array_equal(adata.X.toarray(), before.toarray())


def test_from_anndata_reads_a_layer():
    adata = _adata(sparse=False)
    adata.layers["counts"] = adata.X * 2
    arrays = io.from_anndata(adata, layer="counts")
    np.testing.assert_array_equal(arrays.counts, adata.X * 2)
    assert arrays.batch_labels is None


def test_from_anndata_errors_name_the_field():
    adata = _adata()
    with pytest.raises(ValueError, match="batch_key: 'donor' is not a column of adata.obs"):
        io.from_anndata(adata, batch_key="donor")
    with pytest.raises(ValueError, match="layer: 'raw' is not in adata.layers"):
        io.from_anndata(adata, layer="raw")
    bad = _adata(sparse=False)
    bad.X[2, 1] = -1
    with pytest.raises(ValueError, match=r"adata.X: 1 negative value\(s\)"):
        io.from_anndata(bad)
    missing = _adata()
    missing.obs.loc["cell3", "sample"] = None
    with pytest.raises(ValueError, match=r"adata.obs\['sample'\]: missing value at cell 3"):
        io.from_anndata(missing, batch_key="sample")
    with pytest.raises(ValueError, match="adata: expected an anndata.AnnData"):
        io.from_anndata(np.ones((3, 3)))


def _result(n_cells=6, n_genes=4):
    rng = np.random.default_rng(1)
    assignments = rng.dirichlet(np.ones(3), n_cells)
    return {
        "latent": rng.normal(size=(n_cells, 5)),
        "corrected_embeddings": rng.normal(size=(n_cells, 5)),
        "embeddings_2d": rng.normal(size=(n_cells, 2)),
        "cluster_assignments": assignments,
        "normalized": rng.random((n_cells, n_genes)),
    }


def test_to_anndata_follows_scanpy_conventions():
    adata = _adata()
    result = _result()
    out = io.to_anndata(adata, result)
    assert "X_umap" not in adata.obsm  # the input is untouched
    np.testing.assert_allclose(out.obsm["X_diffbio"], result["latent"], rtol=1e-6)
    np.testing.assert_allclose(out.obsm["X_umap"], result["embeddings_2d"], rtol=1e-6)
    assert "X_diffbio_corrected" in out.obsm
    assert out.obs["diffbio_cluster"].dtype == "category"
    np.testing.assert_array_equal(out.obs["diffbio_cluster"].astype(int),
                                  np.argmax(result["cluster_assignments"], axis=1))
    assert out.layers["diffbio_normalized"].shape == adata.shape
    assert "diffbio_decontaminated" not in out.layers


def test_scanpy_umap_plot_works_on_the_result(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    out = io.to_anndata(_adata(), _result())
    figure = sc.pl.umap(out, color=["diffbio_cluster", "sample"], show=False, return_fig=True)
    figure.savefig(tmp_path / "umap.png")
    assert (tmp_path / "umap.png").stat().st_size > 1000


def test_to_anndata_rejects_mismatched_rows():
    with pytest.raises(ValueError, match=r"result\['latent'\]: expected 6 rows, got shape \(5, 2\)"):
        io.to_anndata(_adata(), {"latent": np.ones((5, 2))})
    # every result is checked before any is written: a bad layer leaves the caller's AnnData as it was
    adata = _adata()
    with pytest.raises(ValueError, match=r"result\['normalized'\]: expected 4 genes, got 3"):
        io.to_anndata(adata, {"latent": np.ones((6, 2)), "normalized": np.ones((6, 3))}, copy=False)
    assert "X_diffbio" not in adata.obsm


def test_write_is_atomic_and_never_overwrites_the_input(tmp_path):
    adata = _adata()
    source = tmp_path / "input.h5ad"
    adata.write_h5ad(source)
    before = source.read_bytes()
    loaded = io.read_h5ad(source)
    with pytest.raises(ValueError, match="is the input file"):
        io.write_h5ad(loaded, source, input_path=source)
    assert source.read_bytes() == before
    target = io.write_h5ad(io.to_anndata(loaded, _result()), tmp_path / "out.h5ad", input_path=source)
    assert io.read_h5ad(target).obsm["X_umap"].shape == (6, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.h5ad", "out.h5ad"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with io.atomic_path(tmp_path / "result.h5ad") as temporary:
            temporary.write_bytes(b"partial")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_unwritable_or_missing_output_folder(tmp_path):
    """Outputs that cannot be written fail with a clear message and leave everything as it was, for root too (CI
    runs as root, and root ignores permission bits, so the cases below are ones no user can write)."""
    with pytest.raises(ValueError, match="output: folder .* does not exist"):
        io.write_h5ad(_adata(), tmp_path / "nowhere" / "out.h5ad")
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"kept")
    with pytest.raises(ValueError, match="output: folder .*a_file' does not exist"):  # its parent is a file
        io.write_h5ad(_adata(), a_file / "out.h5ad")
    folder = tmp_path / "out.h5ad"  # the target is a folder: no file can be renamed over it
    folder.mkdir()
    (folder / "inside").write_bytes(b"kept")
    with pytest.raises(ValueError, match="output: .*out.h5ad' is a folder; give the path of a file"):
        io.write_h5ad(_adata(), folder)
    assert a_file.read_bytes() == b"kept" and (folder / "inside").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "out.h5ad"]  # no temporary left behind
    # Permission bits: a read-only folder is refused by a user they bind; root may write there, and does.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            assert os.geteuid() == 0, "a writable 0o500 folder for a user other than root"
            assert io.write_h5ad(_adata(), locked / "out.h5ad").is_file()
        else:
            with pytest.raises(ValueError, match="output: folder .* is not writable"):
                io.write_h5ad(_adata(), locked / "out.h5ad")
    finally:
        locked.chmod(0o700)


def test_corrupt_or_missing_input(tmp_path):
    truncated = tmp_path / "truncated.h5ad"
    _adata().write_h5ad(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not be read as an h5ad file"):
        io.read_h5ad(truncated)
    with pytest.raises(ValueError, match="does not exist"):
        io.read_h5ad(tmp_path / "absent.h5ad")


def test_from_anndata_matches_genes_by_name():
    adata = _adata(n_genes=4)
    adata.var_names = ["g0", "g1", "g2", "g3"]
    arrays = io.from_anndata(adata, genes=["g2", "g0", "g3", "g1"])
    np.testing.assert_array_equal(arrays.counts.toarray(), adata.X.toarray()[:, [2, 0, 3, 1]])
    assert arrays.genes == ("g2", "g0", "g3", "g1")
    assert io.from_anndata(adata, genes=["g0", "g1", "g2", "g3"]).columns is None
    subset = io.from_anndata(adata, genes=["g3", "g1"])
    np.testing.assert_array_equal(subset.counts.toarray(), adata.X.toarray()[:, [3, 1]])
    with pytest.raises(ValueError, match=r"^adata.var_names: 2 of the pipeline's 5 genes are missing, first "
                                         r"\['CD3E', 'MS4A1'\]"):
        io.from_anndata(adata, genes=["g0", "CD3E", "g1", "MS4A1", "g2"])
    adata.var_names = ["g0", "g1", "g1", "g3"]
    with pytest.raises(ValueError, match=r"^adata.var_names: to match genes by name they must be unique; 1 "
                                         r"repeated, e.g. \['g1'\]"):
        io.from_anndata(adata, genes=["g0", "g1"])


@pytest.fixture(scope="module")
def trained_on_anndata():
    import jax.random as jr

    import diffbio_eqx as dbx

    sim = dbx.simulate(jr.key(0), n_cells=120, n_genes=30, n_groups=3, n_batches=2)
    adata = ad.AnnData(sp.csr_matrix(np.asarray(sim.counts, np.float32)),
                       obs=pd.DataFrame({"batch": np.where(np.asarray(sim.batches) == 0, "a", "b")},
                                        index=[f"cell{i}" for i in range(120)]),
                       var=pd.DataFrame(index=[f"gene{j}" for j in range(30)]))
    config = dbx.SingleCellPipelineConfig(n_clusters=3, latent_dim=4, hidden_dims=(16,), umap_hidden_size=8,
                                          umap_depth=1, ambient_hidden_dim=8, ambient_latent_dim=2,
                                          batch_correction_clusters=3, batch_correction_iterations=2)
    profile = np.asarray(sim.ambient_profile)
    _, fitted = dbx.fit_anndata(adata, batch_key="batch", key=jr.key(1), config=config, ambient_profile=profile,
                                ambient_epochs=2, vae_epochs=2, umap_epochs=1, progress=False)
    return adata, profile, fitted.pipeline


def test_a_trained_pipeline_matches_new_data_by_gene_name(trained_on_anndata):
    import jax.random as jr

    import diffbio_eqx as dbx

    adata, profile, pipeline = trained_on_anndata
    assert pipeline.genes == tuple(adata.var_names)
    order = np.random.default_rng(0).permutation(adata.n_vars)
    shuffled = adata[:, order].copy()
    same = dbx.run_anndata(pipeline, adata, batch_key="batch", ambient_profile=profile, key=jr.key(2))
    moved = dbx.run_anndata(pipeline, shuffled, batch_key="batch", ambient_profile=profile[order], key=jr.key(2))
    assert "X_umap" not in shuffled.obsm  # the input is untouched
    assert list(moved.var_names) == list(pipeline.genes)
    for name in same.obsm:
        assert same.obsm[name].tobytes() == moved.obsm[name].tobytes(), name
    for name in io.layer_names(same):
        assert same.layers[name].tobytes() == moved.layers[name].tobytes(), name
    missing = adata[:, [j for j in range(adata.n_vars) if j != 7]].copy()
    with pytest.raises(ValueError, match=r"^adata.var_names: 1 of the pipeline's 30 genes are missing, first "
                                         r"\['gene7'\]"):
        dbx.run_anndata(pipeline, missing, batch_key="batch", key=jr.key(2))


def test_new_cells_are_coded_by_their_batch_names_as_in_training(trained_on_anndata, tmp_path):
    """A query holding batch "b" alone gets b's training code (its own categories would make it 0, batch "a"),
    a batch the pipeline never saw is refused, fewer cells than clusters are assigned, and a saved pipeline
    keeps its batch names."""
    import jax.random as jr

    import diffbio_eqx as dbx

    adata, profile, pipeline = trained_on_anndata
    assert pipeline.batches == ("a", "b")
    whole = dbx.run_anndata(pipeline, adata, batch_key="batch", ambient_profile=profile, key=jr.key(2))
    in_b = np.flatnonzero(adata.obs["batch"].to_numpy() == "b")[:2]  # two cells: fewer than the 3 clusters
    query = adata[in_b].copy()
    assert list(query.obs["batch"].astype("category").cat.categories) == ["b"]
    alone = dbx.run_anndata(pipeline, query, batch_key="batch", ambient_profile=profile, key=jr.key(2))
    np.testing.assert_allclose(alone.obsm["X_diffbio_corrected"], whole.obsm["X_diffbio_corrected"][in_b],
                               rtol=1e-4, atol=1e-5)
    assert alone.uns["diffbio_batch_categories"] == ["a", "b"]
    query.obs["batch"] = "c"
    with pytest.raises(ValueError, match=r"^batch_key: adata.obs\['batch'\] holds batches the pipeline was not "
                                         r"trained on \(\['c'\]; trained on \['a', 'b'\]\)"):
        dbx.run_anndata(pipeline, query, batch_key="batch", key=jr.key(2))
    assert dbx.load_pipeline(dbx.save_pipeline(tmp_path / "p.eqx", pipeline)).batches == ("a", "b")


def test_where_the_counts_are():
    """`counts_matrix` reads X, a layer or .raw; `count_sources` lists the layers (layers["counts"] first) and .raw
    that hold whole numbers; `not_counts` names them for a matrix of non-integer values."""
    adata = _adata()
    counts = adata.X.copy()
    adata.layers["scaled"] = counts * 0.5
    adata.layers["umi"] = counts.copy()
    adata.layers["counts"] = counts.copy()
    adata.X = counts * 0.1
    adata.raw = ad.AnnData(counts.copy(), var=adata.var)
    assert io.count_sources(adata) == [("adata.layers['counts']", {"layer": "counts"}),
                                       ("adata.layers['umi']", {"layer": "umi"}), ("adata.raw", {"use_raw": True})]
    assert io.not_counts(adata, layer="umi") is None and io.not_counts(adata, use_raw=True) is None
    message = io.not_counts(adata, layer="scaled", flags=True)
    assert message is not None and message.startswith("adata.layers['scaled']: holds non-integer values (largest ")
    assert message.endswith("counts are in adata.layers['counts'] (--layer counts) and adata.layers['umi'] "
                            "(--layer umi) and adata.raw (--use-raw)")
    assert io.counts_matrix(adata, use_raw=True)[1:] == ("adata.raw.X", adata.raw.var_names)
    with pytest.raises(ValueError, match=r"^layer: 'umi' and use_raw=True both name where the counts are"):
        io.counts_matrix(adata, layer="umi", use_raw=True)
    with pytest.raises(ValueError, match=r"^use_raw: adata.raw is not set"):
        io.counts_matrix(_adata(), use_raw=True)
