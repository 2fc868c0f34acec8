"""Gene regulatory networks: per-target regressions on transcription factors (GENIE3/GRNBoost2-style importances)."""
