"""A masked-gene transformer denoiser: cells as sets of gene tokens, a latent bottleneck, NB on masked values.

Each cell is a set of `n_genes` tokens, token $g$ = gene embedding $E_g$ + value embedding (its
`log1p(10^4 x / library)` times a learned vector, plus a learned "expressed" vector when $x > 0$). Every cell hides
its own genes in training (about `mask_rate` of them): a hidden token carries a learned mask vector instead of its
value. The model is trained to predict the hidden counts with a negative binomial likelihood (mean
$\\ell_c \\exp(o_{cg})$ with library size $\\ell_c$, a dispersion per gene), on the shared training loop
(`_core._train.fit`, one jitted `lax.scan` per epoch).

**Attention cost.** Full self-attention over genes costs $O(G^2)$ per cell (4 million pairs per head for 2,000
genes). Here attention goes through `n_latents` learned latent tokens, as in Perceiver IO (Jaegle et al. 2021):
the latents read the gene tokens (cross-attention, $O(G L)$), attend among themselves ($O(L^2)$), and every gene
reads its prediction back from the latents with a query made from its embedding alone ($O(G L)$). The cost is
linear in the number of genes, so no gene subset is needed (a highly variable gene subset still helps biology).

**Made for the CPU.** (1) A token's key is the key of its gene, expressed or not, or hidden (the level enters the
values only), so the encoder's softmax weights take three values per gene and latent: the weights, their sums
and the weighted values are products of the cell x gene indicator and level matrices with per-gene tables
(exact softmax attention as matrix products; no cell x gene x latent tensor is formed). (2) In training each
batch orders the genes at random and cuts them into `round(1 / mask_rate)` blocks; each cell hides the genes of
one block it draws, so every cell's hidden set is a uniformly random gene subset, different cells hide different
ones, and the per-cell gathers and scatters become one-hot matrix products. (3) The decoder reads only the hidden
genes in training, with one attention head over the full width.

`denoise` returns expected counts chunk by chunk, $\\ell_c \\, \\mathrm{softmax}_g(o_{cg})$ (the predicted shares
renormalised to sum to one, so every cell keeps its library size), each gene's $o_{cg}$ predicted with its own value
hidden as in training (Noise2Self, Batson and Royer 2019: `round(1 / mask_rate)` fixed blocks hidden in turn), so
no denoised value has seen the count it replaces.
"""

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

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
    - `mask_rate`: share of genes hidden per cell in training (static: every cell hides
      `n_hidden = round(mask_rate * n_genes)` genes, at least 1).
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
    mask_rate: float = eqx.field(static=True)
    n_heads: int = eqx.field(static=True)
    genes: tuple[str, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        n_genes: int,
        *,
        dim: int = 32,
        n_latents: int = 8,
        n_heads: int = 4,
        n_blocks: int = 2,
        mask_rate: float = 0.15,
        genes: Sequence[str] | None = None,
        key: PRNGKeyArray,
    ):
        if n_genes < 1 or dim < 1 or n_latents < 1 or n_blocks < 0 or n_heads < 1 or dim % n_heads:
            raise ValueError(
                f"n_genes, dim, n_latents, n_heads must be >= 1 and dim divisible by n_heads; got n_genes={n_genes}, "
                f"dim={dim}, n_latents={n_latents}, n_heads={n_heads}, n_blocks={n_blocks}"
            )
        if not 0.0 < float(mask_rate) < 1.0:
            raise ValueError(f"mask_rate: must be in (0, 1), got {mask_rate!r}")
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
        self.readout = _normal(next(keys), (n_genes, dim), dim) * 0.1
        # The mean is library * exp(readout): start every gene at an equal share of the library.
        self.readout_bias = jnp.full(n_genes, -math.log(n_genes), jnp.float32)
        self.log_theta = jnp.zeros(n_genes, jnp.float32)
        self.mask_rate = float(mask_rate)
        self.n_heads = n_heads
        self.genes = None if genes is None else tuple(str(g) for g in genes)

    @property
    def n_genes(self) -> int:
        return self.gene_embedding.shape[0]

    def _attention_tables(self) -> tuple[Array, ...]:
        """Per-gene tables of the encoder's cross-attention: the unnormalised weight of each gene for each
        (head, latent) when its count is zero, positive or hidden (`a0, a1, a2`, `(n_genes, n_heads, n_latents)`,
        shifted by a per-(head, latent) constant so none exceeds 1), and the value vectors."""
        h = self.n_heads
        q = _heads(self.latents @ self.enc_q, h) / math.sqrt(self.latents.shape[1] // h)  # (L, H, k)
        base = jnp.einsum("lhk,ghk->ghl", q, _heads(self.gene_embedding @ self.enc_k, h))
        alpha = jnp.einsum("lhk,hk->hl", q, _heads(self.value_embedding[1] @ self.enc_k, h))
        beta = jnp.einsum("lhk,hk->hl", q, _heads(self.mask_embedding @ self.enc_k, h))
        shift = jax.lax.stop_gradient(jnp.max(base, axis=0) + jnp.maximum(0.0, jnp.maximum(alpha, beta)))
        a0, a1, a2 = (
            jnp.exp(base + extra[None] - shift[None]) for extra in (jnp.zeros_like(alpha), alpha, beta)
        )
        gene_values = _heads(self.gene_embedding @ self.enc_v, h)  # (G, H, k)
        level, expressed, hidden = (_heads(p @ self.enc_v, h) for p in (*self.value_embedding, self.mask_embedding))
        return a0, a1, a2, gene_values, level, expressed, hidden

    def _encode(
        self, values: Array, expressed: Array, masked: Array, parts: tuple[Array, Array] | None = None
    ) -> Array:
        """Latents after reading the gene tokens (exact softmax cross-attention, computed from per-gene tables).

        A token is $E_g + v a + e b$ when visible ($v$ its log-normalised value, $e$ = count > 0) and $E_g + m$
        when hidden; its key is $W_k$ of the token without the level term $v a$ (which gene, and whether it is
        expressed or hidden), its value $W_v$ of the whole token. The keys then take three values per gene, so
        every softmax weight and weighted sum over genes is a product of the `(n_cells, n_genes)` indicator and
        level matrices with `(n_genes, ...)` tables: matrix products, no `(cells, genes, latents)` tensor.
        `parts`: `masked` factored as `choice @ blocks` (training's block masks), to multiply through it.
        """
        a0, a1, a2, gene_values, level_v, expressed_v, hidden_v = self._attention_tables()
        n_genes, n_heads, n_latents = a0.shape
        n_cells, n_pairs = values.shape[0], n_heads * n_latents
        visible = 1.0 - masked
        e, level = expressed * visible, values * visible  # level is 0 wherever the count is 0
        # weight of gene g: a0 + e (a1 - a0) + masked (a2 - a0); token value: V_g + level va + e vb + masked vm.
        d1, d2 = a1 - a0, a2 - a0

        def table(d: Array, a: Array) -> Array:
            weighted = (d[..., None] * gene_values[:, :, None]).reshape(n_genes, -1)
            return jnp.concatenate([d.reshape(n_genes, -1), a.reshape(n_genes, -1), weighted], axis=1)

        from_e = e @ table(d1, a1)
        from_m = masked @ table(d2, a2) if parts is None else parts[0] @ (parts[1] @ table(d2, a2))
        from_level = level @ a1.reshape(n_genes, -1)
        denominator = jnp.sum(a0, axis=0).reshape(1, -1) + from_e[:, :n_pairs] + from_m[:, :n_pairs]
        constant = jnp.einsum("ghl,ghk->hlk", a0, gene_values).reshape(1, -1)
        numerator = (constant + from_e[:, 2 * n_pairs :] + from_m[:, 2 * n_pairs :]).reshape(
            n_cells, n_heads, n_latents, -1
        )

        def pair(x: Array) -> Array:
            return x.reshape(n_cells, n_heads, n_latents, 1)

        numerator = (
            numerator
            + pair(from_level) * level_v[None, :, None]
            + pair(from_e[:, n_pairs : 2 * n_pairs]) * expressed_v[None, :, None]
            + pair(from_m[:, n_pairs : 2 * n_pairs]) * hidden_v[None, :, None]
        )
        attended = numerator / pair(denominator)  # (B, H, L, k)
        attended = jnp.swapaxes(attended, 1, 2).reshape(n_cells, *self.latents.shape)
        return self.latents[None] + attended @ self.enc_out

    def _latent_state(self, counts: Array, masked: Array, parts: tuple[Array, Array] | None = None) -> Array:
        library = jnp.sum(counts, axis=1, keepdims=True)
        values = jnp.log1p(counts * (VALUE_SCALE / jnp.maximum(library, 1.0)))
        z = self._encode(values, (counts > 0).astype(counts.dtype), masked, parts)
        for block in self.blocks:
            z = block(z, self.n_heads)
        return z

    def _read(self, z: Array, genes: tuple[Array, Array] | None) -> Array:
        """Decoder cross-attention (one head over the full width: on CPU, many narrow heads cost several times
        more here): each gene's query (from its embedding alone) reads the cell's latents; the output is the
        attended value dotted with the gene's readout vector, plus its bias. `genes`: None reads all genes;
        `(choice, order)` reads, for cell `c`, the genes of its block `order[argmax(choice[c])]` (training's
        hidden genes; `choice` one-hot `(n_cells, n_parts)`, `order` `(n_parts, n_hidden)`), returning
        `(n_cells, n_hidden)`."""
        k, v = jnp.split(_norm(z) @ self.dec_kv, 2, axis=-1)  # (B, L, dim)
        queries = (self.gene_embedding @ self.dec_q) / math.sqrt(self.latents.shape[1])
        if genes is None:
            weights = jax.nn.softmax(jnp.einsum("gd,bld->bgl", queries, k), axis=-1)  # (B, G, L), no (B, G, dim)
            return jnp.sum(weights * jnp.einsum("bld,gd->bgl", v, self.readout), axis=-1) + self.readout_bias[None, :]
        choice, order = genes
        n_parts, n_hidden = order.shape
        # Per-cell rows of the gene tables by a one-hot product over the blocks (no gather or scatter per cell).
        table = jnp.concatenate([queries, self.readout, self.readout_bias[:, None]], axis=1)[order.reshape(-1)]
        rows = (choice @ table.reshape(n_parts, -1)).reshape(choice.shape[0], n_hidden, -1)
        dim = queries.shape[1]
        weights = jax.nn.softmax(jnp.einsum("bmd,bld->bml", rows[..., :dim], k), axis=-1)
        return jnp.sum((weights @ v) * rows[..., dim : 2 * dim], axis=-1) + rows[..., -1]

    def logits(self, counts: Float[Array, "n_cells n_genes"], masked: Float[Array, "n_cells n_genes"]) -> Array:
        """Per-gene log shares of the library (the NB mean is `library * exp(logits)`) for cells whose `masked`
        genes are hidden."""
        return self._read(self._latent_state(counts, masked), None)

    def held_out_logits(self, counts: Float[Array, "n_cells n_genes"]) -> Array:
        """Every gene's logit predicted with its own value hidden, as in training (Noise2Self, Batson and Royer
        2019): the genes are cut into `n_parts` fixed blocks (gene `g` in block `g % n_parts`), each block hidden in
        turn while the rest of the cell is read, so no prediction sees the count it denoises."""
        n_parts = self.n_parts
        blocks = (jnp.arange(self.n_genes)[None, :] % n_parts == jnp.arange(n_parts)[:, None]).astype(counts.dtype)

        def one_block(total: Array, part: Array) -> tuple[Array, None]:
            choice = jax.nn.one_hot(part, n_parts, dtype=counts.dtype)[None]
            choice = jnp.broadcast_to(choice, (counts.shape[0], n_parts))
            masked = choice @ blocks
            logits = self._read(self._latent_state(counts, masked, (choice, blocks)), None)
            return total + masked * logits, None

        return jax.lax.scan(one_block, jnp.zeros_like(counts), jnp.arange(n_parts))[0]

    def __call__(
        self, counts: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "n_cells n_genes"]:
        """Expected counts `library * softmax_g(logits)` (the predicted shares renormalised to sum to one), each
        gene predicted with its own value hidden (`held_out_logits`); with a `key` (and not `inference`), genes are
        hidden per cell as in training instead (one pass)."""
        library = jnp.sum(counts, axis=1, keepdims=True)
        if key is None or inference:
            return library * jax.nn.softmax(self.held_out_logits(counts), axis=-1)
        return library * jax.nn.softmax(self.logits(counts, self.draw_mask(counts, key=key)), axis=-1)

    @property
    def n_parts(self) -> int:
        """Training splits each batch's genes, in a random order, into this many blocks of `n_hidden`."""
        return max(2, min(self.n_genes, round(1.0 / self.mask_rate)))

    def draw_blocks(self, n_cells: int, *, key: PRNGKeyArray) -> tuple[Array, Array]:
        """Per-cell hidden genes: the genes in a random order cut into `n_parts` blocks of `n_hidden`
        (`order`, `(n_parts, n_hidden)`), and each cell's own block (`choice`, one-hot `(n_cells, n_parts)`)."""
        order_key, choice_key = jr.split(key)
        n_parts = self.n_parts
        n_hidden = self.n_genes // n_parts
        order = jr.permutation(order_key, self.n_genes)[: n_parts * n_hidden].reshape(n_parts, n_hidden)
        choice = jax.nn.one_hot(jr.randint(choice_key, (n_cells,), 0, n_parts), n_parts, dtype=jnp.float32)
        return choice, order

    def _block_masks(self, order: Array) -> Array:
        rows = jnp.arange(order.shape[0])[:, None]
        return jnp.zeros((order.shape[0], self.n_genes), jnp.float32).at[rows, order].set(1.0)

    def draw_mask(self, counts: Float[Array, "n_cells n_genes"], *, key: PRNGKeyArray) -> Array:
        """The per-cell mask as a 0/1 matrix (`draw_blocks`): each cell hides the genes of its own block."""
        choice, order = self.draw_blocks(counts.shape[0], key=key)
        return (choice @ self._block_masks(order)).astype(counts.dtype)

    def loss(self, batch: Any, /, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Array]]:
        """Mean negative NB log-likelihood of the hidden counts (per hidden entry); the decoder reads only them."""
        (counts,) = batch
        choice, order = self.draw_blocks(counts.shape[0], key=key)
        blocks = self._block_masks(order)
        z = self._latent_state(counts, choice @ blocks, (choice, blocks))
        library = jnp.maximum(jnp.sum(counts, axis=1, keepdims=True), 1.0)
        log_mean = jnp.log(library) + self._read(z, (choice, order))
        gathered = counts[:, order.reshape(-1)].reshape(counts.shape[0], *order.shape)
        observed = jnp.einsum("bpm,bp->bm", gathered, choice)
        log_theta = choice @ self.log_theta[order]
        value = -jnp.mean(negative_binomial_log_prob_logspace(observed, log_mean, log_theta))
        return value, {"masked_nll": value, "masked_share": jnp.asarray(order.shape[1] / counts.shape[1])}


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
    return fit(model, _transformer_loss, (checked,), key=key, settings=settings)


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

