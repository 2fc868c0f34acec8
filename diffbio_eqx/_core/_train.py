"""The shared minibatch training loop: optax steps as one `lax.scan` per epoch under one `eqx.filter_jit`.

Every trainable stage (VAE, ambient model, UMAP encoder, the pipeline's fine-tuning) trains through `fit`.
Data stays on the device for the whole run; sparse counts are held in a padded row format and densified one
minibatch at a time inside the compiled step. Epoch `e` draws its randomness from `fold_in(key, e)`, so a run
resumed from a checkpoint after epoch `k` continues exactly as the uninterrupted run would.
"""

import functools as ft
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import scipy.sparse as sp
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


class SparseRows(eqx.Module):
    """A CSR matrix on the device, from which any set of rows densifies with fixed shapes.

    Memory is that of the CSR arrays (no padding to the longest row): a row set is gathered as
    `(n_index, max_nnz)` slots, masked past each row's end, and scattered into a dense block.

    - `data`: `(nnz,)` non-zero values (one zero when the matrix has none, so gathers stay valid).
    - `indices`: `(nnz,)` their column indices (int16 when there are fewer than 32,768 columns, else int32).
    - `indptr`: `(n_rows + 1,)` row starts (int32, or int64 under `jax_enable_x64` past 2**31 - 1 non-zeros).
    - `n_columns`: the dense width (static); `max_nnz`: the longest row's non-zeros (static).
    """

    data: Float[Array, " n_slots"]
    indices: Int[Array, " n_slots"]
    indptr: Int[Array, " n_indptr"]
    n_columns: int = eqx.field(static=True)
    max_nnz: int = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indptr.shape[0] - 1, self.n_columns)


def sparse_rows_from_csr(matrix: sp.spmatrix, *, dtype: Any = None) -> SparseRows:
    """Convert a SciPy sparse matrix to `SparseRows` (host to device once; duplicates are summed).

    The device holds `nnz * (itemsize + 2)` bytes (4 with more than 32,767 columns) plus the row pointers.
    """
    csr = matrix if sp.isspmatrix_csr(matrix) else sp.csr_matrix(matrix)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    n_rows, n_columns = csr.shape
    nnz = int(csr.nnz)
    if nnz >= np.iinfo(np.int32).max and not jax.config.jax_enable_x64:
        raise ValueError(f"counts: {nnz} non-zeros need 64-bit row pointers; enable jax_enable_x64")
    pointer_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    index_dtype = np.int16 if n_columns <= np.iinfo(np.int16).max else np.int32
    max_nnz = max(int(np.diff(csr.indptr).max()) if n_rows else 0, 1)
    data, indices = csr.data, csr.indices
    if nnz == 0:
        data, indices = np.zeros(1, csr.dtype), np.zeros(1, index_dtype)
    return SparseRows(
        jnp.asarray(data, dtype=dtype or csr.dtype),
        jnp.asarray(indices.astype(index_dtype, copy=False)),
        jnp.asarray(csr.indptr.astype(pointer_dtype, copy=False)),
        n_columns,
        max_nnz,
    )


DeviceRows = Array | SparseRows


def to_device_rows(x: Any, *, dtype: Any = None) -> DeviceRows:
    """Put cells-major data on the device: SciPy sparse -> `SparseRows`, anything else -> a JAX array."""
    if isinstance(x, SparseRows):
        return x
    if sp.issparse(x):
        return sparse_rows_from_csr(x, dtype=dtype)
    return jnp.asarray(x, dtype=dtype)


def take_rows(rows: DeviceRows, index: Int[Array, " n_index"]) -> Array:
    """Gather rows as a dense array (densifying `SparseRows` on the fly)."""
    if isinstance(rows, SparseRows):
        start = rows.indptr[index]
        stop = rows.indptr[index + 1]
        positions = start[:, None] + jnp.arange(rows.max_nnz, dtype=start.dtype)[None, :]
        inside = positions < stop[:, None]
        positions = jnp.where(inside, positions, 0)
        values = jnp.where(inside, rows.data[positions], 0)
        columns = rows.indices[positions].astype(jnp.int32)
        dense = jnp.zeros((index.shape[0], rows.n_columns), dtype=values.dtype)
        return dense.at[jnp.arange(index.shape[0])[:, None], columns].add(values)
    return rows[index]


def n_rows_of(rows: Any) -> int:
    return rows.shape[0]


Devices = None | str | Sequence[jax.Device] | jax.sharding.Mesh

#: The mesh axis that data-parallel training and chunked inference shard cells (minibatch rows) along.
CELLS_AXIS = "cells"


def data_mesh(devices: Devices) -> jax.sharding.Mesh | None:
    """A 1-D `jax.sharding.Mesh` over `devices` with the axis `"cells"` (None stays None: one device).

    `devices` is `"all"` (`jax.devices()`), a sequence of devices, or a ready 1-D mesh.
    """
    if devices is None or isinstance(devices, jax.sharding.Mesh):
        if isinstance(devices, jax.sharding.Mesh) and devices.axis_names != (CELLS_AXIS,):
            raise ValueError(f"devices: a mesh must have the single axis {CELLS_AXIS!r}, got {devices.axis_names}")
        return devices
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices: expected None, 'all', a sequence of devices or a Mesh, got {devices!r}")
        devices = jax.devices()
    devices = list(devices)
    if not devices:
        raise ValueError("devices: got an empty sequence")
    return jax.sharding.Mesh(np.array(devices), (CELLS_AXIS,))


def _replicate(tree: PyTree, mesh: jax.sharding.Mesh | None) -> PyTree:
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())
    return jtu.tree_map(lambda leaf: jax.device_put(leaf, replicated) if eqx.is_array(leaf) else leaf, tree)


def _shard_cells(tree: PyTree, sharding: NamedSharding | None) -> PyTree:
    """Constrain (under jit) every array's leading axis to be split over the mesh's cells axis."""
    if sharding is None:
        return tree
    return jtu.tree_map(lambda leaf: jax.lax.with_sharding_constraint(leaf, sharding), tree)


def _host_rows(x: Any, start: int, size: int) -> Any:
    n = n_rows_of(x)
    if sp.issparse(x) or isinstance(x, np.ndarray):
        # A contiguous slice (cheap for CSR); the last chunk wraps around to keep the shape fixed.
        rows = x[start : start + size]
        if start + size > n:
            wrap = x[np.arange(start + size - n) % n]
            rows = sp.vstack([rows, wrap], format="csr") if sp.issparse(x) else np.concatenate([rows, wrap])
        return rows.toarray() if sp.issparse(rows) else rows
    return take_rows(x, jnp.arange(start, start + size) % n)


def map_in_chunks(
    fn: Callable[..., PyTree], data: Sequence[Any], *, chunk_size: int = 4096, context: PyTree = None,
    devices: Devices = None,
) -> PyTree:
    """Apply `fn(batch, context)` to consecutive row chunks of `data` and concatenate the outputs.

    Every chunk has the same shape (the last is padded and trimmed), so `fn` compiles once. `fn` should be an
    `eqx.filter_jit`-ed function; `data` entries are cells-major (dense or sparse). Host data (NumPy, SciPy) is
    cut and densified on the host one chunk at a time, so only a chunk is ever on the device.

    With `devices` (`"all"`, a sequence of devices or a 1-D mesh, see `data_mesh`), every chunk is split
    along its cells over the devices (`NamedSharding`) and `context` is replicated, so `fn` runs
    data-parallel; `chunk_size` is rounded up to a multiple of the number of devices.
    """
    mesh = data_mesh(devices)
    n = n_rows_of(data[0])
    chunk = max(1, min(chunk_size, n))
    sharding = None
    if mesh is not None:
        chunk = -(-chunk // mesh.size) * mesh.size
        sharding = NamedSharding(mesh, PartitionSpec(CELLS_AXIS))
        context = _replicate(context, mesh)
    outputs = []
    for start in range(0, n, chunk):
        batch = tuple(jnp.asarray(_host_rows(d, start, chunk)) for d in data)
        if sharding is not None:
            batch = jax.device_put(batch, sharding)
        output = fn(batch, context)
        if start + chunk > n:  # trim the padded last chunk itself, so the concatenation is the only full copy
            output = jtu.tree_map(lambda part, keep=n - start: part[:keep], output)
        outputs.append(output)
    if len(outputs) == 1:
        return outputs[0]
    return jtu.tree_map(lambda *parts: jnp.concatenate(parts, axis=0), *outputs)


def scvi_optimizer(learning_rate: float = 1e-3, *, weight_decay: float = 1e-6, eps: float = 0.01
                   ) -> optax.GradientTransformation:
    """scvi-tools' default: AdamW with lr 1e-3, eps 0.01, weight decay 1e-6.

    The settings live in the optimiser state (`optax.inject_hyperparams`, float32), so `fit` can change them
    through its `hyperparameters` argument without compiling the training step again.
    """
    return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate, eps=eps, weight_decay=weight_decay
    )


@ft.cache
def shared_scvi_optimizer() -> optax.GradientTransformation:
    """One `scvi_optimizer()` object per process: the optimiser is a static argument of the compiled epoch, so
    stages pass this one and their settings as `fit(..., hyperparameters=...)` instead of a fresh object per call
    (which would compile the epoch again on every call)."""
    return scvi_optimizer()


# Newer optax names the state of `inject_hyperparams` InjectStatefulHyperparamsState; older releases lack it.
_INJECTED_STATES = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def set_hyperparameters(opt_state: PyTree, values: dict[str, Any]) -> PyTree:
    """Set injected hyperparameters (`optax.inject_hyperparams`) in an optimiser state, wherever they occur.

    Values keep the dtype the state holds them in. Raises if a name is not injected anywhere in the state.
    """
    found: set[str] = set()

    def replace(node: Any) -> Any:
        if not isinstance(node, _INJECTED_STATES):
            return node
        injected = dict(node.hyperparams)
        for name, value in values.items():
            if name in injected:
                injected[name] = jnp.asarray(value, dtype=injected[name].dtype)
                found.add(name)
        return node._replace(hyperparams=injected)

    updated = jtu.tree_map(replace, opt_state, is_leaf=lambda node: isinstance(node, _INJECTED_STATES))
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(f"hyperparameters: the optimizer does not inject {missing} (see optax.inject_hyperparams)")
    return updated


class FitResult(eqx.Module):
    """What `fit` returns.

    - `model`: the trained model (the last epoch's, or the best validation epoch's with `restore_best=True`).
    - `train_loss`: `(n_epochs,)` mean training loss per epoch; NaN after an early stop.
    - `validation_loss`: `(n_epochs,)` mean validation loss per epoch; NaN without a validation split.
    - `train_aux`: the loss's auxiliary values, averaged per epoch, each `(n_epochs,)`.
    - `n_epochs_run`, `best_epoch`, `stopped_early`.
    """

    model: PyTree
    train_loss: Float[Array, " n_epochs"]
    validation_loss: Float[Array, " n_epochs"]
    train_aux: dict[str, Float[Array, " n_epochs"]]
    n_epochs_run: int = eqx.field(static=True)
    best_epoch: int = eqx.field(static=True)
    stopped_early: bool = eqx.field(static=True)


LossFn = Callable[..., tuple[Float[Array, ""], dict[str, Float[Array, ""]]]]


def _epoch_order(
    key: PRNGKeyArray, rows: Int[Array, " n_train"], row_weights: Float[Array, " n_rows"] | None,
    n_steps: int, batch_size: int,
) -> Int[Array, "n_steps batch_size"]:
    total = n_steps * batch_size
    if row_weights is None:
        order = jr.permutation(key, rows)
        order = jnp.resize(order, (total,))  # wrap around so every step has a full batch
    else:
        weights = row_weights[rows]
        order = rows[jr.choice(key, rows.shape[0], (total,), replace=True, p=weights / jnp.sum(weights))]
    return order.reshape(n_steps, batch_size)


# XLA's CPU compiler (jax 0.10) hands reductions fused with elementwise math to YNNPACK. In the training step those
# fusions (the likelihood's per-cell and per-gene sums, with lgamma/digamma inside) ran about twice as slow as XLA's
# own loop fusions; with YNNPACK kept to the matrix products a VAE epoch took 20-25 % less time, and the VAE's
# inference chunks (softmax over genes) about 25 % less. Harmony's compiled loop was slower with this setting, so
# it applies only where `tuned_jit` is used: the training loop and the VAE's chunked inference.
_TUNED_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@ft.cache
def tuned_compiler_options() -> dict[str, str]:
    """The XLA options `tuned_jit` compiles with: `{}` where this XLA does not know them (other releases)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_TUNED_COMPILER_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # an unknown option or value (XLA's INVALID_ARGUMENT), or a jax.jit without the argument
        return {}
    return dict(_TUNED_COMPILER_OPTIONS)


class _TunedJit:
    """`eqx.filter_jit(fn, compiler_options=tuned_compiler_options())`, built at the first call.

    Lazy because probing the options compiles on the default backend, which importing the package must not
    initialise. `__wrapped__` is `fn`, as for `eqx.filter_jit`.
    """

    def __init__(self, fn: Callable[..., Any]):
        ft.update_wrapper(self, fn)
        self._jitted: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._jitted is None:
            options = tuned_compiler_options()
            # Without options, no `compiler_options` argument at all (older jax.jit does not take one).
            jit_options = {"compiler_options": options} if options else {}
            self._jitted = eqx.filter_jit(self.__wrapped__, **jit_options)
        return self._jitted(*args, **kwargs)


def tuned_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: `eqx.filter_jit` with `tuned_compiler_options()` (see `_TunedJit`)."""
    return _TunedJit(fn)


@tuned_jit
def _train_epoch(
    params: PyTree, static: PyTree, opt_state: PyTree, data: tuple[DeviceRows, ...],
    train_rows: Int[Array, " n_train"], row_weights: Float[Array, " n_rows"] | None, context: PyTree,
    key: PRNGKeyArray, *, loss_fn: LossFn, optimizer: optax.GradientTransformation, n_steps: int,
    batch_size: int, cells: NamedSharding | None,
) -> tuple[PyTree, PyTree, Float[Array, ""], dict[str, Float[Array, ""]]]:
    order_key, step_key = jr.split(key)
    order = _epoch_order(order_key, train_rows, row_weights, n_steps, batch_size)

    def loss_of(trainable: PyTree, batch: tuple[Array, ...], step_key: PRNGKeyArray):
        return loss_fn(eqx.combine(trainable, static), batch, context, key=step_key)

    grad_fn = eqx.filter_value_and_grad(loss_of, has_aux=True)

    def step(carry, inputs):
        trainable, state = carry
        index, step_key = inputs
        # With a mesh, each device gathers and differentiates its share of the minibatch; XLA sums the
        # gradients across devices (the loss is a mean over the batch), and parameters stay replicated.
        batch = _shard_cells(tuple(take_rows(d, _shard_cells(index, cells)) for d in data), cells)
        (loss, aux), grads = grad_fn(trainable, batch, step_key)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, state = optimizer.update(grads, state, trainable)
        trainable = eqx.apply_updates(trainable, updates)
        return (trainable, state), (loss, aux)

    (params, opt_state), (losses, aux) = jax.lax.scan(
        step, (params, opt_state), (order, jr.split(step_key, n_steps))
    )
    return params, opt_state, jnp.mean(losses), jtu.tree_map(jnp.mean, aux)


@tuned_jit
def _validation_loss(
    model: PyTree, data: tuple[DeviceRows, ...], validation_rows: Int[Array, " n_validation"],
    context: PyTree, key: PRNGKeyArray, *, loss_fn: LossFn, batch_size: int, cells: NamedSharding | None,
) -> Float[Array, ""]:
    n = validation_rows.shape[0]
    n_steps = math.ceil(n / batch_size)
    order = jnp.resize(validation_rows, (n_steps * batch_size,)).reshape(n_steps, batch_size)
    model = eqx.nn.inference_mode(model)

    def step(_, inputs):
        index, step_key = inputs
        batch = _shard_cells(tuple(take_rows(d, _shard_cells(index, cells)) for d in data), cells)
        return None, loss_fn(model, batch, context, key=step_key)[0]

    _, losses = jax.lax.scan(step, None, (order, jr.split(key, n_steps)))
    return jnp.mean(losses)


def _save_checkpoint(path: pathlib.Path, state: PyTree) -> None:
    # Written to a temporary file, flushed to disk and renamed, so a checkpoint is never half-written: a crash or
    # kill while writing leaves the previous checkpoint in place (and a failed write removes its temporary file).
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            eqx.tree_serialise_leaves(handle, state)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def fit(
    model: PyTree,
    loss_fn: LossFn,
    data: Sequence[Any],
    *,
    key: PRNGKeyArray,
    n_epochs: int,
    batch_size: int = 128,
    context: PyTree | Callable[[int], PyTree] = None,
    optimizer: optax.GradientTransformation | None = None,
    hyperparameters: dict[str, Any] | None = None,
    row_weights: Any = None,
    validation_fraction: float = 0.0,
    early_stopping_patience: int | None = None,
    restore_best: bool = False,
    trainable: Callable[[Any], bool] | PyTree = eqx.is_inexact_array,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "training",
    devices: Devices = None,
) -> FitResult:
    """Train `model` by minibatch gradient descent on `loss_fn`.

    **Arguments:**

    - `model`: any PyTree (usually an `eqx.Module`).
    - `loss_fn`: `loss_fn(model, batch, context, *, key) -> (loss, aux)`; `batch` is a tuple with one dense
      `(batch_size, ...)` array per entry of `data`; `aux` a dict of scalars.
    - `data`: cells-major arrays with a common first dimension (NumPy, JAX, or SciPy sparse).
    - `key`: PRNG key; epoch `e` uses `fold_in(key, e)`. (Keyword only argument.)
    - `n_epochs`: number of passes over the training rows.
    - `batch_size`: rows per step (capped at the number of training rows).
    - `context`: a PyTree handed whole to every step (e.g. the full embedding for edge losses). If callable,
      it is called with the epoch index each epoch (e.g. a KL warm-up weight); keep its structure fixed so
      nothing recompiles.
    - `optimizer`: an optax transformation; default `shared_scvi_optimizer()`. It is a static argument of the
      compiled epoch: pass the same object across calls (a fresh one compiles again).
    - `hyperparameters`: values for the optimizer's injected hyperparameters (`optax.inject_hyperparams`, e.g.
      `{"learning_rate": 3e-4}`), set in its state after `init` (and after a resume): changing them does not
      recompile.
    - `row_weights`: if given, each epoch draws rows with replacement in proportion to these weights.
    - `validation_fraction`: share of rows held out (drawn with `key`) to compute a validation loss per epoch.
    - `early_stopping_patience`: stop when the validation loss has not improved for this many epochs.
    - `restore_best`: return the model of the best validation epoch instead of the last.
    - `trainable`: an `eqx.partition` filter selecting the trained leaves (default: all inexact arrays).
    - `checkpoint_path`: save model, optimizer state and history after every epoch (atomically).
    - `resume`: continue from `checkpoint_path` if it exists (the per-epoch `train_aux` of the epochs before the
      interruption is not kept, and `restore_best` only considers epochs after it).
    - `progress`: show a tqdm bar over epochs with the current losses.
    - `devices`: train data-parallel over several devices: `"all"`, a sequence of devices, or a 1-D
      `jax.sharding.Mesh` with axis `"cells"` (see `data_mesh`). The data, model and optimiser state are
      replicated on every device, each minibatch is split along its cells (`NamedSharding`), and XLA inserts
      the all-reduce of the gradients. `batch_size` must be a multiple of the number of devices. The result
      equals the one-device run up to the order of floating-point sums. None: the default device.

    **Returns:** a `FitResult`.
    """
    if n_epochs < 1:
        raise ValueError(f"n_epochs: must be >= 1, got {n_epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction}")
    device_data = tuple(to_device_rows(d) for d in data)
    if not device_data:
        raise ValueError("data: need at least one array")
    n_rows = n_rows_of(device_data[0])
    for i, d in enumerate(device_data):
        if n_rows_of(d) != n_rows:
            raise ValueError(f"data[{i}]: has {n_rows_of(d)} rows, data[0] has {n_rows}")
    weights = None
    if row_weights is not None:
        weights = jnp.asarray(row_weights)
        if weights.shape != (n_rows,):
            raise ValueError(f"row_weights: expected shape ({n_rows},), got {weights.shape}")
    optimizer = shared_scvi_optimizer() if optimizer is None else optimizer
    mesh = data_mesh(devices)
    cells = None if mesh is None else NamedSharding(mesh, PartitionSpec(CELLS_AXIS))

    split_key, loop_key = jr.split(key)
    n_validation = int(round(n_rows * validation_fraction))
    if n_validation and n_rows - n_validation < 1:
        raise ValueError("validation_fraction: leaves no training rows")
    order = jr.permutation(split_key, n_rows)
    validation_rows, train_rows = order[:n_validation], order[n_validation:]
    if n_validation == 0:
        train_rows = jnp.arange(n_rows)
    batch_size = min(batch_size, int(train_rows.shape[0]))
    n_steps = math.ceil(int(train_rows.shape[0]) / batch_size)
    validation_batch_size = min(batch_size, n_validation)
    if mesh is not None:
        for name, size in (("batch_size", batch_size), ("validation batch size", validation_batch_size or mesh.size)):
            if size % mesh.size:
                raise ValueError(f"{name}: {size} rows do not split evenly over {mesh.size} devices")

    params, static = eqx.partition(model, trainable)
    opt_state = optimizer.init(params)
    train_loss = np.full(n_epochs, np.nan)
    validation_loss = np.full(n_epochs, np.nan)
    train_aux: dict[str, np.ndarray] = {}
    start_epoch = 0
    checkpoint = pathlib.Path(checkpoint_path) if checkpoint_path is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        like = (params, opt_state, train_loss, validation_loss, np.zeros(4))
        params, opt_state, train_loss, validation_loss, progress_state = eqx.tree_deserialise_leaves(
            checkpoint, like
        )
        train_loss, validation_loss = np.array(train_loss), np.array(validation_loss)
        start_epoch = int(progress_state[0])
    if hyperparameters:
        opt_state = set_hyperparameters(opt_state, hyperparameters)

    device_data, params, static, opt_state, train_rows, validation_rows, weights = _replicate(
        (device_data, params, static, opt_state, train_rows, validation_rows, weights), mesh
    )
    best_loss, best_epoch, best_params, since_best = np.inf, start_epoch - 1, params, 0
    if start_epoch:
        best_loss, best_epoch, since_best = float(progress_state[1]), int(progress_state[2]), int(progress_state[3])
    stopped_early = False
    epochs = range(start_epoch, n_epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=description, unit="epoch", leave=False)
        epochs = bar
    epoch = start_epoch - 1
    for epoch in epochs:
        epoch_key = jr.fold_in(loop_key, epoch)
        train_key, validation_key = jr.split(epoch_key)
        per_epoch = callable(context) and not isinstance(context, eqx.Module)
        epoch_context = _replicate(context(epoch) if per_epoch else context, mesh)
        params, opt_state, loss, aux = _train_epoch(
            params, static, opt_state, device_data, train_rows, weights, epoch_context, train_key,
            loss_fn=loss_fn, optimizer=optimizer, n_steps=n_steps, batch_size=batch_size, cells=cells,
        )
        train_loss[epoch] = float(loss)
        for name, value in aux.items():
            train_aux.setdefault(name, np.full(n_epochs, np.nan))[epoch] = float(value)
        postfix = {"loss": f"{train_loss[epoch]:.4g}"}
        if n_validation:
            validation_loss[epoch] = float(_validation_loss(
                eqx.combine(params, static), device_data, validation_rows, epoch_context, validation_key,
                loss_fn=loss_fn, batch_size=validation_batch_size, cells=cells,
            ))
            postfix["validation"] = f"{validation_loss[epoch]:.4g}"
            if validation_loss[epoch] < best_loss:
                best_loss, best_epoch, best_params, since_best = validation_loss[epoch], epoch, params, 0
            else:
                since_best += 1
        if bar is not None:
            bar.set_postfix(postfix)
        if checkpoint is not None:
            progress_state = np.array([epoch + 1, best_loss, best_epoch, since_best], dtype=np.float64)
            _save_checkpoint(checkpoint, (params, opt_state, train_loss, validation_loss, progress_state))
        if early_stopping_patience is not None and n_validation and since_best >= early_stopping_patience:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    if not np.all(np.isfinite(train_loss[start_epoch : epoch + 1])):
        bad = int(np.flatnonzero(~np.isfinite(train_loss[start_epoch : epoch + 1]))[0]) + start_epoch
        raise FloatingPointError(f"{description}: the training loss became non-finite at epoch {bad}")
    final_params = best_params if (restore_best and n_validation) else params
    return FitResult(
        model=eqx.combine(final_params, static),
        train_loss=jnp.asarray(train_loss),
        validation_loss=jnp.asarray(validation_loss),
        train_aux={name: jnp.asarray(values) for name, values in train_aux.items()},
        n_epochs_run=epoch + 1,
        best_epoch=best_epoch if n_validation else epoch,
        stopped_early=stopped_early,
    )
