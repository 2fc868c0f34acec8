"""VAE training speed and held-out likelihood: diffbio_eqx `VAENormalizer` vs scvi-tools `SCVI`, side by side.

Both models get the same architecture (1 hidden layer of 128, latent 10, negative binomial, gene dispersion,
encoder dropout 0.1, no batch norm), the same optimiser (AdamW, lr 1e-3, eps 0.01, weight decay 1e-6), batch size
128, the same epochs and KL warm-up, the same training cells (each holds out 10 % of them for its own validation)
and are scored on the same held-out test cells: the NB log-likelihood with z at the posterior mean. Each tool runs
in its own subprocess so that peak memory (max RSS) is its own. Our compile time is measured separately.
Run: `python benchmarks/bench_vae.py [n_cells n_genes n_epochs]`.

scvi-tools 1.4.2 imports its JAX code whenever jax and optax are importable, and then fails without flax; the
scvi-tools subprocess therefore hides optax (`sys.modules["optax"] = None`) before importing scvi.
"""

import os


os.environ.setdefault("EQX_ON_ERROR", "nan")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime
import json
import multiprocessing
import pathlib
import platform
import resource
import sys
import time


def _rss_mb() -> float:
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

    train, test = _load(path)
    baseline = _rss_mb()
    vae = dx.VAENormalizer(train.shape[1], hidden_dims=(128,), latent_dim=10, likelihood="nb", dispersion="gene",
                           dropout_rate=0.1, key=jr.key(0))
    kwargs = dict(key=jr.key(1), batch_size=128, validation_fraction=0.1, n_epochs_kl_warmup=n_epochs,
                  progress=False)
    start = time.perf_counter()
    dx.fit_vae(vae, train, n_epochs=1, **kwargs)  # compiles the epoch and validation steps
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = dx.fit_vae(vae, train, n_epochs=n_epochs, **kwargs)
    jax.block_until_ready(result.model)
    seconds = time.perf_counter() - start
    ll = np.asarray(dx.vae_log_likelihood(result.model, test))
    n_train = train.shape[0] - int(round(0.1 * train.shape[0]))
    queue.put({
        "tool": "diffbio_eqx",
        "train_seconds": seconds,
        "compile_seconds": max(first - seconds / n_epochs, 0.0),
        "epochs_per_s": n_epochs / seconds,
        "cells_per_s": n_train * n_epochs / seconds,
        "heldout_nb_loglik_per_cell": float(ll.mean()),
        "final_validation_loss": float(result.validation_loss[-1]),
        "peak_rss_mb": _rss_mb(),
        "rss_before_model_mb": baseline,
        "versions": {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0])},
    })


def _run_scvi(path: str, n_epochs: int, queue) -> None:
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
    model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1, dispersion="gene",
                            gene_likelihood="nb", use_batch_norm="none", use_layer_norm="none")

    class EpochTimes(Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter())

    timer = EpochTimes()
    start = time.perf_counter()
    model.train(max_epochs=n_epochs, batch_size=128, train_size=0.9, accelerator="cpu", devices=1,
                enable_progress_bar=False, callbacks=[timer], logger=False, enable_checkpointing=False,
                plan_kwargs={"n_epochs_kl_warmup": n_epochs, "optimizer": "AdamW", "lr": 1e-3, "eps": 0.01,
                             "weight_decay": 1e-6})
    seconds = time.perf_counter() - start
    steady = (timer.times[-1] - timer.times[0]) / max(len(timer.times) - 1, 1)
    module = model.module
    module.eval()
    with torch.no_grad():
        x = torch.from_numpy(test)
        batch_index = torch.zeros((x.shape[0], 1))
        inference = module.inference(x=x, batch_index=batch_index)
        generative = module.generative(z=inference["qz"].loc, library=inference["library"], batch_index=batch_index)
        ll = generative["px"].log_prob(x).sum(-1).numpy()
    n_train = int(round(0.9 * train.shape[0]))
    history = model.history.get("elbo_validation")
    queue.put({
        "tool": "scvi-tools",
        "train_seconds": seconds,
        "steady_epoch_seconds": steady,
        "epochs_per_s": n_epochs / seconds,
        "steady_epochs_per_s": 1.0 / steady,
        "cells_per_s": n_train * n_epochs / seconds,
        "steady_cells_per_s": n_train / steady,
        "heldout_nb_loglik_per_cell": float(ll.mean()),
        "final_validation_loss": None if history is None else float(np.asarray(history)[-1, 0]),
        "peak_rss_mb": _rss_mb(),
        "rss_before_model_mb": baseline,
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()},
    })


def _in_subprocess(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(out_dir: str | os.PathLike[str] = "benchmarks/results", sizes=((5000, 2000, 30),)) -> dict:
    """Benchmark each `(n_cells, n_genes, n_epochs)` in `sizes`; write `<out_dir>/vae.json`."""
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
        ours = _in_subprocess(_run_ours, str(path), n_epochs)
        theirs = _in_subprocess(_run_scvi, str(path), n_epochs)
        path.unlink()
        run = {
            "n_cells": int(counts.shape[0]), "n_genes": n_genes, "n_epochs": n_epochs,
            "n_train_cells": int(counts.shape[0] - n_test), "n_test_cells": int(n_test),
            "diffbio_eqx": ours, "scvi_tools": theirs,
            "cells_per_s_ratio": ours["cells_per_s"] / theirs["cells_per_s"],
            "steady_cells_per_s_ratio": ours["cells_per_s"] / theirs["steady_cells_per_s"],
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
            f"(vs steady {run['steady_cells_per_s_ratio']:.1f}x); held-out NB log-lik/cell ours "
            f"{ours['heldout_nb_loglik_per_cell']:.2f} vs {theirs['heldout_nb_loglik_per_cell']:.2f} "
            f"(relative gap {100 * run['heldout_loglik_relative_gap']:+.2f} %)",
            flush=True,
        )
    import jax

    record = {
        "benchmark": "vae",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "backend": "cpu",
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
