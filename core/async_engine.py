"""The engine on a background thread, with an asyncio streaming interface for the server.

The step loop runs on its own thread; the engine's detokenizer (after each step, on a thread of
its own, or in a process of its own: `--detokenizer`) turns its token ids into text deltas and
hands them to the streams through `call_soon_threadsafe`; the event loop never waits on a step. Tokenization
happens in the caller (the server does it in a worker thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from pegboard.core.config import EngineConfig
from pegboard.core.engine import Engine
from pegboard.core.outputs import RequestOutput
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.watchdog import StepObservers, StepWatchdog
from pegboard.sdk.types import FinishReason, Request

log = logging.getLogger("pegboard.async_engine")


class _Stream:
    """One request's deltas on their way to its reader: a list and the future the reader
    awaits until they are worth reading (lighter than an `asyncio.Queue` per delta).

    With a stream interval of N > 1 the reader wakes for the first delta, then once N tokens
    arrived since it last read, and for the last delta (SGLang's `--stream-interval`)."""

    __slots__ = ("loop", "interval", "pending", "unread", "started", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: int = 1) -> None:
        self.loop = loop
        self.interval = interval
        self.pending: list[RequestOutput] = []
        self.unread = 0  # tokens in `pending`
        self.started = False  # the first delta was read
        self.waiter: asyncio.Future | None = None

    def ready(self) -> bool:
        if not self.pending or self.interval <= 1:
            return bool(self.pending)
        return not self.started or self.unread >= self.interval or self.pending[-1].finished

    def push(self, out: RequestOutput) -> None:  # on the loop's thread
        self.pending.append(out)
        self.unread += len(out.new_token_ids)
        waiter = self.waiter
        if waiter is not None and self.ready():
            self.waiter = None
            if not waiter.done():  # not cancelled with its reader
                waiter.set_result(None)

    async def next(self) -> RequestOutput:
        """Every delta that arrived since the last call, as one."""
        while not self.ready():
            self.waiter = self.loop.create_future()
            await self.waiter
        outs, self.pending, self.unread, self.started = self.pending, [], 0, True
        out = outs[0]
        for later in outs[1:]:
            if out.finished:
                break
            out.absorb(later)
        return out


def _push_all(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in batch:
        stream.push(out)


class AsyncEngine:
    """Run `Engine.step()` in a loop on a daemon thread; stream each request's deltas.

    `generate` yields `RequestOutput` deltas until one has `finished`. Cancelling the consuming
    task (a client disconnect) aborts the request and frees its KV at the next step.
    """

    def __init__(
        self, engine: Engine, watchdog_timeout: float | None = None, stream_interval: int = 1
    ) -> None:
        self.engine = engine
        #: A stream's reader wakes once this many tokens arrived (and for its first and last).
        self.stream_interval = stream_interval
        #: Around each step and between steps, on the loop thread (core/watchdog.py).
        self.observers = StepObservers()
        if watchdog_timeout is not None:
            self.observers.append(StepWatchdog(watchdog_timeout))
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pegboard-step-loop", daemon=True)
        self.error: BaseException | None = None
        #: Called once (on another thread) when the engine is lost for good while the step loop
        #: runs on: the detokenizer process died (the server then exits, as SGLang's does).
        self.on_fatal: Callable[[BaseException], None] | None = None
        engine.detokenizer.sink = self._deliver  # text deltas go straight to the streams
        engine.detokenizer.on_lost = self._detokenizer_lost  # `--detokenizer process`
        self._thread.start()

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        plugins: PluginManager | None = None,
        watchdog_timeout: float | None = None,
        stream_interval: int = 1,
    ) -> AsyncEngine:
        return cls(Engine(config, plugins), watchdog_timeout, stream_interval)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit `request` and yield its deltas; raises `RequestRejected` before streaming.

        Deltas that arrived while the caller was busy come as one (`RequestOutput.absorb`): a
        server streaming to hundreds of clients sends one event per client per wake-up, not
        one per engine step it fell behind."""
        stream = _Stream(asyncio.get_running_loop(), self.stream_interval)
        self._streams[request.request_id] = stream
        try:
            self.engine.add_request(request)
        except Exception:
            self._streams.pop(request.request_id, None)
            raise
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await stream.next()  # the reader fell behind: one delta for all it missed
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def swap(self, slot: str, name: str, **options: Any):
        future = self.engine.swap(slot, name, **options)
        self._wake.set()
        return future

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.observers.between_steps(self.engine)
            if not self.engine.has_work():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                with self.observers.step(self.engine):
                    self.engine.step()  # its deltas reach `_deliver` via the detokenizer
            except BaseException as e:  # the engine itself is broken: fail every stream
                log.exception("engine step failed")
                self.error = e
                self._fail_all(e)
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand text deltas to their streams (called on the detokenizer's thread): one
        `call_soon_threadsafe` per event loop and step, not one per delta (each one writes to
        the loop's self-pipe)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                batch = batches.get(stream.loop)
                if batch is None:
                    batch = batches[stream.loop] = []
                batch.append((stream, out))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_push_all, batch)

    def _detokenizer_lost(self, error: BaseException) -> None:
        """The detokenizer process died: its requests were failed with `error`, which new
        ones get too; the server stops (`on_fatal`)."""
        self.error = error
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _fail_all(
        self, error: BaseException | None, reason: FinishReason = FinishReason.ERROR
    ) -> None:
        """End every open stream with a final delta (the step loop is gone)."""
        for request_id, stream in list(self._streams.items()):
            out = RequestOutput(
                request_id, finished=True, finish_reason=reason, error=error and str(error)
            )
            stream.loop.call_soon_threadsafe(stream.push, out)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the step loop; streams still open end with finish reason `abort`."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._fail_all(None, FinishReason.ABORT)
        self.engine.close()
