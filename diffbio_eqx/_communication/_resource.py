"""Ligand-receptor resources: any table with `ligand` and `receptor` columns, complexes as `_`-joined subunits.

This is LIANA's resource handling (`liana.resource._reassemble_complexes._explode_complexes` and
`liana.method._pipe_utils._pre.filter_resource`) as index arrays: an interaction is kept when every subunit of
its ligand and of its receptor is a gene of the data (with a non-zero column), and each complex becomes a padded
row of gene indices, so that the scorers take "the least expressed subunit" with one `min` over an axis.
"""

from typing import Any, NamedTuple

import numpy as np
import pandas as pd


COMPLEX_SEP = "_"


class ResourceIndex(NamedTuple):
    """A resource matched to the genes of one dataset.

    - `ligand_complex`, `receptor_complex`: the interaction names, shape `(n_interactions,)`.
    - `genes`: the data column of each gene the kept interactions use, shape `(n_entities,)`.
    - `gene_names`: their names.
    - `ligand_units`, `receptor_units`: per interaction, positions into `genes` of its subunits, padded by
      repeating the first subunit (a repeat leaves a minimum unchanged), shape `(n_interactions, max_units)`.
    - `ligand_mask`, `receptor_mask`: True on real (not padded) subunits.
    """

    ligand_complex: np.ndarray
    receptor_complex: np.ndarray
    genes: np.ndarray
    gene_names: np.ndarray
    ligand_units: np.ndarray
    receptor_units: np.ndarray
    ligand_mask: np.ndarray
    receptor_mask: np.ndarray


def check_resource(resource: Any, field: str = "resource") -> pd.DataFrame:
    """The `ligand` / `receptor` columns of `resource` as strings, without missing or repeated rows."""
    if not isinstance(resource, pd.DataFrame):
        raise ValueError(f"{field}: expected a pandas DataFrame with 'ligand' and 'receptor' columns, got "
                         f"{type(resource).__name__}")
    missing = [column for column in ("ligand", "receptor") if column not in resource.columns]
    if missing:
        raise ValueError(f"{field}: missing column(s) {missing}; a resource needs 'ligand' and 'receptor' columns "
                         f"(complexes as subunits joined by '{COMPLEX_SEP}'), got columns {list(resource.columns)}")
    table = pd.DataFrame(resource[["ligand", "receptor"]]).dropna().drop_duplicates()
    if len(table) == 0:
        raise ValueError(f"{field}: has no ligand-receptor rows")
    return table.astype(str).reset_index(drop=True)


def _padded(units: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(row) for row in units)
    index = np.array([row + [row[0]] * (width - len(row)) for row in units], dtype=np.int32)
    mask = np.array([[True] * len(row) + [False] * (width - len(row)) for row in units], dtype=bool)
    return index, mask


def index_resource(resource: Any, var_names: Any, *, expressed: np.ndarray | None = None,
                   field: str = "resource") -> ResourceIndex:
    """Match `resource` to the data's genes `var_names` (LIANA's `filter_resource`).

    **Arguments:**

    - `resource`: a table with `ligand` and `receptor` columns (see `check_resource`).
    - `var_names`: the data's gene names, in column order.
    - `expressed`: optional boolean per gene; genes that are False (LIANA drops all-zero columns) count as
      absent. (Keyword only argument.)

    **Returns:** a `ResourceIndex`. Raises a `ValueError` naming `resource` when no interaction has all of its
    subunits among the genes.
    """
    table = check_resource(resource, field)
    names = np.asarray(var_names).astype(str)
    usable = np.ones(len(names), dtype=bool) if expressed is None else np.asarray(expressed, dtype=bool)
    column = {name: i for i, name in enumerate(names) if usable[i]}
    rows = [(lig, rec) for lig, rec in zip(table["ligand"], table["receptor"], strict=True)
            if all(unit in column for unit in lig.split(COMPLEX_SEP) + rec.split(COMPLEX_SEP))]
    if not rows:
        shown = sorted(set(table["ligand"]).union(table["receptor"]))[:5]
        raise ValueError(f"{field}: none of its {len(table)} interactions has all of its ligand and receptor "
                         f"subunits among the data's genes (var_names, e.g. {list(names[:5])}; resource genes "
                         f"e.g. {shown}); check the organism and the gene identifiers")
    entity_names = sorted({unit for lig, rec in rows for unit in (lig + COMPLEX_SEP + rec).split(COMPLEX_SEP)})
    position = {name: i for i, name in enumerate(entity_names)}
    lig_index, lig_mask = _padded([[position[u] for u in lig.split(COMPLEX_SEP)] for lig, _ in rows])
    rec_index, rec_mask = _padded([[position[u] for u in rec.split(COMPLEX_SEP)] for _, rec in rows])
    return ResourceIndex(
        ligand_complex=np.array([lig for lig, _ in rows]), receptor_complex=np.array([rec for _, rec in rows]),
        genes=np.array([column[name] for name in entity_names], dtype=np.int64), gene_names=np.array(entity_names),
        ligand_units=lig_index, receptor_units=rec_index, ligand_mask=lig_mask, receptor_mask=rec_mask,
    )
