"""The stage contract every stage and operator follows (equinox's abstract/final pattern).

A stage is an immutable `eqx.Module`: continuous settings are array leaves (vmappable, differentiable), settings
that fix shapes are static fields, and a PRNG key is a keyword-only argument, never a field. Concrete stages are
final: they subclass one of the two abstract classes here and are never subclassed themselves.

- `AbstractStage.__call__(x, *covariates, key=None, inference=False)`: the stage applied to one dataset. `x` is
  the stage's main input (counts or an embedding); `covariates` are the per-cell or per-gene inputs some stages
  need (batch labels, an ambient profile). Deterministic stages ignore `key` (`del key`).
- `AbstractTrainableStage.loss(batch, *, key) -> (scalar, aux)`: the training objective on one minibatch
  (`batch` is the tuple of arrays the shared loop `diffbio_eqx._core._train.fit` draws), `aux` a dict of scalar
  diagnostics. Training-only inputs (a warm-up weight, the whole dataset a minibatch indexes into) are further
  keyword arguments with defaults.
- Each trainable stage has one free function `fit_<stage>(stage, data, *, key, ...) -> FitResult`-like record,
  on the shared loop.
"""

import abc
from typing import Any

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray


class AbstractStage(eqx.Module):
    """A step of a single-cell workflow: `stage(x, *covariates, key=None, inference=False)`."""

    @abc.abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Apply the stage to one dataset: `stage(x, *covariates, key=None, inference=False)`.

        **Arguments:**

        - `x`: the main input, cells first.
        - `covariates`: further inputs the stage needs (batch labels, an ambient profile).
        - `key`: PRNG key for stochastic stages; ignored by deterministic ones. (Keyword only argument.)
        - `inference`: use posterior means / no dropout. (Keyword only argument.)

        The signature is written generically here because concrete stages differ in their covariates (type
        checkers would otherwise reject every override); `tests/test_contract.py` checks the convention above on
        every public stage.
        """
        raise NotImplementedError


class AbstractTrainableStage(AbstractStage):
    """A stage with a training objective `loss(batch, *, key) -> (scalar, aux)` and a `fit_<stage>` function."""

    @abc.abstractmethod
    def loss(self, batch: Any, /, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Array]]:
        """The training objective on one minibatch `batch` (a tuple of arrays); `aux` holds scalar diagnostics."""
        raise NotImplementedError
