"""Running the router: its HTTP server (:mod:`.front`, on uvloop where available), logging, graceful shutdown.

On SIGTERM or SIGINT the router stops accepting connections, closes idle keep-alive connections and
lets in-flight requests (streams included) finish for up to ``drain_s`` seconds; then the router's
collectors stop and its pools close, and the process exits with status 0. Requests still running
after the drain window are cancelled.

Once listening it writes ``isthmus serve: routing on http://HOST:PORT`` to stderr, whatever the log
level (the bound port, also when the config asks for port 0).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Any

from isthmus.router.app import build_app
from isthmus.router.config import RouterConfig
from isthmus.router.front import FrontServer

log = logging.getLogger("isthmus.router")


class _KeyValueFormatter(logging.Formatter):
    """``time level logger message``, one line per record (messages carry ``key=value`` fields)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")


def configure_logging(level: str) -> None:
    """Send the router's logs to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    for name in ("isthmus",):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def run(config: RouterConfig) -> None:
    """Serve ``config`` until SIGTERM / SIGINT (blocking)."""
    configure_logging(config.log_level)
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # e.g. Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(config))


async def _collect_garbage(period_s: float = 1.0, full_every: int = 60) -> None:
    """The cycle collector, run on a timer instead of by allocation counts.

    What exists once the router is up (modules, config, app, tables) lives as long as the process:
    it is frozen out of the collector's sight. A request's objects are freed by reference counting
    (the request path makes no cycles); what cycles remain (a failure's traceback, say) are
    collected every ``period_s``, the older generation every ``full_every`` periods. Left to
    allocation counts, collections start inside whichever request allocates at that moment, on the
    path to a first token (a young collection every few requests, a millisecond-long older one
    every hundred or so with 50 streams).
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        n = 0
        while True:
            await asyncio.sleep(period_s)
            n += 1
            gc.collect(2 if n % full_every == 0 else 1)
    finally:
        gc.enable()


async def _serve(config: RouterConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = FrontServer(build_app(config), keep_alive_s=30.0)
    try:
        urls = await server.start(config.listen.host, config.listen.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.listen.host, config.listen.port, exc)
        await server.shutdown(0.0)
        raise SystemExit(1) from None
    collector = loop.create_task(_collect_garbage(), name="garbage collection")
    for url in urls:
        # always said, whatever the log level: whoever started the router learns the port here
        print(f"isthmus serve: routing on {url}", file=sys.stderr, flush=True)
    await stop.wait()
    collector.cancel()  # which turns allocation-driven collection back on
    log.info("stopping: draining in-flight requests for up to %g s", config.drain_s)
    await server.shutdown(config.drain_s)
