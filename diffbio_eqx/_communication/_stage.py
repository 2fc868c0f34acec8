"""The ligand-receptor stage: CellPhoneDB or CellChat scores with permutation p-values, and the soft score."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._core._stage import AbstractStage
from ._lr import (
    combine,
    complex_min,
    group_means,
    group_props,
    group_statistic,
    permutation_counts,
    permuted_labels,
    soft_complex_min,
)
from ._resource import ResourceIndex


Method = Literal["cellphonedb", "cellchat"]


class LigandReceptorResult(eqx.Module):
    """Scores of every (source group, target group, interaction); `kept` marks those passing `expr_prop`.

    - `scores`, `pvalues`, `kept`: shape `(n_groups, n_groups, n_interactions)` (source, target, interaction).
    - `ligand_value`, `receptor_value`: each complex's value (its least subunit's mean or trimean) per group,
      shape `(n_groups, n_interactions)`; `ligand_gene`, `receptor_gene`: that subunit's entity position;
      `ligand_props`, `receptor_props`: its expressed fraction.
    """

    scores: Float[Array, "n_groups n_groups n_interactions"]
    pvalues: Float[Array, "n_groups n_groups n_interactions"]
    kept: Bool[Array, "n_groups n_groups n_interactions"]
    ligand_value: Float[Array, "n_groups n_interactions"]
    receptor_value: Float[Array, "n_groups n_interactions"]
    ligand_gene: Int[Array, "n_groups n_interactions"]
    receptor_gene: Int[Array, "n_groups n_interactions"]
    ligand_props: Float[Array, "n_groups n_interactions"]
    receptor_props: Float[Array, "n_groups n_interactions"]


class LigandReceptor(AbstractStage):
    """Ligand-receptor scoring as LIANA runs CellPhoneDB (`method="cellphonedb"`) or CellChat (`"cellchat"`).

    Called on `x` (cells x entity genes, the resource's genes in `ResourceIndex.genes` order, log-normalised as
    LIANA expects) and integer group labels, it returns a `LigandReceptorResult`; with a `key` it adds p-values
    from `n_perms` label permutations (in chunks of `chunk_size`, one matrix product each). `soft_scores` is the
    differentiable version. Settings `expr_prop`, `kh` and `temperature` are array leaves.
    """

    ligand_units: Int[Array, "n_interactions n_units"]
    receptor_units: Int[Array, "n_interactions n_runits"]
    ligand_mask: Bool[Array, "n_interactions n_units"]
    receptor_mask: Bool[Array, "n_interactions n_runits"]
    expr_prop: Float[Array, ""]
    kh: Float[Array, ""]
    temperature: Float[Array, ""]
    n_groups: int = eqx.field(static=True)
    method: str = eqx.field(static=True)
    n_perms: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)

    def __init__(self, index: ResourceIndex, n_groups: int, *, method: Method = "cellphonedb",
                 expr_prop: Float[ArrayLike, ""] = 0.1, kh: Float[ArrayLike, ""] = 0.5, n_perms: int = 1000,
                 temperature: Float[ArrayLike, ""] = 0.05, chunk_size: int = 50):
        """**Arguments:**

        - `index`: the resource matched to the data (`index_resource`).
        - `n_groups`: number of cell groups.
        - `method`: `"cellphonedb"` (mean of ligand and receptor means) or `"cellchat"` (Hill probability of the
          trimeans, `K_h = kh`).
        - `expr_prop`: minimum fraction of a group's cells expressing every subunit (LIANA's 0.1).
        - `kh`: CellChat's Hill constant (0.5).
        - `n_perms`: label permutations for the p-values (LIANA's 1,000).
        - `temperature`: of the soft score (`soft_scores`).
        - `chunk_size`: permutations per chunk (memory ~ `chunk_size x n_cells x n_groups`); a keyed chunk draws its
          permutations from two shuffles (`chunk_labels`), so keyed p-values depend on it (not on anything else).
        """
        if method not in ("cellphonedb", "cellchat"):
            raise ValueError(f"method: expected 'cellphonedb' or 'cellchat', got {method!r}")
        self.ligand_units, self.receptor_units = jnp.asarray(index.ligand_units), jnp.asarray(index.receptor_units)
        self.ligand_mask, self.receptor_mask = jnp.asarray(index.ligand_mask), jnp.asarray(index.receptor_mask)
        self.expr_prop = jnp.asarray(expr_prop, dtype=jnp.float32)
        self.kh = jnp.asarray(kh, dtype=jnp.float32)
        self.temperature = jnp.asarray(temperature, dtype=jnp.float32)
        self.n_groups, self.method, self.n_perms, self.chunk_size = n_groups, method, n_perms, chunk_size

    def __check_init__(self):
        if self.n_groups < 1 or self.n_perms < 0 or self.chunk_size < 1:
            raise ValueError("n_groups and chunk_size must be >= 1 and n_perms >= 0")

    def _observed(self, x: Float[Array, "n_cells n_entities"], labels: Int[Array, " n_cells"],
                  sizes: Int[Array, " n_groups"]) -> LigandReceptorResult:
        onehot = jax.nn.one_hot(labels, self.n_groups, dtype=x.dtype)
        props = group_props(x, onehot)
        stat = group_statistic(x, labels, sizes, self.method)
        lig, lig_gene = complex_min(stat, self.ligand_units)
        rec, rec_gene = complex_min(stat, self.receptor_units)
        # LIANA's float64 `props >= expr_prop` as whole cell counts: a fraction on the boundary (95 of 950 cells at
        # 0.1) is kept, which a float32 quotient (XLA may divide by multiplying with the reciprocal) can miss.
        expressing = onehot.T @ (x != 0).astype(x.dtype)  # exact integers below 2^24 cells
        need = self.expr_prop.astype(x.dtype) * sizes.astype(x.dtype) * (1 - 1e-6)
        lig_ok = complex_min(expressing, self.ligand_units)[0] >= need[:, None]
        rec_ok = complex_min(expressing, self.receptor_units)[0] >= need[:, None]
        kept = lig_ok[:, None, :] & rec_ok[None, :, :]
        scores = combine(lig, rec, self.method, self.kh.astype(x.dtype))
        if self.method == "cellphonedb":  # LIANA's zero mask: no score where a complex is absent
            scores = jnp.where((lig[:, None, :] == 0) | (rec[None, :, :] == 0), 0, scores)
        rows = jnp.arange(self.n_groups)[:, None]
        return LigandReceptorResult(scores, jnp.full(scores.shape, jnp.nan, x.dtype), kept, lig, rec, lig_gene,
                                    rec_gene, props[rows, lig_gene], props[rows, rec_gene])

    def __call__(self, x: Float[Array, "n_cells n_entities"], labels: Int[Array, " n_cells"],
                 x_max: Float[ArrayLike, ""] | None = None, *, key: PRNGKeyArray | None = None,
                 permutations: Int[Array, "n_perms n_cells"] | None = None, inference: bool = False
                 ) -> LigandReceptorResult:
        """Scores, and p-values when `key` (or explicit `permutations`, e.g. LIANA's) is given.

        `x_max` is the maximum of the whole data matrix (all genes): CellChat divides by it (LIANA's
        `mat_max`); it defaults to the maximum of `x`.
        """
        del inference
        if self.method == "cellchat":
            x = x / (jnp.max(x) if x_max is None else jnp.asarray(x_max, dtype=x.dtype))
        sizes = jnp.bincount(labels, length=self.n_groups)
        result = self._observed(x, labels, sizes)
        if permutations is None and (key is None or self.n_perms == 0):
            return result
        n_perms = self.n_perms if permutations is None else permutations.shape[0]
        chunk = min(self.chunk_size, n_perms)
        n_chunks = -(-n_perms // chunk)
        if permutations is not None:
            pad = n_chunks * chunk - n_perms
            source = jax.vmap(permuted_labels, in_axes=(None, 0))(labels, permutations)
            source = jnp.concatenate([source, source[:pad]]) if pad else source
            source = source.reshape(n_chunks, chunk, source.shape[1])
        else:
            assert key is not None
            typed = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jr.wrap_key_data(key)  # legacy key
            source = jr.split(typed, n_chunks)
        valid = (jnp.arange(n_chunks * chunk) < n_perms).reshape(n_chunks, chunk)
        counts = permutation_counts(
            x, labels, sizes, result.ligand_gene, result.receptor_gene, result.scores, source, valid, self.method,
            self.kh.astype(x.dtype))
        return eqx.tree_at(lambda r: r.pvalues, result, counts.astype(x.dtype) / n_perms)

    def soft_scores(self, x: Float[Array, "n_cells n_entities"], membership: Float[Array, "n_cells n_groups"]
                    ) -> Float[Array, "n_groups n_groups n_interactions"]:
        """The CellPhoneDB score with every hard step made smooth (temperature `self.temperature`).

        `membership` may be soft (rows of responsibilities, e.g. from `SoftKMeans`); the result is
        differentiable in `x` and `membership`, and tends to `scores * kept` as the temperature goes to 0.
        """
        t = self.temperature.astype(x.dtype)
        means = group_means(x, membership)
        props = group_means(1 - jnp.exp(-jnp.maximum(x, 0) / t), membership)
        lig = soft_complex_min(means, self.ligand_units, self.ligand_mask, t)
        rec = soft_complex_min(means, self.receptor_units, self.receptor_mask, t)
        lig_p = soft_complex_min(props, self.ligand_units, self.ligand_mask, t)
        rec_p = soft_complex_min(props, self.receptor_units, self.receptor_mask, t)
        pmin = -t * jnp.logaddexp(-lig_p[:, None, :] / t, -rec_p[None, :, :] / t)
        gate = jax.nn.sigmoid((pmin - self.expr_prop.astype(x.dtype)) / t)
        return gate * (lig[:, None, :] + rec[None, :, :]) / 2


@eqx.filter_jit
def score_ligand_receptor(stage: LigandReceptor, x: Float[Array, "n_cells n_entities"],
                          labels: Int[Array, " n_cells"], x_max: Float[Array, ""] | None = None, *,
                          key: PRNGKeyArray | None = None, permutations: Int[Array, "n_perms n_cells"] | None = None
                          ) -> LigandReceptorResult:
    """`stage(x, labels, x_max, key=key, permutations=permutations)` under one `eqx.filter_jit`."""
    return stage(x, labels, x_max, key=key, permutations=permutations)
