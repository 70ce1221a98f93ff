"""EPLB (DeepSeek's algorithm, `plugins.moe.eplb_algorithm`): its placements are valid (every
logical expert has a replica, every rank holds the same number of slots) and balance skewed
(Zipf) expert loads better than the static placement."""

from __future__ import annotations

import pytest
import torch
from pegboard.plugins.moe.eplb import EPLBPlacement
from pegboard.plugins.moe.eplb_algorithm import balanced_packing, rebalance, replicate
from pegboard.plugins.moe.static import StaticPlacement
from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology
from pegboard.sdk.testing import ConformanceError
from pegboard.sdk.testing_placement import check_expert_placement


def zipf_load(layers: int, experts: int, s: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Tokens per expert with Zipf-distributed popularity, the hot experts shuffled per layer."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    weights = 1.0 / ranks**s
    rows = [weights[torch.randperm(experts, generator=gen)] for _ in range(layers)]
    return torch.stack(rows) * 10_000


def balancedness(policy, load, topology) -> float:
    placement = policy.place_experts(load=load, topology=topology)
    assert placement.problems(topology) == []
    return placement.balancedness(load, topology.ep_size)


def test_packing_fills_every_pack_equally_and_evens_the_load():
    pack, rank = balanced_packing([9.0, 1.0, 5.0, 5.0, 4.0, 6.0], 2)
    assert sorted(pack) == [0, 0, 0, 1, 1, 1]
    loads = [sum(w for w, p in zip([9, 1, 5, 5, 4, 6], pack) if p == q) for q in (0, 1)]
    assert loads == [15, 15]
    assert sorted(zip(pack, rank)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_replication_goes_to_the_largest_load_per_replica():
    slots, count = replicate([8.0, 1.0, 3.0], 6)
    assert slots[:3] == [0, 1, 2]
    assert count == [3, 1, 2]  # extra slots: 8/1, then 8/2 = 4 > 3, then 3 > 8/3


@pytest.mark.parametrize("groups,nodes", [(1, 1), (4, 2), (3, 2)])  # (3, 2): falls back to global
def test_placement_is_valid(groups, nodes):
    experts, gpus, redundant = 12, 4, 4
    load = zipf_load(3, experts)
    p2l = rebalance(load, experts + redundant, groups, nodes, gpus)
    placement = ExpertPlacement(p2l, experts)
    topo = ExpertTopology(3, experts, experts + redundant, gpus, nodes, groups)
    assert placement.problems(topo) == []
    assert bool((placement.replica_count >= 1).all())
    assert int(placement.replica_count.sum(dim=1).unique()) == experts + redundant


def test_hierarchical_keeps_each_group_on_one_node():
    experts, groups, nodes, gpus = 16, 4, 2, 4
    p2l = rebalance(zipf_load(2, experts), experts, groups, nodes, gpus)
    half = experts // nodes
    for row in p2l.tolist():
        for node in range(nodes):
            node_groups = {e // (experts // groups) for e in row[node * half : (node + 1) * half]}
            assert len(node_groups) == groups // nodes


@pytest.mark.parametrize(
    "ep,experts,redundant,at_least",
    [(8, 64, 0, None), (8, 64, 8, 0.9), (8, 64, 32, 0.97), (2, 64, 0, 0.97), (2, 64, 8, 0.99)],
)
def test_eplb_beats_static_on_zipf_load(ep, experts, redundant, at_least):
    load = zipf_load(4, experts)
    topo = ExpertTopology(4, experts, experts + redundant, ep)
    static = balancedness(StaticPlacement(), load, topo)
    eplb = balancedness(EPLBPlacement(), load, topo)
    print(f"EP={ep} E={experts} redundant={redundant}: static {static:.3f} -> eplb {eplb:.3f}")
    assert eplb > static
    if at_least is not None:
        assert eplb >= at_least


def test_invalid_placements_are_described():
    topo = ExpertTopology(1, 4, 4, 2)
    assert ExpertPlacement(torch.tensor([[0, 1, 2, 2]]), 4).problems(topo) == [
        "logical expert 3 of layer 0 has no replica"
    ]
    assert "shape" in ExpertPlacement(torch.tensor([[0, 1, 2]]), 4).problems(topo)[0]
    assert "outside" in ExpertPlacement(torch.tensor([[0, 1, 2, 7]]), 4).problems(topo)[0]


@pytest.mark.parametrize("cls", [StaticPlacement, EPLBPlacement])
def test_builtin_placements_conform(cls):
    check_expert_placement(cls)


class _DropsAnExpert(EPLBPlacement):
    """Fills every slot of the last expert with expert 0: an invalid placement."""

    name = "drops"

    def place_experts(self, load, topology):
        rows = super().place_experts(load, topology).physical_to_logical.clone()
        rows[rows == topology.num_logical - 1] = 0
        return ExpertPlacement(rows, topology.num_logical)


def test_the_kit_catches_a_placement_missing_an_expert():
    with pytest.raises(ConformanceError, match="every logical expert has at least one slot"):
        check_expert_placement(_DropsAnExpert)
