"""Running an engine double: the listening socket, uvicorn (uvloop + httptools) and signals."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import struct
from types import FrameType

from isthmus.emulator.app import EmulatorApp
from isthmus.emulator.config import EmulatorConfig
from isthmus.tokenizer_file import load_tokenizer

log = logging.getLogger("isthmus.emulator")

READY_MESSAGE = "isthmus emulate: serving %s on http://%s:%d"
"""Logged (stderr) once the server accepts requests; carries the bound port (useful with ``--port 0``)."""


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _ignore_signal(_sig: int, _frame: FrameType | None) -> None:
    """Installed before uvicorn so that the signal it re-raises after a graceful stop is a no-op."""


async def _refuse_forever(sock: socket.socket) -> None:
    """Accept each connection and reset it at once (RST), until SIGTERM / SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock.setblocking(False)
    linger = struct.pack("ii", 1, 0)

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            conn.close()

    task = asyncio.create_task(accept())
    await stop.wait()
    task.cancel()
    sock.close()


def serve(config: EmulatorConfig) -> None:
    """Serve until SIGTERM / SIGINT, then stop gracefully: stop accepting, let in-flight requests
    finish for up to ``shutdown_timeout_s``, return. Raises
    :class:`~isthmus.core.errors.ConfigError` for bad settings before binding anything."""
    tokenizer = load_tokenizer(config.tokenizer)
    app = EmulatorApp(config, tokenizer)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address in a URL
    r = app.resolved
    if config.refuse_connections:
        log.warning("injected fault: every connection is reset on accept")
        log.info(READY_MESSAGE, app.model_name, host, port)
        import uvloop

        uvloop.run(_refuse_forever(sock))
        return
    import uvicorn

    uv_config = uvicorn.Config(app.asgi, loop="uvloop", http="httptools", ws="none", lifespan="on",
                               log_config=None, access_log=config.access_log,
                               timeout_graceful_shutdown=math.ceil(config.shutdown_timeout_s) or None)

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app when a stop signal arrives (to end injected stalls)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(uv_config)

    def ready() -> None:
        # the socket already listens: connections made from now on wait in its backlog for uvicorn
        log.info("engine: %s on %s, %d KV blocks of %d tokens, max_model_len %d, max_num_seqs %d, "
                 "max_num_batched_tokens %d, prefix caching %s, time scale %g", r.perf.model.name,
                 r.perf.gpu.name, r.num_blocks, r.spec.block_size, r.max_model_len, r.spec.max_num_seqs,
                 r.spec.max_num_batched_tokens, "on" if r.spec.enable_prefix_caching else "off", config.time_scale)
        log.info(READY_MESSAGE, app.model_name, host, port)

    app.on_ready.append(ready)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore_signal)
    server.run(sockets=[sock])
