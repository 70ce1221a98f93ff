"""The control connection between a decode engine and a prefill engine: JSON lines over TCP.

The decode engine connects to the prefill engine's bootstrap port (one connection per pair of
engines, shared by all their requests), introduces itself (`hello`: its transfer descriptor
and KV layout) and registers each request's pages (`register`); the prefill engine answers
`done` (with the first token) or `failed` per request. Both sides send `ping` every heartbeat
interval and answer `pong` from the reader thread, so a long engine step never looks like a
dead peer; a peer silent for `HEARTBEAT_MISSES` intervals, or a closed socket, closes the
channel, and the engine fails that channel's requests.

Threads only read, answer pings and queue `(kind, channel, message)` events; the engine's step
loop applies them (`PrefillSide.step` / `DecodeSide.step`), so session state has one writer.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pegboard.disaggregation")

#: Heartbeat intervals a peer may stay silent before it is declared dead.
HEARTBEAT_MISSES = 3

Event = tuple[str, Any, dict[str, Any]]


class Channel:
    """One control connection. `send` is thread-safe; `close` happens once and queues a
    `closed` event with the reason."""

    def __init__(self, sock: socket.socket, address: str, events: queue.SimpleQueue) -> None:
        self.sock = sock
        self.address = address  # the prefill engine's HOST:PORT, or the decode peer's
        self.peer = ""  # the peer engine's id, once it introduced itself
        self.ready = False
        self.layout: Any = None  # the decode peer's `PoolLayout`, once it said hello
        self.closed = False
        self.last_seen = time.monotonic()
        self._events = events
        self._send_lock = threading.Lock()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self._reader = threading.Thread(
            target=self._read, name=f"pegboard-pd-{address}", daemon=True
        )
        self._reader.start()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as e:
            self.close(f"sending failed: {e}")

    def close(self, reason: str) -> None:
        with self._send_lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._events.put(("closed", self, {"reason": reason}))

    def _read(self) -> None:
        reason = "the peer closed the connection"
        try:
            for line in self.sock.makefile("rb"):
                self.last_seen = time.monotonic()
                message = json.loads(line)
                op = message.get("op")
                if op == "ping":
                    self.send({"op": "pong"})
                elif op != "pong":
                    self._events.put((op, self, message))
        except (OSError, ValueError) as e:
            reason = f"connection lost: {e}"
        self.close(reason)


class Heartbeats:
    """Pings every channel each `interval` seconds, closes silent ones, and queues a `tick`
    event so the step loop checks its sessions' deadlines even when it has nothing else to do."""

    def __init__(
        self, channels: Callable[[], list[Channel]], events: queue.SimpleQueue, interval: float
    ) -> None:
        self._channels = channels
        self._events = events
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pegboard-pd-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            for ch in self._channels():
                silent = now - ch.last_seen
                if silent > HEARTBEAT_MISSES * self.interval:
                    ch.close(f"no heartbeat for {silent:.1f} s")
                else:
                    ch.send({"op": "ping"})
            self._events.put(("tick", None, {}))

    def stop(self) -> None:
        self._stop.set()


class BootstrapServer:
    """The prefill engine's listener on `--disaggregation-bootstrap-port`: each accepted
    connection becomes a `Channel`."""

    def __init__(self, host: str, port: int, events: queue.SimpleQueue) -> None:
        self.events = events
        self.channels: list[Channel] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise OSError(
                f"cannot listen for decode engines on bootstrap port {host}:{port}: "
                f"{e.strerror or e} (--disaggregation-bootstrap-port)"
            ) from e
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept, name="pegboard-pd-bootstrap", daemon=True
        )
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, (host, port) = self._sock.accept()
            except OSError:
                return
            self.channels = [c for c in self.channels if not c.closed]
            self.channels.append(Channel(sock, f"{host}:{port}", self.events))

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for ch in list(self.channels):
            ch.close("the prefill engine is shutting down")


def open_channel(host: str, port: int, events: queue.SimpleQueue, timeout: float) -> None:
    """Connect to a prefill engine's bootstrap server on a thread; queues `connected` (with the
    channel) or `unreachable` (with the error)."""
    address = f"{host}:{port}"

    def connect() -> None:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            events.put(("unreachable", address, {"error": e.strerror or str(e)}))
            return
        events.put(("connected", Channel(sock, address, events), {}))

    threading.Thread(target=connect, name=f"pegboard-pd-connect-{address}", daemon=True).start()
