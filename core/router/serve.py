"""Running the router: standalone (`pegboard router`, `pegboard router --pd`) or in front of
engine replicas this process started (`pegboard serve --dp-size N`, `replicas.py`)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable

from pegboard.core.router.app import RouterApp, RouterSettings, create_router_app
from pegboard.core.router.http import run_http

log = logging.getLogger("pegboard.router")


def run_router(
    settings: RouterSettings,
    host: str,
    port: int,
    log_level: str = "info",
    children: list[subprocess.Popen] | None = None,
) -> int:
    """Serve until SIGTERM / SIGINT (exit 0). With `children` (the replicas), also stop when
    one exits before all were ready, or when all have exited (exit 1)."""
    app = create_router_app(settings)  # a bad policy or option fails here, before binding
    return serve_app(app, host, port, children)


def serve_app(
    app: RouterApp, host: str, port: int, children: list[subprocess.Popen] | None = None
) -> int:
    watch = None
    if children:
        pool = app.proxies[0].pool

        async def watch(stop: Callable[[int], None]) -> None:
            await _watch(children, pool, stop)

    return run_http(app.handle, host, port, app.startup, app.shutdown, watch)


async def _watch(children: list[subprocess.Popen], pool, stop: Callable[[int], None]) -> None:
    """Stop the router when a replica dies before the pool was ever ready (it will not come
    up: a bad flag, a model that does not load) or when every replica has exited."""
    reported: set[int] = set()
    while True:
        exited = [c for c in children if c.poll() is not None]
        for c in exited:
            if c.pid not in reported:
                reported.add(c.pid)
                log.warning("replica pid %d exited with status %s", c.pid, c.returncode)
        if (exited and not pool.became_ready) or len(exited) == len(children):
            stop(1)
            return
        await asyncio.sleep(0.5)
