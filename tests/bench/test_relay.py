"""The delay relay: real sockets on loopback, real timers (no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import uvloop

from isthmus.bench.relay import DelayRelay, RelayProcess

RUNNERS = [pytest.param(asyncio.run, id="asyncio"), pytest.param(uvloop.run, id="uvloop")]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SLACK = 0.002  # timer granularity: a delay may be observed this much early at most


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _server(handler: Handler) -> tuple[asyncio.AbstractServer, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


async def _relay(handler: Handler, delay_s: float, **kw: object) -> tuple[asyncio.AbstractServer, DelayRelay]:
    srv, port = await _server(handler)
    relay = await DelayRelay(delay_s, ("127.0.0.1", port), **kw).start()  # type: ignore[arg-type]
    return srv, relay


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


@pytest.mark.parametrize("run", RUNNERS)
def test_connect_and_echo_round_trip_costs_two_one_way_delays(run: Callable[[Any], Any]) -> None:
    async def main() -> list[float]:
        srv, relay = await _relay(_echo, 0.04)
        out = []
        for _ in range(3):
            t0 = time.perf_counter()
            r, w = await asyncio.open_connection("127.0.0.1", relay.port)
            w.write(b"ping")
            assert await _read_exactly(r, 4) == b"ping"
            out.append(time.perf_counter() - t0)
            w.close()
        await relay.close()
        srv.close()
        return out

    for rtt in run(main()):
        assert 0.08 - SLACK <= rtt < 0.08 + 0.06, rtt


def test_streamed_chunks_keep_their_spacing() -> None:
    gap = 0.05

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        for k in range(5):
            writer.write(f"data: {k}\n\n".encode())
            await writer.drain()
            await asyncio.sleep(gap)
        writer.close()

    async def main() -> tuple[float, list[float]]:
        srv, relay = await _relay(sse, 0.03)
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        w.write(b"go\n")
        arrivals = []
        for k in range(5):
            assert await _read_exactly(r, len(f"data: {k}\n\n")) == f"data: {k}\n\n".encode()
            arrivals.append(time.perf_counter() - t0)
        assert await asyncio.wait_for(r.read(), 5) == b""  # the server's close came through
        w.close()
        await relay.close()
        srv.close()
        return arrivals[0], list(np.diff(arrivals))

    first, gaps = asyncio.run(main())
    assert first >= 0.06 - SLACK
    for g in gaps:  # the spacing is the server's, not delay x chunks
        assert gap - 0.015 <= g <= gap + 0.03, gaps


@pytest.mark.parametrize("run", RUNNERS)
def test_large_transfer_is_intact_and_not_throttled(run: Callable[[Any], Any]) -> None:
    payload = os.urandom(8 * 1024 * 1024 + 12345)

    async def main() -> tuple[bytes, float]:
        srv, relay = await _relay(_echo, 0.02)
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                w.write(payload[i:i + 100_000])
                await w.drain()
            w.write_eof()  # half-close: the echo server answers with its own EOF after the data

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(r.read(), 30)
        await sender
        elapsed = time.perf_counter() - t0
        w.close()
        await relay.close()
        srv.close()
        return got, elapsed

    got, elapsed = run(main())
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert elapsed < 5.0  # thousands of chunks: were they delayed one after the other, this would take minutes


@pytest.mark.parametrize("run", RUNNERS)
def test_half_close_and_close_propagate_after_the_data(run: Callable[[Any], Any]) -> None:
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(b"got " + data)
        await writer.drain()
        writer.close()

    async def main() -> float:
        srv, relay = await _relay(greeter, 0.03)
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        t0 = time.perf_counter()
        w.write(b"hello")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b"got hello"  # data then EOF
        elapsed = time.perf_counter() - t0
        w.close()
        await relay.close()
        srv.close()
        return elapsed

    assert run(main()) >= 0.06 - SLACK


@pytest.mark.parametrize("run", RUNNERS)
def test_reset_propagates_and_missing_upstream_resets(run: Callable[[Any], Any]) -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main() -> None:
        srv, relay = await _relay(resetter, 0.02)
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        w.write(b"x")
        with pytest.raises(ConnectionResetError):
            data = await asyncio.wait_for(r.read(), 5)
            raise AssertionError(f"read {data!r} instead of a reset")
        w.close()
        await relay.close()
        srv.close()

        lonely = await DelayRelay(0.01).start()  # no upstream yet
        r, w = await asyncio.open_connection("127.0.0.1", lonely.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        # an upstream that refuses: the client is reset too
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        lonely.set_upstream("127.0.0.1", dead_port)
        r, w = await asyncio.open_connection("127.0.0.1", lonely.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        await lonely.close()

    run(main())


def test_jitter_only_adds_delay_and_keeps_order() -> None:
    async def main() -> list[bytes]:
        srv, relay = await _relay(_echo, 0.01, jitter_s=0.005, rng=np.random.default_rng(1))
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        got = []
        t0 = time.perf_counter()
        for k in range(20):
            w.write(f"{k:04d}".encode())
            await asyncio.sleep(0.001)
        for _ in range(20):
            got.append(await _read_exactly(r, 4))
        assert time.perf_counter() - t0 >= 0.02 - SLACK
        w.close()
        await relay.close()
        srv.close()
        return got

    assert asyncio.run(main()) == [f"{k:04d}".encode() for k in range(20)]


def test_relay_process_adds_relays_and_late_upstreams() -> None:
    rp = RelayProcess()
    try:
        handle = rp.add("a", 0.03)  # upstream bound later

        async def main() -> float:
            srv, port = await _server(_echo)
            rp.set_upstream(handle.key, "127.0.0.1", port)
            t0 = time.perf_counter()
            r, w = await asyncio.open_connection("127.0.0.1", handle.port)
            w.write(b"ping")
            assert await _read_exactly(r, 4) == b"ping"
            elapsed = time.perf_counter() - t0
            w.close()
            srv.close()
            return elapsed

        assert 0.06 - SLACK <= asyncio.run(main()) < 0.06 + 0.06
        with pytest.raises(RuntimeError, match="exists"):
            rp.add("a", 0.01)
    finally:
        rp.stop()
    assert rp.proc.returncode == 0
