"""The heap built at start-up, out of the garbage collector's reach (`gc.freeze`), as vLLM and
SGLang do once their model is loaded and their CUDA graphs are captured.

An engine's start-up leaves a few hundred thousand long-lived objects (torch, transformers,
the model's modules, the tokenizer, the plugin registry); a full (generation 2) collection
walks all of them, ~250 ms of CPU time on the team's CPU, and when one falls inside the step
loop that step stalls for as long. Frozen, they move to the permanent generation, which no
collection scans; reference counting still frees them. `unfreeze_heap` gives them back to the
collector (an engine's `close`), so an engine closed in a long-lived process (tests, swaps,
benchmarks) can still be collected.
"""

from __future__ import annotations

import gc


def freeze_heap(enabled: bool) -> int:
    """Collect once (start-up's garbage is not kept forever), then freeze what is alive;
    return the number of frozen objects (0 when not `enabled`). An earlier freeze is undone
    first, so an engine closed without `close` and unreachable is collected here."""
    if not enabled:
        return 0
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_heap(enabled: bool) -> None:
    """Give the frozen objects back to the collector (a closed engine's cycles included)."""
    if enabled:
        gc.unfreeze()
