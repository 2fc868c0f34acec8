"""Gene regulatory networks: per-target regressions on transcription factors (GENIE3/GRNBoost2-style importances)."""

from ._regression import AdditiveGRN as AdditiveGRN, grn_importances as grn_importances
from ._table import grn_table as grn_table
