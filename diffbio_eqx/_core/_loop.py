"""One loop for every iterative algorithm: steps on a state until a convergence test passes or `max_steps` run.

Two modes over the same step function:

- **fixed length** (`early_exit=False`): a `lax.scan` of `max_steps` steps whose state freezes once `converged`
  holds (the remaining steps are a `lax.cond` that returns the state unchanged). Reverse-mode differentiable and
  vmappable; under `vmap` every member runs (and freezes) on its own.
- **early exit** (`early_exit=True`): a `lax.while_loop` with the predicate `(n < max_steps) & ~converged(state)`.
  Less work once converged; no reverse-mode gradient.

Both modes give the same final state, step count and per-step outputs (the steps after convergence report
`frozen(final_state)`), bit for bit. `row_chunks` / `chunk_start` cut a row-chunked `lax.scan` over cells.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree


State = TypeVar("State")


def _no_output(state: Any) -> None:
    del state
    return None


def iterate(
    step: Callable[[State, Any], tuple[State, PyTree]],
    init: State,
    converged: Callable[[State], Bool[Array, ""]],
    *,
    max_steps: int,
    xs: PyTree = None,
    frozen: Callable[[State], PyTree] = _no_output,
    early_exit: bool = False,
) -> tuple[State, PyTree, Int[Array, ""]]:
    """Run `state, y = step(state, x)` up to `max_steps` times, stopping once `converged(state)` holds.

    **Arguments:**

    - `step`: `(state, x) -> (state, y)`; `x` is this step's slice of `xs` (None without `xs`), `y` its output.
    - `init`: the initial state (a pytree of arrays).
    - `converged`: `state -> bool scalar`; tested before each step (a converged `init` runs no step).
    - `max_steps`: the most steps (static). (Keyword only argument.)
    - `xs`: per-step inputs with a leading axis of length `max_steps` (e.g. `jr.split(key, max_steps)`).
    - `frozen`: `state -> y`, the output recorded for each step after convergence (default: no output).
    - `early_exit`: `lax.while_loop` (True) or a fixed-length `lax.scan` that freezes the state (False).

    **Returns:** `(final_state, trace, n_steps)`: `trace` stacks the per-step outputs (leading axis `max_steps`),
    `n_steps` counts the steps run before convergence.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps: must be >= 1, got {max_steps}")
    if early_exit:
        return _while(step, init, converged, max_steps, xs, frozen)

    def body(state, x):
        done = converged(state)
        state, y = jax.lax.cond(done, lambda s, _: (s, frozen(s)), step, state, x)
        return state, (y, ~done)

    final, (trace, ran) = jax.lax.scan(body, init, xs, length=max_steps)
    return final, trace, jnp.sum(ran, dtype=jnp.int32)


def _while(step, init, converged, max_steps: int, xs, frozen):
    at = lambda i: jtu.tree_map(lambda a: a[i], xs)
    out_shape = jax.eval_shape(step, init, at(0))[1]
    buffer = jtu.tree_map(lambda s: jnp.zeros((max_steps, *s.shape), s.dtype), out_shape)

    def cond(carry):
        state, n, _ = carry
        return (n < max_steps) & ~converged(state)

    def body(carry):
        state, n, buffer = carry
        state, y = step(state, at(n))
        return state, n + 1, jtu.tree_map(lambda b, v: b.at[n].set(v), buffer, y)

    final, n_steps, buffer = jax.lax.while_loop(cond, body, (init, jnp.zeros((), jnp.int32), buffer))
    ran = jnp.arange(max_steps, dtype=jnp.int32) < n_steps
    fill = lambda b, f: jnp.where(jnp.reshape(ran, (-1,) + (1,) * jnp.ndim(f)), b, f)
    return final, jtu.tree_map(fill, buffer, frozen(final)), n_steps


def row_chunks(n_rows: int, chunk: int) -> tuple[int, int]:
    """`(n_chunks, chunk_len)` covering `n_rows`; the last chunk is shifted back to end at `n_rows` (overlap)."""
    chunk = min(chunk, n_rows)
    return -(-n_rows // chunk), chunk


def chunk_start(i: Int[Array, ""], n_rows: int, chunk: int) -> tuple[Int[Array, ""], Bool[Array, " chunk"]]:
    """Start row of chunk `i` (see `row_chunks`) and the mask of its rows not already covered by earlier chunks."""
    start = jnp.minimum(i * chunk, n_rows - chunk)
    fresh = start + jnp.arange(chunk, dtype=start.dtype) >= i * chunk
    return start, fresh
