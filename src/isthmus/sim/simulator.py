"""The multi-region simulator: one decision point, replicas across regions, network delay between them.

Life of a request (all times virtual, seconds):

1. the client in region ``origin`` sends it at ``arrival``; it reaches the router after
   ``one_way(origin, router_region)`` (zero when the decision point has no location, i.e. the
   client itself picks the replica);
2. the router builds a :class:`~isthmus.core.snapshot.ClusterSnapshot` of that instant and calls
   ``policy.choose``; a ``None`` target holds the request at the router and asks again every
   ``hold_retry_s``;
3. the request reaches the replica after ``one_way(router_region, replica_region)`` and queues in
   its engine (:class:`~isthmus.engine.Replica`), which steps continuously while it has work;
4. the first token and the last token travel back the same path: TTFT and E2E are measured at the
   client.

What a snapshot shows of a replica is its engine state as of the end of the step in progress (the
engine applies a step when it starts it), plus the requests the router sent that are still on the
wire (counted as waiting, as a router counting its in-flight requests would). Decode-only steps
between two decision instants are fused (see :meth:`Replica.step`), which changes no result.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import PerfModel, builtin_perf_model
from isthmus.core.policy import Decision, Outcome, Policy
from isthmus.core.request import Request
from isthmus.core.snapshot import CallbackPrefixView, ClusterSnapshot, InstanceView
from isthmus.core.topology import Topology
from isthmus.engine.replica import FinishedRequest, Replica
from isthmus.sim.events import ARRIVAL, DELIVER, RETRY, SEND, STEP_END, EventLoop
from isthmus.sim.metrics import RequestLog, SimResult


class _Flight:
    """Router-side record of one request between decision and completion."""

    __slots__ = ("decided_at", "held_s", "reached_router", "replica", "req")

    def __init__(self, req: Request, reached_router: float) -> None:
        self.req = req
        self.reached_router = reached_router
        self.decided_at = math.nan
        self.held_s = 0.0
        self.replica = -1


class Simulation:
    """One run of one policy over one request stream.

    Args:
        topology: regions and RTTs.
        instances: replicas; their regions must be in the topology.
        policy: the routing policy (the same object type the live router runs).
        requests: the request stream, arrivals non-decreasing; consumed lazily.
        router_region: where the decision point sits (a central proxy); ``None`` places no
            router on the path (the client picks the replica directly).
        perf_models: step-time model per instance id; default the built-in roofline model of
            each instance's (GPU, model).
        progress: called with the number of completed requests every ``progress_every``.
        hold_retry_s: how often held requests are reconsidered.
    """

    def __init__(
        self,
        topology: Topology,
        instances: Sequence[InstanceSpec],
        policy: Policy,
        requests: Iterable[Request],
        *,
        router_region: str | None = None,
        perf_models: Mapping[str, PerfModel] | None = None,
        progress: Callable[[int], None] | None = None,
        progress_every: int = 200,
        hold_retry_s: float = 0.01,
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
        self.topology = topology
        self.specs = tuple(instances)
        self.policy = policy
        self._requests = requests
        self.router_region = router_region
        self._perf_models = dict(perf_models or {})
        self._progress = progress
        self._progress_every = max(1, progress_every)
        self.hold_retry_s = hold_retry_s

    def _build_replicas(self) -> list[Replica]:
        out = []
        for s in self.specs:
            perf = self._perf_models.get(s.id)
            if perf is None:
                roof = builtin_perf_model(s.gpu, s.model)
                blocks = s.num_kv_blocks or roof.num_kv_blocks(s.block_size, s.gpu_memory_utilization)
                perf = roof
            else:
                if s.num_kv_blocks is None:
                    blocks = builtin_perf_model(s.gpu, s.model).num_kv_blocks(s.block_size, s.gpu_memory_utilization)
                else:
                    blocks = s.num_kv_blocks
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
        rep_region = [s.region for s in self.specs]
        rep_region_idx = [region_idx[r] for r in rep_region]
        router = self.router_region
        one_way = topo.one_way

        def to_router(origin: str) -> float:
            return 0.0 if router is None else one_way(origin, router)

        def router_to(rep: int, origin: str) -> float:
            return one_way(router if router is not None else origin, rep_region[rep])

        loop = EventLoop()
        log = RequestLog()
        flights: dict[str, _Flight] = {}
        in_transit = [0] * n_rep
        in_flight = [0] * n_rep
        pending_delivery: list[list[float]] = [[] for _ in range(n_rep)]
        busy = [False] * n_rep
        held: list[_Flight] = []
        retry_scheduled = False
        next_send = math.inf  # client send time of the next request in the stream
        at_router: list[float] = []  # times of requests on their way to the router
        arrived = 0
        rejected = 0
        stream: Iterator[Request] = iter(self._requests)
        prefix = CallbackPrefixView({r.id: r.cached_prefix_blocks for r in replicas})
        rtt = topo.rtt
        here = router if router is not None else ""
        policy = self.policy
        progress = self._progress
        every = self._progress_every
        last_arrival = -math.inf

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

        def horizon(rep: int) -> float:
            # the next instant anyone may look at this replica or hand it a request
            h = next_send
            if at_router and at_router[0] < h:
                h = at_router[0]
            if retry_scheduled:
                h = min(h, loop.now + self.hold_retry_s)
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
            end = now + res.duration
            loop.schedule(end, STEP_END, STEP_END, (rep, res.finished))

        def snapshot(now: float, origin: str) -> ClusterSnapshot:
            views: dict[str, InstanceView] = {}
            for i, r in enumerate(replicas):
                views[r.id] = r.view(extra_waiting=in_transit[i], in_flight=in_flight[i])
            return ClusterSnapshot(now=now, here=here or origin, instances=views, rtt_s=rtt, prefix=prefix)

        id_to_idx = {r.id: i for i, r in enumerate(replicas)}

        def decide(f: _Flight, now: float) -> bool:
            req = f.req
            d: Decision = policy.choose(req, snapshot(now, req.origin))
            if d.target is None:
                return False
            rep = id_to_idx.get(d.target)
            if rep is None:
                raise ValueError(f"policy {policy.name} chose unknown replica {d.target!r}")
            f.decided_at = now
            f.held_s = now - f.reached_router
            f.replica = rep
            in_transit[rep] += 1
            in_flight[rep] += 1
            t = now + router_to(rep, req.origin)
            heapq.heappush(pending_delivery[rep], t)
            loop.schedule(t, DELIVER, DELIVER, (rep, req.id))
            return True

        def arrive(req: Request, now: float) -> None:
            nonlocal retry_scheduled
            if req.id in flights:
                raise ValueError(f"duplicate request id {req.id!r}")
            f = _Flight(req, now)
            flights[req.id] = f
            if held or not decide(f, now):
                held.append(f)
                if not retry_scheduled:
                    retry_scheduled = True
                    loop.schedule(now + self.hold_retry_s, RETRY, RETRY)

        def complete(rep: int, fin: FinishedRequest) -> None:
            req = fin.request
            f = flights.pop(req.id)
            in_flight[rep] -= 1
            back = router_to(rep, req.origin) + to_router(req.origin)
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
            log.origin.append(region_idx[req.origin])
            log.served.append(rep_region_idx[rep])
            log.prompt.append(req.prompt_tokens)
            log.cached.append(fin.cached_tokens)
            log.output.append(out)
            log.preemptions.append(fin.preemptions)
            policy.observe(Outcome(req, replicas[rep].id, f.decided_at, ttft, e2e, fin.cached_tokens))
            if progress is not None and len(log) % every == 0:
                progress(len(log))

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
                try:
                    replicas[rep].add_request(flights[rid].req, now)
                except ValueError:  # can never fit this replica's KV cache: refused, as vLLM would
                    flights.pop(rid)
                    in_flight[rep] -= 1
                    rejected += 1
                    continue
                if not busy[rep]:
                    start_step(rep, now)
            elif kind == SEND:
                req = payload
                arrived += 1
                push_next_send()
                delay = to_router(req.origin)
                if delay > 0.0:
                    heapq.heappush(at_router, now + delay)
                    loop.schedule(now + delay, ARRIVAL, ARRIVAL, req)
                else:
                    arrive(req, now)
            elif kind == ARRIVAL:
                heapq.heappop(at_router)
                arrive(payload, now)
            elif kind == RETRY:
                retry_scheduled = False
                still: list[_Flight] = []
                for f in held:
                    if still or not decide(f, now):
                        still.append(f)
                held = still
                if held:
                    retry_scheduled = True
                    loop.schedule(now + self.hold_retry_s, RETRY, RETRY)
        if flights:
            raise RuntimeError(f"{len(flights)} requests never completed (first: {next(iter(flights))})")
        if progress is not None:
            progress(len(log))
        span = (max(log.finish) - min(log.arrival)) if len(log) else 0.0
        preempt = sum(r.preemptions for r in replicas)
        return SimResult.from_log(
            log, policy=policy.name, regions=regions, requests=arrived, events=loop.processed,
            wall_s=time.perf_counter() - wall0, sim_span_s=span, preemptions=preempt,
            counters={"engine_steps": float(sum(r.steps for r in replicas))}, rejected=rejected,
        )
