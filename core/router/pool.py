"""The workers behind the router: their health, their load, and removal of a dead one.

A background task checks every worker each `interval` seconds: `GET /health` (200: healthy)
and, for a worker that has it, `GET /load` (a pegboard server's open requests and tokens). A
worker that fails a check, or whose connection fails under a request, leaves the healthy set
at once (the routing policy is told, through `on_removed`) and rejoins when `/health` answers
200 again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pegboard.core.router.upstream import UpstreamClient, UpstreamError
from pegboard.sdk.routing import WorkerLoad

log = logging.getLogger("pegboard.router")


@dataclass
class Worker:
    """One upstream server and what the router knows about it."""

    url: str
    healthy: bool = False
    in_flight: int = 0
    reported_requests: int | None = None
    reported_tokens: int | None = None
    routed: int = 0
    failures: int = 0  # requests that found it dead (retried elsewhere)
    has_load_endpoint: bool = True

    def load(self) -> WorkerLoad:
        return WorkerLoad(self.url, self.in_flight, self.reported_requests, self.reported_tokens)

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "reported_requests": self.reported_requests,
            "reported_tokens": self.reported_tokens,
            "routed": self.routed,
            "failures": self.failures,
        }


class WorkerPool:
    """The router's workers. `min_ready`: how many must be healthy at once before the router
    first calls itself ready (`pegboard serve --dp-size N` waits for all N); afterwards one
    healthy worker is enough."""

    def __init__(
        self,
        urls: list[str],
        client: UpstreamClient,
        interval: float = 2.0,
        on_removed: Callable[[str], None] = lambda url: None,
        min_ready: int = 1,
    ) -> None:
        self.workers = {url: Worker(url) for url in urls}
        self.client = client
        self.interval = interval
        self.on_removed = on_removed
        self.min_ready = min(max(min_ready, 1), len(urls))
        self.became_ready = False

    @property
    def ready(self) -> bool:
        """Serving: `min_ready` workers were healthy at once some time, and one is now."""
        return self.became_ready and bool(self.healthy())

    def healthy(self, exclude: tuple[str, ...] | list[str] = ()) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy and w.url not in exclude]

    def remove(self, worker: Worker, reason: str) -> None:
        """Take `worker` out of the healthy set (until a health check finds it back)."""
        if worker.healthy:
            log.warning("worker %s removed: %s", worker.url, reason)
            worker.healthy = False
            self.on_removed(worker.url)

    async def check(self, worker: Worker) -> None:
        timeout = max(self.interval, 1.0)
        try:
            ok = (await self.client.get(worker.url, "/health", timeout))[0] == 200
        except UpstreamError as e:
            ok, reason = False, str(e)
        else:
            reason = "/health did not answer 200"
        if not ok:
            self.remove(worker, reason)
            return
        if not worker.healthy:
            log.info("worker %s is healthy", worker.url)
            worker.healthy = True
            self.became_ready = self.became_ready or len(self.healthy()) >= self.min_ready
        if worker.has_load_endpoint:
            await self._read_load(worker, timeout)

    async def _read_load(self, worker: Worker, timeout: float) -> None:
        try:
            status, body = await self.client.get(worker.url, "/load", timeout)
            data = json.loads(body) if status == 200 else None
        except (UpstreamError, ValueError):
            return  # the next /health check decides whether it is gone
        if status == 404:
            worker.has_load_endpoint = False  # not a pegboard server: the router's counts only
        elif isinstance(data, dict):
            worker.reported_requests = data.get("num_requests")
            worker.reported_tokens = data.get("num_tokens")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers.values()))

    async def run(self) -> None:
        """Check every worker now and then every `interval` seconds, until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)
