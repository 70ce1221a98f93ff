"""Moving a model's expert weights to a new `ExpertPlacement` (at a step boundary)."""

from __future__ import annotations

import torch
from pegboard.core.models.moe import moe_blocks
from pegboard.sdk.expert_placement import ExpertPlacement
from torch import nn


@torch.no_grad()
def apply_placement(model: nn.Module, placement: ExpertPlacement) -> None:
    """Give every sparse layer `placement`'s row: each new slot takes the weights of a slot
    that holds the same logical expert now (replicas are copies, so any one will do). One layer
    at a time, so the extra memory is one layer's experts."""
    blocks = moe_blocks(model)
    if placement.num_layers != len(blocks):
        raise ValueError(
            f"placement has {placement.num_layers} layers, the model {len(blocks)} sparse layers"
        )
    for index, block in enumerate(blocks):
        new = placement.layer(index)
        old = block.placement
        device = block.experts.w13.device
        source = old.logical_to_physical[0, :, 0].cpu()[new.physical_to_logical[0]]
        source = source.to(device)
        for name in ("w13", "w2"):
            param = getattr(block.experts, name)
            param.data = param.data.index_select(0, source)
        block.set_placement(new.to(device))
