"""VAE training speed and held-out likelihood: diffbio_eqx `VAENormalizer` vs scvi-tools `SCVI`, side by side.

Both models get the same architecture (1 hidden layer of 128, latent 10, negative binomial, gene dispersion,
encoder dropout 0.1, no batch norm), the same optimiser (AdamW, lr 1e-3, eps 0.01, weight decay 1e-6), batch size
128, the same epochs and KL warm-up, the same training cells (each holds out 10 % of them and computes its
validation ELBO every epoch) and are scored on the same held-out test cells: the NB log-likelihood with z at the
posterior mean.

The same treatment for both (issue 27): each training run is a fresh process (its peak memory, VmHWM, is its
own) with each library's default threads, and nothing is warmed up, so
- `end_to_end` is `train()` / `fit_vae` from the call to the trained model, our XLA compile included;
- `steady` is the median epoch time (the first epoch, which holds our compile, is in the median like any other;
  `compile_seconds` reports it apart: our first epoch minus our median epoch).
The tools run interleaved, `repeats` rounds of (ours, scvi-tools, ours with `EQX_ON_ERROR=nan`), and every ratio is
quoted as the median over the rounds with its range. Ours runs in equinox's default error mode (`raise`, what
users run: its count checks add host callbacks); the `nan` runs report what those checks cost.
Run: `python benchmarks/bench_vae.py [n_cells n_genes n_epochs [repeats]]`.

scvi-tools 1.4.2 imports its JAX code whenever jax and optax are importable, and then fails without flax; the
scvi-tools subprocess therefore hides optax (`sys.modules["optax"] = None`) before importing scvi.
"""

import os


os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import resource
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


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
    settings = dx.TrainSettings(batch_size=128, validation_fraction=0.1, progress=False, n_epochs=n_epochs)
    start = time.perf_counter()
    result = dx.fit_vae(vae, train, settings=settings, key=jr.key(1), n_epochs_kl_warmup=n_epochs)
    jax.block_until_ready(result.model)
    seconds = time.perf_counter() - start
    epoch_seconds = np.diff(np.asarray(stamps + [time.perf_counter()]))
    ll = np.asarray(dx.vae_log_likelihood(result.model, test))
    n_train = train.shape[0] - int(round(0.1 * train.shape[0]))
    queue.put({
        "tool": "diffbio_eqx",
        "train_seconds": seconds,
        "compile_seconds": max(float(epoch_seconds[0] - np.median(epoch_seconds)), 0.0),
        "error_mode": os.environ.get("EQX_ON_ERROR", "raise"),
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

    if torch_threads is not None:
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
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__},
    })


def _median_of(runs: list[dict], field: str) -> float:
    return _common.median(run[field] for run in runs)


def _compare(ours: list[dict], theirs: list[dict], ours_nan: list[dict]) -> dict:
    """Interleaved rounds -> the ratios (median and range over rounds) and the medians of each tool's figures."""
    return {
        "end_to_end_speedup": _common.ratio_summary([r["train_seconds"] for r in theirs],
                                                    [r["train_seconds"] for r in ours]),
        "steady_epoch_speedup": _common.ratio_summary([r["median_epoch_seconds"] for r in theirs],
                                                      [r["median_epoch_seconds"] for r in ours]),
        "nan_mode_speedup_over_raise": _common.ratio_summary([r["train_seconds"] for r in ours],
                                                             [r["train_seconds"] for r in ours_nan]),
        "nan_mode_steady_speedup_over_raise": _common.ratio_summary([r["median_epoch_seconds"] for r in ours],
                                                                    [r["median_epoch_seconds"] for r in ours_nan]),
        "heldout_loglik_relative_gap": (_median_of(ours, "heldout_nb_loglik_per_cell")
                                        - _median_of(theirs, "heldout_nb_loglik_per_cell"))
        / abs(_median_of(theirs, "heldout_nb_loglik_per_cell")),
    }


def main(out_dir: str | os.PathLike[str] = "benchmarks/results", sizes=((5000, 2000, 20),), repeats: int = 3,
         torch_threads: int | None = None) -> dict:
    """Benchmark each `(n_cells, n_genes, n_epochs)` in `sizes` over `repeats` interleaved rounds; write
    `<out_dir>/vae.json`. `torch_threads`: None keeps torch's default, as XLA keeps its own."""
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
        ours, theirs, ours_nan = [], [], []
        try:
            for _ in range(repeats):
                ours.append(_common.in_subprocess(_run_ours, str(path), n_epochs, env={"EQX_ON_ERROR": "raise"}))
                theirs.append(_common.in_subprocess(_run_scvi, str(path), n_epochs, torch_threads))
                ours_nan.append(_common.in_subprocess(_run_ours, str(path), n_epochs, env={"EQX_ON_ERROR": "nan"}))
        finally:
            path.unlink()
        run = {
            "n_cells": int(counts.shape[0]), "n_genes": n_genes, "n_epochs": n_epochs,
            "n_train_cells": int(counts.shape[0] - n_test), "n_test_cells": int(n_test), "error_mode": "raise",
            "diffbio_eqx": ours, "scvi_tools": theirs, "diffbio_eqx_nan_mode": ours_nan,
            **_compare(ours, theirs, ours_nan),
        }
        runs.append(run)
        e2e, steady = run["end_to_end_speedup"], run["steady_epoch_speedup"]
        print(
            f"{n_cells} cells x {n_genes} genes, {n_epochs} epochs, {repeats} interleaved rounds: end to end "
            f"{e2e['median']:.1f}x (range {e2e['min']:.1f}-{e2e['max']:.1f}; ours "
            f"{_median_of(ours, 'train_seconds'):.1f} s incl. compile {_median_of(ours, 'compile_seconds'):.1f} s, "
            f"scvi-tools {_median_of(theirs, 'train_seconds'):.1f} s), steady epoch {steady['median']:.1f}x "
            f"(range {steady['min']:.1f}-{steady['max']:.1f}); nan mode vs raise "
            f"{run['nan_mode_speedup_over_raise']['median']:.2f}x; held-out NB log-lik/cell ours "
            f"{_median_of(ours, 'heldout_nb_loglik_per_cell'):.2f} vs "
            f"{_median_of(theirs, 'heldout_nb_loglik_per_cell'):.2f} "
            f"(relative gap {100 * run['heldout_loglik_relative_gap']:+.2f} %)",
            flush=True,
        )
    record = {"benchmark": "vae", "environment": _common.environment("scvi-tools", "torch"), "torch_threads":
              torch_threads, "runs": runs}
    _common.write_json(out / "vae.json", record)
    return record


if __name__ == "__main__":
    if len(sys.argv) >= 4:
        main(sizes=((int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])),),
             repeats=int(sys.argv[4]) if len(sys.argv) > 4 else 3)
    else:
        main()
