"""`static`: the default expert placement. Slot `i` holds expert `i`; redundant slots (with
`--ep-num-redundant-experts`) repeat experts `0, 1, ...`, whatever the load."""

from __future__ import annotations

import torch
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology
from pegboard.sdk.slots import ExpertPlacer


class StaticPlacement(ExpertPlacer):
    name = "static"

    @hookimpl
    def place_experts(self, load: torch.Tensor, topology: ExpertTopology) -> ExpertPlacement:
        row = torch.arange(topology.num_physical) % topology.num_logical
        return ExpertPlacement(row.repeat(topology.num_layers, 1), topology.num_logical)
