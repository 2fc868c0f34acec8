"""The shared minibatch training loop: optax steps as one `lax.scan` per epoch under one `eqx.filter_jit`.

Every trainable stage (VAE, ambient model, UMAP encoder, the pipeline's fine-tuning) trains through `fit`.
Data stays on the device for the whole run; sparse counts are held in a padded row format and densified one
minibatch at a time inside the compiled step. Epoch `e` draws its randomness from `fold_in(key, e)`, so a run
resumed from a checkpoint after epoch `k` continues exactly as the uninterrupted run would.
"""

import dataclasses
import functools as ft
import math
import numbers
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

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

from ._checkpoint import load_leaves, save_leaves


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


def sparse_rows_from_csr(matrix: sp.spmatrix | sp.sparray, *, dtype: Any = None) -> SparseRows:
    """Convert a SciPy sparse matrix to `SparseRows` (host to device once; duplicates are summed).

    The device holds `nnz * (itemsize + 2)` bytes (4 with more than 32,767 columns) plus the row pointers.
    """
    csr = matrix if isinstance(matrix, sp.csr_matrix) else sp.csr_matrix(matrix)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    n_rows, n_columns = cast(tuple[int, int], csr.shape)  # scipy infers shape as possibly None
    nnz = int(csr.nnz)
    too_many = nnz >= np.iinfo(np.int32).max
    if too_many and not jax.config.jax_enable_x64:  # pyright: ignore[reportAttributeAccessIssue]  (not in jax's stub)
        raise ValueError(f"counts: {nnz} non-zeros need 64-bit row pointers; enable jax_enable_x64")
    pointer_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    index_dtype = np.int16 if n_columns <= np.iinfo(np.int16).max else np.int32
    max_nnz = max(int(np.diff(csr.indptr).max()) if n_rows else 0, 1)
    data, indices = csr.data, csr.indices
    if nnz == 0:
        data, indices = np.zeros(1, csr.dtype), np.zeros(1, index_dtype)
    return SparseRows(
        # the session's dtype for the input's, as jnp.asarray gives dense input: float64 data under JAX's default
        # float32 is truncated silently there, where naming float64 would warn on every call
        jnp.asarray(data, dtype=dtype or jax.dtypes.canonicalize_dtype(csr.dtype)),
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
    """Gather rows as a dense array (densifying `SparseRows` on the fly).

    Each row's non-zeros are read as one contiguous window of `max_nnz` slots (a slice per row, about 4x cheaper
    on CPU than gathering slot by slot), moved back to end at the last slot for the last rows; the slots outside
    the row are masked to zero."""
    if isinstance(rows, SparseRows):
        start = rows.indptr[index]
        stop = rows.indptr[index + 1]
        first = jnp.clip(start, 0, rows.data.shape[0] - rows.max_nnz)
        window = jax.vmap(lambda s, a: jax.lax.dynamic_slice(a, (s,), (rows.max_nnz,)), in_axes=(0, None))
        positions = first[:, None] + jnp.arange(rows.max_nnz, dtype=start.dtype)[None, :]
        inside = (positions >= start[:, None]) & (positions < stop[:, None])
        # The barrier keeps XLA from fusing the windows into their consumers as a gather per slot (what they replace).
        data, indices = jax.lax.optimization_barrier((window(first, rows.data), window(first, rows.indices)))
        values = jnp.where(inside, data, 0)
        columns = indices.astype(jnp.int32)
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
    for device in devices:
        if not isinstance(device, jax.Device):
            raise ValueError(f"devices: expected JAX devices (from jax.devices()), got {device!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices: each device at most once, got {devices}")
    return jax.sharding.Mesh(np.array(devices), (CELLS_AXIS,))


def _replicate(tree: PyTree, mesh: jax.sharding.Mesh | None, *, keep_sharded: bool = False) -> PyTree:
    """Every array of `tree` on every device of the mesh; with `keep_sharded`, arrays already split over the
    mesh's cells axis (`shard_rows`) stay split."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf: Any) -> Any:
        if not eqx.is_array(leaf):
            return leaf
        sharding = getattr(leaf, "sharding", None)
        if keep_sharded and isinstance(sharding, NamedSharding) and sharding.mesh == mesh and sharding.spec and \
                sharding.spec[0] == CELLS_AXIS:
            return leaf
        return jax.device_put(leaf, replicated)

    return jtu.tree_map(place, tree)


def _pad_rows(x: Array, multiple: int) -> Array:
    """`x` with zero rows appended up to a multiple of `multiple` rows (never read: indices stay below the end)."""
    pad = (-x.shape[0]) % multiple
    return x if pad == 0 else jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])


def shard_rows(rows: DeviceRows, mesh: jax.sharding.Mesh | None) -> DeviceRows:
    """Split cells-major data along its first axis over the mesh's `"cells"` axis: each device holds its share of
    the rows (a `1 / n_devices` slice), not a copy of the whole.

    A dense array is padded with zero rows to a multiple of the number of devices; `SparseRows` has its row
    pointers split by rows and its non-zeros (`data`, `indices`) split evenly by position, each padded likewise.
    The padding is never read (row indices stay below `n_rows`, non-zero positions below each row's end), so
    `take_rows` gives what it gives unsharded; under `jit`, XLA turns the gather from the split rows into a
    per-device gather and a sum across devices. None: returned as it is.
    """
    if mesh is None:
        return rows
    cells = NamedSharding(mesh, PartitionSpec(CELLS_AXIS))
    place = lambda x: jax.device_put(_pad_rows(x, mesh.size), cells)
    if isinstance(rows, SparseRows):
        return SparseRows(place(rows.data), place(rows.indices), place(rows.indptr), rows.n_columns, rows.max_nnz)
    return place(rows)


def _gather_sharded(values: Array, index: Array, mesh: Any) -> Array:
    """`values[index]` for `values` split by rows over the mesh's cells axis (`shard_rows`) and `index` the same on
    every device: each device takes the rows it holds (zeros for the others) and a `psum` adds the shares, so
    every value comes from the one device that holds it (exact) and no device ever holds all of `values`."""

    def local(shard: Array, wanted: Array) -> Array:
        n_local = shard.shape[0]
        offset = (jax.lax.axis_index(CELLS_AXIS) * n_local).astype(wanted.dtype)
        here = wanted - offset
        inside = (here >= 0) & (here < n_local)
        got = shard[jnp.clip(here, 0, n_local - 1)]
        inside = inside.reshape(inside.shape + (1,) * (got.ndim - inside.ndim))
        return jax.lax.psum(jnp.where(inside, got, jnp.zeros((), got.dtype)), CELLS_AXIS)

    spread = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(CELLS_AXIS), PartitionSpec()),
                           out_specs=PartitionSpec())
    return spread(values, index)


def take_rows_sharded(rows: DeviceRows, index: Int[Array, " n_index"], mesh: Any) -> Array:
    """`take_rows` on data split over the mesh by `shard_rows`: the same dense rows, gathered device by device
    (`_gather_sharded`) instead of from a whole copy."""
    if isinstance(rows, SparseRows):
        start = _gather_sharded(rows.indptr, index, mesh)
        stop = _gather_sharded(rows.indptr, index + 1, mesh)
        positions = start[:, None] + jnp.arange(rows.max_nnz, dtype=start.dtype)[None, :]
        inside = positions < stop[:, None]
        positions = jnp.where(inside, positions, 0)
        values = jnp.where(inside, _gather_sharded(rows.data, positions, mesh), 0)
        columns = _gather_sharded(rows.indices, positions, mesh).astype(jnp.int32)
        dense = jnp.zeros((index.shape[0], rows.n_columns), dtype=values.dtype)
        return dense.at[jnp.arange(index.shape[0])[:, None], columns].add(values)
    return _gather_sharded(rows, index, mesh)


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
        return rows if isinstance(rows, np.ndarray) else rows.toarray()
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
    through `TrainSettings(hyperparameters=...)` without compiling the training step again.
    """
    return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate, eps=eps, weight_decay=weight_decay
    )


def shared_optimizer(kind: Literal["adamw", "adam"] = "adamw", *, clip: float | None = None
                     ) -> optax.GradientTransformation:
    """One optimiser object per process and settings (cached).

    The optimiser is a static argument of the compiled epoch, so stages pass these shared objects and their values
    as `TrainSettings(hyperparameters=...)` (held in the state) rather than a fresh object per call, which would
    compile the epoch again.

    **Arguments:**

    - `kind`: `"adamw"`: `scvi_optimizer()` (scvi-tools' AdamW: learning rate 1e-3, eps 0.01, weight decay 1e-6);
      `"adam"`: Adam with learning rate 1e-3. Both inject their settings (`optax.inject_hyperparams`, float32).
    - `clip`: clip the gradients by value at this bound before the update (umap-learn's parametric UMAP: 4).
      (Keyword only argument.)
    """
    return _cached_optimizer(kind, None if clip is None else float(clip))


@ft.cache
def _cached_optimizer(kind: str, clip: float | None) -> optax.GradientTransformation:
    if kind == "adamw":
        inner = scvi_optimizer()
    elif kind == "adam":
        inner = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)(1e-3)
    else:
        raise ValueError(f"kind: must be 'adamw' or 'adam', got {kind!r}")
    return inner if clip is None else optax.chain(optax.clip(clip), inner)


# Newer optax names the state of `inject_hyperparams` InjectStatefulHyperparamsState; older releases lack it.
_INJECTED_STATES = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def set_hyperparameters(opt_state: PyTree, values: Mapping[str, Any]) -> PyTree:
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How the shared loop trains: `fit(..., settings=TrainSettings(n_epochs=20))`, and every `fit_<stage>`.

    A field left at None takes the default of the function it is given to: `fit`'s (below) or a stage's own (e.g.
    `fit_vae`'s epoch heuristic and 10 % validation split), so `TrainSettings()` means "the stage's defaults".

    - `n_epochs`: passes over the training rows (`fit` needs a number; the stages have a heuristic).
    - `batch_size`: rows per step, capped at the number of training rows (`fit`: 128).
    - `optimizer`: an optax transformation (`fit`: `shared_optimizer()`). It is a static argument of the compiled
      epoch: pass the same object across calls (a fresh one compiles again).
    - `hyperparameters`: values for the optimizer's injected hyperparameters (`optax.inject_hyperparams`, e.g.
      `{"learning_rate": 3e-4}`), set in its state after `init` (and after a resume): changing them does not
      recompile. A stage's own values (e.g. `fit_vae`'s AdamW settings) apply under these unless `optimizer` is
      given.
    - `validation_fraction`: share of rows held out (drawn with the key) for a validation loss per epoch
      (`fit`: 0).
    - `early_stopping_patience`: stop when the validation loss has not improved for this many epochs (None: never).
    - `restore_best`: return the model of the best validation epoch instead of the last.
    - `checkpoint_path`: save the `TrainState` after every epoch (atomically).
    - `resume`: continue from `checkpoint_path` if it exists (the per-epoch `train_aux` of the epochs before the
      interruption is not kept, and `restore_best` only considers epochs after it).
    - `progress`: show the epochs with the current losses: a tqdm bar on a terminal (or in Jupyter), plain lines
      on stderr when it is redirected (about every tenth epoch and the last).
    - `description`: the bar's label and the name in error messages (`fit`: `"training"`).
    - `devices`: train data-parallel over several devices: `"all"`, a sequence of devices, or a 1-D
      `jax.sharding.Mesh` with axis `"cells"` (see `data_mesh`). The data are split along cells over the
      devices, each holding its share of the rows (`shard_rows`); the model and optimiser state are replicated
      on every device, each minibatch is split along its cells (`NamedSharding`), and XLA inserts the
      all-reduce of the gradients. `batch_size` must be a multiple of the number of devices. The result
      equals the one-device run up to the order of floating-point sums. None: the default device.
    """

    n_epochs: int | None = None
    batch_size: int | None = None
    optimizer: optax.GradientTransformation | None = None
    hyperparameters: Mapping[str, Any] | None = None
    validation_fraction: float | None = None
    early_stopping_patience: int | None = None
    restore_best: bool = False
    checkpoint_path: str | os.PathLike[str] | None = None
    resume: bool = False
    progress: bool = True
    description: str | None = None
    devices: Devices = None

    def __post_init__(self):
        for name in ("n_epochs", "batch_size", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise ValueError(f"{name}: must be a whole number, got {value!r}")
        if self.n_epochs is not None and self.n_epochs < 1:
            raise ValueError(f"n_epochs: must be >= 1, got {self.n_epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        for name, value in (self.hyperparameters or {}).items():  # rates, decays: finite and not negative
            if isinstance(value, numbers.Real) and not (math.isfinite(value) and float(value) >= 0):
                raise ValueError(f"hyperparameters[{name!r}]: must be finite and >= 0, got {value!r}")
        if self.validation_fraction is not None and not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.resume and self.checkpoint_path is None:
            raise ValueError("resume: needs checkpoint_path, the file to resume from")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience: must be >= 0, got {self.early_stopping_patience}")

    def filled(self, defaults: "TrainSettings") -> "TrainSettings":
        """These settings with every None field taken from `defaults`; `hyperparameters` are merged over the
        defaults' (which apply only when `optimizer` is not set here: they belong to the default optimiser)."""
        changes = {field.name: getattr(defaults, field.name) for field in dataclasses.fields(self)
                   if getattr(self, field.name) is None and field.name != "hyperparameters"}
        inherited = defaults.hyperparameters if self.optimizer is None else None
        changes["hyperparameters"] = {**(inherited or {}), **(self.hyperparameters or {})}
        return dataclasses.replace(self, **changes)


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
# it applies only where `tuned_jit` is used: the training loop and the VAE's chunked inference. Copy insertion by
# region analysis and min/max without NaN propagation (the epoch's loss is still checked finite) took a VAE epoch
# from 0.147 to 0.132 s at 5,000 x 2,000 (copies alone 0.139 s; results the same).
_TUNED_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                           "xla_cpu_copy_insertion_use_region_analysis": True, "xla_cpu_enable_fast_min_max": True}


def supported_compiler_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Those of the XLA `options` that this XLA knows, each probed once by compiling a one-operation program with
    it (they are experimental: other jax releases may lack one or reject its value). `{}` where `jax.jit` takes
    no compiler options at all."""
    return {name: value for name, value in options.items() if _option_compiles(name, value)}


@ft.cache
def _option_compiles(name: str, value: Any) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
    except Exception:  # an unknown option or value (XLA's INVALID_ARGUMENT), or a jax.jit without the argument
        return False
    return True


def tuned_compiler_options() -> dict[str, Any]:
    """The XLA options `tuned_jit` compiles with: those of `_TUNED_COMPILER_OPTIONS` this XLA knows."""
    return supported_compiler_options(_TUNED_COMPILER_OPTIONS)


class _TunedJit:
    """`eqx.filter_jit(fn, compiler_options=tuned_compiler_options())`, built at the first call.

    Lazy because probing the options compiles on the default backend, which importing the package must not
    initialise. `__wrapped__` is `fn`, as for `eqx.filter_jit`.
    """

    __wrapped__: Callable[..., Any]  # set by `ft.update_wrapper`

    def __init__(self, fn: Callable[..., Any]):
        ft.update_wrapper(self, fn)
        self._jitted: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._jitted is None:
            options = tuned_compiler_options()
            # Without options, no `compiler_options` argument at all (older jax.jit does not take one).
            jit_options: dict[str, Any] = {"compiler_options": options} if options else {}
            self._jitted = eqx.filter_jit(self.__wrapped__, **jit_options)
        return self._jitted(*args, **kwargs)


def tuned_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: `eqx.filter_jit` with `tuned_compiler_options()` (see `_TunedJit`)."""
    return _TunedJit(fn)


class TrainState(eqx.Module):
    """Where training stands after an epoch: what a checkpoint holds (`TrainSettings(checkpoint_path=...)`).

    - `params`, `opt_state`: the trained leaves (`eqx.partition` by `fit`'s `trainable`) and the optimiser state.
    - `train_loss`, `validation_loss`: `(n_epochs,)` float64 per-epoch means; NaN for epochs not run (and for
      validation without a split).
    - `next_epoch`: the first epoch still to run.
    - `best_validation_loss`, `best_epoch`: the lowest validation loss so far and its epoch (inf and -1 before any).
    - `epochs_without_improvement`: epochs since `best_epoch` (early stopping's counter).
    """

    params: PyTree
    opt_state: PyTree
    train_loss: Float[np.ndarray, " n_epochs"]
    validation_loss: Float[np.ndarray, " n_epochs"]
    next_epoch: int
    best_validation_loss: float
    best_epoch: int
    epochs_without_improvement: int


class _Split(eqx.Module):
    """The device-side data of a run: the arrays, the training and validation rows, and the sampling weights."""

    arrays: tuple[DeviceRows, ...]
    train_rows: Int[Array, " n_train"]
    validation_rows: Int[Array, " n_validation"]
    row_weights: Float[Array, " n_rows"] | None


class _Steps(eqx.Module):
    """What fixes the compiled epoch (a change compiles it again; array leaves of a loss Module are traced)."""

    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    n_steps: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    validation_batch_size: int = eqx.field(static=True)
    cells: NamedSharding | None = eqx.field(static=True)


class _Loop(eqx.Module):
    """Everything an epoch needs besides the `TrainState`: fixed for the whole run."""

    static: PyTree
    split: _Split
    steps: _Steps
    context: Any
    key: PRNGKeyArray
    mesh: jax.sharding.Mesh | None = eqx.field(static=True)

    @property
    def n_validation(self) -> int:
        return int(self.split.validation_rows.shape[0])

    def epoch_context(self, epoch: int) -> PyTree:
        context = self.context
        if callable(context) and not isinstance(context, eqx.Module):
            context = context(epoch)
        return _replicate(context, self.mesh)


def _take_batch(split: _Split, index: Int[Array, " batch_size"], cells: NamedSharding | None) -> tuple[Array, ...]:
    # With a mesh, the data are split by rows (`shard_rows`): each device gathers the minibatch rows it holds, the
    # shares are summed across devices (one device holds each row), and the minibatch is split along its cells.
    if cells is None:
        return tuple(take_rows(d, index) for d in split.arrays)
    return _shard_cells(tuple(take_rows_sharded(d, index, cells.mesh) for d in split.arrays), cells)


@tuned_jit
def _train_epoch(
    params: PyTree, static: PyTree, opt_state: PyTree, split: _Split, context: PyTree, key: PRNGKeyArray, *,
    steps: _Steps,
) -> tuple[PyTree, PyTree, Float[Array, ""], dict[str, Float[Array, ""]]]:
    order_key, step_key = jr.split(key)
    order = _epoch_order(order_key, split.train_rows, split.row_weights, steps.n_steps, steps.batch_size)

    def loss_of(trainable: PyTree, batch: tuple[Array, ...], step_key: PRNGKeyArray):
        return steps.loss_fn(eqx.combine(trainable, static), batch, context, key=step_key)

    grad_fn = eqx.filter_value_and_grad(loss_of, has_aux=True)

    def step(carry, inputs):
        trainable, state = carry
        index, step_key = inputs
        # With a mesh, XLA sums the per-device gradients (the loss is a mean over the batch); parameters stay
        # replicated.
        (loss, aux), grads = grad_fn(trainable, _take_batch(split, index, steps.cells), step_key)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, state = steps.optimizer.update(grads, state, trainable)
        trainable = eqx.apply_updates(trainable, updates)
        return (trainable, state), (loss, aux)

    (params, opt_state), (losses, aux) = jax.lax.scan(
        step, (params, opt_state), (order, jr.split(step_key, steps.n_steps))
    )
    return params, opt_state, jnp.mean(losses), jtu.tree_map(jnp.mean, aux)


@tuned_jit
def _validation_loss(
    model: PyTree, split: _Split, context: PyTree, key: PRNGKeyArray, *, steps: _Steps
) -> Float[Array, ""]:
    rows = split.validation_rows
    batch_size = steps.validation_batch_size
    n_steps = math.ceil(rows.shape[0] / batch_size)
    order = jnp.resize(rows, (n_steps * batch_size,)).reshape(n_steps, batch_size)
    model = eqx.nn.inference_mode(model)

    def step(_, inputs):
        index, step_key = inputs
        return None, steps.loss_fn(model, _take_batch(split, index, steps.cells), context, key=step_key)[0]

    _, losses = jax.lax.scan(step, None, (order, jr.split(key, n_steps)))
    return jnp.mean(losses)


def _fit_defaults() -> TrainSettings:
    return TrainSettings(batch_size=128, optimizer=shared_optimizer(), validation_fraction=0.0,
                         description="training")


def _device_data(data: Sequence[Any], row_weights: Any) -> tuple[tuple[DeviceRows, ...], Array | None]:
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
    return device_data, weights


def _plan(
    data: Sequence[Any], row_weights: Any, loss_fn: LossFn, settings: TrainSettings, key: PRNGKeyArray,
    mesh: jax.sharding.Mesh | None,
) -> tuple[_Split, _Steps]:
    """Put the data on the device, hold out the validation rows (drawn with `key`) and size the steps."""
    device_data, weights = _device_data(data, row_weights)
    n_rows = n_rows_of(device_data[0])
    assert settings.validation_fraction is not None and settings.batch_size is not None
    n_validation = int(round(n_rows * settings.validation_fraction))
    if n_validation and n_rows - n_validation < 1:
        raise ValueError("validation_fraction: leaves no training rows")
    order = jr.permutation(key, n_rows)
    validation_rows, train_rows = order[:n_validation], order[n_validation:]
    if n_validation == 0:
        train_rows = jnp.arange(n_rows)
    batch_size = min(settings.batch_size, int(train_rows.shape[0]))
    validation_batch_size = min(batch_size, n_validation)
    if mesh is not None:
        for name, size in (("batch_size", batch_size), ("validation batch size", validation_batch_size or mesh.size)):
            if size % mesh.size:
                raise ValueError(f"{name}: {size} rows do not split evenly over {mesh.size} devices")
    cells = None if mesh is None else NamedSharding(mesh, PartitionSpec(CELLS_AXIS))
    assert settings.optimizer is not None
    steps = _Steps(loss_fn, settings.optimizer, math.ceil(int(train_rows.shape[0]) / batch_size), batch_size,
                   validation_batch_size, cells)
    return _Split(device_data, train_rows, validation_rows, weights), steps


def _start(params: PyTree, settings: TrainSettings) -> TrainState:
    """A fresh `TrainState`, or the checkpoint's with `resume`; then the given hyperparameters are set."""
    assert settings.optimizer is not None and settings.n_epochs is not None
    empty = np.full(settings.n_epochs, np.nan)
    state = TrainState(params, settings.optimizer.init(params), empty, empty.copy(), 0, math.inf, -1, 0)
    path = settings.checkpoint_path
    if settings.resume and path is not None and pathlib.Path(path).exists():
        state = _resumed(pathlib.Path(path), state)
    if settings.hyperparameters:
        state = dataclasses.replace(state, opt_state=set_hyperparameters(state.opt_state, settings.hyperparameters))
    return state


#: The header line of a training checkpoint: its format and epoch count (the per-epoch losses' length).
_STATE_FORMAT = "diffbio_eqx.train_state/1"


def _save_state(path: str | os.PathLike[str], state: TrainState) -> None:
    save_leaves(path, state, header={"format": _STATE_FORMAT, "n_epochs": int(state.train_loss.shape[0])})


def _resumed(path: pathlib.Path, fresh: TrainState) -> TrainState:
    """The checkpoint at `path`, read into `fresh`'s structure, its per-epoch losses cut or padded (NaN) to
    `fresh`'s epochs, so a run can be continued for more epochs than it first had."""
    def like(header: dict[str, Any]) -> TrainState:
        saved = np.full(int(header["n_epochs"]), np.nan)
        return dataclasses.replace(fresh, train_loss=saved, validation_loss=saved.copy())

    state, _ = load_leaves(path, format=_STATE_FORMAT, template=like, field="checkpoint_path",
                           what="this model's training state")

    def fitted(losses: Any) -> np.ndarray:
        out = np.full(fresh.train_loss.shape[0], np.nan)
        kept = min(out.size, np.shape(losses)[0])
        out[:kept] = np.asarray(losses)[:kept]
        return out

    return dataclasses.replace(state, train_loss=fitted(state.train_loss),
                               validation_loss=fitted(state.validation_loss))


def _run_epoch(loop: _Loop, state: TrainState, epoch: int) -> tuple[TrainState, dict[str, float], bool]:
    """Train one epoch and validate; returns the new state, the epoch's mean aux values, and whether the
    validation loss improved on the best so far."""
    train_key, validation_key = jr.split(jr.fold_in(loop.key, epoch))
    context = loop.epoch_context(epoch)
    params, opt_state, loss, aux = _train_epoch(state.params, loop.static, state.opt_state, loop.split, context,
                                                train_key, steps=loop.steps)
    train_loss, validation_loss = state.train_loss.copy(), state.validation_loss.copy()
    train_loss[epoch] = float(loss)
    best, best_epoch, since_best = state.best_validation_loss, state.best_epoch, state.epochs_without_improvement
    improved = False
    if loop.n_validation:
        validation_loss[epoch] = float(_validation_loss(eqx.combine(params, loop.static), loop.split, context,
                                                        validation_key, steps=loop.steps))
        improved = bool(validation_loss[epoch] < best)
        if improved:
            best, best_epoch, since_best = float(validation_loss[epoch]), epoch, 0
        else:
            since_best += 1
    state = TrainState(params, opt_state, train_loss, validation_loss, epoch + 1, best, best_epoch, since_best)
    return state, {name: float(value) for name, value in aux.items()}, improved


class _Run(eqx.Module):
    """What the epoch loop leaves: the final state, the best validation epoch's parameters, the per-epoch aux
    values and whether early stopping ended it."""

    state: TrainState
    best_params: PyTree
    train_aux: dict[str, np.ndarray]
    stopped_early: bool


def _interactive() -> bool:
    """Whether progress can redraw in place: stderr is a terminal, or a Jupyter kernel (tqdm draws a widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class _Progress:
    """A tqdm bar on a terminal; elsewhere (stderr redirected to a log) one plain line about every tenth of the
    epochs and at the last one, so a log gets no carriage-return updates."""

    def __init__(self, settings: TrainSettings, start: int):
        assert settings.n_epochs is not None
        self.label, self.n_epochs = settings.description or "training", settings.n_epochs
        self.every = max(1, math.ceil(settings.n_epochs / 10))
        self.bar: Any = None
        if _interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.n_epochs, initial=start, desc=settings.description, unit="epoch",
                            leave=False)

    def update(self, epoch: int, losses: Mapping[str, float], last: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({name: f"{value:.4g}" for name, value in losses.items()})
        elif last or (epoch + 1) % self.every == 0 or epoch + 1 == self.n_epochs:
            shown = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
            print(f"{self.label}: epoch {epoch + 1}/{self.n_epochs}, {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_epochs(loop: _Loop, state: TrainState, settings: TrainSettings) -> _Run:
    assert settings.n_epochs is not None
    best_params, train_aux, stopped_early = state.params, {}, False
    progress = _Progress(settings, state.next_epoch) if settings.progress else None
    for epoch in range(state.next_epoch, settings.n_epochs):
        state, aux, improved = _run_epoch(loop, state, epoch)
        if improved:
            best_params = state.params
        for name, value in aux.items():
            train_aux.setdefault(name, np.full(settings.n_epochs, np.nan))[epoch] = value
        if settings.checkpoint_path is not None:
            _save_state(settings.checkpoint_path, state)
        patience = settings.early_stopping_patience
        stopped_early = bool(patience is not None and loop.n_validation
                             and state.epochs_without_improvement >= patience)
        if progress is not None:
            losses = {"loss": float(state.train_loss[epoch])}
            if loop.n_validation:
                losses["validation"] = float(state.validation_loss[epoch])
            progress.update(epoch, losses, last=stopped_early)
        if stopped_early:
            break
    if progress is not None:
        progress.close()
    return _Run(state, best_params, train_aux, stopped_early)


def fit(
    model: PyTree,
    loss_fn: LossFn,
    data: Sequence[Any],
    *,
    key: PRNGKeyArray,
    settings: TrainSettings,
    context: PyTree | Callable[[int], PyTree] = None,
    row_weights: Any = None,
    trainable: Callable[[Any], bool] | PyTree = eqx.is_inexact_array,
) -> FitResult:
    """Train `model` by minibatch gradient descent on `loss_fn`.

    **Arguments:**

    - `model`: any PyTree (usually an `eqx.Module`).
    - `loss_fn`: `loss_fn(model, batch, context, *, key) -> (loss, aux)`; `batch` is a tuple with one dense
      `(batch_size, ...)` array per entry of `data`; `aux` a dict of scalars.
    - `data`: cells-major arrays with a common first dimension (NumPy, JAX, or SciPy sparse).
    - `key`: PRNG key; it draws the validation split, and epoch `e` uses `fold_in(key, e)`. (Keyword only
      argument.)
    - `settings`: a `TrainSettings` with at least `n_epochs` (epochs, batch size, optimiser, validation, early
      stopping, checkpoints, progress bar, devices).
    - `context`: a PyTree handed whole to every step (e.g. the full embedding for edge losses). If callable,
      it is called with the epoch index each epoch (e.g. a KL warm-up weight); keep its structure fixed so
      nothing recompiles.
    - `row_weights`: if given, each epoch draws rows with replacement in proportion to these weights.
    - `trainable`: an `eqx.partition` filter selecting the trained leaves (default: all inexact arrays).

    **Returns:** a `FitResult`.
    """
    settings = settings.filled(_fit_defaults())
    if settings.n_epochs is None:
        raise ValueError("n_epochs: fit needs a number of epochs, TrainSettings(n_epochs=...)")
    if settings.checkpoint_path is not None:  # before an epoch is spent on it
        target = pathlib.Path(settings.checkpoint_path)
        if target.is_dir() or not target.parent.is_dir():
            raise ValueError(f"checkpoint_path: {str(target)!r} is a folder or its folder does not exist; name a "
                             "file in an existing folder")
    mesh = data_mesh(settings.devices)
    split_key, loop_key = jr.split(key)
    split, steps = _plan(data, row_weights, loss_fn, settings, split_key, mesh)
    params, static = eqx.partition(model, trainable)
    state = _start(params, settings)
    start_epoch = state.next_epoch
    # The data is split along cells over the devices (each holds its share); the rest is replicated.
    split = dataclasses.replace(split, arrays=tuple(shard_rows(d, mesh) for d in split.arrays)) if mesh else split
    split, static, params, opt_state = _replicate((split, static, state.params, state.opt_state), mesh,
                                                  keep_sharded=True)
    state = dataclasses.replace(state, params=params, opt_state=opt_state)
    run = _run_epochs(_Loop(static, split, steps, context, loop_key, mesh), state, settings)
    state = run.state
    ran = state.train_loss[start_epoch : state.next_epoch]
    if not np.all(np.isfinite(ran)):
        bad = int(np.flatnonzero(~np.isfinite(ran))[0]) + start_epoch
        raise FloatingPointError(f"{settings.description}: the training loss became non-finite at epoch {bad}")
    validated = int(split.validation_rows.shape[0]) > 0
    final_params = run.best_params if (settings.restore_best and validated) else state.params
    return FitResult(
        model=eqx.combine(final_params, static),
        train_loss=jnp.asarray(state.train_loss),
        validation_loss=jnp.asarray(state.validation_loss),
        train_aux={name: jnp.asarray(values) for name, values in run.train_aux.items()},
        n_epochs_run=state.next_epoch,
        best_epoch=state.best_epoch if validated else state.next_epoch - 1,
        stopped_early=run.stopped_early,
    )
