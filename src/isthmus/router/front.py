"""The router's HTTP/1.1 server: asyncio protocols around httptools' parser, serving an ASGI application.

A proxy hop costs what its server does per request and per relayed chunk, so the router serves
its own connections instead of going through uvicorn (``benchmarks/router_overhead.py``:
``docs/benchmarks.md`` has the comparison). It serves exactly what the router needs, nothing more:

- HTTP/1.1 and 1.0, keep-alive (closed after ``keep_alive_s`` idle), pipelined requests answered in
  order (one runs at a time; reading pauses while the next one waits);
- an exchange starts in the callback that parsed its request (:func:`eager_task`): the
  application's work up to its first wait runs at once, not behind every other ready callback;
- request bodies streamed to the application as they arrive (``Transfer-Encoding: chunked`` too),
  with ``Expect: 100-continue`` answered when the application first asks for the body, and reading
  paused while more than ``_BODY_BUFFER`` bytes wait for it;
- responses framed by ``Content-Length`` when the application gives one, else chunked (HTTP/1.1)
  or delimited by closing the connection (HTTP/1.0); the status line and headers leave with the
  first body bytes, in one write; a ``Date`` field is added;
- write flow control: an application writing faster than the client reads waits in ``send``;
- a client that goes away: ``receive`` answers ``http.disconnect`` at once;
- the ASGI lifespan protocol, graceful shutdown (stop accepting, finish in-flight exchanges for up
  to ``drain_s``, close idle keep-alive connections at once, then cancel what is left);
- malformed requests get a 400 (oversized heads a 431) with an OpenAI-style JSON body, and the
  connection closes. No TLS, WebSocket or HTTP/2: a terminator in front does those.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, MutableMapping
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

import httptools

from isthmus.router.errors import error_body

log = logging.getLogger("isthmus.router")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
_T = TypeVar("_T")
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

# scope["extensions"][DISCONNECT_EXTENSION](callback): ``callback()`` runs once if the client goes away
# before the response is complete (an application may then skip a task that waits for
# ``http.disconnect``)
DISCONNECT_EXTENSION = "isthmus.on_disconnect"
# scope["extensions"][PIPE_EXTENSION]: a :class:`BodyPipe` on which an application may start its
# response and write body bytes synchronously (a relay piping upstream chunks from a protocol
# callback), watching ``paused`` for back pressure; it ends the body with an ordinary
# ``http.response.body`` message
PIPE_EXTENSION = "isthmus.body_pipe"
_BODY_BUFFER = 256 * 1024  # request-body bytes held for the application before reading pauses
_MAX_HEAD_BYTES = 64 * 1024
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 204: b"No Content", 304: b"Not Modified", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 422: b"Unprocessable Content", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 499: b"Client Closed Request", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}


class _Date:
    """The ``Date`` field, formatted once per second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return self._line


_DATE = _Date()


class BodyPipe(Protocol):
    """What :data:`PIPE_EXTENSION` offers (see there)."""

    def start_response(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None: ...

    def write_body(self, data: bytes) -> None: ...

    @property
    def paused(self) -> bool: ...

    def on_resume(self, callback: Callable[[], object]) -> None: ...


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))


def eager_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """A task for ``coro`` whose first step runs now, on the caller's stack (a protocol callback),
    instead of on the loop's next turn, behind every other callback ready by then: what an exchange
    does before its first wait (for the router: reading the request, the decision, the upstream
    write) does not queue. Python 3.12's eager tasks; on 3.11 the same by hand (:class:`_Stepped`).
    """
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
    context = contextvars.copy_context()
    stepped = _Stepped(coro)
    task: asyncio.Task[_T] = loop.create_task(stepped, context=context)
    context.run(stepped.step, loop, task)
    return task


class _Stepped(Coroutine[Any, Any, Any]):
    """A coroutine whose first step ran before the task driving it took over (Python 3.11).

    :meth:`step` runs that step with the task set as the loop's current one (as the task's own steps
    have it: ``asyncio.current_task()``, ``asyncio.timeout`` work); the task's first step then gets
    what it yielded (the future it waits on), or its result or exception, and the later ones go to
    the coroutine itself.
    """

    __slots__ = ("_coro", "_first", "_state")

    _PENDING, _WAITING, _RETURNED, _RAISED, _HANDED = range(5)

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._first: Any = None
        self._state = self._PENDING

    def step(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        outer = asyncio.current_task(loop)  # started from a task's step: that task steps aside meanwhile
        if outer is not None:
            asyncio.tasks._leave_task(loop, outer)
        asyncio.tasks._enter_task(loop, task)
        try:
            self._first = self._coro.send(None)
            self._state = self._WAITING
        except StopIteration as stop:
            self._first = stop.value
            self._state = self._RETURNED
        except BaseException as exc:  # the task's first step raises it, as the task's own step would
            self._first = exc
            self._state = self._RAISED
        finally:
            asyncio.tasks._leave_task(loop, task)
            if outer is not None:
                asyncio.tasks._enter_task(loop, outer)

    def send(self, value: Any) -> Any:
        state = self._state
        if state == self._HANDED or state == self._PENDING:
            self._state = self._HANDED
            return self._coro.send(value)
        self._state = self._HANDED
        first, self._first = self._first, None
        if state == self._WAITING:
            return first
        if state == self._RETURNED:
            raise StopIteration(first)
        raise first

    def __next__(self) -> Any:
        return self.send(None)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        state = self._state
        self._state = self._HANDED
        self._first = None
        if state in (self._RETURNED, self._RAISED):  # done already: what is thrown in (a cancellation) ends it
            raise typ if val is None else val
        return self._coro.throw(typ) if val is None and tb is None else self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> _Stepped:
        return self


class _Exchange:
    """One request and its response: the ``receive`` and ``send`` of one ASGI call."""

    __slots__ = (
        "_continue",
        "_waiter",
        "body_done",
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "conn",
        "finished",
        "gone",
        "head",
        "head_only",
        "http11",
        "keep_alive",
        "on_gone",
        "scope",
        "started",
        "status",
    )

    def __init__(self, conn: _Connection, scope: Scope, keep_alive: bool, expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.http11 = scope["http_version"] == "1.1"
        self.keep_alive = keep_alive
        self.head_only = scope["method"] == "HEAD"
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False  # the whole request body was read off the wire
        self.body_done = False  # ... and handed to the application
        self.gone = False  # the client disconnected
        self.started = False
        self.finished = False
        self.chunked = False
        self.status = 0
        self.head = b""
        self._waiter: asyncio.Future[None] | None = None
        self._continue = expect_continue
        self.on_gone: Callable[[], object] | None = None
        scope["extensions"] = {DISCONNECT_EXTENSION: self._set_on_gone, PIPE_EXTENSION: self}

    def _set_on_gone(self, callback: Callable[[], object]) -> None:
        self.on_gone = callback

    def detach(self) -> None:
        """The application is done with this exchange: drop what ties it to the application's objects
        (the scope's extensions and the disconnect callback point back at it), so that reference
        counting frees a request's objects at once instead of the cycle collector, later."""
        self.on_gone = None
        self.scope.pop("extensions", None)

    def lost(self) -> None:
        """The client went away."""
        self.gone = True
        self.wake()
        callback = self.on_gone
        if callback is not None and not self.finished:
            self.on_gone = None
            callback()

    # ---------------------------------------------------------------- fed by the connection
    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _BODY_BUFFER:
            self.conn.pause_body()
        self.wake()

    def end(self) -> None:
        self.complete = True
        self.wake()

    def wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # ---------------------------------------------------------------- ASGI
    async def receive(self) -> Message:
        while True:
            if self.chunks:
                chunks = self.chunks
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.chunks = []
                self.buffered = 0
                self.conn.resume_body()
                more = not self.complete
                self.body_done = not more
                return {"type": "http.request", "body": body, "more_body": more}
            if self.gone:
                return {"type": "http.disconnect"}
            if self.complete and not self.body_done:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.body_done and self.finished:
                return {"type": "http.disconnect"}
            if self._continue and not self.started:
                self._continue = False
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = self.conn.loop.create_future()
            await self._waiter

    # ---------------------------------------------------------------- BodyPipe
    def write_body(self, data: bytes) -> None:
        """Body bytes, more to follow, written now (after ``http.response.start``)."""
        if not data or self.head_only or self.finished:
            return
        out = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        if self.head:
            out = self.head + out
            self.head = b""
        self.conn.write(out)

    @property
    def paused(self) -> bool:
        """The client's socket buffer is full: stop producing until :meth:`on_resume` calls back."""
        return self.conn.write_paused

    def on_resume(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once when writing may go on (at once if it may now)."""
        self.conn.when_writable(callback)

    def start_response(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """``http.response.start``, synchronously: the status line and headers leave with the first body bytes."""
        if self.started:
            raise RuntimeError("http.response.start sent twice")
        self.started = True
        self._continue = False
        self.status = status
        lines = [_status_line(status), _DATE.line()]
        framed = False
        for name, value in headers:
            low = name.lower()
            if low == b"content-length":
                framed = True
            elif low == b"transfer-encoding":
                continue  # the framing is ours to choose
            elif low == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            lines.append(b"%s: %s\r\n" % (name, value))
        bodiless = self.head_only or status in (204, 304) or status < 200
        if not framed and not bodiless:
            if self.http11:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if not self.keep_alive or self.conn.draining:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        elif not self.http11:
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.head = b"".join(lines)  # leaves with the first body bytes, in one write

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start_response(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        if self.finished:
            raise RuntimeError("http.response.body after the response was complete")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            body = b""
        if self.chunked:
            out = b"".join((self.head, b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n" if not more else b"\r\n")) \
                if body else self.head + (b"" if more else b"0\r\n\r\n")
        else:
            out = self.head + body if self.head else body
        self.head = b""
        if out:
            self.conn.write(out)
        if not more:
            self.finished = True
            self.wake()
            self.conn.exchange_done(self)
        elif self.conn.write_paused:
            await self.conn.drained()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs one exchange at a time."""

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.scope_base: Scope = {}
        self.parsing: _Exchange | None = None
        self.running: _Exchange | None = None
        self.ready: _Exchange | None = None  # the running exchange, not started yet
        self.waiting: deque[_Exchange] = deque()
        self.task: asyncio.Task[None] | None = None
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writable: list[Callable[[], object]] = []
        self._read_paused = False
        self._body_paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self.draining = False

    # ---------------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        self.server.connections.add(self)
        self.draining = self.server.draining
        self.scope_base = {
            "type": "http", "asgi": _ASGI, "scheme": "http", "root_path": "",
            "server": transport.get_extra_info("sockname")[:2],
            "client": (transport.get_extra_info("peername") or ("", 0))[:2],
            "state": self.server.state,
        }
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._writable = []
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for ex in (self.running, self.parsing, *self.waiting):
            if ex is not None:
                ex.lost()
        self.waiting.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # the upgrade is declined (RFC 9110 §7.8): the request is answered as a plain one, and
            # the connection closes after it, since what follows on it is not HTTP/1.1
            ex = self.parsing or (self.waiting[-1] if self.waiting else self.running)
            if ex is None:
                self._reject(400, "protocol upgrades are not supported")
            else:
                ex.keep_alive = False
                self._pause_reading()
        except httptools.HttpParserError as exc:
            # an exception raised in a callback reaches here wrapped by the parser
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._reject(431, f"request head over {_MAX_HEAD_BYTES} bytes")
            else:
                self._reject(400, f"malformed HTTP request: {exc}")
        if self.ready is not None:  # an exchange to start, now that the data at hand (its body, usually) is parsed
            self._start(self.ready, eager=True)

    def eof_received(self) -> bool | None:
        return None  # a client that stops sending is gone (as uvicorn has it): close, which cancels its request

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None
        waiting, self._writable = self._writable, []
        for callback in waiting:
            callback()

    def when_writable(self, callback: Callable[[], object]) -> None:
        if self.write_paused and self.transport is not None:
            self._writable.append(callback)
        else:
            callback()

    async def drained(self) -> None:
        if self.transport is None:
            return
        if self._drain is None:
            self._drain = self.loop.create_future()
        await self._drain

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        target = self._url
        if target[:1] == b"/" and b"?" not in target and b"#" not in target:  # the usual origin-form
            raw_path, query = target, b""
        else:
            url = httptools.parse_url(target)
            raw_path, query = url.path, url.query or b""
        scope = dict(self.scope_base)
        scope["http_version"] = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        path = raw_path.decode("ascii", "replace")
        scope["path"] = unquote(path) if "%" in path else path
        scope["raw_path"] = raw_path
        scope["query_string"] = query
        scope["headers"] = self._headers
        expect = False
        for k, v in self._headers:
            if k == b"expect" and v.lower() == b"100-continue":
                expect = True
        ex = _Exchange(self, scope, parser.should_keep_alive(), expect)
        self.parsing = ex
        if self.running is None:
            # started once the data at hand is parsed (its body, usually), in this callback
            self.running = self.ready = ex
        else:
            self.waiting.append(ex)
            self._pause_reading()  # one request ahead is enough

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.feed(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is not None:
            ex.end()

    # ---------------------------------------------------------------- exchanges
    def _start(self, ex: _Exchange, eager: bool = False) -> None:
        self.running = ex
        self.ready = None
        self.task = eager_task(self.loop, self._run(ex)) if eager else self.loop.create_task(self._run(ex))
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self.server.tasks.discard)

    async def _run(self, ex: _Exchange) -> None:
        try:
            await self._serve(ex)
        finally:
            ex.detach()

    async def _serve(self, ex: _Exchange) -> None:
        try:
            await self.app(ex.scope, ex.receive, ex.send)
        except asyncio.CancelledError:
            if not ex.finished:
                self.close()
            raise
        except Exception:
            log.exception("unhandled error serving %s %s", ex.scope["method"], ex.scope["path"])
            if not ex.started and self.transport is not None:
                body = error_body("internal server error", "server_error")
                await ex.send({"type": "http.response.start", "status": 500,
                               "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", b"%d" % len(body)), (b"connection", b"close")]})
                await ex.send({"type": "http.response.body", "body": body})
            elif not ex.finished:
                self.close()
            return
        if not ex.finished:
            if not ex.started and self.transport is not None:
                log.error("no response to %s %s", ex.scope["method"], ex.scope["path"])
                body = error_body("internal server error", "server_error")
                await ex.send({"type": "http.response.start", "status": 500,
                               "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", b"%d" % len(body)), (b"connection", b"close")]})
                await ex.send({"type": "http.response.body", "body": body})
            else:
                self.close()

    def exchange_done(self, ex: _Exchange) -> None:
        """``ex``'s response is complete: keep the connection for the next request, or close it."""
        if ex is not self.running:
            return
        self.running = None
        if not ex.keep_alive or not ex.complete or self.draining or self.transport is None:
            # a body the application did not read to the end cannot be skipped reliably: close
            self.close()
            return
        if self.waiting:
            self._start(self.waiting.popleft())
        self._resume_reading()
        if self.running is None and self.parsing is None:
            self._arm_idle()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Close now if no exchange is in progress (graceful shutdown); whether it was idle."""
        self.draining = True
        if self.running is None and self.parsing is None and not self.waiting:
            self.close()
            return True
        return False

    def _reject(self, status: int, message: str) -> None:
        if self.running is None and self.transport is not None:
            body = error_body(message, "invalid_request_error")
            self.write(b"".join((_status_line(status), _DATE.line(), b"content-type: application/json\r\n",
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body)))
        self.close()

    def _arm_idle(self) -> None:
        if self._idle is None and self.transport is not None:
            self._idle = self.loop.call_later(self.server.keep_alive_s, self._idle_out)

    def _idle_out(self) -> None:
        self._idle = None
        if self.running is None and self.parsing is None:
            self.close()

    def pause_body(self) -> None:
        self._body_paused = True
        self._pause_reading()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            if not self.waiting:
                self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not self._body_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()


class _HeadTooLarge(Exception):
    pass


class FrontServer:
    """Serves ``app`` on a listening socket until :meth:`shutdown`."""

    def __init__(self, app: ASGIApp, *, keep_alive_s: float = 30.0) -> None:
        self.app = app
        self.keep_alive_s = keep_alive_s
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.state: dict[str, Any] = {}
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._lifespan: _Lifespan | None = None

    async def start(self, host: str, port: int, *, backlog: int = 2048) -> list[str]:
        """Run the application's startup, then listen; the bound URLs (``port`` 0 picks a free port)."""
        self._lifespan = _Lifespan(self.app, self.state)
        await self._lifespan.startup()
        srv = await self.loop.create_server(lambda: _Connection(self), host, port, backlog=backlog,
                                            reuse_address=True)
        self._servers.append(srv)
        return [f"http://{s.getsockname()[0]}:{s.getsockname()[1]}" for s in srv.sockets]

    async def shutdown(self, drain_s: float) -> None:
        """Stop accepting, let in-flight exchanges finish for up to ``drain_s``, then the application's shutdown."""
        self.draining = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = self.loop.time() + drain_s
        while self.tasks and self.loop.time() < deadline:
            await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - self.loop.time()))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=5.0)
        for conn in list(self.connections):
            conn.close()
        for srv in self._servers:
            await srv.wait_closed()
        if self._lifespan is not None:
            await self._lifespan.shutdown()


class _Lifespan:
    """The ASGI lifespan protocol, run in a task of its own."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._replies: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        await self._replies.put(message)

    async def _call(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        finally:
            await self._replies.put({"type": "lifespan.ended"})

    async def _ask(self, kind: str) -> None:
        assert self._task is not None
        await self._inbox.put({"type": f"lifespan.{kind}"})
        reply = await self._replies.get()
        if reply["type"] == f"lifespan.{kind}.complete":
            return
        if reply["type"] == "lifespan.ended":
            await asyncio.wait([self._task])
            exc = self._task.exception()
            if exc is not None:
                raise RuntimeError(f"application {kind} failed: {exc}") from exc
        raise RuntimeError(f"application {kind} failed: {reply.get('message', reply['type'])}")

    async def startup(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._call())
        await self._ask("startup")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._ask("shutdown")
        await self._task


__all__ = ["DISCONNECT_EXTENSION", "PIPE_EXTENSION", "BodyPipe", "FrontServer", "eager_task"]
