"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from types import FrameType

import uvicorn
from pegboard.core.server.app import create_app
from pegboard.core.server.lifecycle import ServerState
from pegboard.core.watchdog import WATCHDOG_EXIT_STATUS

#: Exit status of a server whose engine was lost while serving (its detokenizer process died):
#: the watchdog's, so a supervisor restarts both the same way.
ENGINE_LOST_EXIT_STATUS = WATCHDOG_EXIT_STATUS

log = logging.getLogger("pegboard.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM or SIGINT drains the engine before
    uvicorn shuts down (and the process exits 0); a second one exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recording the signal: uvicorn would re-raise it after shutdown (exit status -15).
        if self._loop is None or self._drain is not None or self.state.draining:
            self.should_exit = self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain()
        finally:
            self.should_exit = True


def run_server(
    state: ServerState,
    host: str,
    port: int,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> int:
    """Serve until drained (on `sock` when given, already bound); returns the exit status
    (1 if the model failed to load, 3 if the engine was lost while serving)."""
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=max(int(state.settings.abort_grace), 1),
    )
    server = DrainingServer(config, state)
    if state.settings.switch_interval is not None:  # the step loop vs the HTTP thread's GIL
        sys.setswitchinterval(state.settings.switch_interval)
    lost: list[BaseException] = []

    def engine_lost(error: BaseException) -> None:
        # The engine cannot serve any more (its detokenizer process died): its requests got
        # the error; exit for a supervisor to restart the server, as SGLang does.
        log.critical("%s; stopping the server (exit status %d)", error, ENGINE_LOST_EXIT_STATUS)
        lost.append(error)
        server.should_exit = True

    def loaded(error: BaseException | None) -> None:
        if error is not None:
            server.should_exit = True  # polled by uvicorn's main loop
        else:
            state.engine.on_fatal = engine_lost

    state.on_loaded = loaded
    server.run(sockets=[sock] if sock is not None else None)
    if lost:
        return ENGINE_LOST_EXIT_STATUS
    return 1 if state.load_error is not None else 0
