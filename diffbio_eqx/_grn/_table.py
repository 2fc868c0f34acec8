"""Host side of the GRN: name checks, one jitted call, ranked edges like arboreto's (`TF`, `target`, `importance`)."""

import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._regression import AdditiveGRN, grn_importances


def _positions(names: np.ndarray, wanted: Sequence[str] | None, field: str) -> np.ndarray:
    if wanted is None:
        return np.arange(len(names))
    if isinstance(wanted, str):
        raise ValueError(f"{field}: expected a list of gene names, got the single string {wanted!r}")
    wanted = [str(w) for w in wanted]
    column = {name: i for i, name in enumerate(names)}
    missing = [w for w in wanted if w not in column]
    found = [column[w] for w in dict.fromkeys(wanted) if w in column]
    if not found:
        raise ValueError(f"{field}: none of the {len(wanted)} names is among the data's genes (var_names), e.g. "
                         f"{missing[:5]}; var_names start {list(names[:5])}")
    if missing:
        warnings.warn(f"{field}: {len(missing)} of {len(wanted)} names are not in the data and are left out: "
                      f"{missing[:10]}", UserWarning, stacklevel=3)
    return np.array(found)


def grn_table(x: Any, var_names: Any, tfs: Sequence[str], *, targets: Sequence[str] | None = None,
              ridge: float = 1e-2, n_knots: int = 3) -> pd.DataFrame:
    """TF -> target importances for log-normalised `x` (cells x genes), ranked, as arboreto's `grnboost2` returns.

    **Arguments:** `var_names` the genes of `x`'s columns; `tfs` the transcription factors (names not in the data
    are left out with a warning naming `tfs`; none found is an error); `targets` the genes to explain (default
    all); `ridge` and `n_knots` as in `AdditiveGRN`.

    **Returns:** a DataFrame with columns `TF`, `target`, `importance` (share of the target's variance the TF's
    partial fit explains), positive importances only, sorted descending; a TF is never its own target.
    """
    names = np.asarray(var_names).astype(str)
    if not hasattr(x, "shape") or len(x.shape) != 2 or x.shape[1] != len(names):
        raise ValueError(f"x: expected a (n_cells, {len(names)}) matrix, got shape {getattr(x, 'shape', None)}")
    if x.shape[0] < 3:
        raise ValueError(f"x: needs at least 3 cells, got {x.shape[0]}")
    tf_cols = _positions(names, tfs, "tfs")
    target_cols = _positions(names, targets, "targets")
    dense = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)
    if not np.all(np.isfinite(dense)):
        raise ValueError("x: contains NaN or infinite values")
    tf_position = {int(c): i for i, c in enumerate(tf_cols)}
    own = np.array([tf_position.get(int(c), -1) for c in target_cols], dtype=np.int32)
    importances = np.asarray(grn_importances(
        AdditiveGRN(ridge=ridge, n_knots=n_knots), jnp.asarray(dense[:, tf_cols]), jnp.asarray(dense[:, target_cols]),
        jnp.asarray(own)))
    tf_index, target_index = np.nonzero(importances > 0)
    table = pd.DataFrame({"TF": names[tf_cols][tf_index], "target": names[target_cols][target_index],
                          "importance": importances[tf_index, target_index]})
    return table.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)
