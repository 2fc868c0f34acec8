"""Ligand-receptor scores as LIANA computes them for CellPhoneDB and CellChat, and their label-permutation null.

Notation: `G` groups (cell types), `E` entity genes (every ligand or receptor subunit of the resource that is in
the data), `I` interactions, `U` subunits per complex (padded).

- CellPhoneDB (`liana.method.sc._cellphonedb`): per group the mean $\\bar x_{g,e}$ of each gene over its cells; a
  complex is its least expressed subunit (`min`, LIANA's `_filter_reassemble_complexes`); an interaction
  $(s, t, i)$ is kept when every subunit is expressed (non-zero) in at least `expr_prop` of the cells of its group;
  its score is $(\\bar l_{s,i} + \\bar r_{t,i}) / 2$ (0 where either is 0), and its p-value is the fraction of
  label permutations whose score (with the same subunits) is $\\ge$ the observed one.
- CellChat (`liana.method.sc._cellchat`): the data divided by its maximum, per group the trimean
  $(Q_{0.25} + 2 Q_{0.5} + Q_{0.75}) / 4$ (NumPy's linear quantiles), complexes by their least subunit again,
  and the probability $P = l r / (K_h + l r)$ with $K_h = 0.5$; p-values as above.
- The soft score replaces each hard step by a smooth one of temperature $\\tau$: the subunit minimum by
  $-\\tau \\log \\sum_u e^{-x_u/\\tau}$, "expressed" by $1 - e^{-x/\\tau}$, the `expr_prop` filter by
  $\\sigma((p - p_0)/\\tau)$. It is differentiable in the expression and in soft group memberships, and tends to the
  hard score as $\\tau \\to 0$.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


def group_means(x: Float[Array, "n_cells n_genes"], onehot: Float[Array, "n_cells n_groups"]
                ) -> Float[Array, "n_groups n_genes"]:
    """Mean of each gene over the (possibly soft) members of each group."""
    return (onehot.T @ x) / jnp.sum(onehot, axis=0)[:, None]


def group_props(x: Float[Array, "n_cells n_genes"], onehot: Float[Array, "n_cells n_groups"]
                ) -> Float[Array, "n_groups n_genes"]:
    """Fraction of each group's cells in which each gene is non-zero (LIANA's `_get_props`)."""
    return group_means((x != 0).astype(x.dtype), onehot)


def _lerp(a: Array, b: Array, t: Array) -> Array:
    """NumPy's `_lerp` (the 'linear' quantile method), exact in the same floating-point steps."""
    d = b - a
    return jnp.where(t >= 0.5, b - d * (1 - t), a + d * t)


def group_trimeans(x: Float[Array, "n_cells n_genes"], labels: Int[Array, " n_cells"],
                   sizes: Int[Array, " n_groups"]) -> Float[Array, "n_groups n_genes"]:
    """Per group and gene the trimean $(Q_{0.25} + 2 Q_{0.5} + Q_{0.75}) / 4$ (LIANA's `_trimean`).

    One sort per gene by (group, value) puts each group's values in order in a contiguous block; `sizes` are the
    groups' cell counts (the blocks' lengths).
    """
    keys = jnp.broadcast_to(labels[:, None], x.shape)
    _, ordered = jax.lax.sort((keys, x), dimension=0, num_keys=2)
    offsets = jnp.cumsum(sizes) - sizes

    def quantile(q: float) -> Array:
        position = q * (sizes - 1).astype(x.dtype)
        low = jnp.floor(position)
        high = jnp.minimum(low + 1, (sizes - 1).astype(x.dtype))
        a = ordered[offsets + low.astype(offsets.dtype)]
        b = ordered[offsets + high.astype(offsets.dtype)]
        return _lerp(a, b, (position - low)[:, None])

    return (quantile(0.25) + 2 * quantile(0.5) + quantile(0.75)) / 4


def complex_min(stat: Float[Array, "n_groups n_entities"], units: Int[Array, "n_interactions n_units"]
                ) -> tuple[Float[Array, "n_groups n_interactions"], Int[Array, "n_groups n_interactions"]]:
    """Each complex's least subunit per group: its value and the subunit's entity position."""
    values = stat[:, units]
    which = jnp.argmin(values, axis=-1)
    return jnp.min(values, axis=-1), jnp.take_along_axis(
        jnp.broadcast_to(units, values.shape), which[..., None], axis=-1)[..., 0]


def soft_complex_min(stat: Float[Array, "n_groups n_entities"], units: Int[Array, "n_interactions n_units"],
                     mask: Bool[Array, "n_interactions n_units"], temperature: Float[Array, ""]
                     ) -> Float[Array, "n_groups n_interactions"]:
    """$-\\tau \\log \\sum_u e^{-x_u / \\tau}$ over the real subunits: a smooth minimum, exact as $\\tau \\to 0$
    up to $\\tau \\log(\\#\\text{ties})$."""
    values = jnp.where(mask, -stat[:, units] / temperature, -jnp.inf)
    return -temperature * jax.nn.logsumexp(values, axis=-1)


def combine(ligand: Float[Array, "*batch n_groups n_interactions"],
            receptor: Float[Array, "*batch n_groups n_interactions"], method: str, kh: Float[Array, ""]
            ) -> Float[Array, "*batch n_groups n_groups n_interactions"]:
    """The score of every (source, target, interaction): CellPhoneDB's mean or CellChat's Hill probability."""
    lig, rec = ligand[..., :, None, :], receptor[..., None, :, :]
    if method == "cellphonedb":
        return (lig + rec) / 2
    product = lig * rec
    return product / (kh + product)


def permuted_labels(labels: Int[Array, " n_cells"], permutation: Int[Array, " n_cells"]) -> Int[Array, " n_cells"]:
    """LIANA's `X[permutation]` with fixed group masks: cell `permutation[i]` takes the label of cell `i`."""
    return jnp.zeros_like(labels).at[permutation].set(labels)


def uniform_permutation(key: PRNGKeyArray, n: int) -> Int[Array, " n"]:
    """A uniformly random permutation of `0..n-1`: one sort by two 32-bit random keys (ties have probability
    about $n^2 / 2^{65}$), cheaper on CPU than `jax.random.permutation`'s repeated rounds."""
    high, low = jr.split(key)
    bits = (jr.bits(high, (n,), dtype=jnp.uint32), jr.bits(low, (n,), dtype=jnp.uint32))
    return jax.lax.sort((*bits, jnp.arange(n, dtype=jnp.int32)), num_keys=2)[2]


def shuffled_labels(key: PRNGKeyArray, labels: Int[Array, " n_cells"]) -> Int[Array, " n_cells"]:
    """A uniformly random permutation of `labels` (`uniform_permutation`)."""
    return labels[uniform_permutation(key, labels.shape[0])]


def chunk_labels(key: PRNGKeyArray, labels: Int[Array, " n_cells"], size: int) -> Int[Array, "size n_cells"]:
    """`size` permutations of `labels`, each exactly uniformly distributed, from two sorts instead of `size`.

    Row $j$ is $L[(\\tau_i + r_j) \\bmod n]_i$: $L$ the labels in uniformly random order, $\\tau$ an independent
    uniform permutation of the cells and $r_j$ distinct offsets (one in each of `size` strata of $[0, n)$). For
    fixed $\\tau, r_j$ the map $i \\mapsto \\tau_i + r_j$ is a fixed permutation, so each row is a uniform
    permutation of the labels and a count of permuted scores $\\ge$ the observed one is an unbiased p-value, as
    with independent permutations. Two rows differ by $\\tau^{-1} s_\\Delta \\tau$ (a shift by $\\Delta = r_k - r_j$
    conjugated by the uniform $\\tau$, independent of the first row): a random fixed-point-free permutation, so
    the pairs behave as independent draws do (their statistics share only $O(n^{-1/2})$ chance alignment).
    Sorting is the cost of a shuffle on CPU ($O(n \\log n)$ comparisons, about five times the group sums of
    200 genes at 100k cells); this pays it twice per chunk instead of once per permutation.
    """
    n = labels.shape[0]
    k_labels, k_cells, k_offsets = jr.split(key, 3)
    shuffled = shuffled_labels(k_labels, labels)
    tau = uniform_permutation(k_cells, n)
    stride = max(n // size, 1)
    offsets = (jnp.arange(size, dtype=jnp.int32) * stride
               + jr.randint(k_offsets, (size,), 0, stride, dtype=jnp.int32)) % n
    return shuffled[(tau[None, :] + offsets[:, None]) % n]


def chunk_group_means(x: Float[Array, "n_cells n_genes"], labels: Int[Array, "n_perms n_cells"],
                      sizes: Int[Array, " n_groups"]) -> Float[Array, "n_perms n_groups n_genes"]:
    """Group means under several labellings at once: one `(n_perms * n_groups) x n_cells` by
    `n_cells x n_genes` product of the stacked one-hot memberships with `x` (one pass over `x`)."""
    n_perms, n_cells = labels.shape
    n_groups = sizes.shape[0]
    onehot = (labels.T[:, :, None] == jnp.arange(n_groups, dtype=labels.dtype)[None, None, :]).astype(x.dtype)
    sums = jax.lax.dot_general(onehot.reshape(n_cells, n_perms * n_groups), x, (((0,), (0,)), ((), ())))
    return sums.reshape(n_perms, n_groups, x.shape[1]) / sizes[None, :, None].astype(x.dtype)


def group_statistic(x: Float[Array, "n_cells n_genes"], labels: Int[Array, " n_cells"],
                    sizes: Int[Array, " n_groups"], method: str) -> Float[Array, "n_groups n_genes"]:
    """The per-group statistic a method uses: means (CellPhoneDB) or trimeans (CellChat, `x` already scaled)."""
    if method == "cellphonedb":
        onehot = jax.nn.one_hot(labels, sizes.shape[0], dtype=x.dtype)
        return group_means(x, onehot)
    return group_trimeans(x, labels, sizes)


def permutation_counts(
    x: Float[Array, "n_cells n_entities"], labels: Int[Array, " n_cells"], sizes: Int[Array, " n_groups"],
    ligand_gene: Int[Array, "n_groups n_interactions"], receptor_gene: Int[Array, "n_groups n_interactions"],
    observed: Float[Array, "n_groups n_groups n_interactions"], permutations: Array,
    valid: Bool[Array, "n_chunks chunk"], method: str, kh: Float[Array, ""],
) -> Int[Array, "n_groups n_groups n_interactions"]:
    """How many permutations score each (source, target, interaction) at least as high as observed.

    `permutations` is either one PRNG key per chunk, shape `(n_chunks,)` (each draws its chunk's permuted labels
    with `chunk_labels`, so nothing of size `n_perms x n_cells` is ever held), or permuted labels, shape
    `(n_chunks, chunk, n_cells)` (`permuted_labels` of given permutations, e.g. LIANA's own, for an exact
    comparison). The chunks run as a `lax.scan`; in a chunk the CellPhoneDB means are one matrix product
    (`chunk_group_means`), the CellChat trimeans a `vmap`. Ligands and receptors keep the subunit chosen on the
    observed data (`ligand_gene`, `receptor_gene`), as in LIANA; `valid` masks the padding of the last chunk.
    """
    rows = jnp.arange(sizes.shape[0])[:, None]
    from_keys = jnp.issubdtype(permutations.dtype, jax.dtypes.prng_key)

    def step(counts: Array, chunk: tuple[Array, Array]) -> tuple[Array, None]:
        source, ok = chunk
        shuffled = chunk_labels(source, labels, ok.shape[0]) if from_keys else source
        if method == "cellphonedb":
            stat = chunk_group_means(x, shuffled, sizes)
        else:
            stat = jax.vmap(lambda lab: group_trimeans(x, lab, sizes))(shuffled)
        score = combine(stat[:, rows, ligand_gene], stat[:, rows, receptor_gene], method, kh)
        hits = (score >= observed[None]) & ok[:, None, None, None]
        return counts + jnp.sum(hits, axis=0, dtype=counts.dtype), None

    counts, _ = jax.lax.scan(step, jnp.zeros(observed.shape, jnp.int32), (permutations, valid))
    return counts
