"""Parametric UMAP (diffbio_eqx) against umap-learn, side by side in one run.

For each size: exact kNN (ours, blocked brute force in JAX) against pynndescent (umap-learn's approximate kNN)
and scikit-learn's exact search; the full fit (graph + training; the graph with `neighbor_graph`'s automatic
backend, pynndescent above 8,192 cells on CPU) against `umap.UMAP().fit`; embedding
quality (15-NN preservation and trustworthiness on a subsample, both tools); and the throughput of embedding new
cells (our `embed` against umap-learn's `transform`) with the 15-NN preservation of the embedded new cells beside
it. Compile times (and numba's JIT) are reported apart, before any timed round; fits and embeddings are timed
in `repeats` interleaved rounds (ours, umap-learn) and quoted as medians with their range. The process runs in
equinox's default error mode unless `EQX_ON_ERROR` says otherwise (recorded as `error_mode`). Writes
`benchmarks/results/umap.json`.

Run: `python benchmarks/bench_umap.py` (sizes 10k and 50k, plus a kNN-only run at 100k). `bench_knn.py` compares
the kNN backends at 100k and the fit at 50k and 200k on PC-like data with neighbourhood structure;
`python benchmarks/bench_umap.py refine 200000 [rounds]` times `fit_umap(refine_steps=1000)` against umap-learn on
that same data (`bench_refine`, merged into `umap.json`'s `"refine"` list).
"""

import datetime
import json
import os
import pathlib
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def make_data(n_cells: int, *, n_components: int = 30, seed: int = 0) -> np.ndarray:
    """Simulated counts (diffbio_eqx.simulate, 8 groups), log-normalised and projected on 30 PCs."""
    from sklearn.decomposition import PCA

    import diffbio_eqx as dx

    sim = dx.simulate(jr.key(seed), n_cells=n_cells, n_genes=300, n_groups=8)
    counts = np.asarray(sim.counts, dtype=np.float64)
    normalized = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    return PCA(n_components=n_components, random_state=seed).fit_transform(normalized).astype(np.float32)


def _quality(x, z, rows, k=15):
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import NearestNeighbors

    def neighbours(data):
        found = NearestNeighbors(n_neighbors=k + 1).fit(data).kneighbors(data[rows], return_distance=False)
        return [set(r[r != i][:k].tolist()) for i, r in zip(rows, found)]

    high, low = neighbours(x), neighbours(z)
    preservation = float(np.mean([len(a & b) / k for a, b in zip(high, low)]))
    trust = float(trustworthiness(x[rows], z[rows], n_neighbors=k))
    return preservation, trust


def _umap_learn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap
    return umap


def bench_knn_only(n_cells: int) -> dict:
    from diffbio_eqx._core._neighbors import exact_knn

    x = jnp.asarray(make_data(n_cells))
    knn = jax.jit(lambda v: exact_knn(v, v, 15))
    _, first = _timed(lambda: knn(x))
    _, run = _timed(lambda: knn(x))
    return {"n_cells": n_cells, "ours_knn_s": run, "ours_knn_compile_s": max(first - run, 0.0)}


def bench_size(n_cells: int, *, n_steps: int, n_new: int = 2000, n_transform: int = 2000,
               repeats: int = 3) -> dict:
    from pynndescent import NNDescent
    from sklearn.neighbors import NearestNeighbors

    import diffbio_eqx as dx
    from diffbio_eqx._core._neighbors import exact_knn

    umap = _umap_learn()
    data = make_data(n_cells + n_new)
    x, new = data[:n_cells], data[n_cells:]
    xj = jnp.asarray(x)
    out: dict = {"n_cells": n_cells}

    knn = jax.jit(lambda v: exact_knn(v, v, 15))
    _, first = _timed(lambda: knn(xj))
    (indices, _), out["ours_knn_s"] = _timed(lambda: knn(xj))
    out["ours_knn_compile_s"] = max(first - out["ours_knn_s"], 0.0)
    _, out["sklearn_exact_knn_s"] = _timed(lambda: NearestNeighbors(n_neighbors=15).fit(x).kneighbors(x))
    (nnd_indices, _), out["pynndescent_knn_s"] = _timed(
        lambda: NNDescent(x, n_neighbors=15, random_state=0, n_jobs=-1).neighbor_graph
    )
    indices = np.asarray(indices)
    out["pynndescent_recall"] = float(np.mean([len(set(a) & set(b)) / 15 for a, b in zip(indices, nnd_indices)]))

    model = dx.ParametricUMAP(x.shape[1], key=jr.key(0))
    _, first = _timed(lambda: model.graph(xj).weights)
    graph, out["ours_graph_s"] = _timed(lambda: model.graph(xj))
    out["ours_graph_compile_s"] = max(first - out["ours_graph_s"], 0.0)
    epochs = lambda n: dx.TrainSettings(n_epochs=n, progress=False)
    steps_per_epoch = -(-graph.weights.shape[0] // 1024)
    n_epochs = max(1, round(n_steps / steps_per_epoch))
    out.update(ours_n_epochs=n_epochs, ours_n_steps=n_epochs * steps_per_epoch, ours_batch_size=1024)

    def ours_fit():
        started = time.perf_counter()
        built = jax.block_until_ready(model.graph(xj))
        trained = dx.fit_umap(model, xj, key=jr.key(1), settings=epochs(n_epochs), graph=built)
        return jax.block_until_ready(trained), time.perf_counter() - started

    def umap_learn_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _timed(lambda: umap.UMAP(random_state=0).fit(x))

    # Interleaved rounds, the same treatment for both: our compiles (a first fit, reported apart) and numba's JIT
    # (in `main`) happen before the first round.
    _, first_fit = ours_fit()
    ours_fits, their_fits = [], []
    for _ in range(repeats):
        ours_fits.append(ours_fit())
        their_fits.append(umap_learn_fit())
    fitted, reference = ours_fits[0][0], their_fits[0][0]
    out["ours_fit_all_s"] = [t for _, t in ours_fits]
    out["umap_learn_fit_all_s"] = [t for _, t in their_fits]
    out["ours_fit_s"], out["umap_learn_fit_s"] = _common.median(out["ours_fit_all_s"]), _common.median(
        out["umap_learn_fit_all_s"])
    out["fit_time_ratio"] = _common.ratio_summary(out["ours_fit_all_s"], out["umap_learn_fit_all_s"])
    out["ours_fit_compile_s"] = max(first_fit - out["ours_fit_s"], 0.0)

    z_ours = np.asarray(fitted.model.embed(xj))
    rows = np.random.default_rng(0).choice(n_cells, size=min(n_cells, 2000), replace=False)
    out["ours_knn_preservation"], out["ours_trustworthiness"] = _quality(x, z_ours, rows)
    out["umap_learn_knn_preservation"], out["umap_learn_trustworthiness"] = _quality(x, reference.embedding_, rows)

    newj, probe = jnp.asarray(new), new[:n_transform]
    fitted.model.embed(newj).block_until_ready()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.transform(new[:50])  # numba compiles on the first call
        embed_times, transform_times = [], []
        for _ in range(repeats):
            z_new, seconds = _timed(lambda: fitted.model.embed(newj))
            embed_times.append(seconds / n_new)
            z_transform, seconds = _timed(lambda: reference.transform(probe))
            transform_times.append(seconds / n_transform)
    out["ours_embed_cells_per_s"] = 1.0 / _common.median(embed_times)
    out["umap_learn_transform_cells_per_s"] = 1.0 / _common.median(transform_times)
    out["embed_speedup_summary"] = _common.ratio_summary(transform_times, embed_times)
    out["embed_speedup"] = out["embed_speedup_summary"]["median"]
    # Quality of the new cells' coordinates: their 15-NN among themselves kept from the 30 PCs to the map.
    every = np.arange(n_transform)
    out["ours_new_cells_knn_preservation"], _ = _quality(probe, np.asarray(z_new)[:n_transform], every)
    out["umap_learn_new_cells_knn_preservation"], _ = _quality(probe, np.asarray(z_transform), every)
    return out


def bench_refine(n_cells: int, *, rounds: int = 3, refine_steps: int = 1000) -> dict:
    """`fit_umap` with its defaults plus `refine_steps` of refinement (`refine_batch_size(n_cells)` edges a step)
    against `umap.UMAP(random_state=0).fit`, on `bench_knn`'s simulated PCs (50 dims, 20 groups; the data of the
    earlier `bench_knn.py umap` records), interleaved over `rounds` rounds in one process after a first call of
    ours (its JAX compiles; umap-learn's and pynndescent's numba code is compiled on 5,000 cells before). 15-NN
    preservation on 2,000 random cells: ours after the first call (printed at once) and after the last round,
    umap-learn's after each round. Ratios: our seconds over umap-learn's per round."""
    import bench_knn

    import diffbio_eqx as dx
    from diffbio_eqx._umap._stage import refine_batch_size

    umap = _umap_learn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umap.UMAP(n_epochs=20, random_state=0).fit(bench_knn.simulated_pcs(5000, seed=1))
    x = bench_knn.simulated_pcs(n_cells)
    rows = np.random.default_rng(0).choice(n_cells, size=2000, replace=False)
    model = dx.ParametricUMAP(x.shape[1], key=jr.key(0))
    settings = dx.TrainSettings(progress=False)

    def ours():
        return dx.fit_umap(model, x, key=jr.key(1), settings=settings, refine_steps=refine_steps)

    out: dict = {"n_cells": n_cells, "n_dims": int(x.shape[1]), "refine_steps": refine_steps,
                 "refine_batch_size": refine_batch_size(n_cells), "ours_fit_s": [], "umap_learn_fit_s": [],
                 "umap_learn_knn_preservation_all": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted, out["ours_first_call_s"] = _timed(ours)
        out["ours_first_knn_preservation"] = bench_knn.preservation(x, np.asarray(fitted.embedding), rows)
        print(json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}), flush=True)
        for _ in range(rounds):
            fitted, seconds = _timed(ours)
            out["ours_fit_s"].append(seconds)
            reference, seconds = _timed(lambda: umap.UMAP(random_state=0).fit(x))
            out["umap_learn_fit_s"].append(seconds)
            out["umap_learn_knn_preservation_all"].append(
                bench_knn.preservation(x, np.asarray(reference.embedding_), rows))
            print(json.dumps({"ours_s": out["ours_fit_s"][-1], "umap_learn_s": seconds,
                              "umap_learn_knn_preservation": out["umap_learn_knn_preservation_all"][-1]}), flush=True)
    out["ours_knn_preservation"] = bench_knn.preservation(x, np.asarray(fitted.embedding), rows)
    out["ours_encoder_knn_preservation"] = bench_knn.preservation(x, np.asarray(fitted.model.embed(x)), rows)
    out["umap_learn_knn_preservation"] = _common.median(out["umap_learn_knn_preservation_all"])
    out["preservation_ratio"] = out["ours_knn_preservation"] / out["umap_learn_knn_preservation"]
    out["time_ratio"] = _common.ratio_summary(out["ours_fit_s"], out["umap_learn_fit_s"])  # ours / theirs
    out["time_ratio_first_call"] = out["ours_first_call_s"] / min(out["umap_learn_fit_s"])
    out["environment"] = _common.environment("umap-learn", "pynndescent", "scikit-learn")
    out["error_mode"] = _common.error_mode()
    print(json.dumps(out), flush=True)
    return out


def main_refine(n_cells: int, rounds: int, out_dir: str | os.PathLike[str] = "benchmarks/results") -> dict:
    """`bench_refine` at `n_cells`, merged into `umap.json`'s `"refine"` list by size."""
    row = bench_refine(n_cells, rounds=rounds)
    path = pathlib.Path(out_dir) / "umap.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["refine"] = [r for r in results.get("refine", []) if r["n_cells"] != n_cells] + [row]
    results["refine"].sort(key=lambda r: r["n_cells"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return row


def main(out_dir: str | os.PathLike[str] = "benchmarks/results", sizes=(10_000, 50_000), knn_only_sizes=(100_000,),
         n_steps: int = 3000, repeats: int = 3) -> dict:
    import importlib.metadata as md

    import diffbio_eqx  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pynndescent import NNDescent

        # Compile numba code (pynndescent, umap-learn's optimiser and transform) before anything is timed.
        warm = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
        NNDescent(warm, n_neighbors=15).neighbor_graph
        _umap_learn().UMAP(n_epochs=20).fit(warm).transform(warm[:20])
    results = {
        "machine": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "versions": {
            p: md.version(p) for p in ("jax", "equinox", "optax", "umap-learn", "pynndescent", "scikit-learn")
        },
        "python": sys.version.split()[0], "error_mode": _common.error_mode(), "sizes": [], "knn_only": [],
    }
    for n in sizes:
        row = bench_size(n, n_steps=n_steps, repeats=repeats)
        print(json.dumps(row), flush=True)
        results["sizes"].append(row)
    for n in knn_only_sizes:
        row = bench_knn_only(n)
        print(json.dumps(row), flush=True)
        results["knn_only"].append(row)
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "umap.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "refine":  # python benchmarks/bench_umap.py refine 200000 [rounds]
        main_refine(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    else:
        sizes = tuple(int(s) for s in sys.argv[1].split(",")) if len(sys.argv) > 1 else (10_000, 50_000)
        main(sizes=sizes)
