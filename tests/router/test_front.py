"""The router's HTTP/1.1 server (:mod:`isthmus.router.front`) over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from isthmus.router.front import DISCONNECT_EXTENSION, FrontServer, eager_task


async def _echo_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answers with what it was asked: method, path, query, body length; ``/stream`` streams 3 chunks;
    ``/slow`` waits for a disconnect; ``/boom`` raises; ``/nothing`` returns without answering."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["started"] = True
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/nothing":
        return
    if path == "/slow":
        gone = asyncio.Event()
        scope["extensions"][DISCONNECT_EXTENSION](gone.set)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started", "more_body": True})
        await asyncio.wait_for(gone.wait(), 5)
        _events.append("gone")
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for k in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % k, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    out = json.dumps({"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                      "body": len(body), "version": scope["http_version"],
                      "started": scope["state"].get("started", False)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


_events: list[str] = []


async def _serve() -> tuple[FrontServer, int]:
    server = FrontServer(_echo_app, keep_alive_s=0.5)
    urls = await server.start("127.0.0.1", 0)
    return server, int(urls[0].rsplit(":", 1)[1])


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    return status, headers, await reader.read()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_keep_alive_pipelining_query_and_lifespan() -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # two pipelined requests in one write, then a third on the same connection
        writer.write(b"POST /a?x=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello"
                     b"GET /b HTTP/1.1\r\nhost: h\r\n\r\n")
        first = await _read_response(reader)
        second = await _read_response(reader)
        writer.write(b"GET /c HTTP/1.1\r\nhost: h\r\n\r\n")
        third = await _read_response(reader)
        assert [json.loads(r[2])["path"] for r in (first, second, third)] == ["/a", "/b", "/c"]
        assert json.loads(first[2]) == {"method": "POST", "path": "/a", "query": "x=1", "body": 5,
                                        "version": "1.1", "started": True}
        assert "date" in first[1] and first[1].get("connection") != "close"
        # percent-encoded and absolute-form targets (RFC 9112 §3.2.2) are decoded like plain ones
        writer.write(b"GET /d%20e HTTP/1.1\r\nhost: h\r\n\r\nGET http://h/f?y=2 HTTP/1.1\r\nhost: h\r\n\r\n")
        fourth, fifth = await _read_response(reader), await _read_response(reader)
        assert json.loads(fourth[2])["path"] == "/d e"
        assert (json.loads(fifth[2])["path"], json.loads(fifth[2])["query"]) == ("/f", "y=2")
        writer.close()
        await server.shutdown(1.0)

    _run(go())


def test_chunked_request_body_and_chunked_response() -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        status, _, body = await _read_response(reader)
        assert status == 200 and json.loads(body)["body"] == 7
        writer.write(b"GET /stream HTTP/1.1\r\nhost: h\r\n\r\n")
        status, headers, body = await _read_response(reader)
        assert headers["transfer-encoding"] == "chunked"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        writer.close()
        await server.shutdown(1.0)

    _run(go())


def test_expect_continue_is_answered_before_the_body() -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nhost: h\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abcd")
        status, _, body = await _read_response(reader)
        assert status == 200 and json.loads(body)["body"] == 4
        writer.close()
        await server.shutdown(1.0)

    _run(go())


def test_http10_closes_after_an_unframed_body() -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
        raw = await reader.read()  # until the server closes
        head, body = raw.split(b"\r\n\r\n", 1)
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        writer.close()
        await server.shutdown(1.0)

    _run(go())


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost: h\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
])
def test_malformed_requests_get_an_error_body_and_a_close(request_bytes: bytes, status: int) -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        got, headers, body = await _read_response(reader)
        assert got == status and headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert await reader.read() == b""
        writer.close()
        await server.shutdown(1.0)

    _run(go())


def test_an_upgrade_is_declined_and_answered_as_a_plain_request() -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /u HTTP/1.1\r\nhost: h\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        status, headers, body = await _read_response(reader)
        assert status == 200 and json.loads(body)["path"] == "/u" and headers["connection"] == "close"
        writer.close()
        await server.shutdown(1.0)

    _run(go())


@pytest.mark.parametrize("path", ["/boom", "/nothing"])
def test_an_application_failure_is_a_500_not_a_hang(path: str) -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET %s HTTP/1.1\r\nhost: h\r\n\r\n" % path.encode())
        status, _, body = await _read_response(reader)
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        writer.close()
        await server.shutdown(1.0)

    _run(go())


def test_disconnect_callback_and_idle_keep_alive_timeout() -> None:
    async def go() -> None:
        server, port = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: h\r\n\r\n")
        await reader.readuntil(b"started")
        writer.close()
        for _ in range(100):
            if "gone" in _events:
                break
            await asyncio.sleep(0.02)
        assert "gone" in _events
        # an idle keep-alive connection is closed after keep_alive_s
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nhost: h\r\n\r\n")
        await _read_response(reader)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        await server.shutdown(1.0)

    _run(go())


def test_shutdown_lets_a_stream_finish_and_closes_idle_connections() -> None:
    async def go() -> None:
        server, port = await _serve()
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(b"GET /a HTTP/1.1\r\nhost: h\r\n\r\n")
        await _read_response(idle_reader)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: h\r\n\r\n")
        await reader.readuntil(b"started")
        stopping = asyncio.create_task(server.shutdown(0.3))
        assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # idle: closed at once
        await asyncio.wait_for(stopping, 5)  # the slow one was cancelled after the drain window
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        idle_writer.close()

    _run(go())


# ---------------------------------------------------------------------- eager starts
def _loops() -> list[Any]:
    import uvloop

    return [asyncio.new_event_loop, uvloop.new_event_loop]


@pytest.mark.parametrize("new_loop", _loops(), ids=["asyncio", "uvloop"])
def test_an_eager_task_runs_its_first_step_at_once_as_a_task(new_loop: Any) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[Any] = []

    async def job(gate: asyncio.Future[int]) -> int:
        task = asyncio.current_task()
        seen.append(task)
        var.set("set in the first step")
        async with asyncio.timeout(5):  # needs the current task
            got = await gate
        seen.append(var.get())
        return got + 1

    async def raises_at_once() -> None:
        raise ValueError("at once")

    async def returns_at_once() -> str:
        return "done"

    async def go() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[int] = loop.create_future()
        task = eager_task(loop, job(gate))
        assert seen == [task]  # the first step ran before eager_task returned, with the task current
        assert asyncio.current_task() is not task and var.get() == "unset"  # nothing leaked to the caller
        gate.set_result(41)
        assert await task == 42
        assert seen[1] == "set in the first step"  # the first step's context is the task's
        failing = eager_task(loop, raises_at_once())
        with pytest.raises(ValueError, match="at once"):
            await failing
        assert await eager_task(loop, returns_at_once()) == "done"

    loop = new_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(go(), 10))
    finally:
        loop.close()


@pytest.mark.parametrize("new_loop", _loops(), ids=["asyncio", "uvloop"])
def test_an_eager_task_cancelled_before_the_loop_steps_it_is_cancelled_where_it_waits(new_loop: Any) -> None:
    seen: list[str] = []

    async def job(gate: asyncio.Future[None]) -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled at its wait")
            raise
        finally:
            seen.append("cleaned up")

    async def go() -> None:
        loop = asyncio.get_running_loop()
        task = eager_task(loop, job(loop.create_future()))
        task.cancel()  # before the loop ever stepped it
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and seen == ["cancelled at its wait", "cleaned up"]

    loop = new_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(go(), 10))
    finally:
        loop.close()


def test_a_request_is_handled_in_the_callback_that_read_it() -> None:
    """The front starts an exchange eagerly once its request is parsed: the application's work up to
    its first wait runs inside ``data_received``, not on a later loop turn."""
    import inspect

    stacks: list[bool] = []

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _echo_app(scope, receive, send)
            return
        message = await receive()  # the body came with the head: no wait
        stacks.append(any(f.function == "data_received" for f in inspect.stack(0)))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"%02d" % len(message["body"])})

    async def go() -> None:
        server = FrontServer(app)
        port = int((await server.start("127.0.0.1", 0))[0].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /a HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello")
        assert (await _read_response(reader))[2] == b"05"
        assert stacks == [True]
        writer.close()
        await server.shutdown(1.0)

    _run(go())
