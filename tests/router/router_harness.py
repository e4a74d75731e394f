"""Running real routers for tests: in a thread (on a loopback port) or as a subprocess."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

from isthmus.router.app import Router, build_app
from isthmus.router.config import RouterConfig
from isthmus.router.front import FrontServer

FAST_HEALTH = {"probe_period_s": 0.05, "probe_timeout_s": 0.5}


def config(replicas: Sequence[dict[str, Any]], **over: Any) -> dict[str, Any]:
    """A router config mapping: loopback, one model ``m``, fast probes; ``over`` replaces top-level keys."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "region": "east",
        "replicas": list(replicas),
        "models": ["m"],
        "policy": {"name": "least_load"},
        "health": dict(FAST_HEALTH),
        "scrape_period_s": 0.05,
        "log_level": "warning",
    }
    data.update(over)
    return data


def replica(url: str, region: str = "east", **kw: Any) -> dict[str, Any]:
    return {"url": url, "region": region, "gpu": "A100", "model": "Mistral-7B", **kw}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RouterThread:
    """A real router serving on a loopback port from a background thread: the router's own server
    (:class:`~isthmus.router.front.FrontServer`, as ``isthmus serve`` runs it) or, with
    ``server="uvicorn"``, the same application under uvicorn (any ASGI server must do)."""

    def __init__(self, cfg: RouterConfig, server: str = "front") -> None:
        self.config = cfg
        self.router = Router(cfg)
        self.app = build_app(cfg, router=self.router)
        self.kind = server
        self._port = 0
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        target: Callable[[], None]
        if server == "uvicorn":
            self.server = uvicorn.Server(uvicorn.Config(
                self.app, host="127.0.0.1", port=cfg.listen.port, loop="uvloop", http="httptools", lifespan="on",
                access_log=False, log_config=None, log_level="warning", timeout_graceful_shutdown=1))
            target = self.server.run
        else:
            target = self._run_front
        self.thread = threading.Thread(target=target, name="router", daemon=True)

    def _run_front(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            front = FrontServer(self.app)
            try:
                urls = await front.start("127.0.0.1", self.config.listen.port)
            except BaseException as exc:
                self._error = exc
                self._started.set()
                raise
            self._port = int(urls[0].rsplit(":", 1)[1])
            self._started.set()
            await self._stop.wait()
            await front.shutdown(1.0)

        uvloop.run(main())

    @property
    def port(self) -> int:
        if self.kind == "uvicorn":
            return int(self.server.servers[0].sockets[0].getsockname()[1])
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not (self.server.started if self.kind == "uvicorn" else self._started.is_set()):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("router did not start")
            time.sleep(0.01)
        if self._error is not None:
            raise RuntimeError(f"router did not start: {self._error}")
        return self

    def stop(self) -> None:
        if self.kind == "uvicorn":
            self.server.should_exit = True
        elif self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


@contextmanager
def running_router(data: dict[str, Any], server: str = "front") -> Iterator[RouterThread]:
    rt = RouterThread(RouterConfig.model_validate(data), server).start()
    try:
        yield rt
    finally:
        rt.stop()


JSON = {"content-type": "application/json"}


def post(port: int, data: bytes, headers: dict[str, str] | None = None,
         path: str = "/v1/completions") -> tuple[int, dict[str, str], bytes]:
    """One JSON ``POST`` to a router on ``port``: status, headers (lower-case names), body."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", path, body=data, headers={**JSON, **(headers or {})})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def wait_until(cond: Any, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


@contextmanager
def router_process(data: dict[str, Any], tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``isthmus serve`` in a subprocess on a free port; yields (process, base URL) once it answers."""
    port = free_port()
    data = {**data, "listen": {"host": "127.0.0.1", "port": port}}
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-c", "from isthmus.cli import main; main()", "serve", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"router exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("router did not start") from None
                time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


READY = re.compile(rb"serving .* on http://127\.0\.0\.1:(\d+)")


class Emulator:
    """One ``isthmus emulate`` process on a loopback port."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(method, path, body=data, headers={"content-type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def fault(self, **spec: Any) -> None:
        """Replace the injected faults (none: clear them)."""
        status, body = self.call("POST", "/admin/fault", spec)
        assert status == 200, body

    def metric(self, name: str) -> float:
        """Sum of the samples of ``name`` on ``/metrics``."""
        status, body = self.call("GET", "/metrics")
        assert status == 200
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name:
                    total += s.value
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def emulators(tmp: Path, count: int, *args: str) -> Iterator[list[Emulator]]:
    """``count`` engine doubles (``isthmus emulate --port 0 ARGS``), started in parallel."""
    isthmus = Path(sys.executable).parent / "isthmus"
    emus = []
    for k in range(count):
        log = tmp / f"emulate-{k}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([str(isthmus), "emulate", "--port", "0", *args], stdout=sink,
                                    stderr=subprocess.STDOUT)
        emus.append(Emulator(proc, log))
    try:
        deadline = time.monotonic() + 30
        for e in emus:
            while not e.port:
                m = READY.search(e.log.read_bytes())
                if m:
                    e.port = int(m.group(1))
                elif e.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"emulator did not start:\n{e.log.read_text(errors='replace')}")
                else:
                    time.sleep(0.02)
        yield emus
    finally:
        for e in emus:
            e.stop()
