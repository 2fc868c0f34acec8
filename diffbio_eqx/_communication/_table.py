"""Host side of ligand-receptor scoring: checks, the resource match, one jitted call, a tidy table like LIANA's."""

import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jaxtyping import PRNGKeyArray

from ._resource import index_resource
from ._stage import LigandReceptor, Method, score_ligand_receptor


_COLUMNS = {
    "cellphonedb": ("ligand_means", "receptor_means", "lr_means", "cellphone_pvals"),
    "cellchat": ("ligand_trimean", "receptor_trimean", "lr_probs", "cellchat_pvals"),
}


def _check_groups(groups: Any, n_cells: int, min_cells: int, field: str) -> pd.Categorical:
    labels = pd.Categorical(np.asarray(groups) if not isinstance(groups, pd.Series | pd.Categorical) else groups)
    if len(labels) != n_cells:
        raise ValueError(f"{field}: has {len(labels)} labels for {n_cells} cells")
    if np.any(pd.isna(labels)):
        raise ValueError(f"{field}: {int(np.sum(pd.isna(labels)))} cells have no label (missing values)")
    counts = pd.Series(labels).value_counts()
    small = [str(g) for g, c in counts.items() if 0 < int(c) < min_cells]
    if small:
        warnings.warn(f"{field}: group(s) {small} have fewer than min_cells={min_cells} cells and are left out "
                      f"(as LIANA does)", UserWarning, stacklevel=3)
    kept = [g for g in labels.categories if int(counts.get(g, 0) or 0) >= min_cells]
    if not kept:
        raise ValueError(f"{field}: no group has at least min_cells={min_cells} cells ({dict(counts)})")
    return pd.Categorical(labels, categories=kept)


def _dense_rows(x: Any, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    part = x[rows] if columns is None else x[rows][:, columns]
    return np.asarray(part.toarray() if sp.issparse(part) else part, dtype=np.float32)


def ligand_receptor_table(
    x: Any, var_names: Any, groups: Any, resource: pd.DataFrame, *, method: Method = "cellphonedb",
    expr_prop: float = 0.1, min_cells: int = 5, n_perms: int = 1000, key: PRNGKeyArray | None = None,
    permutations: np.ndarray | None = None,
) -> pd.DataFrame:
    """Score every (source, target, interaction) of `resource` on `x` (cells x genes, log-normalised).

    Groups with fewer than `min_cells` cells are left out with a warning naming `groupby`; genes whose column is all
    zero count as absent (as in LIANA). With `key` (or `permutations`, shape `(n_perms, n_kept_cells)`), p-values
    from the label permutations are added. **Returns** one row per interaction that passes `expr_prop`, sorted by
    score: `source`, `target`, `ligand`, `ligand_complex`, `receptor`, `receptor_complex`, the complexes' values
    and expressed fractions, LIANA's score and p-value columns (`lr_means`/`cellphone_pvals` or
    `lr_probs`/`cellchat_pvals`), and the same as `score` and `pvalue`. (CellChat's K_h is LIANA's 0.5 here;
    build a `LigandReceptor` for other values.)
    """
    if not hasattr(x, "shape") or len(x.shape) != 2 or x.shape[1] != len(var_names):
        raise ValueError(f"x: expected a (n_cells, {len(var_names)}) matrix, got shape {getattr(x, 'shape', None)}")
    labels = _check_groups(groups, x.shape[0], min_cells, "groupby")
    codes = np.asarray(labels.codes)
    cells = np.flatnonzero(codes >= 0)
    values = x.data if sp.issparse(x) else np.asarray(x)
    if not np.all(np.isfinite(values)):
        raise ValueError("x: contains NaN or infinite values")
    expressed = np.asarray(abs(x).sum(axis=0)).ravel() != 0
    index = index_resource(resource, var_names, expressed=expressed)
    dense = _dense_rows(x, cells, index.genes)
    x_max = float(x[cells].max()) if sp.issparse(x) else float(np.max(np.asarray(x)[cells]))
    stage = LigandReceptor(index, len(labels.categories), method=method, expr_prop=expr_prop, n_perms=n_perms)
    result = score_ligand_receptor(
        stage, jnp.asarray(dense), jnp.asarray(codes[cells], dtype=jnp.int32), jnp.asarray(x_max, jnp.float32),
        key=key, permutations=None if permutations is None else jnp.asarray(permutations, dtype=jnp.int32))
    return _tidy(result, index, list(labels.categories), method)


def _tidy(result: Any, index: Any, groups: list[Any], method: str) -> pd.DataFrame:
    source, target, inter = np.nonzero(np.asarray(result.kept))
    lig_col, rec_col, score_col, p_col = _COLUMNS[method]
    scores = np.asarray(result.scores)[source, target, inter]
    pvalues = np.asarray(result.pvalues)[source, target, inter]
    table = pd.DataFrame({
        "source": np.asarray(groups, dtype=object)[source], "target": np.asarray(groups, dtype=object)[target],
        "ligand": index.gene_names[np.asarray(result.ligand_gene)[source, inter]],
        "ligand_complex": index.ligand_complex[inter],
        "receptor": index.gene_names[np.asarray(result.receptor_gene)[target, inter]],
        "receptor_complex": index.receptor_complex[inter],
        lig_col: np.asarray(result.ligand_value)[source, inter],
        "ligand_props": np.asarray(result.ligand_props)[source, inter],
        rec_col: np.asarray(result.receptor_value)[target, inter],
        "receptor_props": np.asarray(result.receptor_props)[target, inter],
        score_col: scores, p_col: pvalues, "score": scores, "pvalue": pvalues,
    })
    return table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
