"""The router's HTTP/1.1 client to its workers: kept-alive connections on plain asyncio streams.

One idle list per worker; a request takes a connection (or opens one), writes the request,
reads the status line and headers, and hands back an `UpstreamResponse` whose body is read
whole (`read`) or passed on as it arrives (`chunks`: the de-chunked bytes, SSE events
untouched). A connection goes back to the idle list only when its response was read to the end.

`UpstreamError` is what the router retries on another worker: the connection could not be
made, or it closed before the response's status line. A kept-alive connection that the worker
closed while idle fails that way too; the request is written once more on a fresh connection
first (the worker never saw it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

#: Idle connections kept per worker.
MAX_IDLE = 256


class UpstreamError(ConnectionError):
    """The worker could not be reached, or its connection broke; the message says how."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """A worker's response: `status`, `headers` (names lower-cased) and the body, read with
    `read()` or `chunks()` exactly once; `close()` ends it early (the connection is dropped)."""

    def __init__(
        self,
        client: UpstreamClient,
        key: tuple[str, int],
        conn: Connection,
        status: int,
        headers: dict[str, str],
        head_request: bool,
        timeout: float,
    ) -> None:
        self._client, self._key, self._conn = client, key, conn
        self.status, self.headers, self.timeout = status, headers, timeout
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        if head_request or status in (204, 304):
            self._length: int | None = 0
        else:
            self._length = int(length) if length is not None and not self.chunked else None
        self._keep = headers.get("connection", "").lower() != "close"

    @property
    def media_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def streamed(self) -> bool:
        """A server-sent event stream (passed through as it comes)."""
        return (self.media_type or "").startswith("text/event-stream")

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def chunks(self, framed: bool = False) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; `UpstreamError` if the connection breaks first.

        `framed` (a chunked body only): the worker's chunk frames as they came, in whole frames,
        the last one (size 0) included — bytes a chunked response passes on unchanged."""
        reader, timeout = self._conn.reader, self.timeout
        complete = False
        try:
            if self._length is not None:
                left = self._length
                while left:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(min(left, 1 << 20))
                    if not data:
                        raise UpstreamError("the worker closed the connection mid-body")
                    left -= len(data)
                    yield data
            elif self.chunked:
                buffer = bytearray()
                while True:
                    # Every chunk already here goes out as one piece: one write downstream.
                    data, done = _dechunk(buffer, framed)
                    if data:
                        yield data
                    if done:
                        self._keep = self._keep and not buffer
                        break
                    async with asyncio.timeout(timeout):
                        more = await reader.read(1 << 16)
                    if not more:
                        raise UpstreamError("the worker closed the connection mid-body")
                    buffer += more
            else:  # the body ends when the connection does
                self._keep = False
                while True:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(1 << 16)
                    if not data:
                        break
                    yield data
            complete = True
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
            ValueError,
        ) as e:
            raise UpstreamError(f"the worker's response broke off: {type(e).__name__}: {e}") from e
        finally:
            self._finish(complete and self._keep)

    def close(self) -> None:
        self._finish(False)

    def _finish(self, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if reuse and conn.usable:
            self._client._release(self._key, conn)
        else:
            conn.close()


class UpstreamClient:
    """Kept-alive connections to the workers (see the module docstring). `timeout` bounds each
    wait for bytes from a worker (a request may set its own), `connect_timeout` each
    connection attempt."""

    def __init__(self, timeout: float = 600.0, connect_timeout: float = 5.0) -> None:
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._hosts: dict[str, tuple[tuple[str, int], str]] = {}

    def _target(self, base: str) -> tuple[tuple[str, int], str]:
        hit = self._hosts.get(base)
        if hit is None:
            parts = urlsplit(base)
            if parts.scheme != "http":
                raise UpstreamError(f"{base}: the router speaks plain http to its workers")
            key = (parts.hostname or "127.0.0.1", parts.port or 80)
            hit = self._hosts[base] = (key, parts.netloc)
        return hit

    async def request(
        self,
        base: str,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request to the worker at `base` (`http://host:port`); the response's
        status and headers are read, its body is left to the caller."""
        key, host = self._target(base)
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        timeout = timeout or self.timeout
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                try:
                    return await self._exchange(key, conn, data, method, timeout)
                except _Stale:
                    continue  # closed by the worker while idle: it never saw this request
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = Connection(*await asyncio.open_connection(*key))
        except (OSError, TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {base}: {type(e).__name__}: {e}") from e
        try:
            return await self._exchange(key, conn, data, method, timeout)
        except _Stale as e:
            raise UpstreamError(f"{base} closed the connection without a response") from e

    async def _exchange(self, key, conn: Connection, data: bytes, method: str, timeout: float):
        try:
            conn.writer.write(data)
            async with asyncio.timeout(timeout):
                await conn.writer.drain()
                head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            conn.close()
            if e.partial:
                raise UpstreamError("the worker closed the connection inside its headers") from e
            raise _Stale from e
        except ConnectionError as e:
            conn.close()
            raise _Stale from e
        except (TimeoutError, asyncio.LimitOverrunError) as e:
            conn.close()
            raise UpstreamError(f"no response head from the worker: {type(e).__name__}") from e
        except BaseException:  # cancelled: the connection is mid-request, not reusable
            conn.close()
            raise
        lines = head[:-4].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            conn.close()
            raise UpstreamError(f"malformed status line {lines[0][:80]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return UpstreamResponse(self, key, conn, status, headers, method == "HEAD", timeout)

    def _release(self, key: tuple[str, int], conn: Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE:
            idle.append(conn)
        else:
            conn.close()

    async def get(self, base: str, path: str, timeout: float | None = None) -> tuple[int, bytes]:
        """A whole GET: status and body."""
        r = await self.request(base, "GET", path, timeout=timeout)
        return r.status, await r.read()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)


def _dechunk(buffer: bytearray, framed: bool = False) -> tuple[bytes, bool]:
    """The data of the complete chunks at the start of `buffer` (removed from it; with `framed`
    the frames themselves), and whether the last chunk (size 0, and its trailers) was among
    them. `ValueError` on a bad size line."""
    parts, pos, done = [], 0, False
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(bytes(buffer[pos:eol]).split(b";", 1)[0], 16)
        start = eol + 2
        if size == 0:  # the last chunk; trailers, if any, end with an empty line
            if buffer[start : start + 2] == b"\r\n":
                end = start + 2
            else:
                trailers = buffer.find(b"\r\n\r\n", start)
                end = trailers + 4 if trailers >= 0 else -1
            if end > 0:
                pos, done = end, True
            break
        if len(buffer) < start + size + 2:
            break
        parts.append(bytes(buffer[start : start + size]))
        pos = start + size + 2
    data = bytes(buffer[:pos]) if framed else b"".join(parts)
    del buffer[:pos]
    return data, done


class _Stale(Exception):
    """The connection closed before any byte of the response."""
