"""The multi-region simulator: routers, replicas across regions, and the network between them.

Life of a request (all times virtual, seconds):

1. the client in region ``origin`` sends it at ``arrival``. In ``proxy`` mode it goes to the one
   router (in ``router_region``; with no router region the client itself decides, at no network
   cost); in ``regional`` mode to the router of its own region. Getting there takes
   ``one_way(origin, router region)``;
2. the router builds a :class:`~isthmus.core.snapshot.ClusterSnapshot` of that instant and calls
   its policy. A ``None`` target holds the request at that router and asks again every
   ``recheck_s``; a forward (regional mode, at most one hop) sends it to the peer region's router,
   ``one_way`` away, which decides again with ``hops = 1``;
3. the request reaches the replica after ``one_way(router region, replica region)`` and queues in
   its engine (:class:`~isthmus.engine.Replica`), which steps continuously while it has work;
4. the first token and the last token travel back the same path: TTFT and E2E are measured at the
   client.

What a router sees. In proxy mode, every replica as of now. In regional mode, the replicas of its
own region as of now and the others as of its last poll of its peers (every ``sync_period_s``;
the view's ``age`` says how old). "As of now" means the engine state as of the end of the step in
progress (the engine applies a step when it starts it), plus the requests this router sent that
are still on the wire (counted as waiting, as a router counting its in-flight requests would).
Prefix caches are seen either exactly (``prefix_source="exact"``) or as the router's own record of
what it sent where (``"mirror"``, an LRU of the replica's KV size, which is what GORGO-proxy keeps);
a regional router also learns where the requests it forwarded were served.

Decode-only steps between two instants at which anyone may look at a replica are fused (see
:meth:`Replica.step`), which changes no result.

For every request the simulator also computes a lower bound on its TTFT, the best any policy could
do with no queueing: the minimum over replicas of the RTT from its origin plus the prefill time of
the part of its prompt that replica does not hold, at the moment it is sent.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import PerfModel, builtin_perf_model
from isthmus.core.policy import Decision, Outcome, Policy, uses_prefix
from isthmus.core.request import Request
from isthmus.core.snapshot import (
    CallbackPrefixView,
    ClusterSnapshot,
    InstanceView,
    PrefixIndex,
    PrefixIndexView,
)
from isthmus.core.topology import Topology
from isthmus.engine.replica import FinishedRequest, Replica
from isthmus.sim.events import ARRIVAL, DELIVER, RETRY, SEND, STEP_END, SYNC, EventLoop
from isthmus.sim.metrics import RequestLog, SimResult

Mode = Literal["proxy", "regional"]
PrefixSource = Literal["mirror", "exact"]


class _Flight:
    """One request between the client's send and its completion."""

    __slots__ = ("bound", "decided_at", "held_s", "hops", "reached_router", "replica", "req", "router", "via")

    def __init__(self, req: Request, bound: float) -> None:
        self.req = req
        self.bound = bound
        self.router = -1  # index of the router holding / that decided it
        self.via = -1  # first router, when forwarded
        self.hops = 0
        self.reached_router = math.nan
        self.decided_at = math.nan
        self.held_s = 0.0
        self.replica = -1


class _Router:
    """A decision point: its place, its policy, its queue and what it knows."""

    __slots__ = ("held", "index", "mirror", "peer_views", "policy", "prefix", "region", "retry_at", "synced_at")

    def __init__(self, index: int, region: str | None, policy: Policy, prefix: PrefixIndexView,
                 mirror: PrefixIndex | None) -> None:
        self.index = index
        self.region = region
        self.policy = policy
        self.prefix = prefix
        self.mirror = mirror
        self.held: list[_Flight] = []
        self.retry_at = math.inf
        self.peer_views: dict[str, InstanceView] = {}
        self.synced_at = -math.inf


def _prefill_s_per_token(perf: PerfModel, tokens: int = 1024) -> float:
    return perf.step_time(tokens, tokens * tokens / 2.0, 1, 0, 0) / tokens


class Simulation:
    """One run of one policy over one request stream.

    Args:
        topology: regions and RTTs.
        instances: replicas; their regions must be in the topology.
        policy: the routing policy (the same object type the live router runs); in regional mode
            it is shared by all routers unless ``policies_by_region`` gives one per region.
        requests: the request stream, arrivals non-decreasing; consumed lazily.
        router_region: proxy mode: where the router sits; ``None`` places no router on the path
            (the client picks the replica directly).
        mode: ``"proxy"`` (one router sees everything) or ``"regional"`` (one router per region).
        policies_by_region: regional mode: a policy object per region.
        sync_period_s: regional mode: how often a router polls its peers' state.
        recheck_s: how often a router re-asks its policy about held requests.
        prefix_source: what policies see of prefix caches: ``"mirror"`` or ``"exact"``.
        perf_models: step-time model per instance id; default the built-in roofline model of
            each instance's (GPU, model).
        progress: called with the number of completed requests every ``progress_every``.
    """

    def __init__(
        self,
        topology: Topology,
        instances: Sequence[InstanceSpec],
        policy: Policy,
        requests: Iterable[Request],
        *,
        router_region: str | None = None,
        mode: Mode = "proxy",
        policies_by_region: Mapping[str, Policy] | None = None,
        sync_period_s: float = 1.0,
        recheck_s: float = 0.02,
        prefix_source: PrefixSource = "mirror",
        perf_models: Mapping[str, PerfModel] | None = None,
        progress: Callable[[int], None] | None = None,
        progress_every: int = 200,
    ) -> None:
        if not instances:
            raise ValueError("a simulation needs at least one replica")
        ids = [s.id for s in instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate instance ids in {ids}")
        for s in instances:
            topology.index(s.region)
        if router_region is not None:
            topology.index(router_region)
        if mode not in ("proxy", "regional"):
            raise ValueError(f"unknown router mode {mode!r}")
        if prefix_source not in ("mirror", "exact"):
            raise ValueError(f"unknown prefix source {prefix_source!r}")
        if sync_period_s <= 0 or recheck_s <= 0:
            raise ValueError("sync_period_s and recheck_s must be > 0")
        if policies_by_region is not None:
            missing = [r for r in topology.regions if r not in policies_by_region]
            if missing:
                raise ValueError(f"no policy for regions {missing}")
        self.topology = topology
        self.specs = tuple(instances)
        self.policy = policy
        self._requests = requests
        self.router_region = router_region
        self.mode = mode
        self._policies_by_region = dict(policies_by_region or {})
        self.sync_period_s = sync_period_s
        self.recheck_s = recheck_s
        self.prefix_source = prefix_source
        self._perf_models = dict(perf_models or {})
        self._progress = progress
        self._progress_every = max(1, progress_every)

    def _build_replicas(self) -> list[Replica]:
        out = []
        for s in self.specs:
            perf = self._perf_models.get(s.id)
            blocks = s.num_kv_blocks
            if perf is None or blocks is None:
                roof = builtin_perf_model(s.gpu, s.model)
                perf = perf if perf is not None else roof
                blocks = blocks or roof.num_kv_blocks(s.block_size, s.gpu_memory_utilization)
            out.append(Replica(s, perf, blocks))
        return out

    def run(self) -> SimResult:
        """Replay the whole stream and return the per-request results."""
        wall0 = time.perf_counter()
        topo = self.topology
        regions = topo.regions
        region_idx = {r: i for i, r in enumerate(regions)}
        replicas = self._build_replicas()
        n_rep = len(replicas)
        rep_ids = [r.id for r in replicas]
        id_to_idx = {rid: i for i, rid in enumerate(rep_ids)}
        rep_region = [s.region for s in self.specs]
        rep_region_idx = [region_idx[r] for r in rep_region]
        t_p = [_prefill_s_per_token(r.perf) for r in replicas]
        capacity = {r.id: r.pool.num_blocks for r in replicas}
        one_way = topo.one_way
        rtt = topo.rtt
        regional = self.mode == "regional"
        recheck = self.recheck_s
        sync_period = self.sync_period_s
        exact = CallbackPrefixView({r.id: r.cached_prefix_blocks for r in replicas})

        # ------------------------------------------------------------------ routers
        routers: list[_Router] = []

        def make_router(i: int, region: str | None, pol: Policy) -> _Router:
            # a policy that never looks at prefixes needs no mirror (and the exact view costs nothing)
            keep = self.prefix_source == "mirror" and uses_prefix(pol)
            mirror = PrefixIndex(capacity) if keep else None
            return _Router(i, region, pol, mirror if mirror is not None else exact, mirror)

        if regional:
            for i, reg in enumerate(regions):
                routers.append(make_router(i, reg, self._policies_by_region.get(reg, self.policy)))
        else:
            routers.append(make_router(0, self.router_region, self.policy))
        region_router = {r.region: r for r in routers if r.region is not None}
        local_reps: list[frozenset[int]] = [
            frozenset(i for i in range(n_rep) if not regional or rep_region[i] == r.region) for r in routers
        ]

        loop = EventLoop()
        log = RequestLog()
        flights: dict[str, _Flight] = {}
        in_transit = [0] * n_rep
        in_transit_tokens = [0] * n_rep
        in_flight = [0] * n_rep
        pending_delivery: list[list[float]] = [[] for _ in range(n_rep)]
        busy = [False] * n_rep
        watch: list[float] = []  # future instants at which a router looks at replicas
        next_send = math.inf
        counters = {"arrived": 0, "rejected": 0, "forwards": 0, "held": 0, "decisions": 0}
        staleness_sum = 0.0
        staleness_n = 0
        stream: Iterator[Request] = iter(self._requests)
        progress = self._progress
        every = self._progress_every
        last_arrival = -math.inf

        def router_for(origin: str) -> _Router:
            return region_router[origin] if regional else routers[0]

        def hop(a: str | None, b: str) -> float:
            return 0.0 if a is None else one_way(a, b)

        def path_back(f: _Flight, rep: int) -> float:
            """Replica -> deciding router -> (first router) -> client, seconds."""
            r = routers[f.router]
            origin = f.req.origin
            if r.region is None:
                return one_way(rep_region[rep], origin)
            back = one_way(rep_region[rep], r.region)
            if f.via >= 0:
                first = routers[f.via].region
                assert first is not None
                return back + one_way(r.region, first) + one_way(first, origin)
            return back + one_way(r.region, origin)

        def prefill_time(rep: int, tokens: int, cached: int) -> float:
            budget = replicas[rep].spec.max_num_batched_tokens
            step_time = replicas[rep].perf.step_time
            total, ctx, left = 0.0, cached, tokens
            while left > 0:
                c = min(budget, left)
                total += step_time(c, c * (ctx + c / 2.0), 1, 0, 0)
                ctx += c
                left -= c
            return total

        def lower_bound(req: Request) -> float:
            best = math.inf
            hashes = req.block_hashes
            origin = req.origin
            for i, r in enumerate(replicas):
                net = rtt(origin, rep_region[i])
                if net >= best:
                    continue
                cached = min(r.cached_prefix_blocks(hashes) * r.spec.block_size, req.prompt_tokens - 1)
                t = net + prefill_time(i, req.prompt_tokens - cached, cached)
                if t < best:
                    best = t
            return best

        def push_next_send() -> None:
            nonlocal next_send, last_arrival
            req = next(stream, None)
            if req is None:
                next_send = math.inf
                return
            if req.arrival < last_arrival:
                raise ValueError(f"request {req.id} arrives at {req.arrival}, before the previous one")
            last_arrival = req.arrival
            next_send = req.arrival
            loop.schedule(req.arrival, SEND, SEND, req)

        def look_at(t: float) -> None:
            heapq.heappush(watch, t)

        def horizon(rep: int) -> float:
            now = loop.now
            while watch and watch[0] < now:
                heapq.heappop(watch)
            h = next_send
            if watch and watch[0] < h:
                h = watch[0]
            pd = pending_delivery[rep]
            if pd and pd[0] < h:
                h = pd[0]
            return h

        def start_step(rep: int, now: float) -> None:
            res = replicas[rep].step(now, horizon(rep))
            if res is None:
                busy[rep] = False
                return
            busy[rep] = True
            loop.schedule(now + res.duration, STEP_END, STEP_END, (rep, res.finished))

        def fresh_view(i: int) -> InstanceView:
            # token counts as a router keeps them (isthmus.router.state): a request's prompt counts as
            # queued until its first token, in transit, waiting or in prefill, then as running
            rep = replicas[i]
            pre = rep.prefilling_prompt_tokens
            v = rep.view(extra_waiting=in_transit[i], extra_waiting_tokens=in_transit_tokens[i] + pre,
                         in_flight=in_flight[i], prefill_s_per_token=t_p[i])
            if pre:
                v = dataclasses.replace(v, running_tokens=v.running_tokens - pre)
            return v

        def sync(router: _Router, now: float) -> None:
            local = local_reps[router.index]
            router.peer_views = {rep_ids[i]: fresh_view(i) for i in range(n_rep) if i not in local}
            router.synced_at = now

        def snapshot(router: _Router, now: float, f: _Flight) -> ClusterSnapshot:
            nonlocal staleness_sum, staleness_n
            views: dict[str, InstanceView] = {}
            if regional:
                age = now - router.synced_at
                local = local_reps[router.index]
                for i in range(n_rep):
                    if i in local:
                        views[rep_ids[i]] = fresh_view(i)
                    else:
                        v = router.peer_views[rep_ids[i]]
                        views[rep_ids[i]] = _aged(v, age)
                        staleness_sum += age
                        staleness_n += 1
            else:
                for i in range(n_rep):
                    views[rep_ids[i]] = fresh_view(i)
            here = router.region if router.region is not None else f.req.origin
            return ClusterSnapshot(now=now, here=here, instances=views, rtt_s=rtt, prefix=router.prefix,
                                   hops=f.hops)

        def hold(router: _Router, f: _Flight, now: float) -> None:
            router.held.append(f)
            counters["held"] += 1
            if router.retry_at == math.inf:
                router.retry_at = now + recheck
                look_at(router.retry_at)
                loop.schedule(router.retry_at, RETRY, RETRY, router.index)

        def decide(router: _Router, f: _Flight, now: float) -> bool:
            req = f.req
            counters["decisions"] += 1
            d: Decision = router.policy.choose(req, snapshot(router, now, f))
            if d.target is None:
                return False
            if d.forward:
                peer = region_router.get(d.target) if regional else None
                if peer is None or peer is router:
                    raise ValueError(f"policy {router.policy.name} forwarded to {d.target!r}, not a peer router")
                if f.hops >= 1:
                    raise ValueError(f"policy {router.policy.name} forwarded request {req.id} a second time")
                assert router.region is not None and peer.region is not None
                counters["forwards"] += 1
                f.held_s += now - f.reached_router
                f.via = router.index
                f.hops += 1
                t = now + one_way(router.region, peer.region)
                look_at(t)
                loop.schedule(t, ARRIVAL, ARRIVAL, (peer.index, f))
                return True
            rep = id_to_idx.get(d.target)
            if rep is None:
                raise ValueError(f"policy {router.policy.name} chose unknown replica {d.target!r}")
            f.decided_at = now
            f.held_s += now - f.reached_router
            f.replica = rep
            f.router = router.index
            in_transit[rep] += 1
            in_transit_tokens[rep] += req.prompt_tokens
            in_flight[rep] += 1
            if router.mirror is not None:
                router.mirror.record(d.target, req.block_hashes)
                if f.via >= 0:
                    m = routers[f.via].mirror
                    if m is not None:
                        m.record(d.target, req.block_hashes)
            t = now + one_way(router.region if router.region is not None else req.origin, rep_region[rep])
            heapq.heappush(pending_delivery[rep], t)
            loop.schedule(t, DELIVER, DELIVER, (rep, req.id))
            return True

        def arrive(router: _Router, f: _Flight, now: float) -> None:
            f.router = router.index
            f.reached_router = now
            if router.held or not decide(router, f, now):
                hold(router, f, now)

        def complete(rep: int, fin: FinishedRequest) -> None:
            req = fin.request
            f = flights.pop(req.id)
            in_flight[rep] -= 1
            back = path_back(f, rep)
            ttft = fin.first_token_at + back - req.arrival
            e2e = fin.finished_at + back - req.arrival
            out = req.max_output_tokens
            tpot = (fin.finished_at - fin.first_token_at) / (out - 1) if out > 1 else math.nan
            log.arrival.append(req.arrival)
            log.ttft.append(ttft)
            log.e2e.append(e2e)
            log.tpot.append(tpot)
            log.queue.append(f.held_s + (fin.first_scheduled_at - fin.arrived_at))
            log.finish.append(fin.finished_at + back)
            log.bound.append(f.bound)
            log.origin.append(region_idx[req.origin])
            log.served.append(rep_region_idx[rep])
            log.prompt.append(req.prompt_tokens)
            log.cached.append(fin.cached_tokens)
            log.output.append(out)
            log.preemptions.append(fin.preemptions)
            log.hops.append(f.hops)
            routers[f.router].policy.observe(Outcome(req, rep_ids[rep], f.decided_at, ttft, e2e, fin.cached_tokens))
            if progress is not None and len(log) % every == 0:
                progress(len(log))

        if regional:
            for r in routers:
                sync(r, 0.0)
                look_at(sync_period)
                loop.schedule(sync_period, SYNC, SYNC, r.index)
        push_next_send()
        while True:
            ev = loop.pop()
            if ev is None:
                break
            now, kind, payload = ev
            if kind == STEP_END:
                rep, finished = payload
                for fin in finished:
                    complete(rep, fin)
                start_step(rep, now)
            elif kind == DELIVER:
                rep, rid = payload
                heapq.heappop(pending_delivery[rep])
                in_transit[rep] -= 1
                f = flights[rid]
                in_transit_tokens[rep] -= f.req.prompt_tokens
                try:
                    replicas[rep].add_request(f.req, now)
                except ValueError:  # can never fit this replica's KV cache: refused, as vLLM would
                    flights.pop(rid)
                    in_flight[rep] -= 1
                    counters["rejected"] += 1
                    continue
                if not busy[rep]:
                    start_step(rep, now)
            elif kind == SEND:
                req = payload
                counters["arrived"] += 1
                if req.id in flights:
                    raise ValueError(f"duplicate request id {req.id!r}")
                f = _Flight(req, lower_bound(req))
                flights[req.id] = f
                push_next_send()
                router = router_for(req.origin)
                delay = hop(router.region, req.origin)
                if delay > 0.0:
                    look_at(now + delay)
                    loop.schedule(now + delay, ARRIVAL, ARRIVAL, (router.index, f))
                else:
                    arrive(router, f, now)
            elif kind == ARRIVAL:
                idx, f = payload
                arrive(routers[idx], f, now)
            elif kind == RETRY:
                router = routers[payload]
                router.retry_at = math.inf
                still: list[_Flight] = []
                for f in router.held:
                    if still or not decide(router, f, now):
                        still.append(f)
                router.held = still
                if still:
                    router.retry_at = now + recheck
                    look_at(router.retry_at)
                    loop.schedule(router.retry_at, RETRY, RETRY, router.index)
            elif kind == SYNC:
                router = routers[payload]
                sync(router, now)
                if flights or next_send < math.inf:
                    look_at(now + sync_period)
                    loop.schedule(now + sync_period, SYNC, SYNC, router.index)
        if flights:
            raise RuntimeError(f"{len(flights)} requests never completed (first: {next(iter(flights))})")
        if progress is not None:
            progress(len(log))
        span = (max(log.finish) - min(log.arrival)) if len(log) else 0.0
        done = len(log)
        extra = {
            "engine_steps": float(sum(r.steps for r in replicas)),
            "forwards": float(counters["forwards"]),
            "forward_share": counters["forwards"] / done if done else 0.0,
            "held": float(counters["held"]),
            "mean_staleness_s": staleness_sum / staleness_n if staleness_n else 0.0,
        }
        return SimResult.from_log(
            log, policy=self.policy.name, regions=regions, requests=counters["arrived"], events=loop.processed,
            wall_s=time.perf_counter() - wall0, sim_span_s=span,
            preemptions=sum(r.preemptions for r in replicas), rejected=counters["rejected"], counters=extra,
        )


def _aged(v: InstanceView, age: float) -> InstanceView:
    """``v`` as seen ``age`` seconds after it was polled."""
    return InstanceView(
        id=v.id, region=v.region, gpu=v.gpu, running=v.running, waiting=v.waiting,
        running_tokens=v.running_tokens, queued_prefill_tokens=v.queued_prefill_tokens, kv_usage=v.kv_usage,
        healthy=v.healthy, full=v.full, age=age, in_flight=v.in_flight, prefill_s_per_token=v.prefill_s_per_token,
    )
