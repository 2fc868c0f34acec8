"""PASTE's centre alignment of several slices (`paste.PASTE.center_align` + `stack_slices_center`).

The centre slice keeps the reference slice's spots and has expression `W H` (a KL non-negative factorisation with
`n_components` factors, scikit-learn's multiplicative-update solver). Each round aligns the centre to every slice
(fused GW, as `pairwise_align`), then refits `W H` to `n * sum_q lambda_q pi_q X_q`, until the weighted objective
changes by less than `threshold` (at most `max_iter` rounds). Each round's factorisation starts from the previous
one (PASTE restarts it from the same random draw). Finally each slice is stacked onto the centre by Procrustes.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._core._loop import iterate
from ._paste import (
    AlignmentResult,
    PasteAlignment,
    check_alignment_inputs,
    check_alpha,
    fgw_objective,
    fused_gw_plan,
    kl_expression_cost,
    plan_entropy,
    procrustes,
)


_TINY = 1e-10


def kl_nmf(
    x: Float[Array, "n_spots n_genes"], w: Float[Array, "n_spots n_components"],
    h: Float[Array, "n_components n_genes"], *, n_iter: int = 200,
) -> tuple[Float[Array, "n_spots n_components"], Float[Array, "n_components n_genes"]]:
    """KL (beta = 1) NMF by multiplicative updates (Lee & Seung; scikit-learn's `solver="mu"`), `n_iter` rounds."""

    def step(carry, _):
        w, h = carry
        ratio = x / jnp.maximum(w @ h, _TINY)
        h = h * (w.T @ ratio) / jnp.maximum(jnp.sum(w, axis=0)[:, None], _TINY)
        ratio = x / jnp.maximum(w @ h, _TINY)
        w = w * (ratio @ h.T) / jnp.maximum(jnp.sum(h, axis=1)[None, :], _TINY)
        return (w, h), None

    return jax.lax.scan(step, (w, h), length=n_iter)[0]


def nmf_init(x: Float[Array, "n n_genes"], n_components: int, *, key: PRNGKeyArray
             ) -> tuple[Float[Array, "n n_components"], Float[Array, "n_components n_genes"]]:
    """scikit-learn's `init="random"`: `|N(0,1)| * sqrt(mean(x) / n_components)`."""
    scale = jnp.sqrt(jnp.mean(x) / n_components)
    kw, kh = jr.split(key)
    return (scale * jnp.abs(jr.normal(kw, (x.shape[0], n_components), x.dtype)),
            scale * jnp.abs(jr.normal(kh, (n_components, x.shape[1]), x.dtype)))


class CenterResult(eqx.Module):
    """What `center_align` returns.

    - `center_expression`: `(n_center, n_genes)` `W H`; `w`, `h` its factors.
    - `alignments`: one `AlignmentResult` per slice, the centre as slice A (plan rows are centre spots), the slice
      stacked onto the centre's frame in `aligned_b`.
    - `objective`: the final weighted objective; `n_rounds`: rounds run.
    """

    center_expression: Float[Array, "n_center n_genes"]
    w: Float[Array, "n_center n_components"]
    h: Float[Array, "n_components n_genes"]
    alignments: tuple[AlignmentResult, ...]
    objective: Float[Array, ""]
    n_rounds: Array


def _center_round(settings: PasteAlignment, w, h, xs, cs, center, weights):
    expression = w @ h
    plans, objectives = [], []
    for x, c in zip(xs, cs):
        cost = kl_expression_cost(expression, x)
        plan = fused_gw_plan(cost, center, c, settings.alpha, epsilons=settings.epsilons, n_outer=settings.n_outer,
                             overlap=settings.overlap, rank=settings.rank)
        plans.append(plan)
        objectives.append(fgw_objective(plan, cost, center, c, settings.alpha))
    target = center.shape[0] * sum(wt * (p @ x) for wt, p, x in zip(weights, plans, xs))
    w, h = kl_nmf(target, w, h)
    return w, h, tuple(plans), jnp.dot(jnp.stack(objectives), weights)


@eqx.filter_jit
def _center(settings: PasteAlignment, xs, cs, reference: int, weights, key, max_iter: int, threshold: float,
            n_components: int):
    w, h = kl_nmf(xs[reference], *nmf_init(xs[reference], n_components, key=key))
    center = cs[reference]

    def step(state, _):
        w, h, _, objective, _ = state
        w, h, plans, new = _center_round(settings, w, h, xs, cs, center, weights)
        return (w, h, plans, new, jnp.abs(new - objective)), None

    plans0 = tuple(jnp.zeros((center.shape[0], x.shape[0]), center.dtype) for x in xs)
    init = (w, h, plans0, jnp.asarray(0.0, center.dtype), jnp.asarray(jnp.inf, center.dtype))
    (w, h, plans, objective, _), _, n_rounds = iterate(step, init, lambda s: s[4] <= threshold,
                                                       max_steps=max_iter, early_exit=True)
    expression = w @ h
    alignments = []
    for x, c, plan in zip(xs, cs, plans):
        rotation, translation = procrustes(center, c, plan)
        cost = kl_expression_cost(expression, x)
        alignments.append(AlignmentResult(plan, rotation, translation, c @ rotation.T + translation[None, :],
                                          fgw_objective(plan, cost, center, c, settings.alpha), plan_entropy(plan)))
    return CenterResult(expression, w, h, tuple(alignments), objective, n_rounds)


def center_align(
    xs: Sequence[ArrayLike], coordinates: Sequence[ArrayLike], *, key: PRNGKeyArray, reference: int = 0,
    alpha: float = 0.1, weights: ArrayLike | None = None, n_components: int = 15, max_iter: int = 10,
    threshold: float = 0.001, settings: PasteAlignment | None = None,
) -> CenterResult:
    """PASTE's `center_align`: a centre slice on the reference slice's spots, aligned to every slice.

    **Arguments:**

    - `xs`, `coordinates`: per slice, `(n_q, n_genes)` counts on shared genes and `(n_q, 2)` positions.
    - `key`: PRNG key of the factorisation's random start. (Keyword only argument.)
    - `reference`: the slice whose spots the centre takes (PASTE's `A`).
    - `alpha`, `settings`: as in `pairwise_align`; `weights`: PASTE's `lmbda` (default uniform).
    - `n_components`, `max_iter`, `threshold`: PASTE's defaults 15, 10, 0.001.
    """
    if len(xs) < 2 or len(xs) != len(coordinates):
        raise ValueError(f"slices: need >= 2 slices with one coordinate array each, got {len(xs)} and "
                         f"{len(coordinates)}")
    if not 0 <= reference < len(xs):
        raise ValueError(f"reference: must index one of the {len(xs)} slices, got {reference}")
    settings = PasteAlignment(alpha) if settings is None else settings
    check_alpha(float(settings.alpha))
    checked = [check_alignment_inputs(xs[0], coordinates[0], field="slice 0")]
    for i in range(1, len(xs)):
        checked.append(check_alignment_inputs(xs[i], coordinates[i], field=f"slice {i}",
                                              n_genes=checked[0][0].shape[1]))
    lam = jnp.full((len(xs),), 1.0 / len(xs)) if weights is None else jnp.asarray(weights, dtype=jnp.zeros(()).dtype)
    if lam.shape != (len(xs),):
        raise ValueError(f"weights: expected shape ({len(xs)},), got {lam.shape}")
    return _center(settings, tuple(x for x, _ in checked), tuple(c for _, c in checked), reference, lam, key,
                   max_iter, threshold, n_components)
