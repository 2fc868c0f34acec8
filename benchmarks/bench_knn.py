"""kNN backends of `neighbor_graph` against the exact search, and parametric UMAP's fit against umap-learn.

Typical printout (2-core CPU, shared machine; see benchmarks/results/knn.json for the recorded run):

    {"n_cells": 100000, "method": "exact", "seconds": 61.2, "recall_at_15": 1.0, ...}
    {"n_cells": 100000, "method": "pynndescent", "seconds": 11.4, "recall_at_15": 0.99, ...}

1. kNN (`python benchmarks/bench_knn.py knn 100000`): each backend (`exact`: blocked brute force under jit;
   `pynndescent`: NN-descent with umap-learn's settings, on the host; `approx_top_k`: the blocked search with
   `jax.lax.approx_max_k`, which XLA lowers to an exact top-k on CPU) builds the whole 15-NN graph (neighbours +
   connectivities) of simulated PCs (50 dims); seconds of the graph and of the kNN alone, recall@15 against the
   exact neighbours (the cell itself counted, as scanpy and umap-learn count it). pynndescent's numba compile (a
   first call in each new process, ~45-60 s here) is timed apart on 2,000 cells, as umap-learn's is in
   bench_umap.
2. UMAP (`python benchmarks/bench_knn.py umap 50000,200000`): `fit_umap` with its defaults (graph on every cell,
   `method="auto"`, i.e. the IVF from 20,000 cells on CPU; ~3,000 Adam steps of 1,024 edges) and
   `refine_steps=1000` (the fit cells' coordinates refined non-parametrically) against
   `umap.UMAP(random_state=0).fit` (numba warmed up first), on the same simulated PCs, interleaved over
   `BENCH_KNN_ROUNDS` (3) rounds after a first call of ours (its JAX compiles); 15-NN preservation (mean
   fraction of each cell's 15 nearest neighbours in the PCs that are among its 15 nearest in the 2-D map) on
   2,000 random cells, for both tools.
3. IVF (`python benchmarks/bench_knn.py ivf 100000`): `method="ivf"` against `method="exact"`, whole graphs,
   interleaved rounds (`bench_ivf`).

Results are merged into `benchmarks/results/knn.json` (one record per (part, n_cells, method)).
"""

import json
import os
import pathlib
import sys
import time
import warnings

import jax
import jax.random as jr
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import environment, merge_runs, ratio_summary, write_json  # noqa: E402


#: Where the records are merged (BENCH_KNN_OUT overrides, e.g. to run parts side by side and merge after).
RESULTS = pathlib.Path(os.environ.get("BENCH_KNN_OUT", pathlib.Path(__file__).resolve().parent / "results"
                                      / "knn.json"))
K = 15


def simulated_pcs(n_cells: int, *, n_dims: int = 50, n_groups: int = 20, latent_dims: int = 8,
                  seed: int = 0) -> np.ndarray:
    """PC-like cells: `n_groups` groups, each an anisotropic Gaussian in an 8-D latent (variances decaying with the
    dimension, group centres spread wider than the groups), mapped linearly to `n_dims` dimensions with decaying
    scale (as PCs' variances decay), plus isotropic noise at 5 % of the signal. The neighbours have structure to
    preserve (not isotropic noise), and a 50-D search meets 8-D neighbourhoods blurred by noise, as in real PCs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(n_groups, latent_dims))
    spreads = rng.uniform(0.5, 2.0, size=(n_groups, latent_dims)) / np.arange(1, latent_dims + 1) ** 0.5
    groups = rng.integers(0, n_groups, n_cells)
    latent = centres[groups] + spreads[groups] * rng.normal(size=(n_cells, latent_dims))
    mixing = rng.normal(size=(latent_dims, n_dims)) / np.arange(1, n_dims + 1) ** 0.7
    x = latent @ mixing
    x += 0.05 * x.std() * rng.normal(size=x.shape)
    return x.astype(np.float32)


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (the cell itself included) that `found` lists."""
    matches = (found[:, :, None] == exact[:, None, :]).any(axis=1)
    return float(matches.mean())


def bench_knn(n_cells: int) -> list[dict]:
    import diffbio_eqx as dx
    from diffbio_eqx._core import _neighbors

    x = simulated_pcs(n_cells)
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, numba_compile = _timed(lambda: _neighbors.pynndescent_knn(simulated_pcs(2000, seed=1), K))
    exact, exact_s = _timed(lambda: dx.neighbor_graph(x, K, method="exact"))
    exact_indices = np.asarray(exact.indices)
    runs.append({"part": "knn", "n_cells": n_cells, "n_dims": x.shape[1], "method": "exact", "graph_s": exact_s,
                 "recall_at_15": 1.0, "note": "blocked brute force under jit; includes its compile (~2 s)"})
    print(json.dumps(runs[-1]), flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        indices, knn_s = _timed(lambda: _neighbors.pynndescent_knn(x, K))
        graph, graph_s = _timed(lambda: dx.neighbor_graph(x, K, method="pynndescent"))
    runs.append({"part": "knn", "n_cells": n_cells, "n_dims": x.shape[1], "method": "pynndescent",
                 "knn_s": knn_s, "graph_s": graph_s, "numba_compile_s": numba_compile,
                 "recall_at_15": recall(np.asarray(graph.indices), exact_indices),
                 "recall_at_15_knn_only": recall(indices, exact_indices),
                 "speedup_vs_exact": exact_s / graph_s,
                 "speedup_vs_exact_with_numba_compile": exact_s / (graph_s + numba_compile),
                 "settings": _neighbors.pynndescent_settings(n_cells)})
    print(json.dumps(runs[-1]), flush=True)
    approx, approx_s = _timed(lambda: dx.neighbor_graph(x, K, method="approx_top_k"))
    runs.append({"part": "knn", "n_cells": n_cells, "n_dims": x.shape[1], "method": "approx_top_k",
                 "graph_s": approx_s, "recall_at_15": recall(np.asarray(approx.indices), exact_indices),
                 "speedup_vs_exact": exact_s / approx_s,
                 "note": f"backend {jax.default_backend()}: XLA lowers approx_max_k to an exact top-k on CPU/GPU"})
    print(json.dumps(runs[-1]), flush=True)
    return runs


def bench_ivf(n_cells: int, rounds: int = 3) -> list[dict]:
    """`method="ivf"` (the inverted-file search in JAX) against `method="exact"`, whole graphs, interleaved over
    `rounds` rounds in one process: the first round's calls include each method's JAX compiles, the later rounds
    reuse them; the ratio is exact's seconds over ours per round (median and range)."""
    import diffbio_eqx as dx

    x = simulated_pcs(n_cells)
    exact_s, ivf_s = [], []
    for _ in range(rounds):
        exact, seconds = _timed(lambda: dx.neighbor_graph(x, K, method="exact"))
        exact_s.append(seconds)
        approximate, seconds = _timed(lambda: dx.neighbor_graph(x, K, method="ivf"))
        ivf_s.append(seconds)
        print(json.dumps({"exact_s": exact_s[-1], "ivf_s": ivf_s[-1]}), flush=True)
    indices = np.asarray(approximate.indices)
    from diffbio_eqx._core import _neighbors

    run = {"part": "knn", "n_cells": n_cells, "n_dims": x.shape[1], "method": "ivf", "graph_s": ivf_s,
           "exact_graph_s": exact_s, "speedup_vs_exact": ratio_summary(exact_s, ivf_s),
           "recall_at_15": recall(indices, np.asarray(exact.indices)),
           "self_first": bool(np.all(indices[:, 0] == np.arange(n_cells))),
           "n_lists": _neighbors.ivf_n_lists(n_cells), "n_probe": _neighbors.IVF_N_PROBE,
           "note": "round 1 includes each method's JAX compiles (ours: the k-means and the search + connectivities)"}
    print(json.dumps(run), flush=True)
    return [run]


def preservation(x: np.ndarray, z: np.ndarray, rows: np.ndarray) -> float:
    from sklearn.neighbors import NearestNeighbors

    def neighbours(data: np.ndarray) -> np.ndarray:
        found = NearestNeighbors(n_neighbors=K + 1).fit(data).kneighbors(data[rows], return_distance=False)
        return np.stack([r[r != i][:K] for i, r in zip(rows, found)])

    return recall(neighbours(z), neighbours(x))


def bench_umap(n_cells: int, rounds: int = 3, refine_steps: int = 1000) -> dict:
    """`fit_umap` (defaults, plus `refine_steps` of non-parametric refinement of the fit cells' coordinates)
    against `umap.UMAP(random_state=0).fit`, interleaved over `rounds` rounds in one process after a first call of
    ours (JAX's compiles, timed apart); ratios are our seconds over umap-learn's per round (median and range)."""
    import diffbio_eqx as dx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap

        # Compile umap-learn's and pynndescent's numba code before anything is timed (umap-learn searches exactly
        # below 4,096 cells, so the warm-up is larger); our "with compile" time is then JAX's compiles only.
        warm = simulated_pcs(5000, seed=1)
        umap.UMAP(n_epochs=20, random_state=0).fit(warm)
    x = simulated_pcs(n_cells)
    model = dx.ParametricUMAP(x.shape[1], key=jr.key(0))
    settings = dx.TrainSettings(progress=False)

    def ours():
        return dx.fit_umap(model, x, key=jr.key(1), settings=settings, refine_steps=refine_steps)

    ours_s, theirs_s = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted, first_s = _timed(ours)
        _, graph_s = _timed(lambda: model.graph(jax.numpy.asarray(x)))
        for _ in range(rounds):
            fitted, seconds = _timed(ours)
            ours_s.append(seconds)
            reference, seconds = _timed(lambda: umap.UMAP(random_state=0).fit(x))
            theirs_s.append(seconds)
            print(json.dumps({"ours_s": ours_s[-1], "umap_learn_s": theirs_s[-1]}), flush=True)
    rows = np.random.default_rng(0).choice(n_cells, size=2000, replace=False)
    ours_p = preservation(x, np.asarray(fitted.embedding), rows)
    encoder_p = preservation(x, np.asarray(fitted.model.embed(x)), rows)
    theirs_p = preservation(x, np.asarray(reference.embedding_), rows)
    ratio = ratio_summary(ours_s, theirs_s)  # ours / theirs: below 1 is faster
    run = {"part": "umap", "n_cells": n_cells, "n_dims": x.shape[1],
           "method": f"fit_umap defaults, refine_steps={refine_steps}", "ours_fit_s": ours_s,
           "ours_first_call_s": first_s, "ours_graph_s": graph_s, "ours_n_epochs": int(fitted.train_loss.shape[0]),
           "umap_learn_fit_s": theirs_s, "time_ratio": ratio,
           "time_ratio_first_call": first_s / min(theirs_s),
           "ours_knn_preservation": ours_p, "ours_encoder_knn_preservation": encoder_p,
           "umap_learn_knn_preservation": theirs_p, "preservation_ratio": ours_p / theirs_p,
           "note": "ours_knn_preservation: UMAPFitResult.embedding (refined); encoder: model.embed of the fit cells"}
    print(json.dumps(run), flush=True)
    return run


def main(argv: list[str]) -> None:
    part = argv[0] if argv else "knn"
    sizes = [int(s) for s in argv[1].split(",")] if len(argv) > 1 else ([50_000] if part == "umap" else [100_000])
    rounds = int(os.environ.get("BENCH_KNN_ROUNDS", "3"))
    bench = {"knn": bench_knn, "ivf": lambda n: bench_ivf(n, rounds), "umap": lambda n: [bench_umap(n, rounds)]}[part]
    runs = [row for n in sizes for row in bench(n)]
    record = {"environment": environment("pynndescent", "umap-learn", "scikit-learn"),
              "runs": merge_runs(RESULTS, runs, ("part", "n_cells", "method"))}
    write_json(RESULTS, record)


if __name__ == "__main__":
    main(sys.argv[1:])
