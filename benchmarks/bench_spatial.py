"""Spatial family (issue 21): STAGATE-style domains and PASTE alignment against their baselines.

- `align`: two slices of one simulated layered tissue (`simulate_spatial_slices`, hexagonal grid, slice B rotated by
  25 degrees and shifted by (4, -3) spacings, jitter 0.1) at each size: our `pairwise_align` (ott-jax fused GW,
  alpha 0.1, compile timed separately) against `paste-bio` 1.4.0's `pairwise_align` (POT, its defaults, run up to
  `--paste-max` spots) followed by its Procrustes: time, peak memory, mapping accuracy (plan mass on spot pairs of
  the same true domain; the uniform plan's for scale), rotation error (degrees) and mean distance of the aligned
  spots to their true positions (spot spacings).
- `domains`: one simulated layered slice (5 domains) at each size: `tl.spatial_domains` (STAGATE, `--epochs`
  full-batch epochs, Gaussian mixture) against expression-only Leiden (scanpy, igraph, best ARI over resolutions
  0.3/0.5/1.0/1.5) and k-means (scikit-learn, 20 PCs): ARI, time, training throughput (spot-epochs per second).

Writes `benchmarks/results/spatial.json`.
Run: `python benchmarks/bench_spatial.py [align] [domains] [--sizes 1000 5000] [--paste-max 1000] [--epochs 300]
[--rounds 3]` (ours in equinox's default error mode, `raise`).
STAGATE's training throughput alone, one line: `python benchmarks/bench_spatial.py domains --train-only --sizes 5000`
(prints wall spots/s beside spot-epochs per CPU-second and the load average).
"""

import argparse
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import ROOT, environment, median, merge_runs, peak_since, ratio_summary, reset_peak, write_json  # noqa: E402
from _references import paste_bio_pairwise  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "spatial.json"




def _transform_errors(a, b, rotation, translation):
    angle = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    aligned = b.coordinates @ rotation.T + translation
    return {"rotation_error_deg": float(abs(angle - np.degrees(-b.rotation))),
            "position_error_spacings": float(np.mean(np.linalg.norm(aligned - b.tissue_coordinates, axis=1)))}


def _time_ours(run) -> tuple[Any, float, dict]:
    baseline = reset_peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    return result, seconds, peak_since(baseline)


def _time_paste(a, b) -> tuple[Any, float, dict]:
    baseline = reset_peak()
    start = time.perf_counter()
    plan = paste_bio_pairwise(a.counts, b.counts, a.coordinates, b.coordinates)
    seconds = time.perf_counter() - start
    return plan, seconds, peak_since(baseline)


def bench_align(n: int, paste_max: int, rounds: int = 1) -> dict:
    """Ours (compiled first) and paste-bio timed side by side, interleaved over `rounds` rounds (median, range)."""
    import jax

    from diffbio_eqx._simulate._spatial import simulate_spatial_slices
    from diffbio_eqx._spatial._paste import mapping_accuracy, pairwise_align, procrustes

    a, b = simulate_spatial_slices(2, n, rotations=(0.0, np.deg2rad(25.0)), translations=((0, 0), (4.0, -3.0)),
                                   jitter=0.1, seed=1)
    run = lambda: jax.block_until_ready(pairwise_align(a.counts, b.counts, a.coordinates, b.coordinates))
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    with_paste = n <= paste_max
    ours_times, paste_times = [], []
    for _ in range(rounds):
        result, seconds, ours_memory = _time_ours(run)
        ours_times.append(seconds)
        if with_paste:
            plan, seconds, paste_memory = _time_paste(a, b)
            paste_times.append(seconds)
    ours = {"seconds": median(ours_times), "seconds_per_round": ours_times, "compile_seconds": first - ours_times[0],
            **ours_memory, "mapping_accuracy": mapping_accuracy(result.plan, a.domains, b.domains),
            "entropy": float(result.entropy),
            **_transform_errors(a, b, np.asarray(result.rotation), np.asarray(result.translation))}
    record = {"task": "align", "n_spots": [len(a.domains), len(b.domains)], "rounds": rounds, "ours": ours,
              "uniform_mapping_accuracy": mapping_accuracy(np.ones((len(a.domains), len(b.domains))), a.domains,
                                                           b.domains),
              "uniform_entropy": float(np.log(len(a.domains) * len(b.domains)))}
    if with_paste:
        rotation, translation = procrustes(*(jax.numpy.asarray(v) for v in (a.coordinates, b.coordinates, plan)))
        p = plan / plan.sum()
        record["paste_bio"] = {"seconds": median(paste_times), "seconds_per_round": paste_times, **paste_memory,
                               "mapping_accuracy": mapping_accuracy(plan, a.domains, b.domains),
                               "entropy": float(-np.sum(p[p > 0] * np.log(p[p > 0]))),
                               **_transform_errors(a, b, np.asarray(rotation), np.asarray(translation))}
        record["speedup"] = ratio_summary(paste_times, ours_times)
    else:
        record["paste_bio"] = f"not run (above --paste-max {paste_max})"
    return record


def _baselines(s) -> dict:
    import anndata as ad
    import scanpy as sc
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    start = time.perf_counter()
    a = ad.AnnData(s.counts.copy())
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=20, random_state=0)
    sc.pp.neighbors(a, random_state=0)
    scores = {}
    for resolution in (0.3, 0.5, 1.0, 1.5):
        sc.tl.leiden(a, resolution=resolution, flavor="igraph", n_iterations=2, random_state=0)
        scores[str(resolution)] = adjusted_rand_score(s.domains, a.obs["leiden"])
    leiden_seconds = time.perf_counter() - start
    start = time.perf_counter()
    kmeans = KMeans(5, n_init=10, random_state=0)  # pyright: ignore[reportArgumentType]
    labels = kmeans.fit_predict(a.obsm["X_pca"])
    return {"leiden_expression": {"ari_best": max(scores.values()), "ari_by_resolution": scores,
                                  "seconds": leiden_seconds},
            "kmeans_expression": {"ari": adjusted_rand_score(s.domains, labels),
                                  "seconds": time.perf_counter() - start}}


def bench_domains(n: int, epochs: int) -> dict:
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    import diffbio_eqx.tl as tl
    from diffbio_eqx._simulate._spatial import simulate_spatial

    s = simulate_spatial(n, seed=0)
    adata = ad.AnnData(s.counts.copy())
    adata.obsm["spatial"] = s.coordinates
    baseline = reset_peak()
    start = time.perf_counter()
    tl.spatial_domains(adata, 5, n_epochs=epochs, seed=0)
    seconds = time.perf_counter() - start
    # Throughput of training alone: a second, compiled run of the loop on the same graph.
    import jax.numpy as jnp
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._spatial._domains import log_normalize
    from diffbio_eqx._spatial._stagate import STAGATE, fit_stagate, spatial_graph

    x = jnp.asarray(log_normalize(s.counts), jnp.float32)
    graph = spatial_graph(jnp.asarray(s.coordinates))
    settings = TrainSettings(n_epochs=epochs, progress=False)
    cpu_start, start = time.process_time(), time.perf_counter()
    fit_stagate(STAGATE(x.shape[1], key=jr.key(0)), x, graph, key=jr.key(1), settings=settings)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    ours = {"ari": adjusted_rand_score(s.domains, adata.obs["spatial_domain"]), "seconds": seconds,
            **peak_since(baseline), "epochs": epochs, "train_seconds": train_seconds,
            "spot_epochs_per_second": len(s.domains) * epochs / train_seconds,
            # what the loaded machine's share does not change: throughput per CPU-second of this process
            "train_cpu_seconds": train_cpu_seconds,
            "spot_epochs_per_cpu_second": len(s.domains) * epochs / train_cpu_seconds}
    return {"task": "domains", "n_spots": len(s.domains), "ours": ours, **_baselines(s)}


def bench_train(n: int, epochs: int) -> dict:
    """STAGATE training alone (`--train-only`): the loop compiled by a first run, then timed (wall and CPU-seconds
    of this process side by side); prints the throughput on one line."""
    import jax.numpy as jnp
    import jax.random as jr

    from diffbio_eqx._core._train import TrainSettings
    from diffbio_eqx._simulate._spatial import simulate_spatial
    from diffbio_eqx._spatial._domains import log_normalize
    from diffbio_eqx._spatial._stagate import STAGATE, fit_stagate, spatial_graph

    s = simulate_spatial(n, seed=0)
    x = jnp.asarray(log_normalize(s.counts), jnp.float32)
    graph = spatial_graph(jnp.asarray(s.coordinates))
    settings = TrainSettings(n_epochs=epochs, progress=False)
    run = lambda: fit_stagate(STAGATE(x.shape[1], key=jr.key(0)), x, graph, key=jr.key(1), settings=settings)
    run()
    load = os.getloadavg()
    cpu_start, start = time.process_time(), time.perf_counter()
    run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    spots = len(s.domains)
    record = {"task": "domains_train", "n_spots": spots, "epochs": epochs, "train_seconds": wall,
              "train_cpu_seconds": cpu, "spot_epochs_per_second": spots * epochs / wall,
              "spot_epochs_per_cpu_second": spots * epochs / cpu, "load_average_before": load}
    print(f"STAGATE training, {spots} spots x {epochs} epochs: {spots * epochs / wall:,.0f} spots/s wall "
          f"({wall:.1f} s), {spots * epochs / cpu:,.0f} per CPU-second ({cpu:.1f} CPU-s); load average before "
          f"{load[0]:.1f}, after {os.getloadavg()[0]:.1f}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tasks", nargs="*", default=["align", "domains"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--paste-max", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the alignment comparison")
    parser.add_argument("--train-only", action="store_true", help="domains: time STAGATE's training alone")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    runs = []
    for n in args.sizes:
        for task in args.tasks:
            load_before = os.getloadavg()
            if task == "align":
                record = bench_align(n, args.paste_max, args.rounds)
            else:
                record = bench_train(n, args.epochs) if args.train_only else bench_domains(n, args.epochs)
            record["size"] = n
            record["load_average"] = {"before": load_before, "after": os.getloadavg()}
            print(record, flush=True)
            runs.append(record)
    write_json(RESULTS, {"environment": environment("ott-jax", "paste-bio", "pot", "scanpy"),
                         "runs": merge_runs(RESULTS, runs, ("task", "size"))})


if __name__ == "__main__":
    main()
