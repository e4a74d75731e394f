"""Open-loop, trace-driven load over real HTTP: what ``isthmus bench`` runs.

A scenario's workload (:func:`isthmus.workloads.build_requests`, via
:meth:`isthmus.sim.scenario.Scenario.requests`) gives the requests, their arrival times (seconds of
*scenario time*), origin regions, prompt lengths, block hashes and output lengths. Each request is
sent at its arrival time, whatever happened to the earlier ones (open loop), to the entry point of
its origin region (``entry[origin]`` of a testbed manifest) or to one ``--target`` URL, as a
streamed ``POST /v1/completions``::

    {"model": M, "prompt": TEXT, "max_tokens": request.max_output_tokens, "stream": true,
     "ignore_eos": true, "stream_options": {"include_usage": true}, ["user": session]}

with headers ``x-isthmus-origin: ORIGIN``, ``x-request-id: bench-<id>`` and, for a request with an
SLO class (the scenario's ``slo`` block), ``x-slo-class: NAME``. ``TEXT`` comes from
:class:`isthmus.bench.prompts.PromptBuilder` (exactly ``prompt_tokens`` tokens of the built-in
tokenizer, shared prefixes where the trace has them). The engine double generates exactly
``max_tokens`` tokens and ignores ``ignore_eos`` as an unknown field; a real vLLM honours it.

Time. ``time_scale`` is *wall seconds per scenario second*, the convention of ``isthmus emulate
--time-scale`` and of the testbed manifest: a request arriving at scenario time ``a`` is sent
``a * time_scale`` wall seconds after the start (0.1 replays ten times faster), and every latency
measured on the wall clock is divided by ``time_scale`` before it is reported, so reports are in
scenario seconds, comparable with ``isthmus simulate``. (The workload's own ``time_scale`` field is
something else: it stretches scenario arrival times before any of this.) The one exception is the
send lag, which is a property of this process: wall seconds.

Sending does not lag under load: one ``aiohttp`` session with no connection limit, a single
dispatcher coroutine that builds each request body *before* its due time and sleeps on the
monotonic clock (:func:`time.perf_counter`) until it, then starts the request as its own task. The
lag between the due time and the moment the request is handed to ``aiohttp`` is recorded per request.

Per request (:class:`Outcome`): TTFT (send -> first SSE ``data:`` event carrying a choice, i.e. a
token), inter-token latencies (between consecutive token events), end to end (send -> last token
event), TPOT ``(e2e - ttft) / (tokens - 1)``, output tokens (the final ``usage`` chunk's
``completion_tokens``, else the number of token events), the HTTP status, an error (a status other
than 200, an ``error`` event, a broken or refused connection, a stream ending without ``[DONE]``),
a timeout (``timeout_s`` scenario seconds from send to the end of the stream), a rejection (a 429
whose OpenAI error ``code`` is one of :data:`REJECT_CODES`, e.g. ``slo_unattainable`` from a router
whose ``slo`` policy cannot meet the request's SLO: counted as rejected with its message, not as an
error), and the ``x-isthmus-target`` / ``x-isthmus-region`` / ``x-isthmus-slo-class`` response
headers a router adds (where it went, the class it applied).

SLOs. A request with an SLO class met it when it completed and its client-measured TTFT, TPOT and
end-to-end latency (scenario seconds) meet every target of the class
(:func:`isthmus.core.slo.slo_attained`); attainment, goodput and rejections per class are summarised
by the simulator's own :meth:`isthmus.sim.metrics.SimResult.slo_summary`, so ``slo`` has the same
keys and meaning as in ``isthmus simulate --json``, plus the requests that failed (``failed``, a miss).

The result (:class:`BenchResult`) summarises into the same JSON entry as one policy of ``isthmus
simulate --json`` (:meth:`BenchResult.record`, :meth:`BenchResult.document`), plus bench-only keys.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from isthmus.bench.prompts import PromptBuilder
from isthmus.core.errors import ConfigError
from isthmus.core.request import SLO, Request
from isthmus.core.slo import slo_attained
from isthmus.sim.metrics import SimResult, percentiles
from isthmus.sim.report import build_report, result_record

if TYPE_CHECKING:
    import aiohttp

    from isthmus.sim.scenario import Scenario

ORIGIN_HEADER = "x-isthmus-origin"
TARGET_HEADER = "x-isthmus-target"
REGION_HEADER = "x-isthmus-region"
SLO_HEADER = "x-slo-class"
"""The request header a client names its SLO class in (the router's default ``slo.header``)."""
SLO_CLASS_HEADER = "x-isthmus-slo-class"
"""The response header a router names the SLO class it applied in."""

REJECT_CODES: frozenset[str] = frozenset({"slo_unattainable"})
"""OpenAI error ``code`` values of a 429 that mean "refused by the routing policy" (a rejection, as the
simulator counts ``Decision.reject``), not "overloaded" (an error, e.g. the router's admission limit,
``rate_limit_exceeded``)."""

DEFAULT_TIMEOUT_S = 600.0
"""Per-request timeout, scenario seconds (send to end of stream)."""

START_DELAY_S = 0.05
"""Wall seconds between the start of a replay and the due time of arrival 0 (lets the loop settle)."""

UNKNOWN = "unknown"
"""What :attr:`BenchResult` reports for a target or region no header named (a direct engine)."""


# ----------------------------------------------------------------------------------------- targets
def completions_url(url: str) -> str:
    """The ``/v1/completions`` URL of a base URL: ``http://h:p`` and ``http://h:p/v1`` get the path
    appended, a URL already ending in ``/v1/completions`` is kept. Raises :class:`ConfigError` for
    anything that is not an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"not an http(s) URL: {url!r}")
    base = url.rstrip("/")
    if base.endswith("/v1/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/completions"
    return base + "/v1/completions"


def base_url(url: str) -> str:
    """``scheme://host:port`` of ``url``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class Manifest:
    """A testbed manifest, as ``isthmus testbed`` writes it.

    Attributes:
        scenario: name of the scenario the testbed was built from.
        policy: the routing policy its routers run (the label results are reported under).
        mode: ``"proxy"`` or ``"regional"``.
        time_scale: wall seconds per scenario second of its engine doubles and relays.
        model: the served model name clients send.
        entry: ``{region: URL}`` where a client in that region sends its requests.
        routers, replicas, relays: as written (lists; not interpreted except replica ``url`` /
            ``metrics_url`` fields, scraped for prefix-cache counters).
        source: the file it came from, if any.
    """

    scenario: str
    policy: str
    mode: str
    time_scale: float
    model: str | None
    entry: Mapping[str, str]
    routers: tuple[Any, ...] = ()
    replicas: tuple[Any, ...] = ()
    relays: tuple[Any, ...] = ()
    source: Path | None = None

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None) -> Manifest:
        """Validate a parsed manifest; :class:`ConfigError` naming the file and field otherwise."""
        where = f"{source}: " if source is not None else "manifest: "
        if not isinstance(data, dict):
            raise ConfigError(f"{where}expected a JSON object, got {type(data).__name__}")
        entry = data.get("entry")
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{where}'entry' must be a non-empty object {{region: url}}")
        for region, url in entry.items():
            if not isinstance(url, str):
                raise ConfigError(f"{where}entry.{region}: expected a URL string, got {url!r}")
            try:
                completions_url(url)
            except ConfigError as exc:
                raise ConfigError(f"{where}entry.{region}: {exc}") from None
        scale = data.get("time_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"{where}'time_scale' must be a number > 0, got {scale!r}")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ConfigError(f"{where}'model' must be a non-empty string, got {model!r}")
        lists: dict[str, tuple[Any, ...]] = {}
        for key in ("routers", "replicas", "relays"):
            value = data.get(key) or []
            if not isinstance(value, list):
                raise ConfigError(f"{where}'{key}' must be a list, got {type(value).__name__}")
            lists[key] = tuple(value)
        return cls(scenario=str(data.get("scenario", "")), policy=str(data.get("policy") or "bench"),
                   mode=str(data.get("mode", "")), time_scale=float(scale), model=model,
                   entry={str(k): v for k, v in entry.items()}, source=source, **lists)

    def metrics_urls(self) -> list[str]:
        """``/metrics`` URLs of the replicas that name one (``metrics_url``, else ``url``)."""
        out: list[str] = []
        for rep in self.replicas:
            if isinstance(rep, dict):
                url = rep.get("metrics_url") or rep.get("url")
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    out.append(url if url.rstrip("/").endswith("/metrics") else base_url(url) + "/metrics")
        return out


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; :class:`ConfigError` (one line) when it cannot be used."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read manifest: {exc.strerror or exc}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not valid JSON: {exc}") from None
    return Manifest.from_dict(data, p)


@dataclass(frozen=True)
class Targets:
    """Where each origin region sends: ``entry[origin]``, else ``default`` (all regions).

    Attributes:
        entry: ``{region: completions URL}``.
        default: one completions URL for every region (``--target``), or ``None``.
    """

    entry: Mapping[str, str]
    default: str | None = None

    @classmethod
    def single(cls, url: str) -> Targets:
        return cls({}, completions_url(url))

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> Targets:
        return cls({r: completions_url(u) for r, u in manifest.entry.items()})

    def url_for(self, origin: str) -> str:
        url = self.entry.get(origin, self.default)
        if url is None:
            raise ConfigError(f"no entry point for origin region {origin!r}; the manifest has "
                              f"{sorted(self.entry)}")
        return url

    def check(self, regions: Iterable[str]) -> None:
        """Raise :class:`ConfigError` when a region that sends requests has no entry point."""
        for r in regions:
            self.url_for(r)


# ----------------------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """What happened to one request. Times are wall seconds unless named ``_scn``.

    Attributes:
        id, origin: the request's.
        arrival_s: its arrival, scenario seconds.
        prompt_tokens, max_tokens: what was asked.
        due_s: wall time it was due, seconds after the replay's start.
        send_lag_s: wall seconds between due and handed to the HTTP client (>= 0 in practice).
        status: HTTP status, ``None`` when no response came.
        ttft_s: send -> first token event, wall seconds (``nan`` without a token).
        e2e_s: send -> last token event, wall seconds (``nan`` unless completed).
        end_s: wall time the exchange ended, seconds after the replay's start.
        itl_s: gaps between consecutive token events, wall seconds.
        output_tokens: tokens received (usage, else token events).
        error: why it failed (``None``: completed, timed out or rejected).
        timed_out: the request hit the timeout.
        target, region: the ``x-isthmus-target`` / ``x-isthmus-region`` response headers.
        slo: the request's SLO class (sent as ``x-slo-class``), ``None`` without one.
        slo_applied: the ``x-isthmus-slo-class`` response header (the class a router applied).
        rejected: the reject code of a 429 in :data:`REJECT_CODES` (``None``: not rejected).
        reject_reason: that answer's ``error.message``.
    """

    id: str
    origin: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    due_s: float
    send_lag_s: float = math.nan
    status: int | None = None
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    end_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    timed_out: bool = False
    target: str | None = None
    region: str | None = None
    done: bool = False
    slo: SLO | None = None
    slo_applied: str | None = None
    rejected: str | None = None
    reject_reason: str | None = None

    @property
    def completed(self) -> bool:
        """Answered 200, streamed to ``[DONE]`` with at least one token, no error, no timeout."""
        return self.done and self.error is None and not self.timed_out and self.output_tokens > 0

    @property
    def failed(self) -> bool:
        """Neither completed nor rejected: an error or a timeout."""
        return not self.completed and self.rejected is None

    @property
    def slo_class(self) -> str | None:
        """Name of the request's SLO class."""
        return self.slo.name if self.slo is not None else None

    def tpot_s(self) -> float:
        """``(e2e - ttft) / (tokens - 1)``, wall seconds; ``nan`` with fewer than two tokens."""
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def slo_met(self, time_scale: float) -> bool:
        """Completed within every target of its SLO class, latencies in scenario seconds (wall
        seconds / ``time_scale``); ``True`` without a class, ``False`` unless completed."""
        if not self.completed:
            return False
        return slo_attained(self.slo, self.ttft_s / time_scale, self.tpot_s() / time_scale,
                            self.e2e_s / time_scale)


def _error_kind(outcome: Outcome) -> str:
    """A short class of the failure, for counting: ``status 503``, ``connect``, ``timeout``..."""
    if outcome.timed_out:
        return "timeout"
    err = outcome.error or ""
    return err.split(":", 1)[0]


async def _send_one(session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str],
                    out: Outcome, t0: float, timeout_wall: float) -> None:
    """One streamed exchange; fills ``out``. Never raises (except cancellation)."""
    import aiohttp

    perf = time.perf_counter
    loads = orjson.loads
    start = perf()
    out.send_lag_s = (start - t0) - out.due_s
    last: float | None = None
    usage_tokens: int | None = None
    events = 0
    try:
        async with asyncio.timeout(timeout_wall):
            async with session.post(url, data=body, headers=headers) as resp:
                out.status = resp.status
                out.target = resp.headers.get(TARGET_HEADER)
                out.region = resp.headers.get(REGION_HEADER)
                out.slo_applied = resp.headers.get(SLO_CLASS_HEADER)
                if resp.status != 200:
                    text = (await resp.read())[:4096].decode("utf-8", "replace")
                    code = _error_code(text) if resp.status == 429 else None
                    if code in REJECT_CODES:
                        out.rejected = code
                        out.reject_reason = _message(text)
                    else:
                        out.error = f"status {resp.status}: {_message(text)}"
                    return
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    now = perf()
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        out.done = True
                        break
                    try:
                        doc = loads(payload)
                    except orjson.JSONDecodeError:
                        out.error = f"bad event: {payload[:80]!r}"
                        return
                    if not isinstance(doc, dict):
                        continue
                    if "error" in doc:
                        out.error = f"error event: {_message(doc)}"
                        return
                    usage = doc.get("usage")
                    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                        usage_tokens = usage["completion_tokens"]
                    if doc.get("choices"):
                        events += 1
                        if last is None:
                            out.ttft_s = now - start
                        else:
                            out.itl_s.append(now - last)
                        last = now
                if not out.done:
                    out.error = "incomplete: stream ended without [DONE]"
    except TimeoutError:
        out.timed_out = True
    except aiohttp.ClientConnectorError as exc:
        out.error = f"connect: {exc.os_error.strerror or exc}" if exc.os_error else f"connect: {exc}"
    except (aiohttp.ClientError, OSError) as exc:
        out.error = f"disconnect: {type(exc).__name__}: {exc}"
    except ValueError as exc:  # aiohttp: an SSE line longer than its read buffer
        out.error = f"bad event: {exc}"
    finally:
        end = perf()
        out.end_s = end - t0
        out.output_tokens = usage_tokens if usage_tokens is not None else events
        if last is not None and out.done and out.error is None:
            out.e2e_s = last - start


def _message(doc: Any) -> str:
    """The ``error.message`` of an OpenAI error body (parsed or text), else the text itself, short."""
    if isinstance(doc, str):
        try:
            doc = orjson.loads(doc)
        except orjson.JSONDecodeError:
            return doc.strip()[:200]
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
        if isinstance(doc.get("detail"), str):
            return str(doc["detail"])[:200]
    return str(doc)[:200]


def _error_code(text: str) -> str | None:
    """The ``error.code`` of an OpenAI error body when it is a string, else ``None``."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


def request_body(request: Request, prompt: str | Sequence[int], model: str | None, *,
                 ignore_eos: bool = True) -> bytes:
    """The JSON body of ``request`` (module docstring)."""
    doc: dict[str, Any] = {"prompt": prompt, "max_tokens": request.max_output_tokens, "stream": True,
                           "stream_options": {"include_usage": True}}
    if model is not None:
        doc["model"] = model
    if ignore_eos:
        doc["ignore_eos"] = True
    if request.session is not None:
        doc["user"] = request.session
    return orjson.dumps(doc)


PromptFn = Callable[[Request], str | Sequence[int]]
"""Gives the ``prompt`` of a request: text, or token ids."""


async def replay(requests: Iterable[Request], targets: Targets, *, model: str | None,
                 time_scale: float = 1.0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 prompt: PromptFn | None = None, ignore_eos: bool = True,
                 on_done: Callable[[Outcome], None] | None = None,
                 slo_header: str | None = SLO_HEADER) -> tuple[list[Outcome], float]:
    """Send ``requests`` open loop (module docstring) and wait for every answer.

    Args:
        requests: in non-decreasing arrival order (scenario seconds, as ``build_requests`` gives);
            consumed lazily, one ahead of its due time.
        targets: where each origin sends.
        model: the ``model`` field (``None``: left out; the engine double then uses its own).
        time_scale: wall seconds per scenario second (> 0).
        timeout_s: per-request limit, scenario seconds (send to end of stream).
        prompt: the prompt of a request, text or token ids (default: :class:`PromptBuilder` ()).
        ignore_eos: send ``ignore_eos: true``.
        on_done: called with each outcome as its exchange ends.
        slo_header: the header that names a request's SLO class (``None``: not sent).

    Returns:
        The outcomes in request order, and the wall seconds the replay took.
    """
    import aiohttp

    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ConfigError(f"time scale must be a number > 0, got {time_scale}")
    if not timeout_s > 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout_s}")
    build = prompt if prompt is not None else PromptBuilder()
    timeout_wall = timeout_s * time_scale
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    perf = time.perf_counter
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     auto_decompress=False) as session:
        t0 = perf() + START_DELAY_S

        async def exchange(url: str, body: bytes, headers: dict[str, str], out: Outcome) -> None:
            await _send_one(session, url, body, headers, out, t0, timeout_wall)
            if on_done is not None:
                on_done(out)

        try:
            previous = -math.inf
            for req in requests:
                if req.arrival < previous:
                    raise ValueError(f"request {req.id}: arrivals must not decrease ({req.arrival} < {previous})")
                previous = req.arrival
                url = targets.url_for(req.origin)
                body = request_body(req, build(req), model, ignore_eos=ignore_eos)
                headers = {"content-type": "application/json", ORIGIN_HEADER: req.origin,
                           "x-request-id": f"bench-{req.id}"}
                if req.slo is not None and slo_header:
                    headers[slo_header] = req.slo.name
                due = req.arrival * time_scale
                out = Outcome(req.id, req.origin, req.arrival, req.prompt_tokens, req.max_output_tokens, due,
                              slo=req.slo)
                outcomes.append(out)
                # the loop's timers may fire up to a millisecond early (uvloop rounds to ms): sleep again
                while (delay := t0 + due - perf()) > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(exchange(url, body, headers, out))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # let tasks whose due time has come start now, not after the next body is built
                await asyncio.sleep(0)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        while tasks:
            await asyncio.wait(set(tasks))
        wall = perf() - t0
    return outcomes, wall


# ----------------------------------------------------------------------------------------- prefix counters
_COUNTERS = (("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
             ("vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_hits_total"))


def parse_prefix_counters(text: str) -> tuple[float, float] | None:
    """``(queried tokens, hit tokens)`` summed over the samples of vLLM's prefix-cache counters in a
    Prometheus text page (the current names, else the pre-0.9 ``gpu_`` ones); ``None`` if absent."""
    for queries, hits in _COUNTERS:
        q = _sum_samples(text, queries)
        h = _sum_samples(text, hits)
        if q is not None and h is not None:
            return q, h
    return None


def _sum_samples(text: str, name: str) -> float | None:
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", re.MULTILINE)
    values = [float(m.group(1)) for m in pattern.finditer(text)]
    return math.fsum(values) if values else None


async def scrape_prefix_counters(urls: Sequence[str], timeout_s: float = 5.0) -> tuple[float, float] | None:
    """Sum of :func:`parse_prefix_counters` over the ``/metrics`` pages at ``urls``; ``None`` when
    there are none or any page fails or lacks the counters."""
    import aiohttp

    if not urls:
        return None
    total_q = total_h = 0.0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            for url in urls:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        return None
                    counters = parse_prefix_counters(await resp.text())
                if counters is None:
                    return None
                total_q += counters[0]
                total_h += counters[1]
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    return total_q, total_h


# ----------------------------------------------------------------------------------------- results
@dataclass
class BenchResult:
    """Outcome of one bench run.

    Attributes:
        label: what the results are reported under (the manifest's policy, else ``"bench"``).
        scenario: scenario name.
        seed: workload seed.
        regions: the scenario's regions (``per_region`` keys, in order).
        time_scale: wall seconds per scenario second.
        outcomes: per request, in request order.
        wall_s: wall seconds from the first due time to the last answer.
        prefix: ``(queried, hit)`` prefix-cache tokens of the replicas during the run, if scraped.
        target_desc: ``{region: URL}`` the requests went to (``"*"`` for a single target).
        slo_classes: the scenario's SLO class names, in catalog order (``slo`` keys; classes that
            only the outcomes name follow in order of appearance).
    """

    label: str
    scenario: str
    seed: int
    regions: tuple[str, ...]
    time_scale: float
    outcomes: list[Outcome]
    wall_s: float
    prefix: tuple[float, float] | None = None
    target_desc: dict[str, str] = field(default_factory=dict)
    slo_classes: tuple[str, ...] = ()

    def _arr(self, outs: Sequence[Outcome], attr: str) -> np.ndarray:
        return np.fromiter((getattr(o, attr) for o in outs), dtype=np.float64, count=len(outs))

    @property
    def ttft_s(self) -> np.ndarray:
        """TTFT of the completed requests, scenario seconds (for CDF plots)."""
        ok = [o for o in self.outcomes if o.completed]
        return self._arr(ok, "ttft_s") / self.time_scale

    def _summary(self, outs: Sequence[Outcome]) -> dict[str, Any]:
        """The simulator's per-run figures over ``outs`` (scenario seconds), plus bench-only counts."""
        s = self.time_scale
        ok = [o for o in outs if o.completed]
        n = len(ok)
        ttft = self._arr(ok, "ttft_s") / s
        e2e = self._arr(ok, "e2e_s") / s
        tokens = np.fromiter((o.output_tokens for o in ok), dtype=np.float64, count=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(tokens > 1, (e2e - ttft) / (tokens - 1), np.nan)
        itl = np.fromiter((g for o in ok for g in o.itl_s), dtype=np.float64) / s
        arrival = self._arr(ok, "arrival_s")
        finish = self._arr(ok, "end_s") / s
        span = float(finish.max() - arrival.min()) if n else 0.0
        known = [o for o in ok if o.region is not None]
        return {
            "requests": len(outs),
            "completed": n,
            "rejected": sum(1 for o in outs if o.rejected is not None),
            "errors": sum(1 for o in outs if o.error is not None),
            "timeouts": sum(1 for o in outs if o.timed_out),
            "ttft_s": percentiles(ttft),
            "tpot_s": percentiles(tpot),
            "e2e_s": percentiles(e2e),
            "itl_s": percentiles(itl),
            "throughput_rps": n / span if span > 0 else 0.0,
            "output_tokens_per_s": float(tokens.sum()) / span if span > 0 else 0.0,
            "cross_region_share": (sum(1 for o in known if o.region != o.origin) / len(known)) if known else None,
        }

    def summary(self) -> dict[str, Any]:
        """The entry of ``results`` (before :func:`~isthmus.sim.report.result_record`).

        Keys shared with ``isthmus simulate --json`` (same meaning, scenario seconds, statistics
        over the *completed* requests, ``{"mean", "p50", "p90", "p99"}``, ``nan``/``null`` over no
        sample): ``policy``, ``requests`` (sent), ``completed``, ``ttft_s``, ``tpot_s``, ``e2e_s``,
        ``throughput_rps`` and ``output_tokens_per_s`` (per scenario second, from the first arrival
        to the last completion), ``prefix_hit_rate`` (hit / queried prompt tokens of the replicas'
        vLLM prefix-cache counters over the run; ``None`` when they could not be scraped),
        ``cross_region_share`` (share of completed requests whose ``x-isthmus-region`` differs from
        their origin, over those that carry the header; ``None`` when none does, e.g. straight to an
        engine), ``per_region`` (by origin region: ``requests``, ``completed``, ``errors``,
        ``timeouts``, ``ttft_s``, ``tpot_s``, ``e2e_s``, ``itl_s``, ``throughput_rps``,
        ``output_tokens_per_s``, ``cross_region_share``), ``rejected`` (answered 429 with a code of
        :data:`REJECT_CODES`; also per region), and, when the requests have SLO classes, ``slo``
        (:meth:`slo_summary`). Not measured by a client, so absent: ``queue_s``, ``bound_ttft_s``,
        ``regret``, ``preemptions``, ``estimator``, ``cost``.

        Bench-only: ``errors`` (failed, timeouts and rejections excluded), ``timeouts``,
        ``rejections`` (``{reject code: count}``), ``rejection_examples`` (``{reject code: [up to
        3 distinct messages]}``, the reasons the router gave), ``error_kinds``
        (``{"connect" | "disconnect" | "status 503" | "error event" | "incomplete" | "timeout" | ...:
        count}``), ``itl_s`` (inter-token latencies, scenario seconds), ``send_lag_s`` (due -> sent,
        *wall* seconds, all requests, with ``max``), ``served_by`` (``{x-isthmus-target: count}``,
        ``"unknown"`` without the header), ``served_regions`` (``{x-isthmus-region: count}``),
        ``output_tokens`` (total), ``time_scale``, ``wall_s``.
        """
        outs = self.outcomes
        out: dict[str, Any] = {"policy": self.label}
        out.update(self._summary(outs))
        q_h = self.prefix
        out["prefix_hit_rate"] = (q_h[1] / q_h[0]) if q_h is not None and q_h[0] > 0 else None
        lags = self._arr(outs, "send_lag_s")
        lag = percentiles(lags)
        finite = lags[np.isfinite(lags)]
        lag["max"] = float(finite.max()) if finite.size else math.nan
        out["send_lag_s"] = lag
        out["error_kinds"] = dict(sorted(Counter(_error_kind(o) for o in outs if o.failed).items()))
        out["rejections"] = dict(sorted(Counter(o.rejected for o in outs if o.rejected is not None).items()))
        examples: dict[str, list[str]] = {}
        for o in outs:
            if o.rejected is not None:
                seen = examples.setdefault(o.rejected, [])
                if len(seen) < 3 and o.reject_reason is not None and o.reject_reason not in seen:
                    seen.append(o.reject_reason)
        out["rejection_examples"] = dict(sorted(examples.items()))
        ok = [o for o in outs if o.completed]
        out["served_by"] = dict(sorted(Counter(o.target or UNKNOWN for o in ok).items()))
        out["served_regions"] = dict(sorted(Counter(o.region or UNKNOWN for o in ok).items()))
        out["output_tokens"] = sum(o.output_tokens for o in ok)
        out["time_scale"] = self.time_scale
        out["wall_s"] = self.wall_s
        out["per_region"] = {r: self._summary([o for o in outs if o.origin == r]) for r in self.regions}
        slo = self.slo_summary()
        if slo is not None:
            out["slo"] = slo
        return out

    def slo_summary(self) -> dict[str, Any] | None:
        """SLO attainment per class, as :meth:`isthmus.sim.metrics.SimResult.slo_summary` computes it
        for a simulation (the same function, over the client-measured latencies in scenario seconds),
        plus the requests that failed; ``None`` when no request has a class.

        Per class and over all classes: ``requests`` (sent: completed + rejected + failed),
        ``completed``, ``rejected`` and ``rejections`` (by code), ``failed`` (errors and timeouts:
        a client-side figure the simulator does not have), ``attained`` (completed within every
        target), ``attainment`` (attained / requests: a rejected or failed request misses),
        ``goodput_rps`` (attained per scenario second, first arrival to last completion); per
        class also ``ttft_s``, ``tpot_s``, ``e2e_s`` of its completed requests.
        """
        outs = self.outcomes
        names = list(self.slo_classes)
        for o in outs:
            name = o.slo_class
            if name is not None and name not in names:
                names.append(name)
        if not names:
            return None
        index = {name: k for k, name in enumerate(names)}
        s = self.time_scale
        ok = [o for o in outs if o.completed]
        n = len(ok)
        ttft = self._arr(ok, "ttft_s") / s
        rejections: dict[str, dict[str, int]] = {}
        for o in outs:
            if o.rejected is not None:
                by_code = rejections.setdefault(o.slo_class or "", {})
                by_code[o.rejected] = by_code.get(o.rejected, 0) + 1
        nan = np.full(n, math.nan)
        none = np.zeros(n, dtype=np.int32)
        tokens = np.fromiter((o.output_tokens for o in ok), dtype=np.int64, count=n)
        result = SimResult(
            policy=self.label, regions=self.regions, requests=len(outs), completed=n, events=0, wall_s=self.wall_s,
            sim_span_s=0.0, arrival_s=self._arr(ok, "arrival_s"), ttft_s=ttft, e2e_s=self._arr(ok, "e2e_s") / s,
            tpot_s=np.fromiter((o.tpot_s() for o in ok), dtype=np.float64, count=n) / s, queue_s=nan,
            finish_s=self._arr(ok, "end_s") / s, bound_ttft_s=nan, hops=none, origin=none, served=none,
            prompt_tokens=np.fromiter((o.prompt_tokens for o in ok), dtype=np.int64, count=n),
            cached_tokens=np.zeros(n, dtype=np.int64), output_tokens=tokens,
            rejected=sum(1 for o in outs if o.rejected is not None), slo_classes=tuple(names),
            slo_class=np.fromiter((index.get(o.slo_class or "", -1) for o in ok), dtype=np.int32, count=n),
            slo_met=np.fromiter((o.slo_met(s) for o in ok), dtype=bool, count=n), rejections=rejections)
        out = result.slo_summary()
        failed = Counter(o.slo_class for o in outs if o.failed and o.slo_class is not None)
        for name, c in out["classes"].items():
            _count_failed(c, failed.get(name, 0))
        _count_failed(out, sum(failed.values()))
        return out

    def record(self) -> dict[str, Any]:
        """:meth:`summary` as an entry of ``results`` (plain JSON values, checked for the shared keys)."""
        return result_record(self.label, self.summary())

    def document(self) -> dict[str, Any]:
        """The whole JSON document, shaped as ``isthmus simulate --json``'s, with one result, plus
        ``bench``: ``{"time_scale", "targets", "wall_s"}``."""
        doc = build_report(self.scenario, self.seed, [self.record()])
        doc["bench"] = {"time_scale": self.time_scale, "targets": dict(self.target_desc), "wall_s": self.wall_s}
        return doc


def _count_failed(entry: dict[str, Any], failed: int) -> None:
    """Add ``failed`` requests (misses) to an entry of :meth:`SimResult.slo_summary`."""
    entry["failed"] = failed
    entry["requests"] += failed
    entry["attainment"] = entry["attained"] / entry["requests"] if entry["requests"] else math.nan


# ----------------------------------------------------------------------------------------- one call
def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def prepare_scenario(scenario: Scenario | str | Path, *, limit: int | None = None,
                     rate: float | None = None) -> Scenario:
    """Load ``scenario`` (a path) and apply ``limit`` and ``rate`` to its workload.

    ``rate`` replaces ``workload.rate_rps`` and resets the workload's ``time_scale`` to 1, as
    ``isthmus sweep --rates`` does (a trace is compressed or stretched to that mean rate). Raises
    :class:`ConfigError` for a bad file or value.
    """
    from isthmus.sim.scenario import Scenario, load_scenario

    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    changes: dict[str, Any] = {}
    if limit is not None:
        changes["limit"] = limit
    if rate is not None:
        changes["rate_rps"] = rate
        changes["time_scale"] = 1.0
    return sc.with_workload(**changes) if changes else sc


def count_requests(sc: Scenario, seed: int) -> tuple[int, float]:
    """How many requests the workload gives and the last arrival (scenario seconds), by one streaming
    pass (which also surfaces trace errors before anything is sent)."""
    n = 0
    last = 0.0
    for req in sc.requests(seed):
        n += 1
        last = req.arrival
    return n, last


def run_bench(scenario: Scenario | str | Path, manifest: Manifest | Mapping[str, Any] | str | Path | None = None, *,
              target: str | None = None, model: str | None = None, limit: int | None = None,
              rate: float | None = None, time_scale: float | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, seed: int | None = None, label: str | None = None,
              prompt: PromptFn | None = None, scrape_prefix: bool = True,
              progress: Callable[[int], None] | None = None,
              requests: Iterable[Request] | None = None) -> BenchResult:
    """Replay a scenario's workload against a testbed (``manifest``) or one ``target`` URL.

    Requests with an SLO class (the scenario's ``slo`` block) carry it in ``x-slo-class``; the
    result then reports attainment per class (:meth:`BenchResult.slo_summary`).

    Args:
        scenario: a :class:`~isthmus.sim.scenario.Scenario` or its YAML path (workload, origins).
        manifest: the testbed manifest (as read, as ``Testbed.start`` returns it, or its path): entry
            points, model, time scale, label.
        target: one base URL for every origin instead (exactly one of ``manifest``/``target``).
        model: the ``model`` field; default the manifest's, else ``None`` (field left out).
        limit, rate: see :func:`prepare_scenario`.
        time_scale: wall seconds per scenario second; default the manifest's, else 1.
        timeout_s: per-request limit, scenario seconds.
        seed: workload seed (default the scenario's).
        label: what results are reported under (default the manifest's policy, else ``"bench"``).
        prompt: prompt of a request (default :class:`PromptBuilder` with the workload's block size).
        scrape_prefix: read the replicas' prefix-cache counters (manifest ``replicas[].url``, or
            the target) before and after, for ``prefix_hit_rate``.
        progress: called with the number of finished requests as they finish.
        requests: replay these instead of the scenario's workload (arrival order, scenario seconds).

    Raises:
        ConfigError: bad scenario, manifest, option, or an origin with no entry point.
        TraceError: a malformed trace.
    """
    if (manifest is None) == (target is None):
        raise ConfigError("give exactly one of a testbed manifest and a target URL")
    sc = prepare_scenario(scenario, limit=limit, rate=rate)
    run_seed = sc.config.seed if seed is None else seed
    if run_seed < 0:
        raise ConfigError(f"seed must be >= 0, got {run_seed}")
    metrics_urls: list[str]
    if manifest is not None:
        man = (manifest if isinstance(manifest, Manifest) else Manifest.from_dict(dict(manifest), None)
               if isinstance(manifest, Mapping) else load_manifest(manifest))
        targets = Targets.of_manifest(man)
        scale = man.time_scale if time_scale is None else time_scale
        model = man.model if model is None else model
        label = label or man.policy
        metrics_urls = man.metrics_urls()
        desc = dict(man.entry)
    else:
        assert target is not None
        targets = Targets.single(target)
        scale = 1.0 if time_scale is None else time_scale
        label = label or "bench"
        metrics_urls = [base_url(target) + "/metrics"]
        desc = {"*": target}
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"time scale must be a number > 0, got {scale}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ConfigError(f"timeout must be a number > 0 seconds, got {timeout_s}")
    regions = tuple(sc.config.topology.regions)
    weights = sc.config.workload.origins.weights
    targets.check(r for r in regions if weights is None or weights.get(r, 0) > 0)
    build = prompt if prompt is not None else PromptBuilder(block_size=sc.config.workload.block_size)
    reqs: Iterable[Request] = sc.requests(run_seed) if requests is None else requests
    slo = sc.config.slo
    slo_classes = tuple(c.name for c in slo.classes) if slo is not None else ()
    done = 0

    def on_done(_: Outcome) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done)

    async def main() -> BenchResult:
        before = await scrape_prefix_counters(metrics_urls) if scrape_prefix else None
        outcomes, wall = await replay(reqs, targets, model=model, time_scale=scale, timeout_s=timeout_s,
                                      prompt=build, on_done=on_done)
        after = await scrape_prefix_counters(metrics_urls) if before is not None else None
        prefix = (after[0] - before[0], after[1] - before[1]) if before is not None and after is not None else None
        return BenchResult(label=label or "bench", scenario=sc.name, seed=run_seed, regions=regions,
                           time_scale=scale, outcomes=outcomes, wall_s=wall, prefix=prefix, target_desc=desc,
                           slo_classes=slo_classes)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())

