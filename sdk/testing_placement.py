"""The conformance kit of the `expert_placement` slot (see `pegboard.sdk.testing` for others).

    from pegboard.sdk.testing_placement import check_expert_placement

    def test_my_placement_conforms():
        check_expert_placement(MyPlacement)

`check_expert_placement` creates the plugin as the engine does (options validated, `setup`,
registered with a `PluginManager`, `place_experts` called through pluggy) and asks it for
placements over seeded topologies (1-8 ranks, 0-8 redundant slots, 1-2 nodes, grouped or not)
and loads (all zeros, uniform, Zipf-skewed, one hot expert). It raises `ConformanceError`
quoting the broken sentence of `pegboard.sdk.slots.ExpertPlacer` or the hookspec.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology
from pegboard.sdk.slots import SLOTS, Plugin, PluginContext

__all__ = ["check_expert_placement"]


def _error(rule: str, detail: str = "") -> AssertionError:
    from pegboard.sdk.testing import ConformanceError  # lazily: sdk.testing imports this kit

    return ConformanceError(f"{rule}" + (f"\n  case: {detail}" if detail else ""))


def _topology(rng: random.Random) -> ExpertTopology:
    ep = rng.choice([1, 2, 4, 8])
    nodes = rng.choice([n for n in (1, 2) if ep % n == 0])
    groups = rng.choice([1, 2, 4])
    experts = ep * groups * rng.choice([1, 2, 4])
    redundant = ep * rng.choice([0, 0, 1])
    return ExpertTopology(rng.randint(1, 3), experts, experts + redundant, ep, nodes, groups)


def _load(rng: random.Random, topo: ExpertTopology) -> tuple[str, torch.Tensor]:
    kind = rng.choice(["zeros", "uniform", "zipf", "one-hot"])
    shape = (topo.num_layers, topo.num_logical)
    if kind == "zeros":
        return kind, torch.zeros(shape, dtype=torch.float64)
    if kind == "uniform":
        return kind, torch.full(shape, 100.0, dtype=torch.float64)
    if kind == "zipf":
        ranks = torch.arange(1, topo.num_logical + 1, dtype=torch.float64)
        rows = [(1000.0 / ranks)[torch.randperm(topo.num_logical)] for _ in range(shape[0])]
        return kind, torch.stack(rows)
    load = torch.zeros(shape, dtype=torch.float64)
    load[:, rng.randrange(topo.num_logical)] = 5000.0
    return kind, load


def check_expert_placement(
    cls: type[Plugin], options: dict[str, Any] | None = None, seed: int = 0, rounds: int = 60
) -> None:
    """Check an expert placement plugin against the `place_experts` hookspec and the
    `ExpertPlacer` contract."""
    if cls.slot != "expert_placement":
        raise _error(
            "the plugin must fill slot 'expert_placement' (subclass "
            f"{SLOTS['expert_placement'].base.__name__})",
            f"{cls.__qualname__}.slot == {cls.slot!r}",
        )
    manager = PluginManager(entry_points=False)
    info = manager.add(cls, name=cls.name or cls.__name__.lower())
    plugin = manager.create("expert_placement", info.name, options)
    plugin.setup(PluginContext())
    manager.register(plugin)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for round_ in range(rounds):
        topo = _topology(rng)
        kind, load = _load(rng, topo)
        case = f"round {round_}: {topo}, {kind} load"
        try:
            placement = manager.hook.place_experts(load=load.clone(), topology=topo)
        except Exception as e:
            raise _error(
                "place_experts returns a placement (it must not raise)", f"{case}: {e!r}"
            ) from e
        if not isinstance(placement, ExpertPlacement):
            raise _error("place_experts returns an ExpertPlacement", f"{case}: got {placement!r}")
        problems = placement.problems(topo)
        if problems:
            raise _error(
                "a placement of shape [num_layers, num_physical] in which every logical expert "
                "has at least one slot",
                f"{case}: {'; '.join(problems)}",
            )
