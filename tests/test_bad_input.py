"""Bad input through the public API and the CLI, end to end: every case raises a clear error that names the field
and the problem, before any numerical work; files given as input are never modified and a failed run leaves no
partial output behind. (`test_validate.py` checks the boundary functions one by one; here the same problems are
fed to the entry points users call.)"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import anndata as ad
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import diffbio_eqx as dx
from diffbio_eqx import cli
from diffbio_eqx._doublets._scrublet import scrublet_scores
from diffbio_eqx._pipeline import prepare_inputs
from diffbio_eqx._simulate._de import simulate_conditions, simulate_switch_genes
from diffbio_eqx.io import layer_names


N_CELLS, N_GENES = 60, 40
SMALL = dict(latent_dim=4, hidden_dims=(16,), umap_hidden_size=8, umap_depth=1, ambient_hidden_dim=8,
             ambient_latent_dim=2, batch_correction_clusters=3, batch_correction_iterations=2)
TINY_FIT = dict(ambient_epochs=1, vae_epochs=1, umap_epochs=1, progress=False)


def _simulated(n_cells=N_CELLS, n_genes=N_GENES, seed=0):
    sim = dx.simulate(jr.key(seed), n_cells=n_cells, n_genes=n_genes, n_groups=3, n_batches=2)
    return np.asarray(sim.counts), np.asarray(sim.batches).astype(np.int32), np.asarray(sim.ambient_profile)


COUNTS, BATCHES, PROFILE = _simulated()
DATA = {"counts": COUNTS, "batch_labels": BATCHES, "ambient_profile": PROFILE}
PIPELINE = dx.create_single_cell_pipeline(n_genes=N_GENES, n_clusters=3, n_batches=2, key=jr.key(0), **SMALL)


def _with(array, index, value, dtype=None):
    out = np.array(array, dtype=dtype or np.asarray(array).dtype)
    out[index] = value
    return out


def _cells(n):
    return {"counts": COUNTS[:n], "batch_labels": BATCHES[:n], "ambient_profile": PROFILE}


# --- the array API: run_pipeline / fit_pipeline / prepare_inputs ------------------------------------------------
# (case id, data, call: "run" or "fit", extra fit settings, exact start of the message as a regex)
PIPELINE_CASES = [
    ("counts-strings", dict(DATA, counts=COUNTS.astype(str)), "run", {},
     r"counts: expected a numeric array, got dtype <U"),
    ("counts-complex", dict(DATA, counts=COUNTS.astype(np.complex64)), "run", {},
     r"counts: expected real numbers, got complex dtype complex64"),
    ("counts-rank-1", dict(DATA, counts=COUNTS[0]), "run", {},
     r"counts: expected a 2-D matrix \(n_cells, n_genes\), got shape \(40,\)"),
    ("counts-rank-3", dict(DATA, counts=COUNTS[None]), "fit", {},
     r"counts: expected a 2-D matrix \(n_cells, n_genes\), got shape \(1, 60, 40\)"),
    ("counts-genes-differ-from-model", dict(DATA, counts=COUNTS[:, :39]), "run", {},
     r"counts: has 39 genes but the model was built for 40; subset the new data to the training genes"),
    ("counts-nan", dict(DATA, counts=_with(COUNTS, (3, 5), np.nan, np.float64)), "fit", {},
     r"counts: 1 non-finite value\(s\) \(NaN or Inf\), first at cell 3, gene 5"),
    ("counts-inf-sparse", dict(DATA, counts=sp.csr_matrix(_with(COUNTS, (7, 2), np.inf, np.float64))), "fit", {},
     r"counts: 1 non-finite value\(s\) \(NaN or Inf\), first at cell 7, gene 2"),
    ("counts-negative", dict(DATA, counts=_with(COUNTS, (4, 1), -2.0, np.float64)), "fit", {},
     r"counts: 1 negative value\(s\), first -2.0 at cell 4, gene 1; counts must be >= 0"),
    ("counts-beyond-float32", dict(DATA, counts=_with(COUNTS, (2, 9), 1e40, np.float64)), "run", {},
     r"counts: value 1e\+40 at cell 2, gene 9 exceeds the float32 range"),
    ("counts-empty", dict(DATA, counts=np.zeros((0, N_GENES)), batch_labels=np.zeros(0, np.int32)), "fit", {},
     r"counts: empty matrix of shape \(0, 40\); need at least one cell and one gene"),
    ("counts-all-zero-cell", dict(DATA, counts=_with(COUNTS, 11, 0)), "fit", {},
     r"counts: cells with zero total counts at indices \[11\]; filter them out first"),
    ("one-cell", _cells(1), "fit", {},
     r"n_clusters: asked for 3 clusters but there are only 1 cells"),
    ("too-few-cells-for-the-umap-graph", _cells(12), "fit", {},
     r"counts: training the UMAP stage needs more than umap_n_neighbors=15 cells, got 12"),
    ("batch-labels-float", dict(DATA, batch_labels=BATCHES.astype(float)), "fit", {},
     r"batch_labels: expected integer codes, got dtype float64; convert categories to codes"),
    ("batch-labels-strings", dict(DATA, batch_labels=BATCHES.astype(str)), "run", {},
     r"batch_labels: expected a numeric array, got dtype <U"),
    ("batch-labels-negative", dict(DATA, batch_labels=_with(BATCHES, 5, -1)), "fit", {},
     r"batch_labels: value -1 at cell 5 is out of range \[0, 2\); 1 cell\(s\) out of range"),
    ("batch-labels-wrong-length", dict(DATA, batch_labels=BATCHES[:-1]), "fit", {},
     r"batch_labels: has length 59 but there are 60 cells"),
    ("batch-labels-two-covariates", dict(DATA, batch_labels=np.stack([BATCHES, BATCHES], 1)), "run", {},
     r"batch_labels: the pipeline takes one batch covariate, shape \(60,\)"),
    ("ambient-profile-wrong-length", dict(DATA, ambient_profile=PROFILE[:-1]), "run", {},
     r"ambient_profile: expected one value per gene, shape \(40,\), got \(39,\)"),
    ("ambient-profile-all-zero", dict(DATA, ambient_profile=np.zeros(N_GENES)), "fit", {},
     r"ambient_profile: all zeros; an ambient profile needs some mass"),
    ("ambient-profile-nan", dict(DATA, ambient_profile=_with(PROFILE, 6, np.nan)), "fit", {},
     r"ambient_profile: non-finite value at gene 6"),
    ("ambient-profile-negative", dict(DATA, ambient_profile=_with(PROFILE, 8, -0.5)), "run", {},
     r"ambient_profile: negative value -0.5 at gene 8"),
    ("data-missing-counts", {"batch_labels": BATCHES}, "run", {}, r"data: missing 'counts'"),
    ("data-unknown-key", dict(DATA, batch=BATCHES), "fit", {},
     r"data: unknown key\(s\) \['batch'\]; expected 'counts', 'ambient_profile', 'batch_labels'"),
    ("raw-counts-genes-differ", DATA, "fit", dict(raw_counts=np.ones((100, 30))),
     r"raw_counts: has 30 genes but the model was built for 40"),
    ("cell-type-labels-out-of-range", DATA, "fit",
     dict(fine_tune_epochs=1, cell_type_labels=np.full(N_CELLS, 3)),
     r"cell_type_labels: value 3 at cell 0 is out of range \[0, 3\)"),
    ("cell-type-labels-wrong-length", DATA, "fit", dict(fine_tune_epochs=1, cell_type_labels=np.zeros(5, int)),
     r"cell_type_labels: has length 5 but there are 60 cells"),
    ("umap-epochs-zero", DATA, "fit", dict(umap_epochs=0), r"umap_epochs: must be a positive integer, got 0"),
    ("batch-size-negative", DATA, "fit", dict(batch_size=-1), r"batch_size: must be a positive integer, got -1"),
]


@pytest.mark.parametrize("name, data, call, settings, message", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_entry_points_name_the_field(name, data, call, settings, message):
    snapshot = {k: (np.asarray(v.toarray() if sp.issparse(v) else v)).copy() for k, v in data.items()}
    with pytest.raises(ValueError, match=f"^{message}"):
        if call == "run":
            dx.run_pipeline(PIPELINE, data, key=jr.key(0))
        else:
            dx.fit_pipeline(PIPELINE, data, key=jr.key(0), **(TINY_FIT | settings))
    for k, v in data.items():  # the caller's arrays are never modified
        np.testing.assert_array_equal(np.asarray(v.toarray() if sp.issparse(v) else v), snapshot[k])


# Every numerical entry point `fit_pipeline` and `run_pipeline` reach: the stage trainers, Harmony, ambient removal,
# the VAE encoder, the UMAP trainer, the generic training loop and the compiled pipeline.
_FIT_ENTRY_POINTS = ("fit_ambient_removal", "remove_ambient", "fit_vae", "fit_adversarial_vae", "fit_mmd_vae",
                     "vae_latent", "fit_soft_kmeans", "fit_gaussian_mixture", "fit")


class _TrainingStarted(Exception):
    pass


@pytest.fixture
def training_forbidden(monkeypatch):
    """Replace every numerical entry point with one that raises `_TrainingStarted` (not a ValueError)."""
    from diffbio_eqx._harmony import _stage as harmony_stage
    from diffbio_eqx._pipeline import _fit as fit_module, _run as run_module
    from diffbio_eqx._umap import _stage as umap_stage

    def forbidden(name):
        def fail(*args, **kwargs):
            raise _TrainingStarted(name)
        return fail

    for name in _FIT_ENTRY_POINTS:
        monkeypatch.setattr(fit_module, name, forbidden(name))
    monkeypatch.setattr(umap_stage, "fit_umap", forbidden("fit_umap"))
    monkeypatch.setattr(harmony_stage.Harmony, "run", forbidden("Harmony.run"))
    monkeypatch.setattr(run_module, "_run_compiled", forbidden("_run_compiled"))


@pytest.mark.parametrize("name, data, call, settings, message", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_bad_input_is_refused_before_any_training(training_forbidden, name, data, call, settings, message):
    """The same cases with every trainer patched to fail: the ValueError comes first, so no numerical work ran."""
    with pytest.raises(ValueError, match=f"^{message}"):
        if call == "run":
            dx.run_pipeline(PIPELINE, data, key=jr.key(0))
        else:
            dx.fit_pipeline(PIPELINE, data, key=jr.key(0), **(TINY_FIT | settings))


def test_training_forbidden_reaches_the_trainers_on_good_input(training_forbidden):
    """Control for the test above: valid input does reach the patched trainers."""
    with pytest.raises(_TrainingStarted, match="fit_ambient_removal"):
        dx.fit_pipeline(PIPELINE, DATA, key=jr.key(0), **TINY_FIT)
    with pytest.raises(_TrainingStarted, match="_run_compiled"):
        dx.run_pipeline(PIPELINE, DATA, key=jr.key(0))


def test_too_many_clusters_for_the_cells_fails_before_training():
    wide = dx.create_single_cell_pipeline(n_genes=N_GENES, n_clusters=100, n_batches=2, key=jr.key(0), **SMALL)
    with pytest.raises(ValueError, match=r"^n_clusters: asked for 100 clusters but there are only 60 cells"):
        dx.fit_pipeline(wide, DATA, key=jr.key(0), **TINY_FIT)
    many = dx.create_single_cell_pipeline(n_genes=N_GENES, n_clusters=3, n_batches=2, key=jr.key(0),
                                          **(SMALL | {"batch_correction_clusters": 80}))
    with pytest.raises(ValueError, match=r"^batch_correction_clusters: Harmony asked for 80 clusters but there are "
                                         r"only 60 cells"):
        dx.fit_pipeline(many, DATA, key=jr.key(0), **TINY_FIT)
    with pytest.raises(ValueError, match=r"^batch_correction_clusters: Harmony asked for 80 clusters"):
        dx.run_pipeline(many, DATA, key=jr.key(0))  # no trained reference: Harmony would run on these cells


def test_non_integer_counts_warn_naming_the_field():
    with pytest.warns(dx.NonIntegerCountsWarning, match=r"^counts: contains non-integer values; the count "
                                                        r"likelihoods expect raw \(unnormalised\) counts"):
        prepare_inputs(PIPELINE, dict(DATA, counts=np.log1p(COUNTS)))


def test_one_batch_and_zero_genes_are_valid_input():
    """One batch (no labels) and genes that are zero in every cell are legitimate data, not errors."""
    one_batch = dx.create_single_cell_pipeline(n_genes=N_GENES, n_clusters=3, key=jr.key(0), **SMALL)
    counts = _with(COUNTS, (slice(None), [0, 17]), 0.0)
    counts, profile, labels = prepare_inputs(one_batch, {"counts": counts, "ambient_profile": PROFILE})
    assert labels.shape == (N_CELLS,) and int(labels.max()) == 0
    assert np.all(np.asarray(counts)[:, [0, 17]] == 0) and np.isclose(float(profile.sum()), 1.0)


# --- stage entry points ---------------------------------------------------------------------------------------
VAE = dx.VAENormalizer(N_GENES, 2, hidden_dims=(16,), latent_dim=4, key=jr.key(0))
AMBIENT = dx.AmbientRemoval(N_GENES, latent_dim=2, hidden_dim=8, key=jr.key(0))
UMAP = dx.ParametricUMAP(4, hidden_size=8, depth=1, key=jr.key(0))
X = np.asarray(jr.normal(jr.key(1), (N_CELLS, 4)))
ONE_EPOCH = dx.TrainSettings(n_epochs=1, progress=False)

STAGE_CASES = [
    ("fit_vae-genes-differ", lambda: dx.fit_vae(VAE, COUNTS[:, :30], BATCHES, key=jr.key(0), settings=ONE_EPOCH),
     r"counts: has 30 genes but the model was built for 40"),
    ("fit_vae-labels-missing", lambda: dx.fit_vae(VAE, COUNTS, key=jr.key(0), settings=ONE_EPOCH),
     r"batch_labels: the model has 2 batches; pass one label per cell"),
    ("fit_vae-zero-epochs", lambda: dx.fit_vae(VAE, COUNTS, BATCHES, key=jr.key(0),
                                               settings=dx.TrainSettings(n_epochs=0, progress=False)),
     r"n_epochs: must be >= 1, got 0"),
    ("vae_transform-new-data-genes-differ", lambda: dx.vae_transform(VAE, COUNTS[:, 1:], BATCHES),
     r"counts: has 39 genes but the model was built for 40; subset the new data to the training genes, in the "
     r"training order"),
    ("vae_transform-labels-out-of-range", lambda: dx.vae_transform(VAE, COUNTS, BATCHES + 1),
     r"batch_labels: value 2 at cell \d+ is out of range \[0, 2\)"),
    ("fit_ambient_removal-profile-all-zero",
     lambda: dx.fit_ambient_removal(AMBIENT, COUNTS, np.zeros(N_GENES), key=jr.key(0), settings=ONE_EPOCH),
     r"ambient_profile: all zeros"),
    ("remove_ambient-profile-wrong-length", lambda: dx.remove_ambient(AMBIENT, COUNTS, PROFILE[:-1]),
     r"ambient_profile: expected one value per gene, shape \(40,\), got \(39,\)"),
    ("remove_ambient-all-zero-cell", lambda: dx.remove_ambient(AMBIENT, _with(COUNTS, 0, 0), PROFILE),
     r"counts: cells with zero total counts at indices \[0\]"),
    ("harmony-nan", lambda: dx.harmony(_with(X, (2, 3), np.nan), BATCHES, key=jr.key(0)),
     r"x: 1 non-finite value\(s\), first at cell 2, dim 3"),
    ("harmony-labels-out-of-range", lambda: dx.harmony(X, BATCHES, n_batches=1, key=jr.key(0)),
     r"batch_labels: value 1 at cell \d+ is out of range \[0, 1\)"),
    ("harmony-n_clusters-above-n_cells", lambda: dx.harmony(X, BATCHES, n_clusters=61, key=jr.key(0)),
     r"n_clusters: asked for 61 clusters but there are only 60 cells"),
    ("Harmony-stage-without-key", lambda: dx.Harmony(n_batches=2)(X, BATCHES),
     r"Harmony needs `key`"),
    ("umap-fit-too-few-cells", lambda: dx.fit_umap(UMAP, X[:10], key=jr.key(0), settings=ONE_EPOCH),
     r"x: need more than n_neighbors=15 cells, got 10"),
    ("umap-fit-inf", lambda: dx.fit_umap(UMAP, _with(X, (0, 0), np.inf), key=jr.key(0), settings=ONE_EPOCH),
     r"x: 1 non-finite value\(s\), first at cell 0, dim 0"),
    ("umap-embed-wrong-dims", lambda: UMAP.embed(np.ones((5, 3))), r"x: has 3 dimensions, expected 4"),
    ("umap-embed-rank-1", lambda: UMAP.embed(np.ones(4)), r"x: expected a 2-D matrix \(n_cells, n_dims\), got shape"),
    ("soft-kmeans-n_clusters-above-n_cells", lambda: dx.SoftKMeans.from_data(X[:5], 6, key=jr.key(0)),
     r"n_clusters: asked for 6 clusters but there are only 5 cells"),
    ("soft-kmeans-zero-clusters", lambda: dx.SoftKMeans.from_data(X, 0, key=jr.key(0)),
     r"n_clusters: must be >= 1, got 0"),
    ("soft-kmeans-empty", lambda: dx.SoftKMeans.from_data(np.zeros((0, 4)), 2, key=jr.key(0)),
     r"x: empty matrix of shape \(0, 4\)"),
    ("fit-soft-kmeans-n_clusters-above-n_cells",
     lambda: dx.fit_soft_kmeans(dx.SoftKMeans(np.zeros((6, 4))), X[:5], key=jr.key(0)),
     r"n_clusters: asked for 6 clusters but there are only 5 cells"),
    ("fit-soft-kmeans-zero-clusters", lambda: dx.SoftKMeans(np.zeros((0, 4))),
     r"centroids: expected shape \(n_clusters >= 1, n_dims\), got \(0, 4\)"),
    ("fit-soft-kmeans-empty", lambda: dx.fit_soft_kmeans(dx.SoftKMeans(np.zeros((2, 4))), np.zeros((0, 4)),
                                                         key=jr.key(0)),
     r"x: empty matrix of shape \(0, 4\)"),
    ("fit-soft-kmeans-wrong-dims", lambda: dx.fit_soft_kmeans(dx.SoftKMeans(np.zeros((2, 3))), X, key=jr.key(0)),
     r"x: has 4 dimensions, expected 3"),
    # Settings that ran to NaN or to a late, unnamed failure before they were checked up front:
    ("fit-soft-kmeans-nan-temperature",
     lambda: dx.fit_soft_kmeans(dx.SoftKMeans(np.zeros((2, 4)), temperature=np.nan), X, key=jr.key(0)),
     r"temperature: must be finite and > 0, got nan"),
    ("fit-soft-kmeans-no-iterations",
     lambda: dx.fit_soft_kmeans(dx.SoftKMeans(np.zeros((2, 4))), X, key=jr.key(0), n_iter=0),
     r"n_iter: must be a whole number >= 1, got 0"),
    ("fit-mixture-two-cells-graph", lambda: dx.fit_gaussian_mixture(None, X[:2], key=jr.key(0)),
     r"init: the graph initialisation needs a kNN graph, so at least 3 cells, got 2; use init='kmeans'"),
    ("Harmony-nan-theta", lambda: dx.Harmony(theta=np.nan), r"theta: must be a number >= 0, got nan"),
    ("Harmony-negative-theta", lambda: dx.Harmony(theta=-1.0), r"theta: must be a number >= 0, got -1.0"),
    ("Harmony-nan-lamb", lambda: dx.Harmony(preset="classic", lamb=np.nan), r"lamb: must be a number, got nan"),
    ("Harmony-fractional-rounds", lambda: dx.Harmony(max_iter_harmony=2.5),
     r"max_iter_harmony: must be a whole number, got 2.5"),
    ("TrainSettings-nan-learning-rate", lambda: dx.TrainSettings(hyperparameters={"learning_rate": np.nan}),
     r"hyperparameters\['learning_rate'\]: must be finite and >= 0, got nan"),
    ("TrainSettings-negative-learning-rate", lambda: dx.TrainSettings(hyperparameters={"learning_rate": -1.0}),
     r"hyperparameters\['learning_rate'\]: must be finite and >= 0, got -1.0"),
    ("devices-repeated", lambda: dx.fit_vae(VAE, COUNTS, BATCHES, key=jr.key(0), settings=dx.TrainSettings(
        n_epochs=1, progress=False, devices=[jax.devices()[0]] * 2)), r"devices: each device at most once"),
    ("simulated-batches-over-a-column", lambda: dx.datasets.add_simulated_batches(_adata(), key="cell_type"),
     r"key: adata.obs already has a column 'cell_type'"),
    ("simulated-batches-huge-effect", lambda: dx.datasets.add_simulated_batches(_adata(), effect_scale=50.0),
     r"effect_scale: must be in \[0, 5\], got 50.0"),
    ("neighbor-graph-mix-ratio", lambda: dx.neighbor_graph(X, 5, set_op_mix_ratio=2.0),
     r"set_op_mix_ratio: must be in \[0, 1\] \(0 intersection, 1 union\), got 2.0"),
    # Array operators that returned NaN or meaningless values without a word:
    ("transport-map-nan-cell", lambda: dx.transport_map(_with(X[:20], 3, np.nan), X[20:], np.ones(20), 1.0,
                                                        dx.OTSettings(), n_pcs=2),
     r"x0: 4 non-finite value\(s\), first at cell 3, dim 0"),
    ("transport-map-negative-growth", lambda: dx.transport_map(X[:20], X[20:], -np.ones(20), 1.0, dx.OTSettings(),
                                                               n_pcs=2),
     r"growth_prior: must be finite and > 0, got -1.0 at index 0 \(20 in all\)"),
    ("scrublet-nan-counts", lambda: dx.Scrublet(5, n_prin_comps=4)(jnp.asarray(_with(COUNTS[:40], (2, 3), np.nan)),
                                                                    jnp.asarray(COUNTS[40:])),
     r"obs: must be finite and >= 0, got nan at index \(2, 3\) \(1 in all\)"),
    ("scrublet-scores-nan-counts",
     lambda: scrublet_scores(dx.Scrublet(5, n_prin_comps=4), jnp.asarray(COUNTS[:40]),
                             jnp.asarray(_with(COUNTS[40:], (0, 1), np.nan))),
     r"sim: must be finite and >= 0, got nan at index \(0, 1\)"),
    ("soft-kmeans-zero-temperature", lambda: dx.soft_kmeans(jnp.asarray(X), jnp.asarray(X[:3]), 0.0, n_iter=5),
     r"temperature: must be finite and > 0, got 0.0"),
    ("soft-kmeans-negative-temperature", lambda: dx.soft_kmeans(jnp.asarray(X), jnp.asarray(X[:3]), -1.0, n_iter=5),
     r"temperature: must be finite and > 0, got -1.0"),
    ("kmeans-plus-plus-more-clusters-than-cells", lambda: dx.kmeans_plus_plus(jnp.asarray(X[:5]), 6, key=jr.key(0)),
     r"n_clusters: asked for 6 clusters but there are only 5 cells"),
    ("spatial-graph-nan-coordinates", lambda: dx.spatial_graph(_with(X[:, :2], (4, 1), np.nan), n_neighbors=4),
     r"coordinates: 1 non-finite value\(s\), first at cell 4, dim 1"),
    ("silhouette-one-label", lambda: dx.silhouette_label(X, np.zeros(N_CELLS)),
     r"labels: silhouette needs 2 to n_cells - 1 = 59 distinct labels, got 1"),
]


def _ragged_translations():
    return dx.simulate_spatial_slices(2, 30, n_genes=60, translations=((0, 0), (1, 2, 3)))


# (case id, call, start of the message as a regex); each ran to NaN, empty or meaningless data, or failed deep in
# JAX / NumPy ("dot_general requires contracting dimensions", "scale < 0", "lam value too large", a gather out of
# bounds), before it was named.
SIMULATOR_CASES = [
    ("time-course-negative-rate", lambda: dx.simulate_time_course(jr.key(0), jnp.array([1.0, -1.0]), n_genes=5),
     r"growth_rates: must be finite and > 0, got \[1.0, -1.0\]"),
    ("time-course-2d-rates", lambda: dx.simulate_time_course(jr.key(0), jnp.ones((2, 2))),
     r"growth_rates: expected a 1-D array"),
    ("time-course-no-days", lambda: dx.simulate_time_course(jr.key(0), jnp.ones(2), n_days=0),
     r"n_days: must be a whole number >= 1, got 0"),
    ("time-course-too-few-genes", lambda: dx.simulate_time_course(jr.key(0), jnp.ones(3), n_genes=3),
     r"n_genes: 3 fates need at least 4 genes"),
    ("time-course-nan-noise", lambda: dx.simulate_time_course(jr.key(0), jnp.ones(2), noise=float("nan")),
     r"noise: must be finite and >= 0, got nan"),
    ("branching-no-cells", lambda: dx.simulate_branching(jr.key(0), 0), r"n_cells: must be a whole number >= 1"),
    ("branching-no-fates", lambda: dx.simulate_branching(jr.key(0), 20, n_fates=0),
     r"n_fates: must be a whole number >= 1, got 0"),
    ("branching-time-outside-path", lambda: dx.simulate_branching(jr.key(0), 20, branch_time=1.5),
     r"branch_time: must be in \[0, 1\], got 1.5"),
    ("branching-negative-noise", lambda: dx.simulate_branching(jr.key(0), 20, noise=-1.0),
     r"noise: must be finite and >= 0, got -1.0"),
    ("spatial-no-spots", lambda: dx.simulate_spatial(0), r"n_spots: must be a whole number >= 1, got 0"),
    ("spatial-negative-library", lambda: dx.simulate_spatial(30, n_genes=60, library_size=-1.0),
     r"library_size: must be finite and > 0, got -1.0"),
    ("spatial-zero-marker-fold", lambda: dx.simulate_spatial(30, n_genes=60, marker_fold=0.0),
     r"marker_fold: must be finite and > 0, got 0.0"),
    ("slices-none", lambda: dx.simulate_spatial_slices(0, 30), r"n_slices: must be a whole number >= 1, got 0"),
    ("slices-nan-jitter", lambda: dx.simulate_spatial_slices(2, 30, n_genes=60, jitter=float("nan")),
     r"jitter: must be finite and >= 0, got nan"),
    ("slices-nan-rotation", lambda: dx.simulate_spatial_slices(2, 30, n_genes=60, rotations=(0.0, float("nan"))),
     r"rotations: must be finite, got \[0.0, nan\]"),
    ("slices-ragged-translations", _ragged_translations, r"translations: expected one \(x, y\) shift per slice"),
    ("grn-no-targets", lambda: dx.simulate_grn(n_cells=10, n_tfs=3, n_targets=0),
     r"n_targets: must be a whole number >= 1, got 0"),
    ("grn-more-regulators-than-tfs", lambda: dx.simulate_grn(n_cells=10, n_tfs=3, n_targets=5, max_regulators=5),
     r"max_regulators: each target draws distinct regulators from the 3 TFs"),
    ("grn-repression-probability", lambda: dx.simulate_grn(n_cells=10, n_tfs=3, n_targets=5, repression_prob=1.5),
     r"repression_prob: must be in \[0, 1\], got 1.5"),
    ("grn-negative-hill", lambda: dx.simulate_grn(n_cells=10, n_tfs=3, n_targets=5, hill_n=-1.0),
     r"hill_n: must be finite and > 0, got -1.0"),
    ("communication-fewer-cells-than-neighbours",
     lambda: dx.simulate_spatial_communication(n_cells=5, n_neighbors=10),
     r"n_cells: each cell's 10 nearest others need more cells than that, got 5"),
    ("communication-overflowing-effect", lambda: dx.simulate_spatial_communication(n_cells=50, neighbour_effect=1e3),
     r"neighbour_effect: must be finite, between -20 and 20"),
    ("conditions-one-sample", lambda: simulate_conditions(key=jr.key(0), n_genes=10, n_samples=1),
     r"n_samples: must be a whole number >= 2, got 1"),
    ("conditions-de-fraction", lambda: simulate_conditions(key=jr.key(0), n_genes=10, de_fraction=1.5),
     r"de_fraction: must be in \[0, 1\], got 1.5"),
    ("conditions-negative-dispersion", lambda: simulate_conditions(key=jr.key(0), n_genes=10, dispersion=-1.0),
     r"dispersion: must be finite and > 0, got -1.0"),
    ("switch-negative-genes", lambda: simulate_switch_genes(key=jr.key(0), n_cells=10, n_switch=-1),
     r"n_switch: must be a whole number >= 0, got -1"),
    ("switch-no-genes", lambda: simulate_switch_genes(key=jr.key(0), n_cells=10, n_switch=0, n_null=0),
     r"n_switch, n_null: need at least one gene in all"),
    ("switch-nan-dropout", lambda: simulate_switch_genes(key=jr.key(0), n_cells=10, dropout_lambda=float("nan")),
     r"dropout_lambda: must be finite and >= 0, got nan"),
    ("sparse-boolean-size", lambda: dx.simulate_sparse(jr.key(0), n_cells=5, n_genes=True),
     r"n_genes: must be a whole number >= 1, got True"),
    ("sparse-de-probability", lambda: dx.simulate_sparse(jr.key(0), n_cells=5, n_genes=10, de_prob=2.0),
     r"de_prob: must be in \[0, 1\], got 2.0"),
    ("sparse-negative-lib-scale", lambda: dx.simulate_sparse(jr.key(0), n_cells=5, n_genes=10, lib_scale=-1.0),
     r"lib_scale: must be finite and > 0, got -1.0"),
]


@pytest.mark.parametrize("name, call, message", STAGE_CASES + SIMULATOR_CASES,
                         ids=[c[0] for c in STAGE_CASES + SIMULATOR_CASES])
def test_stage_entry_points_name_the_field(name, call, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        call()


def test_traced_operator_settings_still_pass_the_value_checks():
    """The operators' value checks read concrete values only: vmap and jit over a setting run as before."""
    x = jnp.asarray(X)
    centroids = jax.vmap(lambda t: dx.soft_kmeans(x, x[:3], t, n_iter=3).centroids)(jnp.array([0.5, 1.0]))
    assert centroids.shape == (2, 3, 4)
    tmap = jax.jit(lambda g: dx.transport_map(x[:20], x[20:], g, jnp.asarray(1.0), dx.OTSettings(), n_pcs=2).tmap)(
        jnp.ones(20))
    assert tmap.shape == (20, 40) and bool(np.all(np.isfinite(np.asarray(tmap))))


def test_without_the_type_checker_users_get_the_same_named_errors(tmp_path):
    """Shape/dtype mistakes that the test suite's jaxtyping hook intercepts first (a `TypeCheckError` naming the
    parameter) reach the package's own checks in user code, which raise `ValueError`s naming the field."""
    script = textwrap.dedent("""
        import json, numpy as np, jax.random as jr, diffbio_eqx as dx
        import anndata as ad
        x = np.asarray(jr.normal(jr.key(1), (60, 4))); labels = np.arange(60) % 2
        cells = ad.AnnData(np.random.default_rng(0).poisson(3.0, (60, 12)).astype(np.float32))
        cases = {
            "harmony-labels-wrong-length": lambda: dx.harmony(x, labels[:-1], key=jr.key(0)),
            "harmony-labels-float": lambda: dx.harmony(x, labels.astype(float), key=jr.key(0)),
            "harmony-x-rank-1": lambda: dx.harmony(x[:, 0], labels, key=jr.key(0)),
            "harmony-x-strings": lambda: dx.harmony(x.astype(str), labels, key=jr.key(0)),
            "run_pipeline-data-not-a-mapping": lambda: dx.run_pipeline(
                dx.create_single_cell_pipeline(n_genes=4, key=jr.key(0)), [x], key=jr.key(0)),
            "archetypes-float-count": lambda: dx.tl.archetypes(cells, 3.0, key=jr.key(0), use_rep="X"),
            "solo-fractional-ratio": lambda: dx.pp.solo(cells, key=jr.key(0), doublet_ratio=1.5),
            "to_anndata-not-an-anndata": lambda: dx.io.to_anndata({"X": x}, {}),
            "TrainSettings-fractional-epochs": lambda: dx.TrainSettings(n_epochs=1.5),
            "volcano-not-a-table": lambda: dx.pl.volcano({"padj": [0.1]}),
            "devices-not-devices": lambda: dx.fit_umap(dx.ParametricUMAP(4, key=jr.key(0)), x, key=jr.key(0),
                                                       settings=dx.TrainSettings(n_epochs=1, devices=[0])),
            "training-not-a-mapping": lambda: dx.pl.training([1.0, 2.0]),
            "write_h5ad-not-an-anndata": lambda: dx.io.write_h5ad([x], "never.h5ad"),
        }
        out = {}
        for name, call in cases.items():
            try:
                call(); out[name] = "no error"
            except Exception as error:
                out[name] = [type(error).__name__, str(error)]
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=_root(), check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {
        "harmony-labels-wrong-length": r"^batch_labels: has length 59 but there are 60 cells",
        "harmony-labels-float": r"^batch_labels: expected integer codes, got dtype float64",
        "harmony-x-rank-1": r"^x: expected a 2-D matrix \(n_cells, n_dims\), got shape \(60,\)",
        "harmony-x-strings": r"^x: expected a numeric array, got dtype <U",
        "run_pipeline-data-not-a-mapping": r"^data: expected a mapping with 'counts'",
        "archetypes-float-count": r"^n_archetypes: must be a whole number >= 1, got 3.0",
        "solo-fractional-ratio": r"^doublet_ratio: must be a whole number >= 1, got 1.5",
        "to_anndata-not-an-anndata": r"^adata: expected an anndata.AnnData, got dict",
        "TrainSettings-fractional-epochs": r"^n_epochs: must be a whole number, got 1.5",
        "volcano-not-a-table": r"^table: expected a pandas DataFrame",
        "devices-not-devices": r"^devices: expected JAX devices \(from jax.devices\(\)\), got 0",
        "training-not-a-mapping": r"^curves: expected \{stage",
        "write_h5ad-not-an-anndata": r"^adata: expected an anndata.AnnData, got list",
    }
    for name, pattern in expected.items():
        kind, message = out[name]
        assert kind == "ValueError" and re.search(pattern, message), (name, out[name])


def _root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1]


# --- AnnData ---------------------------------------------------------------------------------------------------
def _adata(n_cells=120, seed=0):
    counts, batches, _ = _simulated(n_cells=n_cells, seed=seed)
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(batches == 0, "donor_a", "donor_b")),
                        "cell_type": pd.Categorical([f"t{i % 3}" for i in range(n_cells)])},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(counts.shape[1])])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def _adata_with(**changes):
    adata = _adata(n_cells=N_CELLS)
    if "x" in changes:
        adata.X = changes["x"]
    if "obs_batch" in changes:
        adata.obs["batch"] = changes["obs_batch"]
    return adata


ANNDATA_CASES = [
    ("missing-obs-key", dict(), dict(batch_key="donor"),
     r"batch_key: 'donor' is not a column of adata.obs \(columns: \['batch', 'cell_type'\]\)"),
    ("missing-layer", dict(), dict(layer="counts"), r"layer: 'counts' is not in adata.layers \(has \[\]\)"),
    ("obs-batch-missing-value", dict(obs_batch=pd.Categorical(["a"] * 4 + [None] + ["b"] * 55)),
     dict(batch_key="batch"), r"adata.obs\['batch'\]: missing value at cell 4"),
    ("negative-counts-in-X", dict(x=_with(COUNTS, (9, 9), -1.0, np.float32)), dict(),
     r"adata.X: 1 negative value\(s\), first -1.0 at cell 9, gene 9"),
    ("nan-counts-in-X", dict(x=sp.csr_matrix(_with(COUNTS, (1, 2), np.nan, np.float32))), dict(),
     r"adata.X: 1 non-finite value\(s\) \(NaN or Inf\), first at cell 1, gene 2"),
]


@pytest.mark.parametrize("name, changes, kwargs, message", ANNDATA_CASES, ids=[c[0] for c in ANNDATA_CASES])
def test_fit_anndata_names_the_field(name, changes, kwargs, message):
    adata = _adata_with(**changes)
    before = adata.copy()
    with pytest.raises(ValueError, match=f"^{message}"):
        dx.fit_anndata(adata, key=jr.key(0), config=dx.SingleCellPipelineConfig(n_clusters=3, **SMALL), **TINY_FIT,
                       **kwargs)
    assert adata.obs.equals(before.obs) and list(adata.obsm.keys()) == [] and layer_names(adata) == []


def test_fit_anndata_rejects_what_is_not_an_anndata():
    with pytest.raises(ValueError, match=r"^adata: expected an anndata.AnnData, got ndarray"):
        dx.io.from_anndata(COUNTS)


# --- files -----------------------------------------------------------------------------------------------------
def _snapshot(path: pathlib.Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def _listing(folder: pathlib.Path) -> list[str] | None:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


@pytest.fixture
def h5ad(tmp_path) -> pathlib.Path:
    path = tmp_path / "input" / "cells.h5ad"
    path.parent.mkdir()
    _adata().write_h5ad(path)
    return path


def test_truncated_h5ad_is_named_and_left_untouched(h5ad):
    truncated = h5ad.with_name("truncated.h5ad")
    truncated.write_bytes(h5ad.read_bytes()[: h5ad.stat().st_size // 2])
    before = _snapshot(truncated)
    with pytest.raises(ValueError, match=r"^input: '.*truncated.h5ad' could not be read as an h5ad file \(.*\); it "
                                         r"may be corrupt or truncated"):
        dx.io.read_h5ad(truncated)
    assert _snapshot(truncated) == before


def test_writers_refuse_a_missing_folder_and_the_input_path(h5ad, tmp_path):
    adata = dx.io.read_h5ad(h5ad)
    before = _snapshot(h5ad)
    with pytest.raises(ValueError, match=r"^output: '.*cells.h5ad' is the input file; choose another output path"):
        dx.io.write_h5ad(adata, h5ad, input_path=h5ad)
    with pytest.raises(ValueError, match=r"^output: folder '.*missing' does not exist"):
        dx.io.write_h5ad(adata, tmp_path / "missing" / "out.h5ad")
    with pytest.raises(ValueError, match=r"^output: folder '.*missing' does not exist"):
        dx.save_pipeline(tmp_path / "missing" / "pipeline.eqx", PIPELINE)
    assert _snapshot(h5ad) == before
    assert _listing(h5ad.parent) == ["cells.h5ad"]


def test_truncated_pipeline_checkpoint_is_named(tmp_path):
    path = dx.save_pipeline(tmp_path / "pipeline.eqx", PIPELINE)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"^checkpoint: '.*pipeline.eqx' could not be read \(.*\); it may be "
                                         r"truncated"):
        dx.load_pipeline(path)
    path.write_bytes(b"not a pipeline\n")
    with pytest.raises(ValueError, match=r"^checkpoint: '.*pipeline.eqx' is not a diffbio_eqx pipeline file"):
        dx.load_pipeline(path)


# --- the CLI ---------------------------------------------------------------------------------------------------
CLI_EPOCHS = ["--vae-epochs", "1", "--ambient-epochs", "1", "--umap-epochs", "1", "--quiet"]


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _assert_cli_error(capsys, argv, message, h5ad, out, *, out_before=None):
    before = _snapshot(h5ad)
    code, err = _cli(capsys, "run", *argv, *CLI_EPOCHS)
    assert code != 0
    assert err.startswith("diffbio-eqx: error: ")
    assert re.search(message, err), err
    assert _snapshot(h5ad) == before, "the input file is untouched"
    assert _listing(h5ad.parent) == [h5ad.name], "nothing is written next to the input"
    assert _listing(out) == out_before, "no partial output"


def test_cli_missing_input_file(capsys, h5ad, tmp_path):
    out = tmp_path / "out"
    _assert_cli_error(capsys, [h5ad.with_name("nope.h5ad"), "--out", out],
                      r"input: '.*nope.h5ad' does not exist or is not a file", h5ad, out)


def test_cli_corrupt_input_file(capsys, h5ad, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    bad = corrupt / "cells.h5ad"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    out = tmp_path / "out"
    _assert_cli_error(capsys, [bad, "--out", out], r"input: '.*cells.h5ad' could not be read as an h5ad file", bad,
                      out)


def test_cli_missing_batch_key(capsys, h5ad, tmp_path):
    out = tmp_path / "out"
    _assert_cli_error(capsys, [h5ad, "--batch-key", "donor", "--out", out],
                      r"batch_key: 'donor' is not a column of adata.obs", h5ad, out)


def test_cli_missing_label_key(capsys, h5ad, tmp_path):
    out = tmp_path / "out"
    _assert_cli_error(capsys, [h5ad, "--label-key", "celltype", "--out", out],
                      r"--label-key: 'celltype' is not a column of adata.obs", h5ad, out)


def test_cli_output_equal_to_the_input(capsys, h5ad):
    _assert_cli_error(capsys, [h5ad, "--out", h5ad], r"--out: '.*cells.h5ad' would overwrite the input file", h5ad,
                      h5ad.parent / "none")
    named_like_the_output = h5ad.rename(h5ad.with_name("result.h5ad"))
    _assert_cli_error(capsys, [named_like_the_output, "--out", h5ad.parent],
                      r"--out: '.*input' would overwrite the input file", named_like_the_output, h5ad.parent,
                      out_before=["result.h5ad"])


def test_cli_output_folder_cannot_be_created(capsys, h5ad, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _assert_cli_error(capsys, [h5ad, "--out", blocker / "out"], r"--out: cannot create '.*a_file/out'", h5ad,
                      blocker / "out")


def test_cli_output_folder_not_writable(capsys, h5ad, tmp_path, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes anywhere: simulate the refusal the file system would give
        import diffbio_eqx._job as job

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(job.tempfile, "mkdtemp", refuse)
    try:
        _assert_cli_error(capsys, [h5ad, "--out", out], r"--out: folder '.*readonly' is not writable", h5ad, out,
                          out_before=["keep.txt"])
    finally:
        out.chmod(0o755)


def test_cli_nan_in_the_counts(capsys, tmp_path):
    adata = _adata()
    adata.X = adata.X.toarray()
    adata.X[5, 3] = np.nan
    folder = tmp_path / "input"
    folder.mkdir()
    path = folder / "nan.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out"
    _assert_cli_error(capsys, [path, "--out", out],
                      r"adata.X: 1 non-finite value\(s\) \(NaN or Inf\), first at cell 5, gene 3", path, out)


def test_cli_unparsable_config(capsys, h5ad, tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text("n_clusters = = 3")
    out = tmp_path / "out"
    _assert_cli_error(capsys, [h5ad, "--config", config, "--out", out],
                      r"config: '.*settings.toml' could not be parsed", h5ad, out)


def test_cli_zero_epochs_is_refused_by_the_parser(capsys, h5ad, tmp_path):
    with pytest.raises(SystemExit) as exit:
        cli.main(["run", str(h5ad), "--vae-epochs", "0", "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert "argument --vae-epochs: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_failure_after_the_output_folder_exists_leaves_nothing_behind(capsys, h5ad, tmp_path):
    """A setting that only fails once training starts (more clusters than cells): the new folder is removed, and a
    folder that already existed keeps exactly what it had."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"n_clusters": 500}))
    fresh = tmp_path / "fresh"
    _assert_cli_error(capsys, [h5ad, "--config", config, "--out", fresh / "nested"],
                      r"n_clusters: asked for 500 clusters but there are only 120 cells", h5ad, fresh)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("earlier results")
    _assert_cli_error(capsys, [h5ad, "--config", config, "--out", existing],
                      r"n_clusters: asked for 500 clusters", h5ad, existing, out_before=["keep.txt"])


def _small_config(folder: pathlib.Path) -> pathlib.Path:
    """The pipeline cut to the VAE and soft k-means (few programs to compile), for tests of the output folder."""
    config = folder / "small.json"
    config.write_text(json.dumps({"enable_ambient_removal": False, "enable_batch_correction": False,
                                  "enable_dim_reduction": False, "n_clusters": 3, "clustering_method": "soft_kmeans",
                                  "latent_dim": 4, "hidden_dims": [16]}))
    return config


def test_cli_failure_while_writing_leaves_nothing_behind(capsys, h5ad, tmp_path, monkeypatch):
    """Training succeeds, result.h5ad and pipeline.eqx are written, then the plot fails: none of the run's files
    appear in the output folder."""
    import diffbio_eqx._job as job

    staged = []

    def broken_plot(path, *args, **kwargs):
        staged.extend(sorted(p.name for p in pathlib.Path(path).parent.iterdir()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "plot_training", broken_plot)
    config = _small_config(tmp_path)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    _assert_cli_error(capsys, [h5ad, "--batch-key", "batch", "--config", config, "--out", out],
                      r"OSError: .*No space left on device", h5ad, out, out_before=["keep.txt"])
    assert {"result.h5ad", "pipeline.eqx"} <= set(staged), "the plot failed after the results were written"


def test_cli_where_the_counts_are_and_the_gene_names(capsys, h5ad, tmp_path):
    """A missing layer, a missing `.raw`, a missing gene column and log-normalised `X`: named, nothing written."""
    out = tmp_path / "out"
    _assert_cli_error(capsys, [h5ad, "--layer", "counts", "--out", out],
                      r"layer: 'counts' is not in adata.layers \(has \[\]\)", h5ad, out)
    _assert_cli_error(capsys, [h5ad, "--use-raw", "--out", out], r"--use-raw: the input has no .raw", h5ad, out)
    _assert_cli_error(capsys, [h5ad, "--gene-key", "symbol", "--out", out],
                      r"--gene-key: 'symbol' is not a column of adata.var", h5ad, out)
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    logged = tmp_path / "logged" / "cells.h5ad"
    logged.parent.mkdir()
    adata.write_h5ad(logged)
    _assert_cli_error(capsys, [logged, "--out", out],
                      r"adata.X: holds non-integer values \(largest .*, looks log-transformed\), not raw counts; "
                      r"counts are in adata.layers\['counts'\] \(--layer counts\)", logged, out)


def test_cli_output_would_overwrite_another_input(capsys, h5ad, tmp_path):
    """Not only the input: the reference (and config, markers) files are never overwritten, by `run` or
    `annotate`."""
    folder = tmp_path / "refdir"
    folder.mkdir()
    reference = folder / "result.h5ad"
    shutil.copy(h5ad, reference)
    before = _snapshot(reference)
    _assert_cli_error(capsys, [h5ad, "--reference", reference, "--label-key", "cell_type", "--out", folder],
                      r"--out: '.*refdir' would overwrite the --reference file", h5ad, folder,
                      out_before=["result.h5ad"])
    code, err = _cli(capsys, "annotate", h5ad, "--reference", reference, "--label-key", "cell_type", "--out",
                     reference)
    assert code == 2 and "--out: '" in err and "would overwrite the --reference file" in err, err
    assert _snapshot(reference) == before


def test_cli_a_folder_where_an_output_file_goes_is_refused_before_training(capsys, h5ad, tmp_path):
    out = tmp_path / "out"
    (out / "result.h5ad" / "x").mkdir(parents=True)
    (out / "report.md").write_text("earlier report")
    _assert_cli_error(capsys, [h5ad, "--out", out], r"--out: '.*result.h5ad' is a folder where the job writes",
                      h5ad, out, out_before=["report.md", "result.h5ad", "result.h5ad/x"])
    assert (out / "report.md").read_text() == "earlier report"


def test_cli_output_folder_that_cannot_be_made_leaves_no_parents(capsys, h5ad, tmp_path):
    parent = tmp_path / "new"
    _assert_cli_error(capsys, [h5ad, "--out", parent / ("x" * 300)], r"--out: cannot create '.*new/x+'", h5ad,
                      parent)


CONFIG_CASES = [
    ("widths-not-a-list", {"hidden_dims": 5}, r"hidden_dims: must be a list of integers, got 5"),
    ("switch-as-text", {"enable_clustering": "no"}, r"enable_clustering: must be true or false, got 'no'"),
    ("number-as-text", {"clustering_temperature": "x"}, r"clustering_temperature: must be a number, got 'x'"),
    ("no-hidden-units", {"umap_hidden_size": 0}, r"umap_hidden_size: must be a positive integer, got 0"),
    ("negative-theta", {"harmony_theta": -5}, r"harmony_theta: must be >= 0, got -5"),
    ("not-a-table", {"pipeline": 3}, r"config: '.*settings.json' must hold a table of settings"),
    ("data-shape", {"n_batches": 5}, r"--config: n_batches is 5 in '.*settings.json', but the input has 2"),
]


@pytest.mark.parametrize("name, settings, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_cli_config_values_of_the_wrong_type_or_range_are_named(capsys, h5ad, tmp_path, name, settings, message):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings))
    _assert_cli_error(capsys, [h5ad, "--batch-key", "batch", "--config", config, "--out", tmp_path / "out"], message,
                      h5ad, tmp_path / "out")


def test_cli_config_that_is_not_text_is_named(capsys, h5ad, tmp_path):
    config = tmp_path / "settings.toml"
    config.write_bytes(b"\xff\xfe\x00 binary")
    _assert_cli_error(capsys, [h5ad, "--config", config, "--out", tmp_path / "out"],
                      r"config: '.*settings.toml' could not be parsed", h5ad, tmp_path / "out")


def test_cli_seed_outside_what_numpy_and_jax_take(capsys, h5ad, tmp_path):
    with pytest.raises(SystemExit) as exit:
        cli.main(["run", str(h5ad), "--seed", str(10**20), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert "argument --seed: expected a whole number in [0, 2**32)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_terminated_run_leaves_nothing_behind(capsys, h5ad, tmp_path, monkeypatch):
    """SIGTERM (what `timeout`, `kill` and batch schedulers send) unwinds like Ctrl-C: the staged files and the
    folders the run made are removed, and the command says it was interrupted, without a traceback."""
    import signal

    import diffbio_eqx._job as job

    monkeypatch.setattr(job, "plot_training", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    config = _small_config(tmp_path)
    code, err = _cli(capsys, "run", h5ad, "--config", config, "--out", tmp_path / "new" / "out", *CLI_EPOCHS)
    assert code == 130 and err == "diffbio-eqx: interrupted; nothing was written\n", err
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is the command's only while it runs"


def test_cli_annotate_options_that_do_not_fit_the_mode_and_non_counts(capsys, h5ad, tmp_path):
    markers = tmp_path / "markers.json"
    markers.write_text(json.dumps({"t0": ["gene0", "gene1"], "t1": ["gene2"]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{\n")
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    logged = tmp_path / "logged.h5ad"
    adata.write_h5ad(logged)
    out = tmp_path / "annotated.h5ad"
    cases = [
        ([h5ad, "--reference", h5ad, "--label-key", "cell_type", "--markers", markers],
         r"--markers: only for --mode cellassign \(the mode is 'celltypist'\)"),
        ([h5ad, "--mode", "cellassign", "--markers", markers, "--majority-voting"],
         r"--majority-voting: only for --mode celltypist \(the mode is 'cellassign'\)"),
        ([h5ad, "--mode", "cellassign", "--markers", broken], r"--markers: '.*broken.json' could not be parsed"),
        ([logged, "--mode", "cellassign", "--markers", markers],
         r"QUERY .*logged.h5ad: adata.X: holds non-integer values .*; counts are in adata.layers\['counts'\] "
         r"\(--layer counts\)"),
    ]
    for argv, message in cases:
        code, err = _cli(capsys, "annotate", *argv, "--out", out)
        assert code == 2 and re.search(message, err), err
        assert not out.exists()


def test_cli_rerun_into_a_folder_replaces_the_earlier_runs_outputs(capsys, h5ad, tmp_path):
    """A second run into the same folder leaves one run's results, as its report lists them: an earlier run's
    `doublets.png` (this run has no doublet filter) goes, the user's own files stay."""
    config = _small_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "doublets.png").write_bytes(b"an earlier run's histogram")
    (out / "notes.txt").write_text("mine")
    code, err = _cli(capsys, "run", h5ad, "--config", config, "--out", out, *CLI_EPOCHS)
    assert code == 0, err
    assert not (out / "doublets.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert {"result.h5ad", "report.md", "pipeline.eqx", "training.png"} <= {p.name for p in out.iterdir()}


def test_model_files_that_are_not_what_they_claim_are_named(tmp_path):
    """`load_vae` and `load_celltypist` name the file for a truncated, empty or garbage file and for another
    kind of saved model (they raised KeyError, JSONDecodeError or Equinox's TreePathError)."""
    saved = dx.save_vae(tmp_path / "vae.eqx", VAE)
    assert dx.load_vae(saved).n_genes == N_GENES
    truncated = tmp_path / "truncated.eqx"
    truncated.write_bytes(saved.read_bytes()[:-100])
    empty = tmp_path / "empty.eqx"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.eqx"
    garbage.write_bytes(b"\x00\x01 not a model")
    pipeline = dx.save_pipeline(tmp_path / "pipeline.eqx", PIPELINE)
    for path in (truncated, empty, garbage, pipeline):
        with pytest.raises(ValueError, match=rf"^path: '.*{path.name}' could not be read as a VAE saved by save_vae"):
            dx.load_vae(path)
    with pytest.raises(ValueError, match=r"^path: '.*vae.eqx' could not be read as a CellTypist model"):
        dx.load_celltypist(saved)
    with pytest.raises(ValueError, match=r"^path: '.*nowhere.eqx' does not exist"):
        dx.load_vae(tmp_path / "nowhere.eqx")
