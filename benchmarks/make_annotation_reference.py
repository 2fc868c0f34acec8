"""Reference outputs of scvi-tools' SCANVI and CellAssign for tests/test_annotation.py (torch stays out of the tests).

Run from the repository root with the bench extra installed (scvi-tools, torch CPU):

    .venv/bin/python benchmarks/make_annotation_reference.py

It writes `tests/data/annotation_reference.npz`:

- `split_<s>`: for s = 0, 1, 2, the indices of the pbmc68k cells whose labels are hidden (a random half drawn with
  `numpy.random.default_rng(s)`, `annotation_split` below; the tests draw the same);
- `scanvi_accuracy`: (3,) SCANVI's accuracy on the hidden half of each split. SCANVI is trained as scvi-tools'
  tutorials do: `SCVI` with its defaults (`n_latent=10`, `gene_likelihood="zinb"`, `max_epochs` by its heuristic,
  400 here), then `SCANVI.from_scvi_model(unlabeled_category="Unknown")` and `train()` with its defaults (10 epochs
  for a pre-trained model), `scvi.settings.seed = s`;
- `cellassign_accuracy`: (3,) accuracy of scvi-tools' `CellAssign` on all 700 cells, seeds 0, 1, 2, with the marker
  matrix `PBMC68K_MARKERS` (from tests/annotation_markers.py), an all-zero `"other"` column added, size factors
  `total / mean(total)`, `train()` defaults;
- `cellassign_probabilities_0`: (700, 11) its probabilities for seed 0.
"""

import pathlib
import sys
import time

import numpy as np
import pandas as pd


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from annotation_markers import PBMC68K_MARKERS, annotation_split, marker_matrix  # noqa: E402


def import_scvi():
    """Import scvi-tools. scvi-tools 1.4 imports its JAX training plan whenever jax and optax import, and that needs
    flax (not installed here): hide optax from it while it imports (diffbio_eqx has imported it already)."""
    import importlib

    saved = sys.modules.get("optax")
    sys.modules["optax"] = None  # type: ignore[assignment]  (import_module then raises ImportError)
    try:
        return importlib.import_module("scvi")
    finally:
        if saved is not None:
            sys.modules["optax"] = saved
        else:
            del sys.modules["optax"]


def scanvi_accuracy(adata, hidden: np.ndarray, seed: int) -> float:
    scvi = import_scvi()

    scvi.settings.seed = seed
    data = adata.copy()
    labels = data.obs["bulk_labels"].astype(str).to_numpy().copy()
    labels[hidden] = "Unknown"
    data.obs["labels"] = pd.Categorical(labels)
    scvi.model.SCVI.setup_anndata(data, labels_key="labels")
    vae = scvi.model.SCVI(data)
    start = time.perf_counter()
    vae.train(enable_progress_bar=False)
    print(f"SCVI trained in {time.perf_counter() - start:.0f} s", flush=True)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    model.train(enable_progress_bar=False)
    predicted = np.asarray(model.predict(data))
    truth = adata.obs["bulk_labels"].astype(str).to_numpy()
    return float(np.mean(predicted[hidden] == truth[hidden]))


def cellassign(adata, seed: int) -> tuple[float, np.ndarray]:
    scvi = import_scvi()
    from scvi.external import CellAssign

    scvi.settings.seed = seed
    markers = marker_matrix(PBMC68K_MARKERS)
    markers["other"] = 0
    total = np.asarray(adata.X.sum(axis=1)).ravel()
    data = adata[:, markers.index].copy()
    data.obs["size_factor"] = total / total.mean()
    CellAssign.setup_anndata(data, size_factor_key="size_factor")
    model = CellAssign(data, markers)
    model.train(enable_progress_bar=False)
    probabilities = model.predict().to_numpy()
    predicted = np.asarray(markers.columns)[probabilities.argmax(axis=1)]
    truth = adata.obs["bulk_labels"].astype(str).to_numpy()
    return float(np.mean(predicted == truth)), probabilities


def main() -> None:
    import torch

    import diffbio_eqx as dbx

    torch.set_num_threads(1)  # the CPU is shared; several threads only contend
    import_scvi()

    adata = dbx.datasets.pbmc68k()
    out: dict[str, np.ndarray] = {}
    scanvi, assign = [], []
    for seed in range(3):
        hidden = annotation_split(adata.n_obs, seed)
        out[f"split_{seed}"] = hidden
        start = time.perf_counter()
        scanvi.append(scanvi_accuracy(adata, hidden, seed))
        accuracy, probabilities = cellassign(adata, seed)
        assign.append(accuracy)
        if seed == 0:
            out["cellassign_probabilities_0"] = probabilities.astype(np.float32)
        print(f"seed {seed}: SCANVI {scanvi[-1]:.3f}, CellAssign {accuracy:.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    out["scanvi_accuracy"] = np.asarray(scanvi)
    out["cellassign_accuracy"] = np.asarray(assign)
    np.savez_compressed(ROOT / "tests" / "data" / "annotation_reference.npz", **out)


if __name__ == "__main__":
    main()
