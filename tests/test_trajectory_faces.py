"""dbx.tl.diffmap / dpt / fate_probabilities / transport_maps and the dbx.pl figures over AnnData (issue 17)."""

import anndata as ad
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest

import diffbio_eqx as dbx


@pytest.fixture(scope="module")
def cells():
    sim = dbx.simulate_branching(jr.key(2), 300)
    adata = ad.AnnData(np.asarray(sim.x, np.float32))
    adata.obs["true_fate"] = np.asarray(sim.fate)
    dbx.pp.neighbors(adata, 15, use_rep="X")
    return adata, sim


def test_diffmap_and_dpt_write_scanpy_keys(cells):
    adata, sim = cells
    dbx.tl.diffmap(adata, key=jr.key(0))
    assert adata.obsm["X_diffmap"].shape == (300, 15) and adata.uns["diffmap_evals"][0] == pytest.approx(1.0)
    adata.uns["iroot"] = 0
    dbx.tl.dpt(adata, key=jr.key(0))
    pseudotime = adata.obs["dpt_pseudotime"].to_numpy()
    assert pseudotime[0] == 0 and pseudotime.max() == pytest.approx(1.0)
    assert np.corrcoef(pseudotime, np.asarray(sim.pseudotime))[0, 1] > 0.9


def test_dpt_reuses_a_stored_diffusion_map_as_scanpy(cells):
    # scanpy's tl.dpt reads tl.diffmap's obsm["X_diffmap"] (its first n_dcs columns) instead of computing its own;
    # ours recomputed 15 components and overwrote a 20-component map
    import scanpy as sc

    adata = cells[0].copy()
    dbx.tl.diffmap(adata, n_comps=20, key=jr.key(0))
    stored = adata.obsm["X_diffmap"].copy()
    adata.uns["iroot"] = 0
    theirs = adata.copy()
    sc.tl.dpt(theirs, n_dcs=12)
    dbx.tl.dpt(adata, n_dcs=12, key=jr.key(1))
    assert np.array_equal(adata.obsm["X_diffmap"], stored)
    np.testing.assert_allclose(adata.obs["dpt_pseudotime"], theirs.obs["dpt_pseudotime"], atol=1e-5)
    with pytest.raises(ValueError, match="n_dcs: the diffusion map has 20 components"):
        dbx.tl.dpt(adata, n_dcs=21, key=jr.key(0))
    del adata.uns["diffmap_evals"]
    with pytest.raises(ValueError, match="diffmap_evals"):
        dbx.tl.dpt(adata, key=jr.key(0))


def test_fate_probabilities_face_and_figures(cells, tmp_path):
    adata, sim = cells
    if "dpt_pseudotime" not in adata.obs:
        dbx.tl.dpt(adata, root=0, key=jr.key(0))
    states = dbx.find_terminal_states(adata.obsp["connectivities"], adata.obs["dpt_pseudotime"], n_states=3,
                                      fraction=0.3)
    result = dbx.tl.fate_probabilities(adata, states)
    assert result.names == ("state_0", "state_1", "state_2")
    probabilities = adata.obsm["fate_probabilities"]
    assert probabilities.shape == (300, 3) and adata.uns["fate_probabilities"]["names"] == list(result.names)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-4)
    assert adata.obs["terminal_states"].notna().sum() == sum(len(c) for c in states.values())
    assert all(len(c) <= 30 for c in states.values())  # CellRank's 30 cells per state at most
    fate = adata.obs["true_fate"].to_numpy()
    assert sorted(np.bincount(fate[c], minlength=3).argmax() for c in states.values()) == [0, 1, 2]
    # an obs column of terminal states works the same way
    again = dbx.tl.fate_probabilities(adata, "terminal_states")
    np.testing.assert_allclose(np.asarray(again.probabilities), probabilities, atol=1e-6)
    assert dbx.pl.pseudotime(adata, basis="X_diffmap", path=tmp_path / "pt.png").stat().st_size > 0
    assert dbx.pl.fate_probabilities(adata, basis="X_diffmap", path=tmp_path / "fates.png").stat().st_size > 0


def test_transport_maps_face():
    tc = dbx.simulate_time_course(jr.key(1), jnp.array([2.0, 1.0, 0.5]), n_cells_per_day=80, n_genes=40)
    adata = ad.AnnData(np.asarray(tc.x), obs=pd.DataFrame({"day": np.asarray(tc.day)},
                                                          index=[f"c{i}" for i in range(240)]))
    maps = dbx.tl.transport_maps(adata)
    assert sorted(maps) == [(0.0, 1.0), (1.0, 2.0)] and maps[(0.0, 1.0)].tmap.shape == (80, 80)
    learned = adata.obs["growth_rate_learned"].to_numpy()
    assert np.all(np.isfinite(learned[:160])) and np.all(np.isnan(learned[160:]))
    assert adata.uns["transport_maps"]["params"]["lambda2"] == 50.0
    with pytest.raises(ValueError, match="time_key: 'time' is not a column"):
        dbx.tl.transport_maps(adata, "time")
    # wot's default growth_rate_field: obs["cell_growth_rate"] is the prior when present
    adata.obs["cell_growth_rate"] = np.where(np.arange(240) % 2 == 0, 2.0, 0.5)
    found = dbx.tl.transport_maps(adata)
    named = dbx.tl.transport_maps(adata.copy(), growth_key="cell_growth_rate")
    np.testing.assert_array_equal(np.asarray(found[(0.0, 1.0)].tmap), np.asarray(named[(0.0, 1.0)].tmap))
    assert not np.allclose(np.asarray(found[(0.0, 1.0)].tmap), np.asarray(maps[(0.0, 1.0)].tmap))
    assert adata.uns["transport_maps"]["params"]["growth_key"] == "cell_growth_rate"


def test_face_bad_input(cells):
    adata, _ = cells
    bare = ad.AnnData(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="neighbors_key: 'neighbors' is not in adata.uns"):
        dbx.tl.dpt(bare, root=0, key=jr.key(0))
    copy = adata.copy()
    copy.uns.pop("iroot", None)
    with pytest.raises(ValueError, match="root: not given"):
        dbx.tl.dpt(copy, key=jr.key(0))
    with pytest.raises(ValueError, match="root: cell index 300 is out of range"):
        dbx.tl.dpt(copy, root=300, key=jr.key(0))
    with pytest.raises(ValueError, match="terminal_states: not given"):
        dbx.tl.fate_probabilities(copy, pseudotime_key=None)
