"""The server's life: loading → ready → draining → stopped.

The HTTP server listens before the model is loaded: the engine is built on a background thread
and every endpoint that needs it answers 503 until it is ready. On SIGTERM the server drains:
new requests get 503, in-flight ones may finish within the drain timeout, the rest are aborted
(their clients receive finish reason "abort"), then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from pegboard.core.async_engine import AsyncEngine
from pegboard.core.server.errors import APIError
from pegboard.core.server.limits import DEFAULT_MAX_REQUEST_BYTES
from pegboard.core.server.warmup import warm_up

log = logging.getLogger("pegboard.server")
#: How long shutdown waits for a model load in progress (then exits regardless).
LOAD_JOIN_TIMEOUT_S = 600.0


@dataclass
class ServerSettings:
    """What the HTTP layer needs besides the engine."""

    served_model_names: list[str] = field(default_factory=lambda: ["pegboard"])
    api_key: str | None = None
    admin_token: str | None = None
    drain_timeout: float = 30.0
    #: Seconds to wait for aborted responses to reach their clients after the drain timeout.
    abort_grace: float = 5.0
    #: Request bodies above this many bytes are a 413 (`--max-request-bytes`).
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: `sys.setswitchinterval` for the server process (`--switch-interval`); None: Python's.
    switch_interval: float | None = None
    #: Run a dummy request before /health answers 200 (`--skip-warmup` turns it off).
    warmup: bool = False


class ServerState:
    """The engine (once loaded), its load error, whether the server drains, and the number of
    HTTP requests in flight."""

    def __init__(
        self,
        settings: ServerSettings,
        engine_factory: Callable[[], AsyncEngine] | None = None,
        engine: AsyncEngine | None = None,
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.engine = engine
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._loader: threading.Thread | None = None  # the loading thread, while it exists
        if engine is not None:
            self.loaded.set()
        self.draining = False
        self.in_flight = 0
        #: Called on the loading thread with the load error (None on success).
        self.on_loaded: Callable[[BaseException | None], None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining and self.engine.error is None

    def start_loading(self) -> None:
        """Build the engine on a daemon thread (no-op when it was given ready-made)."""

        def load() -> None:
            try:
                engine = self.engine_factory()
                try:
                    if self.settings.warmup:
                        warm_up(engine)  # before /health answers 200
                except BaseException:
                    engine.shutdown()
                    raise
                self.engine = engine
                log.info("engine ready; serving %s", ", ".join(self.settings.served_model_names))
            except BaseException as e:  # reported through /health and the exit status
                log.exception("loading the engine failed")
                self.load_error = e
            self.loaded.set()
            if self.on_loaded is not None:
                self.on_loaded(self.load_error)

        if self.engine is None:
            self._loader = threading.Thread(target=load, name="pegboard-engine-load", daemon=True)
            self._loader.start()

    def require_engine(self) -> AsyncEngine:
        """The engine, or a 503 while it loads, after it failed, or while the server drains."""
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}")
        if self.engine is None:
            raise APIError(503, "the model is loading; retry when /health answers 200")
        if self.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.error}")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.served_model_names:
            served = ", ".join(self.settings.served_model_names)
            raise APIError(404, f"the model {name!r} does not exist; served: {served}", "model")

    @contextmanager
    def tracked(self):
        """Count an HTTP request as in flight (the drain waits for the count to reach 0)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self) -> None:
        """Refuse new requests, wait for in-flight ones up to the drain timeout, abort the rest."""
        self.draining = True
        timeout = self.settings.drain_timeout
        log.info("draining: %d request(s) in flight, up to %.1f s", self.in_flight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return
        except asyncio.TimeoutError:
            log.warning("drain timeout: aborting %d request(s)", self.in_flight)
        if self.engine is not None:
            self.engine.abort_all()
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.abort_grace)
        except asyncio.TimeoutError:
            log.error("%d request(s) still in flight after aborting", self.in_flight)

    def shutdown(self) -> None:
        # A process that exits while the loading thread is inside torch / safetensors code is
        # aborted by the C++ runtime (exit 134): let the load finish, then stop the engine.
        if self._loader is not None and self._loader.is_alive():
            log.info("waiting for the model load to finish before exiting")
            self._loader.join(LOAD_JOIN_TIMEOUT_S)
        if self.engine is not None:
            self.engine.shutdown()
