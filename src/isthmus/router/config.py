"""The router's configuration: one typed, frozen description of a live router, loaded from YAML.

A router serves OpenAI-compatible requests for the ``models`` it lists, in front of the engine
``replicas`` it lists, and decides with one routing ``policy`` (any name of
:func:`isthmus.policies.default_registry`). ``mode: proxy`` is one router that sees every replica;
``mode: regional`` is one router per region, which sees its own region's replicas and polls its
``peers`` (the other regions' routers) for theirs, and may forward a request once to a peer.

Annotated example (every default shown)::

    listen: {host: 127.0.0.1, port: 8000}
    region: us-west                # this router's region
    mode: proxy                    # proxy | regional
    regions:                       # optional: RTTs between regions, ms (probes override)
      rtt_ms: {us-west: {germany: 281, israel: 183}, germany: {israel: 60}}
      intra_region_rtt_ms: 2.0
      measure: true                # probe RTTs (timed GET /health) and prefer them to the file
      ewma_alpha: 0.3
      gpu_usd_per_hour: {}         # optional prices for cost-aware policies (slo): {H100: 3.0}
      egress_usd_per_gb: {}        # {us-west: {germany: 0.02}}, mirrored unless given both ways
      bytes_per_token: 4.0         # what one token weighs on the wire when pricing egress
    replicas:
      - {url: "http://10.0.0.5:8000", region: us-west, engine: vllm, gpu: A100, model: Mistral-7B}
      - {url: "http://10.1.0.7:8000", region: germany, gpu: H100, model: Mistral-7B, id: de-big,
         num_kv_blocks: 20000, max_in_flight: 64, max_num_seqs: 256, priority: false,
         kv_events: {endpoint: "tcp://10.1.0.7:5557", encoding: auto, topic: ""}}  # optional
    peers: []                      # regional mode: [{region: germany, url: "http://router.de:8000"}]
    policy: {name: gorgo_proxy, params: {}, seed: 0, state_file: null}   # state_file: a learned policy's model
    models: [mistral]              # served model names; any other -> 404
    timeouts: {connect_s: 5.0, idle_s: 60.0, total_s: 600.0}
    limits: {max_body_bytes: 4194304, max_concurrent: 1024, queue_wait_s: 30.0, retry_after_s: 1,
             max_response_bytes: 67108864, queue: null, max_hold_s: 30.0}   # queue: fifo | edf
    retries: {budget: 0.2, max_attempts: 3, backoff_base_s: 0.025, backoff_max_s: 0.5, max_balance: 20.0}
    health: {probe_period_s: 0.1, probe_timeout_s: 1.0, unhealthy_after: 3, healthy_after: 2,
             eject_after: 5, eject_cooldown_s: 30.0}
    scrape_period_s: 0.1
    sync_period_s: null            # regional: peer polling period; null = the policy's, else 1 s
    recheck_s: null                # held requests are re-decided this often; null = the policy's, else 20 ms
    block_size: 16                 # tokens per KV block for prompt block hashes
    profile_time_scale: 1.0        # x every profile time the router uses (prefill per token, decode
                                   # step): an engine double's --time-scale, for engines faster than their profile
    tokenizer: null                # a HuggingFace tokenizer.json (or its directory; relative to this
                                   # file's directory); null = the built-in byte-chunk tokenizer
    drain_s: 30.0                  # graceful-shutdown window for in-flight requests
    api_keys: []                   # optional; clients send "Authorization: Bearer KEY"
    api_keys_env: null             # or the name of an environment variable holding comma-separated keys
    log_level: info
    slo:                           # optional SLO classes (targets in ms), as in a scenario's slo block
      classes: [{name: interactive, ttft_ms: 1000, tpot_ms: 80}, {name: batch, e2e_ms: 20000, priority: 1}]
      default: null                # class of a request nothing else assigns
      by_model: {}                 # served model name -> class
      by_api_key: {}               # client API key -> class
      header: x-slo-class          # a client names its class in this header, or
      body_field: slo_class        # in this body field (header > body > API key > model > default)

Replica ids default to ``<region>-<k>``, numbered per region in file order (as the simulator's
scenarios name them). GPU and model names are checked against the built-in profiles: they give
each replica's prefill time per token (GORGO's ``t_p``) and, without ``num_kv_blocks`` or an
engine that reports its KV size, the capacity of the router's prefix mirror.

``kv_events`` subscribes the router to the replica's vLLM KV-cache events (ZMQ PUB/SUB, see
:mod:`isthmus.router.kv_events`): stored and evicted blocks then correct the router's prefix mirror
of that replica. ``tokenizer`` makes the router tokenize prompts as an engine double started with
``--tokenizer`` the same file does, so both compute the same block hashes.

Loading is strict: unknown keys, wrong types, unknown regions, GPUs, models or policies, duplicate
YAML keys and bad policy parameters fail in :func:`load_config` with a
:class:`~isthmus.core.errors.ConfigError` whose message names the file, the line and the dotted
path of the bad field, e.g. ``router.yaml:14: replicas.0.gpu: unknown GPU 'B200'; ...``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from isthmus.configfile import FieldError, format_validation_error, gpu_name, model_name, read_yaml, where
from isthmus.core.errors import ConfigError, IsthmusError, UnknownProfileError
from isthmus.core.perf import builtin_perf_model
from isthmus.core.policy import Policy, PolicyRegistry
from isthmus.core.slo import QueueOrder, SLOCatalog
from isthmus.core.topology import DEFAULT_BYTES_PER_TOKEN
from isthmus.workloads.slo import SLOClassConfig

DEFAULT_RECHECK_S = 0.02
DEFAULT_SYNC_PERIOD_S = 1.0


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(url: str) -> str:
    """``url`` without a trailing slash; must be ``http(s)://host[:port][/base]`` without query."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL like http://127.0.0.1:8000, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return url.rstrip("/")


class ListenConfig(_Frozen):
    """Where the router listens. Loopback by default: exposing it is a deliberate choice."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class RegionsConfig(_Frozen):
    """RTTs between regions.

    Attributes:
        rtt_ms: round-trip times in ms as nested pairs ``{a: {b: rtt}}``, mirrored; pairs not given
            are unknown until measured (with ``measure`` off, every region the router reaches must
            have its pair with the router's region).
        intra_region_rtt_ms: RTT inside a region when neither the file nor a probe gives it, ms.
        measure: probe RTTs (timed ``GET /health`` of each replica and peer, every
            ``health.probe_period_s``) and prefer the measured value to the file's.
        ewma_alpha: weight of the newest probe in the smoothed RTT (0.3 as in GORGO-proxy).
    """

    rtt_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    intra_region_rtt_ms: float = Field(default=2.0, ge=0.0, allow_inf_nan=False)
    measure: bool = True
    ewma_alpha: float = Field(default=0.3, gt=0.0, le=1.0)
    gpu_usd_per_hour: dict[str, float] = Field(default_factory=dict)
    egress_usd_per_gb: dict[str, dict[str, float]] = Field(default_factory=dict)
    bytes_per_token: float = Field(default=DEFAULT_BYTES_PER_TOKEN, ge=0.0, allow_inf_nan=False)

    @field_validator("gpu_usd_per_hour")
    @classmethod
    def _gpu_prices(cls, prices: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, v in prices.items():
            if not math.isfinite(v) or v < 0:
                raise FieldError((name,), f"must be a finite number >= 0, got {v}")
            out[gpu_name(name)] = v
        return out

    @field_validator("egress_usd_per_gb")
    @classmethod
    def _egress_prices(cls, pairs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for a, row in pairs.items():
            for b, v in row.items():
                if not math.isfinite(v) or v < 0:
                    raise FieldError((a, b), f"must be a finite number >= 0, got {v}")
        return pairs

    def prices(self) -> RouterPrices:
        """The GPU and egress prices as a :class:`~isthmus.core.topology.PriceBook`."""
        egress: dict[tuple[str, str], float] = {}
        for a, row in self.egress_usd_per_gb.items():
            for b, v in row.items():
                egress[(a, b)] = v
                egress.setdefault((b, a), v)  # mirrored unless given both ways
        return RouterPrices(dict(self.gpu_usd_per_hour), egress, self.bytes_per_token)

    @field_validator("rtt_ms")
    @classmethod
    def _non_negative(cls, pairs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for a, row in pairs.items():
            for b, v in row.items():
                if not math.isfinite(v) or v < 0:
                    raise FieldError((a, b), f"must be a finite number >= 0, got {v}")
                back = pairs.get(b, {}).get(a)
                if back is not None and back != v:
                    raise FieldError((a, b), f"{a}->{b} is {v} but {b}->{a} is {back}; a round trip is symmetric")
        return pairs

    def rtt_s(self) -> dict[tuple[str, str], float]:
        """The configured pairs, both directions, seconds."""
        out: dict[tuple[str, str], float] = {}
        for a, row in self.rtt_ms.items():
            for b, v in row.items():
                out[(a, b)] = out[(b, a)] = v / 1000.0
        return out


@dataclass(frozen=True)
class RouterPrices:
    """GPU prices (US dollars per GPU hour, by canonical GPU name) and egress prices (US dollars per
    GB, by ordered region pair) as the ``slo`` policy reads them; unknown ones cost 0."""

    gpu_usd_per_hour: dict[str, float]
    egress_usd_per_gb: dict[tuple[str, str], float]
    bytes_per_token: float

    def gpu_price(self, gpu: str) -> float:
        return self.gpu_usd_per_hour.get(gpu, 0.0)

    def egress_price(self, a: str, b: str) -> float:
        return 0.0 if a == b else self.egress_usd_per_gb.get((a, b), 0.0)


class SLOClassesConfig(_Frozen):
    """SLO classes and how a request gets one (see :mod:`isthmus.core.slo`).

    Attributes:
        classes: the classes: ``name``, targets ``ttft_ms`` / ``tpot_ms`` / ``e2e_ms`` (at least
            one) and ``priority`` (lower runs first), as in a scenario's ``slo`` block.
        default: the class of a request nothing else assigns (``None``: no SLO).
        by_model, by_api_key: served model name / client API key -> class.
        header, body_field: where a client names its class explicitly (header first).
    """

    classes: tuple[SLOClassConfig, ...] = Field(min_length=1)
    default: str | None = None
    by_model: dict[str, str] = Field(default_factory=dict)
    by_api_key: dict[str, str] = Field(default_factory=dict, repr=False)
    header: str = Field(default="x-slo-class", min_length=1)
    body_field: str = Field(default="slo_class", min_length=1)

    @field_validator("header")
    @classmethod
    def _header_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ValueError(f"not an HTTP header name: {name!r}")
        return name.lower()

    @model_validator(mode="after")
    def _known_classes(self) -> SLOClassesConfig:
        names = [c.name for c in self.classes]
        for k, name in enumerate(names):
            if name in names[:k]:
                raise FieldError(("classes", k, "name"), f"duplicate SLO class {name!r}")
        refs: list[tuple[tuple[str | int, ...], str]] = [(("default",), self.default)] if self.default else []
        refs += [(("by_model", m), c) for m, c in self.by_model.items()]
        refs += [(("by_api_key",), c) for c in self.by_api_key.values()]  # keys are secrets: not in messages
        for loc, name in refs:
            if name not in names:
                raise FieldError(loc, f"unknown SLO class {name!r}; classes: {sorted(names)}")
        return self

    def catalog(self) -> SLOCatalog:
        return SLOCatalog(tuple(c.slo() for c in self.classes), self.default, dict(self.by_model),
                          dict(self.by_api_key), self.header, self.body_field)


class KvEventsConfig(_Frozen):
    """Where a replica publishes its KV-cache events.

    Attributes:
        endpoint: the publisher's ZMQ endpoint to connect to (``tcp://host:port`` or ``ipc://path``).
        encoding: ``array`` (positional, older vLLM), ``map`` (tagged maps, newer vLLM) or ``auto``
            (accept either, per message).
        topic: only messages whose topic frame starts with this prefix are received ("" = all).
    """

    endpoint: str = Field(min_length=1)
    encoding: Literal["auto", "array", "map"] = "auto"
    topic: str = ""

    @field_validator("endpoint")
    @classmethod
    def _zmq_endpoint(cls, endpoint: str) -> str:
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
            raise ValueError(f"must be a ZMQ endpoint like tcp://127.0.0.1:5557, got {endpoint!r}")
        return endpoint


class ReplicaConfig(_Frozen):
    """One engine replica.

    Attributes:
        url: base URL of its OpenAI-compatible server (``/v1/...``, ``/metrics``, ``/health`` below it).
        region: where it runs.
        id: replica id (default ``<region>-<k>``).
        engine: ``vllm`` or ``sglang``: which metric names its ``/metrics`` uses.
        gpu, model: built-in profile names (canonical spelling after loading).
        num_kv_blocks: its KV cache in blocks; default: what the engine reports
            (``vllm:cache_config_info``), else the profile's.
        max_in_flight: at most this many requests in flight from this router (the view is ``full``).
        api_key: sent upstream as ``Authorization: Bearer`` (client credentials never are).
        kv_events: subscribe to its KV-cache events (``None``: the mirror is the router's own record).
        max_num_seqs: its engine's cap on running sequences (vLLM's ``--max-num-seqs``), for
            policies that estimate queueing (``slo``); ``None``: unknown.
        priority: the engine schedules by priority (vLLM ``--scheduling-policy priority``): a
            decision's non-zero priority is sent as the body's ``priority`` field. Off by default,
            since vLLM refuses a non-zero priority under its default FCFS policy.
    """

    url: str
    region: str = Field(min_length=1)
    id: str | None = Field(default=None, min_length=1)
    engine: Literal["vllm", "sglang"] = "vllm"
    gpu: str
    model: str
    num_kv_blocks: int | None = Field(default=None, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1)
    api_key: SecretStr | None = None
    kv_events: KvEventsConfig | None = None
    max_num_seqs: int | None = Field(default=None, ge=1)
    priority: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_url(url)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, name: str) -> str:
        return gpu_name(name)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return model_name(name)


class PeerConfig(_Frozen):
    """Another region's router (regional mode): where to forward and whom to poll."""

    region: str = Field(min_length=1)
    url: str
    api_key: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_url(url)


class PolicyConfig(_Frozen):
    """The routing policy: a registered ``name``, its ``params``, and the ``seed`` of its generator.

    ``state_file``: where a learned policy (``lodestar``) keeps its model and training samples between
    runs: read at start when it exists, written after every fit and at shutdown (relative to the
    config file's directory).
    """

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0)
    state_file: Path | None = None


class TimeoutsConfig(_Frozen):
    """Upstream timeouts, seconds.

    Attributes:
        connect_s: to open a connection to a replica or peer (then 502/504 or fail over).
        idle_s: longest silence between two chunks of a streamed response, the first included
            (then an error event and close).
        total_s: longest whole upstream exchange (non-streamed responses are bounded by it).
    """

    connect_s: float = Field(default=5.0, gt=0.0, allow_inf_nan=False)
    idle_s: float = Field(default=60.0, gt=0.0, allow_inf_nan=False)
    total_s: float = Field(default=600.0, gt=0.0, allow_inf_nan=False)


class LimitsConfig(_Frozen):
    """Admission limits.

    Attributes:
        max_body_bytes: larger request bodies get 413 (checked on ``Content-Length`` before reading,
            and while reading).
        max_concurrent: requests being served or held at once; beyond it 429.
        queue_wait_s: longest a request may be held waiting for a replica; then 503.
        retry_after_s: the ``Retry-After`` of 503 and 429 answers, seconds.
        max_response_bytes: largest non-streamed upstream body the router buffers; beyond it 502.
        queue: order of held requests: ``fifo`` (arrival) or ``edf`` (earliest SLO deadline first
            within priorities, by groups of model and class); ``None``: the policy's
            ``queue_order`` (``slo``: ``edf``), else ``fifo``.
        max_hold_s: ``edf``: a request held this long goes to the front (starvation protection).
    """

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    max_concurrent: int = Field(default=1024, ge=1)
    queue_wait_s: float = Field(default=30.0, ge=0.0, allow_inf_nan=False)
    retry_after_s: int = Field(default=1, ge=0)
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    queue: Literal["fifo", "edf"] | None = None
    max_hold_s: float = Field(default=30.0, gt=0.0)


class RetriesConfig(_Frozen):
    """Retries before the first byte reached the client (never after).

    Attributes:
        budget: each client request earns this many retry tokens; a retry spends one. With the
            balance starting at 0, upstream attempts stay <= ``(1 + budget)`` x client requests
            whatever fails.
        max_attempts: upstream attempts per client request, the first included.
        backoff_base_s, backoff_max_s: retry ``k`` (from 1) waits ``uniform(0, min(max, base * 2**(k-1)))``
            ("full jitter").
        max_balance: cap on saved retry tokens, so a long calm spell cannot fund a retry storm.
    """

    budget: float = Field(default=0.2, ge=0.0, allow_inf_nan=False)
    max_attempts: int = Field(default=3, ge=1)
    backoff_base_s: float = Field(default=0.025, ge=0.0, allow_inf_nan=False)
    backoff_max_s: float = Field(default=0.5, ge=0.0, allow_inf_nan=False)
    max_balance: float = Field(default=20.0, ge=0.0, allow_inf_nan=False)


class HealthConfig(_Frozen):
    """Active health checks (``GET /health``) and passive ejection.

    Attributes:
        probe_period_s: time between two probes of one replica or peer (the same probes time RTTs).
        probe_timeout_s: a probe slower than this failed.
        unhealthy_after: consecutive failed probes that mark a target down.
        healthy_after: consecutive good probes that mark it up again.
        eject_after: consecutive backend-caused request failures (connect errors, timeouts, 5xx,
            broken streams; never 4xx) that eject a replica.
        eject_cooldown_s: how long an ejected replica gets no traffic.
    """

    probe_period_s: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    probe_timeout_s: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    unhealthy_after: int = Field(default=3, ge=1)
    healthy_after: int = Field(default=2, ge=1)
    eject_after: int = Field(default=5, ge=1)
    eject_cooldown_s: float = Field(default=30.0, ge=0.0, allow_inf_nan=False)


class RouterConfig(_Frozen):
    """The whole router file (module docstring for an annotated example)."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    region: str = Field(min_length=1)
    mode: Literal["proxy", "regional"] = "proxy"
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    replicas: tuple[ReplicaConfig, ...] = Field(min_length=1)
    peers: tuple[PeerConfig, ...] = ()
    policy: PolicyConfig = Field(default_factory=lambda: PolicyConfig(name="least_load"))
    models: tuple[str, ...] = Field(min_length=1)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    scrape_period_s: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    sync_period_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    recheck_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    block_size: int = Field(default=16, ge=1)
    profile_time_scale: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    tokenizer: Path | None = None
    drain_s: float = Field(default=30.0, ge=0.0, allow_inf_nan=False)
    api_keys: tuple[SecretStr, ...] = ()
    api_keys_env: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    slo: SLOClassesConfig | None = None

    @field_validator("policy", mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> RouterConfig:
        ids: set[str] = set()
        for k, rid in enumerate(self.replica_ids):
            if rid in ids:
                raise FieldError(("replicas", k, "id"), f"duplicate replica id {rid!r}")
            ids.add(rid)
        if self.mode == "proxy" and self.peers:
            raise FieldError(("peers",), "applies to mode: regional only (a proxy sees every replica itself)")
        if self.mode == "regional":
            for k, r in enumerate(self.replicas):
                if r.region != self.region:
                    raise FieldError(("replicas", k, "region"),
                                     f"{r.region!r} is not this router's region {self.region!r}; in regional mode "
                                     "a router lists its own region's replicas and reaches the others via peers")
            seen: set[str] = set()
            for k, p in enumerate(self.peers):
                if p.region == self.region:
                    raise FieldError(("peers", k, "region"), f"{p.region!r} is this router's own region")
                if p.region in seen:
                    raise FieldError(("peers", k, "region"), f"duplicate peer region {p.region!r}")
                seen.add(p.region)
        if len(set(self.models)) != len(self.models):
            raise FieldError(("models",), "duplicate model names")
        if self.slo is not None:
            for name in self.slo.by_model:
                if name not in self.models:
                    raise FieldError(("slo", "by_model", name), f"{name!r} is not one of models {list(self.models)}")
        for k, r in enumerate(self.replicas):
            try:
                builtin_perf_model(r.gpu, r.model).num_kv_blocks(self.block_size)
            except UnknownProfileError as exc:
                if r.num_kv_blocks is None:
                    raise FieldError(("replicas", k, "num_kv_blocks"), f"{exc}; give num_kv_blocks") from None
        if not self.regions.measure:
            known = self.regions.rtt_s()
            for region in sorted({r.region for r in self.replicas} | {p.region for p in self.peers}):
                if region != self.region and (self.region, region) not in known:
                    raise FieldError(("regions", "rtt_ms"),
                                     f"no RTT between {self.region!r} and {region!r}, and measure is off; give "
                                     f"rtt_ms: {{{self.region}: {{{region}: ...}}}} or turn measure on")
        if self.tokenizer is not None and not self.tokenizer.exists():
            raise FieldError(("tokenizer",), f"no such tokenizer file or directory: {str(self.tokenizer)!r}")
        if self.api_keys_env is not None and not self.api_keys_env.strip():
            raise FieldError(("api_keys_env",), "must name an environment variable")
        return self

    @property
    def replica_ids(self) -> tuple[str, ...]:
        """Each replica's id, in file order (``id``, else ``<region>-<k>`` numbered per region)."""
        next_index: dict[str, int] = {}
        out: list[str] = []
        for r in self.replicas:
            k = next_index.get(r.region, 0)
            next_index[r.region] = k + 1
            out.append(r.id if r.id is not None else f"{r.region}-{k}")
        return tuple(out)

    def resolved_recheck_s(self, policy: object) -> float:
        """Re-decision period of held requests: the file's, else the policy's ``recheck_s``, else 20 ms."""
        return self.recheck_s if self.recheck_s is not None else _policy_period(policy, "recheck_s", DEFAULT_RECHECK_S)

    def resolved_queue(self, policy: object) -> QueueOrder:
        """Order of held requests: the file's, else the policy's ``queue_order``, else ``fifo``."""
        if self.limits.queue is not None:
            return self.limits.queue
        order = getattr(policy, "queue_order", None)
        return "edf" if order == "edf" else "fifo"

    def resolved_sync_period_s(self, policy: object) -> float:
        """Peer polling period: the file's, else the policy's ``sync_period_s``, else 1 s."""
        if self.sync_period_s is not None:
            return self.sync_period_s
        return _policy_period(policy, "sync_period_s", DEFAULT_SYNC_PERIOD_S)

    def accepted_api_keys(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Every accepted API key: ``api_keys`` plus the comma-separated ones of ``api_keys_env``."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_env is not None:
            env = os.environ if environ is None else environ
            keys.extend(k.strip() for k in env.get(self.api_keys_env, "").split(",") if k.strip())
        return tuple(keys)

    def make_policy(self, registry: PolicyRegistry | None = None) -> Policy:
        """A fresh policy object of ``policy`` from ``registry`` (default: the built-in policies)."""
        import numpy as np

        if registry is None:
            from isthmus.policies import default_registry

            registry = default_registry()
        return registry.create(self.policy.name, self.policy.params, np.random.default_rng(self.policy.seed))


def _policy_period(policy: object, name: str, default: float) -> float:
    value = getattr(policy, name, None)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return default


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, registry: PolicyRegistry | None = None) -> RouterConfig:
    """Read, validate and return the router configuration in ``path``.

    Besides the schema, checks that the policy can be created from ``registry`` (default: the
    built-in policies) with its parameters, and that regional mode uses a policy whose forwards it
    can carry out.

    Raises:
        ConfigError: naming the file, the line and the dotted path of the first bad fields.
    """
    path = Path(path)
    data, lines = read_yaml(path, "config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a router config must be a YAML mapping, got {type(data).__name__}")
    try:
        tok = data.get("tokenizer")
        if isinstance(tok, str) and not Path(tok).is_absolute():
            data["tokenizer"] = str(path.parent / tok)  # relative to the config file, like scenario paths
        pol = data.get("policy")
        if isinstance(pol, dict) and isinstance(pol.get("state_file"), str) and not Path(pol["state_file"]).is_absolute():
            data["policy"] = {**pol, "state_file": str(path.parent / pol["state_file"])}
        config = RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, lines)) from None
    try:
        config.make_policy(registry)
    except IsthmusError as exc:
        raise ConfigError(f"{where(path, ('policy',), lines)}: {exc}") from None
    return config
