"""Adversarial batch correction of the scVI-style VAE: a critic on the latent predicts the batch, the encoder learns
to fool it, and a gradient penalty keeps the critic Lipschitz (WGAN-GP, Gulrajani et al. 2017), for any number of
batches.

**The critic.** $f: \\mathbb{R}^{d} \\to \\mathbb{R}^{B}$ has one head per batch; head $b$ is a Wasserstein critic
between batch $b$ and the other batches. With $\\bar f_b(c)$ the mean of head $b$ over the minibatch's cells of
batch $c$, the multi-batch Wasserstein estimate is

$$W(f, z) = \\sum_b \\Big[\\bar f_b(b) - \\frac{1}{|P_b|}\\sum_{c \\in P_b} \\bar f_b(c)\\Big]$$

where $P_b$ are the other batches present in the minibatch (so every batch weighs the same whatever its size,
and a batch absent from the minibatch drops out). The gradient penalty, on points $\\hat z = \\epsilon z_i +
(1 - \\epsilon) z_{\\pi(i)}$ between each cell and a random partner ($\\epsilon \\sim U(0, 1)$), is
$\\mathrm{GP} = \\frac{1}{nB}\\sum_{i, b} (\\|\\nabla_{\\hat z} f_b(\\hat z_i)\\| - 1)^2$.

**The losses.** Critic: $\\mathcal{L}_C = -W(f, \\mathrm{sg}(z)) + \\lambda\\,\\mathrm{GP}$ ($\\lambda = 10$, as
Gulrajani's), minimised over $f$ on the detached latent. Encoder and decoder: $\\mathcal{L}_{VAE} = -\\mathrm{ELBO}
+ w_t\\,W(f, z)$, minimised over the VAE: it removes what tells the batches apart in $z$, while the decoder (which
is given the batch) keeps the batch-specific expression. $w_t$ rises linearly from 0 to `adversarial_weight`
over `n_epochs_adversarial_warmup` epochs (the KL weight warms up as in `fit_vae`).

**Alternation.** Each step of the epoch's `lax.scan` does: the VAE's forward pass on the minibatch (`jax.vjp`,
keeping $z$); `n_critic` critic steps on $\\mathrm{sg}(z)$ (an inner `lax.scan`); then the VAE step, whose
gradient pulls back $\\partial \\mathcal{L}_{VAE} / \\partial z$ under the *updated* critic through the same
forward pass. So critic and encoder alternate, without a second encoder pass.
"""

import dataclasses
import math
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .._core._nn import CovariateMLP, dense
from .._core._train import (
    DeviceRows,
    FitResult,
    TrainSettings,
    set_hyperparameters,
    take_rows,
    to_device_rows,
    tuned_jit,
)
from .._vae._stage import VAENormalizer, kl_warmup_weight
from ._common import linear_warmup, prepare_training, vae_terms, vae_trainable


# --------------------------------------------------------------------------------------------------------------
# The critic and its pure functions
# --------------------------------------------------------------------------------------------------------------


class BatchCritic(eqx.Module):
    """A critic on the latent with one score per batch: an MLP (ReLU, no normalisation, as WGAN-GP asks) and a
    linear head of `n_batches` outputs."""

    body: CovariateMLP
    head: eqx.nn.Linear
    latent_dim: int = eqx.field(static=True)
    n_batches: int = eqx.field(static=True)

    def __init__(self, latent_dim: int, n_batches: int, *, hidden_dims: tuple[int, ...] = (64, 64), dtype: Any = None,
                 key: PRNGKeyArray):
        """**Arguments:**

        - `latent_dim`: width of the latent.
        - `n_batches`: number of batches (one head each, at least two).
        - `hidden_dims`: the hidden layers' widths.
        - `dtype`: parameter dtype.
        - `key`: PRNG key for the initial weights. (Keyword only argument.)
        """
        self.latent_dim, self.n_batches = int(latent_dim), int(n_batches)
        body_key, head_key = jr.split(key)
        self.body = CovariateMLP(self.latent_dim, hidden_dims, dtype=dtype, key=body_key)
        self.head = eqx.nn.Linear(self.body.out_features, self.n_batches, dtype=dtype, key=head_key)

    def __check_init__(self):
        if self.n_batches < 2:
            raise ValueError(f"n_batches: a batch critic needs at least two batches, got {self.n_batches}")

    def __call__(self, z: Float[Array, "n_cells latent_dim"]) -> Float[Array, "n_cells n_batches"]:
        return dense(self.body(z, inference=True), self.head)


def batch_wasserstein(
    scores: Float[Array, "n_cells n_batches"], batch_labels: Int[Array, " n_cells"]
) -> Float[Array, ""]:
    """The multi-batch Wasserstein estimate $W = \\sum_b [\\bar f_b(b) - \\mathrm{mean}_{c \\in P_b} \\bar f_b(c)]$
    (see the module docstring): per-batch means, so unbalanced batches weigh the same; batches absent from
    `batch_labels` drop out."""
    n_batches = scores.shape[1]
    onehot = jax.nn.one_hot(batch_labels, n_batches, dtype=scores.dtype)
    sizes = jnp.sum(onehot, axis=0)
    present = sizes > 0
    means = (onehot.T @ scores) / jnp.maximum(sizes, 1.0)[:, None]  # [c, b]: head b's mean over batch c
    others = (present[:, None] & ~jnp.eye(n_batches, dtype=bool)).astype(scores.dtype)  # [c, b]: c present, c != b
    n_others = jnp.sum(others, axis=0)
    rest = jnp.sum(others * means, axis=0) / jnp.maximum(n_others, 1.0)
    valid = present & (n_others > 0)
    return jnp.sum(jnp.where(valid, jnp.diagonal(means) - rest, 0.0))


def interpolates(z: Float[Array, "n_cells latent_dim"], *, key: PRNGKeyArray) -> Float[Array, "n_cells latent_dim"]:
    """WGAN-GP's random interpolates $\\hat z_i = \\epsilon_i z_i + (1 - \\epsilon_i) z_{\\pi(i)}$, $\\epsilon_i \\sim
    U(0, 1)$, $\\pi$ a random permutation (each cell paired with another cell of the minibatch)."""
    perm_key, eps_key = jr.split(key)
    partner = z[jr.permutation(perm_key, z.shape[0])]
    eps = jr.uniform(eps_key, (z.shape[0], 1), dtype=z.dtype)
    return eps * z + (1.0 - eps) * partner


def input_jacobian(
    critic: BatchCritic, points: Float[Array, "n_points latent_dim"]
) -> Float[Array, "n_points n_batches latent_dim"]:
    """The gradient $\\nabla f_b(\\hat z)$ of every head at each point, written out for the ReLU MLP:
    $\\nabla f_b(\\hat z)^\\top = w_b^\\top D_L W_L \\cdots D_1 W_1$ with $D_l = \\mathrm{diag}(\\mathbb{1}[h_l > 0])$
    (ReLU's derivative at 0 taken as 0, as JAX's). The same numbers as `jax.vmap(jax.jacfwd(critic))`, but
    accumulated from the heads backwards ($B$ rows per point instead of `latent_dim` tangents) as plain matrix
    products, so the critic's gradient through the penalty is a first-order derivative of this expression, about
    half the cost of differentiating `jacfwd` (measured on the training step)."""
    n_points = points.shape[0]
    h, masks = points, []
    for layer in critic.body.layers:
        pre = dense(h, layer)
        masks.append((pre > 0).astype(pre.dtype))
        h = jax.nn.relu(pre)
    rows = critic.head.weight[None] * masks[-1][:, None, :]  # (n_points, n_batches, width_L)
    for layer, mask in zip(reversed(critic.body.layers[1:]), reversed(masks[:-1])):
        rows = _rows_times(rows, layer.weight) * mask[:, None, :]
    return _rows_times(rows, critic.body.layers[0].weight).reshape(n_points, critic.n_batches, -1)


def _rows_times(rows: Float[Array, "n b k"], matrix: Float[Array, "k m"]) -> Float[Array, "n b m"]:
    """`rows @ matrix` as one matrix product over the flattened leading axes."""
    n, b, k = rows.shape
    return (rows.reshape(n * b, k) @ matrix).reshape(n, b, matrix.shape[1])


def penalty_of_jacobian(jacobian: Float[Array, "n_points n_batches latent_dim"]) -> Float[Array, ""]:
    """$\\frac{1}{nB}\\sum_{i,b}(\\|\\nabla f_b(\\hat z_i)\\| - 1)^2$ from the per-head gradients."""
    norms = jnp.sqrt(jnp.sum(jacobian**2, axis=-1) + jnp.finfo(jacobian.dtype).tiny)
    return jnp.mean((norms - 1.0) ** 2)


def gradient_penalty(
    critic: BatchCritic, z: Float[Array, "n_cells latent_dim"], *, key: PRNGKeyArray
) -> Float[Array, ""]:
    """WGAN-GP's penalty $\\frac{1}{nB}\\sum_{i,b}(\\|\\nabla f_b(\\hat z_i)\\| - 1)^2$ at random interpolates
    $\\hat z_i = \\epsilon_i z_i + (1 - \\epsilon_i) z_{\\pi(i)}$ ($\\pi$ a random permutation), one per cell (the
    whole minibatch, as Gulrajani et al.'s implementation)."""
    return penalty_of_jacobian(input_jacobian(critic, interpolates(z, key=key)))


def critic_loss(
    critic: BatchCritic, z: Float[Array, "n_cells latent_dim"], batch_labels: Int[Array, " n_cells"],
    penalty_weight: Float[Array, ""], *, key: PRNGKeyArray,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""]]]:
    """$\\mathcal{L}_C = -W(f, z) + \\lambda\\,\\mathrm{GP}$; returns `(loss, (W, GP))`."""
    w = batch_wasserstein(critic(z), batch_labels)
    gp = gradient_penalty(critic, z, key=key)
    return -w + penalty_weight * gp, (w, gp)


# --------------------------------------------------------------------------------------------------------------
# Training: critic and VAE steps alternating in one lax.scan per epoch
# --------------------------------------------------------------------------------------------------------------


class _AdversarialSteps(eqx.Module):
    """What fixes the compiled epoch."""

    optimizer: optax.GradientTransformation
    critic_optimizer: optax.GradientTransformation
    n_steps: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    n_critic: int = eqx.field(static=True)


class _AdversarialState(eqx.Module):
    params: PyTree
    critic_params: PyTree
    opt_state: PyTree
    critic_opt_state: PyTree


@tuned_jit
def _adversarial_epoch(
    state: _AdversarialState, static: PyTree, critic_static: PyTree, arrays: tuple[DeviceRows, ...],
    context: dict[str, Array], key: PRNGKeyArray, *, steps: _AdversarialSteps,
) -> tuple[_AdversarialState, Float[Array, ""], dict[str, Array]]:
    n_rows = arrays[0].shape[0]
    order_key, step_key = jr.split(key)
    order = jnp.resize(jr.permutation(order_key, n_rows), (steps.n_steps * steps.batch_size,))
    order = order.reshape(steps.n_steps, steps.batch_size)

    def step(state: _AdversarialState, inputs):
        index, key = inputs
        vae_key, critic_key = jr.split(key)
        batch = tuple(take_rows(a, index) for a in arrays)
        labels = batch[1]

        def forward(params):
            vae = eqx.combine(params, static)
            terms = vae_terms(vae, batch, key=vae_key)
            loss = jnp.mean(terms.reconstruction + context["kl_weight"] * terms.kl)
            return (loss, terms.z), {"reconstruction": jnp.mean(terms.reconstruction), "kl": jnp.mean(terms.kl)}

        (elbo_loss, z), pullback, aux = jax.vjp(forward, state.params, has_aux=True)
        detached = jax.lax.stop_gradient(z)

        def critic_step(carry, critic_key):
            critic_params, critic_opt_state = carry
            value_and_grad = eqx.filter_value_and_grad(
                lambda p: critic_loss(eqx.combine(p, critic_static), detached, labels, context["penalty_weight"],
                                      key=critic_key), has_aux=True)
            (loss, (_, gp)), grads = value_and_grad(critic_params)
            with jax.numpy_dtype_promotion("standard"):
                updates, critic_opt_state = steps.critic_optimizer.update(grads, critic_opt_state, critic_params)
            return (eqx.apply_updates(critic_params, updates), critic_opt_state), (loss, gp)

        (critic_params, critic_opt_state), (critic_losses, penalties) = jax.lax.scan(
            critic_step, (state.critic_params, state.critic_opt_state), jr.split(critic_key, steps.n_critic))
        critic = eqx.combine(critic_params, critic_static)
        wasserstein, dz = jax.value_and_grad(lambda v: batch_wasserstein(critic(v), labels))(z)
        weight = context["adversarial_weight"]
        (grads,) = pullback((jnp.ones_like(elbo_loss), weight * dz))
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = steps.optimizer.update(grads, state.opt_state, state.params)
        params = eqx.apply_updates(state.params, updates)
        loss = elbo_loss + weight * wasserstein
        aux = {**aux, "wasserstein": wasserstein, "critic_loss": critic_losses[-1],
               "gradient_penalty": penalties[-1], "critic_loss_abs_max": jnp.max(jnp.abs(critic_losses))}
        return _AdversarialState(params, critic_params, opt_state, critic_opt_state), (loss, aux)

    state, (losses, aux) = jax.lax.scan(step, state, (order, jr.split(step_key, steps.n_steps)))
    summary = {name: jnp.max(values) if name.endswith("_max") else jnp.mean(values) for name, values in aux.items()}
    return state, jnp.mean(losses), summary


class AdversarialFit(eqx.Module):
    """What `fit_adversarial_vae` returns: `fit` (a `FitResult` whose `.model` is the trained VAE and whose
    `.train_aux` holds per-epoch `reconstruction`, `kl`, `wasserstein`, `critic_loss`, `gradient_penalty`,
    `critic_loss_abs_max`) and the trained `critic`."""

    fit: FitResult
    critic: BatchCritic

    @property
    def model(self) -> VAENormalizer:
        return self.fit.model


_CRITIC_OPTIMIZER = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)(1e-3, b1=0.5, b2=0.9)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticSettings:
    """The critic of `fit_adversarial_vae`.

    - `penalty_weight`: the gradient penalty's $\\lambda$ (Gulrajani et al.: 10).
    - `n_critic`: critic steps per VAE step (Gulrajani et al.: 5).
    - `hidden_dims`: the critic's hidden layers.
    - `learning_rate`: its Adam step (Adam with $\\beta = (0.5, 0.9)$).
    """

    penalty_weight: float = 10.0
    n_critic: int = 5
    hidden_dims: tuple[int, ...] = (64, 64)
    learning_rate: float = 1e-3

    def __post_init__(self):
        if not (isinstance(self.n_critic, int) and self.n_critic >= 1):
            raise ValueError(f"n_critic: must be an integer >= 1, got {self.n_critic!r}")
        for name in ("penalty_weight", "learning_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")


def fit_adversarial_vae(
    vae: VAENormalizer,
    counts: Any,
    batch_labels: Any,
    *,
    key: PRNGKeyArray,
    settings: TrainSettings | None = None,
    adversarial_weight: float = 1.0,
    n_epochs_adversarial_warmup: int | None = None,
    critic: CriticSettings = CriticSettings(),
    n_epochs_kl_warmup: int | None = None,
) -> AdversarialFit:
    """Train a `VAENormalizer` against a batch critic with a gradient penalty (see the module docstring).

    **Arguments:**

    - `vae`: the (initialised) model, with `n_batches >= 2`.
    - `counts`: `(n_cells, n_genes)` raw counts, dense or SciPy sparse.
    - `batch_labels`: `(n_cells,)` integer batch codes.
    - `key`: PRNG key (critic initialisation, minibatches, posterior draws). (Keyword only argument.)
    - `settings`: `TrainSettings`: `n_epochs`, `batch_size`, `optimizer`, `hyperparameters` and `progress` apply,
      with `fit_vae`'s defaults; every cell trains (no validation split, checkpoints or devices).
    - `adversarial_weight`: the encoder's adversarial weight $w$ once warmed up.
    - `n_epochs_adversarial_warmup`: $w_t$ rises linearly from 0 over these epochs (None: a quarter of the run).
    - `critic`: the critic's `CriticSettings` (gradient penalty, steps per VAE step, layers, learning rate).
    - `n_epochs_kl_warmup`: as `fit_vae`'s.

    **Returns:** an `AdversarialFit`.
    """
    if not adversarial_weight >= 0:
        raise ValueError(f"adversarial_weight: must be >= 0, got {adversarial_weight}")
    data, settings = prepare_training(vae, counts, batch_labels, settings, "adversarial VAE")
    for name in ("checkpoint_path", "devices"):
        if getattr(settings, name) is not None:
            raise ValueError(f"settings.{name}: not supported by fit_adversarial_vae")
    assert settings.n_epochs is not None and settings.batch_size is not None and settings.optimizer is not None
    n_epochs = settings.n_epochs
    kl_warmup = min(400, n_epochs) if n_epochs_kl_warmup is None else int(n_epochs_kl_warmup)
    adv_warmup = max(1, n_epochs // 4) if n_epochs_adversarial_warmup is None else int(n_epochs_adversarial_warmup)
    init_key, loop_key = jr.split(key)
    model = BatchCritic(vae.latent_dim, vae.n_batches, hidden_dims=critic.hidden_dims, dtype=vae.dtype, key=init_key)
    params, static = eqx.partition(vae, vae_trainable(vae))
    critic_params, critic_static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = settings.optimizer.init(params)
    if settings.hyperparameters:
        opt_state = set_hyperparameters(opt_state, settings.hyperparameters)
    critic_opt_state = set_hyperparameters(_CRITIC_OPTIMIZER.init(critic_params),
                                           {"learning_rate": critic.learning_rate})
    arrays = tuple(to_device_rows(d) for d in data)
    n_rows = int(arrays[0].shape[0])
    batch_size = min(settings.batch_size, n_rows)
    steps = _AdversarialSteps(settings.optimizer, _CRITIC_OPTIMIZER, math.ceil(n_rows / batch_size), batch_size,
                              int(critic.n_critic))
    state = _AdversarialState(params, critic_params, opt_state, critic_opt_state)

    def context(epoch: int) -> dict[str, Array]:
        return {"kl_weight": jnp.asarray(kl_warmup_weight(epoch, kl_warmup), vae.dtype),
                "adversarial_weight": jnp.asarray(linear_warmup(epoch, adv_warmup, adversarial_weight), vae.dtype),
                "penalty_weight": jnp.asarray(critic.penalty_weight, vae.dtype)}

    state, train_loss, train_aux = _run_adversarial_epochs(state, (static, critic_static), arrays, context,
                                                           loop_key, steps, settings)
    result = FitResult(
        model=eqx.combine(state.params, static),
        train_loss=jnp.asarray(train_loss),
        validation_loss=jnp.full(n_epochs, jnp.nan),
        train_aux={name: jnp.asarray(values) for name, values in train_aux.items()},
        n_epochs_run=n_epochs,
        best_epoch=n_epochs - 1,
        stopped_early=False,
    )
    return AdversarialFit(result, eqx.combine(state.critic_params, critic_static))


def _run_adversarial_epochs(
    state: _AdversarialState, statics: tuple[PyTree, PyTree], arrays: tuple[DeviceRows, ...],
    context: Any, key: PRNGKeyArray, steps: _AdversarialSteps, settings: TrainSettings,
) -> tuple[_AdversarialState, np.ndarray, dict[str, np.ndarray]]:
    """The epoch loop: epoch `e` draws from `fold_in(key, e)`; a plain progress line about every tenth epoch."""
    assert settings.n_epochs is not None
    n_epochs = settings.n_epochs
    train_loss = np.full(n_epochs, np.nan)
    train_aux: dict[str, np.ndarray] = {}
    every = max(1, math.ceil(n_epochs / 10))
    for epoch in range(n_epochs):
        state, loss, aux = _adversarial_epoch(state, *statics, arrays, context(epoch), jr.fold_in(key, epoch),
                                              steps=steps)
        train_loss[epoch] = float(loss)
        for name, value in aux.items():
            train_aux.setdefault(name, np.full(n_epochs, np.nan))[epoch] = float(value)
        if not np.isfinite(train_loss[epoch]):
            raise FloatingPointError(f"{settings.description}: the training loss became non-finite at epoch {epoch}")
        if settings.progress and ((epoch + 1) % every == 0 or epoch + 1 == n_epochs):
            print(f"{settings.description}: epoch {epoch + 1}/{n_epochs}, loss {train_loss[epoch]:.4g}, "
                  f"critic {train_aux['critic_loss'][epoch]:.4g}", file=sys.stderr, flush=True)
    return state, train_loss, train_aux
