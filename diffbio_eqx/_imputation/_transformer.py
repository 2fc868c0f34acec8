"""A masked-gene transformer denoiser: cells as sets of gene tokens, a latent bottleneck, NB on masked values.

Each cell is a set of `n_genes` tokens, token $g$ = gene embedding $E_g$ + value embedding (its
`log1p(10^4 x / library)` times a learned vector, plus a learned "expressed" vector when $x > 0$). Every cell gets
its own random mask (each gene hidden with probability `mask_rate`): a hidden token carries a learned mask vector
instead of its value. The model is trained to predict the hidden counts with a negative binomial likelihood
(mean $\\ell_c \\, \\mathrm{softmax}_g(\\cdot)$ with library size $\\ell_c$, a dispersion per gene, as scVI's decoder),
on the shared training loop (`_core._train.fit`).

**Attention cost.** Full self-attention over genes costs $O(G^2)$ per cell (4 million pairs per head for 2,000
genes). Here attention goes through `n_latents` learned latent tokens, as in Perceiver IO (Jaegle et al. 2021):
the latents read the gene tokens (cross-attention, $O(G L)$), attend among themselves ($O(L^2)$), and every gene
reads its prediction back from the latents with a query made from its embedding alone ($O(G L)$). The cost is
linear in the number of genes, so no gene subset is needed (a highly variable gene subset still helps biology).
Because a token is linear in its value, the encoder's keys and values are never formed per cell: the attention
logits are a per-gene table plus rank-one terms in the values.

`denoise` returns expected counts $\\ell_c \\, \\mathrm{softmax}_g$ with nothing masked, chunk by chunk.
"""

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._core._distributions import negative_binomial_log_prob_logspace
from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit, map_in_chunks, shared_optimizer, tuned_jit
from .._core._validate import check_counts


#: Counts per cell before the `log1p` of the value embedding.
VALUE_SCALE = 1e4


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    return jr.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


def _norm(x: Array, eps: float = 1e-5) -> Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + eps)


def _heads(x: Array, n_heads: int) -> Array:
    return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


class _LatentBlock(eqx.Module):
    """Pre-norm self-attention and MLP over the latent tokens."""

    qkv: Float[Array, "dim three_dim"]
    out: Float[Array, "dim dim"]
    up: Float[Array, "dim hidden"]
    down: Float[Array, "hidden dim"]

    def __init__(self, dim: int, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.qkv = _normal(k1, (dim, 3 * dim), dim)
        self.out = _normal(k2, (dim, dim), dim) * 0.5
        self.up = _normal(k3, (dim, 2 * dim), dim)
        self.down = _normal(k4, (2 * dim, dim), 2 * dim) * 0.5

    def __call__(self, z: Float[Array, "n_cells n_latents dim"], n_heads: int) -> Float[Array, "n_cells n_latents dim"]:
        q, k, v = jnp.split(_heads(_norm(z) @ self.qkv, 3 * n_heads), 3, axis=-2)
        weights = jax.nn.softmax(jnp.einsum("bmhk,bnhk->bhmn", q, k) / math.sqrt(q.shape[-1]), axis=-1)
        attended = jnp.einsum("bhmn,bnhk->bmhk", weights, v).reshape(z.shape)
        z = z + attended @ self.out
        return z + jax.nn.gelu(_norm(z) @ self.up) @ self.down


class MaskedGeneTransformer(AbstractTrainableStage):
    """The masked-gene transformer (Perceiver-IO-style latent bottleneck); see the module docstring.

    - `gene_embedding`: `(n_genes, dim)`; `value_embedding`: `(2, dim)` (log-normalised value, expressed
      indicator); `mask_embedding`: `(dim,)`; `latents`: `(n_latents, dim)`.
    - encoder cross-attention `enc_q, enc_k, enc_v, enc_out`; latent `blocks`; decoder `dec_q`, `dec_kv`,
      `readout` `(n_genes, dim)`, `readout_bias` `(n_genes,)`; `log_theta` `(n_genes,)` NB inverse dispersions.
    - `mask_rate`: share of genes hidden per cell in training (array leaf).
    - `n_heads` (static), `genes`: the gene names the model was built for (static, optional).
    """

    gene_embedding: Float[Array, "n_genes dim"]
    value_embedding: Float[Array, "2 dim"]
    mask_embedding: Float[Array, " dim"]
    latents: Float[Array, "n_latents dim"]
    enc_q: Float[Array, "dim dim"]
    enc_k: Float[Array, "dim dim"]
    enc_v: Float[Array, "dim dim"]
    enc_out: Float[Array, "dim dim"]
    blocks: tuple[_LatentBlock, ...]
    dec_q: Float[Array, "dim dim"]
    dec_kv: Float[Array, "dim two_dim"]
    readout: Float[Array, "n_genes dim"]
    readout_bias: Float[Array, " n_genes"]
    log_theta: Float[Array, " n_genes"]
    mask_rate: Float[Array, ""]
    n_heads: int = eqx.field(static=True)
    genes: tuple[str, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        n_genes: int,
        *,
        dim: int = 32,
        n_latents: int = 16,
        n_heads: int = 4,
        n_blocks: int = 2,
        mask_rate: Float[ArrayLike, ""] = 0.15,
        genes: Sequence[str] | None = None,
        key: PRNGKeyArray,
    ):
        if n_genes < 1 or dim < 1 or n_latents < 1 or n_blocks < 0 or n_heads < 1 or dim % n_heads:
            raise ValueError(
                f"n_genes, dim, n_latents, n_heads must be >= 1 and dim divisible by n_heads; got n_genes={n_genes}, "
                f"dim={dim}, n_latents={n_latents}, n_heads={n_heads}, n_blocks={n_blocks}"
            )
        if genes is not None and len(genes) != n_genes:
            raise ValueError(f"genes: {len(genes)} names for {n_genes} genes")
        keys = iter(jr.split(key, 12 + n_blocks))
        self.gene_embedding = _normal(next(keys), (n_genes, dim), 1)
        self.value_embedding = _normal(next(keys), (2, dim), 1)
        self.mask_embedding = _normal(next(keys), (dim,), 1)
        self.latents = _normal(next(keys), (n_latents, dim), 1)
        self.enc_q, self.enc_k, self.enc_v = (_normal(next(keys), (dim, dim), dim) for _ in range(3))
        self.enc_out = _normal(next(keys), (dim, dim), dim) * 0.5
        self.blocks = tuple(_LatentBlock(dim, key=next(keys)) for _ in range(n_blocks))
        self.dec_q = _normal(next(keys), (dim, dim), dim)
        self.dec_kv = _normal(next(keys), (dim, 2 * dim), dim)
        self.readout = _normal(next(keys), (n_genes, dim), dim)
        self.readout_bias = jnp.zeros(n_genes, jnp.float32)
        self.log_theta = jnp.zeros(n_genes, jnp.float32)
        self.mask_rate = jnp.asarray(mask_rate, jnp.float32)
        self.n_heads = n_heads
        self.genes = None if genes is None else tuple(str(g) for g in genes)

    @property
    def n_genes(self) -> int:
        return self.gene_embedding.shape[0]

    def _encode(self, values: Array, expressed: Array, masked: Array) -> Array:
        """Latents after reading the tokens: logits and values of the cross-attention from per-gene tables."""
        h = self.n_heads
        visible = 1.0 - masked
        q = _heads(self.latents @ self.enc_q, h) / math.sqrt(self.latents.shape[1] // h)  # (L, H, k)
        # token_g = E_g + v_g a + e_g b (visible) or E_g + m (masked); keys/values are linear in the token.
        parts = (self.gene_embedding, self.value_embedding[0], self.value_embedding[1], self.mask_embedding)
        keys = [_heads(p @ self.enc_k, h) for p in parts]
        vals = [_heads(p @ self.enc_v, h) for p in parts]
        base = jnp.einsum("lhk,ghk->hlg", q, keys[0])
        coef = [jnp.einsum("lhk,hk->hl", q, k) for k in keys[1:]]
        x_value, x_expr = values * visible, expressed * visible  # (B, G)
        logits = base[None]
        for column, c in zip((x_value, x_expr, masked), coef):
            logits = logits + column[:, None, None, :] * c[None, :, :, None]
        weights = jax.nn.softmax(logits, axis=-1)  # (B, H, L, G)
        out = jnp.einsum("bhlg,ghk->blhk", weights, vals[0])
        for column, v in zip((x_value, x_expr, masked), vals[1:]):
            out = out + jnp.einsum("bhlg,bg->blh", weights, column)[..., None] * v[None, None]
        out = out.reshape(values.shape[0], *self.latents.shape)
        return self.latents[None] + out @ self.enc_out

    def logits(self, counts: Float[Array, "n_cells n_genes"], masked: Float[Array, "n_cells n_genes"]) -> Array:
        """Per-gene decoder logits (before the softmax over genes) for cells whose `masked` genes are hidden."""
        library = jnp.sum(counts, axis=1, keepdims=True)
        values = jnp.log1p(counts * (VALUE_SCALE / jnp.maximum(library, 1.0)))
        z = self._encode(values, (counts > 0).astype(counts.dtype), masked)
        for block in self.blocks:
            z = block(z, self.n_heads)
        h = self.n_heads
        q = _heads(self.gene_embedding @ self.dec_q, h) / math.sqrt(self.latents.shape[1] // h)  # (G, H, k)
        k, v = jnp.split(_heads(_norm(z) @ self.dec_kv, 2 * h), 2, axis=-2)  # (B, L, H, k)
        weights = jax.nn.softmax(jnp.einsum("ghk,blhk->bhgl", q, k), axis=-1)
        read = jnp.einsum("bhgl,blhk,ghk->bg", weights, v, _heads(self.readout, h))
        return read + self.readout_bias[None, :]

    def __call__(
        self, counts: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_genes"]:
        """Expected counts $\\ell_c \\, \\mathrm{softmax}_g$; with a `key` (and not `inference`), genes are masked
        per cell at `mask_rate` as in training."""
        masked = jnp.zeros_like(counts) if (key is None or inference) else self.draw_mask(counts, key=key)
        library = jnp.sum(counts, axis=1, keepdims=True)
        return library * jax.nn.softmax(self.logits(counts, masked), axis=-1)

    def draw_mask(self, counts: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray) -> Array:
        """A per-cell mask: each gene of each cell hidden independently with probability `mask_rate`."""
        return jr.bernoulli(key, self.mask_rate, counts.shape).astype(counts.dtype)

    def loss(self, batch: Any, /, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Array]]:
        """Mean negative NB log-likelihood of the masked counts (per masked entry)."""
        (counts,) = batch
        masked = self.draw_mask(counts, key=key)
        library = jnp.maximum(jnp.sum(counts, axis=1, keepdims=True), 1.0)
        log_mean = jnp.log(library) + jax.nn.log_softmax(self.logits(counts, masked), axis=-1)
        log_prob = negative_binomial_log_prob_logspace(counts, log_mean, self.log_theta[None, :])
        n_masked = jnp.maximum(jnp.sum(masked), 1.0)
        value = -jnp.sum(log_prob * masked) / n_masked
        return value, {"masked_nll": value, "masked_share": n_masked / counts.size}


def _transformer_loss(
    model: MaskedGeneTransformer, batch: tuple[Array, ...], context: Any, *, key: PRNGKeyArray
) -> tuple[Array, dict[str, Array]]:
    del context
    return model.loss(batch, key=key)


def transformer_default_epochs(n_cells: int) -> int:
    """About 60,000 cell visits, between 5 and 200 epochs."""
    return int(min(200, max(5, round(60_000 / max(n_cells, 1)))))


def _check(model: MaskedGeneTransformer, counts: Any) -> Any:
    return check_counts(counts, field="counts", n_genes=model.n_genes)


def fit_masked_gene_transformer(
    model: MaskedGeneTransformer, counts: Any, *, key: PRNGKeyArray, settings: TrainSettings | None = None
) -> FitResult:
    """Train the transformer on the shared loop: per-cell masks, NB likelihood of the masked counts.

    **Arguments:** `model`; `counts` `(n_cells, n_genes)` raw counts (dense or SciPy sparse, densified one minibatch
    at a time); `key` (keyword only); `settings`: what is None takes `transformer_default_epochs`, batch size 128,
    AdamW (`shared_optimizer()`, learning rate 1e-3), no validation split.

    **Returns:** `fit`'s `FitResult` (`.train_aux["masked_nll"]` per epoch).
    """
    checked = _check(model, counts)
    defaults = TrainSettings(
        n_epochs=transformer_default_epochs(checked.shape[0]), batch_size=128, optimizer=shared_optimizer(),
        hyperparameters={"learning_rate": 1e-3, "weight_decay": 1e-6, "eps": 1e-8}, validation_fraction=0.0,
        description="masked-gene transformer",
    )
    settings = (TrainSettings() if settings is None else settings).filled(defaults)
    trainable = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(lambda m: m.mask_rate, trainable, replace=False)
    return fit(model, _transformer_loss, (checked,), key=key, settings=settings, trainable=trainable)


@tuned_jit
def _denoise_chunk(batch: tuple[Array], model: MaskedGeneTransformer) -> Array:
    return model(batch[0], inference=True)


def denoise(model: MaskedGeneTransformer, counts: Any, *, chunk_size: int = 1024) -> np.ndarray:
    """Expected counts for every cell and gene (nothing masked), computed `chunk_size` cells at a time.

    **Returns:** a float32 NumPy array `(n_cells, n_genes)`.
    """
    checked = _check(model, counts)
    return np.asarray(map_in_chunks(_denoise_chunk, (checked,), chunk_size=chunk_size, context=model))


def masked_nll(model: MaskedGeneTransformer, counts: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray) -> Array:
    """The training objective on `counts` with a fresh per-cell mask (a held-out check)."""
    return model.loss((counts,), key=key)[0]

