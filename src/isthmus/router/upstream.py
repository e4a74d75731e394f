"""The router's data path to replicas and peer routers: a small pooled HTTP/1.1 client.

Built on asyncio protocols with ``httptools`` (llhttp) parsing the responses, so a relayed stream costs
one read and one callback per upstream segment: no per-chunk task switch, no header multidict, no
timer object per read. It does only what the router needs: ``POST`` with a body in memory and ``GET``,
keep-alive pooling per origin, and the three timeouts of :class:`~isthmus.router.config.TimeoutsConfig`.
The data path and the collectors (scrapes, probes, peer polls) use pools of their own, so a
saturated data path cannot delay a probe.

Contract:

- :meth:`UpstreamPool.request` writes the request in one ``write`` and returns once the response's
  status line and headers arrived. A pooled (reused) connection that the server had closed before
  any byte of the answer came is replaced by a fresh one once, transparently: keep-alive races
  never count as a backend failure.
- :meth:`UpstreamResponse.read` returns the body bytes buffered so far (at least one byte), or
  ``b""`` at the end of the body; it waits at most ``idle_s`` for data, and never past the exchange's
  ``total_s`` deadline.
- A connection goes back to the pool only after a complete response that allows keep-alive
  (:meth:`UpstreamResponse.release`); anything else closes it. A consumer that falls behind pauses
  reading from the upstream socket (flow control) past ``_HIGH_WATER`` buffered bytes.

Errors are :class:`UpstreamError` subclasses whose ``kind`` is the router's failure vocabulary:
``connect``, ``connect_timeout``, ``stall`` and ``broken``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 1 << 20  # buffered body bytes at which reading from the upstream socket pauses
_LOW_WATER = 1 << 18


class UpstreamError(Exception):
    """An upstream exchange failed. ``kind``: ``connect``, ``connect_timeout``, ``stall`` or ``broken``."""

    kind = "broken"


class UpstreamConnectError(UpstreamError):
    """The connection was refused or could not be opened."""

    kind = "connect"


class UpstreamConnectTimeout(UpstreamError):
    """Opening the connection took longer than the connect timeout."""

    kind = "connect_timeout"


class UpstreamTimeout(UpstreamError):
    """No data within the idle timeout, or the exchange passed its total deadline."""

    kind = "stall"


class UpstreamBroken(UpstreamError):
    """The connection closed or sent something that is not HTTP before the response was complete."""

    kind = "broken"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests to one base URL go.

    Attributes:
        host, port: the TCP endpoint.
        host_header: the ``Host`` header value (``host[:port]`` as in the URL).
        base_path: the URL's path prefix without a trailing slash (``""`` for none), put before
            every request path.
    """

    host: str
    port: int
    host_header: bytes
    base_path: bytes

    @classmethod
    def from_url(cls, url: str) -> Origin:
        """The origin of an ``http://`` base URL.

        Raises:
            ValueError: not an ``http`` URL with a host (``https`` is not supported on the data path).
        """
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http://host[:port] URL, got {url!r}")
        port = parts.port or 80
        return cls(parts.hostname, port, parts.netloc.encode("idna"), parts.path.rstrip("/").encode())


@functools.lru_cache(maxsize=4096)
def origin_of(url: str) -> Origin:
    """:meth:`Origin.from_url`, remembered (replica and peer URLs recur on every request and probe)."""
    return Origin.from_url(url)


class _Connection(asyncio.Protocol):
    """One upstream TCP connection and the response in progress on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.wait_until = 0.0  # loop time at which the current wait times out
        self.timer: asyncio.TimerHandle | None = None
        # piping (UpstreamResponse.pipe): each segment's body bytes go straight to ``sink``, each
        # segment pushing the idle timeout forward, never past ``pipe_until`` (loop time)
        self.sink: Callable[[bytes], object] | None = None
        self.piped: list[bytes] = []  # body parts of the segment being parsed, for the sink
        self.pipe_idle_s = 0.0
        self.pipe_until = 0.0
        # UpstreamPool.request's ``on_head``, called with ``response`` when the head is in
        self.on_head: Callable[[UpstreamResponse], Callable[[bytes], object] | None] | None = None
        self.response: UpstreamResponse | None = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"malformed HTTP response: {exc}"))
        piped = self.piped
        if piped:  # what this segment held for the sink goes on in one piece (one write downstream)
            sink = self.sink
            out = piped[0] if len(piped) == 1 else b"".join(piped)
            piped.clear()
            if sink is not None:
                until = self.loop.time() + self.pipe_idle_s
                self.wait_until = until if until < self.pipe_until else self.pipe_until
                try:
                    sink(out)
                except Exception as exc:  # the consumer's bug: this exchange fails, the loop goes on
                    self._fail(UpstreamBroken(f"the body's consumer failed: {exc!r}"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete or self.error is not None:
            return
        if self.headers_done and self._until_close():
            self.complete = True  # a body delimited by the end of the connection
            self._wake()
        else:
            self._fail(UpstreamBroken("connection closed before the response was complete"))

    # ------------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = status = self.parser.get_status_code()
        self.headers_done = True
        hook, resp = self.on_head, self.response
        if hook is not None and resp is not None:
            self.on_head = self.response = None
            resp.status = status
            self.sink = hook(resp)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.piped.append(body)  # passed on once the segment is parsed
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # ------------------------------------------------------------------ helpers
    def _until_close(self) -> bool:
        for name, value in self.headers:
            low = name.lower()
            if low == b"content-length" or (low == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until the next parser event or the connection's end; :class:`UpstreamTimeout` after ``timeout_s``.

        One timer per connection, re-armed only when it fires early: a stream's many short waits
        cost no timer objects.
        """
        if timeout_s <= 0:
            raise UpstreamTimeout("the upstream exchange ran out of time")
        loop = self.loop
        waiter = loop.create_future()
        self.waiter = waiter
        self.wait_until = loop.time() + timeout_s
        timer = self.timer
        if timer is None or timer.when() > self.wait_until:  # none, or set for a later instant
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(self.wait_until, self._on_timer)
        try:
            await waiter
        finally:
            self.waiter = None

    def _on_timer(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.loop.time() >= self.wait_until:
            waiter.set_exception(UpstreamTimeout("no data from upstream in time"))
        else:  # the wait it was set for ended; a later one is still running
            self.timer = self.loop.call_at(self.wait_until, self._on_timer)

    def take(self) -> bytes:
        """Every buffered body byte (resumes reading if flow control had paused it)."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.cancel_timer()
        self.sink = self.on_head = self.response = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class UpstreamResponse:
    """One upstream response: status and headers at once, the body as it arrives.

    Attributes:
        status: the HTTP status code.
        headers: the header fields as received (names as sent; use :meth:`header` to look one up).
    """

    __slots__ = ("_clock", "_conn", "_deadline", "_done", "_idle_s", "_key", "_pool", "headers", "status")

    def __init__(self, conn: _Connection, pool: UpstreamPool, key: tuple[str, int], idle_s: float,
                 deadline: float, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._pool = pool
        self._key = key
        self._idle_s = idle_s
        self._deadline = deadline
        self._clock = clock
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    def header(self, name: bytes, default: str = "") -> str:
        """The value of header ``name`` (lower case), as latin-1 text; ``default`` when absent."""
        for k, v in self.headers:
            if k.lower() == name:
                return v.decode("latin-1")
        return default

    def at_eof(self) -> bool:
        """Whether the body is complete and fully read."""
        return self._conn.complete and not self._conn.chunks

    async def read(self) -> bytes:
        """The body bytes buffered now, waiting for some if none are; ``b""`` at the end of the body.

        Raises:
            UpstreamTimeout: nothing came within the idle timeout, or the total deadline passed.
            UpstreamBroken: the connection broke off or the response is malformed.
        """
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return b""
            await conn.wait(min(self._idle_s, self._deadline - self._clock()))

    async def pipe(self, sink: Callable[[bytes], object]) -> None:
        """Hand the rest of the body to ``sink`` as it arrives, the body bytes of each segment read off
        the socket in one call (from the protocol's callback: no task wakes per chunk); returns at the
        end of the body.

        Raises:
            UpstreamTimeout, UpstreamBroken: as :meth:`read`; what ``sink`` got until then stays sent.
        """
        conn = self._conn
        if conn.chunks:
            sink(conn.take())
        if conn.error is not None:
            raise conn.error
        if conn.complete:
            return
        left = self._deadline - self._clock()
        conn.pipe_idle_s = self._idle_s
        conn.pipe_until = conn.loop.time() + left
        conn.sink = sink
        try:
            while True:
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    return
                await conn.wait(min(self._idle_s, self._deadline - self._clock()))
        finally:
            conn.sink = None

    def pause_reading(self) -> None:
        """Stop reading the body off the socket (the consumer is behind)."""
        conn = self._conn
        if not conn.paused and conn.transport is not None and not conn.closed:
            conn.paused = True
            conn.transport.pause_reading()

    def resume_reading(self) -> None:
        conn = self._conn
        if conn.paused and conn.transport is not None and not conn.closed:
            conn.paused = False
            conn.transport.resume_reading()

    async def read_all(self, limit: int) -> bytes:
        """The whole body.

        Raises:
            ValueError: the body is longer than ``limit`` bytes.
            UpstreamTimeout, UpstreamBroken: as :meth:`read`.
        """
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if size > limit:
                raise ValueError(f"body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Hand the connection back (kept for reuse only after a complete keep-alive response). Idempotent."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.sink = None
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None and not conn.chunks:
            self._pool._put(self._key, conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections per upstream ``(host, port)``.

    Args:
        keepalive_s: an idle connection older than this is closed instead of reused.
        max_idle_per_origin: idle connections kept per origin; more are closed.
        clock: monotonic seconds.
    """

    def __init__(self, *, keepalive_s: float = 30.0, max_idle_per_origin: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keepalive_s = keepalive_s
        self.max_idle_per_origin = max_idle_per_origin
        self.clock = clock
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._closed = False

    async def request(self, origin: Origin, path: bytes, head: bytes, body: bytes, *, connect_s: float,
                      idle_s: float, total_s: float, method: bytes = b"POST",
                      on_head: Callable[[UpstreamResponse], Callable[[bytes], object] | None] | None = None,
                      ) -> UpstreamResponse:
        """``POST origin.base_path + path`` with the header lines ``head`` (each ending in CRLF, no
        ``Host`` or ``Content-Length``) and ``body``; returns at the end of the response headers.
        ``method=b"GET"`` sends no body (``body`` must be empty).

        Args:
            connect_s: longest wait to open a connection.
            idle_s: longest silence before the headers and between body reads.
            total_s: deadline of the whole exchange, body included, from now.
            on_head: called with the response from the connection's callback as soon as its head is
                in, before this returns; a sink it returns gets the body from then on, as
                :meth:`UpstreamResponse.pipe` has it (the caller then reads the rest with ``pipe``
                of that same sink, not ``read``): a body that follows its head in the same segment
                is passed on without waiting for this coroutine to resume.

        Raises:
            UpstreamConnectError, UpstreamConnectTimeout, UpstreamTimeout, UpstreamBroken.
        """
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        deadline = self.clock() + total_s
        length = b"content-length: %d\r\n" % len(body) if body or method != b"GET" else b""
        message = b"".join((method, b" ", origin.base_path, path, b" HTTP/1.1\r\nhost: ", origin.host_header,
                            b"\r\n", head, length, b"\r\n", body))
        key = (origin.host, origin.port)
        while True:
            conn = self._get(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_s)
            assert conn.transport is not None
            resp = UpstreamResponse(conn, self, key, idle_s, deadline, self.clock)
            if on_head is not None:
                conn.on_head, conn.response = on_head, resp
                conn.pipe_idle_s = idle_s
                conn.pipe_until = conn.loop.time() + total_s
            conn.transport.write(message)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(min(idle_s, deadline - self.clock()))
            except UpstreamBroken:
                conn.close()
                if reused and not conn.received:
                    continue  # the server had closed this idle connection: once more on a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            resp.status = conn.status
            return resp

    async def _connect(self, origin: Origin, connect_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_s):
                transport, conn = await loop.create_connection(lambda: _Connection(loop), origin.host, origin.port)
        except TimeoutError:
            raise UpstreamConnectTimeout(f"connect to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {origin.host}:{origin.port}: "
                                       f"{exc.strerror or type(exc).__name__}") from None
        conn.transport = transport  # uvloop calls connection_made only on the next loop turn
        return conn

    def _get(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_ok = self.clock() - self.keepalive_s
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
            if conn.closed or conn.idle_since < oldest_ok or conn.received:  # received: sent something while idle
                conn.close()
                continue
            return conn  # (reset when it was put back, off the next request's way)
        return None

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.idle_since = self.clock()
        conn.cancel_timer()
        conn._reset()
        idle.append(conn)

    def idle_connections(self) -> int:
        """Idle pooled connections, all origins (closed ones not yet dropped included)."""
        return sum(len(d) for d in self._idle.values())

    def close(self) -> None:
        """Close every idle connection and refuse new requests."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


__all__ = [
    "Origin", "UpstreamBroken", "UpstreamConnectError", "UpstreamConnectTimeout", "UpstreamError",
    "UpstreamPool", "UpstreamResponse", "UpstreamTimeout", "origin_of",
]
