"""CellAssign (Zhang et al. 2019) as an immutable Equinox module, faithful to scvi-tools' `CellAssign`
(`scvi.external.cellassign`, scvi-tools 1.4).

Model, for cell $n$, marker gene $g$ and type $c$ with a binary marker matrix $\\rho_{gc}$:

$$\\log\\mu_{ngc} = \\log s_n + (X\\beta)_{ng} + b_g + \\rho_{gc}\\,\\delta_{gc}, \\qquad
x_{ng} \\mid c \\sim \\mathrm{NB}(\\mu_{ngc}, \\phi_{ngc}),$$

with $s_n$ the size factor, $X$ an optional design matrix of covariates (batch one-hot, other categorical and
continuous covariates), $\\delta_{gc} = e^{\\log\\delta_{gc}} \\ge 2$ the over-expression of a marker, and the
inverse dispersion $\\phi_{ngc} = \\sum_{b=1}^{10} a_b \\exp(-\\tfrac{(\\mu_{ngc} - m_b)^2}{2 (m_2 - m_1)^2}) +
10^{-10}$ a sum of radial basis functions on 10 means $m_b$ spread over the range of the counts. Priors:
$\\log\\delta_{gc} \\sim N(\\bar\\delta, e^{\\sigma})$ (variance $e^\\sigma$; only where $\\rho_{gc} = 1$) and
type proportions $\\pi = \\mathrm{softmax}(\\theta) \\sim \\mathrm{Dirichlet}(0.01)$.

Objective (scvi-tools' loss, also the paper's EM objective $Q$): with $\\gamma_{nc} = p(c \\mid x_n)$,
$\\frac1N\\big[\\sum_n \\sum_c \\gamma_{nc}(-\\log p(x_n \\mid c) - \\log\\pi_c) - \\log p(\\delta) - \\log
p(\\pi)\\big]$, minimised here as in scvi-tools by gradient descent on minibatches (Adam, learning rate 3e-3,
batch 1,024, up to 400 epochs, early stopping after 15 epochs without improvement of the loss on 10 % of the
cells) through the shared loop, with $\\gamma$ differentiated as scvi-tools does (not held fixed as in an EM
step). scvi-tools clamps $\\log\\delta \\ge \\log 2$ after every step; here the clamp is applied in the forward
pass with a straight-through gradient (the same values; the loop has no per-step projection). A cell's
probabilities are $\\gamma_{nc}$; a type with no markers (a zero column, `"other"`) is the paper's catch-all.
"""

import math
from collections.abc import Sequence
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import scipy.sparse as sp
from jax.scipy.special import gammaln
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._core._stage import AbstractTrainableStage
from .._core._train import FitResult, TrainSettings, fit, map_in_chunks, shared_optimizer
from .._core._validate import check_counts


N_BASIS = 10
LOWER_BOUND = 1e-10
THETA_LOWER_BOUND = 1e-20
NB_EPS = 1e-8
MIN_DELTA = 2.0
DIRICHLET_CONCENTRATION = 1e-2


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------


def scvi_negative_binomial_log_prob(
    x: Float[Array, "..."], mu: Float[Array, "..."], theta: Float[Array, "..."]
) -> Float[Array, "..."]:
    """scvi-tools' `log_nb_positive` (eps 1e-8): the NB log-probability with mean `mu`, inverse dispersion
    `theta`."""
    eps = jnp.asarray(NB_EPS, mu.dtype)
    log_theta_mu = jnp.log(theta + mu + eps)
    return (theta * (jnp.log(theta + eps) - log_theta_mu) + x * (jnp.log(mu + eps) - log_theta_mu)
            + gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0))


def clamped_log_delta(log_delta: Float[Array, "n_genes n_types"]) -> Float[Array, "n_genes n_types"]:
    """$\\max(\\log\\delta, \\log 2)$ in value, identity in gradient (scvi-tools' clamp after each step)."""
    floor = jnp.asarray(math.log(MIN_DELTA), log_delta.dtype)
    return log_delta + jax.lax.stop_gradient(jnp.maximum(log_delta, floor) - log_delta)


def type_log_likelihood(
    model: "CellAssign",
    counts: Float[Array, "n_cells n_genes"],
    size_factor: Float[Array, " n_cells"],
    design: Float[Array, "n_cells n_covariates"],
) -> Float[Array, "n_cells n_types"]:
    """$\\log p(x_n \\mid c) + \\log\\pi_c$ (scvi-tools' `p_x_c`)."""
    delta = jnp.exp(clamped_log_delta(model.log_delta))
    log_mu = jnp.log(size_factor)[:, None, None] + model.log_base[None, :, None] + (delta * model.rho)[None]
    if design.shape[1] > 0:
        log_mu = log_mu + (design @ model.beta.T)[:, :, None]
    mu = jnp.exp(log_mu)
    spacing = model.basis_means[1] - model.basis_means[0]
    b = 1.0 / (2.0 * spacing**2)
    a = jnp.exp(model.log_a)[None, None, None, :]
    means = model.basis_means[None, None, None, :]
    phi = jnp.sum(a * jnp.exp(-b * (mu[..., None] - means) ** 2), axis=-1) + LOWER_BOUND
    per_gene = scvi_negative_binomial_log_prob(counts[:, :, None], mu, phi)
    return jnp.sum(per_gene, axis=1) + jax.nn.log_softmax(model.theta_logit)[None, :]


def cellassign_prior(model: "CellAssign") -> Float[Array, ""]:
    """$-\\log p(\\pi) - \\sum_{\\rho_{gc}=1} \\log N(\\log\\delta_{gc}; \\bar\\delta, e^{\\sigma/2})$."""
    proportions = jnp.exp(jax.nn.log_softmax(model.theta_logit)) + THETA_LOWER_BOUND
    alpha = jnp.full_like(proportions, DIRICHLET_CONCENTRATION)
    dirichlet = (gammaln(jnp.sum(alpha)) - jnp.sum(gammaln(alpha))
                 + jnp.sum((alpha - 1.0) * jnp.log(proportions)))
    scale = jnp.sqrt(jnp.exp(model.log_delta_log_scale))
    log_delta = clamped_log_delta(model.log_delta)
    normal = (-0.5 * ((log_delta - model.log_delta_mean) / scale) ** 2 - jnp.log(scale)
              - 0.5 * math.log(2 * math.pi))
    return -dirichlet - jnp.sum(jnp.where(model.rho > 0, normal, 0.0))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class CellAssign(AbstractTrainableStage):
    """CellAssign's parameters for a set of marker genes and cell types (see the module docstring).

    `model(counts, size_factor, design)` gives the type probabilities $\\gamma$ `(n_cells, n_types)`;
    `model.loss((counts, size_factor, design), n_obs=...)` the objective on a minibatch. Trained by
    `fit_cellassign`. `rho` and `basis_means` are data, not trained.
    """

    log_base: Float[Array, " n_genes"]
    theta_logit: Float[Array, " n_types"]
    log_delta: Float[Array, "n_genes n_types"]
    log_delta_mean: Float[Array, ""]
    log_delta_log_scale: Float[Array, ""]
    log_a: Float[Array, " n_basis"]
    beta: Float[Array, "n_genes n_covariates"]
    rho: Float[Array, "n_genes n_types"]
    basis_means: Float[Array, " n_basis"]
    genes: tuple[str, ...] = eqx.field(static=True)
    cell_types: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self,
        markers: Any,
        basis_means: Float[Array, " n_basis"],
        *,
        genes: Any,
        cell_types: Sequence[str],
        n_covariates: int = 0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `markers`: `(n_genes, n_types)` binary marker matrix $\\rho$.
        - `basis_means`: the 10 means of the dispersion's basis functions (`np.linspace(min, max, 10)` of the
          counts, as scvi-tools).
        - `genes`, `cell_types`: the names of the rows and columns of `markers`. (Keyword only arguments.)
        - `n_covariates`: columns of the design matrix (0: none).
        - `key`: PRNG key for scvi-tools' random initialisation ($b_g$, $\\theta \\sim N(0, 1)$,
          $\\log\\delta \\sim U(-2, 2)$).
        """
        rho = jnp.asarray(markers, dtype=jnp.result_type(float))
        n_genes, n_types = rho.shape
        dtype = rho.dtype
        base_key, theta_key, delta_key = jr.split(key, 3)
        self.log_base = jr.normal(base_key, (n_genes,), dtype)
        self.theta_logit = jr.normal(theta_key, (n_types,), dtype)
        self.log_delta = jr.uniform(delta_key, (n_genes, n_types), dtype, -2.0, 2.0)
        self.log_delta_mean = jnp.zeros((), dtype)
        self.log_delta_log_scale = jnp.zeros((), dtype)
        self.log_a = jnp.zeros((N_BASIS,), dtype)
        self.beta = jnp.zeros((n_genes, int(n_covariates)), dtype)
        self.rho = rho
        self.basis_means = jnp.asarray(basis_means, dtype)
        self.genes = tuple(str(g) for g in genes)
        self.cell_types = tuple(str(c) for c in cell_types)

    def __check_init__(self):
        if self.rho.shape != (len(self.genes), len(self.cell_types)):
            raise ValueError(f"markers: shape {self.rho.shape} does not match {len(self.genes)} genes x "
                             f"{len(self.cell_types)} cell types")
        if self.basis_means.shape != (N_BASIS,):
            raise ValueError(f"basis_means: expected shape ({N_BASIS},), got {self.basis_means.shape}")

    def __call__(
        self,
        counts: Float[Array, "n_cells n_genes"],
        size_factor: Float[Array, " n_cells"],
        design: Float[Array, "n_cells n_covariates"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> Float[Array, "n_cells n_types"]:
        del key, inference
        return jax.nn.softmax(type_log_likelihood(self, counts, size_factor, design), axis=-1)

    def loss(
        self, batch: tuple[Array, Array, Array], /, *, key: PRNGKeyArray, n_obs: Float[ArrayLike, ""] = 1.0
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """scvi-tools' loss: $\\mathrm{mean}_n \\sum_c \\gamma_{nc}(-p_{x,c}) + \\mathrm{prior} / N$ with
        $N$ = `n_obs`, the number of training cells."""
        del key
        counts, size_factor, design = batch
        p_x_c = type_log_likelihood(self, counts, size_factor, design)
        gamma = jax.nn.softmax(p_x_c, axis=-1)
        q_per_cell = jnp.sum(gamma * -p_x_c, axis=1)
        prior = cellassign_prior(self)
        loss = jnp.mean(q_per_cell) + prior / n_obs
        return loss, {"reconstruction": jnp.mean(q_per_cell), "prior": prior}


class _CellAssignLoss(eqx.Module):
    def __call__(self, model: CellAssign, batch: tuple[Array, ...], context: dict[str, Array], *,
                 key: PRNGKeyArray) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        counts, size_factor, design = batch
        return model.loss((counts, size_factor, design), key=key, n_obs=context["n_obs"])


# --------------------------------------------------------------------------------------------------------------
# Data, training, prediction
# --------------------------------------------------------------------------------------------------------------


class CellAssignData(eqx.Module):
    """The arrays CellAssign trains on: marker-gene `counts` (dense), `size_factor`, `design` (maybe 0 columns),
    the marker matrix `rho` and its `genes` / `cell_types`."""

    counts: Float[Array, "n_cells n_genes"]
    size_factor: Float[Array, " n_cells"]
    design: Float[Array, "n_cells n_covariates"]
    rho: Float[Array, "n_genes n_types"]
    genes: tuple[str, ...] = eqx.field(static=True)
    cell_types: tuple[str, ...] = eqx.field(static=True)


def cellassign_data(
    counts: Any,
    genes: Any,
    markers: Any,
    *,
    size_factor: Any = None,
    design: Any = None,
    other: bool = True,
) -> CellAssignData:
    """Prepare counts for CellAssign.

    **Arguments:**

    - `counts`: `(n_cells, n_all_genes)` raw counts, dense or SciPy sparse.
    - `genes`: their names.
    - `markers`: a `pandas.DataFrame` of 0/1, marker genes (index) x cell types (columns), as scvi-tools takes.
    - `size_factor`: `(n_cells,)`; None: each cell's total count over all genes divided by the mean total (the
      recipe of scvi-tools' documentation).
    - `design`: `(n_cells, n_covariates)` covariates (one-hot batches, continuous covariates); None: none.
    - `other`: add a type `"other"` with no markers when `markers` has no all-zero column (the paper's
      catch-all). (Keyword only argument.)

    **Returns:** a `CellAssignData` on the marker genes found in `genes` (a `ValueError` names missing ones).
    """
    import pandas as pd

    if not isinstance(markers, pd.DataFrame):
        raise ValueError(f"markers: expected a pandas.DataFrame (marker genes x cell types), got {type(markers)}")
    rho = markers.to_numpy(dtype=np.float64)
    if not np.isin(rho, (0.0, 1.0)).all():
        raise ValueError("markers: entries must be 0 or 1")
    types = [str(c) for c in markers.columns]
    if other and not (rho.sum(axis=0) == 0).any():
        rho, types = np.concatenate([rho, np.zeros((rho.shape[0], 1))], axis=1), [*types, "other"]
    checked = check_counts(counts)
    n_cells = cast(tuple[int, int], checked.shape)[0]
    index = {str(g): i for i, g in enumerate(genes)}
    missing = [str(g) for g in markers.index if str(g) not in index]
    if missing:
        raise ValueError(f"markers: {len(missing)} marker genes are not in the data, first {missing[:10]}")
    columns = np.asarray([index[str(g)] for g in markers.index])
    total = np.asarray(checked.sum(axis=1)).ravel().astype(np.float64)
    if size_factor is None:
        size_factor = total / total.mean()
    size_factor = np.asarray(size_factor, dtype=np.float64).ravel()
    if size_factor.shape != (n_cells,) or not np.all(size_factor > 0):
        raise ValueError(f"size_factor: expected {n_cells} values > 0")
    sub = checked[:, columns]
    dense = cast(Any, sub).toarray() if sp.issparse(sub) else np.asarray(sub)
    design = np.zeros((n_cells, 0)) if design is None else np.asarray(design, dtype=np.float64)
    if design.ndim != 2 or design.shape[0] != n_cells:
        raise ValueError(f"design: expected shape ({n_cells}, n_covariates), got {design.shape}")
    dtype = jnp.result_type(float)
    return CellAssignData(jnp.asarray(dense, dtype), jnp.asarray(size_factor, dtype), jnp.asarray(design, dtype),
                          jnp.asarray(rho, dtype), tuple(str(g) for g in markers.index), tuple(types))


def init_cellassign(data: CellAssignData, *, key: PRNGKeyArray) -> CellAssign:
    """A CellAssign model for `data` with scvi-tools' initialisation and basis means."""
    counts = np.asarray(data.counts)
    basis = np.linspace(counts.min(), counts.max(), N_BASIS)
    return CellAssign(data.rho, jnp.asarray(basis, data.counts.dtype), genes=data.genes, cell_types=data.cell_types,
                      n_covariates=data.design.shape[1], key=key)


def fit_cellassign(
    model: CellAssign, data: CellAssignData, *, key: PRNGKeyArray, settings: TrainSettings | None = None
) -> FitResult:
    """Train CellAssign on the shared loop with scvi-tools' `CellAssign.train` defaults: 400 epochs, batch 1,024,
    Adam (learning rate 3e-3, eps 0.01, weight decay 1e-10), 10 % validation, early stopping patience 15
    (restoring nothing, as scvi-tools). `rho` and `basis_means` are not trained."""
    defaults = TrainSettings(
        n_epochs=400, batch_size=1024, optimizer=shared_optimizer(),
        hyperparameters={"learning_rate": 3e-3, "weight_decay": 1e-10, "eps": 0.01}, validation_fraction=0.1,
        early_stopping_patience=15, description="CellAssign",
    )
    settings = (TrainSettings() if settings is None else settings).filled(defaults)
    n_cells = data.counts.shape[0]
    n_train = n_cells - int(round(n_cells * (settings.validation_fraction or 0.0)))
    context = {"n_obs": jnp.asarray(max(n_train, 1), data.counts.dtype)}
    trainable = jtu.tree_map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(lambda m: (m.rho, m.basis_means), trainable, replace=(False, False))
    arrays = (np.asarray(data.counts), np.asarray(data.size_factor), np.asarray(data.design))
    return fit(model, _CellAssignLoss(), arrays, key=key, settings=settings, context=context, trainable=trainable)


@eqx.filter_jit
def _probabilities_chunk(batch: tuple[Array, Array, Array], model: CellAssign) -> Array:
    return model(*batch)


def cellassign_probabilities(model: CellAssign, data: CellAssignData, *, chunk_size: int = 4096
                             ) -> Float[Array, "n_cells n_types"]:
    """$\\gamma$, each cell's type probabilities (scvi-tools' `CellAssign.predict()`), in chunks."""
    arrays = (np.asarray(data.counts), np.asarray(data.size_factor), np.asarray(data.design))
    return map_in_chunks(_probabilities_chunk, arrays, chunk_size=chunk_size, context=model)
