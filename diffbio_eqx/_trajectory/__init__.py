"""Trajectories: diffusion map and DPT (scanpy-faithful), fate probabilities (CellRank-style absorption),
Waddington-OT transport maps (ott-jax)."""

from ._api import (
    fate_probabilities as fate_probabilities,
    find_terminal_states as find_terminal_states,
    transport_maps as transport_maps,
)
from ._diffmap import (
    DiffusionMap as DiffusionMap,
    DPTResult as DPTResult,
    EigenSettings as EigenSettings,
    compute_diffusion_map as compute_diffusion_map,
    diffusion_map as diffusion_map,
    diffusion_pseudotime as diffusion_pseudotime,
    dpt_distances as dpt_distances,
    pseudotime_from_diffmap as pseudotime_from_diffmap,
)
from ._fate import Absorption as Absorption, FateResult as FateResult, absorption as absorption
from ._graph import CellGraph as CellGraph, DisconnectedGraphWarning as DisconnectedGraphWarning
from ._transport import (
    OTSettings as OTSettings,
    TransportMap as TransportMap,
    interpolate as interpolate,
    pull_back as pull_back,
    push_forward as push_forward,
    transport_map as transport_map,
    wot_cost as wot_cost,
)
