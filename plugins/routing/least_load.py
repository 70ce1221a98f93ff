"""Least load: the worker with the fewest open requests, then the fewest tokens in flight."""

from __future__ import annotations

from pegboard.sdk.routing import RouteRequest, WorkerLoad
from pegboard.sdk.slots import Router


class LeastLoadRouter(Router):
    """The worker with the smallest load: open requests (the larger of the router's own count
    and the worker's report), then the tokens the worker reports in flight; ties go to the
    first listed."""

    name = "least_load"

    def route(self, request: RouteRequest, workers: list[WorkerLoad]) -> str:
        return min(workers, key=lambda w: (w.requests, w.tokens)).url
