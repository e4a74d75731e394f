"""Running the router: uvicorn (uvloop + httptools where available), logging, graceful shutdown.

On SIGTERM or SIGINT uvicorn stops accepting connections, closes idle keep-alive connections and
lets in-flight requests (streams included) finish for up to ``drain_s`` seconds (rounded up to
whole seconds); then the router's collectors stop and its pools close, and the process exits with
status 0. Requests still running after the drain window are cancelled.

Once listening it writes ``isthmus serve: routing on http://HOST:PORT`` to stderr, whatever the log
level (the bound port, also when the config asks for port 0).
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from isthmus.router.app import build_app
from isthmus.router.config import RouterConfig

log = logging.getLogger("isthmus.router")


class _KeyValueFormatter(logging.Formatter):
    """``time level logger message``, one line per record (messages carry ``key=value`` fields)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")


def configure_logging(level: str) -> None:
    """Send the router's logs (and uvicorn's errors) to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    for name in ("isthmus", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def _loop_and_http() -> tuple[str, str]:
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:  # e.g. Windows
        loop = "asyncio"
    try:
        import httptools  # noqa: F401
        http = "httptools"
    except ImportError:
        http = "h11"
    return loop, http


def run(config: RouterConfig) -> None:
    """Serve ``config`` until SIGTERM / SIGINT (blocking)."""
    configure_logging(config.log_level)
    loop, http = _loop_and_http()
    app = build_app(config)
    uv = uvicorn.Config(
        app, host=config.listen.host, port=config.listen.port, loop=loop, http=http, lifespan="on",
        access_log=False, server_header=False, log_config=None, log_level=config.log_level,
        timeout_graceful_shutdown=math.ceil(config.drain_s), timeout_keep_alive=30,
        limit_concurrency=None, backlog=2048,
    )
    # uvicorn re-raises the SIGTERM it caught once it has drained; by then shutdown was graceful,
    # so the process exits with status 0 rather than dying of the signal
    previous = signal.signal(signal.SIGTERM, _exit_after_drain)
    try:
        _Server(uv).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bound_urls(servers: list[Any]) -> list[str]:
    out = []
    for srv in servers:
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"http://{host}:{port}")
    return out


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once bound (port 0 picks a free one)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            for url in _bound_urls(self.servers):
                # always said, whatever the log level: whoever started the router learns the port here
                print(f"isthmus serve: routing on {url}", file=sys.stderr, flush=True)


def _exit_after_drain(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
