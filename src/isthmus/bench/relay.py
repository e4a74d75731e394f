"""Delay relays: TCP forwarders that give loopback connections the latency of a pair of regions.

A :class:`DelayRelay` listens on a loopback port and forwards every connection it accepts to one
upstream ``host:port``, in both directions, holding each chunk of bytes back by the one-way latency
of the pair of regions it stands for. It is pure TCP, so whatever speaks HTTP across it (a client,
``isthmus serve``, another router) sees the same network.

Contract (times in seconds, on the event loop's monotonic clock):

- a chunk read at time ``t`` is written to the other side at ``max(t + d, due of the previous chunk)``,
  ``d = delay_s`` plus, when ``jitter_s > 0``, an exponential extra delay of mean ``jitter_s`` drawn
  from the relay's seeded :func:`numpy.random.default_rng`. Chunks are never reordered, never
  merged or split by the relay, and each is scheduled by its own timestamp: a stream of chunks keeps
  its spacing and a large transfer is delayed once, not once per chunk (no throttling);
- connection set-up is not delayed (the simulator's model: each hop costs half its RTT per
  direction, no handshake), so a connect + request + answer costs ``2 x delay_s``;
- a half-close (EOF) travels like data: after the bytes queued before it, the other side gets a
  FIN (``write_eof``); once both directions have delivered their EOF both sockets close;
- a reset (or any socket error) travels like data too: after the queued bytes, the other side is
  reset (``SO_LINGER`` 0, then abort); a failed upstream connect resets the client at once;
- flow control: a side whose queued bytes exceed ``max_buffer`` bytes, or whose destination's
  write buffer is full, stops being read until the backlog drains (a TCP window, large enough
  not to limit throughput at the delays of interest).

Relays run either inside an asyncio loop of the caller (:class:`DelayRelay`) or, for the testbed,
all together in one child process driven over a pipe (:class:`RelayProcess`,
``python -m isthmus.bench.relay``): there they share no interpreter lock with a load generator that
might run in the testbed's own process, and timers fire on time.

Control protocol of the relay process: one JSON object per line on stdin, one answer per line on
stdout (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``):

- ``{"op": "add", "key": K, "delay_s": d, "jitter_s": j, "seed": s, "host": h, "upstream": "host:port" | null}``
  -> ``{"ok": true, "key": K, "port": P}``: a new relay listening on ``h:P``; with no upstream yet,
  connections are reset until one is set;
- ``{"op": "upstream", "key": K, "upstream": "host:port"}`` -> ``{"ok": true}``;
- end of stdin (or SIGTERM / SIGINT): close every relay and exit 0. So the relays never outlive
  the process that started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np

log = logging.getLogger("isthmus.bench.relay")

DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
"""Bytes queued in one direction of one connection before its source stops being read."""


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_EOF = _Marker("EOF")
_RESET = _Marker("RESET")


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close ``transport`` with a TCP RST (``SO_LINGER`` 0) rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()


class _Direction:
    """One direction of one relayed connection: a FIFO of (due time, chunk or marker)."""

    def __init__(self, conn: _Connection, delay: Callable[[], float], max_buffer: int) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.delay = delay
        self.max_buffer = max_buffer
        self.items: deque[tuple[float, bytes | _Marker]] = deque()
        self.last_due = -math.inf
        self.timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None  # read from (paused under backpressure)
        self.dst: asyncio.Transport | None = None  # written to (None until connected)
        self.queued = 0
        self.full = False  # too many bytes queued
        self.dst_paused = False  # the destination's write buffer is over its high-water mark
        self.reading_paused = False
        self.finished = False  # EOF or reset pushed: nothing more will come from the source
        self.done = False  # EOF or reset delivered

    def push(self, item: bytes | _Marker) -> None:
        """Queue ``item`` for delivery at (now + delay), after everything queued before it."""
        if self.finished:
            return
        if isinstance(item, _Marker):
            self.finished = True
        due = max(self.last_due, self.loop.time() + self.delay())
        self.last_due = due
        self.items.append((due, item))
        if isinstance(item, bytes):
            self.queued += len(item)
            if self.queued > self.max_buffer:
                self.full = True
                self._update_reading()
        self.arm()

    def arm(self) -> None:
        """Make sure a timer fires when the head of the queue is due (once a destination exists)."""
        if self.timer is None and self.items and self.dst is not None and not self.done:
            self.timer = self.loop.call_at(self.items[0][0], self._flush)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.items.clear()

    def set_dst_paused(self, paused: bool) -> None:
        self.dst_paused = paused
        self._update_reading()

    def _update_reading(self) -> None:
        want_pause = self.full or self.dst_paused
        src = self.src
        if src is None or src.is_closing() or want_pause == self.reading_paused:
            return
        self.reading_paused = want_pause
        with contextlib.suppress(RuntimeError, AttributeError):  # a transport closing under us
            if want_pause:
                src.pause_reading()
            else:
                src.resume_reading()

    def _flush(self) -> None:
        self.timer = None
        dst = self.dst
        if dst is None or self.done:
            return
        now = self.loop.time()
        while self.items and self.items[0][0] <= now:
            _, item = self.items.popleft()
            if isinstance(item, bytes):
                self.queued -= len(item)
                if not dst.is_closing():
                    dst.write(item)
            elif item is _EOF:
                self.done = True
                if not dst.is_closing() and dst.can_write_eof():
                    with contextlib.suppress(OSError, RuntimeError):
                        dst.write_eof()
                self.conn.direction_done()
                return
            else:
                self.done = True
                self.conn.reset_all()
                return
        if self.full and self.queued <= self.max_buffer // 2:
            self.full = False
            self._update_reading()
        self.arm()


class _Side(asyncio.Protocol):
    """One socket of a relayed connection (the client's or the upstream's)."""

    def __init__(self, conn: _Connection, outgoing: _Direction, incoming: _Direction) -> None:
        self.conn = conn
        self.outgoing = outgoing  # what this socket sends goes here
        self.incoming = incoming  # what this socket receives comes from here
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        self.outgoing.src = transport
        self.incoming.dst = transport
        self.outgoing._update_reading()  # a backlog may have built before we were connected
        self.incoming.arm()
        self.conn.side_connected(self)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.outgoing.push(_EOF)
        return True  # keep the socket open for writing: a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.closing:
            return
        if exc is not None:
            self.outgoing.push(_RESET)
        elif not self.eof:
            self.outgoing.push(_EOF)
        self.conn.side_lost(self)

    def pause_writing(self) -> None:
        self.incoming.set_dst_paused(True)

    def resume_writing(self) -> None:
        self.incoming.set_dst_paused(False)


class _Connection:
    """One accepted client connection and its upstream connection."""

    def __init__(self, relay: DelayRelay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.up = _Direction(self, relay.sample_delay, relay.max_buffer)  # client -> upstream
        self.down = _Direction(self, relay.sample_delay, relay.max_buffer)  # upstream -> client
        self.client = _Side(self, self.up, self.down)
        self.upstream: _Side | None = None
        self.closing = False
        self.lost: set[int] = set()
        self.connect_task: asyncio.Task[None] | None = None

    def side_connected(self, side: _Side) -> None:
        if side is self.client:
            self.relay.connections.add(self)
            self.relay.accepted += 1
            target = self.relay.upstream
            if target is None:
                log.debug("relay %s: no upstream yet, resetting a connection", self.relay.name)
                self.reset_all()
                return
            self.connect_task = self.loop.create_task(self._connect(*target))

    async def _connect(self, host: str, port: int) -> None:
        side = _Side(self, self.down, self.up)
        try:
            await self.loop.create_connection(lambda: side, host, port)
        except OSError as exc:
            log.debug("relay %s: upstream %s:%d failed: %s", self.relay.name, host, port, exc)
            self.reset_all()
            return
        if self.closing:
            if side.transport is not None:
                side.transport.abort()
            return
        self.upstream = side

    def side_lost(self, side: _Side) -> None:
        self.lost.add(id(side))
        self._maybe_close()

    def direction_done(self) -> None:
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def close(self) -> None:
        """Close both sockets gracefully (what was written is still sent)."""
        if self.closing:
            return
        self.closing = True
        for d in (self.up, self.down):
            d.cancel()
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()
        self._forget()

    def reset_all(self) -> None:
        """Reset both sockets (RST) and drop whatever is queued."""
        if self.closing:
            return
        self.closing = True
        for d in (self.up, self.down):
            d.cancel()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                _reset(side.transport)
        self._forget()

    def _forget(self) -> None:
        self.relay.connections.discard(self)


class DelayRelay:
    """A TCP relay on ``host:port`` (0: any free port) to ``upstream``, delaying bytes both ways.

    Args:
        delay_s: one-way delay added to every chunk in each direction, seconds (>= 0).
        upstream: ``(host, port)`` to forward to; ``None`` until :meth:`set_upstream` (connections
            accepted meanwhile are reset).
        jitter_s: mean of an exponential extra delay per chunk, seconds (0: none). Order is kept.
        rng: the generator the jitter is drawn from (default: ``numpy.random.default_rng(0)``).
        host, port: where to listen.
        max_buffer: bytes queued per direction of a connection before its source stops being read.
        name: for logs.

    Use inside a running event loop: ``await relay.start()`` ... ``await relay.close()``.
    """

    def __init__(self, delay_s: float, upstream: tuple[str, int] | None = None, *, jitter_s: float = 0.0,
                 rng: np.random.Generator | None = None, host: str = "127.0.0.1", port: int = 0,
                 max_buffer: int = DEFAULT_MAX_BUFFER, name: str = "relay") -> None:
        if not (math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s}")
        if not (math.isfinite(jitter_s) and jitter_s >= 0):
            raise ValueError(f"jitter_s must be a finite number >= 0, got {jitter_s}")
        self.delay_s = float(delay_s)
        self.jitter_s = float(jitter_s)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.upstream = upstream
        self.host = host
        self.requested_port = port
        self.max_buffer = max_buffer
        self.name = name
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("relay not started")
        return self._loop

    def sample_delay(self) -> float:
        """The delay of the next chunk, seconds."""
        if self.jitter_s > 0:
            return self.delay_s + float(self.rng.exponential(self.jitter_s))
        return self.delay_s

    def set_upstream(self, host: str, port: int) -> None:
        """Forward connections accepted from now on to ``host:port``."""
        self.upstream = (host, port)

    async def start(self) -> DelayRelay:
        """Listen (returns once bound)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Connection(self).client, self.host,
                                                      self.requested_port)
        return self

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("relay not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.reset_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None


# ----------------------------------------------------------------------------------- relay process
def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


async def _serve_control(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    relays: dict[str, DelayRelay] = {}
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def answer(obj: dict[str, Any]) -> None:
        stdout.write(json.dumps(obj).encode() + b"\n")
        stdout.flush()

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "add":
                    key = str(msg["key"])
                    if key in relays:
                        raise ValueError(f"relay {key!r} exists")
                    up = msg.get("upstream")
                    seed = msg.get("seed")
                    relay = DelayRelay(float(msg["delay_s"]), _parse_hostport(up) if up else None,
                                       jitter_s=float(msg.get("jitter_s", 0.0)),
                                       rng=np.random.default_rng(seed), host=str(msg.get("host", "127.0.0.1")),
                                       name=key)
                    await relay.start()
                    relays[key] = relay
                    answer({"ok": True, "key": key, "port": relay.port})
                elif op == "upstream":
                    relays[str(msg["key"])].set_upstream(*_parse_hostport(str(msg["upstream"])))
                    answer({"ok": True})
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as exc:  # a bad command: say so, keep serving
                answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    cmd = asyncio.create_task(commands())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({cmd, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for t in (cmd, stopper):
        t.cancel()
    for relay in relays.values():
        await relay.close()


def main() -> None:
    """Entry point of ``python -m isthmus.bench.relay`` (control protocol in the module docstring)."""
    logging.basicConfig(level=os.environ.get("ISTHMUS_RELAY_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stdout = sys.stdout.buffer
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with the serve extra
        asyncio.run(_serve_control(sys.stdin.buffer, stdout))
    else:
        uvloop.run(_serve_control(sys.stdin.buffer, stdout))


@dataclass(frozen=True)
class RelayHandle:
    """A relay of a :class:`RelayProcess`: its key and where it listens."""

    key: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class RelayProcess:
    """Every relay of a testbed in one child process (``python -m isthmus.bench.relay``).

    Args:
        stderr: where the child's log goes (a file opened for writing in binary mode), or ``None``.
        timeout_s: longest wait for one answer of the child, seconds.

    The child exits when its stdin closes, so it never outlives this object's process.
    """

    def __init__(self, stderr: IO[bytes] | None = None, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen([sys.executable, "-m", "isthmus.bench.relay"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        assert self.proc.stdout is not None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError(f"the relay process exited (status {self.proc.returncode})")
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise RuntimeError(f"the relay process did not answer {msg.get('op')!r} in {self.timeout_s} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the relay process exited (status {self.proc.wait()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        out: dict[str, Any] = json.loads(line)
        if not out.get("ok"):
            raise RuntimeError(f"relay process: {out.get('error')}")
        return out

    def add(self, key: str, delay_s: float, *, upstream: tuple[str, int] | None = None, jitter_s: float = 0.0,
            seed: int | None = None, host: str = "127.0.0.1") -> RelayHandle:
        """Start relay ``key`` (one-way ``delay_s`` seconds) listening on a free port of ``host``."""
        out = self._call({"op": "add", "key": key, "delay_s": delay_s, "jitter_s": jitter_s, "seed": seed,
                          "host": host, "upstream": f"{upstream[0]}:{upstream[1]}" if upstream else None})
        return RelayHandle(key=key, host=host, port=int(out["port"]))

    def set_upstream(self, key: str, host: str, port: int) -> None:
        """Point relay ``key`` at ``host:port`` (for connections accepted from now on)."""
        self._call({"op": "upstream", "key": key, "upstream": f"{host}:{port}"})

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every relay and wait for the child (killed after ``timeout_s``). Idempotent."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._sel.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    main()
