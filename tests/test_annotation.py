"""Cell annotation (issue 18): CellTypist mode against scikit-learn's logistic regression on the same features,
CellAssign and scANVI against scvi-tools' reference outputs (benchmarks/make_annotation_reference.py), label
transfer to a held-out simulated batch, gene matching by name, the AnnData face and the command line."""

import pathlib
import warnings

import anndata as ad
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from annotation_markers import PBMC68K_MARKERS, annotation_split, marker_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

import diffbio_eqx as dbx
from diffbio_eqx._annotation import _celltypist as ct
from diffbio_eqx._annotation._cellassign import (
    cellassign_data,
    cellassign_probabilities,
    fit_cellassign,
    init_cellassign,
)
from diffbio_eqx._annotation._scanvi import (
    _Cells,
    _compact_counts,
    _device_cells,
    _with_log_counts,
    fit_scanvi,
    label_codes,
    scanvi_from_vae,
    scanvi_probabilities,
    with_population_statistics,
)
from diffbio_eqx._core._train import TrainSettings, to_device_rows
from diffbio_eqx._vae._stage import VAENormalizer, fit_vae


REFERENCE = pathlib.Path(__file__).parent / "data" / "annotation_reference.npz"
QUIET = TrainSettings(progress=False)


@pytest.fixture(scope="module")
def pbmc():
    adata = dbx.datasets.pbmc68k()
    return adata, adata.obs["bulk_labels"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def reference_outputs():
    return dict(np.load(REFERENCE))


def _sklearn_features(train_counts, test_counts):
    """CellTypist's features computed independently with NumPy: log1p per 10k, genes expressed in training,
    standardised with the training mean / population sd (0 -> 1), clipped above at 10."""
    def log_norm(c):
        c = np.asarray(c.todense() if hasattr(c, "todense") else c, dtype=np.float64)
        return np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4)

    x, xt = log_norm(train_counts), log_norm(test_counts)
    keep = np.count_nonzero(x, axis=0) > 0
    x, xt = x[:, keep], xt[:, keep]
    mean, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1
    return np.minimum((x - mean) / sd, 10), np.minimum((xt - mean) / sd, 10)


@pytest.mark.parametrize("split", [0, 1, 2])
def test_celltypist_matches_sklearn_on_pbmc68k(pbmc, split):
    adata, labels = pbmc
    hidden = annotation_split(adata.n_obs, split)
    known = np.setdiff1d(np.arange(adata.n_obs), hidden)
    model = ct.train_celltypist(adata.X[known], labels[known], adata.var_names)
    predicted = ct.predict_celltypist(model, adata.X[hidden], adata.var_names)
    ours = np.asarray(model.cell_types)[np.asarray(predicted.labels)]
    x, xt = _sklearn_features(adata.X[known], adata.X[hidden])
    sklearn = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000)).fit(x, labels[known]).predict(xt)
    accuracy, sklearn_accuracy = np.mean(ours == labels[hidden]), np.mean(sklearn == labels[hidden])
    assert abs(accuracy - sklearn_accuracy) <= 0.01, (accuracy, sklearn_accuracy)
    assert np.mean(ours == sklearn) >= 0.98
    # CellTypist's probability matrix is expit of the decision scores (one-vs-rest).
    np.testing.assert_allclose(predicted.probabilities, 1 / (1 + np.exp(-np.asarray(predicted.scores))), rtol=1e-5)


def test_celltypist_multinomial_matches_sklearn(pbmc):
    adata, labels = pbmc
    hidden = annotation_split(adata.n_obs, 0)
    known = np.setdiff1d(np.arange(adata.n_obs), hidden)
    model = ct.train_celltypist(adata.X[known], labels[known], adata.var_names, multi_class="multinomial")
    predicted = ct.predict_celltypist(model, adata.X[hidden], adata.var_names)
    ours = np.asarray(model.cell_types)[np.asarray(predicted.labels)]
    x, xt = _sklearn_features(adata.X[known], adata.X[hidden])
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(x, labels[known])
    assert abs(np.mean(ours == labels[hidden]) - np.mean(reference.predict(xt) == labels[hidden])) <= 0.01
    np.testing.assert_allclose(np.asarray(predicted.probabilities).sum(1), 1.0, rtol=1e-5)
    # The same objective, minimised at least as far as scikit-learn's lbfgs (which stops at gtol 1e-4).
    onehot = jnp.asarray(np.eye(len(model.cell_types))[np.searchsorted(model.cell_types, labels[known])])
    l2 = jnp.asarray(1.0 / len(known))
    ours_value = ct.logistic_objective((model.weights, model.intercept), jnp.asarray(x), onehot, l2, "multinomial")
    theirs = (jnp.asarray(reference.coef_), jnp.asarray(reference.intercept_))
    assert float(ours_value) <= float(ct.logistic_objective(theirs, jnp.asarray(x), onehot, l2, "multinomial")) + 1e-6


def test_celltypist_feature_selection_is_two_pass(pbmc):
    adata, labels = pbmc
    n = adata.n_obs
    model = ct.train_celltypist(adata.X, labels, adata.var_names, feature_selection=True, top_genes=40)
    # First pass: CellTypist's SGD objective (alpha 1e-4), i.e. one-vs-rest L2 logistic regression with
    # C = 1 / (alpha n); ours reaches it at least as far as scikit-learn's lbfgs does.
    x, _ = _sklearn_features(adata.X, adata.X)
    types = sorted(set(labels))
    onehot = jnp.asarray(np.eye(len(types))[np.searchsorted(types, labels)])
    weights, intercept, _ = ct.fit_logistic(jnp.asarray(x), onehot, jnp.asarray(1e-4), multi_class="ovr")
    first = OneVsRestClassifier(LogisticRegression(C=1.0 / (1e-4 * n), max_iter=2000)).fit(x, labels)
    theirs = (jnp.asarray(np.vstack([e.coef_ for e in first.estimators_])),
              jnp.asarray(np.concatenate([e.intercept_ for e in first.estimators_])))
    ours_value = ct.logistic_objective((weights, intercept), jnp.asarray(x), onehot, jnp.asarray(1e-4), "ovr")
    assert float(ours_value) <= float(ct.logistic_objective(theirs, jnp.asarray(x), onehot, jnp.asarray(1e-4),
                                                            "ovr")) + 1e-6
    # Second pass on the union of each type's top-40 |coefficients|.
    expressed = np.asarray(adata.var_names)[np.count_nonzero(adata.X.toarray(), axis=0) > 0]
    chosen = expressed[np.unique(np.argpartition(np.abs(np.asarray(weights)), -40, axis=1)[:, -40:])]
    assert model.genes == tuple(chosen)
    assert 40 <= len(model.genes) <= 40 * len(types) < len(expressed)


def test_celltypist_genes_matched_by_name(pbmc, tmp_path):
    adata, labels = pbmc
    model = ct.train_celltypist(adata.X[:400], labels[:400], adata.var_names)
    query, genes = adata.X[400:], np.asarray(adata.var_names)
    base = ct.predict_celltypist(model, query, genes)
    order = np.random.default_rng(0).permutation(len(genes))
    shuffled = ct.predict_celltypist(model, query[:, order], genes[order])
    np.testing.assert_array_equal(base.labels, shuffled.labels)
    np.testing.assert_allclose(base.scores, shuffled.scores, rtol=1e-5, atol=1e-5)
    # sparse or dense, in chunks that do not divide the cells: the same scores
    assert sp.issparse(query)
    chunked = ct.predict_celltypist(model, query.toarray()[:, order], genes[order], chunk_size=64)
    np.testing.assert_allclose(chunked.scores, base.scores, rtol=1e-5, atol=1e-5)
    drop = np.arange(10)
    with pytest.warns(ct.MissingGenesWarning, match=rf"10 of the model's {len(model.genes)} genes are missing.*"
                      rf"{genes[0]}.*predicting with the {len(model.genes) - 10} genes"):
        partial = ct.predict_celltypist(model, query[:, 10:], genes[10:])
    # CellTypist drops the missing genes' coefficients: the same as a query whose missing genes sit at the mean.
    position = {g: i for i, g in enumerate(genes)}
    model_columns = np.asarray([position[g] for g in model.genes])
    assert set(drop) <= set(model_columns)  # the dropped genes are model genes
    kept = np.flatnonzero(~np.isin(model_columns, drop))
    dense = query.toarray().astype(np.float64)
    expected = np.asarray(ct.standardize(ct.log_normalize(jnp.asarray(dense[:, model_columns]),
                                                          jnp.asarray(dense[:, 10:].sum(1))), model.mean, model.scale))
    scores = expected[:, kept] @ np.asarray(model.weights)[:, kept].T + np.asarray(model.intercept)
    np.testing.assert_allclose(partial.scores, scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="none of the model's"):
        ct.predict_celltypist(model, query, [f"x{i}" for i in range(len(genes))])
    path = ct.save_celltypist(tmp_path / "model.eqx", model)
    loaded = ct.load_celltypist(path)
    assert loaded.genes == model.genes and loaded.cell_types == model.cell_types
    np.testing.assert_array_equal(ct.predict_celltypist(loaded, query, genes).labels, base.labels)


def test_majority_vote_takes_the_most_frequent_label():
    predicted = jnp.asarray([0, 0, 1, 2, 2, 1, 1])
    clusters = jnp.asarray([0, 0, 0, 1, 1, 2, 2])
    voted = ct.majority_vote(predicted, clusters, n_types=3, n_clusters=3)
    np.testing.assert_array_equal(voted, [0, 0, 0, 2, 2, 1, 1])


@pytest.fixture(scope="module")
def held_out_batch():
    """Four groups, two batches; batch 1 is the query. DE factors exp(N(2, 0.4)) make marker genes as strong as
    CellAssign expects (over-expression of at least e^2)."""
    sim = dbx.simulate(jr.key(0), n_cells=400, n_genes=200, n_groups=4, n_batches=2, de_fac_loc=2.0)
    counts = np.asarray(sim.counts, dtype=np.float32)
    types = np.asarray([f"type{k}" for k in range(4)])
    return counts, types[np.asarray(sim.groups)], np.asarray(sim.batches), np.asarray(sim.de_factors)


def test_celltypist_transfers_labels_to_a_held_out_batch(held_out_batch):
    counts, labels, batches, _ = held_out_batch
    genes = [f"g{i}" for i in range(counts.shape[1])]
    reference, query = batches == 0, batches == 1
    model = ct.train_celltypist(counts[reference], labels[reference], genes)
    prediction = ct.predict_celltypist(model, counts[query], genes, majority_voting=True, key=jr.key(0))
    assert np.mean(np.asarray(model.cell_types)[np.asarray(prediction.labels)] == labels[query]) >= 0.95
    assert np.mean(np.asarray(model.cell_types)[np.asarray(prediction.majority)] == labels[query]) >= 0.9


def test_cellassign_recovers_simulated_groups(held_out_batch):
    counts, labels, batches, de = held_out_batch
    genes = [f"g{i}" for i in range(counts.shape[1])]
    markers = pd.DataFrame(0, index=genes, columns=[f"type{k}" for k in range(4)])
    for k in range(4):
        markers.iloc[np.argsort(-de[k])[:5], k] = 1
    markers = markers[markers.sum(axis=1) > 0]
    data = cellassign_data(counts, genes, markers, design=np.eye(2)[batches])
    assert data.cell_types[-1] == "other" and data.design.shape == (400, 2)
    fitted = fit_cellassign(init_cellassign(data, key=jr.key(0)), data, key=jr.key(1), settings=QUIET)
    probabilities = np.asarray(cellassign_probabilities(fitted.model, data))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    predicted = np.asarray(data.cell_types)[probabilities.argmax(axis=1)]
    assert np.mean(predicted[batches == 1] == labels[batches == 1]) >= 0.95


@pytest.mark.slow  # trains CellAssign / scANVI for scvi-tools' default epochs (make test-slow)
def test_cellassign_on_pbmc68k_matches_scvi_tools(pbmc, reference_outputs):
    adata, labels = pbmc
    markers = marker_matrix(PBMC68K_MARKERS)
    data = cellassign_data(adata.X, adata.var_names, markers)
    accuracies = []
    for seed in range(3):
        fitted = fit_cellassign(init_cellassign(data, key=jr.key(seed)), data, key=jr.key(10 + seed), settings=QUIET)
        predicted = np.asarray(data.cell_types)[np.asarray(cellassign_probabilities(fitted.model, data)).argmax(1)]
        accuracies.append(np.mean(predicted == labels))
    assert np.mean(accuracies) >= np.mean(reference_outputs["cellassign_accuracy"]) - 0.02, accuracies


@pytest.mark.slow  # trains CellAssign / scANVI for scvi-tools' default epochs (make test-slow)
def test_scanvi_transfers_labels_to_a_held_out_batch(held_out_batch):
    counts, labels, batches, _ = held_out_batch
    types = sorted(set(labels))
    vae = fit_vae(VAENormalizer(counts.shape[1], 2, key=jr.key(0)), counts, batches, key=jr.key(1),
                  settings=TrainSettings(progress=False, n_epochs=60)).model
    known = np.where(batches == 0, labels, None)
    fitted = fit_scanvi(scanvi_from_vae(vae, types, key=jr.key(2)), counts, batches, label_codes(known, types),
                        key=jr.key(3), settings=QUIET)
    probabilities = np.asarray(scanvi_probabilities(fitted.model, counts, batches))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    predicted = np.asarray(types)[probabilities.argmax(axis=1)]
    assert np.mean(predicted[batches == 1] == labels[batches == 1]) >= 0.95


@pytest.mark.slow  # trains CellAssign / scANVI for scvi-tools' default epochs (make test-slow)
def test_scanvi_on_pbmc68k_matches_scvi_tools(pbmc, reference_outputs):
    adata, labels = pbmc
    types = sorted(set(labels))
    vae = fit_vae(VAENormalizer(adata.n_vars, key=jr.key(0)), adata.X, key=jr.key(1), settings=QUIET).model
    accuracies = []
    for split in range(3):
        hidden = annotation_split(adata.n_obs, split)
        np.testing.assert_array_equal(hidden, reference_outputs[f"split_{split}"])
        known = labels.astype(object).copy()
        known[hidden] = None
        fitted = fit_scanvi(scanvi_from_vae(vae, types, key=jr.key(2)), adata.X, None, label_codes(known, types),
                            key=jr.key(3 + split), settings=QUIET)
        predicted = np.asarray(types)[np.asarray(scanvi_probabilities(fitted.model, adata.X)).argmax(1)]
        accuracies.append(np.mean(predicted[hidden] == labels[hidden]))
    assert np.mean(accuracies) >= np.mean(reference_outputs["scanvi_accuracy"]) - 0.02, accuracies


@pytest.mark.slow  # 66 s at load average 22 (compiles of the VAE encoder and classifier), over the fast set's budget
def test_scanvi_classifier_normalises_by_the_minibatch_in_training_and_by_the_population_after():
    """scvi-tools' classifier has batch normalisation: in training the minibatch's statistics, at prediction the
    population statistics `with_population_statistics` stores (what torch's running averages estimate). On the
    same cells, without dropout, both give the same logits; the unset statistics (0, 1) do not."""
    counts = np.random.default_rng(0).poisson(3.0, (64, 30)).astype(np.float32)
    vae = VAENormalizer(30, key=jr.key(0))
    model = scanvi_from_vae(vae, ["a", "b", "c"], key=jr.key(1))
    mean, _ = vae.encode(jnp.asarray(counts, vae.dtype), None, inference=True)
    in_training = np.asarray(model.classify(mean, inference=True, batch_statistics=True))
    fitted = with_population_statistics(model, counts)
    np.testing.assert_allclose(np.asarray(fitted.classify(mean, inference=True)), in_training, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(model.classify(mean, inference=True)), in_training, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scanvi_probabilities(fitted, counts)),
                               np.exp(in_training) / np.exp(in_training).sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_scanvi_compact_counts_read_as_the_sparse_rows():
    """Whole-number counts held dense as uint8/uint16 give the minibatches (counts and log1p) of the sparse rows
    with their log1p copy, bit for bit; other counts, or counts too sparse to gain memory, stay sparse."""
    dense = np.random.default_rng(0).poisson(0.6, (50, 40)).astype(np.float32)
    dense[0, 0] = 300.0  # above 255: uint16
    csr = sp.csr_matrix(dense)
    compact = _compact_counts(csr)
    assert compact is not None and compact.dtype == np.uint16 and np.array_equal(compact, dense)
    assert _compact_counts(sp.csr_matrix(np.minimum(dense, 255))).dtype == np.uint8
    assert _compact_counts(dense).dtype == np.uint16  # dense input
    codes, log_factorial = np.zeros(50, np.int32), np.zeros(50)
    held = _device_cells(csr, codes, codes, log_factorial, jnp.float32)
    sparse = _with_log_counts(_Cells(to_device_rows(csr), jnp.asarray(codes), jnp.asarray(codes),
                                     jnp.asarray(log_factorial, jnp.float32)))
    assert held.value_dtype == jnp.float32 and sparse.value_dtype is None
    rows = jnp.asarray([3, 0, 49, 7, 3])
    for ours, theirs in zip((*held.take(rows), held.take_log(rows)), (*sparse.take(rows), sparse.take_log(rows)),
                            strict=True):
        assert np.asarray(ours).dtype == np.asarray(theirs).dtype
        assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes()
    assert _compact_counts(csr * 0.5) is None  # not whole numbers
    assert _compact_counts(sp.csr_matrix(dense * 300.0)) is None  # 90,000 does not fit 16 bits
    assert _compact_counts(sp.csr_matrix(np.where(np.arange(40) == 0, dense, 0.0))) is None  # 2.5 % non-zeros


def test_annotate_face_and_cli(pbmc, tmp_path):
    adata, labels = pbmc
    reference, query = adata[:400].copy(), adata[400:].copy()
    result = dbx.tl.annotate(query, "celltypist", reference=reference, label_key="bulk_labels", key=jr.key(0))
    assert list(query.obs["cell_type"].cat.categories) == sorted(set(labels[:400]))
    assert query.obsm["cell_type_probabilities"].shape == (300, len(result.cell_types))
    np.testing.assert_allclose(query.obs["cell_type_confidence"], query.obsm["cell_type_probabilities"].max(1))
    assert query.uns["cell_type"]["params"]["mode"] == "celltypist"
    with pytest.raises(ValueError, match="label_key: 'nope'"):
        dbx.tl.annotate(query, "celltypist", reference=reference, label_key="nope", key=jr.key(0))
    with pytest.raises(ValueError, match="mode: must be one of"):
        dbx.tl.annotate(query, "svm", reference=reference, label_key="bulk_labels", key=jr.key(0))
    with pytest.raises(ValueError, match="markers: mode 'cellassign' needs"):
        dbx.tl.annotate(query, "cellassign", key=jr.key(0))
    from diffbio_eqx.cli import main

    reference.write_h5ad(tmp_path / "ref.h5ad")
    query_file = tmp_path / "query.h5ad"
    ad.AnnData(X=query.X, obs=query.obs[["bulk_labels"]], var=query.var).write_h5ad(query_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # anndata on the file's old-style uns
        code = main(["annotate", str(query_file), "--reference", str(tmp_path / "ref.h5ad"), "--label-key",
                     "bulk_labels", "--out", str(tmp_path / "out.h5ad")])
    assert code == 0
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(written.obs["cell_type"].astype(str), query.obs["cell_type"].astype(str))
    assert main(["annotate", str(query_file), "--label-key", "bulk_labels"]) == 2  # no reference: refused


def test_annotate_over_clustering_names_an_obs_column_as_celltypist(pbmc):
    """`celltypist.annotate` reads a string `over_clustering` as an `obs` column when the query has one; ours
    computed a Leiden over-clustering for `"leiden"` (and refused any other column name)."""
    adata, _ = pbmc
    reference, query = adata[:400].copy(), adata[400:].copy()
    halves = np.repeat(["0", "1"], [150, 150])
    query.obs["leiden"] = pd.Categorical(halves)
    options = {"reference": reference, "label_key": "bulk_labels", "key": jr.key(0), "majority_voting": True}
    dbx.tl.annotate(query, "celltypist", over_clustering="leiden", **options)
    by_name = query.obs["cell_type"].astype(str).to_numpy()
    assert query.uns["cell_type"]["params"]["over_clustering"] == "leiden"
    dbx.tl.annotate(query, "celltypist", over_clustering=halves, **options)
    np.testing.assert_array_equal(by_name, query.obs["cell_type"].astype(str).to_numpy())
    assert len(set(by_name[:150])) == len(set(by_name[150:])) == 1
