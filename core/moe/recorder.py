"""The expert-load recorder: how many tokens each sparse layer routed to each logical expert.

One `[layers, experts]` counter on the model's device; each MoE layer adds its routed experts
with one `index_add_` (no host sync). At each step boundary the counter becomes one row of a
ring of recent passes (SGLang's recorder modes):

- `stat`: the load is the sum over a sliding window of the last `window` passes;
- `per_pass`: the same ring, and `passes()` returns each pass's histogram (for dumps).

Only `load()` (at a rebalance, every N steps) copies to the host.
"""

from __future__ import annotations

from typing import Literal

import torch

MODES = ("stat", "per_pass")


class ExpertLoadRecorder:
    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        device: torch.device,
        mode: Literal["stat", "per_pass"] = "stat",
        window: int = 1000,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"expert distribution recorder mode {mode!r}; choose {MODES}")
        self.mode = mode
        self.window = window
        self.current = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.ring = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)
        self.position = 0
        self.passes_seen = 0

    def record(self, layer: int, experts: torch.Tensor) -> None:
        """Count one layer's routed logical experts `[T, k]` (called in the layer's forward)."""
        flat = experts.reshape(-1)
        self.current[layer].index_add_(0, flat, torch.ones_like(flat))

    def end_pass(self) -> None:
        """Close the current forward pass: its counts enter the ring (device-side copy)."""
        self.ring[self.position].copy_(self.current)
        self.current.zero_()
        self.position = (self.position + 1) % self.window
        self.passes_seen += 1

    def load(self) -> torch.Tensor:
        """The window's load `[layers, experts]` as float64 on the CPU (one host copy)."""
        return (self.ring.sum(dim=0) + self.current).double().cpu()

    def passes(self) -> list[torch.Tensor]:
        """The recorded passes, oldest first (`per_pass` mode)."""
        count = min(self.passes_seen, self.window)
        order = [(self.position - count + i) % self.window for i in range(count)]
        return [self.ring[i].cpu() for i in order]
