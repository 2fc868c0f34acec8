"""Cell-cell communication: CellPhoneDB- and CellChat-style ligand-receptor scoring (as LIANA runs them) and an
NCEM-style spatial model."""

from ._ncem import (
    SpatialNCEM as SpatialNCEM,
    fit_ncem as fit_ncem,
    held_out_r2 as held_out_r2,
    neighbour_shares as neighbour_shares,
)
from ._resource import ResourceIndex as ResourceIndex, index_resource as index_resource
from ._stage import (
    LigandReceptor as LigandReceptor,
    LigandReceptorResult as LigandReceptorResult,
    score_ligand_receptor as score_ligand_receptor,
)
from ._table import ligand_receptor_table as ligand_receptor_table
