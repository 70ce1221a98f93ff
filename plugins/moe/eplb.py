"""`eplb` (`--enable-eplb`): DeepSeek's expert-parallelism load balancer over the recorded load
(`plugins.moe.eplb_algorithm`): hot experts are replicated into the redundant slots and the
replicas packed so every rank carries about the same number of tokens."""

from __future__ import annotations

import torch
from pegboard.core.hookspecs import hookimpl
from pegboard.plugins.moe.eplb_algorithm import rebalance
from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology
from pegboard.sdk.slots import ExpertPlacer


class EPLBPlacement(ExpertPlacer):
    name = "eplb"

    @hookimpl
    def place_experts(self, load: torch.Tensor, topology: ExpertTopology) -> ExpertPlacement:
        rows = rebalance(
            load,
            topology.num_physical,
            topology.num_groups,
            topology.num_nodes,
            topology.ep_size,
        )
        return ExpertPlacement(rows, topology.num_logical)
