"""Round robin: each request to the next worker in turn."""

from __future__ import annotations

from pegboard.sdk.routing import RouteRequest, WorkerLoad
from pegboard.sdk.slots import Router


class RoundRobinRouter(Router):
    """Workers in turn, in the order the router lists them; a worker that left is skipped
    (the turn counts over the workers offered to each call)."""

    name = "round_robin"
    _next = 0

    def route(self, request: RouteRequest, workers: list[WorkerLoad]) -> str:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker.url
