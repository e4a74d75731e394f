"""The engine double's HTTP face: a Starlette app with vLLM's OpenAI-compatible routes.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics``; with ``admin`` on, to loopback clients only: ``GET|POST /admin/fault`` and
``POST /reset_prefix_cache``. See :mod:`isthmus.emulator` for the behaviour of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from isthmus.core.errors import ConfigError
from isthmus.core.tokenizer import ByteChunkTokenizer, Tokenizer
from isthmus.emulator.config import EmulatorConfig, FaultSpec
from isthmus.emulator.engine import EngineDouble, Generation
from isthmus.emulator.faults import FaultState, fault_spec_from_json
from isthmus.emulator.filler import FillerText
from isthmus.emulator.kv_events import KvCacheWatcher, KvEvent, KvEventPublisher
from isthmus.emulator.metrics import EmulatorMetrics
from isthmus.emulator.openai_api import (
    DONE_EVENT,
    ApiError,
    StreamFormatter,
    chat_body,
    completion_body,
    error_body,
    parse_generation,
)
from isthmus.engine.replica import Replica

log = logging.getLogger(__name__)

_JSON = b"application/json"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def api_error_response(err: ApiError) -> Response:
    # a 413 leaves the rest of the body unread: close the connection rather than drain it
    headers = {"connection": "close"} if err.status == 413 else None
    return json_response(err.body(), err.status, headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or :class:`ApiError` 413 as soon as it is known to exceed ``limit`` bytes
    (from ``Content-Length``, else while reading): an oversized body is never read in full."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_loopback(request: Request) -> bool:
    if request.client is None:
        return False
    try:
        ip = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class _Die(Exception):
    """Raised inside a response to end its connection abruptly (an injected fault)."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _GenerationResponse(Response):
    """Runs a generation's producer while watching for the client going away.

    Whichever ends first wins: a disconnect cancels the producer; either way ``on_close`` runs (it
    aborts the engine request if it is still there). A producer raising :class:`_Die` leaves the
    response incomplete, which makes the server close the connection.
    """

    def __init__(self, produce: Callable[[Send], Awaitable[None]], on_close: Callable[[], None]) -> None:
        self._produce = produce
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                exc = producer.exception()
                if exc is not None and not isinstance(exc, (_Die, OSError)):
                    raise exc
        finally:
            producer.cancel()
            watcher.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
            self._on_close()


class EmulatorApp:
    """One engine double: the replica, its step loop, metrics, faults, KV events and the routes.

    The constructor only builds objects; sockets (the KV-event publisher) and the engine task are
    created by the ASGI lifespan, i.e. when a server starts :attr:`asgi`.

    Args:
        config: the settings.
        tokenizer: what prompts are tokenized with (default: the built-in byte-chunk one).
        clock: monotonic wall clock, seconds.
    """

    def __init__(self, config: EmulatorConfig, tokenizer: Tokenizer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.resolved = config.resolve()
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteChunkTokenizer()
        self.model_name = config.model_name
        self._clock = clock
        r = self.resolved
        self.replica = Replica(r.spec, r.perf, r.num_blocks, track_tokens=True)
        cache_info = {"block_size": str(r.spec.block_size), "num_gpu_blocks": str(r.num_blocks),
                      "enable_prefix_caching": str(r.spec.enable_prefix_caching),
                      "gpu_memory_utilization": str(r.spec.gpu_memory_utilization), "cache_dtype": "auto"}
        self.metrics = EmulatorMetrics(self.model_name, self.replica.stats, cache_info, r.max_model_len)
        self.filler = FillerText(self.tokenizer, config.seed)
        self.faults = FaultState(config.faults, config.seed)
        self.kv_publisher: KvEventPublisher | None = None
        watcher: KvCacheWatcher | None = None
        if config.kv_events_endpoint:
            self.kv_publisher = KvEventPublisher(config.kv_events_endpoint, config.kv_events_encoding,
                                                 config.kv_events_topic, config.kv_events_connect)
            watcher = KvCacheWatcher(self.replica.pool)
        self._watcher = watcher
        self.engine = EngineDouble(self.replica, config.time_scale, self.metrics, kv_watcher=watcher,
                                   kv_sink=self._publish_kv, clock=clock)
        self._created = 0
        self.stopping = False
        self.on_ready: list[Callable[[], None]] = []
        """Called once the engine runs (the server is about to accept requests)."""
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        if config.admin:
            routes += [
                Route("/admin/fault", self.admin_fault, methods=["GET", "POST"]),
                Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
            ]
        self.asgi = Starlette(routes=routes, lifespan=self._lifespan,
                              exception_handlers={HTTPException: self._http_exception,
                                                  Exception: self._internal_error})

    # ----------------------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._created = int(time.time())
        if self.kv_publisher is not None:
            endpoint = self.kv_publisher.open()
            log.info("KV events: ZMQ PUB %s %s (%s encoding)", "connected to" if self.config.kv_events_connect
                     else "bound at", endpoint, self.config.kv_events_encoding)
        task = asyncio.create_task(self.engine.run(), name="engine-double")
        for callback in self.on_ready:
            callback()
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.kv_publisher is not None:
                self.kv_publisher.close()

    def _publish_kv(self, events: list[KvEvent]) -> None:
        if self.kv_publisher is not None:
            self.kv_publisher.publish(events, time.time())

    # ----------------------------------------------------------------------------- errors
    async def _http_exception(self, _request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return json_response(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    async def _internal_error(self, _request: Request, exc: Exception) -> Response:
        log.error("unhandled error: %r", exc)
        return json_response(error_body(500, "internal server error"), 500)

    # ----------------------------------------------------------------------------- plain routes
    async def models(self, _request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self._created, "owned_by": "vllm",
                "root": self.config.model, "parent": None, "max_model_len": self.resolved.max_model_len}
        return json_response({"object": "list", "data": [card]})

    async def health(self, _request: Request) -> Response:
        if self.faults.spec.unhealthy:
            return json_response(error_body(503, "unhealthy (injected fault)"), 503)
        return Response(status_code=200)

    async def metrics_endpoint(self, _request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def admin_fault(self, request: Request) -> Response:
        """``GET``: the current faults; ``POST`` a JSON object of :class:`FaultSpec` fields: the new
        faults (fields left out are off, so ``{}`` clears every fault)."""
        if not _is_loopback(request):
            return json_response(error_body(403, "the admin endpoints answer loopback clients only"), 403)
        if request.method == "POST":
            try:
                body = await read_body(request, 64 * 1024)
                self.faults.spec = fault_spec_from_json(orjson.loads(body) if body.strip() else {})
            except ApiError as err:
                return api_error_response(err)
            except (ValueError, ConfigError) as exc:
                return json_response(error_body(400, str(exc)), 400)
            log.warning("faults now: %s", self.faults.spec)
        return json_response(self.faults.as_json())

    async def reset_prefix_cache(self, request: Request) -> Response:
        """Drop every cached block no request holds (vLLM's ``/reset_prefix_cache``)."""
        if not _is_loopback(request):
            return json_response(error_body(403, "the admin endpoints answer loopback clients only"), 403)
        self.replica.pool.reset_prefix_cache()
        if self._watcher is not None:
            self.engine.publish_kv(self._watcher.cleared())
        return Response(status_code=200)

    # ----------------------------------------------------------------------------- generation
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        received = self._clock()
        try:
            raw = await read_body(request, self.config.max_body_bytes)
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, f"Invalid JSON body: {exc}") from None
            params = parse_generation(data, chat=chat, served_model=self.model_name, tokenizer=self.tokenizer,
                                      max_model_len=self.resolved.max_model_len)
        except ApiError as err:
            return api_error_response(err)
        spec = self.faults.spec
        if self.faults.draw_error():
            status = spec.error_status
            return json_response(error_body(status, f"injected failure ({status})"), status)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        outputs = self.filler.draw(params.max_tokens, params.prompt_ids, params.seed)
        gen = Generation(rid, params.prompt_ids, outputs, received, priority=params.priority)
        try:
            self.engine.submit(gen)
        except ValueError as exc:
            return json_response(error_body(400, str(exc)), 400)
        headers = [(b"x-request-id", (request.headers.get("x-request-id") or rid).encode("latin-1", "replace"))]
        created = int(time.time())

        async def produce(send: Send) -> None:
            if params.stream:
                await self._stream(send, gen, params.chat, params.include_usage, params.continuous_usage, created,
                                   headers, spec)
            else:
                await self._whole(send, gen, params.chat, created, headers, spec)

        def close() -> None:
            self.engine.abort(gen.id)

        return _GenerationResponse(produce, close)

    async def _whole(self, send: Send, gen: Generation, chat: bool, created: int,
                     headers: list[tuple[bytes, bytes]], spec: FaultSpec) -> None:
        while not gen.done:
            gen.changed.clear()
            await gen.changed.wait()
        if gen.error is not None:
            body = orjson.dumps(error_body(500, f"generation failed: {gen.error}"))
            status = 500
        else:
            text = "".join(self.filler.text(t) for t in gen.output_ids[:gen.produced])
            make = chat_body if chat else completion_body
            body = orjson.dumps(make(gen.id, created, self.model_name, text, gen.prompt_tokens, gen.produced))
            status = 200
        if spec.stall_after is not None:
            await self._stall(spec)
        start = {"type": "http.response.start", "status": status,
                 "headers": [(b"content-type", _JSON), (b"content-length", str(len(body)).encode()), *headers]}
        await send(start)
        if spec.die_after is not None:
            self._die(spec)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, send: Send, gen: Generation, chat: bool, include_usage: bool, continuous: bool,
                      created: int, headers: list[tuple[bytes, bytes]], spec: FaultSpec) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), *headers]})
        fmt = StreamFormatter(gen.id, created, self.model_name, chat, gen.prompt_tokens, continuous)
        total = len(gen.output_ids)
        sent_events = 0
        stalled = False
        delivered = 0
        role_pending = chat  # vLLM sends the role chunk with the first token, not before it
        pending: list[bytes] = []
        while True:
            if role_pending and (gen.produced or gen.done):
                pending.append(fmt.role_chunk())
                role_pending = False
            while delivered < gen.produced:
                delivered += 1
                pending.append(fmt.token_chunk(self.filler.text(gen.output_ids[delivered - 1]), delivered,
                                               delivered == total))
            finished = gen.done and delivered >= gen.produced
            if finished:
                if gen.error is not None:
                    pending.append(fmt.error_chunk(500, f"generation failed: {gen.error}"))
                elif include_usage:
                    pending.append(fmt.usage_chunk(delivered))
                pending.append(DONE_EVENT)
            # send what is pending, stopping where a fault says so
            batch: list[bytes] = []
            for event in pending:
                n = sent_events + len(batch)
                if spec.die_after is not None and n >= spec.die_after:
                    await self._send_events(send, batch)
                    self._die(spec)
                if spec.stall_after is not None and not stalled and n >= spec.stall_after:
                    await self._send_events(send, batch)
                    sent_events += len(batch)
                    batch = []
                    stalled = True
                    await self._stall(spec)
                batch.append(event)
            await self._send_events(send, batch)
            sent_events += len(batch)
            pending = []
            if finished:
                break
            if spec.stall_after is not None and not stalled and sent_events >= spec.stall_after:
                stalled = True
                await self._stall(spec)
                continue
            gen.changed.clear()
            await gen.changed.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _send_events(send: Send, events: list[bytes]) -> None:
        if events:
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})

    async def _stall(self, spec: FaultSpec) -> None:
        """Wait out a stall: ``stall_s`` seconds, or until the client goes away (the response is then
        cancelled); a server shutting down ends every stall so that its streams can drain."""
        end = math.inf if spec.stall_s is None else self._clock() + spec.stall_s
        while not self.stopping and (left := end - self._clock()) > 0:
            await asyncio.sleep(min(left, 0.05))

    def begin_shutdown(self) -> None:
        """The server got SIGTERM / SIGINT: stalled streams resume (and can finish)."""
        self.stopping = True

    @staticmethod
    def _die(spec: FaultSpec) -> None:
        if spec.die_exit:
            log.error("injected fault: exiting the process mid-response")
            logging.shutdown()
            os._exit(1)
        raise _Die
