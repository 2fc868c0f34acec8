"""VAE training speed and held-out likelihood: diffbio_eqx `VAENormalizer` vs scvi-tools `SCVI`, side by side.

Typical printout (shared 2-core x86 VM, CPU only, jax 0.10.2, torch 2.13.0+cpu, scvi-tools 1.4.2, other jobs
loading the cores; the ratio moved between 3.2x and 5.9x over runs with that load):

    5000 cells x 2000 genes, 20 epochs: ours 30955 cells/s (7.64 epochs/s, compile 3.6 s, peak 833 MB),
    scvi-tools 5203 cells/s (steady 5203; 1.28 epochs/s, peak 858 MB); ratio 5.9x (vs steady 5.9x; median epoch
    7.0x; best epoch 7.0x); held-out NB log-lik/cell ours -2561.85 vs -2564.28 (relative gap +0.09 %)

Both models get the same architecture (1 hidden layer of 128, latent 10, negative binomial, gene dispersion,
encoder dropout 0.1, no batch norm), the same optimiser (AdamW, lr 1e-3, eps 0.01, weight decay 1e-6), batch size
128, the same epochs and KL warm-up, the same training cells (each holds out 10 % of them and computes its
validation ELBO every epoch) and are scored on the same held-out test cells: the NB log-likelihood with z at the
posterior mean. Each tool runs in its own subprocess so that peak memory (VmHWM) is its own. Our compile time is
measured separately. Each tool gets its faster thread setting on the machine (torch 1 or 2 threads; XLA's pool or
one thread), since oversubscribed threads on a loaded machine slowed torch up to ~8x.
Run: `python benchmarks/bench_vae.py [n_cells n_genes n_epochs]`.

scvi-tools 1.4.2 imports its JAX code whenever jax and optax are importable, and then fails without flax; the
scvi-tools subprocess therefore hides optax (`sys.modules["optax"] = None`) before importing scvi.
"""

import os


os.environ.setdefault("EQX_ON_ERROR", "nan")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import datetime
import json
import multiprocessing
import pathlib
import platform
import resource
import sys
import time


def _rss_mb() -> float:
    # VmHWM (peak resident set) of this process; unlike ru_maxrss it is not inherited from the parent on spawn.
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load(path: str):
    import numpy as np

    with np.load(path) as data:
        return data["train"], data["test"]


def _run_ours(path: str, n_epochs: int, queue) -> None:
    import jax
    import jax.random as jr
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import diffbio_eqx as dx
    import diffbio_eqx._vae._stage as vae_module

    # Per-epoch wall times: `fit` asks for the KL weight on the host at the start of every epoch (after the
    # previous epoch's losses came back), so wrapping that call timestamps the epoch boundaries.
    stamps: list[float] = []
    warmup_weight = vae_module.kl_warmup_weight

    def timed_warmup_weight(epoch, *args, **kwargs):
        stamps.append(time.perf_counter())
        return warmup_weight(epoch, *args, **kwargs)

    vae_module.kl_warmup_weight = timed_warmup_weight
    train, test = _load(path)
    baseline = _rss_mb()
    vae = dx.VAENormalizer(train.shape[1], hidden_dims=(128,), latent_dim=10, likelihood="nb",
                           options=dx.VAEOptions(dispersion="gene"), dropout_rate=0.1, key=jr.key(0))
    settings = dx.TrainSettings(batch_size=128, validation_fraction=0.1, progress=False)
    kwargs = dict(key=jr.key(1), n_epochs_kl_warmup=n_epochs)
    start = time.perf_counter()
    # compiles the epoch and validation steps
    dx.fit_vae(vae, train, settings=dataclasses.replace(settings, n_epochs=1), **kwargs)
    first = time.perf_counter() - start
    stamps.clear()
    start = time.perf_counter()
    result = dx.fit_vae(vae, train, settings=dataclasses.replace(settings, n_epochs=n_epochs), **kwargs)
    jax.block_until_ready(result.model)
    seconds = time.perf_counter() - start
    epoch_seconds = np.diff(np.asarray(stamps + [time.perf_counter()]))
    ll = np.asarray(dx.vae_log_likelihood(result.model, test))
    n_train = train.shape[0] - int(round(0.1 * train.shape[0]))
    queue.put({
        "tool": "diffbio_eqx",
        "train_seconds": seconds,
        "compile_seconds": max(first - seconds / n_epochs, 0.0),
        "epochs_per_s": n_epochs / seconds,
        "cells_per_s": n_train * n_epochs / seconds,
        "median_epoch_seconds": float(np.median(epoch_seconds)),
        "min_epoch_seconds": float(np.min(epoch_seconds)),
        "best_epoch_cells_per_s": n_train / float(np.min(epoch_seconds)),
        "heldout_nb_loglik_per_cell": float(ll.mean()),
        "final_validation_loss": float(result.validation_loss[-1]),
        "peak_rss_mb": _rss_mb(),
        "rss_before_model_mb": baseline,
        "versions": {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0])},
    })


def _run_scvi(path: str, n_epochs: int, torch_threads: int | None, queue) -> None:
    sys.modules["optax"] = None  # see the module docstring
    import anndata as ad
    import numpy as np
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    train, test = _load(path)
    baseline = _rss_mb()
    scvi.settings.seed = 0
    adata = ad.AnnData(train)
    scvi.model.SCVI.setup_anndata(adata)
    architecture = dict(n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1, dispersion="gene",
                        gene_likelihood="nb", use_batch_norm="none", use_layer_norm="none")
    quiet = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False)

    class EpochTimes(Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter())

    probe_seconds = {}
    if torch_threads is None:
        # Give scvi-tools its faster thread count on this machine: 3 epochs with each, time the last two.
        for threads in (1, 2):
            torch.set_num_threads(threads)
            probe = EpochTimes()
            scvi.model.SCVI(adata, **architecture).train(max_epochs=3, batch_size=128, callbacks=[probe], **quiet)
            probe_seconds[threads] = (probe.times[-1] - probe.times[0]) / 2
        torch_threads = min(probe_seconds, key=probe_seconds.get)
    torch.set_num_threads(torch_threads)

    scvi.settings.seed = 0
    model = scvi.model.SCVI(adata, **architecture)
    timer = EpochTimes()
    start = time.perf_counter()
    # check_val_every_n_epoch=1: scvi-tools computes the validation ELBO every epoch, as `fit_vae` does (scvi-tools
    # skips validation unless early stopping or checkpointing is on).
    model.train(max_epochs=n_epochs, batch_size=128, train_size=0.9, callbacks=[timer], check_val_every_n_epoch=1,
                **quiet,
                plan_kwargs={"n_epochs_kl_warmup": n_epochs, "optimizer": "AdamW", "lr": 1e-3, "eps": 0.01,
                             "weight_decay": 1e-6})
    seconds = time.perf_counter() - start
    steady = (timer.times[-1] - timer.times[0]) / max(len(timer.times) - 1, 1)
    epoch_seconds = np.diff(np.asarray(timer.times))
    module = model.module
    module.eval()
    with torch.no_grad():
        x = torch.from_numpy(test)
        batch_index = torch.zeros((x.shape[0], 1))
        inference = module.inference(x=x, batch_index=batch_index)
        generative = module.generative(z=inference["qz"].loc, library=inference["library"], batch_index=batch_index)
        ll = generative["px"].log_prob(x).sum(-1).numpy()
    n_train = int(round(0.9 * train.shape[0]))
    queue.put({
        "tool": "scvi-tools",
        "train_seconds": seconds,
        "steady_epoch_seconds": steady,
        "epochs_per_s": n_epochs / seconds,
        "steady_epochs_per_s": 1.0 / steady,
        "cells_per_s": n_train * n_epochs / seconds,
        "steady_cells_per_s": n_train / steady,
        "median_epoch_seconds": float(np.median(epoch_seconds)),
        "min_epoch_seconds": float(np.min(epoch_seconds)),
        "best_epoch_cells_per_s": n_train / float(np.min(epoch_seconds)),
        "heldout_nb_loglik_per_cell": float(ll.mean()),
        "peak_rss_mb": _rss_mb(),
        "rss_before_model_mb": baseline,
        "torch_threads": torch.get_num_threads(),
        "thread_probe_epoch_seconds": probe_seconds,
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__},
    })


def _in_subprocess(target, *args, env: dict[str, str] | None = None) -> dict:
    saved = dict(os.environ)
    os.environ.update(env or {})  # a spawned child reads the environment at start (XLA_FLAGS before jax loads)
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=target, args=(*args, queue))
        process.start()
        result = queue.get()
        process.join()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return result


_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def main(out_dir: str | os.PathLike[str] = "benchmarks/results", sizes=((5000, 2000, 20),),
         torch_threads: int | None = None) -> dict:
    """Benchmark each `(n_cells, n_genes, n_epochs)` in `sizes`; write `<out_dir>/vae.json`.

    `torch_threads`: threads for scvi-tools' torch; None (default) times 1 and 2 threads for three epochs each
    and keeps the faster. On the shared 2-core machine this was written on, torch's own default (2 threads) ran
    scvi-tools up to ~8x slower than 1 thread when other jobs loaded the cores.
    """
    import jax.random as jr
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import diffbio_eqx as dx

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n_cells, n_genes, n_epochs in sizes:
        sim = dx.simulate(jr.key(0), n_cells=n_cells, n_genes=n_genes, n_groups=8)
        counts = np.asarray(sim.counts, dtype=np.float32)
        counts = counts[counts.sum(1) > 0]
        order = np.random.default_rng(0).permutation(counts.shape[0])
        n_test = counts.shape[0] // 10
        path = out / f".vae_data_{n_cells}_{n_genes}.npz"
        np.savez(path, train=counts[order[n_test:]], test=counts[order[:n_test]])
        # Each tool gets its faster thread setting: XLA's default pool and a single thread (before and after
        # scvi-tools, which also brackets it in time on a machine whose load changes), torch probes 1 and 2.
        ours_runs = [_in_subprocess(_run_ours, str(path), n_epochs)]
        theirs = _in_subprocess(_run_scvi, str(path), n_epochs, torch_threads)
        ours_runs.append(_in_subprocess(_run_ours, str(path), n_epochs, env={"XLA_FLAGS": _XLA_ONE_THREAD}))
        ours_runs[0]["xla_threads"], ours_runs[1]["xla_threads"] = "default", "1"
        ours = max(ours_runs, key=lambda r: r["cells_per_s"])
        ours["all_thread_settings"] = [
            {k: r[k] for k in ("xla_threads", "cells_per_s", "median_epoch_seconds", "min_epoch_seconds")}
            for r in ours_runs
        ]
        path.unlink()
        run = {
            "n_cells": int(counts.shape[0]), "n_genes": n_genes, "n_epochs": n_epochs,
            "n_train_cells": int(counts.shape[0] - n_test), "n_test_cells": int(n_test),
            "diffbio_eqx": ours, "scvi_tools": theirs,
            "cells_per_s_ratio": ours["cells_per_s"] / theirs["cells_per_s"],
            "steady_cells_per_s_ratio": ours["cells_per_s"] / theirs["steady_cells_per_s"],
            "best_epoch_cells_per_s_ratio": ours["best_epoch_cells_per_s"] / theirs["best_epoch_cells_per_s"],
            "median_epoch_time_ratio": theirs["median_epoch_seconds"] / ours["median_epoch_seconds"],
            "heldout_loglik_relative_gap": (ours["heldout_nb_loglik_per_cell"] - theirs["heldout_nb_loglik_per_cell"])
            / abs(theirs["heldout_nb_loglik_per_cell"]),
        }
        runs.append(run)
        print(
            f"{n_cells} cells x {n_genes} genes, {n_epochs} epochs: ours {ours['cells_per_s']:.0f} cells/s "
            f"({ours['epochs_per_s']:.2f} epochs/s, compile {ours['compile_seconds']:.1f} s, "
            f"peak {ours['peak_rss_mb']:.0f} MB), scvi-tools {theirs['cells_per_s']:.0f} cells/s "
            f"(steady {theirs['steady_cells_per_s']:.0f}; {theirs['epochs_per_s']:.2f} epochs/s, "
            f"peak {theirs['peak_rss_mb']:.0f} MB); ratio {run['cells_per_s_ratio']:.1f}x "
            f"(vs steady {run['steady_cells_per_s_ratio']:.1f}x; median epoch {run['median_epoch_time_ratio']:.1f}x; "
            f"best epoch {run['best_epoch_cells_per_s_ratio']:.1f}x); held-out NB log-lik/cell ours "
            f"{ours['heldout_nb_loglik_per_cell']:.2f} vs {theirs['heldout_nb_loglik_per_cell']:.2f} "
            f"(relative gap {100 * run['heldout_loglik_relative_gap']:+.2f} %)",
            flush=True,
        )
    import jax

    record = {
        "benchmark": "vae",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "backend": "cpu",
        "torch_threads": torch_threads,
        "jax_version": jax.__version__,
        "runs": runs,
    }
    (out / "vae.json").write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    if len(sys.argv) == 4:
        main(sizes=((int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])),))
    else:
        main()
