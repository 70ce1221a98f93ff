"""The expert_placement slot's contract: where each MoE expert's weights live.

A mixture-of-experts layer routes each token to `top_k` of `E` *logical* experts. With expert
parallelism the expert weights are spread over `ep_size` ranks in `P = E + redundant` *physical*
slots (`P / ep_size` per rank); a hot expert can be replicated so its tokens split over several
ranks. Which expert sits in which slot decides how evenly the ranks are loaded, and the load
depends on the traffic, so it is a policy: `place_experts(load, topology)` is called at step
boundaries (every `--eplb-rebalance-num-iterations` steps) with the recorded per-layer expert
load and returns an `ExpertPlacement`. The MoE layers then use that object directly: nothing
per token or per layer goes through pluggy. The core checks the returned placement
(`ExpertPlacement.problems`) before moving any weight, and names the plugin when it is invalid.
Plugins derive from `pegboard.sdk.slots.ExpertPlacer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ExpertTopology:
    """What a placement is laid out over: `num_layers` sparse layers of `num_logical`
    experts, `num_physical` slots per layer (logical + redundant) split evenly over `ep_size`
    ranks on `num_nodes` nodes; `num_groups` expert groups (DeepSeek's grouped routing; 1:
    no groups)."""

    num_layers: int
    num_logical: int
    num_physical: int
    ep_size: int = 1
    num_nodes: int = 1
    num_groups: int = 1

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.ep_size


@dataclass(frozen=True)
class ExpertPlacement:
    """`physical_to_logical [L, P]` (int64): the logical expert held by each physical slot of
    each layer. Rank `r` holds slots `[r * P / ep, (r + 1) * P / ep)`. Derived:
    `logical_to_physical [L, E, R]` (the slots of each expert, -1 padded) and `replica_count
    [L, E]`. A one-layer placement (`L == 1`) is what a MoE layer routes by (`to_physical`)."""

    physical_to_logical: torch.Tensor
    num_logical: int
    width: int = 0  # replicas per expert `logical_to_physical` has room for (0: as needed)
    logical_to_physical: torch.Tensor = field(init=False, repr=False)
    replica_count: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p2l = torch.as_tensor(self.physical_to_logical, dtype=torch.int64, device=_device(self))
        if p2l.dim() == 1:
            p2l = p2l.unsqueeze(0)
        object.__setattr__(self, "physical_to_logical", p2l)
        layers, _ = p2l.shape
        valid = (p2l >= 0) & (p2l < self.num_logical)
        safe = torch.where(valid, p2l, torch.zeros_like(p2l))
        counts = torch.zeros(layers, self.num_logical, dtype=torch.int64, device=p2l.device)
        counts.scatter_add_(1, safe, valid.to(torch.int64))
        width = max(int(counts.max()) if counts.numel() else 1, 1, self.width)
        l2p = torch.full((layers, self.num_logical, width), -1, dtype=torch.int64, device="cpu")
        host = p2l.cpu().tolist()
        for layer, row in enumerate(host):
            seen = [0] * self.num_logical
            for slot, expert in enumerate(row):
                if 0 <= expert < self.num_logical:
                    l2p[layer, expert, seen[expert]] = slot
                    seen[expert] += 1
        object.__setattr__(self, "logical_to_physical", l2p.to(p2l.device))
        object.__setattr__(self, "replica_count", counts)

    @classmethod
    def identity(cls, num_logical: int, num_layers: int = 1) -> ExpertPlacement:
        """Slot `i` holds expert `i` in every layer (no redundancy)."""
        return cls(torch.arange(num_logical, device="cpu").repeat(num_layers, 1), num_logical)

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_physical(self) -> int:
        return self.physical_to_logical.shape[1]

    def layer(self, index: int) -> ExpertPlacement:
        """The one-layer placement of sparse layer `index`."""
        rows = self.physical_to_logical[index : index + 1].clone()
        return ExpertPlacement(rows, self.num_logical, self.width)

    def to(self, device: torch.device | str) -> ExpertPlacement:
        return ExpertPlacement(self.physical_to_logical.to(device), self.num_logical, self.width)

    def slots_of(self, expert: int, layer: int = 0) -> list[int]:
        """The physical slots holding `expert` in `layer`."""
        return [s for s in self.logical_to_physical[layer, expert].tolist() if s >= 0]

    def to_physical(self, experts: torch.Tensor) -> torch.Tensor:
        """Logical experts `[T, k]` -> physical slots (one-layer placement). A replicated
        expert's tokens alternate over its replicas (by token and choice index); no host sync."""
        l2p = self.logical_to_physical[0]
        if l2p.shape[1] == 1:
            return l2p[experts, 0]
        tokens, k = experts.shape
        spread = torch.arange(tokens, device=experts.device)[:, None] + torch.arange(
            k, device=experts.device
        )
        replica = spread % self.replica_count[0][experts]
        return l2p[experts, replica]

    def rank_loads(self, load: torch.Tensor, ep_size: int) -> torch.Tensor:
        """Per-rank tokens `[L, ep_size]` for a logical load `[L, E]`, each expert's load split
        evenly over its replicas."""
        load = torch.as_tensor(load, dtype=torch.float64).cpu()
        p2l = self.physical_to_logical.cpu()
        per_replica = load / self.replica_count.cpu().clamp(min=1)
        slot_load = torch.gather(per_replica, 1, p2l.clamp(min=0))
        return slot_load.view(p2l.shape[0], ep_size, -1).sum(dim=2)

    def balancedness(self, load: torch.Tensor, ep_size: int) -> float:
        """mean/max per-rank tokens, averaged over layers (1.0: perfectly even)."""
        ranks = self.rank_loads(load, ep_size)
        peak = ranks.max(dim=1).values
        ratio = torch.where(
            peak > 0, ranks.mean(dim=1) / peak.clamp(min=1e-12), torch.ones_like(peak)
        )
        return float(ratio.mean())

    def problems(self, topology: ExpertTopology) -> list[str]:
        """What makes this placement unusable for `topology` (empty: valid)."""
        found: list[str] = []
        shape = (topology.num_layers, topology.num_physical)
        if tuple(self.physical_to_logical.shape) != shape:
            found.append(
                f"physical_to_logical has shape {list(self.physical_to_logical.shape)}, "
                f"expected {list(shape)} (layers, physical slots)"
            )
            return found
        if self.num_logical != topology.num_logical:
            found.append(f"num_logical is {self.num_logical}, expected {topology.num_logical}")
        p2l = self.physical_to_logical
        if bool(((p2l < 0) | (p2l >= topology.num_logical)).any()):
            found.append(f"a slot holds an expert outside [0, {topology.num_logical})")
        missing = (self.replica_count == 0).nonzero().tolist()
        if missing:
            layer, expert = missing[0]
            found.append(f"logical expert {expert} of layer {layer} has no replica")
        return found


def _device(placement: ExpertPlacement) -> torch.device:
    given = placement.physical_to_logical
    # Never the meta device: a model built under `torch.device("meta")` routes on the CPU
    # until its first forward moves the maps to the activations' device.
    if isinstance(given, torch.Tensor) and given.device.type != "meta":
        return given.device
    return torch.device("cpu")
