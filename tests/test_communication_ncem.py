"""NCEM-style spatial model: neighbours help prediction exactly when the simulation makes them matter."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from diffbio_eqx._communication._ncem import SpatialNCEM, fit_ncem, held_out_r2, neighbour_shares, split_cells
from diffbio_eqx._core._neighbors import neighbor_graph
from diffbio_eqx._simulate._network import simulate_spatial_communication


def _r2_pair(effect):
    sim = simulate_spatial_communication(neighbour_effect=effect, n_cells=2000, seed=3)
    y, types = jnp.log1p(jnp.asarray(sim.counts)), jnp.asarray(sim.cell_types)
    indices = neighbor_graph(sim.positions.astype(np.float32), n_neighbors=sim.n_neighbors + 1).indices
    train, test = split_cells(y.shape[0], 0.25, key=jr.key(1))
    r2 = {}
    for use in (True, False):
        fitted = fit_ncem(SpatialNCEM(4, y.shape[1], use_neighbours=use), y, types, indices, rows=train, key=jr.key(0))
        r2[use] = float(held_out_r2(fitted.model, y, types, indices, test))
        if use:
            model = fitted.model
    return sim, model, r2


@pytest.mark.parametrize("effect", [0.8, 0.0])
def test_neighbour_model_beats_baseline_only_when_neighbours_drive_expression(effect):
    sim, model, r2 = _r2_pair(effect)
    if effect > 0:
        assert r2[True] > r2[False] + 0.005
        # The learnt sender -> receiver strengths follow the simulated ones.
        corr = np.corrcoef(np.asarray(model.interaction).ravel(), sim.interaction.ravel())[0, 1]
        assert corr > 0.5
    else:
        assert r2[True] <= r2[False] + 1e-3


def test_neighbour_shares_leave_the_cell_out():
    indices = jnp.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    shares = neighbour_shares(indices, jnp.array([0, 1, 1]), 2)
    np.testing.assert_allclose(shares, [[0, 1], [0.5, 0.5], [0.5, 0.5]])
