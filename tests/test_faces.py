"""The scanpy-style faces `dbx.pp`, `dbx.tl`, `dbx.pl` over AnnData: keys written (and nothing else), settings in
`uns`, the returned module equal to the array API's on the same input and key, the input file untouched, errors
naming the field."""

import hashlib
import warnings
from collections.abc import Mapping

import anndata as ad
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import log_normalized_pca, tree_allclose, tree_identical

import diffbio_eqx as dx


QUICK = dx.TrainSettings(n_epochs=2, progress=False)


@pytest.fixture(scope="module")
def simulated():
    sim = dx.simulate(jr.key(0), n_cells=160, n_genes=40, n_groups=3, n_batches=2, contamination=0.05)
    return np.asarray(sim.counts), np.asarray(sim.batches), np.asarray(sim.groups)


def _adata(simulated) -> ad.AnnData:
    counts, batches, groups = simulated
    adata = ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame({"batch": [f"b{b}" for b in batches], "group": pd.Categorical([f"g{g}" for g in groups]),
                          "score": np.linspace(0.0, 1.0, len(groups))},
                         index=[f"cell{i}" for i in range(len(groups))]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(counts.shape[1])]),
    )
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = log_normalized_pca(counts, 8).astype(np.float32)
    return adata


def _same(a, b) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys() and all(
            _same(a[name], b[name]) for name in a)
    if sp.issparse(a) or sp.issparse(b):
        return sp.issparse(a) and sp.issparse(b) and a.shape == b.shape and (a != b).nnz == 0
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _written(before: ad.AnnData, after: ad.AnnData) -> set[str]:
    """What `after` added, changed or removed relative to `before`, as `"slot[key]"` (or `"X"`)."""
    assert before.obs_names.equals(after.obs_names) and before.var_names.equals(after.var_names)
    changed = set() if _same(before.X, after.X) else {"X"}
    for slot in ("obs", "var"):
        old, new = getattr(before, slot), getattr(after, slot)
        changed |= {f"{slot}[{name!r}]" for name in set(old.columns) | set(new.columns)
                    if name not in old or name not in new or not old[name].equals(new[name])}
    for slot in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        old, new = getattr(before, slot), getattr(after, slot)
        changed |= {f"{slot}[{name!r}]" for name in set(old.keys()) | set(new.keys())
                    if name not in old or name not in new or not _same(old[name], new[name])}
    return changed


def test_neighbors_writes_scanpy_keys_equal_to_scanpy(simulated):
    adata = _adata(simulated)
    before = adata.copy()
    graph = dx.pp.neighbors(adata, n_neighbors=10)
    assert _written(before, adata) == {"obsp['distances']", "obsp['connectivities']", "uns['neighbors']"}
    assert tree_identical(graph, dx.neighbor_graph(adata.obsm["X_pca"], 10))
    assert adata.uns["neighbors"]["params"]["use_rep"] == "X_pca"
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 10
    assert adata.uns["neighbors"]["connectivities_key"] == "connectivities"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import scanpy as sc

        reference = adata.copy()
        sc.pp.neighbors(reference, n_neighbors=10, use_rep="X_pca")
    for name in ("connectivities", "distances"):
        ours, theirs = adata.obsp[name], reference.obsp[name]
        assert sp.issparse(ours) and ours.shape == (160, 160)
        assert abs(ours - theirs).max() <= 5e-5, name
    dx.pp.neighbors(adata, n_neighbors=5, use_rep="X", key_added="counts_graph")
    assert {"counts_graph_distances", "counts_graph_connectivities"} <= set(adata.obsp.keys())
    assert adata.uns["counts_graph"]["params"]["use_rep"] == "X"
    with pytest.raises(ValueError, match="use_rep: 'X_missing'"):
        dx.pp.neighbors(adata, use_rep="X_missing")
    with pytest.raises(ValueError, match="use_rep: none of"):
        dx.pp.neighbors(ad.AnnData(np.ones((5, 51), np.float32)))


def test_neighbors_reads_n_pcs_and_a_small_x_as_scanpy(simulated):
    # scanpy's pp.neighbors takes n_pcs (the first columns of the representation; ours refused the keyword) and,
    # with no representation stored and at most 50 genes, reads X itself (ours raised); tl.umap reads both back
    import scanpy as sc

    adata = _adata(simulated)
    small = ad.AnnData(adata.X.copy())  # 40 genes, nothing in obsm
    for ours, kwargs in ((adata, {"n_pcs": 5, "use_rep": "X_pca"}), (small, {})):
        theirs = ours.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.neighbors(theirs, n_neighbors=10, **kwargs)
        dx.pp.neighbors(ours, 10, **kwargs)
        for name in ("connectivities", "distances"):
            assert abs(ours.obsp[name] - theirs.obsp[name]).max() <= 5e-5, name
        assert ours.uns["neighbors"]["params"].get("n_pcs") == theirs.uns["neighbors"]["params"].get("n_pcs")
    assert small.uns["neighbors"]["params"]["use_rep"] == "X"
    umap = dx.tl.umap(adata, key=jr.key(5), settings=QUICK)
    assert umap.encoder.layers[0].weight.shape[1] == 5
    with pytest.raises(ValueError, match="n_pcs: 9, but adata.obsm\\['X_pca'\\] has 8 columns"):
        dx.pp.neighbors(adata, 10, 9)


def test_ambient_removal_equals_the_array_api(simulated):
    adata = _adata(simulated)
    before = adata.copy()
    profile = pd.Series(np.linspace(1.0, 2.0, 40), index=adata.var_names)[::-1]  # by name, in another order
    model = dx.pp.ambient_removal(adata, layer="counts", ambient_profile=profile, key=jr.key(1), settings=QUICK)
    init_key, fit_key = jr.split(jr.key(1))
    counts, values = adata.layers["counts"], profile.reindex(adata.var_names).to_numpy()
    stage = dx.AmbientRemoval(40, key=init_key)
    fitted = dx.fit_ambient_removal(stage, counts, values, key=fit_key, settings=QUICK)
    assert tree_allclose(model, fitted.model)
    expected = dx.remove_ambient(fitted.model, counts, values).decontaminated_counts
    np.testing.assert_allclose(adata.layers["diffbio_decontaminated"], expected, rtol=1e-5, atol=1e-5)
    assert adata.uns["diffbio_ambient"]["params"]["layer"] == "counts"
    assert adata.uns["diffbio_ambient"]["params"]["settings"]["n_epochs"] == 2
    assert adata.uns["diffbio_ambient"]["train_loss"].shape == (2,)
    assert _written(before, adata) == {"layers['diffbio_decontaminated']", "uns['diffbio_ambient']"}
    written = adata.copy()
    with pytest.raises(ValueError, match="layer: 'raw'"):
        dx.pp.ambient_removal(adata, layer="raw", key=jr.key(1))
    with pytest.raises(ValueError, match=r"^ambient_profile.index: 1 of adata's 40 genes are missing, first "
                                         r"\['gene39'\]"):
        dx.pp.ambient_removal(adata, ambient_profile=profile.iloc[1:], key=jr.key(1))
    with pytest.raises(ValueError, match=r"^n_epochs: fit_ambient_removal takes the training loop's settings as "
                                         r"settings=TrainSettings\(n_epochs=...\)"):
        dx.pp.ambient_removal(adata, key=jr.key(1), n_epochs=2)
    assert not _written(written, adata)  # refused calls write nothing


def test_ambient_removal_matches_raw_droplets_by_gene_name(simulated):
    adata = _adata(simulated)
    counts = adata.X
    profile = np.linspace(1.0, 2.0, 41)[:40] / np.linspace(1.0, 2.0, 41)[:40].sum()
    sizes = np.exp(np.random.default_rng(0).normal(np.log(20.0), 0.5, 600))
    empties = np.random.default_rng(1).poisson(sizes[:, None] * profile[None, :]).astype(np.float32)
    raw = sp.csr_matrix(sp.vstack([counts, sp.csr_matrix(empties)]))
    # The droplets name their genes in another order, with one more gene the cells lack.
    order = np.arange(40)[::-1]
    droplets = ad.AnnData(sp.hstack([raw[:, order], sp.csr_matrix(np.ones((raw.shape[0], 1), np.float32))]).tocsr(),
                          var=pd.DataFrame(index=[*adata.var_names[order], "extra"]))
    model = dx.pp.ambient_removal(adata, ambient_profile=profile, raw_counts=droplets, key=jr.key(9), settings=QUICK)
    init_key, fit_key = jr.split(jr.key(9))
    stage = dx.AmbientRemoval(40, key=init_key)
    fitted = dx.fit_ambient_removal(stage, counts, profile, key=fit_key, raw_counts=raw, settings=QUICK)
    assert float(fitted.model.prior_ambient_count) > 0  # the droplets gave CellBender's prior
    assert tree_allclose(model, fitted.model)
    assert adata.uns["diffbio_ambient"]["params"]["profile"] == "given"
    with pytest.raises(ValueError, match=r"^raw_counts.var_names: 1 of adata's 40 genes are missing, first "
                                         r"\['gene39'\]"):
        dx.pp.ambient_removal(adata, raw_counts=droplets[:, 1:], key=jr.key(9), settings=QUICK)


def test_vae_equals_the_array_api_and_matches_genes_by_name(simulated):
    adata = _adata(simulated)
    before = adata.copy()
    model = dx.tl.vae(adata, batch_key="batch", key=jr.key(2), settings=QUICK)
    assert _written(before, adata) == {"obsm['X_diffbio']", "layers['diffbio_normalized']", "uns['diffbio_vae']"}
    init_key, fit_key = jr.split(jr.key(2))
    counts, batches = adata.X, simulated[1].astype(np.int32)
    vae = dx.VAENormalizer(40, 2, genes=list(adata.var_names), key=init_key)
    fitted = dx.fit_vae(vae, counts, batches, key=fit_key, settings=QUICK)
    assert tree_allclose(model, fitted.model)
    output = dx.vae_transform(fitted.model, counts, batches)
    np.testing.assert_allclose(adata.obsm["X_diffbio"], output.latent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.layers["diffbio_normalized"], output.normalized, rtol=1e-4, atol=1e-4)
    params = adata.uns["diffbio_vae"]["params"]
    assert params["batch_key"] == "batch" and params["batch_categories"] == ["b0", "b1"]
    assert params["settings"]["n_epochs"] == 2 and adata.uns["diffbio_vae"]["train_loss"].shape == (2,)
    # A model that names its genes in another order reads them by name.
    reversed_genes = dx.VAENormalizer(40, 2, genes=list(adata.var_names[::-1]), key=init_key)
    dx.tl.vae(adata, reversed_genes, batch_key="batch", key=jr.key(2), settings=QUICK)
    flipped = counts[:, ::-1]
    direct = dx.fit_vae(reversed_genes, flipped, batches, key=fit_key, settings=QUICK).model
    expected = dx.vae_transform(direct, flipped, batches)
    np.testing.assert_allclose(adata.obsm["X_diffbio"], expected.latent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.layers["diffbio_normalized"][:, ::-1], expected.normalized, rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="batch_key: 'donor'"):
        dx.tl.vae(adata, batch_key="donor", key=jr.key(2))
    with pytest.raises(ValueError, match=r"^batch_size: fit_vae takes the training loop's settings"):
        dx.tl.vae(adata, key=jr.key(2), batch_size=32)
    with pytest.raises(ValueError, match=r"^adata.var_names: 1 of the model's 41 genes are missing, first "
                                         r"\['CD3E'\]"):
        dx.tl.vae(adata, dx.VAENormalizer(41, 2, genes=[*adata.var_names, "CD3E"], key=init_key), key=jr.key(2))


def test_umap_trains_on_the_graph_scanpys_neighbors_built_without_use_rep(simulated):
    # scanpy records use_rep only when given: its graph is then of X up to 50 genes, else of X_pca; tl.umap refused
    import scanpy as sc

    small = _adata(simulated)  # 40 genes
    sc.pp.neighbors(small, n_neighbors=6)
    assert "use_rep" not in small.uns["neighbors"]["params"]
    dx.tl.umap(small, dx.ParametricUMAP(40, hidden_size=16, depth=2, key=jr.key(4)), key=jr.key(5), settings=QUICK)
    assert small.uns["diffbio_umap"]["params"]["use_rep"] == "X"
    assert small.uns["diffbio_umap"]["params"]["n_neighbors"] == 6

    wide = ad.AnnData(sp.hstack([small.X, small.X]).tocsr(), obs=small.obs, obsm={"X_pca": small.obsm["X_pca"]})
    sc.pp.neighbors(wide, n_neighbors=7)
    umap = dx.ParametricUMAP(8, hidden_size=16, depth=2, key=jr.key(4))
    dx.tl.umap(wide, umap, key=jr.key(5), settings=QUICK)
    assert wide.uns["diffbio_umap"]["params"]["use_rep"] == "X_pca"
    del wide.obsm["X_pca"]
    with pytest.raises(ValueError, match=r"records no use_rep, so it is scanpy's graph of obsm\['X_pca'\]"):
        dx.tl.umap(wide, umap, key=jr.key(5), settings=QUICK)


def test_harmony_umap_and_soft_kmeans_equal_the_array_api(simulated):
    adata = _adata(simulated)
    adata.obsm["X_diffbio"] = adata.obsm["X_pca"][:, :5]
    x = adata.obsm["X_diffbio"]
    labels = simulated[1].astype(np.int32)
    settings = dx.Harmony(n_clusters=4, max_iter_harmony=3)
    before = adata.copy()
    result = dx.tl.harmony(adata, "batch", settings, key=jr.key(3))
    assert _written(before, adata) == {"obsm['X_diffbio_corrected']", "uns['diffbio_harmony']"}
    assert tree_identical(result, settings.run(x, labels, key=jr.key(3)))
    np.testing.assert_array_equal(adata.obsm["X_diffbio_corrected"], np.asarray(result.z_corr, np.float32))
    assert adata.uns["diffbio_harmony"]["params"]["use_rep"] == "X_diffbio"
    assert adata.uns["diffbio_harmony"]["params"]["n_clusters"] == 4

    umap = dx.ParametricUMAP(5, hidden_size=16, depth=2, key=jr.key(4))
    before = adata.copy()
    model = dx.tl.umap(adata, umap, key=jr.key(5), settings=QUICK)
    assert _written(before, adata) == {"obsm['X_umap']", "uns['diffbio_umap']"}
    corrected = adata.obsm["X_diffbio_corrected"]
    wide = corrected.astype(np.float64)  # the encoder's dtype under the tests' x64
    fitted = dx.fit_umap(umap, wide, key=jr.split(jr.key(5))[1], settings=QUICK)
    assert tree_identical(model, fitted.model)
    np.testing.assert_array_equal(adata.obsm["X_umap"], np.asarray(fitted.model.embed(wide), np.float32))
    assert adata.uns["diffbio_umap"]["params"]["use_rep"] == "X_diffbio_corrected"
    assert adata.uns["diffbio_umap"]["params"]["settings"]["n_epochs"] == 2
    with pytest.raises(ValueError, match=r"^progress: fit_umap takes the training loop's settings"):
        dx.tl.umap(adata, umap, key=jr.key(5), progress=False)

    # As scanpy's tl.umap: the graph pp.neighbors described (its representation and n_neighbors), not the model's.
    dx.pp.neighbors(adata, 6, use_rep="X_diffbio")
    model = dx.tl.umap(adata, umap, key=jr.key(5), settings=QUICK)
    narrow = dx.ParametricUMAP(5, hidden_size=16, depth=2, n_neighbors=6, key=jr.key(4))
    fitted = dx.fit_umap(narrow, x.astype(np.float64), key=jr.split(jr.key(5))[1], settings=QUICK)
    np.testing.assert_array_equal(adata.obsm["X_umap"], np.asarray(fitted.model.embed(x.astype(np.float64)),
                                                                   np.float32))
    assert adata.uns["diffbio_umap"]["params"]["n_neighbors"] == 6
    assert adata.uns["diffbio_umap"]["params"]["use_rep"] == "X_diffbio"
    with pytest.raises(ValueError, match=r"^use_rep: 'X_diffbio_corrected', but adata.uns\['neighbors'\] is the "
                                         r"graph of 'X_diffbio'"):
        dx.tl.umap(adata, umap, use_rep="X_diffbio_corrected", key=jr.key(5), settings=QUICK)
    del adata.uns["neighbors"]

    before = adata.copy()
    clusters = dx.tl.soft_kmeans(adata, 3, key=jr.key(6), n_iter=20)
    assert _written(before, adata) == {"obs['diffbio_cluster']", "obsm['diffbio_cluster_probabilities']",
                                       "uns['diffbio_soft_kmeans']"}
    stage = dx.SoftKMeans(np.zeros((3, 5), np.float32))
    expected = dx.fit_soft_kmeans(stage, corrected, key=jr.key(6), n_iter=20).model
    assert tree_identical(clusters, expected)
    probabilities = np.asarray(expected(jnp.asarray(corrected)))
    np.testing.assert_allclose(adata.obsm["diffbio_cluster_probabilities"], probabilities, rtol=1e-6)
    assert isinstance(adata.obs["diffbio_cluster"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(adata.obs["diffbio_cluster"].astype(int), probabilities.argmax(axis=1))
    assert adata.uns["diffbio_soft_kmeans"]["params"]["n_clusters"] == 3
    with pytest.raises(ValueError, match="batch_key: 'donor'"):
        dx.tl.harmony(adata, "donor", key=jr.key(3))


def _read_only(adata: ad.AnnData) -> list[str]:
    """The arrays of `adata` (obsm, obsp, layers, uns, nested) that NumPy will not write into."""
    found = [f"{where}['{k}']" for where in ("obsm", "obsp", "layers") for k, v in getattr(adata, where).items()
             if not (v.data if sp.issparse(v) else np.asarray(v)).flags.writeable]

    def walk(d: Mapping, path: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{path}{k}.")
            elif isinstance(v, np.ndarray) and not v.flags.writeable:
                found.append(f"uns.{path}{k}")

    walk(adata.uns, "")
    return found


def test_faces_write_arrays_numpy_can_write_into(simulated):
    # np.asarray of a JAX array is a read-only view: scanpy's in-place functions and scib-metrics' KMeans (which
    # subtracts the mean in place) failed on obsm['X_archetypes'], ['X_diffmap'], ['fate_probabilities'] and the
    # arrays the faces keep in uns
    adata = _adata(simulated)
    dx.pp.neighbors(adata, use_rep="X_pca")
    dx.tl.diffmap(adata, key=jr.key(0))
    adata.uns["iroot"] = 0
    dx.tl.dpt(adata, key=jr.key(0))
    dx.tl.fate_probabilities(adata, terminal_states={"a": [0], "b": [1]})
    dx.tl.archetypes(adata, 3, key=jr.key(0), use_rep="X_pca")
    dx.tl.harmony(adata, "batch", dx.Harmony(n_clusters=4, max_iter_harmony=3), key=jr.key(3), use_rep="X_pca")
    assert {"X_diffmap", "fate_probabilities", "X_archetypes"} <= set(adata.obsm)
    assert _read_only(adata) == []


def test_pipeline_writes_what_fit_anndata_writes(simulated):
    adata = _adata(simulated)
    config = dx.SingleCellPipelineConfig(latent_dim=4, hidden_dims=(16,), umap_hidden_size=8, umap_depth=2,
                                         ambient_hidden_dim=8, ambient_latent_dim=2, batch_correction_clusters=4,
                                         batch_correction_iterations=2)
    epochs = dict(ambient_epochs=1, vae_epochs=2, umap_epochs=1, clustering_iterations=5, progress=False)
    profile = simulated[0].sum(axis=0) / simulated[0].sum()
    by_name = pd.Series(profile, index=adata.var_names)[::-1]  # matched to adata.var_names by name
    before = adata.copy()
    pipeline = dx.tl.pipeline(adata, batch_key="batch", key=jr.key(7), config=config, ambient_profile=by_name,
                              **epochs)
    assert _written(before, adata) == {
        "obsm['X_diffbio']", "obsm['X_diffbio_corrected']", "obsm['X_umap']", "obsm['diffbio_cluster_probabilities']",
        "layers['diffbio_normalized']", "layers['diffbio_decontaminated']", "obs['diffbio_cluster']",
        "uns['diffbio_pipeline']", "uns['diffbio_batch_categories']",
    }
    annotated, fitted = dx.fit_anndata(_adata(simulated), batch_key="batch", key=jr.key(7), config=config,
                                       ambient_profile=profile, **epochs)
    assert tree_identical(pipeline, fitted.pipeline)
    for name in ("X_diffbio", "X_diffbio_corrected", "X_umap", "diffbio_cluster_probabilities"):
        np.testing.assert_array_equal(adata.obsm[name], annotated.obsm[name])
    for name in ("diffbio_normalized", "diffbio_decontaminated"):
        np.testing.assert_array_equal(adata.layers[name], annotated.layers[name])
    assert adata.obs["diffbio_cluster"].equals(annotated.obs["diffbio_cluster"])
    assert adata.uns["diffbio_pipeline"]["params"]["batch_key"] == "batch"
    assert adata.uns["diffbio_pipeline"]["params"]["config"]["latent_dim"] == 4
    assert set(adata.uns["diffbio_pipeline"]["curves"]) == set(fitted.curves)
    with pytest.raises(ValueError, match="layer: 'raw'"):
        dx.tl.pipeline(adata, layer="raw", key=jr.key(7))


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_input_file_is_never_written(simulated, tmp_path):
    path = tmp_path / "input.h5ad"
    _adata(simulated).write_h5ad(path)
    before = _digest(path)
    adata = ad.read_h5ad(path)
    dx.pp.neighbors(adata, n_neighbors=8)
    dx.tl.soft_kmeans(adata, 3, use_rep="X_pca", key=jr.key(8), n_iter=5)
    dx.pl.umap(adata, color="group", basis="X_pca", path=tmp_path / "pca.png")
    assert _digest(path) == before
    adata.write_h5ad(tmp_path / "output.h5ad")  # everything the faces wrote can be saved
    saved = ad.read_h5ad(tmp_path / "output.h5ad")
    assert saved.uns["neighbors"]["params"]["n_neighbors"] == 8
    assert saved.uns["diffbio_soft_kmeans"]["params"]["use_rep"] == "X_pca"


def test_plots(simulated, tmp_path):
    import matplotlib.pyplot as plt

    adata = _adata(simulated)
    adata.obsm["X_umap"] = adata.obsm["X_pca"][:, :2]
    for color in ("group", "score", "gene3", None):
        written = dx.pl.umap(adata, color=color, path=tmp_path / f"{color}.png")
        assert written.stat().st_size > 0
    figure, axes = plt.subplots(1, 2)
    assert dx.pl.umap(adata, color="batch", ax=axes[0]) is axes[0]
    plt.close(figure)
    curves = {"vae": {"train": np.linspace(3, 1, 5), "validation": np.full(5, np.nan)}}
    assert dx.pl.training(curves, path=tmp_path / "training.png").stat().st_size > 0
    plt.close(dx.pl.training(curves))
    with pytest.raises(ValueError, match="color: 'celltype'"):
        dx.pl.umap(adata, color="celltype")
    with pytest.raises(ValueError, match="basis: 'X_tsne'"):
        dx.pl.umap(adata, basis="X_tsne")
