"""Ligand-receptor scoring against LIANA (CellPhoneDB and CellChat) on pbmc68k with LIANA's consensus resource."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import liana as li  # noqa: E402  (test extra: a missing reference fails, it does not skip)
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

import diffbio_eqx as dbx
from diffbio_eqx._communication._lr import chunk_labels, group_trimeans
from diffbio_eqx._communication._resource import index_resource
from diffbio_eqx._communication._stage import LigandReceptor, score_ligand_receptor
from diffbio_eqx._communication._table import ligand_receptor_table


KEYS = ["source", "target", "ligand_complex", "receptor_complex"]


@pytest.fixture(scope="module")
def pbmc():
    """pbmc68k with X log-normalised (log1p of counts per 10^4), the matrix LIANA scores."""
    adata = dbx.datasets.pbmc68k()
    counts = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(counts / adata.obs["n_counts"].to_numpy()[:, None] * 1e4).astype(np.float32))
    return adata


@pytest.fixture(scope="module")
def resource():
    return dbx.datasets.ligand_receptor_pairs()


def _liana(adata, method, n_perms, resource):
    copy = adata.copy()
    with warnings.catch_warnings():  # LIANA's CellChat writes X of a view (anndata's ImplicitModificationWarning)
        warnings.simplefilter("ignore")
        _run_liana(copy, method, n_perms, resource)
    return copy.uns["res"]


def _run_liana(copy, method, n_perms, resource):
    getattr(li.mt, method)(copy, groupby="bulk_labels", use_raw=False, n_perms=n_perms, verbose=False,
                           key_added="res", resource=resource)


def _liana_permutations(n_cells, n_perms, seed=1337):
    """The permutations LIANA draws (`_generate_perms_cube`: one `default_rng(seed).permutation` per round)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_cells) for _ in range(n_perms)])


@pytest.fixture(scope="module")
def cpdb(pbmc, resource):
    ref = _liana(pbmc, "cellphonedb", 1000, resource)
    same = ligand_receptor_table(pbmc.X, pbmc.var_names, pbmc.obs["bulk_labels"], resource,
                                 permutations=_liana_permutations(pbmc.n_obs, 1000))
    keyed = ligand_receptor_table(pbmc.X, pbmc.var_names, pbmc.obs["bulk_labels"], resource, key=jr.key(0))
    merged = ref.merge(same, on=KEYS, suffixes=("_liana", "")).merge(
        keyed[KEYS + ["pvalue"]].rename(columns={"pvalue": "pvalue_keyed"}), on=KEYS)
    return ref, same, merged


def test_resource_is_liana_consensus(resource):
    assert list(resource.columns) == ["ligand", "receptor"]
    pd.testing.assert_frame_equal(resource, li.rs.select_resource("consensus").reset_index(drop=True))


def test_cellphonedb_means_and_pvalues_match_liana(cpdb):
    ref, ours, merged = cpdb
    assert len(ours) == len(ref) == len(merged) > 1000  # the same interactions pass the filters
    np.testing.assert_allclose(merged["lr_means"], merged["lr_means_liana"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(merged["ligand_means"], merged["ligand_means_liana"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(merged["receptor_means"], merged["receptor_means_liana"], atol=1e-5, rtol=0)
    assert (merged["ligand"] == merged["ligand_liana"]).all() and (merged["receptor"] == merged["receptor_liana"]).all()
    # The same 1,000 permutations as LIANA: the p-values agree (to float32 rounding of ties).
    assert np.max(np.abs(merged["cellphone_pvals"] - merged["cellphone_pvals_liana"])) <= 0.02
    # Our own keyed permutations: independent Monte-Carlo draws, so calls agree, values within sampling error.
    agree = np.mean((merged["pvalue_keyed"] < 0.05) == (merged["cellphone_pvals_liana"] < 0.05))
    assert agree >= 0.95
    # Two independent estimates from 1,000 permutations differ by sd <= sqrt(2 * 0.25 / 1000) = 0.022.
    diff = np.abs(merged["pvalue_keyed"] - merged["cellphone_pvals_liana"])
    assert np.mean(diff <= 0.02) >= 0.9 and np.max(diff) <= 0.08


def test_cellchat_probabilities_match_liana(pbmc, resource):
    ref = _liana(pbmc, "cellchat", 100, resource)
    ours = ligand_receptor_table(pbmc.X, pbmc.var_names, pbmc.obs["bulk_labels"], resource, method="cellchat",
                                 permutations=_liana_permutations(pbmc.n_obs, 100))
    merged = ref.merge(ours, on=KEYS, suffixes=("_liana", ""))
    assert len(merged) == len(ref) == len(ours)
    assert spearmanr(merged["lr_probs"], merged["lr_probs_liana"]).statistic >= 0.95
    np.testing.assert_allclose(merged["lr_probs"], merged["lr_probs_liana"], atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(merged["cellchat_pvals"], merged["cellchat_pvals_liana"], atol=0.02)


def test_trimean_is_numpys(getkey):
    x = jnp.where(jr.uniform(getkey(), (97, 6)) > 0.5, jnp.round(jr.exponential(getkey(), (97, 6)), 2), 0.0)
    x = x.astype(jnp.float32)
    labels = jr.randint(getkey(), (97,), 0, 4)
    sizes = jnp.bincount(labels, length=4)
    ours = group_trimeans(x, labels, sizes)
    for g in range(4):
        block = np.asarray(x)[np.asarray(labels) == g]
        q = np.quantile(block, [0.25, 0.75], axis=0)
        np.testing.assert_allclose(ours[g], (q[0] + 2 * np.median(block, axis=0) + q[1]) / 4, rtol=1e-6, atol=1e-7)


def _toy(getkey, n_cells=60, n_groups=3):
    genes = ["A", "B", "C", "D", "E"]
    x = jnp.where(jr.uniform(getkey(), (n_cells, 5)) > 0.3, jr.exponential(getkey(), (n_cells, 5)), 0.0)
    labels = jnp.arange(n_cells) % n_groups
    table = pd.DataFrame({"ligand": ["A", "B_C", "E"], "receptor": ["D", "E", "A_B"]})
    return x, labels, index_resource(table, genes)


def test_soft_score_tends_to_hard_and_has_gradients(getkey):
    x, labels, index = _toy(getkey)
    hard_stage = LigandReceptor(index, 3, expr_prop=0.1)
    hard = hard_stage(x, labels)
    onehot = jax.nn.one_hot(labels, 3, dtype=x.dtype)
    # compiled once: the temperature is an array leaf (eager, every operation compiles on its own)
    soft_scores = eqx.filter_jit(lambda stage, x: stage.soft_scores(x, onehot))
    expected = np.where(np.asarray(hard.kept), np.asarray(hard.scores), 0)
    for t, tol in [(1e-2, 0.05), (1e-4, 1e-3)]:
        soft = soft_scores(eqx_tree_temperature(hard_stage, t), x)
        np.testing.assert_allclose(np.asarray(soft), expected, atol=tol)
    stage = eqx_tree_temperature(hard_stage, 0.1)

    @jax.jit
    def loss(x):
        return jnp.sum(stage.soft_scores(x, onehot) ** 2)

    v = np.asarray(jr.normal(getkey(), x.shape))
    v = v / np.linalg.norm(v)
    eps = 1e-3
    fd = (float(loss(np.asarray(x) + eps * v)) - float(loss(np.asarray(x) - eps * v))) / (2 * eps)
    np.testing.assert_allclose(np.vdot(np.asarray(jax.jit(jax.grad(loss))(x)), v), fd, rtol=1e-3)


def eqx_tree_temperature(stage, t):
    return eqx.tree_at(lambda s: s.temperature, stage, jnp.asarray(t, jnp.float32))


def test_keyed_pvalues_chunking_and_null(getkey):
    """A keyed chunk shares two shuffles (`chunk_labels`): the same key and chunk size reproduce the p-values
    exactly, other chunk sizes agree within Monte-Carlo error; under a null p-values are near uniform."""
    x, labels, index = _toy(getkey, n_cells=300)
    key = getkey()
    a = score_ligand_receptor(LigandReceptor(index, 3, n_perms=400, chunk_size=7), x, labels, key=key)
    again = score_ligand_receptor(LigandReceptor(index, 3, n_perms=400, chunk_size=7), x, labels, key=key)
    np.testing.assert_array_equal(a.pvalues, again.pvalues)
    b = score_ligand_receptor(LigandReceptor(index, 3, n_perms=400, chunk_size=400), x, labels, key=key)
    assert 0 < np.max(np.abs(a.pvalues - b.pvalues)) <= 0.12  # sd of a difference of two 400-draw estimates <= 0.035
    assert 0.2 < float(jnp.mean(a.pvalues)) < 0.8


def test_chunk_permutations_are_each_uniform_and_distinct(getkey):
    """Every row of `chunk_labels` is a uniformly random permutation (all 120 orders of 5 cells equally often,
    chi-square), rows of one chunk differ, and a row's label counts are the labels'."""
    from scipy.stats import chisquare

    draw = jax.jit(lambda keys, key: (jax.vmap(lambda k: chunk_labels(k, jnp.arange(5), 6))(keys),
                                      chunk_labels(key, jnp.arange(1000) % 7, 50)))
    rows, big = draw(jr.split(getkey(), 2000), getkey())
    orders, counts = np.unique(np.asarray(rows).reshape(-1, 5), axis=0, return_counts=True)
    assert len(orders) == 120 and chisquare(counts).pvalue > 1e-3
    assert len(np.unique(np.asarray(big), axis=0)) == 50
    np.testing.assert_array_equal(np.sort(np.asarray(big), axis=1), np.sort(np.arange(1000) % 7)[None].repeat(50, 0))


def test_bad_input_names_the_field(pbmc, resource):
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy().copy()
    labels[0] = "lonely"
    with pytest.warns(UserWarning, match=r"groupby: group\(s\) \['lonely'\]"):
        table = ligand_receptor_table(pbmc.X, pbmc.var_names, labels, resource, n_perms=0)
    assert "lonely" not in set(table["source"])
    labels = pbmc.obs["bulk_labels"].to_numpy()
    mouse = pd.DataFrame({"ligand": ["Xcl1", "Ccl5"], "receptor": ["Xcr1", "Ccr5"]})
    with pytest.raises(ValueError, match="resource: none of its 2 interactions"):
        ligand_receptor_table(pbmc.X, pbmc.var_names, labels, mouse)
    with pytest.raises(ValueError, match="resource: missing column"):
        ligand_receptor_table(pbmc.X, pbmc.var_names, labels, resource.rename(columns={"ligand": "source"}))
    with pytest.raises(ValueError, match="groupby: has 3 labels"):
        ligand_receptor_table(pbmc.X, pbmc.var_names, labels[:3], resource)


def test_faces_table_uns_and_dotplot(pbmc, resource, tmp_path):
    adata = pbmc.copy()
    table = dbx.tl.ligand_receptor(adata, "bulk_labels", resource=resource, n_perms=0)
    direct = ligand_receptor_table(pbmc.X, pbmc.var_names, pbmc.obs["bulk_labels"], resource, n_perms=0)
    pd.testing.assert_frame_equal(table, direct)
    assert adata.uns["liana_res"] is table and adata.uns["liana_res_params"]["method"] == "cellphonedb"
    for column in ["source", "target", "ligand_complex", "receptor_complex", "score", "pvalue"]:
        assert column in table
    written = dbx.pl.ligand_receptor_dotplot(table, top_n=5, sources=["Dendritic"], path=tmp_path / "dots.png")
    assert written.stat().st_size > 0
    with pytest.raises(ValueError, match="groupby: 'nope'"):
        dbx.tl.ligand_receptor(adata, "nope", resource=resource)


def test_settings_are_array_leaves_vmap_equals_loop(getkey):
    import equinox as eqx

    x, labels, index = _toy(getkey)
    stage = LigandReceptor(index, 3, method="cellchat")
    settings = jnp.array([0.0, 0.3, 0.6], dtype=jnp.float32)
    with_setting = lambda p: eqx.tree_at(lambda s: s.expr_prop, stage, p)  # noqa: E731
    kept = jax.vmap(lambda p: with_setting(p)(x, labels).kept)(settings)
    for i, p in enumerate(settings):
        np.testing.assert_array_equal(kept[i], with_setting(p)(x, labels).kept)
    assert kept[0].sum() > kept[2].sum()
    kh = jax.vmap(lambda k: eqx.tree_at(lambda s: s.kh, stage, k)(x, labels).scores)(settings + 0.1)
    np.testing.assert_allclose(kh[1], jax.jit(lambda s: s(x, labels).scores)(
        eqx.tree_at(lambda s: s.kh, stage, settings[1] + 0.1)), rtol=1e-6)


def test_resource_without_liana_says_how_to_pass_one(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liana" else real(name, *a))
    with pytest.raises(ImportError, match=r"pass your own resource to tl.ligand_receptor\(\.\.\., resource=table\)"):
        dbx.datasets.ligand_receptor_pairs()
    with pytest.raises(ValueError, match="name: resource 'nope'"):
        monkeypatch.undo()
        dbx.datasets.ligand_receptor_pairs("nope")


def test_face_writes_where_liana_writes_and_liana_plots_it(pbmc, resource):
    """LIANA's `key_added` is `"liana_res"`, where its plots read by default (ours wrote `"ligand_receptor"`)."""
    adata = pbmc.copy()
    table = dbx.tl.ligand_receptor(adata, "bulk_labels", resource=resource, n_perms=0)
    liana_run = _liana(pbmc, "cellphonedb", 0, resource)
    assert adata.uns["liana_res"] is table and set(liana_run.columns) <= set(table.columns)
    with warnings.catch_warnings():  # LIANA's plot sets a column of a slice (pandas' SettingWithCopyWarning)
        warnings.simplefilter("ignore")
        figure = li.pl.dotplot(adata=adata, colour="lr_means", size="ligand_props", source_labels=["Dendritic"],
                               target_labels=["CD14+ Monocyte"], top_n=5, orderby="lr_means",
                               orderby_ascending=False, return_fig=True)
    assert figure is not None
