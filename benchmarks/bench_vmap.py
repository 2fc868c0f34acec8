"""vmapped studies against Python loops: a 16-point Harmony theta sweep and a 16-seed VAE ensemble.

- Theta sweep: `jax.vmap` of `diffbio_eqx.harmony` over 16 theta values (one compiled call, common random
  numbers) against a loop of 16 calls of one compiled function (`bench_harmony.bench_sweep`).
- VAE ensemble: 16 `VAENormalizer`s built with `eqx.filter_vmap` over keys and trained together, one epoch per
  compiled call (`eqx.filter_vmap` of a `lax.scan` over minibatches of AdamW steps), against a loop training the
  16 members one after the other with the same compiled (un-vmapped) epoch. Both give the same weights (checked).
- Retrace checks (`eqx.debug.assert_max_traces(max_traces=1)`): Harmony across theta/sigma/lamb values, the
  whole pipeline across Harmony theta / clustering temperature values (both inference paths), and VAE training
  across KL warm-up settings, learning rates and weight decays. tests/test_retrace.py asserts the same under
  the test suite's type checks.

Usage: `python benchmarks/bench_vmap.py [--harmony-cells 10000] [--vae-cells 5000] [--out benchmarks/results]`.

Recorded printout (`make bench` sizes; 2-core x86-64 VM shared with other jobs, load average ~5, jax 0.10.2
CPU, float32; on two cores a vmapped batch has little idle hardware to fill, so vmap and loop are close):

    theta sweep x16, 5000 cells: vmap 2.0 s, loop 2.2 s (vmap/loop 0.92); compile 3.4 s vs 2.2 s
    VAE ensemble x16, 2000 cells x 2000 genes, 1 epoch(s): vmap 1.8 s, loop 1.7 s (loop/vmap 0.94x); max |diff| 4.8e-07
"""

import argparse
import contextlib
import importlib.util
import math
import os
import pathlib
import sys
import time


HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402


N_MEMBERS = 16


def _bench_harmony_module():
    spec = importlib.util.spec_from_file_location("bench_harmony", HERE / "bench_harmony.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vae_epoch_fn(static, optimizer, n_steps: int, batch_size: int):
    """One epoch of minibatch AdamW on the VAE loss, as a pure function of (params, opt_state, data, key)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    def epoch(params, opt_state, counts, log_factorial, key):
        order_key, step_key = jr.split(key)
        n_cells = counts.shape[0]
        order = jnp.resize(jr.permutation(order_key, n_cells), (n_steps * batch_size,)).reshape(n_steps, batch_size)

        def loss(p, index, k):
            vae = eqx.combine(p, static)
            return vae.loss((counts[index], None, log_factorial[index]), key=k, kl_weight=1.0)[0]

        def step(carry, inputs):
            p, state = carry
            index, k = inputs
            value, grads = eqx.filter_value_and_grad(loss)(p, index, k)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
                updates, state = optimizer.update(grads, state, p)
            return (eqx.apply_updates(p, updates), state), value

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (order, jr.split(step_key, n_steps)))
        return params, opt_state, jnp.mean(losses)

    return epoch


def bench_ensemble(n_cells: int, n_genes: int = 2000, n_epochs: int = 1, batch_size: int = 128,
                   n_members: int = N_MEMBERS) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import jax.tree_util as jtu
    import numpy as np

    import diffbio_eqx as dx
    from diffbio_eqx._core._train import scvi_optimizer
    from diffbio_eqx._vae._stage import log_factorial_per_cell

    counts_np, _, _ = _common.simulated_counts(n_cells, n_genes=n_genes)
    counts = jnp.asarray(counts_np)
    log_factorial = jnp.asarray(log_factorial_per_cell(counts_np).astype(np.float32))
    make = lambda key: dx.VAENormalizer(n_genes, hidden_dims=(128,), latent_dim=10, likelihood="nb", key=key)
    models = eqx.filter_vmap(make)(jr.split(jr.key(0), n_members))
    spec = jtu.tree_map(eqx.is_inexact_array, models)
    spec = eqx.tree_at(lambda m: m.target_library_size, spec, replace=False)  # a setting, not a weight
    params, static = eqx.partition(models, spec)
    optimizer = scvi_optimizer()
    n_steps = math.ceil(n_cells / batch_size)
    epoch = vae_epoch_fn(static, optimizer, n_steps, batch_size)
    keys = jr.split(jr.key(1), n_members)
    opt_states = eqx.filter_vmap(optimizer.init)(params)

    ensemble_epoch = eqx.filter_jit(eqx.filter_vmap(epoch, in_axes=(0, 0, None, None, 0)))
    member_epoch = eqx.filter_jit(epoch)

    def run_ensemble():
        p, s = params, opt_states
        for e in range(n_epochs):
            p, s, _ = ensemble_epoch(p, s, counts, log_factorial, jax.vmap(lambda k: jr.fold_in(k, e))(keys))
        return p

    def run_loop():
        out = []
        for i in range(n_members):
            p, s = jtu.tree_map(lambda leaf: leaf[i], (params, opt_states))
            for e in range(n_epochs):
                p, s, _ = member_epoch(p, s, counts, log_factorial, jr.fold_in(keys[i], e))
            out.append(p)
        return out

    vmapped, vmap_first = _common.timed(run_ensemble)
    looped, loop_first = _common.timed(run_loop)
    vmap_seconds, _ = _common.best_of(run_ensemble, 2)
    loop_seconds, _ = _common.best_of(run_loop, 2)
    stacked = jtu.tree_map(lambda *leaves: jnp.stack(leaves), *looped)
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jtu.tree_leaves(vmapped), jtu.tree_leaves(stacked)))
    cell_passes = n_members * n_epochs * n_steps * batch_size
    return {
        "n_cells": n_cells, "n_genes": n_genes, "n_members": n_members, "n_epochs": n_epochs,
        "batch_size": batch_size, "vmap_seconds": vmap_seconds, "loop_seconds": loop_seconds,
        "loop_over_vmap": loop_seconds / vmap_seconds,
        "vmap_compile_seconds": max(vmap_first - vmap_seconds, 0.0),
        "loop_compile_seconds": max(loop_first - loop_seconds, 0.0),
        "vmap_cells_per_s": cell_passes / vmap_seconds, "loop_cells_per_s": cell_passes / loop_seconds,
        "max_abs_weight_difference": difference,
    }


@contextlib.contextmanager
def _traced_once(module, name: str):
    """Swap `module.name` (an `eqx.filter_jit` function) for one that may trace only once, then restore it."""
    import equinox as eqx

    original = getattr(module, name)
    setattr(module, name, eqx.filter_jit(eqx.debug.assert_max_traces(original.__wrapped__, max_traces=1)))
    try:
        yield
    finally:
        setattr(module, name, original)


def _traces_ok(fn) -> dict:
    try:
        fn()
    except Exception as error:  # assert_max_traces raises on a second trace
        return {"passed": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    return {"passed": True}


def retrace_checks() -> dict:
    """Each check patches one compiled entry point with `assert_max_traces(max_traces=1)` and calls it with
    several hyperparameter values."""
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import diffbio_eqx as dx
    from diffbio_eqx._core import _train
    from diffbio_eqx._harmony import _stage as _harmony
    from diffbio_eqx._pipeline import _run

    results = {}
    x, batches = _common.gaussian_embedding(500, n_dims=10, n_batches=3)

    def harmony_values():
        for theta, sigma, lamb in ((1.0, 0.1, 1.0), (2.0, 0.2, 0.5), (3.0, 0.05, -1.0)):
            dx.harmony(x, batches, key=jr.key(0), theta=theta, sigma=sigma, lamb=lamb, max_iter_harmony=2)

    with _traced_once(_harmony, "_harmony_jit"):
        results["harmony_theta_sigma_lamb"] = _traces_ok(harmony_values)

    counts, _, labels = _common.simulated_counts(200, n_genes=100, n_groups=3, n_batches=2)
    data = {"counts": counts, "batch_labels": labels, "ambient_profile": counts.sum(axis=0) + 1.0}
    config = dx.SingleCellPipelineConfig(n_genes=100, n_batches=2, latent_dim=8, hidden_dims=(16,), n_clusters=3,
                                         batch_correction_clusters=5, umap_hidden_size=16)
    base = dx.SingleCellPipeline(config, key=jr.key(0))
    reference = dx.HarmonyReference(jnp.ones((5, 8)) / np.sqrt(8), jnp.zeros((5, 2, 8)), jnp.asarray(0.1), (2,))
    with_reference = eqx.tree_at(lambda p: p.harmony_reference, base, reference, is_leaf=lambda n: n is None)

    def pipeline_values(pipeline, inference):
        def run():
            for theta, temperature in ((1.0, 0.5), (2.0, 1.0), (4.0, 2.0)):
                swept = eqx.tree_at(lambda p: (p.batch_correction.theta, p.clustering.temperature), pipeline,
                                    (jnp.asarray(theta), jnp.asarray(temperature)))
                dx.run_pipeline(swept, data, key=jr.key(0), inference=inference)
        return run

    for name, pipeline, inference in (("pipeline_harmony_run", base, False),
                                      ("pipeline_reference_mapping", with_reference, True)):
        with _traced_once(_run, "_run_compiled"):
            results[f"{name}_theta_temperature"] = _traces_ok(pipeline_values(pipeline, inference))

    vae = dx.VAENormalizer(100, hidden_dims=(16,), latent_dim=4, key=jr.key(0))

    def vae_values():
        for warmup, top, rate, decay in ((1, 1.0, 1e-3, 1e-6), (5, 0.5, 3e-3, 1e-4)):
            dx.fit_vae(vae, counts, key=jr.key(1), n_epochs_kl_warmup=warmup, max_kl_weight=top,
                       settings=dx.TrainSettings(n_epochs=2, progress=False,
                                                 hyperparameters={"learning_rate": rate, "weight_decay": decay}))

    with _traced_once(_train, "_train_epoch"):
        results["vae_training_kl_warmup_learning_rate"] = _traces_ok(vae_values)
    return results


def main(out_dir: str | os.PathLike[str] = HERE / "results", harmony_cells: int = 10_000, vae_cells: int = 5000,
         n_thetas: int = N_MEMBERS, vae_epochs: int = 1) -> dict:
    started = time.perf_counter()
    checks = retrace_checks()
    print("retrace checks: " + ", ".join(f"{k} {'ok' if v['passed'] else 'FAILED'}" for k, v in checks.items()),
          flush=True)
    sweep = _bench_harmony_module().bench_sweep(harmony_cells, n_thetas)
    print(
        f"theta sweep x{n_thetas}, {harmony_cells} cells: vmap {sweep['vmap_seconds']:.1f} s, loop "
        f"{sweep['loop_seconds']:.1f} s (vmap/loop {sweep['vmap_over_loop']:.2f}); compile "
        f"{sweep['vmap_compile_seconds']:.1f} s vs {sweep['loop_compile_seconds']:.1f} s", flush=True,
    )
    ensemble = bench_ensemble(vae_cells, n_epochs=vae_epochs)
    print(
        f"VAE ensemble x{ensemble['n_members']}, {vae_cells} cells x {ensemble['n_genes']} genes, "
        f"{vae_epochs} epoch(s): vmap {ensemble['vmap_seconds']:.1f} s, loop {ensemble['loop_seconds']:.1f} s "
        f"(loop/vmap {ensemble['loop_over_vmap']:.2f}x); max |diff| {ensemble['max_abs_weight_difference']:.1e}",
        flush=True,
    )
    environment = _common.environment()
    run = {"backend": environment["backend"], "environment": environment, "theta_sweep": sweep,
           "vae_ensemble": ensemble, "retrace_checks": checks, "wall_seconds": time.perf_counter() - started}
    path = pathlib.Path(out_dir) / "vmap.json"
    record = {"benchmark": "vmap", "runs": _common.merge_runs(path, [run], ("backend",))}
    _common.write_json(path, record)
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harmony-cells", type=int, default=10_000)
    parser.add_argument("--vae-cells", type=int, default=5000)
    parser.add_argument("--vae-epochs", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    main(args.out, args.harmony_cells, args.vae_cells, vae_epochs=args.vae_epochs)
