"""Multi-layer perceptron blocks with covariate injection (scVI's `FCLayers`), for whole minibatches.

Each hidden layer is `Linear([h, c]) -> LayerNorm (optional, no affine) -> ReLU -> Dropout`, where `c` are
covariates (e.g. a batch one-hot) concatenated to the layer's input: to the first layer only, or to every layer
("deep injection", scVI's decoder default). Nothing here keeps mutable state: there is no batch normalisation,
and dropout is switched off with the `inference` flag (or `eqx.nn.inference_mode`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._random import bernoulli


def dense(x: Float[Array, "n_cells n_in"], layer: eqx.nn.Linear) -> Float[Array, "n_cells n_out"]:
    """Apply an `eqx.nn.Linear` to a whole minibatch as one matrix product."""
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias[None, :]


@jax.custom_vjp
def dense_reverse(x: Float[Array, "n_cells n_in"], weight: Float[Array, "n_out n_in"], bias: Float[Array, " n_out"]
                  ) -> Float[Array, "n_cells n_out"]:
    """`x @ weight.T + bias` (reverse-mode differentiation only), whose weight gradient `g.T @ x` is taken with
    `g.T` materialised: XLA's CPU backend hands that (n_out, n_cells) x (n_cells, n_in) product to YNNPACK, whereas
    autodiff's product contracting both operands' first axes went to its generic dot at about twice the time (a
    first layer over all genes is the largest product of a training step)."""
    return x @ weight.T + bias[None, :]


def _dense_reverse_forward(x, weight, bias):
    return dense_reverse(x, weight, bias), (x, weight)


def _dense_reverse_backward(residuals, g):
    x, weight = residuals
    return g @ weight, jax.lax.optimization_barrier(g.T) @ x, jnp.sum(g, axis=0)


dense_reverse.defvjp(_dense_reverse_forward, _dense_reverse_backward)


def dropout(
    layer: eqx.nn.Dropout, x: Float[Array, "*shape"], *, key: PRNGKeyArray | None, inference: bool | None
) -> Float[Array, "*shape"]:
    """`layer(x, key=key, inference=inference)` for an `eqx.nn.Dropout`, the same values, its mask drawn by
    `_random.bernoulli` (the threefry hash unrolled: a fused kernel on CPU instead of a loop)."""
    if inference is None:
        inference = layer.inference
    if inference or (isinstance(layer.p, (int, float)) and layer.p == 0):
        return x
    if key is None:
        raise RuntimeError("Dropout requires a key when running in non-deterministic mode.")
    q = 1 - jax.lax.stop_gradient(layer.p)
    return jnp.where(bernoulli(key, q, x.shape), x / q, 0)


def layer_norm(x: Float[Array, "n_cells n_features"], eps: float = 1e-5) -> Float[Array, "n_cells n_features"]:
    """Layer normalisation over features without learned scale or shift (scVI's `elementwise_affine=False`)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class CovariateMLP(eqx.Module):
    """A stack of hidden layers with covariates concatenated to the first (or every) layer's input."""

    layers: tuple[eqx.nn.Linear, ...]
    dropout: eqx.nn.Dropout
    in_features: int = eqx.field(static=True)
    n_covariates: int = eqx.field(static=True)
    hidden_dims: tuple[int, ...] = eqx.field(static=True)
    inject_all_layers: bool = eqx.field(static=True)
    use_layer_norm: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        hidden_dims: tuple[int, ...],
        n_covariates: int = 0,
        *,
        inject_all_layers: bool = False,
        dropout_rate: float = 0.0,
        use_layer_norm: bool = False,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: width of the input.
        - `hidden_dims`: width of each hidden layer (at least one).
        - `n_covariates`: width of the covariate vector (0 for none).
        - `inject_all_layers`: concatenate the covariates to every layer's input, not only the first.
        - `dropout_rate`: dropout after each activation (off under `inference=True`).
        - `use_layer_norm`: layer normalisation (no affine parameters) before each activation.
        - `dtype`: parameter dtype (default: JAX's default float).
        - `key`: PRNG key for the initial weights. (Keyword only argument.)
        """
        self.in_features = in_features
        self.n_covariates = n_covariates
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.inject_all_layers = inject_all_layers
        self.use_layer_norm = use_layer_norm
        widths = (in_features, *self.hidden_dims)
        keys = jr.split(key, max(len(self.hidden_dims), 1))
        self.layers = tuple(
            eqx.nn.Linear(
                widths[i] + (n_covariates if (i == 0 or inject_all_layers) else 0),
                widths[i + 1],
                dtype=dtype,
                key=keys[i],
            )
            for i in range(len(self.hidden_dims))
        )
        self.dropout = eqx.nn.Dropout(dropout_rate)

    def __check_init__(self):
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims: need at least one layer of width >= 1, got {self.hidden_dims}")
        if self.n_covariates < 0 or self.in_features < 1:
            raise ValueError("in_features must be >= 1 and n_covariates >= 0")

    @property
    def out_features(self) -> int:
        return self.hidden_dims[-1]

    def __call__(
        self,
        x: Float[Array, "n_cells n_in"],
        covariates: Float[Array, "n_cells n_covariates"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        reverse_only: bool = False,
    ) -> Float[Array, "n_cells n_out"]:
        """**Arguments:**

        - `x`: `(n_cells, in_features)` inputs.
        - `covariates`: `(n_cells, n_covariates)` covariates, or None when `n_covariates == 0`.
        - `key`: PRNG key for dropout; needed when dropout is active. (Keyword only argument.)
        - `inference`: True disables dropout; None defers to the module's own flag (`eqx.nn.inference_mode`).
        - `reverse_only`: the first layer by `dense_reverse` (faster weight gradient on CPU; no forward-mode
          differentiation).

        **Returns:** `(n_cells, hidden_dims[-1])` activations.
        """
        if (covariates is None) != (self.n_covariates == 0):
            got = "none" if covariates is None else covariates.shape[-1]
            raise ValueError(f"covariates: expected {self.n_covariates} covariate columns, got {got}")
        keys = (None,) * len(self.layers) if key is None else tuple(jr.split(key, len(self.layers)))
        h = x
        for i, (layer, layer_key) in enumerate(zip(self.layers, keys)):
            if covariates is not None and (i == 0 or self.inject_all_layers):
                h = jnp.concatenate([h, covariates.astype(h.dtype)], axis=-1)
            if i == 0 and reverse_only and layer.bias is not None:
                h = dense_reverse(h, layer.weight, layer.bias)
            else:
                h = dense(h, layer)
            if self.use_layer_norm:
                h = layer_norm(h)
            h = jax.nn.relu(h)
            h = dropout(self.dropout, h, key=layer_key, inference=inference)
        return h
