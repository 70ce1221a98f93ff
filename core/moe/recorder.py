"""The expert-load recorder: how many tokens each sparse layer routed to each logical expert,
and to each physical slot (which rank computed them).

Two counters on the model's device, `[layers, experts]` and `[layers, slots]`; each MoE layer
adds its routed experts and their slots with one `index_add_` each (no host sync). At each step
boundary the counters become one row of a ring of recent passes (SGLang's recorder modes):

- `stat`: the load is the sum over a sliding window of the last `window` passes;
- `per_pass`: the same ring, and `passes()` returns each pass's histogram (for dumps).

Under expert parallelism every rank routes every token (the hidden states are replicated after
the attention's all-reduce), so rank 0's counts are the whole group's: the slot counts give each
rank's tokens without a collective. Only `load()` / `slot_load()` (at a rebalance, every N
steps) copy to the host.
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
        num_slots: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"expert distribution recorder mode {mode!r}; choose {MODES}")
        self.mode = mode
        self.window = window
        self.num_experts = num_experts
        slots = num_slots or num_experts
        # One buffer, logical experts then physical slots, so a pass is one copy.
        self.current = torch.zeros(
            num_layers, num_experts + slots, dtype=torch.int64, device=device
        )
        self.ring = torch.zeros(window, *self.current.shape, dtype=torch.int64, device=device)
        self.position = 0
        self.passes_seen = 0

    def record(self, layer: int, experts: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Count one layer's routed logical experts `[T, k]` and, when given, the physical slots
        they went to (called in the layer's forward)."""
        flat = experts.reshape(-1)
        ones = torch.ones_like(flat)
        self.current[layer].index_add_(0, flat, ones)
        if slots is not None:
            self.current[layer].index_add_(0, slots.reshape(-1) + self.num_experts, ones)

    def end_pass(self) -> None:
        """Close the current forward pass: its counts enter the ring (device-side copy)."""
        self.ring[self.position].copy_(self.current)
        self.current.zero_()
        self.position = (self.position + 1) % self.window
        self.passes_seen += 1

    def _window(self) -> torch.Tensor:
        return (self.ring.sum(dim=0) + self.current).double().cpu()

    def load(self) -> torch.Tensor:
        """The window's load `[layers, experts]` as float64 on the CPU (one host copy)."""
        return self._window()[:, : self.num_experts]

    def slot_load(self) -> torch.Tensor:
        """The window's tokens per physical slot `[layers, slots]` (float64, CPU)."""
        return self._window()[:, self.num_experts :]

    def passes(self) -> list[torch.Tensor]:
        """The recorded passes' logical expert loads, oldest first (`per_pass` mode)."""
        count = min(self.passes_seen, self.window)
        order = [(self.position - count + i) % self.window for i in range(count)]
        return [self.ring[i, :, : self.num_experts].cpu() for i in order]
