"""Marker genes of pbmc68k's 10 bulk_labels types for CellAssign, written from the literature, and the label split
shared by tests/test_annotation.py and benchmarks/make_annotation_reference.py.

Sources: monocytes LYZ, S100A8/9, CST3 and dendritic cells FCER1A, CLEC10A, HLA-DQA1 (Villani et al. 2017, Science;
Zheng et al. 2017, Nat. Commun.); B cells CD79A/B, MS4A1; NK cells NKG7, GNLY, PRF1, GZMB; T cells CD3D/E with CD4 or
CD8A/B; naive T CCR7; memory CD4 IL7R, S100A4; regulatory T TNFRSF4 (OX40; Zheng 2017 lists FOXP3/IL2RA, absent from
these 765 genes); cytotoxic CD8 CCL5, GZMK; CD34+ progenitors SPINK2, PRSS57, SOX4, CDK6 (Zheng 2017's CD34+ sort;
the Human Cell Atlas HSPC signature). Only genes present in pbmc68k_reduced's 765 are used.
"""

import numpy as np
import pandas as pd


PBMC68K_MARKERS = {
    "CD14+ Monocyte": ["LYZ", "S100A8", "S100A9", "CST3"],
    "CD19+ B": ["CD79A", "CD79B", "MS4A1"],
    "CD34+": ["SPINK2", "PRSS57", "SOX4", "CDK6"],
    "CD4+/CD25 T Reg": ["CD3D", "CD3E", "CD4", "TNFRSF4"],
    "CD4+/CD45RA+/CD25- Naive T": ["CD3D", "CD3E", "CD4", "CCR7"],
    "CD4+/CD45RO+ Memory": ["CD3D", "CD3E", "CD4", "IL7R", "S100A4"],
    "CD56+ NK": ["NKG7", "GNLY", "PRF1", "GZMB"],
    "CD8+ Cytotoxic T": ["CD3D", "CD3E", "CD8A", "CD8B", "CCL5", "GZMK"],
    "CD8+/CD45RA+ Naive Cytotoxic": ["CD3D", "CD3E", "CD8A", "CD8B", "CCR7"],
    "Dendritic": ["FCER1A", "CLEC10A", "HLA-DQA1", "CST3"],
}


def marker_matrix(markers: dict[str, list[str]]) -> pd.DataFrame:
    """Binary marker genes x cell types (scvi-tools' CellAssign input)."""
    genes = sorted({gene for names in markers.values() for gene in names})
    matrix = pd.DataFrame(0, index=genes, columns=list(markers))
    for cell_type, names in markers.items():
        matrix.loc[names, cell_type] = 1
    return matrix


def annotation_split(n_cells: int, seed: int) -> np.ndarray:
    """The indices of a random half of the cells, whose labels are hidden."""
    return np.sort(np.random.default_rng(seed).permutation(n_cells)[: n_cells // 2])
