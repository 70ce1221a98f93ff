"""First come, first served: the default scheduling policy."""

from __future__ import annotations

from pegboard.sdk.scheduling import PolicyScheduler


class FCFSScheduler(PolicyScheduler):
    """Requests run in arrival order (`request.seq`); a waiting request that does not fit
    blocks the ones behind it, so no request is overtaken. Under KV pressure the most recently
    arrived running request is preempted first (least important first if priorities differ).
    Options: those of every policy (`PolicyOptions`).
    """

    name = "fcfs"
