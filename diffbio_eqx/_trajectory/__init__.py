"""Trajectories: diffusion map and DPT (scanpy-faithful), fate probabilities (CellRank-style absorption), Waddington-OT transport maps (ott-jax)."""
