"""Runtime plugin swaps, applied at step boundaries (DESIGN.md §3).

`Engine.swap` validates the name and options at once (so a typo fails fast) and queues a
`PendingSwap`; the engine applies it at the next step boundary. A plugin whose `handoff` is
"drain" is only replaced once the running requests have finished (the engine admits no new
ones meanwhile). Setting up the successor happens before the old plugin is unregistered, so a
successor that raises leaves the old one serving.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from pegboard.sdk.slots import Plugin


class SwapError(Exception):
    """A swap could not be applied; the previous plugin stays active."""


@dataclass
class SwapResult:
    """The outcome of a swap: which plugin serves the slot now and what happened."""

    slot: str
    previous: str | None
    active: str
    drained: bool = False
    step: int | None = None  # the engine step at whose boundary it took effect

    def __str__(self) -> str:
        how = " after draining the running requests" if self.drained else ""
        return f"swapped {self.slot}: {self.previous!r} -> {self.active!r} at step {self.step}{how}"


@dataclass
class PendingSwap:
    slot: str
    plugin: Plugin
    future: Future = field(default_factory=Future)
