"""What the router knows of the cluster, and the background tasks that keep it fresh.

:class:`ClusterState` holds one :class:`ReplicaState` per replica the router can send to and one
:class:`PeerState` per peer router, and turns them into the
:class:`~isthmus.core.snapshot.ClusterSnapshot` its policy decides on (:meth:`ClusterState.snapshot`),
with the simulator's semantics (``isthmus.sim.simulator``):

- a local replica's ``running`` / ``waiting`` / ``kv_usage`` come from its last ``/metrics`` scrape
  (``age`` = seconds since that scrape arrived), and the requests this router sent since the scrape
  began that have not produced a first byte yet are added to ``waiting`` (in transit, as the
  simulator counts them). When the engine exposes no usable metrics (no scrape in
  ``max(1 s, 10 x scrape period)``), ``running`` / ``waiting`` are the router's own counts: requests
  streaming, requests sent without a first byte yet;
- ``running_tokens`` / ``queued_prefill_tokens`` are the prompt tokens of this router's own requests on
  that replica with / without a first byte (the engines do not export them; GORGO-proxy tracks its
  in-flight requests the same way; requests other routers sent are not seen);
- ``in_flight`` counts this router's requests on the replica; ``full`` is ``in_flight >= max_in_flight``;
- ``healthy`` is the active health check's verdict and not ejected;
- ``prefill_s_per_token`` comes from the replica's (GPU, model) profile
  (``builtin_perf_model(gpu, model).prefill_s_per_token()``, as in the simulator);
- regional mode: peer regions' replicas appear as their router last reported them
  (``GET /isthmus/summary`` every ``sync_period_s``), aged by the time since that poll;
- RTTs: ``rtt_s(here, r)`` is the EWMA of timed ``GET /health`` probes to region ``r``'s replicas (or
  peer router) when measured, else the configured value, else the intra-region default;
- prefix: a router-side :class:`~isthmus.core.snapshot.PrefixIndex` of what was sent where (an LRU of
  each replica's KV size: the config's ``num_kv_blocks``, else ``vllm:cache_config_info``, else the
  profile's), plus, in regional mode, a second one for what this router forwarded to peers' replicas.
  Replicas with ``kv_events`` configured also correct their part of it from the engine's KV-cache
  events (:meth:`ClusterState.apply_kv_events`, fed by :mod:`isthmus.router.kv_events`).

All the methods of the state classes are synchronous and O(replicas); the I/O lives in
:class:`Collectors`, whose tasks never block the loop (every call has a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from isthmus.core.hashing import ROOT_HASH, hash_token_blocks
from isthmus.core.perf import PerfModel, builtin_perf_model
from isthmus.core.prefix_index import BoundedHashMap
from isthmus.core.slo import decode_step_estimate
from isthmus.core.snapshot import ClusterSnapshot, InstanceView, NoPrefixInfo, PrefixIndex, PrefixIndexView
from isthmus.kv_events import ClearedBlocks, KvChange, RemovedBlocks, StoredBlocks
from isthmus.router.config import RouterConfig
from isthmus.router.reliability import Ejector, Ewma, HealthTracker
from isthmus.router.scrape import EngineLoad, parse_engine_metrics
from isthmus.router.upstream import UpstreamPool, origin_of

log = logging.getLogger("isthmus.router.state")

Clock = Callable[[], float]


class ReplicaState:
    """One replica as the router tracks it (see the module docstring for how it becomes a view).

    ``local`` replicas are scraped and probed by this router; peer replicas (regional mode) are
    known from their router's summary and reached at the ``url`` it reports.
    """

    def __init__(self, *, id: str, region: str, url: str, gpu: str, model: str = "", engine: str = "vllm",
                 prefill_s_per_token: float = math.nan, capacity_blocks: int = 1, capacity_fixed: bool = False,
                 max_in_flight: int | None = None, auth: str | None = None, local: bool = True,
                 health: HealthTracker | None = None, ejector: Ejector | None = None, rtt_alpha: float = 0.3,
                 started_at: float = 0.0, max_num_seqs: int = 0, perf: PerfModel | None = None,
                 profile_time_scale: float = 1.0) -> None:
        self.id = id
        self.region = region
        self.url = url
        self.gpu = gpu
        self.model = model
        self.engine = engine
        self.prefill_s_per_token = prefill_s_per_token
        self.capacity_blocks = capacity_blocks
        self.capacity_fixed = capacity_fixed
        self.max_in_flight = max_in_flight
        self.max_num_seqs = max_num_seqs
        self.perf = perf  # its GPU x model profile: decode-step estimates for policies that ask
        self.profile_time_scale = profile_time_scale
        self.auth = auth  # upstream Authorization header value; never logged
        self.local = local
        self.health = health if health is not None else HealthTracker()
        self.ejector = ejector if ejector is not None else Ejector()
        self.rtt = Ewma(rtt_alpha)
        self.started_at = started_at
        # last scrape
        self.load: EngineLoad | None = None
        self.scraped_at = -math.inf
        self.scrapes = 0
        self.scrape_errors = 0
        # scrape epochs: requests sent while scrape k was in flight or later are "fresh" for scrape k
        self._epoch = 0
        self._applied_epoch = 0
        self._fresh: dict[int, int] = {}
        # this router's own requests
        self.in_flight = 0
        self.pending = 0
        self.pending_tokens = 0
        self.deferred = 0  # of pending: sent at a priority > 0 (behind normal requests in the engine)
        self.deferred_tokens = 0
        self.streaming = 0
        self.streaming_tokens = 0
        # peer replicas: the view their router reported
        self.reported: InstanceView | None = None
        self.reported_at = -math.inf

    # ------------------------------------------------------------------ own requests
    def dispatch(self, prompt_tokens: int, deferred: bool = False) -> Dispatch:
        """Count one request sent to this replica now (``deferred``: at a priority > 0); the returned
        ticket ends the count."""
        self.in_flight += 1
        self.pending += 1
        self.pending_tokens += prompt_tokens
        if deferred:
            self.deferred += 1
            self.deferred_tokens += prompt_tokens
        e = self._epoch
        self._fresh[e] = self._fresh.get(e, 0) + 1
        return Dispatch(self, prompt_tokens, e, deferred)

    def _unpend(self, d: Dispatch) -> None:
        self.pending -= 1
        self.pending_tokens -= d.tokens
        if d.deferred:
            self.deferred -= 1
            self.deferred_tokens -= d.tokens
        n = self._fresh.get(d.epoch)
        if n is not None:
            if n <= 1:
                del self._fresh[d.epoch]
            else:
                self._fresh[d.epoch] = n - 1

    # ------------------------------------------------------------------ scrapes
    def scrape_started(self) -> int:
        """A scrape is being sent: requests dispatched from now on are fresh for it. Returns its epoch."""
        self._epoch += 1
        return self._epoch

    def apply_scrape(self, load: EngineLoad, epoch: int, now: float, block_size: int = 0) -> bool:
        """Take the result of the scrape of ``epoch``; return whether the KV capacity changed.

        ``block_size``: the router's tokens per block; an engine reporting blocks of another size
        has its capacity converted to the router's blocks.
        """
        self.load = load
        self.scraped_at = now
        self.scrapes += 1
        self._applied_epoch = epoch
        for e in [e for e in self._fresh if e < epoch]:
            del self._fresh[e]
        blocks = load.num_kv_blocks
        if blocks is not None and block_size and load.block_size and load.block_size != block_size:
            blocks = max(1, blocks * load.block_size // block_size)
        if not self.capacity_fixed and blocks is not None and blocks != self.capacity_blocks:
            self.capacity_blocks = blocks
            return True
        return False

    # ------------------------------------------------------------------ views
    def available(self, now: float) -> bool:
        """Healthy (health checks, not ejected) and below its in-flight cap."""
        return self.healthy(now) and not self.full

    @property
    def full(self) -> bool:
        """At its in-flight cap (a peer's replica: as its router last reported)."""
        if not self.local:
            return self.reported is not None and self.reported.full
        return self.max_in_flight is not None and self.in_flight >= self.max_in_flight

    def healthy(self, now: float) -> bool:
        if not self.health.up or self.ejector.ejected(now):
            return False
        if not self.local:
            return self.reported is not None and self.reported.healthy
        return True

    def view(self, now: float, stale_after_s: float, decode_step: bool = False) -> InstanceView:
        """This replica as a policy sees it at ``now`` (module docstring); ``decode_step``: fill
        ``decode_step_s`` from the profile (for policies that ask)."""
        if not self.local:
            return self._peer_view(now)
        load = self.load
        fresh = load is not None and now - self.scraped_at <= stale_after_s
        if fresh and load is not None and load.running is not None and load.waiting is not None:
            running = load.running
            waiting = load.waiting + sum(self._fresh.values())  # every epoch kept is >= the applied one
        else:
            running = self.streaming
            waiting = self.pending
        kv = load.kv_usage if load is not None and load.kv_usage is not None else 0.0
        age = now - self.scraped_at if self.scraped_at > -math.inf else now - self.started_at
        step = math.nan
        if decode_step and self.perf is not None:
            step = decode_step_estimate(self.perf, running, self.streaming_tokens) * self.profile_time_scale
        return InstanceView(
            id=self.id, region=self.region, gpu=self.gpu, running=running, waiting=waiting,
            running_tokens=self.streaming_tokens, queued_prefill_tokens=self.pending_tokens, kv_usage=kv,
            healthy=self.healthy(now), full=self.full, age=max(0.0, age), in_flight=self.in_flight,
            prefill_s_per_token=self.prefill_s_per_token,  # model None: serves every model the router lists
            max_num_seqs=self.max_num_seqs, decode_step_s=step, deferred_waiting=self.deferred,
            deferred_prefill_tokens=self.deferred_tokens,
        )

    def _peer_view(self, now: float) -> InstanceView:
        v = self.reported
        if v is None:
            return InstanceView(id=self.id, region=self.region, gpu=self.gpu, healthy=False,
                                prefill_s_per_token=self.prefill_s_per_token)
        return InstanceView(
            id=v.id, region=v.region, gpu=v.gpu, running=v.running, waiting=v.waiting,
            running_tokens=v.running_tokens, queued_prefill_tokens=v.queued_prefill_tokens, kv_usage=v.kv_usage,
            healthy=self.healthy(now), full=v.full, age=v.age + max(0.0, now - self.reported_at),
            in_flight=v.in_flight, prefill_s_per_token=v.prefill_s_per_token,
        )


class Dispatch:
    """One request on one replica, from send to end: moves the replica's counters exactly once each."""

    __slots__ = ("deferred", "epoch", "replica", "stage", "tokens")

    def __init__(self, replica: ReplicaState, tokens: int, epoch: int, deferred: bool = False) -> None:
        self.replica = replica
        self.tokens = tokens
        self.epoch = epoch
        self.deferred = deferred
        self.stage = 0  # 0 sent, 1 first byte seen, 2 finished

    def first_byte(self) -> None:
        """The replica produced the first byte of the answer (its prefill is done)."""
        if self.stage == 0:
            r = self.replica
            r._unpend(self)
            r.streaming += 1
            r.streaming_tokens += self.tokens
            self.stage = 1

    def finish(self) -> None:
        """The request ended (whatever the outcome). Idempotent."""
        r = self.replica
        if self.stage == 0:
            r._unpend(self)
        elif self.stage == 1:
            r.streaming -= 1
            r.streaming_tokens -= self.tokens
        else:
            return
        r.in_flight -= 1
        self.stage = 2


class PeerState:
    """Another region's router: its health and RTT (probes), its replicas (summary polls)."""

    def __init__(self, *, region: str, url: str, auth: str | None, health: HealthTracker, rtt_alpha: float) -> None:
        self.region = region
        self.url = url
        self.auth = auth
        self.health = health
        self.rtt = Ewma(rtt_alpha)
        self.polled_at = -math.inf
        self.polls = 0
        self.poll_errors = 0
        self.in_flight = 0  # requests forwarded there and not finished


class _PrefixUnion:
    """Matches of several prefix indexes over disjoint replica sets, merged."""

    def __init__(self, parts: Sequence[PrefixIndexView]) -> None:
        self._parts = parts

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for p in self._parts:
            out.update(p.match(block_hashes))
        return out


class ClusterState:
    """Replicas, peers, RTTs and the prefix mirror of one router (module docstring).

    Args:
        config: the router configuration.
        keep_prefix: keep a prefix mirror (``False`` for policies that never look at prefixes).
        clock: monotonic seconds (``time.monotonic`` by default); every ``now`` argument is on it.
    """

    def __init__(self, config: RouterConfig, *, keep_prefix: bool = True, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.here = config.region
        self.clock = clock
        self.block_size = config.block_size
        self.keep_prefix = keep_prefix
        self.decode_step = False  # fill views' decode_step_s (the router sets it for policies that ask)
        self.prices = config.regions.prices()
        self.stale_after_s = max(1.0, 10.0 * config.scrape_period_s)
        h = config.health
        alpha = config.regions.ewma_alpha
        now = clock()
        self.replicas: dict[str, ReplicaState] = {}
        for rid, rc in zip(config.replica_ids, config.replicas, strict=True):
            perf = builtin_perf_model(rc.gpu, rc.model)
            fixed = rc.num_kv_blocks is not None
            # (the config demands num_kv_blocks where the model does not fit the GPU's profile)
            blocks = rc.num_kv_blocks or perf.num_kv_blocks(config.block_size)
            self.replicas[rid] = ReplicaState(
                id=rid, region=rc.region, url=rc.url, gpu=rc.gpu, model=rc.model, engine=rc.engine,
                prefill_s_per_token=perf.prefill_s_per_token() * config.profile_time_scale,
                profile_time_scale=config.profile_time_scale, capacity_blocks=blocks, capacity_fixed=fixed,
                max_in_flight=rc.max_in_flight,
                auth=f"Bearer {rc.api_key.get_secret_value()}" if rc.api_key is not None else None,
                health=HealthTracker(h.unhealthy_after, h.healthy_after),
                ejector=Ejector(h.eject_after, h.eject_cooldown_s), rtt_alpha=alpha, started_at=now,
                max_num_seqs=rc.max_num_seqs or 0, perf=perf,
            )
        self.local_ids = tuple(self.replicas)
        self.peers: dict[str, PeerState] = {
            p.region: PeerState(region=p.region, url=p.url,
                                auth=f"Bearer {p.api_key.get_secret_value()}" if p.api_key is not None else None,
                                health=HealthTracker(h.unhealthy_after, h.healthy_after), rtt_alpha=alpha)
            for p in config.peers
        }
        self._rtt_config = config.regions.rtt_s()
        self._intra_s = config.regions.intra_region_rtt_ms / 1000.0
        self._measure = config.regions.measure
        # this region's replicas' probes, per region: what a measured RTT is the mean of
        self._probes: dict[str, list[ReplicaState]] = {}
        for r in self.replicas.values():
            if r.local:
                self._probes.setdefault(r.region, []).append(r)
        self.mirror: PrefixIndex | None = None
        self._engine_names: dict[str, BoundedHashMap] = {}  # per replica: engine block hash -> router hash
        self._mirror_capacity = 1  # the largest replica's KV blocks (bounds the engine names kept)
        self.peer_mirror: PrefixIndex | None = None
        self._prefix: PrefixIndexView = NoPrefixInfo()
        self._rebuild_mirror()

    # ------------------------------------------------------------------ prefix mirror
    def _rebuild_mirror(self) -> None:
        if not self.keep_prefix:
            return
        self.mirror = PrefixIndex({rid: self.replicas[rid].capacity_blocks for rid in self.local_ids})
        self._mirror_capacity = max((self.replicas[rid].capacity_blocks for rid in self.local_ids), default=1)
        self._engine_names.clear()
        self._refresh_prefix_view()

    def _rebuild_peer_mirror(self) -> None:
        if not self.keep_prefix:
            return
        remote = {rid: r.capacity_blocks for rid, r in self.replicas.items() if not r.local}
        self.peer_mirror = PrefixIndex(remote) if remote else None
        self._refresh_prefix_view()

    def _refresh_prefix_view(self) -> None:
        parts = [m for m in (self.mirror, self.peer_mirror) if m is not None]
        self._prefix = parts[0] if len(parts) == 1 else _PrefixUnion(parts) if parts else NoPrefixInfo()

    def matched_blocks(self, block_hashes: Sequence[int], replica_id: str) -> int:
        """Leading blocks of ``block_hashes`` the mirror expects cached on ``replica_id``."""
        return self._prefix.match(block_hashes).get(replica_id, 0) if block_hashes else 0

    def record_sent(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """Remember that ``replica_id`` now caches ``block_hashes`` (it was sent that prompt)."""
        if not block_hashes or not self.keep_prefix:
            return
        r = self.replicas.get(replica_id)
        if r is None:
            return
        index = self.mirror if r.local else self.peer_mirror
        if index is not None:
            index.record(replica_id, block_hashes)

    def apply_kv_events(self, replica_id: str, changes: Sequence[KvChange]) -> None:
        """Apply one batch of ``replica_id``'s KV-cache events to the mirror, in order.

        Stored runs of the batch are recorded last to first, so that, as for a prompt the router
        sends, earlier blocks end up the more recent (one ``record`` of the runs put end to end does
        exactly that: it touches blocks last to first). Nothing happens when the router keeps no
        mirror or ``replica_id`` is not one of its own replicas. Never blocks.
        """
        mirror = self.mirror
        if mirror is None or not self.keep_prefix or replica_id not in self.local_ids:
            return
        names = self._engine_names.get(replica_id)
        stored: list[int] = []
        learned: dict[int, int] = {}  # engine hash -> router hash, of the runs stored by this call so far

        def flush() -> None:
            if stored:
                mirror.record(replica_id, stored)
                stored.clear()

        for c in changes:
            if isinstance(c, StoredBlocks):
                stored += self._router_hashes(c, names, learned)
                continue
            flush()
            if isinstance(c, RemovedBlocks):
                gone: Any = names.pop_many(c.block_hashes) if names is not None and len(names) else c.block_hashes
                if learned:  # names stored by this call: their translation is the newer one
                    gone = list(gone)
                    for j, h in enumerate(c.block_hashes):
                        if h in learned:
                            gone[j] = learned.pop(h)
                mirror.remove(replica_id, gone)
            elif isinstance(c, ClearedBlocks):
                mirror.clear(replica_id)
                learned.clear()
                if names is not None:
                    names.clear()
        flush()
        if learned:  # (kept in a dict until now: the same as adding each run's names at once)
            if names is None:
                names = self._engine_names[replica_id] = BoundedHashMap(2 * max(1, self._mirror_capacity))
            names.update(list(learned), list(learned.values()))

    def _router_hashes(self, c: StoredBlocks, names: BoundedHashMap | None, learned: dict[int, int]
                       ) -> tuple[int, ...]:
        """The router's own hashes of a stored run.

        An engine that hashes as the router does (the engine double) sends them as they are. Another
        (vLLM hashes with sha256) sends the run's token ids: they are hashed the router's way, chained
        from the router's name of the parent block, and the engine's names of the blocks are added
        to ``learned`` (engine hash -> router hash), which the caller moves into ``names`` (per
        replica, emptied as blocks are evicted) so that later evictions and children can be
        translated. ``names`` holds at most twice as many names as the mirror holds blocks, the
        oldest going first: an engine evicts what it stored and says so, but a removal may be missed.
        Without token ids, or with another block size, the engine's hashes are taken as they are.
        """
        bs = self.block_size
        if not c.token_ids or c.block_size != bs or len(c.token_ids) != bs * len(c.block_hashes):
            return c.block_hashes
        p = c.parent_block_hash
        parent = ROOT_HASH if p is None else learned[p] if p in learned else names.get(p, p) if names is not None else p
        ours = hash_token_blocks(c.token_ids, bs, parent)
        if ours != c.block_hashes:
            learned.update(zip(c.block_hashes, ours, strict=True))
        return ours

    # ------------------------------------------------------------------ RTT
    def measured_rtt_s(self, region: str) -> float:
        """Smoothed probe RTT from this router to ``region``, seconds; ``nan`` when not measured."""
        if region in self.peers:
            return self.peers[region].rtt.value
        vals = [r.rtt.value for r in self._probes.get(region, ()) if r.health.up and r.rtt.value == r.rtt.value]
        return sum(vals) / len(vals) if vals else math.nan

    def rtt_s(self, a: str, b: str) -> float:
        """Round-trip seconds between regions ``a`` and ``b`` (module docstring for the sources)."""
        if self._measure and (a == self.here or b == self.here):
            m = self.measured_rtt_s(b if a == self.here else a)
            if m == m:
                return m
        c = self._rtt_config.get((a, b))
        if c is not None:
            return c
        return self._intra_s

    # ------------------------------------------------------------------ snapshot
    def views(self, now: float, exclude: frozenset[str] = frozenset()) -> dict[str, InstanceView]:
        """Every replica's view at ``now``; those in ``exclude`` are shown unhealthy (failed this request)."""
        out: dict[str, InstanceView] = {}
        stale = self.stale_after_s
        step = self.decode_step
        for rid, r in self.replicas.items():
            v = r.view(now, stale, step)
            if rid in exclude and v.healthy:
                v = dataclasses.replace(v, healthy=False)
            out[rid] = v
        return out

    def snapshot(self, now: float, hops: int = 0, exclude: frozenset[str] = frozenset()) -> ClusterSnapshot:
        """The policy's input at ``now`` for a request that was forwarded ``hops`` times."""
        return ClusterSnapshot(now=now, here=self.here, instances=self.views(now, exclude), rtt_s=self.rtt_s,
                               prefix=self._prefix, block_size=self.block_size, hops=hops, prices=self.prices)

    def any_available(self, now: float, local_only: bool) -> bool:
        """Whether some replica (only this region's when ``local_only``) may take a request now."""
        return any(r.available(now) for r in self.replicas.values() if r.local or not local_only)

    def any_healthy(self, now: float, local_only: bool) -> bool:
        """Whether some replica (only this region's when ``local_only``) is up, full or not."""
        return any(r.healthy(now) for r in self.replicas.values() if r.local or not local_only)

    # ------------------------------------------------------------------ peers
    def summary(self, now: float) -> dict[str, Any]:
        """This router's own replicas as JSON for its peers (``GET /isthmus/summary``)."""
        out = []
        for rid in self.local_ids:
            r = self.replicas[rid]
            v = r.view(now, self.stale_after_s)
            out.append({
                "id": v.id, "region": v.region, "gpu": v.gpu, "url": r.url, "running": v.running,
                "waiting": v.waiting, "running_tokens": v.running_tokens,
                "queued_prefill_tokens": v.queued_prefill_tokens, "kv_usage": v.kv_usage, "healthy": v.healthy,
                "full": v.full, "age": v.age, "in_flight": v.in_flight,
                "prefill_s_per_token": v.prefill_s_per_token if v.prefill_s_per_token == v.prefill_s_per_token
                else None,
                "num_kv_blocks": r.capacity_blocks,
            })
        return {"region": self.here, "replicas": out}

    def apply_summary(self, peer: PeerState, data: Any, now: float, asked_at: float | None = None) -> None:
        """Take a peer's summary; replicas it no longer reports are dropped.

        ``asked_at``: when the poll was sent (default ``now``). The peer built its summary about one
        one-way delay after that, and every request this router forwarded since ``asked_at`` may be
        missing from it, so its views age from ``asked_at``: a policy that adds what it forwarded
        since the view (``now - age``) then counts those requests instead of losing them for a
        round trip.

        Raises:
            ValueError: the summary is malformed.
        """
        if not isinstance(data, dict) or not isinstance(data.get("replicas"), list):
            raise ValueError("summary must be an object with a 'replicas' list")
        seen: set[str] = set()
        changed = False
        h = self.config.health
        for item in data["replicas"]:
            try:
                rid = str(item["id"])
                t_p = item.get("prefill_s_per_token")
                view = InstanceView(
                    id=rid, region=peer.region, gpu=str(item.get("gpu", "")), running=int(item["running"]),
                    waiting=int(item["waiting"]), running_tokens=int(item.get("running_tokens", 0)),
                    queued_prefill_tokens=int(item.get("queued_prefill_tokens", 0)),
                    kv_usage=float(item.get("kv_usage", 0.0)), healthy=bool(item.get("healthy", True)),
                    full=bool(item.get("full", False)), age=float(item.get("age", 0.0)),
                    in_flight=int(item.get("in_flight", 0)),
                    prefill_s_per_token=float(t_p) if t_p is not None else math.nan,
                )
                url = str(item["url"])
                blocks = max(1, int(item.get("num_kv_blocks", 1)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"bad replica entry in summary: {exc}") from None
            if rid in self.replicas and self.replicas[rid].local:
                continue  # a peer cannot shadow one of ours
            seen.add(rid)
            r = self.replicas.get(rid)
            if r is None or r.region != peer.region:
                r = ReplicaState(id=rid, region=peer.region, url=url, gpu=view.gpu,
                                 prefill_s_per_token=view.prefill_s_per_token, capacity_blocks=blocks,
                                 local=False, health=peer.health,
                                 ejector=Ejector(h.eject_after, h.eject_cooldown_s), auth=None, started_at=now)
                self.replicas[rid] = r
                changed = True
            elif r.capacity_blocks != blocks:
                r.capacity_blocks = blocks
                changed = True
            r.url = url
            r.reported = view
            r.reported_at = now if asked_at is None else min(asked_at, now)
        for rid in [rid for rid, r in self.replicas.items()
                    if not r.local and r.region == peer.region and rid not in seen]:
            if self.replicas[rid].in_flight == 0:
                del self.replicas[rid]
                changed = True
            else:
                self.replicas[rid].reported = None
        peer.polled_at = now
        peer.polls += 1
        if changed:
            self._rebuild_peer_mirror()


class Collectors:
    """The background tasks that keep a :class:`ClusterState` fresh.

    Per local replica: a ``/metrics`` scrape every ``scrape_period_s`` and a timed ``GET /health``
    every ``health.probe_period_s`` (health verdict and RTT sample). Per peer (regional mode): the
    same probe of its ``/health`` and a ``GET /isthmus/summary`` every ``sync_period_s``. Each loop
    runs its calls one after another with a timeout, so a slow target never piles up requests.
    """

    def __init__(self, state: ClusterState, pool: UpstreamPool, *, sync_period_s: float) -> None:
        self.state = state
        self.pool = pool
        self.sync_period_s = sync_period_s
        self._tasks: list[asyncio.Task[None]] = []

    async def _get(self, base_url: str, path: bytes, auth: str | None, timeout_s: float) -> tuple[int, bytes]:
        """``GET base_url + path``: (status, body), everything within ``timeout_s``.

        Raises:
            UpstreamError: connect failure, timeout or broken answer; ValueError: a body over 16 MiB.
        """
        origin = origin_of(base_url)
        head = b"authorization: %s\r\n" % auth.encode("latin-1") if auth else b""
        resp = await self.pool.request(origin, path, head, b"", connect_s=timeout_s, idle_s=timeout_s,
                                       total_s=timeout_s, method=b"GET")
        try:
            return resp.status, await resp.read_all(1 << 24)
        finally:
            resp.release()

    def start(self) -> None:
        """Start every loop (call from the running event loop)."""
        st = self.state
        for rid in st.local_ids:
            r = st.replicas[rid]
            self._tasks.append(asyncio.create_task(self._scrape_loop(r), name=f"scrape {rid}"))
            self._tasks.append(asyncio.create_task(
                self._probe_loop(rid, r.url, r.auth, r.health, r.rtt), name=f"probe {rid}"))
        for region, p in st.peers.items():
            self._tasks.append(asyncio.create_task(
                self._probe_loop(f"peer {region}", p.url, p.auth, p.health, p.rtt), name=f"probe peer {region}"))
            self._tasks.append(asyncio.create_task(self._poll_loop(p), name=f"poll peer {region}"))

    async def stop(self) -> None:
        """Cancel every loop and wait for them."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _sleep_rest(self, t0: float, period: float) -> None:
        await asyncio.sleep(max(0.0, period - (self.state.clock() - t0)))

    async def _scrape_loop(self, r: ReplicaState) -> None:
        st = self.state
        period = st.config.scrape_period_s
        timeout = max(0.5, min(5.0, 10 * period))
        warned = False
        while True:
            t0 = st.clock()
            epoch = r.scrape_started()
            try:
                status, body = await self._get(r.url, b"/metrics", r.auth, timeout)
                if status != 200:
                    raise ValueError(f"status {status}")
                load = parse_engine_metrics(body.decode("utf-8", "replace"), "sglang" if r.engine == "sglang"
                                            else "vllm")
                if load.block_size and load.block_size != st.block_size and not warned:
                    warned = True
                    log.warning("replica %s caches blocks of %d tokens, the router hashes blocks of %d: set "
                                "block_size: %d in the router config for its KV events to be usable", r.id,
                                load.block_size, st.block_size, load.block_size)
                if r.apply_scrape(load, epoch, st.clock(), st.block_size):
                    log.info("replica %s reports %d KV blocks: prefix mirror resized", r.id, r.capacity_blocks)
                    st._rebuild_mirror()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of one scrape: count it, keep going
                r.scrape_errors += 1
                if r.scrape_errors in (1, 10, 100) or r.scrape_errors % 1000 == 0:
                    log.warning("scrape of %s failed (%d so far): %s", r.id, r.scrape_errors, type(exc).__name__)
            await self._sleep_rest(t0, period)

    async def _probe_loop(self, name: str, base_url: str, auth: str | None, health: HealthTracker, rtt: Ewma) -> None:
        st = self.state
        cfg = st.config.health
        while True:
            t0 = st.clock()
            ok = False
            try:
                status, _ = await self._get(base_url, b"/health", auth, cfg.probe_timeout_s)
                ok = status == 200
                if ok:
                    rtt.add(st.clock() - t0)
            except asyncio.CancelledError:
                raise
            except Exception:  # refused, reset, timed out: a failed probe
                ok = False
            if health.record(ok):
                log.warning("%s is %s", name, "up" if health.up else "down")
            await self._sleep_rest(t0, cfg.probe_period_s)

    async def _poll_loop(self, peer: PeerState) -> None:
        st = self.state
        timeout = max(1.0, st.config.health.probe_timeout_s)
        while True:
            t0 = st.clock()
            try:
                status, body = await self._get(peer.url, b"/isthmus/summary", peer.auth, timeout)
                if status != 200:
                    raise ValueError(f"status {status}")
                data = orjson.loads(body)
                st.apply_summary(peer, data, st.clock(), asked_at=t0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed poll: keep the last view, which ages
                peer.poll_errors += 1
                if peer.poll_errors in (1, 10, 100) or peer.poll_errors % 1000 == 0:
                    log.warning("summary poll of peer %s failed (%d so far): %s", peer.region, peer.poll_errors,
                                type(exc).__name__)
            await self._sleep_rest(t0, self.sync_period_s)
