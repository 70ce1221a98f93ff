"""A quick process exit: no garbage collection over the whole heap at interpreter shutdown.

At exit, CPython runs the cyclic garbage collector over every object still alive: for a
`pegboard serve` process (torch, transformers, fastapi and their modules) that took 5-10 s on a
busy 2-core machine after the server had already finished, and every test that stops a server
waited for it. Freezing the heap as the last exit handler (`gc.freeze`) moves those objects out
of the collector's reach; the process still runs every exit handler, closes its files and
flushes its logs, but no longer walks the heap it is about to drop.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_final_collection() -> None:
    """Freeze the heap after the other exit handlers (registered first, so it runs last)."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
