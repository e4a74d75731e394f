"""The data path's pooled HTTP/1.1 client against small real servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from isthmus.router.upstream import (
    Origin,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"content-type: application/json\r\n"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length bodies only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, Origin, list[int]]:
    """A server on a free loopback port; the list counts its connections."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, Origin.from_url(f"http://127.0.0.1:{port}"), connections


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def call(pool: UpstreamPool, origin: Origin, body: bytes = b"{}", idle_s: float = 5.0) -> tuple[int, bytes]:
    resp = await pool.request(origin, b"/v1/completions", HEAD, body, connect_s=2.0, idle_s=idle_s, total_s=10.0)
    try:
        return resp.status, await resp.read_all(1 << 30)
    finally:
        resp.release()


def test_keep_alive_reuses_one_connection_and_echoes_the_request() -> None:
    async def main() -> None:
        seen: list[bytes] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                req = await read_request(reader)
                seen.append(req)
                writer.write(ok(req.split(b"\r\n\r\n", 1)[1]))

        server, origin, conns = await serve(handler)
        pool = UpstreamPool()
        for k in range(3):
            assert await call(pool, origin, b'{"k": %d}' % k) == (200, b'{"k": %d}' % k)
        assert len(conns) == 1
        assert seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:")
        assert b"content-length: 8\r\n" in seen[0]
        pool.close()
        server.close()

    asyncio.run(main())


def test_a_pooled_connection_the_server_closed_is_replaced_transparently() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(ok(b"once"))  # keep-alive by default, but the server closes right after
            await writer.drain()

        server, origin, conns = await serve(handler)
        pool = UpstreamPool()
        assert await call(pool, origin) == (200, b"once")
        await asyncio.sleep(0.05)
        assert await call(pool, origin) == (200, b"once")
        assert len(conns) == 2
        pool.close()
        server.close()

    asyncio.run(main())


def test_connection_close_answers_and_bodies_delimited_by_close() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"part two")

        server, origin, _ = await serve(handler)
        pool = UpstreamPool()
        assert await call(pool, origin) == (200, b"part one, part two")
        assert pool.idle_connections() == 0
        pool.close()
        server.close()

    asyncio.run(main())


def test_chunked_stream_is_read_as_it_comes() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for k in range(3):
                event = b"data: %d\n\n" % k
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.02)
            writer.write(b"0\r\n\r\n")
            await read_request(reader)  # keep the connection for the pool

        server, origin, _ = await serve(handler)
        pool = UpstreamPool()
        resp = await pool.request(origin, b"/x", HEAD, b"{}", connect_s=2.0, idle_s=5.0, total_s=10.0)
        assert resp.header(b"content-type") == "text/event-stream"
        parts = []
        while chunk := await resp.read():
            parts.append(chunk)
        assert b"".join(parts) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert len(parts) >= 2  # delivered as they came, not at the end
        assert resp.at_eof()
        resp.release()
        assert pool.idle_connections() == 1
        pool.close()
        server.close()

    asyncio.run(main())


def test_refused_silent_and_broken_upstreams() -> None:
    async def main() -> None:
        pool = UpstreamPool()
        closed = Origin.from_url("http://127.0.0.1:9")  # discard port: nothing listens
        with pytest.raises(UpstreamConnectError):
            await call(pool, closed)

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await asyncio.sleep(5)

        server, origin, _ = await serve(silent)
        with pytest.raises(UpstreamTimeout):
            await call(pool, origin, idle_s=0.2)
        server.close()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"this is not HTTP\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(1)

        server, origin, _ = await serve(garbage)
        with pytest.raises(UpstreamBroken):
            await call(pool, origin)
        server.close()

        async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            await writer.drain()

        server, origin, _ = await serve(dies)
        resp = await pool.request(origin, b"/x", HEAD, b"{}", connect_s=2.0, idle_s=5.0, total_s=10.0)
        assert await resp.read() == b"only part"
        with pytest.raises(UpstreamBroken):
            await resp.read()
        resp.release()
        pool.close()
        server.close()

    asyncio.run(main())


def test_a_slow_reader_pauses_the_upstream_and_gets_every_byte() -> None:
    async def main() -> None:
        payload = bytes(range(256)) * (16 * 1024)  # 4 MiB

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(ok(payload))
            await writer.drain()
            await asyncio.sleep(1)

        server, origin, _ = await serve(handler)
        pool = UpstreamPool()
        resp = await pool.request(origin, b"/x", HEAD, b"{}", connect_s=2.0, idle_s=5.0, total_s=10.0)
        await asyncio.sleep(0.2)  # the whole answer arrives meanwhile, unless reading paused
        conn = resp._conn
        assert conn.paused and conn.buffered < len(payload)
        got = await resp.read_all(1 << 30)
        assert got == payload
        resp.release()
        pool.close()
        server.close()

    asyncio.run(main())


def test_bad_origins_are_rejected() -> None:
    with pytest.raises(ValueError, match="http://"):
        Origin.from_url("https://example.com")
    assert Origin.from_url("http://h:81/base/").base_path == b"/base"


def test_idle_timeout_counts_from_the_last_data_not_from_the_first_wait() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(8):  # 8 x 50 ms: longer than the idle timeout in all, shorter in each gap
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
            await asyncio.sleep(5)  # then silence

        server, origin, _ = await serve(handler)
        pool = UpstreamPool()
        resp = await pool.request(origin, b"/x", HEAD, b"{}", connect_s=2.0, idle_s=0.2, total_s=10.0)
        got = b""
        loop = asyncio.get_running_loop()
        with pytest.raises(UpstreamTimeout):
            while True:
                got += await resp.read()
                last = loop.time()
        assert got == b"x" * 8
        assert 0.15 <= loop.time() - last < 1.0
        resp.release()
        pool.close()
        server.close()

    asyncio.run(main())


def test_on_head_pipes_a_body_that_comes_with_its_head_from_the_callback() -> None:
    """A body in the same segment as its head reaches the sink ``on_head`` returned before
    ``request`` returns; ``pipe`` with that sink then reads the rest, the chunks of one segment in
    one call (one write downstream), and the connection is pooled."""
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                event = b"data: 0\n\n"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                             b"\r\n%x\r\n%s\r\n" % (len(event), event))  # the head and a first chunk, one write
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: 1\n\n", b"data: 2\n\n"))
                             + b"0\r\n\r\n")  # two chunks and the end, one write

        server, origin, conns = await serve(handler)
        pool = UpstreamPool()
        for _ in range(2):
            got: list[bytes] = []
            heads: list[tuple[int, str]] = []

            def on_head(resp: UpstreamResponse, heads: list[tuple[int, str]] = heads,
                        got: list[bytes] = got) -> Callable[[bytes], object]:
                heads.append((resp.status, resp.header(b"content-type")))
                return got.append

            resp = await pool.request(origin, b"/x", HEAD, b"{}", connect_s=2.0, idle_s=5.0, total_s=10.0,
                                      on_head=on_head)
            assert heads == [(200, "text/event-stream")] and resp.status == 200
            assert got == [b"data: 0\n\n"]  # already passed on, from the connection's callback
            await resp.pipe(got.append)
            assert got == [b"data: 0\n\n", b"data: 1\n\ndata: 2\n\n"]
            resp.release()
        assert len(conns) == 1 and pool.idle_connections() == 1

        # a head the hook declines: the body is read as usual
        resp = await pool.request(origin, b"/x", HEAD, b"{}", connect_s=2.0, idle_s=5.0, total_s=10.0,
                                  on_head=lambda resp: None)
        assert await resp.read_all(1 << 20) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        resp.release()
        pool.close()
        server.close()

    asyncio.run(main())


def test_a_pooled_connection_that_spoke_while_idle_is_not_reused() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(ok(b"fine"))
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\n")  # unasked for, on an idle keep-alive connection

        server, origin, conns = await serve(handler)
        pool = UpstreamPool()
        assert await call(pool, origin) == (200, b"fine")
        await asyncio.sleep(0.1)
        assert await call(pool, origin) == (200, b"fine")
        assert len(conns) == 2
        pool.close()
        server.close()

    asyncio.run(main())
