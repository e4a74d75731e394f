"""The router's own Prometheus metrics, in a registry of its own (no process-wide globals).

Counters and the TTFT histogram are updated on the request path; per-replica gauges (health, staleness,
RTT, in-flight) are read from the :class:`~isthmus.router.state.ClusterState` when scraped, so they
cost nothing between scrapes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from isthmus.router.state import ClusterState

# TTFT buckets, seconds: from a cached prefix on a near replica to a long queue far away
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 60.0)


class _StateCollector(Collector):
    """Per-replica and per-peer gauges read from the cluster state at scrape time."""

    def __init__(self, state: ClusterState, held: Callable[[], int], clock: Callable[[], float]) -> None:
        self._state = state
        self._held = held
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        st = self._state
        now = self._clock()
        labels = ["replica", "region"]
        healthy = GaugeMetricFamily("isthmus_router_replica_healthy", "1 if the replica may get traffic", labels=labels)
        ejected = GaugeMetricFamily("isthmus_router_replica_ejected", "1 while the replica is ejected", labels=labels)
        stale = GaugeMetricFamily("isthmus_router_scrape_staleness_seconds",
                                  "Seconds since the replica's state was last refreshed (scrape or peer poll)",
                                  labels=labels)
        in_flight = GaugeMetricFamily("isthmus_router_in_flight", "Requests this router has on the replica",
                                      labels=labels)
        rtt = GaugeMetricFamily("isthmus_router_rtt_seconds", "Smoothed probe RTT to a region (nan: not measured)",
                                labels=["region"])
        prefix = GaugeMetricFamily("isthmus_router_prefix_blocks",
                                   "KV blocks the router's prefix mirror expects cached on the replica", labels=labels)
        for rid, r in st.replicas.items():
            lv = [rid, r.region]
            healthy.add_metric(lv, 1.0 if r.healthy(now) else 0.0)
            ejected.add_metric(lv, 1.0 if r.ejector.ejected(now) else 0.0)
            seen = r.scraped_at if r.local else r.reported_at
            stale.add_metric(lv, now - seen if seen > -math.inf else math.inf)
            in_flight.add_metric(lv, float(r.in_flight))
            if st.mirror is not None and r.local:
                prefix.add_metric(lv, float(st.mirror.blocks(rid)))
        for region in sorted({r.region for r in st.replicas.values()} | set(st.peers)):
            rtt.add_metric([region], st.measured_rtt_s(region))
        held = GaugeMetricFamily("isthmus_router_held_requests", "Requests held at the router waiting for a replica",
                                 value=float(self._held()))
        return [healthy, ejected, stale, in_flight, rtt, held, prefix]


class RouterMetrics:
    """Every metric the router exports (``GET /metrics``).

    Names: ``isthmus_router_requests_total{status}``, ``..._decisions_total{target,region,forward}``,
    ``..._forwards_total{peer}``, ``..._rejections_total{reason}``, ``..._ttft_seconds`` (histogram, at the router: arrival to first
    byte relayed), ``..._upstream_errors_total{target,kind}``, ``..._retries_total``,
    ``..._retry_budget_exhausted_total``, ``..._ejections_total{replica}``, plus the state gauges
    of :class:`_StateCollector`.
    """

    def __init__(self, state: ClusterState, held: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic, active: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("isthmus_router_requests", "Client requests answered, by HTTP status",
                                ["status"], registry=r)
        self.decisions = Counter("isthmus_router_decisions", "Routing decisions, by target",
                                 ["target", "region", "forward"], registry=r)
        self.forwards = Counter("isthmus_router_forwards", "Requests forwarded to a peer region's router",
                                ["peer"], registry=r)
        self.ttft = Histogram("isthmus_router_ttft_seconds",
                              "Time from a request's arrival at the router to its first byte relayed, seconds",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.upstream_errors = Counter("isthmus_router_upstream_errors", "Failed upstream attempts, by kind",
                                       ["target", "kind"], registry=r)
        self.rejections = Counter("isthmus_router_rejections",
                                  "Requests the policy refused (429), by reason code (e.g. slo_unattainable)",
                                  ["reason"], registry=r)
        self.retries = Counter("isthmus_router_retries", "Upstream retries (before the first byte)", registry=r)
        self.budget_exhausted = Counter("isthmus_router_retry_budget_exhausted",
                                        "Retries refused by the retry budget", registry=r)
        self.ejections = Counter("isthmus_router_ejections", "Replica ejections after consecutive failures",
                                 ["replica"], registry=r)
        self.in_progress = Gauge("isthmus_router_requests_in_progress", "Client requests being served or held",
                                 registry=r)
        self.in_progress.set_function(lambda: float(active()))  # read when scraped, not set per request
        r.register(_StateCollector(state, held, clock))
        # label children by value: a labels() lookup per request costs more than the increment
        self._by_status: dict[int, Counter] = {}
        self._by_target: dict[tuple[str, str, bool], Counter] = {}

    def answered(self, status: int) -> None:
        """Count one client request answered with ``status``."""
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(str(status))
        child.inc()

    def decided(self, target: str, region: str, forward: bool) -> None:
        """Count one routing decision."""
        key = (target, region, forward)
        child = self._by_target.get(key)
        if child is None:
            child = self._by_target[key] = self.decisions.labels(target, region, "true" if forward else "false")
        child.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
