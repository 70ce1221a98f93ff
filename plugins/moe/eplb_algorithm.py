"""DeepSeek's expert-parallelism load balancer (EPLB), written from its published description.

Given the recorded load of each logical expert, it chooses which experts to replicate into the
redundant slots and which rank holds each physical slot, so the ranks' loads even out:

1. *Hierarchical* (when the expert groups divide evenly over the nodes): pack the expert groups
   onto nodes so the nodes' loads are balanced (keeping a group on one node spares inter-node
   traffic under group-limited routing); within each node, replicate the experts that carry
   the most load per replica into that node's share of the slots; then pack the replicas onto
   the node's GPUs, each GPU taking the same number of slots.
2. *Global* otherwise: the same with one group and one node — replicate over all slots, then
   pack the replicas onto all GPUs.

Both steps are greedy: replication repeatedly gives one more replica to the expert with the
largest load per replica; packing takes items heaviest first and puts each on the least loaded
pack that still has room.
"""

from __future__ import annotations

import torch


def balanced_packing(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Put `len(weights)` items into `num_packs` packs of equal count, heaviest first onto the
    lightest pack with room. Returns each item's pack and its position inside the pack."""
    per_pack = len(weights) // num_packs
    loads = [0.0] * num_packs
    counts = [0] * num_packs
    pack = [0] * len(weights)
    rank = [0] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        target = min((p for p in range(num_packs) if counts[p] < per_pack), key=lambda p: loads[p])
        pack[item], rank[item] = target, counts[target]
        counts[target] += 1
        loads[target] += weights[item]
    return pack, rank


def replicate(weights: list[float], num_slots: int) -> tuple[list[int], list[int]]:
    """One slot per expert, then each extra slot to the expert with the largest load per
    replica. Returns (slot -> expert, replicas per expert)."""
    slots = list(range(len(weights)))
    count = [1] * len(weights)
    for _ in range(num_slots - len(weights)):
        hot = max(range(len(weights)), key=lambda e: weights[e] / count[e])
        slots.append(hot)
        count[hot] += 1
    return slots, count


def place_layer(
    weights: list[float], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> list[int]:
    """One layer's physical slot -> logical expert, slots ordered by GPU (hierarchical)."""
    experts = len(weights)
    group_size = experts // num_groups
    group_load = [sum(weights[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    by_node: list[int] = []  # logical experts, node by node
    for node in range(num_nodes):
        groups = sorted(
            (g for g in range(num_groups) if group_node[g] == node), key=group_rank.__getitem__
        )
        for g in groups:
            by_node.extend(range(g * group_size, (g + 1) * group_size))
    node_experts = experts // num_nodes
    node_slots = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    per_gpu = node_slots // gpus_per_node
    placement: list[int] = []
    for node in range(num_nodes):
        local = by_node[node * node_experts : (node + 1) * node_experts]
        local_w = [weights[e] for e in local]
        slot_expert, count = replicate(local_w, node_slots)
        replica_load = [local_w[e] / count[e] for e in slot_expert]
        gpu, rank = balanced_packing(replica_load, gpus_per_node)
        ordered = [0] * node_slots
        for i, e in enumerate(slot_expert):
            ordered[gpu[i] * per_gpu + rank[i]] = local[e]
        placement.extend(ordered)
    return placement


def rebalance(
    load: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """`load [L, E]` -> `physical_to_logical [L, num_slots]`: hierarchical when the groups
    divide over the nodes, else global (one group, one node)."""
    if num_groups % num_nodes or num_gpus % num_nodes:
        num_groups, num_nodes = 1, 1
    rows = [
        place_layer(layer, num_slots, num_groups, num_nodes, num_gpus)
        for layer in load.double().cpu().tolist()
    ]
    return torch.tensor(rows, dtype=torch.int64)
