"""Moving a model's expert weights to a new `ExpertPlacement` (at a step boundary)."""

from __future__ import annotations

import torch
from pegboard.core.models.moe import moe_blocks
from pegboard.sdk.expert_placement import ExpertPlacement
from torch import nn


# inference_mode, not no_grad: the maps may have been made under inference mode (CUDA graph
# capture), and in-place writes to such tensors are refused outside it (seen on the H200).
@torch.inference_mode()
def apply_placement(model: nn.Module, placement: ExpertPlacement) -> None:
    """Give every sparse layer `placement`'s row: each new slot takes the weights of a slot
    that holds the same logical expert now (replicas are copies, so any one will do). One layer
    at a time, so the extra memory is one layer's experts. When the slot count and the maps'
    shapes stay the same, weights and maps are copied in place (captured CUDA graphs keep
    reading the same storage); the maps' replica dimension is fixed at `1 + redundant`. Under
    expert parallelism every rank calls it with the same placement (the weights move between
    ranks: `expert_parallel.ExpertParallel.move`)."""
    blocks = moe_blocks(model)
    if placement.num_layers != len(blocks):
        raise ValueError(
            f"placement has {placement.num_layers} layers, the model {len(blocks)} sparse layers"
        )
    width = max(placement.width, placement.num_physical - placement.num_logical + 1)
    for index, block in enumerate(blocks):
        old = block.placement
        device = block.experts.w13.device
        rows = placement.physical_to_logical[index : index + 1].clone()
        new = ExpertPlacement(rows, placement.num_logical, width).to(device)
        source = old.logical_to_physical[0, :, 0].to(device)[new.physical_to_logical[0]]
        maps = (old.physical_to_logical[0].tolist(), rows[0].tolist())  # slot -> expert
        for name in ("w13", "w2") if maps[0] != maps[1] else ():  # an unchanged layer stays
            param = getattr(block.experts, name)
            if block.ep is not None:  # this rank's slots, some received from other ranks
                moved = block.ep.move(param.data, *maps)
            else:
                moved = param.data.index_select(0, source)
            if moved.shape == param.data.shape:
                param.data.copy_(moved)
            else:
                param.data = moved
        if _same_shapes(old, new) and old.physical_to_logical.device == device:
            old.physical_to_logical.copy_(new.physical_to_logical)
            old.logical_to_physical.copy_(new.logical_to_physical)
            old.replica_count.copy_(new.replica_count)
        else:
            block.set_placement(new)


def _same_shapes(a: ExpertPlacement, b: ExpertPlacement) -> bool:
    return all(
        getattr(a, n).shape == getattr(b, n).shape
        for n in ("physical_to_logical", "logical_to_physical", "replica_count")
    )
