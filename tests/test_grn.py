"""The additive ridge GRN: recovery of a simulated Hill-function network, exactness of the own-TF exclusion, input
checks naming the field."""

import json
import pathlib

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from diffbio_eqx._grn._regression import additive_importances, hinge_basis, standardise
from diffbio_eqx._grn._table import grn_table
from diffbio_eqx._simulate._network import simulate_grn


REFERENCE = json.loads((pathlib.Path(__file__).parent / "data" / "communication_grn_reference.json").read_text())


def _lognorm(counts):
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)


@pytest.fixture(scope="module")
def network():
    sim = simulate_grn(**REFERENCE["simulation"])
    return sim, _lognorm(sim.counts)


def test_recovers_simulated_network_better_than_grnboost2_settings(network):
    sim, x = network
    counts = sim.counts
    # The stored GBM figure (benchmarks/bench_communication_grn.py) was measured on exactly these data.
    np.testing.assert_allclose([counts.sum(), counts[0].sum(), counts[:, -1].sum()], REFERENCE["fingerprint"])
    n_tfs, n_genes = sim.adjacency.shape
    assert n_tfs >= 20 and n_genes - n_tfs >= 200
    table = grn_table(x, sim.gene_names, list(sim.tf_names))
    assert not (table["TF"] == table["target"]).any()
    assert (np.diff(table["importance"]) <= 0).all()
    scores = np.zeros(sim.adjacency.shape)
    tf_pos = {name: i for i, name in enumerate(sim.gene_names)}
    scores[table["TF"].map(tf_pos), table["target"].map(tf_pos)] = table["importance"]
    scored = np.ones_like(sim.adjacency)
    scored[np.arange(n_tfs), np.arange(n_tfs)] = False
    auprc = average_precision_score(sim.adjacency[scored], scores[scored])
    random = sim.adjacency[scored].mean()
    assert random == pytest.approx(REFERENCE["random_auprc"])
    assert auprc >= REFERENCE["gbm_grnboost2_auprc"]
    assert auprc >= 5 * random


def test_own_tf_block_is_dropped_exactly(getkey):
    """A target that is a TF: the block-inverse update equals refitting without that TF's columns."""
    x = jr.normal(getkey(), (200, 4))
    y = jnp.concatenate([x[:, :1] ** 2 + 0.3 * x[:, 1:2] + 0.1 * jr.normal(getkey(), (200, 1)), x[:, 2:3]], axis=1)
    basis, ys, ridge = hinge_basis(x, 2), standardise(y), jnp.asarray(0.05)
    ours = additive_importances(basis, ys, jnp.array([-1, 2]), ridge)
    keep = jnp.array([0, 1, 3])
    refit = additive_importances(basis[:, keep], ys[:, 1:], jnp.array([-1]), ridge)
    np.testing.assert_allclose(ours[keep, 1], refit[:, 0], rtol=1e-6, atol=1e-10)
    assert ours[2, 1] == 0
    full = additive_importances(basis, ys[:, :1], jnp.array([-1]), ridge)
    np.testing.assert_allclose(ours[:, 0], full[:, 0], rtol=1e-10)
    assert jnp.argmax(ours[:, 0]) == 0  # the quadratic regulator explains most


def test_bad_tfs_name_the_field(network):
    sim, x = network
    with pytest.raises(ValueError, match="tfs: none of the 2 names"):
        grn_table(x, sim.gene_names, ["Foxp3", "Gata3"])
    with pytest.warns(UserWarning, match=r"tfs: 1 of 3 names are not in the data.*Foxp3"):
        grn_table(x[:, :30], sim.gene_names[:30], ["TF0", "TF1", "Foxp3"])
    with pytest.raises(ValueError, match="tfs: expected a list"):
        grn_table(x, sim.gene_names, "TF0")
    with pytest.raises(ValueError, match="targets: none"):
        grn_table(x, sim.gene_names, ["TF0"], targets=["nope"])


def test_grn_face(network):
    import anndata as ad
    import pandas as pd

    import diffbio_eqx as dbx

    sim, x = network
    adata = ad.AnnData(X=x[:, :60], var=pd.DataFrame(index=list(sim.gene_names[:60])))
    table = dbx.tl.grn(adata, tfs=list(sim.tf_names))
    assert list(table.columns) == ["TF", "target", "importance"] and adata.uns["grn"] is table
    pd_direct = grn_table(x[:, :60], sim.gene_names[:60], list(sim.tf_names))
    np.testing.assert_allclose(table["importance"], pd_direct["importance"])
