"""The multi-region simulator: routers, replicas across regions, and the network between them.

Life of a request (all times virtual, seconds):

1. the client in region ``origin`` sends it at ``arrival``. In ``proxy`` mode it goes to the one
   router (in ``router_region``; with no router region the client itself decides, at no network
   cost); in ``regional`` mode to the router of its own region. Getting there takes
   ``one_way(origin, router region)``;
2. the router builds a :class:`~isthmus.core.snapshot.ClusterSnapshot` of that instant and calls
   its policy. A ``None`` target holds the request at that router and asks again every
   ``recheck_s``; a forward (regional mode, at most one hop) sends it to the peer region's router,
   ``one_way`` away, which decides again with ``hops = 1``; a rejection (``Decision.reject``) drops
   it at once, counted as rejected under its code;
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

Held requests wait in a :class:`~isthmus.core.slo.DeadlineQueue` per router: in arrival order
(``queue_order="fifo"``, the default) or earliest deadline first with starvation protection
(``"edf"``, ``max_hold_s``). Each ``recheck_s`` the router offers them to its policy in that order,
and the first it cannot place ends the round for the requests of its model. While any request is
held, a new one joins the queue without being asked. A decision's ``priority`` re-orders a held
request (``edf``) and is the request's priority in the replica's engine queue.

SLOs and money: a request's SLO (its class) is checked at completion; policy rejections are counted
per class and code. When the topology has prices, the run adds up GPU time (the replicas' busy
step time, and their provisioned time from the first arrival to the last finish) and egress: a
completed request's prompt bytes on each region-crossing leg of its way in (client -> router(s) ->
replica) and its output bytes on each leg of its way back, ``tokens * topology.bytes_per_token``.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from itertools import pairwise
from typing import Literal

from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import PerfModel, builtin_perf_model
from isthmus.core.policy import Decision, Outcome, Policy, uses_prefix
from isthmus.core.request import Request
from isthmus.core.slo import (
    QUEUE_ORDERS,
    DeadlineQueue,
    QueueOrder,
    deadline_s,
    decode_step_estimate,
    slo_attained,
)
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

    __slots__ = ("bound", "decided_at", "engine_priority", "handle", "held_s", "hops", "pred_e2e", "pred_tpot",
                 "pred_ttft", "priority", "reached_router", "replica", "req", "router", "via")

    def __init__(self, req: Request, bound: float) -> None:
        self.req = req
        self.bound = bound
        self.priority = req.slo.priority if req.slo is not None else 0  # order in a deadline queue
        self.engine_priority = 0
        self.handle = -1  # in its router's queue, while held
        self.pred_ttft = math.nan
        self.pred_e2e = math.nan
        self.pred_tpot = math.nan
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
                 mirror: PrefixIndex | None, held: DeadlineQueue[_Flight]) -> None:
        self.index = index
        self.region = region
        self.policy = policy
        self.prefix = prefix
        self.mirror = mirror
        self.held = held
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
        queue_order: order of the requests a router holds: ``"fifo"`` or ``"edf"``.
        max_hold_s: ``edf``: a request held this long goes to the front (starvation protection).
        slo_classes: SLO class names in report order (classes first seen in the stream follow).
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
        queue_order: QueueOrder = "fifo",
        max_hold_s: float = 30.0,
        slo_classes: Sequence[str] = (),
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
        if queue_order not in QUEUE_ORDERS:
            raise ValueError(f"unknown queue order {queue_order!r}")
        if not max_hold_s > 0:
            raise ValueError("max_hold_s must be > 0")
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
        self.queue_order: QueueOrder = queue_order
        self.max_hold_s = max_hold_s
        self.slo_classes = tuple(dict.fromkeys(slo_classes))

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
            return _Router(i, region, pol, mirror if mirror is not None else exact, mirror,
                           DeadlineQueue(self.queue_order, self.max_hold_s))

        if regional:
            for i, reg in enumerate(regions):
                routers.append(make_router(i, reg, self._policies_by_region.get(reg, self.policy)))
        else:
            routers.append(make_router(0, self.router_region, self.policy))
        region_router = {r.region: r for r in routers if r.region is not None}
        local_reps: list[frozenset[int]] = [
            frozenset(i for i in range(n_rep) if not regional or rep_region[i] == r.region) for r in routers
        ]
        need_decode = any(getattr(r.policy, "uses_decode_step", False) for r in routers)
        prices = topo if topo.has_prices else None
        class_index: dict[str, int] = {name: k for k, name in enumerate(self.slo_classes)}
        rejections: dict[str, dict[str, int]] = {}
        busy_s = [0.0] * n_rep
        egress = {"bytes": 0.0, "usd": 0.0}
        bytes_per_token = topo.bytes_per_token
        egress_price = topo.egress_price

        loop = EventLoop()
        log = RequestLog()
        flights: dict[str, _Flight] = {}
        in_transit = [0] * n_rep
        in_transit_tokens = [0] * n_rep
        in_transit_deferred = [0] * n_rep  # the part of in_transit sent with a priority > 0 ...
        in_transit_deferred_tokens = [0] * n_rep  # ... and of in_transit_tokens
        in_flight = [0] * n_rep
        pending_delivery: list[list[float]] = [[] for _ in range(n_rep)]
        busy = [False] * n_rep
        watch: list[float] = []  # future instants at which a router looks at replicas
        next_send = math.inf
        counters = {"arrived": 0, "rejected": 0, "forwards": 0, "held": 0, "decisions": 0, "demoted": 0}
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
            busy_s[rep] += res.duration
            loop.schedule(now + res.duration, STEP_END, STEP_END, (rep, res.finished))

        def fresh_view(i: int) -> InstanceView:
            # token counts as a router keeps them (isthmus.router.state): a request's prompt counts as
            # queued until its first token, in transit, waiting or in prefill, then as running
            rep = replicas[i]
            pre = rep.prefilling_prompt_tokens
            step = (decode_step_estimate(rep.perf, len(rep.running), rep.running_prompt_tokens - pre)
                    if need_decode else math.nan)
            v = rep.view(extra_waiting=in_transit[i], extra_waiting_tokens=in_transit_tokens[i] + pre,
                         in_flight=in_flight[i], prefill_s_per_token=t_p[i], decode_step_s=step,
                         extra_deferred=in_transit_deferred[i], extra_deferred_tokens=in_transit_deferred_tokens[i])
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
                                   hops=f.hops, prices=prices)

        def hold(router: _Router, f: _Flight, now: float) -> None:
            f.handle = router.held.push(f, now=now, deadline_s=deadline_s(f.req), priority=f.priority,
                                        group=f.req.model)
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
                if d.reject is not None:
                    reject(f, d.reject)
                    return True
                if d.priority is not None and d.priority != f.priority:
                    f.priority = d.priority
                    if f.handle >= 0:
                        router.held.reprioritize(f.handle, d.priority)
                return False
            if d.priority is not None:
                f.priority = d.priority
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
            f.handle = -1
            f.engine_priority = d.priority if d.priority is not None else 0
            if req.slo is not None and f.engine_priority > req.slo.priority:
                counters["demoted"] += 1
            f.pred_ttft = d.estimate.ttft_s
            f.pred_e2e = d.estimate.e2e_s
            f.pred_tpot = d.estimate.tpot_s
            in_transit[rep] += 1
            in_transit_tokens[rep] += req.prompt_tokens
            if f.engine_priority > 0:
                in_transit_deferred[rep] += 1
                in_transit_deferred_tokens[rep] += req.prompt_tokens
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

        def class_of(req: Request) -> int:
            slo = req.slo
            if slo is None:
                return -1
            k = class_index.get(slo.name)
            if k is None:
                k = class_index[slo.name] = len(class_index)
            return k

        def reject(f: _Flight, code: str) -> None:
            flights.pop(f.req.id)
            f.handle = -1
            counters["rejected"] += 1
            name = f.req.slo.name if f.req.slo is not None else ""
            class_of(f.req)
            by_code = rejections.setdefault(name, {})
            by_code[code] = by_code.get(code, 0) + 1

        def add_egress(f: _Flight, rep: int) -> None:
            req = f.req
            path = [req.origin]
            if f.via >= 0:
                first = routers[f.via].region
                assert first is not None
                path.append(first)
            r = routers[f.router].region
            if r is not None:
                path.append(r)
            path.append(rep_region[rep])
            size_in = req.prompt_tokens * bytes_per_token
            size_out = req.max_output_tokens * bytes_per_token
            for a, b in pairwise(path):
                if a != b:
                    egress["bytes"] += size_in + size_out
                    egress["usd"] += (size_in * egress_price(a, b) + size_out * egress_price(b, a)) / 1e9

        def arrive(router: _Router, f: _Flight, now: float) -> None:
            f.router = router.index
            f.reached_router = now
            f.handle = -1  # not held here (yet); a forwarded request left its first router's queue
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
            log.slo_class.append(class_of(req))
            log.slo_met.append(slo_attained(req.slo, ttft, tpot, e2e))
            log.pred_ttft.append(f.pred_ttft)
            log.pred_e2e.append(f.pred_e2e)
            log.pred_tpot.append(f.pred_tpot)
            if prices is not None:
                add_egress(f, rep)
            routers[f.router].policy.observe(Outcome(req, rep_ids[rep], f.decided_at, ttft, e2e, fin.cached_tokens,
                                                     output_tokens=out))
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
                if f.engine_priority > 0:
                    in_transit_deferred[rep] -= 1
                    in_transit_deferred_tokens[rep] -= f.req.prompt_tokens
                try:
                    replicas[rep].add_request(f.req, now, f.engine_priority)
                except ValueError:  # can never fit this replica's KV cache: refused, as vLLM would
                    in_flight[rep] -= 1
                    reject(f, "too_long_for_kv")
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
                router.held.drain(now, partial(decide, router, now=now))
                if router.held:
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
        if counters["demoted"]:
            extra["demoted"] = float(counters["demoted"])
        cost: dict[str, float] = {}
        if prices is not None:
            hours = span / 3600.0  # provisioned from the first arrival to the last finish
            usd_h = [topo.gpu_price(s.gpu) for s in self.specs]
            cost = {
                "gpu_hours_provisioned": n_rep * hours,
                "gpu_usd_provisioned": sum(usd_h) * hours,
                "gpu_hours_busy": sum(busy_s) / 3600.0,
                "gpu_usd_busy": sum(p * b for p, b in zip(usd_h, busy_s, strict=True)) / 3600.0,
                "egress_gb": egress["bytes"] / 1e9,
                "egress_usd": egress["usd"],
                "bytes_per_token": bytes_per_token,
            }
        return SimResult.from_log(
            log, policy=self.policy.name, regions=regions, requests=counters["arrived"], events=loop.processed,
            wall_s=time.perf_counter() - wall0, sim_span_s=span,
            preemptions=sum(r.preemptions for r in replicas), rejected=counters["rejected"], counters=extra,
            slo_classes=tuple(class_index), rejections=rejections, cost=cost,
        )


def _aged(v: InstanceView, age: float) -> InstanceView:
    """``v`` as seen ``age`` seconds after it was polled."""
    return InstanceView(
        id=v.id, region=v.region, gpu=v.gpu, running=v.running, waiting=v.waiting,
        running_tokens=v.running_tokens, queued_prefill_tokens=v.queued_prefill_tokens, kv_usage=v.kv_usage,
        healthy=v.healthy, full=v.full, age=age, in_flight=v.in_flight, prefill_s_per_token=v.prefill_s_per_token,
        model=v.model, max_num_seqs=v.max_num_seqs, decode_step_s=v.decode_step_s,
        deferred_waiting=v.deferred_waiting, deferred_prefill_tokens=v.deferred_prefill_tokens,
    )
