"""Archetypal analysis: PCHA-faithful archetypes with an amortised encoder for new cells."""
