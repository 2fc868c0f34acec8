"""Bad input to the operator faces (`dbx.tl`, `dbx.pp`): each case raises a `ValueError` naming the argument or
field and the problem, before any numerical work, and leaves the AnnData as it was. (The core faces and the
command line are in `test_bad_input.py`, with the non-integer counts the suite's type checker stops first.)
Found by probing every face with edge cases; each case here crashed deep inside pandas / JAX, or returned NaN or
meaningless values without a word, before it was named."""

import anndata as ad
import jax.random as jr
import numpy as np
import pandas as pd
import pytest

import diffbio_eqx as dbx


def _cells(n_cells=80, n_genes=12, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (n_cells, n_genes)).astype(np.float32)
    adata = ad.AnnData(counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.layers["counts"] = counts.copy()
    adata.obs["group"] = pd.Categorical(np.where(np.arange(n_cells) % 2 == 0, "a", "b"))
    adata.obs["sample"] = [f"s{i % 8}" for i in range(n_cells)]
    adata.obs["cond"] = np.where(np.arange(n_cells) % 8 < 4, "ctrl", "stim")
    adata.obs["dpt_pseudotime"] = np.linspace(0.0, 1.0, n_cells)
    adata.obs["day"] = (np.arange(n_cells) % 3).astype(float)
    adata.obsm["spatial"] = rng.uniform(0, 10, (n_cells, 2))
    return adata


def _state(adata):
    return (sorted(adata.obs.columns), sorted(adata.var.columns), sorted(adata.obsm.keys()), sorted(adata.uns.keys()),
            adata.X.copy())


def _raw_in_other_order(adata):
    adata.raw = adata[:, ::-1].copy()
    return adata


def _nan_condition(adata):
    adata.obs.loc[adata.obs_names[:10], "cond"] = np.nan
    return adata


def _identical_cells(adata):
    adata.X[:] = 1.0
    return adata


def _negative_counts(adata):
    adata.X[0, 0] = -1.0
    return adata


def _duplicated_genes(adata):
    adata.var_names = ["g0", *adata.var_names[:-1]]
    return adata


def _constant_pseudotime(adata):
    adata.obs["dpt_pseudotime"] = 0.5
    return adata


def _one_batch_present(adata):
    adata.obs["group"] = pd.Categorical(["a"] * adata.n_obs, categories=["a", "b"])
    return adata


def _far_root(adata):
    adata.uns["iroot"] = 500
    return adata


def _fates_misnamed(adata):
    adata.obsm["fate_probabilities"] = np.full((adata.n_obs, 2), 0.5)
    adata.uns["fate_probabilities"] = {"names": ["a", "b", "c"]}
    return adata


def _one_column_basis(adata):
    adata.obsm["line"] = np.zeros((adata.n_obs, 1))
    return adata


def _slices(adata):
    return [adata, adata[::-1].copy()]


KEY = jr.key(0)
# (case id, change to the cells, the call, the start of the message as a regex)
CASES = [
    ("markers-layer-with-use-raw", _raw_in_other_order,
     lambda a: dbx.tl.rank_genes_groups(a, "group", layer="counts", use_raw=True),
     r"layer: 'counts' given with use_raw"),
    ("markers-missing-layer", None, lambda a: dbx.tl.rank_genes_groups(a, "group", layer="logs"),
     r"layer: 'logs' is not in adata.layers"),
    ("pseudobulk-missing-layer", None,
     lambda a: dbx.tl.pseudobulk_de(a, "sample", "cond", reference="ctrl", test="stim", layer="raw_counts"),
     r"layer: 'raw_counts' is not in adata.layers"),
    ("pseudobulk-test-is-reference", None,
     lambda a: dbx.tl.pseudobulk_de(a, "sample", "cond", reference="ctrl", test="ctrl"),
     r"test: must differ from reference"),
    ("pseudobulk-missing-conditions", _nan_condition,
     lambda a: dbx.tl.pseudobulk_de(a, "sample", "cond", reference="ctrl", test="stim"),
     r"condition_key: adata.obs\['cond'\] has 10 missing values"),
    ("switch-missing-layer", None, lambda a: dbx.tl.switch_de(a, layer="x"), r"layer: 'x' is not in adata.layers"),
    ("switch-constant-pseudotime", _constant_pseudotime, lambda a: dbx.tl.switch_de(a),
     r"pseudotime_key: adata.obs\['dpt_pseudotime'\] is constant"),
    ("dd-missing-layer", None,
     lambda a: dbx.tl.differential_distribution(a, "cond", first="ctrl", key=KEY, layer="x"),
     r"layer: 'x' is not in adata.layers"),
    ("dd-no-permutations", None,
     lambda a: dbx.tl.differential_distribution(a, "cond", first="ctrl", key=KEY, n_permutations=0),
     r"n_permutations: must be at least 1, got 0"),
    ("dd-alpha-outside", None,
     lambda a: dbx.tl.differential_distribution(a, "cond", first="ctrl", key=KEY, alpha=2.0),
     r"alpha: must be in \(0, 1\), got 2.0"),
    ("archetypes-identical-cells", _identical_cells, lambda a: dbx.tl.archetypes(a, 3, key=KEY, use_rep="X"),
     r"use_rep: the cells' X coordinates are all identical"),
    ("transport-missing-growth", None,
     lambda a: dbx.tl.transport_maps(a, "day", growth_key="growth"),
     r"growth_key: 'growth' is not a column of adata.obs"),
    ("transport-missing-layer", None, lambda a: dbx.tl.transport_maps(a, "day", layer="x"),
     r"layer: 'x' is not in adata.layers"),
    ("domains-negative-counts", _negative_counts, lambda a: dbx.tl.spatial_domains(a, 3, n_epochs=2),
     r"adata.X: needs finite, non-negative counts"),
    ("domains-missing-layer", None, lambda a: dbx.tl.spatial_domains(a, 3, layer="x", n_epochs=2),
     r"layer: 'x' is not in adata.layers"),
    ("domains-no-neighbours", None, lambda a: dbx.tl.spatial_domains(a, 3, n_neighbors=0, n_epochs=2),
     r"n_neighbors: spatial neighbours per spot, must be at least 1, got 0"),
    ("align-duplicated-genes", _duplicated_genes, lambda a: dbx.tl.align_slices(_slices(a)),
     r"slices\[0\].var_names: not unique \('g0' repeats\)"),
    ("align-top-k-zero", None, lambda a: dbx.tl.align_slices(_slices(a), top_k=0), r"top_k: must be at least 1"),
    ("align-missing-layer", None, lambda a: dbx.tl.align_slices(_slices(a), layer="x"),
     r"layer: 'x' is not in adata.layers"),
    ("lr-fraction-outside", None, lambda a: dbx.tl.ligand_receptor(a, "group", expr_prop=1.5),
     r"expr_prop: a fraction of cells, must be in \[0, 1\], got 1.5"),
    ("grn-zero-ridge", None, lambda a: dbx.tl.grn(a, ["g0", "g1"], ridge=0.0),
     r"ridge: the ridge penalty must be > 0, got 0.0"),
    ("kmeans-zero-temperature", None,
     lambda a: dbx.tl.soft_kmeans(a, 2, use_rep="spatial", temperature=0.0, key=KEY),
     r"temperature: must be finite and > 0, got 0.0"),
    ("mixture-nan-temperature", None,
     lambda a: dbx.tl.gaussian_mixture(a, 2, use_rep="spatial", temperature=float("nan"), key=KEY),
     r"temperature: must be finite and > 0, got nan"),
    ("integrate-reference-code", None,
     lambda a: dbx.tl.integrate(a, "mmd", batch_key="group", key=KEY, reference_batch=5),
     r"reference_batch: code 5 is not one of 'group''s 2 batches"),
    ("integrate-one-batch-present", _one_batch_present,
     lambda a: dbx.tl.integrate(a, "mmd", batch_key="group", key=KEY),
     r"batch_key: 'group' must hold cells of at least two batches"),
    # plots: a named error instead of a KeyError / IndexError from inside pandas or matplotlib
    ("volcano-missing-column", None, lambda a: dbx.pl.volcano(pd.DataFrame({"log2FoldChange": [1.0]})),
     r"padj: 'padj' is not a column of the table"),
    ("volcano-alpha-outside", None,
     lambda a: dbx.pl.volcano(pd.DataFrame({"log2FoldChange": [1.0], "padj": [0.01]}), alpha=-1.0),
     r"alpha: must be in \(0, 1\), got -1.0"),
    ("simplex-before-archetypes", None, lambda a: dbx.pl.archetype_simplex(a),
     r"key: adata.obsm\['X_archetypes'\] is missing; run dbx.tl.archetypes first"),
    ("pseudotime-root-outside", _far_root, lambda a: dbx.pl.pseudotime(a, basis="spatial"),
     r"adata.uns\['iroot'\]: 500 is not a cell index \(there are 80 cells\)"),
    ("pseudotime-one-column", _one_column_basis, lambda a: dbx.pl.pseudotime(a, basis="line"),
     r"basis: adata.obsm\['line'\] has shape \(80, 1\); a plot needs two columns"),
    ("fates-misnamed", _fates_misnamed, lambda a: dbx.pl.fate_probabilities(a, basis="spatial"),
     r"key: adata.uns\['fate_probabilities'\]\['names'\] must name each of the 2 columns"),
    ("histogram-before-scrublet", None, lambda a: dbx.pl.scrublet_histogram(a),
     r"adata.uns\['scrublet'\] and adata.obs\['doublet_score'\]: missing; run dbx.pp.scrublet first"),
    ("slices-none", None, lambda a: dbx.pl.aligned_slices([]), r"slices: no slices to draw"),
    ("training-scalar-curve", None, lambda a: dbx.pl.training({"vae": {"loss": 3.0}}),
     r"curves\['vae'\]\['loss'\]: expected one value per epoch \(1-D\), got shape \(\)"),
    ("dotplot-negative-top", None, lambda a: dbx.pl.ligand_receptor_dotplot(pd.DataFrame(), top_n=-1),
     r"top_n: must be a whole number >= 1, got -1"),
    ("umap-duplicated-gene", _duplicated_genes, lambda a: dbx.pl.umap(a, "g0", basis="spatial"),
     r"color: gene 'g0' appears more than once in adata.var_names"),
    ("integrate-flat-epochs", None, lambda a: dbx.tl.integrate(a, "mmd", batch_key="group", key=KEY, n_epochs=1),
     r"n_epochs: fit_mmd_vae takes the training loop's settings as settings=TrainSettings\(n_epochs=...\)"),
]


@pytest.mark.parametrize("name, change, call, message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:Variable names are not unique:UserWarning")  # anndata's, on the duplicated case
def test_operator_faces_name_the_field_and_leave_the_cells_alone(name, change, call, message):
    adata = _cells()
    if change is not None:
        adata = change(adata)
    before = _state(adata)
    with pytest.raises(ValueError, match=message):
        call(adata)
    after = _state(adata)
    assert after[:4] == before[:4]
    np.testing.assert_array_equal(after[4], before[4])


def test_one_untestable_gene_leaves_the_others_q_values():
    """An all-zero gene has no switch to fit (NaN p-value); BH over the other genes, as R's `p.adjust` (which
    switchde calls) leaves NaN out, instead of spreading NaN over every q-value."""
    adata = _cells(n_cells=100, n_genes=8)
    adata.X[:, 3] = 0.0
    table = dbx.tl.switch_de(adata)
    tested = table.drop(index="g3")
    assert np.all(np.isfinite(tested["qval"]))
    pvalues = tested["pval"].to_numpy()
    order = np.argsort(pvalues)
    expected = np.minimum.accumulate((pvalues[order] * len(pvalues) / np.arange(1, len(pvalues) + 1))[::-1])[::-1]
    np.testing.assert_allclose(tested["qval"].to_numpy()[order], np.minimum(expected, 1.0), rtol=1e-6)


def test_markers_from_a_layer_name_the_layers_genes():
    """With `layer=` (and `use_raw=False`, as scanpy asks when `.raw` is set) the expression and the gene names
    both come from `adata`, not `.raw`, whose genes may differ in order."""
    adata = _raw_in_other_order(_cells())
    adata.layers["counts"][adata.obs["group"].to_numpy() == "a", 5] += 50.0
    with pytest.raises(ValueError, match=r"layer: 'counts' given with use_raw=True \(the default when adata.raw"):
        dbx.tl.rank_genes_groups(adata, "group", layer="counts")  # scanpy's default reads .raw, and refuses too
    dbx.tl.rank_genes_groups(adata, "group", layer="counts", use_raw=False)
    assert adata.uns["rank_genes_groups"]["names"]["a"][0] == "g5"
    assert not adata.uns["rank_genes_groups"]["params"]["use_raw"]
