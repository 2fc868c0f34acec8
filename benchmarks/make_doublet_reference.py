"""Reference doublet scores from scvi-tools' SOLO (torch) for tests/test_doublets_solo.py; torch stays out of the tests.

How the stored file was made (CPU, scvi-tools 1.4.2, torch CPU):

    .venv/bin/python benchmarks/make_doublet_reference.py

It simulates the test's droplets (`simulate_doublets(jr.key(0), n_cells=1000, n_genes=500, n_groups=5,
doublet_rate=0.1)`), trains `scvi.model.SCVI` with its defaults (max_epochs given below), then
`SOLO.from_scvi_model(...)` with its defaults (doublet_ratio 2, early stopping), and writes
`tests/data/doublets_solo_reference.npz`: the counts' checksum, SOLO's doublet probabilities of the observed
cells, the truth, SOLO's AUPRC and AUROC, and the settings.
"""

import json
import sys
from pathlib import Path

import jax.random as jr
import numpy as np


N_CELLS, N_GENES, SCVI_EPOCHS = 1000, 500, 100
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "doublets_solo_reference.npz"


def droplets(n_cells: int = N_CELLS, n_genes: int = N_GENES, seed: int = 0):
    """The simulated droplets shared with the tests and the benchmark."""
    from diffbio_eqx._simulate._doublets import simulate_doublets

    sim = simulate_doublets(jr.key(seed), n_cells=n_cells, n_genes=n_genes, n_groups=5, doublet_rate=0.1)
    return np.asarray(sim.counts, dtype=np.float32), np.asarray(sim.is_doublet)


def import_scvi():
    """scvi-tools without its JAX modules: with jax and optax installed but not flax, scvi-tools 1.4.2 fails on
    import (`JaxBaseModuleClass`); hiding optax during the import skips its JAX code paths."""
    saved = sys.modules.get("optax")
    sys.modules["optax"] = None  # type: ignore[assignment]  # makes `import optax` raise ImportError
    try:
        import scvi
        from scvi.external import SOLO
    finally:
        if saved is None:
            del sys.modules["optax"]
        else:
            sys.modules["optax"] = saved
    return scvi, SOLO


def scvi_solo(counts: np.ndarray, scvi_epochs: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """scvi-tools SCVI then SOLO with their defaults; returns the observed cells' doublet probabilities."""
    import anndata as ad

    scvi, SOLO = import_scvi()

    scvi.settings.seed = seed
    adata = ad.AnnData(counts.copy())
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=scvi_epochs, enable_progress_bar=False)
    solo = SOLO.from_scvi_model(model)
    solo.train(enable_progress_bar=False)
    probability = solo.predict(soft=True)["doublet"].to_numpy()
    history = solo.history["validation_loss"] if "validation_loss" in solo.history else None
    info = {"scvi_epochs": scvi_epochs, "solo_epochs": 0 if history is None else len(history)}
    return probability, info


def main() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    counts, truth = droplets()
    probability, info = scvi_solo(counts, SCVI_EPOCHS)
    auprc, auroc = average_precision_score(truth, probability), roc_auc_score(truth, probability)
    np.savez_compressed(OUT, probability=probability.astype(np.float32), truth=truth, counts_sum=counts.sum(),
                        auprc=auprc, auroc=auroc, settings=json.dumps({**info, "n_cells": N_CELLS, "n_genes": N_GENES}))
    print(json.dumps({"auprc": auprc, "auroc": auroc, **info}), file=sys.stdout)


if __name__ == "__main__":
    main()
