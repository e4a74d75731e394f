"""The router's HTTP face: an OpenAI-compatible proxy (served by :mod:`.front`; upstream via :mod:`.upstream`).

Life of ``POST /v1/completions`` or ``/v1/chat/completions``:

1. admission: API key (constant-time compare) -> 401; more than ``limits.max_concurrent`` requests
   in progress -> 429; a body over ``limits.max_body_bytes`` -> 413 (from ``Content-Length`` before
   reading anything, else as soon as the limit is passed); malformed JSON -> 400; a model not in
   ``models`` -> 404;
2. the body is parsed once; the prompt is tokenized and hashed into blocks (:mod:`.prompt`);
3. decision: the policy chooses on a :class:`~isthmus.core.snapshot.ClusterSnapshot` of the
   collectors' state. No target: with no replica up at all, 503 at once (``Retry-After``);
   else the request is held and re-asked every ``recheck_s`` (oldest first) until
   ``limits.queue_wait_s``, then 503. A forward (regional mode) goes to the peer region's router
   with ``x-isthmus-hops: 1``; a request that arrives with hops >= 1 is decided with ``hops = 1``;
4. the original body bytes go upstream; nothing reaches the client before the upstream's first body
   chunk, so until then a failed attempt (connect error or timeout, a 5xx answer, a stream broken or
   silent before its first chunk) may be retried on another replica, within the retry budget and
   ``retries.max_attempts``, after a jittered backoff. SSE streams are then relayed chunk by chunk,
   byte for byte; other answers are buffered whole and relayed byte for byte;
5. after the first byte nothing is retried: a stream that breaks or stays silent for
   ``timeouts.idle_s`` gets an SSE error event and is closed, never a ``[DONE]``;
6. the outcome (TTFT at the router, end to end, success) goes to ``policy.observe`` and to the
   metrics. A client that disconnects cancels the upstream request at once.

The two proxied routes are served by a plain ASGI callable in front of Starlette (which serves
the other endpoints), and upstream exchanges go through :mod:`.upstream`'s pooled HTTP/1.1 client:
the request path does no per-request framework work. Served by :mod:`.front`, a proxied request
learns of its client's disconnect through a callback; under another ASGI server, a task waits for
``http.disconnect``.

Answers carry ``x-request-id`` (the client's, else a new one), and relayed ones also
``x-isthmus-target`` (replica id), ``x-isthmus-region``, ``x-isthmus-cost-ms`` (the policy's total
estimate) and ``x-isthmus-reason``. Hop-by-hop headers are stripped both ways; the client's
``Authorization`` and cookies never go upstream; upstream URLs come only from the configuration.

Other endpoints: ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (the router's own), ``GET /isthmus/summary`` (this region's replicas, for peers).
``/health`` answers 200 while some replica of this region is up (healthy and not ejected), else 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from isthmus.core.policy import Decision, Outcome, Policy, PolicyRegistry, uses_prefix
from isthmus.core.request import Request as RoutedRequest
from isthmus.core.slo import UnknownSLOClassError, deadline_s, resolve_slo_class
from isthmus.core.tokenizer import ByteChunkTokenizer, Tokenizer
from isthmus.router.config import RouterConfig
from isthmus.router.errors import (
    RouterHTTPError,
    error_body,
    model_not_found,
    sse_error_event,
    unauthorized,
    unavailable,
)
from isthmus.router.front import DISCONNECT_EXTENSION, PIPE_EXTENSION, BodyPipe
from isthmus.router.hold import HoldQueue
from isthmus.router.kv_events import KvEventSubscribers
from isthmus.router.metrics import RouterMetrics
from isthmus.router.prompt import BadRequest, PromptInfo, parse_request
from isthmus.router.reliability import RetryBudget, backoff_s
from isthmus.router.state import ClusterState, Collectors, Dispatch, PeerState, ReplicaState
from isthmus.router.upstream import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    origin_of,
)
from isthmus.tokenizer_file import load_tokenizer

log = logging.getLogger("isthmus.router")

HOPS_HEADER = "x-isthmus-hops"
ORIGIN_HEADER = "x-isthmus-origin"

# RFC 9110 §7.6.1 connection-specific fields, plus what the router recomputes or must not pass on
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade",
})
_NOT_UPSTREAM = frozenset(n.encode() for n in _HOP_BY_HOP | {
    "host", "content-length", "content-type", "authorization", "cookie", "expect", "x-request-id"})
_NOT_DOWNSTREAM = frozenset(n.encode() for n in _HOP_BY_HOP | {
    "content-length", "server", "date", "set-cookie", "x-request-id"})
PROXY_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# request header fields the router itself reads
_READ = frozenset({b"authorization", b"content-length", b"x-request-id", HOPS_HEADER.encode(),
                   ORIGIN_HEADER.encode(), b"connection"})
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# new request ids: 128 random bits from a generator seeded once from the OS (no system call per request)
_ID_BITS = random.Random()


def _header_value(text: str) -> bytes:
    """``text`` as a safe header value: latin-1, no control characters, at most 200 characters."""
    text = text[:200]
    if text.isascii() and text.isprintable():  # the usual case: printable ASCII is exactly " " to "~"
        return text.encode("ascii")
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean.encode("latin-1")


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names listed in a ``Connection`` value (hop-by-hop by declaration), lower case."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def _too_large(limit: int) -> RouterHTTPError:
    return RouterHTTPError(413, f"request body over the limit of {limit} bytes", "invalid_request_error",
                           "request_too_large")


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


@dataclass(slots=True)
class Routed:
    """A committed decision: counted on its target until :meth:`release`.

    Attributes:
        decision: the policy's decision.
        decided_at: clock seconds.
        replica: the replica (``None`` when forwarded to a peer router).
        peer: the peer router when forwarded.
        dispatch: in-flight ticket on the replica.
        cached_tokens: prompt tokens the prefix mirror expects cached on the replica.
    """

    decision: Decision
    decided_at: float
    replica: ReplicaState | None = None
    peer: PeerState | None = None
    dispatch: Dispatch | None = None
    cached_tokens: int = 0
    released: bool = False

    @property
    def target(self) -> str:
        return self.replica.id if self.replica is not None else self.peer.region if self.peer is not None else ""

    def release(self) -> None:
        """End the in-flight count. Idempotent."""
        if self.released:
            return
        self.released = True
        if self.dispatch is not None:
            self.dispatch.finish()
        if self.peer is not None:
            self.peer.in_flight -= 1


@dataclass(slots=True)
class RequestContext:
    """One client request, parsed."""

    request_id: str
    path: str
    raw: bytes
    info: PromptInfo
    routed_request: RoutedRequest
    hops: int
    arrival: float
    upstream_head: bytes
    attempts: int = 0
    status: int = 0
    ttft_s: float = math.nan
    target: str = ""
    region: str = ""
    forwarded: bool = False
    error: str = ""
    output_tokens: int | None = None  # counted from the answer (stream events, or usage), when known


class _Learner:
    """Fits a learned policy's model off the event loop.

    A policy that can be trained from outside (``refit_due``, ``training_data``, ``new_trainer``,
    ``install``; e.g. ``lodestar``) is created with ``training: external`` unless the config says
    otherwise. After each outcome the loop asks ``refit_due``; if so it takes the training data (a
    copy) and hands it to one worker thread, which fits with a trainer of its own; the finished model
    is installed from the loop (one reference swap), so a decision never sees a half-built model and
    the loop never waits for a fit. At most one fit runs at a time.
    """

    def __init__(self, policy: Any, state_file: Path | None = None) -> None:
        import concurrent.futures

        self.policy = policy
        self.state_file = state_file
        self.trainer = policy.new_trainer()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="isthmus-fit")
        self.fitting = False
        self.fits = 0
        self.failures = 0
        self.last_fit_s = math.nan  # wall seconds the last fit took
        self.last_fit_at = math.nan  # clock seconds when it was installed

    @classmethod
    def of(cls, policy: Policy, config: RouterConfig, registry: PolicyRegistry | None) -> _Learner | None:
        """A learner for ``policy`` (re-created with ``training: external``), or ``None`` for a policy
        that does not learn from outside."""
        if not all(hasattr(policy, m) for m in ("refit_due", "training_data", "new_trainer", "install")):
            return None
        params = dict(config.policy.params)
        if "training" not in params:
            params["training"] = "external"
            policy = config.model_copy(update={"policy": config.policy.model_copy(
                update={"params": params})}).make_policy(registry)
        return cls(policy, config.policy.state_file)

    def load(self) -> None:
        """Take up the state a previous run saved, if any (a file that cannot be read is logged and
        left alone: the policy starts afresh rather than the router failing)."""
        path = self.state_file
        if path is None or not path.exists():
            return
        try:
            self.policy.load_state_bytes(path.read_bytes())
        except Exception as exc:  # a corrupt or foreign file: say so, start afresh
            log.warning("policy %s: cannot load its state from %s (%s); starting afresh", self.policy.name, path,
                        exc)
            return
        log.info("policy %s: state loaded from %s (%d samples)", self.policy.name, path,
                 getattr(self.policy, "samples_seen", 0))

    def save(self) -> None:
        """Write the policy's state to ``state_file`` atomically (temporary file, then rename)."""
        path = self.state_file
        if path is None:
            return
        data = self.policy.state_bytes()
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as exc:
            log.warning("policy %s: cannot save its state to %s: %s", self.policy.name, path, exc)

    def maybe_fit(self) -> None:
        """Start a fit in the worker when one is due and none runs (call from the loop)."""
        policy = self.policy
        if self.fitting or not policy.refit_due():
            return
        data = policy.training_data()
        self.fitting = True
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        future = loop.run_in_executor(self.executor, self.trainer.fit, data)

        def done(f: asyncio.Future[Any]) -> None:
            self.fitting = False
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                self.failures += 1
                log.warning("policy %s: a background fit failed: %s", policy.name, exc)
                return
            policy.install(f.result())
            self.fits += 1
            self.last_fit_s = time.perf_counter() - started
            self.last_fit_at = time.monotonic()
            log.info("policy %s: model %d installed (fit %.2f s)", policy.name, self.fits, self.last_fit_s)
            self.save()
            self.maybe_fit()  # samples that came in meanwhile may already call for the next one

        future.add_done_callback(done)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.save()

    def collect(self) -> list[Any]:
        """Prometheus collector: training samples, fits, the last fit's duration and age."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        seen = float(getattr(self.policy, "samples_seen", math.nan))
        age = time.monotonic() - self.last_fit_at if self.last_fit_at == self.last_fit_at else math.nan
        return [
            CounterMetricFamily("isthmus_router_learn_samples", "Training samples the learned policy recorded",
                                value=seen),
            CounterMetricFamily("isthmus_router_learn_fits", "Models fitted in the background and installed",
                                value=float(self.fits)),
            CounterMetricFamily("isthmus_router_learn_fit_failures", "Background fits that failed",
                                value=float(self.failures)),
            GaugeMetricFamily("isthmus_router_learn_last_fit_seconds", "Wall seconds the last fit took",
                              value=self.last_fit_s),
            GaugeMetricFamily("isthmus_router_learn_model_age_seconds", "Seconds since the last model was "
                              "installed (nan: none yet)", value=age),
        ]


class _Failure(Exception):
    """One failed upstream attempt before any byte reached the client.

    Attributes:
        kind: ``connect``, ``connect_timeout``, ``status``, ``stall``, ``broken``, ``too_large``.
        status: what the client gets if this is the last attempt.
        backend: the backend caused it (counts toward ejection).
        response: an upstream answer to relay as is if this is the last attempt (status, headers, body).
    """

    def __init__(self, kind: str, status: int, message: str, backend: bool = True,
                 response: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message
        self.backend = backend
        self.response = response


class Router:
    """The live router: configuration, policy, state, collectors and the request path.

    Construction has no side effects; :meth:`start` opens the upstream sessions and starts the
    collectors (from the running loop), :meth:`stop` undoes it.

    Args:
        config: the router configuration.
        registry: where the policy name is looked up (default: the built-in policies).
        clock: monotonic seconds.
        tokenizer: prompt tokenizer (default: the config's ``tokenizer`` file, loaded on first use,
            else the built-in byte-chunk tokenizer the engine double uses).

    Replicas with ``kv_events`` configured get a KV-event subscriber
    (:mod:`isthmus.router.kv_events`) while the router runs, when the policy uses the prefix mirror.
    """

    def __init__(self, config: RouterConfig, *, registry: PolicyRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.clock = clock
        self.policy: Policy = config.make_policy(registry)
        self.learner = _Learner.of(self.policy, config, registry)
        if self.learner is not None:
            self.policy = self.learner.policy
        self.keep_prefix = uses_prefix(self.policy)
        self.state = ClusterState(config, keep_prefix=self.keep_prefix, clock=clock)
        self.recheck_s = config.resolved_recheck_s(self.policy)
        self.sync_period_s = config.resolved_sync_period_s(self.policy)
        self.hold: HoldQueue[Routed] = HoldQueue(self.recheck_s, lambda r: r.release(),
                                                 order=config.resolved_queue(self.policy),
                                                 max_hold_s=config.limits.max_hold_s, clock=clock)
        self.state.decode_step = bool(getattr(self.policy, "uses_decode_step", False))
        self.slo = config.slo.catalog() if config.slo is not None else None
        self._slo_header = self.slo.header.encode() if self.slo is not None else None
        self._read_names = _READ | {self._slo_header} if self._slo_header is not None else _READ
        self._priority_replicas = frozenset(
            rid for rid, rc in zip(config.replica_ids, config.replicas, strict=True) if rc.priority)
        self.metrics = RouterMetrics(self.state, held=lambda: len(self.hold), clock=clock, active=lambda: self.active)
        if self.learner is not None:
            self.metrics.registry.register(self.learner)
        self.budget = RetryBudget(config.retries.budget, config.retries.max_balance)
        self.rng = np.random.default_rng([config.policy.seed, 1])  # backoff jitter, apart from the policy's
        self._tokenizer = tokenizer
        self.models = config.models
        self._model_set = frozenset(config.models)
        self._known_regions = frozenset(
            [config.region, *(r.region for r in config.replicas), *(p.region for p in config.peers)])
        self._keys = tuple(k.encode() for k in config.accepted_api_keys())
        self.active = 0
        self.pool: UpstreamPool | None = None
        self._control: UpstreamPool | None = None
        self.collectors: Collectors | None = None
        events = {rid: rc.kv_events for rid, rc in zip(config.replica_ids, config.replicas, strict=True)
                  if rc.kv_events is not None} if self.keep_prefix else {}
        self.kv_events = KvEventSubscribers(events, self.state.apply_kv_events)

    @property
    def tokenizer(self) -> Tokenizer:
        """The prompt tokenizer; a configured ``tokenizer`` file is read on first use.

        Raises:
            ConfigError: the configured file is missing, unreadable, or ``tokenizers`` is not installed.
        """
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer) if self.config.tokenizer is not None \
                else ByteChunkTokenizer()
        return self._tokenizer

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the upstream connection pools and start the collectors."""
        if self.learner is not None:
            self.learner.load()  # what a learned policy learned in an earlier run
        self.pool = UpstreamPool(keepalive_s=30.0, clock=self.clock)
        # probes, scrapes and polls have a pool of their own, so a saturated data path cannot delay them
        self._control = UpstreamPool(keepalive_s=30.0, clock=self.clock)
        self.collectors = Collectors(self.state, self._control, sync_period_s=self.sync_period_s)
        self.collectors.start()
        self.tokenizer  # noqa: B018 - read a configured tokenizer file now, not on the first request
        self.kv_events.start()
        log.info("router up: region %s, mode %s, policy %s, %d replicas, %d peers", self.config.region,
                 self.config.mode, self.policy.name, len(self.state.local_ids), len(self.state.peers))

    async def stop(self) -> None:
        """Stop the collectors and close the pools."""
        if self.learner is not None:
            self.learner.close()
        await self.hold.close()
        if self.collectors is not None:
            await self.collectors.stop()
        await self.kv_events.stop()
        if self.pool is not None:
            self.pool.close()
        if self._control is not None:
            self._control.close()
        log.info("router stopped")

    # ------------------------------------------------------------------ admission
    def _check_key(self, authorization: bytes) -> None:
        if not self._keys:
            return
        scheme, _, given = authorization.partition(b" ")
        token = given.strip() if scheme.lower() == b"bearer" else b""
        ok = False
        for key in self._keys:  # every key is compared, whatever matched: constant time in the key
            ok |= hmac.compare_digest(token, key)
        if not ok:
            raise unauthorized()

    def _request_id(self, given: bytes | str | None) -> str:
        if given is not None:
            text = given.decode("latin-1") if isinstance(given, bytes) else given
            if _REQUEST_ID.match(text):
                return text
        return f"{_ID_BITS.getrandbits(128):032x}"

    async def _read_body(self, receive: Receive, declared: bytes | None) -> bytes:
        limit = self.config.limits.max_body_bytes
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RouterHTTPError(400, "invalid Content-Length") from None
            if size > limit:
                raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _scan_headers(self, raw: list[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]:
        """The request fields the router reads (first occurrence) and the ones that may go upstream."""
        read: dict[bytes, bytes] = {}
        rest: list[tuple[bytes, bytes]] = []
        names = self._read_names
        for name, value in raw:
            if name in names:
                read.setdefault(name, value)
            elif name not in _NOT_UPSTREAM and not name.startswith(b"x-isthmus-"):
                rest.append((name, value))
        return read, rest

    def _upstream_head(self, rest: list[tuple[bytes, bytes]], connection: bytes | None, request_id: str) -> bytes:
        drop = _connection_tokens(connection) if connection else frozenset()
        lines = [b"%s: %s\r\n" % (k, v) for k, v in rest if k not in drop]
        lines.append(b"x-request-id: %s\r\ncontent-type: application/json\r\n" % request_id.encode())
        return b"".join(lines)

    async def handle_proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/completions`` and ``/v1/chat/completions`` (a plain ASGI callable)."""
        arrival = self.clock()
        read, rest = self._scan_headers(scope["headers"])
        request_id = self._request_id(read.get(b"x-request-id"))
        body_read = False
        try:
            self._check_key(read.get(b"authorization", b""))
            if self.active >= self.config.limits.max_concurrent:
                raise RouterHTTPError(429, "too many requests in progress; retry later", "rate_limit_error",
                                      "rate_limit_exceeded", {"retry-after": str(self.config.limits.retry_after_s)})
            self.active += 1
            try:
                raw = await self._read_body(receive, read.get(b"content-length"))
                body_read = True
                ctx = self._prepare(scope["path"], read, raw, request_id, arrival,
                                    self._upstream_head(rest, read.get(b"connection"), request_id))
            except BaseException:
                self.active -= 1
                raise
        except RouterHTTPError as exc:
            await self._send_error_asgi(send, exc, request_id, close=not body_read)
            return
        except _ClientGone:
            self.metrics.answered(499)
            return
        await ProxyResponse(self, ctx)(scope, receive, send)

    async def _send_error_asgi(self, send: Send, exc: RouterHTTPError, request_id: str, close: bool) -> None:
        """An error the router raised itself, before any upstream attempt; ``close``: the rest of the
        body is not worth reading, so the connection closes after the answer."""
        self.metrics.answered(exc.status)
        log.info("request %s rejected: %d %s", request_id, exc.status, exc.code or exc.type)
        body = exc.body()
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode()),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), _header_value(v)) for k, v in exc.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _prepare(self, path: str, read: dict[bytes, bytes], raw: bytes, request_id: str, arrival: float,
                 upstream_head: bytes) -> RequestContext:
        chat = path.endswith("/chat/completions")
        catalog = self.slo
        try:
            info = parse_request(raw, chat, self.config.block_size, self.tokenizer, hashes=self.keep_prefix,
                                 slo_field=catalog.body_field if catalog is not None else None)
        except BadRequest as exc:
            raise RouterHTTPError(400, str(exc)) from None
        if info.model not in self._model_set:
            raise model_not_found(info.model, self.models)
        slo = None
        if catalog is not None:
            assert self._slo_header is not None
            auth = read.get(b"authorization", b"")
            try:
                slo = resolve_slo_class(
                    catalog, header=read[self._slo_header].decode("latin-1") if self._slo_header in read else None,
                    body=info.slo_class, model=info.model,
                    api_key=auth[7:].decode("latin-1").strip() if auth[:7].lower() == b"bearer " else None)
            except UnknownSLOClassError as exc:
                raise RouterHTTPError(400, str(exc), "invalid_request_error", "unknown_slo_class") from None
        try:
            hops = max(0, int(read.get(b"x-isthmus-hops", b"0")))
        except ValueError:
            raise RouterHTTPError(400, f"invalid {HOPS_HEADER} header") from None
        # The client's region: a peer router's forward says where the client is, and so may a
        # trusted edge in front of a central proxy (a hint for routing only); else this region.
        origin = self.config.region
        claimed = read.get(b"x-isthmus-origin", b"").decode("latin-1")
        if claimed and claimed in self._known_regions:
            origin = claimed
        routed = RoutedRequest(
            id=request_id, arrival=arrival, origin=origin, prompt_tokens=info.prompt_tokens,
            block_hashes=info.block_hashes, max_output_tokens=info.max_output_tokens, session=info.user, slo=slo,
            model=info.model,
        )
        return RequestContext(request_id=request_id, path=path, raw=raw, info=info, routed_request=routed,
                              hops=hops, arrival=arrival, upstream_head=upstream_head)

    def error_response(self, exc: RouterHTTPError, request_id: str) -> Response:
        """The client's answer for an error the router raised itself."""
        self.metrics.answered(exc.status)
        headers = {"x-request-id": request_id, **exc.headers}
        log.info("request %s rejected: %d %s", request_id, exc.status, exc.code or exc.type)
        return Response(exc.body(), status_code=exc.status, headers=headers, media_type="application/json")

    # ------------------------------------------------------------------ decisions
    def try_route(self, ctx: RequestContext, exclude: frozenset[str]) -> Routed | None:
        """Ask the policy now; commit and return the decision, or ``None`` for "hold".

        Raises:
            RouterHTTPError: the policy chose something that does not exist (a policy bug).
        """
        now = self.clock()
        snap = self.state.snapshot(now, hops=min(ctx.hops, 1), exclude=exclude)
        d = self.policy.choose(ctx.routed_request, snap)
        if d.target is None:
            if d.reject is not None:
                self.metrics.rejections.labels(d.reject).inc()
                raise RouterHTTPError(429, d.reason or f"rejected: {d.reject}", "rate_limit_error", d.reject)
            return None
        st = self.state
        if d.forward:
            peer = st.peers.get(d.target)
            if peer is None or ctx.hops >= 1:
                raise RouterHTTPError(500, f"policy {self.policy.name} forwarded to {d.target!r}, which is not a "
                                           "peer region or not allowed", "server_error")
            peer.in_flight += 1
            self.metrics.decided(d.target, d.target, True)
            return Routed(d, now, peer=peer)
        replica = st.replicas.get(d.target)
        if replica is None:
            raise RouterHTTPError(500, f"policy {self.policy.name} chose unknown replica {d.target!r}", "server_error")
        cached = 0
        hashes = ctx.routed_request.block_hashes
        if hashes and self.keep_prefix:
            cached = min(st.matched_blocks(hashes, replica.id) * st.block_size, ctx.info.prompt_tokens)
            st.record_sent(replica.id, hashes)
        dispatch = replica.dispatch(ctx.info.prompt_tokens, deferred=bool(d.priority and d.priority > 0))
        self.metrics.decided(replica.id, replica.region, False)
        return Routed(d, now, replica=replica, dispatch=dispatch, cached_tokens=cached)

    async def route(self, ctx: RequestContext, exclude: frozenset[str]) -> Routed:
        """A committed decision for ``ctx``, holding the request while the policy says "not now".

        Raises:
            RouterHTTPError: 503 when nothing is available or the wait is over.
        """
        now = self.clock()
        local_only = ctx.hops >= 1
        if exclude and not any(r.healthy(now) for rid, r in self.state.replicas.items()
                               if rid not in exclude and (r.local or not local_only)):
            exclude = frozenset()  # nothing else to fail over to: the failed ones may be tried again
        if not len(self.hold):
            routed = self.try_route(ctx, exclude)
            if routed is not None:
                return routed
        retry_after = self.config.limits.retry_after_s
        if not self.state.any_healthy(now, local_only):  # full replicas free up: only then is waiting worth it
            raise unavailable("no replica is available; retry later", retry_after)
        wait_s = ctx.arrival + self.config.limits.queue_wait_s - now
        req = ctx.routed_request
        routed = await self.hold.wait(lambda: self.try_route(ctx, exclude), wait_s, deadline_s=deadline_s(req),
                                      priority=req.slo.priority if req.slo is not None else 0, group=req.model)
        if routed is None:
            raise unavailable(f"no replica became available within {self.config.limits.queue_wait_s:g} s", retry_after)
        return routed

    # ------------------------------------------------------------------ outcomes
    def backend_failure(self, routed: Routed, kind: str) -> None:
        """Count a backend-caused failure of ``routed``'s target (ejection after a run of them)."""
        target = routed.target
        self.metrics.upstream_errors.labels(target, kind).inc()
        if routed.replica is not None and routed.replica.ejector.failure(self.clock()):
            self.metrics.ejections.labels(target).inc()
            log.warning("replica %s ejected for %g s after %d consecutive failures", target,
                        routed.replica.ejector.cooldown_s, routed.replica.ejector.eject_after)

    def failed_targets(self, routed: Routed) -> set[str]:
        """Replica ids to keep a request away from after ``routed`` failed it (a failed forward: every
        replica of that peer region)."""
        if routed.peer is not None:
            region = routed.peer.region
            return {rid for rid, r in self.state.replicas.items() if not r.local and r.region == region}
        return {routed.target}

    def backend_success(self, routed: Routed) -> None:
        if routed.replica is not None:
            routed.replica.ejector.success()

    def observe(self, ctx: RequestContext, routed: Routed, ok: bool) -> None:
        """Tell the policy how the request went."""
        now = self.clock()
        target = ctx.target or routed.target
        outcome = Outcome(request=ctx.routed_request, target=target, decided_at=routed.decided_at,
                          ttft_s=ctx.ttft_s, e2e_s=now - ctx.arrival, cached_tokens=routed.cached_tokens, ok=ok,
                          output_tokens=ctx.output_tokens)
        try:
            self.policy.observe(outcome)
        except Exception:  # a policy bug must not break the request path
            log.exception("policy %s failed to observe an outcome", self.policy.name)
        if self.learner is not None:
            self.learner.maybe_fit()

    # ------------------------------------------------------------------ other endpoints
    async def handle_models(self, request: Request) -> Response:
        try:
            self._check_key(request.headers.get("authorization", "").encode("latin-1"))
        except RouterHTTPError as exc:
            return self.error_response(exc, self._request_id(request.headers.get("x-request-id")))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "isthmus"} for m in self.models]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def handle_health(self, request: Request) -> Response:
        now = self.clock()
        ok = self.state.any_healthy(now, local_only=True)
        body = {"status": "ok" if ok else "no replica available", "region": self.config.region}
        return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    async def handle_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def handle_summary(self, request: Request) -> Response:
        try:
            self._check_key(request.headers.get("authorization", "").encode("latin-1"))
        except RouterHTTPError as exc:
            return self.error_response(exc, self._request_id(request.headers.get("x-request-id")))
        return Response(orjson.dumps(self.state.summary(self.clock())), media_type="application/json")


class ProxyResponse:
    """The answer to one proxied request: decides, calls upstream (with retries) and relays.

    It owns the ASGI exchange from the start, so it can choose the status after the upstream
    answered and watch for the client going away meanwhile: a disconnect cancels the work at once,
    which closes the upstream connection.
    """

    __slots__ = ("_events", "_finished", "_gone", "_head", "_pipe", "_resp", "_routed", "_started", "_tail", "ctx",
                 "router")

    def __init__(self, router: Router, ctx: RequestContext) -> None:
        self.router = router
        self.ctx = ctx
        self._started = False
        self._finished = False
        self._gone = False
        self._pipe: BodyPipe | None = None
        self._resp: UpstreamResponse | None = None  # the response being piped
        self._routed: Routed | None = None  # ... the decision it answers
        self._head: tuple[int, list[tuple[bytes, bytes]]] = (0, [])  # ... and the answer's status and headers
        self._tail = b""
        self._events = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = self.router
        ctx = self.ctx
        task = asyncio.current_task()
        assert task is not None
        extensions = scope.get("extensions")
        on_disconnect = extensions.get(DISCONNECT_EXTENSION) if extensions else None
        self._pipe = extensions.get(PIPE_EXTENSION) if extensions else None
        watch: asyncio.Task[None] | None = None
        if on_disconnect is not None:  # our own server calls back: no watcher task needed
            on_disconnect(lambda: self._client_gone(task))
        else:
            watch = asyncio.get_running_loop().create_task(self._wait_disconnect(receive, task))
        try:
            await self._run(send)
        except asyncio.CancelledError:
            if not self._gone:
                raise  # cancelled from outside (shutdown): not ours to swallow
            task.uncancel()
            ctx.error = "client disconnected"
            ctx.status = 499  # nginx's "client closed request", whatever was relayed before
        finally:
            if watch is not None:
                watch.cancel()
            router.active -= 1
            router.metrics.answered(ctx.status or 499)
            if log.isEnabledFor(logging.INFO):
                log.info("request %s model=%s target=%s region=%s forwarded=%s status=%d attempts=%d ttft_ms=%.1f "
                         "e2e_ms=%.1f error=%s", ctx.request_id, ctx.info.model, ctx.target or "-",
                         ctx.region or "-", "yes" if ctx.forwarded else "no", ctx.status or 499, ctx.attempts,
                         ctx.ttft_s * 1e3, (router.clock() - ctx.arrival) * 1e3, ctx.error or "-")

    async def _wait_disconnect(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` (the request's) as soon as the client goes away before its answer is complete."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_gone(task)
                return

    def _client_gone(self, task: asyncio.Task[Any]) -> None:
        if not self._finished:
            self._gone = True
            task.cancel()

    async def _send_start(self, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._started = True
        self.ctx.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_error(self, send: Send, exc: RouterHTTPError) -> None:
        ctx = self.ctx
        ctx.error = ctx.error or exc.code or exc.type
        headers = [(b"content-type", b"application/json"), (b"x-request-id", ctx.request_id.encode())]
        headers += [(k.encode(), _header_value(v)) for k, v in exc.headers.items()]
        body = exc.body()
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send_start(send, exc.status, headers)
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self._finished = True

    async def _run(self, send: Send) -> None:
        router = self.router
        ctx = self.ctx
        cfg = router.config.retries
        router.budget.deposit()
        exclude: set[str] = set()
        last: _Failure | None = None
        retry = 0
        while True:
            try:
                routed = await router.route(ctx, frozenset(exclude))
            except RouterHTTPError as exc:
                if last is not None and exc.status == 503:
                    break  # nothing left to fail over to: answer with the last failure
                await self._send_error(send, exc)
                return
            ctx.attempts += 1
            try:
                await self._attempt(routed, send)
                return
            except _Failure as failure:
                last = failure
                ctx.error = failure.kind
                exclude.update(router.failed_targets(routed))
                if failure.backend:
                    router.backend_failure(routed, failure.kind)
                router.observe(ctx, routed, ok=False)
            finally:
                routed.release()
            if ctx.attempts >= cfg.max_attempts:
                break
            if not router.budget.withdraw():
                router.metrics.budget_exhausted.inc()
                break
            retry += 1
            router.metrics.retries.inc()
            await asyncio.sleep(backoff_s(retry, cfg.backoff_base_s, cfg.backoff_max_s, router.rng))
        assert last is not None
        if last.response is not None:
            status, headers, body = last.response
            headers = [*headers, (b"content-length", str(len(body)).encode())]
            await self._send_start(send, status, headers)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            self._finished = True
            return
        await self._send_error(send, RouterHTTPError(last.status, f"upstream failed: {last.message}", "upstream_error",
                                                     last.kind))

    def _response_headers(self, routed: Routed, resp: UpstreamResponse) -> list[tuple[bytes, bytes]]:
        ctx = self.ctx
        connection = resp.header(b"connection")
        drop = _NOT_DOWNSTREAM | _connection_tokens(connection.encode("latin-1")) if connection else _NOT_DOWNSTREAM
        out: list[tuple[bytes, bytes]] = []
        for k, v in resp.headers:
            low = k.lower()
            if low not in drop and not low.startswith(b"x-isthmus-"):
                out.append((low, v))
        d = routed.decision
        if routed.peer is not None:  # the peer router says where it went
            ctx.target = resp.header(b"x-isthmus-target", routed.peer.region)
            ctx.region = resp.header(b"x-isthmus-region", routed.peer.region)
            ctx.forwarded = True
        else:
            assert routed.replica is not None
            ctx.target, ctx.region = routed.replica.id, routed.replica.region
        total = d.estimate.total_s
        out += [
            (b"x-request-id", ctx.request_id.encode()),
            (b"x-isthmus-target", _header_value(ctx.target)),
            (b"x-isthmus-region", _header_value(ctx.region)),
            (b"x-isthmus-cost-ms", f"{total * 1e3:.3f}".encode() if total == total else b"nan"),
            (b"x-isthmus-reason", _header_value(d.reason)),
        ]
        if ctx.forwarded:
            out.append((b"x-isthmus-forwarded-to", _header_value(routed.peer.region if routed.peer else "")))
        slo = ctx.routed_request.slo
        if slo is not None:
            out.append((b"x-isthmus-slo-class", _header_value(slo.name)))
        return out

    async def _attempt(self, routed: Routed, send: Send) -> None:
        """One upstream attempt; returns when the client got its answer.

        Raises:
            _Failure: the attempt failed before any byte reached the client.
        """
        router = self.router
        ctx = self.ctx
        pool = router.pool
        assert pool is not None
        head = ctx.upstream_head
        body = ctx.raw
        if routed.peer is not None:
            base, auth = routed.peer.url, routed.peer.auth
            head += b"%s: %d\r\n%s: %s\r\n" % (HOPS_HEADER.encode(), ctx.hops + 1, ORIGIN_HEADER.encode(),
                                                  _header_value(ctx.routed_request.origin))
            router.metrics.forwards.labels(routed.peer.region).inc()
        else:
            assert routed.replica is not None
            base, auth = routed.replica.url, routed.replica.auth
            prio = routed.decision.priority
            if prio and routed.replica.id in router._priority_replicas:
                body = orjson.dumps({**orjson.loads(ctx.raw), "priority": prio})
        if auth:
            head += b"authorization: %s\r\n" % auth.encode("latin-1")
        t = router.config.timeouts
        self._routed = routed
        self._head = (0, [])
        try:
            resp = await pool.request(origin_of(base), ctx.path.encode(), head, body, connect_s=t.connect_s,
                                      idle_s=t.idle_s if ctx.info.stream else t.total_s, total_s=t.total_s,
                                      on_head=self._on_head if self._pipe is not None else None)
        except UpstreamConnectTimeout:
            raise _Failure("connect_timeout", 504, f"connect to {routed.target} timed out") from None
        except UpstreamConnectError as exc:
            raise _Failure("connect", 502, f"cannot reach {routed.target}: {exc}") from None
        except UpstreamTimeout:
            raise _Failure("stall", 504, f"{routed.target} sent no answer in time") from None
        except UpstreamError as exc:
            raise _Failure("broken", 502, f"{routed.target}: {exc}") from None
        try:
            await self._relay(routed, resp, send)
        finally:
            resp.release()  # back to the pool after a complete answer; otherwise the connection closes

    async def _read_all(self, routed: Routed, resp: UpstreamResponse) -> bytes:
        limit = self.router.config.limits.max_response_bytes
        try:
            return await resp.read_all(limit)
        except ValueError:
            raise _Failure("too_large", 502, f"{routed.target} answered with over {limit} bytes") from None
        except UpstreamTimeout:
            raise _Failure("stall", 504, f"{routed.target} stalled") from None
        except UpstreamError as exc:
            raise _Failure("broken", 502, f"{routed.target} broke off its answer: {exc}") from None

    async def _relay(self, routed: Routed, resp: UpstreamResponse, send: Send) -> None:
        router = self.router
        ctx = self.ctx
        status = resp.status
        if status in _RETRYABLE_STATUS:
            body = await self._read_all(routed, resp)
            raise _Failure("status", status, f"{routed.target} answered {status}",
                           response=(status, self._response_headers(routed, resp), body))
        streaming = status < 300 and resp.header(b"content-type").startswith("text/event-stream")
        if not streaming:
            body = await self._read_all(routed, resp)
            ctx.ttft_s = router.clock() - ctx.arrival
            headers = self._response_headers(routed, resp)
            headers.append((b"content-length", str(len(body)).encode()))
            await self._send_start(send, status, headers)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            self._finished = True
            self._first_byte(routed)
            if status < 300:
                ctx.output_tokens = _usage_tokens(body)  # read once the client has its answer
            self._done(routed, ok=status < 400, backend_ok=status < 500)
            return
        failure = ""
        if self._head[0]:
            # _on_head took it: every chunk, the first included, goes from the upstream connection's
            # callback straight to the client's, no task wakes between an upstream segment and its
            # write downstream
            status, headers = self._head
            try:
                await resp.pipe(self._piped)
            except UpstreamError as exc:
                if not self._started:
                    raise self._no_first_chunk(routed, exc) from None
                failure = (f"upstream {ctx.target} stalled for over {router.config.timeouts.idle_s:g} s"
                           if isinstance(exc, UpstreamTimeout) else f"upstream {ctx.target} broke off the stream")
            tail = self._tail
            done = False
            if not self._started:  # an empty body
                ctx.ttft_s = router.clock() - ctx.arrival
                await self._send_start(send, status, headers)
                self._first_byte(routed)
        else:
            headers = self._response_headers(routed, resp)
            try:
                first = await resp.read()
            except UpstreamError as exc:
                raise self._no_first_chunk(routed, exc) from None
            ctx.ttft_s = router.clock() - ctx.arrival
            await self._send_start(send, status, headers)
            tail = first
            self._events = first.count(b"data:")
            # a chunk after which the upstream body is complete goes out with the end of the body, in one write
            done = False
            if first:
                done = resp.at_eof()
                await send({"type": "http.response.body", "body": first, "more_body": not done})
            self._first_byte(routed)
            while first and not done:
                try:
                    chunk = await resp.read()
                except UpstreamTimeout:
                    failure = f"upstream {ctx.target} stalled for over {router.config.timeouts.idle_s:g} s"
                    break
                except UpstreamError:
                    failure = f"upstream {ctx.target} broke off the stream"
                    break
                if not chunk:
                    break
                tail = chunk
                self._events += chunk.count(b"data:")
                done = resp.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
        if failure:
            # never a fake [DONE]: an error event, at an event boundary, then the end of the body
            lead = b"" if tail.endswith((b"\n\n", b"\r\n\r\n")) or not tail else b"\n\n"
            await send({"type": "http.response.body", "body": lead + sse_error_event(failure),
                        "more_body": False})
            self._finished = True
            ctx.error = "stall" if "stalled" in failure else "broken"
            router.backend_failure(routed, ctx.error)
            router.observe(ctx, routed, ok=False)
            return
        if not done:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._finished = True
        # output tokens as the stream's data events (vLLM sends one per token), less the [DONE] one
        ctx.output_tokens = max(0, self._events - (b"[DONE]" in tail))
        self._done(routed, ok=True, backend_ok=True)

    def _no_first_chunk(self, routed: Routed, exc: UpstreamError) -> _Failure:
        """The attempt's failure when the upstream stalled or broke off before its first chunk (retryable)."""
        if isinstance(exc, UpstreamTimeout):
            return _Failure("stall", 504, f"{routed.target} sent nothing for {self.router.config.timeouts.idle_s:g} s")
        return _Failure("broken", 502, f"{routed.target} broke off before its first chunk: {exc}")

    def _on_head(self, resp: UpstreamResponse) -> Callable[[bytes], None] | None:
        """The head of the upstream answer, from the upstream connection's callback: a streamed
        answer is piped to the client from its first chunk on (the answer's own head is made now,
        before that chunk comes)."""
        status = resp.status
        if self._pipe is None or status >= 300 or not resp.header(b"content-type").startswith("text/event-stream"):
            return None
        assert self._routed is not None
        self._resp = resp
        self._head = (status, self._response_headers(self._routed, resp))
        return self._piped

    def _piped(self, chunk: bytes) -> None:
        """One chunk of a piped stream (called from the upstream connection's parser)."""
        pipe = self._pipe
        assert pipe is not None
        if self._started:
            pipe.write_body(chunk)
        else:  # the first: the answer's head leaves with it
            ctx = self.ctx
            ctx.ttft_s = self.router.clock() - ctx.arrival
            status, headers = self._head
            self._started = True
            ctx.status = status
            pipe.start_response(status, headers)
            pipe.write_body(chunk)
            assert self._routed is not None
            self._first_byte(self._routed)
        self._events += chunk.count(b"data:")
        self._tail = chunk
        if pipe.paused:  # the client reads slower than the upstream writes: stop reading upstream
            resp = self._resp
            assert resp is not None
            resp.pause_reading()
            pipe.on_resume(resp.resume_reading)

    def _first_byte(self, routed: Routed) -> None:
        """The first byte's bookkeeping, once ``ctx.ttft_s`` is set."""
        ctx = self.ctx
        router = self.router
        router.metrics.ttft.observe(ctx.ttft_s)
        if routed.dispatch is not None:
            routed.dispatch.first_byte()

    def _done(self, routed: Routed, ok: bool, backend_ok: bool) -> None:
        router = self.router
        if backend_ok:
            router.backend_success(routed)
        if self.ctx.forwarded and routed.peer is not None:
            # learn where the peer served it, as the simulator's regional routers do
            router.state.record_sent(self.ctx.target, self.ctx.routed_request.block_hashes)
        router.observe(self.ctx, routed, ok=ok)


def _usage_tokens(body: bytes) -> int | None:
    """``usage.completion_tokens`` of an OpenAI JSON answer, if it says."""
    try:
        n = orjson.loads(body).get("usage", {}).get("completion_tokens")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


async def _never(request: Request) -> Response:  # pragma: no cover - _ProxyFront serves these first
    raise AssertionError("proxied routes are served by _ProxyFront")


def build_app(config: RouterConfig, *, router: Router | None = None,
              on_ready: Callable[[Router], Awaitable[None]] | None = None) -> ASGIApp:
    """The ASGI application of a router for ``config`` (or of ``router``, when given).

    The router starts with the application's lifespan and stops with it.
    """
    rt = router if router is not None else Router(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await rt.start()
        if on_ready is not None:
            await on_ready(rt)
        try:
            yield
        finally:
            await rt.stop()

    async def not_found(request: Request, exc: Exception) -> Response:
        return Response(error_body(f"no route {request.method} {request.url.path}", "invalid_request_error",
                                   "not_found"), status_code=404, media_type="application/json")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return Response(error_body(f"method {request.method} not allowed on {request.url.path}",
                                   "invalid_request_error", "method_not_allowed"), status_code=405,
                        media_type="application/json")

    routes = [
        # POST on these two is served by _ProxyFront; other methods get Starlette's 405
        Route("/v1/completions", _never, methods=["POST"]),
        Route("/v1/chat/completions", _never, methods=["POST"]),
        Route("/v1/models", rt.handle_models, methods=["GET"]),
        Route("/health", rt.handle_health, methods=["GET"]),
        Route("/metrics", rt.handle_metrics, methods=["GET"]),
        Route("/isthmus/summary", rt.handle_summary, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: method_not_allowed})
    app.state.router = rt
    return _ProxyFront(rt, app)


class _ProxyFront:
    """The router's ASGI application: ``POST`` to the two proxied routes goes straight to
    :meth:`Router.handle_proxy`; everything else (lifespan, other endpoints, other methods) to Starlette."""

    def __init__(self, router: Router, app: Starlette) -> None:
        self.router = router
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROXY_PATHS and scope["method"] == "POST":
            await self.router.handle_proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)


__all__ = ["ProxyResponse", "Router", "build_app"]

