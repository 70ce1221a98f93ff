"""Running the router under uvicorn: standalone (`pegboard router`) or in front of engine
replicas this process started (`pegboard serve --dp-size N`, `replicas.py`)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable
from types import FrameType

import uvicorn
from pegboard.core.router.app import RouterSettings, create_router_app

log = logging.getLogger("pegboard.router")


class _RouterServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM / SIGINT ends it with status 0 (uvicorn re-raises
    a captured signal after shutdown, which would make the exit status -15); a second one
    exits at once."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.force_exit = self.should_exit
        self.should_exit = True


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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=log_level == "debug"
    )
    server = _RouterServer(config)
    status = [0]

    async def main() -> None:
        watch = None
        if children:
            watch = asyncio.create_task(
                _watch(children, app.state.pool, server, status.__setitem__)
            )
        try:
            await server.serve()
        finally:
            if watch is not None:
                watch.cancel()

    asyncio.run(main())
    return status[0]


async def _watch(
    children: list[subprocess.Popen], pool, server: uvicorn.Server, set_status: Callable
) -> None:
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
            set_status(0, 1)
            server.should_exit = True
            return
        await asyncio.sleep(0.5)
