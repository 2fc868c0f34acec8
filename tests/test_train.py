import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
import optax
import pytest
import scipy.sparse as sp
from helpers import tree_allclose, tree_identical

from diffbio_eqx._core._checkpoint import read_header
from diffbio_eqx._core._train import (
    SparseRows,
    TrainSettings,
    TrainState,
    fit,
    map_in_chunks,
    sparse_rows_from_csr,
    take_rows,
    to_device_rows,
)


class _Linear(eqx.Module):
    weight: jax.Array
    bias: jax.Array


def _regression_loss(model, batch, context, *, key):
    del key, context
    x, y = batch
    residual = x @ model.weight + model.bias - y
    loss = jnp.mean(residual**2)
    return loss, {"mse": loss}


#: One optimiser object for the tests that train the same regression: the optimiser is a static argument of the
#: compiled epoch, so a new `optax.adam(0.05)` per test would compile the epoch again.
_ADAM = optax.adam(0.05)


def _regression(getkey, n=512, d=6):
    x = jr.normal(getkey(), (n, d))
    true_weight = jr.normal(getkey(), (d,))
    y = x @ true_weight + 0.5 + 0.01 * jr.normal(getkey(), (n,))
    model = _Linear(jnp.zeros(d), jnp.zeros(()))
    return x, y, true_weight, model


def test_fit_recovers_linear_regression(getkey):
    x, y, true_weight, model = _regression(getkey)
    settings = TrainSettings(n_epochs=60, batch_size=64, optimizer=_ADAM, validation_fraction=0.2,
                             progress=False)
    result = fit(model, _regression_loss, (x, y), key=getkey(), settings=settings)
    np.testing.assert_allclose(result.model.weight, true_weight, atol=0.02)
    np.testing.assert_allclose(result.model.bias, 0.5, atol=0.02)
    assert result.train_loss[-1] < 0.01 * result.train_loss[0]
    assert result.validation_loss[-1] < result.validation_loss[0]
    assert result.train_aux["mse"].shape == (60,)
    assert result.n_epochs_run == 60


def test_same_key_same_result_and_resume_is_identical(getkey, tmp_path):
    x, y, _, model = _regression(getkey)
    key = getkey()
    settings = TrainSettings(n_epochs=8, batch_size=32, optimizer=optax.adam(0.01), validation_fraction=0.1,
                             progress=False)
    full = fit(model, _regression_loss, (x, y), key=key, settings=settings)
    again = fit(model, _regression_loss, (x, y), key=key, settings=settings)
    assert tree_identical(full.model, again.model)
    partial_checkpoint = tmp_path / "partial.eqx"

    class Interrupt(Exception):
        pass

    def interrupting_context(epoch):
        if epoch == 3:
            raise Interrupt
        return None

    with pytest.raises(Interrupt):
        fit(model, _regression_loss, (x, y), key=key, context=interrupting_context,
            settings=dataclasses.replace(settings, checkpoint_path=partial_checkpoint))
    assert not list(tmp_path.glob(".*.tmp")), "no half-written checkpoint is left behind"
    # The checkpoint is a typed `TrainState`: the epoch to continue from and early stopping's counters by name.
    like = TrainState(eqx.filter(model, eqx.is_inexact_array), optax.adam(0.01).init(model), np.zeros(8),
                      np.zeros(8), 0, 0.0, 0, 0)
    with open(partial_checkpoint, "rb") as handle:  # a header line (format, epochs), then the leaves
        assert read_header(handle) == {"format": "diffbio_eqx.train_state/1", "n_epochs": 8}
        saved = eqx.tree_deserialise_leaves(handle, like)
    assert saved.next_epoch == 3 and 0 <= saved.best_epoch < 3
    assert saved.best_validation_loss == np.nanmin(saved.validation_loss[:3])
    assert np.all(np.isnan(saved.train_loss[3:])) and np.all(np.isfinite(saved.train_loss[:3]))
    resumed = fit(model, _regression_loss, (x, y), key=key,
                  settings=dataclasses.replace(settings, checkpoint_path=partial_checkpoint, resume=True))
    assert tree_identical(resumed.model, full.model)
    np.testing.assert_array_equal(resumed.train_loss, full.train_loss)


def test_a_checkpointed_run_continues_for_more_epochs_and_bad_checkpoints_are_named(getkey, tmp_path):
    """Resume with a larger `n_epochs` continues the run (it stopped after 4 of 4; 6 give the same model as 6 in
    one go); a path without a suffix works; a truncated or another model's checkpoint, `resume` without a path,
    and a checkpoint in a missing folder are named before any epoch runs."""
    x, y, _, model = _regression(getkey)
    key = getkey()
    settings = TrainSettings(n_epochs=4, batch_size=64, optimizer=_ADAM, progress=False)
    path = tmp_path / "state"  # no suffix: Equinox's own reader would look for state.eqx
    fit(model, _regression_loss, (x, y), key=key, settings=dataclasses.replace(settings, checkpoint_path=path))
    longer = dataclasses.replace(settings, n_epochs=6)
    continued = fit(model, _regression_loss, (x, y), key=key,
                    settings=dataclasses.replace(longer, checkpoint_path=path, resume=True))
    whole = fit(model, _regression_loss, (x, y), key=key, settings=longer)
    assert tree_identical(continued.model, whole.model)
    np.testing.assert_array_equal(continued.train_loss, whole.train_loss)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"^checkpoint_path: '.*state' could not be read as this model's training "
                                         r"state \(.*\); it may be truncated"):
        fit(model, _regression_loss, (x, y), key=key, settings=dataclasses.replace(longer, checkpoint_path=path,
                                                                                 resume=True))
    with pytest.raises(ValueError, match=r"^resume: needs checkpoint_path"):
        TrainSettings(resume=True)
    with pytest.raises(ValueError, match=r"^checkpoint_path: '.*missing/state.eqx' is a folder or its folder does "
                                         r"not exist"):
        fit(model, _regression_loss, (x, y), key=key,
            settings=dataclasses.replace(settings, checkpoint_path=tmp_path / "missing" / "state.eqx"))


def test_sparse_rows_densify_exactly():
    # NumPy draws: `jr.poisson` run eagerly compiles its sampler for this one shape
    dense = np.random.default_rng(0).poisson(0.3, (50, 20)).astype(np.float32)
    rows = sparse_rows_from_csr(sp.csr_matrix(dense))
    index = jnp.array([3, 0, 49, 3])
    # compiled, as the training loop runs it (eagerly, each of its operations would compile on its own)
    np.testing.assert_array_equal(eqx.filter_jit(take_rows)(rows, index), dense[np.array([3, 0, 49, 3])])


def test_sparse_and_dense_training_agree(getkey):
    counts = np.random.default_rng(1).poisson(1.0, (200, 8)).astype(np.float64)
    target = counts @ np.arange(8.0)
    model = _Linear(jnp.zeros(8), jnp.zeros(()))
    kwargs = dict(key=getkey(), settings=TrainSettings(n_epochs=5, batch_size=40, optimizer=optax.sgd(1e-3),
                                                       progress=False))
    dense = fit(model, _regression_loss, (counts, target), **kwargs)
    sparse = fit(model, _regression_loss, (sp.csr_matrix(counts), target), **kwargs)
    assert tree_allclose(dense.model, sparse.model, rtol=1e-12, atol=1e-12)


def test_sparse_float64_input_in_a_float32_session_is_taken_as_dense_is():
    # users run JAX's default float32: float64 SciPy input warned on every call there (the dtype was named
    # explicitly), while float64 NumPy input is converted silently
    counts = np.random.default_rng(1).poisson(1.0, (20, 8)).astype(np.float64)
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse, dense = to_device_rows(sp.csr_matrix(counts)), to_device_rows(counts)
        rows = take_rows(sparse, jnp.arange(20))
    assert isinstance(sparse, SparseRows) and sparse.data.dtype == dense.dtype == rows.dtype == jnp.float32
    np.testing.assert_array_equal(rows, dense)


def test_weighted_rows_follow_weights(getkey):
    x = jnp.arange(4.0)[:, None]
    seen = []

    def loss_fn(model, batch, context, *, key):
        del key, context
        return jnp.sum(model * 0.0) + jnp.mean(batch[0]), {"mean_row": jnp.mean(batch[0])}

    result = fit(jnp.zeros(()), loss_fn, (x,), key=getkey(), row_weights=jnp.array([0.0, 0.0, 1.0, 3.0]),
                 settings=TrainSettings(n_epochs=30, batch_size=4, optimizer=optax.sgd(0.0), progress=False))
    seen = np.asarray(result.train_aux["mean_row"])
    # Rows 2 and 3 drawn 1:3, so the mean row value is 2.75 in expectation; rows 0 and 1 never.
    assert abs(seen.mean() - 2.75) < 0.1
    assert seen.min() >= 2.0


def test_map_in_chunks_pads_and_trims(getkey):
    x = jr.normal(getkey(), (103, 3))
    fn = eqx.filter_jit(lambda batch, context: batch[0] * 2.0)
    out = map_in_chunks(fn, (x,), chunk_size=25)
    np.testing.assert_allclose(out, 2.0 * x)


def test_fit_rejects_bad_arguments(getkey):
    x, y, _, model = _regression(getkey, n=20)
    with pytest.raises(ValueError, match="n_epochs"):
        fit(model, _regression_loss, (x, y), key=getkey(), settings=TrainSettings(n_epochs=0))
    with pytest.raises(ValueError, match="n_epochs"):
        fit(model, _regression_loss, (x, y), key=getkey(), settings=TrainSettings())
    with pytest.raises(ValueError, match=r"data\[1\]"):
        fit(model, _regression_loss, (x, y[:5]), key=getkey(), settings=TrainSettings(n_epochs=1))
    with pytest.raises(ValueError, match="validation_fraction"):
        fit(model, _regression_loss, (x, y), key=getkey(), settings=TrainSettings(n_epochs=1, validation_fraction=1.5))


def test_settings_take_the_stage_defaults_where_left_at_none():
    defaults = TrainSettings(n_epochs=400, batch_size=128, validation_fraction=0.1, description="VAE",
                             hyperparameters={"learning_rate": 1e-3, "eps": 0.01})
    filled = TrainSettings(n_epochs=7, hyperparameters={"eps": 0.1}).filled(defaults)
    assert (filled.n_epochs, filled.batch_size, filled.validation_fraction, filled.description) == (7, 128, 0.1, "VAE")
    assert filled.hyperparameters == {"learning_rate": 1e-3, "eps": 0.1}
    # A given optimiser does not inherit the default optimiser's settings.
    own = TrainSettings(optimizer=optax.sgd(0.1)).filled(defaults)
    assert own.hyperparameters == {} and own.n_epochs == 400


def test_tuned_compiler_options_fall_back_and_change_only_speed(getkey, monkeypatch):
    import diffbio_eqx._core._train as train_module

    x, y, _, model = _regression(getkey)
    key = getkey()

    def train():
        # Fresh compiled functions, so each run compiles with the options in force.
        monkeypatch.setattr(train_module, "_train_epoch", train_module.tuned_jit(train_module._train_epoch.__wrapped__))
        monkeypatch.setattr(train_module, "_validation_loss",
                            train_module.tuned_jit(train_module._validation_loss.__wrapped__))
        return fit(model, _regression_loss, (x, y), key=key,
                   settings=TrainSettings(n_epochs=5, batch_size=64, optimizer=optax.adam(0.05),
                                          validation_fraction=0.2, progress=False))

    options = train_module.tuned_compiler_options()
    # The options this XLA knows (all of them on jax 0.10), with their values; nothing else.
    assert options.items() <= train_module._TUNED_COMPILER_OPTIONS.items()
    with_options = train()
    # An option this XLA does not know (a newer or older release) is dropped, the others kept, rather than failing
    # the compile.
    unknown = {"xla_cpu_no_such_option_for_tests": "1"}
    assert train_module.supported_compiler_options({**options, **unknown}) == options
    monkeypatch.setattr(train_module, "_TUNED_COMPILER_OPTIONS", unknown)
    assert train_module.tuned_compiler_options() == {}
    without_options = train()
    assert tree_allclose(with_options.model, without_options.model, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(with_options.train_loss, without_options.train_loss, rtol=1e-5)


def test_hyperparameters_must_be_injected(getkey):
    x, y, _, model = _regression(getkey)
    key = getkey()
    settings = TrainSettings(n_epochs=1, batch_size=64, progress=False)
    with pytest.raises(ValueError, match=r"hyperparameters: the optimizer does not inject \['learning_rate'\]"):
        fit(model, _regression_loss, (x, y), key=key, settings=dataclasses.replace(
            settings, optimizer=optax.adam(0.05), hyperparameters={"learning_rate": 0.1}))
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
    frozen = fit(model, _regression_loss, (x, y), key=key, settings=dataclasses.replace(settings, optimizer=injected))
    moved = fit(model, _regression_loss, (x, y), key=key, settings=dataclasses.replace(
        settings, optimizer=injected, hyperparameters={"learning_rate": 0.05}))
    assert tree_allclose(frozen.model, model)  # learning rate 0 from the factory call
    assert not tree_allclose(moved.model, model)  # the value given to fit replaced it in the state


def test_one_optimiser_object_per_setting():
    from diffbio_eqx._core._train import shared_optimizer

    assert shared_optimizer() is shared_optimizer("adamw")
    assert shared_optimizer("adam", clip=4.0) is shared_optimizer("adam", clip=4.0)
    assert len({id(shared_optimizer()), id(shared_optimizer("adam")), id(shared_optimizer("adam", clip=4.0))}) == 3
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="kind"):  # the hook's check comes first
        shared_optimizer("sgd")


def test_progress_off_a_terminal_prints_plain_lines_and_the_same_model(getkey, capsys):
    """stderr redirected (pytest's capture is no terminal): one line about every tenth epoch and the last, no
    carriage returns; progress changes only the printing."""
    x, y, _, model = _regression(getkey)
    key = getkey()
    settings = TrainSettings(n_epochs=25, batch_size=64, optimizer=_ADAM, validation_fraction=0.2,
                             description="regression")
    shown = fit(model, _regression_loss, (x, y), key=key, settings=settings)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"regression: epoch {e}/25" for e in (3, 6, 9, 12, 15, 18, 21,
                                                                                            24, 25)]
    assert all(", loss " in line and ", validation " in line for line in lines)
    silent = fit(model, _regression_loss, (x, y), key=key, settings=dataclasses.replace(settings, progress=False))
    assert capsys.readouterr().err == ""
    assert tree_identical(shown.model, silent.model)
