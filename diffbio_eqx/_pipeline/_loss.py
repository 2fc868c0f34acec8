"""Losses over the whole pipeline, for end-to-end training."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._integration._mmd_vae import MMDVAELoss
from .._umap._stage import ParametricUMAP, umap_graph
from ._model import SingleCellPipeline


class PipelineLossWeights(eqx.Module):
    """Weights of the stage losses in the end-to-end objective (array leaves: vmappable, differentiable)."""

    ambient: Float[Array, ""]
    vae: Float[Array, ""]
    clustering: Float[Array, ""]
    umap: Float[Array, ""]
    supervised: Float[Array, ""]

    def __init__(self, *, ambient: Float[ArrayLike, ""] = 1.0, vae: Float[ArrayLike, ""] = 1.0,
                 clustering: Float[ArrayLike, ""] = 1.0, umap: Float[ArrayLike, ""] = 1.0,
                 supervised: Float[ArrayLike, ""] = 0.0):
        self.ambient, self.vae, self.clustering, self.umap, self.supervised = (
            jnp.asarray(w) for w in (ambient, vae, clustering, umap, supervised)
        )


def cell_type_cross_entropy(
    assignments: Float[Array, "n_cells n_clusters"], cell_type_labels: Int[Array, " n_cells"]
) -> Float[Array, ""]:
    """Supervised loss: mean cross-entropy of soft cluster assignments against one-hot cell-type labels, over the
    labelled cells (a label of -1 marks an unlabelled cell, which adds nothing; 0 when none is labelled)."""
    onehot = jax.nn.one_hot(cell_type_labels, assignments.shape[1], dtype=assignments.dtype)  # -1: a zero row
    per_cell = -jnp.sum(onehot * jnp.log(jnp.clip(assignments, jnp.finfo(assignments.dtype).tiny)), axis=1)
    n_labelled = jnp.sum(cell_type_labels >= 0)
    return jnp.sum(per_cell) / jnp.maximum(n_labelled, 1).astype(assignments.dtype)


def umap_graph_loss(
    umap: ParametricUMAP, x: Float[Array, "n_cells n_features"], *, key: PRNGKeyArray, n_edges: int | None = None
) -> Float[Array, ""]:
    """The UMAP loss of `umap`'s encoder on the fuzzy graph of these cells (edges drawn in proportion to their
    weight, `negative_sample_rate` negatives each). The graph is built on `stop_gradient(x)`; gradients reach
    the encoder and, through the embedded points, `x`."""
    graph = umap_graph(jax.lax.stop_gradient(x), n_neighbors=min(umap.n_neighbors, x.shape[0] - 1))
    n_edges = x.shape[0] if n_edges is None else n_edges
    edge_key, loss_key = jr.split(key)
    edges = jr.choice(edge_key, graph.weights.shape[0], (n_edges,), p=graph.weights / jnp.sum(graph.weights))
    loss, _ = umap.loss((graph.heads[edges], graph.tails[edges]), key=loss_key, x=x, rho=graph.rho)
    return loss


def pipeline_loss(
    pipeline: SingleCellPipeline,
    counts: Float[Array, "n_cells n_genes"],
    ambient_profile: Float[Array, " n_genes"],
    batch_labels: Int[Array, " n_cells"],
    *,
    key: PRNGKeyArray,
    weights: PipelineLossWeights | None = None,
    cell_type_labels: Int[Array, " n_cells"] | None = None,
    kl_weight: Float[ArrayLike, ""] = 1.0,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The weighted sum of every enabled stage's loss along the forward path, for end-to-end training.

    Ambient ELBO on the counts; VAE negative ELBO on the decontaminated counts (with `batch_correction="mmd"`
    plus `mmd_beta` times trVAE's MMD between the batches' latent draws, `aux["mmd"]`, as the VAE trained);
    soft k-means compactness of the corrected latent; UMAP cross-entropy of the encoder on the fuzzy graph of
    these cells' corrected latent; and, with `cell_type_labels` and a non-zero `weights.supervised`, the
    cross-entropy of the cluster assignments against the labels. Gradients reach every trainable stage
    (Harmony's `theta`/`sigma` too when no reference is stored and Harmony runs on the batch).
    """
    weights = PipelineLossWeights() if weights is None else weights
    ambient_key, vae_key, harmony_key, umap_key = jr.split(key, 4)
    dtype = pipeline.dtype
    total = jnp.zeros((), dtype)
    aux: dict[str, Float[Array, ""]] = {}
    x = counts
    if pipeline.ambient_removal is not None:
        ambient_loss, _ = pipeline.ambient_removal.loss((counts, ambient_profile), key=ambient_key)
        x = pipeline.ambient_removal(counts, ambient_profile, inference=True).decontaminated_counts
        total = total + weights.ambient.astype(dtype) * ambient_loss
        aux["ambient"] = ambient_loss
    if pipeline.config.batch_correction_method == "mmd" and pipeline.vae_normalizer.n_batches > 1:
        # The VAE keeps its corrector's objective: ELBO + mmd_beta x trVAE's MMD on the latent draw (as
        # fit_mmd_vae). The adversarial corrector's critic is not part of the pipeline (README: fine-tuning).
        vae_loss, vae_aux = MMDVAELoss()(
            pipeline.vae_normalizer, (x, batch_labels),
            {"kl_weight": jnp.asarray(kl_weight, dtype), "mmd_weight": jnp.asarray(pipeline.config.mmd_beta, dtype)},
            key=vae_key)
        aux["mmd"] = vae_aux["mmd"]
    else:
        vae_loss, _ = pipeline.vae_normalizer.loss((x, batch_labels), key=vae_key, kl_weight=kl_weight)
    total = total + weights.vae.astype(dtype) * vae_loss
    aux["vae"] = vae_loss
    latent = pipeline.vae_normalizer(x, batch_labels, inference=True).latent
    corrected = pipeline.correct(latent, batch_labels, key=harmony_key, inference=True)
    if pipeline.dim_reduction is not None:
        umap_loss_value = umap_graph_loss(pipeline.dim_reduction, corrected, key=umap_key)
        total = total + weights.umap.astype(dtype) * umap_loss_value
        aux["umap"] = umap_loss_value
    if pipeline.clustering is not None:
        clustering_loss, _ = pipeline.clustering.loss((corrected,), key=key)  # deterministic: the key is unused
        total = total + weights.clustering.astype(dtype) * clustering_loss
        aux["clustering"] = clustering_loss
        if cell_type_labels is not None:
            supervised = cell_type_cross_entropy(pipeline.clustering(corrected), cell_type_labels)
            total = total + weights.supervised.astype(dtype) * supervised
            aux["supervised"] = supervised
    aux["total"] = total
    return total, aux
