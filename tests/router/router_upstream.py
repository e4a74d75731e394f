"""A small real OpenAI-compatible upstream for router tests: an aiohttp server on a loopback port.

It runs in a thread with its own event loop and speaks just enough of vLLM's API: streamed (SSE) and
plain ``/v1/completions`` and ``/v1/chat/completions``, ``/metrics`` with vLLM's gauge names and
``/health``. Its behaviour is set per test through plain attributes (``mode`` and friends), and it
records what it received and when it noticed a client going away.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    """One request the upstream received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


@dataclass
class Upstream:
    """Behaviour knobs (read on every request) and records.

    ``mode``: ``ok`` (answer normally), ``stall`` (stream ``fail_after`` chunks then go silent),
    ``die`` (stream ``fail_after`` chunks then drop the connection), ``status`` (answer ``status``
    with a JSON error body), ``hang`` (never answer).
    """

    name: str
    mode: str = "ok"
    chunks: int = 5
    chunk_interval_s: float = 0.0
    first_chunk_delay_s: float = 0.0
    fail_after: int = 2
    pad: int = 0  # extra characters in each streamed token's text
    written: int = 0  # streamed chunks written so far (all requests)
    status: int = 500
    healthy: bool = True
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_gpu_blocks: int | None = None
    seen: list[Seen] = field(default_factory=list)
    cancelled_at: list[float] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def completions(self) -> int:
        return sum(1 for s in self.seen if s.path.startswith("/v1/"))

    # ------------------------------------------------------------------ handlers
    async def _complete(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_at.append(time.monotonic())
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body, time.monotonic()))
        chat = request.path.endswith("/chat/completions")
        if self.mode == "status":
            return web.json_response({"error": {"message": f"{self.name} says {self.status}", "type": "x",
                                                "code": self.status}}, status=self.status)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        headers = {"x-upstream-name": self.name, "x-isthmus-target": "spoofed"}
        if not body.get("stream"):
            await asyncio.sleep(self.first_chunk_delay_s)
            text = " ".join(f"tok{i}" for i in range(self.chunks))
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "length"} if chat else
                                      {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
            return web.json_response({
                "id": "cmpl-1", "object": "chat.completion" if chat else "text_completion", "created": 1,
                "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 3, "completion_tokens": self.chunks, "total_tokens": 3 + self.chunks},
            }, headers=headers)
        resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
        await resp.prepare(request)
        await asyncio.sleep(self.first_chunk_delay_s)
        for i in range(self.chunks):
            if self.mode in ("stall", "die") and i == self.fail_after:
                if self.mode == "die":
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                await asyncio.sleep(3600)
            if chat:
                delta = {"content": f"tok{i} "} if i else {"role": "assistant", "content": f"tok{i} "}
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            else:
                chunk = {"id": "c", "object": "text_completion", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "text": f"tok{i} " + "x" * self.pad, "finish_reason": None,
                                      "logprobs": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.written += 1
            await asyncio.sleep(self.chunk_interval_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="m"}} {self.running}',
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv_usage}',
        ]
        if self.num_gpu_blocks is not None:
            lines += ["# TYPE vllm:cache_config_info gauge",
                      f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="{self.num_gpu_blocks}"}} 1.0']
        return web.Response(text="\n".join(lines) + "\n")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(handler_args={"handler_cancellation": True})
            app.router.add_post("/v1/completions", self._complete)
            app.router.add_post("/v1/chat/completions", self._complete)
            app.router.add_get("/metrics", self._metrics)
            app.router.add_get("/health", self._health)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"upstream {self.name}", daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop = None


@contextmanager
def upstreams(*names: str, **knobs: Any) -> Iterator[list[Upstream]]:
    """Start one upstream per name (same knobs), stop them all at the end."""
    ups = [Upstream(name=n, **knobs) for n in names]
    for u in ups:
        u.start()
    try:
        yield ups
    finally:
        for u in ups:
            u.stop()
