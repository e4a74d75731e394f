"""GORGO: network-, queue- and prefix-aware routing across regions, as a central proxy and distributed.

Both variants price a replica ``s`` for a request of ``L_p`` prompt tokens whose first ``L_hit(s)``
blocks of ``B`` tokens are cached on ``s`` (GORGO, MODELS.md §3)::

    queue(s)   = t_p(s) * (q_hat * running_tokens(s) + queued_prefill_tokens(s))
    prefill(s) = t_p(s) * max(L_p - L_hit(s) * B, 0)

with ``t_p(s)`` the prefill seconds per token of ``s`` (its profile's
``InstanceView.prefill_s_per_token``; the ``t_p_s`` parameter overrides it for every replica and
``default_t_p_s`` stands in where the profile is unknown) and ``q_hat`` the weight of tokens already
running (0.5 in the paper's first version, 1 later). All costs are seconds.

Default ``q_hat = 0``, derived from the engine model rather than taken from the paper. Under
chunked prefill (vLLM v1's default) a new prompt shares each step with the running requests, which
are decoding: they delay it only by their decode work in the ``ceil(L_p / budget)`` steps its
prefill spans. In the roofline model that is ``k_d * ctx`` per running request and step against
``t_p`` per prompt token, so the equivalent weight is ``q_hat ~ ceil(L_p / budget) * k_d / t_p``:
about 0.003 for an 8k-token prompt on Mistral-7B / A100-80GB (``k_d`` ~ 0.1 µs per context token,
``t_p`` ~ 0.14 ms per token at that length). The paper's 0.5 / 1 fit an engine that runs prefills on their own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isthmus.core.policy import CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot, InstanceView
from isthmus.policies._support import (
    check_non_negative,
    check_positive,
    parse_params,
    prefill_s_per_token,
    uncached_tokens,
)

# GORGO's fit for Mistral-7B on an A100 under SGLang: TTFT ~ 150.72 ms + 0.0938 ms x prompt tokens.
_GORGO_T_P_S = 0.0938e-3
# forwards remembered per peer replica (a bound on memory and on the work of one decision)
_SENT_LOG = 256


def _check_t_p(policy: str, t_p_s: float | None, default_t_p_s: float, q_hat: float) -> None:
    check_positive(policy, default_t_p_s=default_t_p_s)
    check_non_negative(policy, q_hat=q_hat)
    if t_p_s is not None:
        check_positive(policy, t_p_s=t_p_s)


# ------------------------------------------------------------------------------------------ gorgo_proxy
@dataclass(frozen=True, slots=True)
class GorgoProxyParams:
    """Parameters of ``gorgo_proxy``.

    Attributes:
        q_hat: weight of running prompt tokens in the queue term (0: module docstring; the paper's
            first version 0.5, later 1).
        t_p_s: prefill seconds per token for every replica; ``None`` uses each replica's profile.
        default_t_p_s: prefill seconds per token where the profile is unknown (GORGO's fit,
            0.0938 ms/token for Mistral-7B on an A100).
        max_in_flight: a replica with this many requests in flight (as the router counts them) takes
            no more and the proxy queues instead; ``None`` (the default) caps nothing. The paper's
            proxy used 10, sized for short chat prompts and answers on SGLang; with long outputs a
            count cap idles the GPU (10 decoding requests use a fraction of a step's budget), which
            ``docs/results.md`` measures.
    """

    q_hat: float = 0.0
    t_p_s: float | None = None
    default_t_p_s: float = _GORGO_T_P_S
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        _check_t_p("gorgo_proxy", self.t_p_s, self.default_t_p_s, self.q_hat)
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"gorgo_proxy: max_in_flight must be >= 1, got {self.max_in_flight}")


class GorgoProxyPolicy:
    """GORGO-proxy: one central decision point, argmin of queue + prefill + network over the replicas.

    For each available replica ``s`` (healthy, not full) with ``in_flight(s) < max_in_flight``::

        cost(s) = queue(s) + prefill(s) + RTT(origin -> region(s))

    (module docstring for ``queue`` and ``prefill``; RTT from ``snapshot.rtt_s``), choose the argmin;
    exact ties go to snapshot order. If no replica is left, ``HOLD``: the proxy queues the request
    and asks again. ``L_hit`` comes from ``snapshot.prefix`` (in the paper, a mirror of what the proxy
    sent where). The estimate is the winning cost's terms: network = RTT, queue, prefill, total.
    """

    name = "gorgo_proxy"

    def __init__(self, params: GorgoProxyParams) -> None:
        self.params = params

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        p = self.params
        cap = p.max_in_flight if p.max_in_flight is not None else 1 << 62
        cands = [v for v in snapshot.instances.values() if v.healthy and not v.full and v.in_flight < cap]
        if not cands:
            return Decision(None, reason=f"every available replica has {cap} in flight: proxy queues")
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes else {}
        bs = snapshot.block_size
        lp = request.prompt_tokens
        q_hat = p.q_hat
        override = p.t_p_s
        fallback = p.default_t_p_s
        origin = request.origin
        rtt_s = snapshot.rtt_s
        rtts: dict[str, float] = {}
        best = cands[0]
        best_cost = math.inf
        best_terms = (math.nan, math.nan, math.nan)
        for v in cands:
            t_p = prefill_s_per_token(v, override, fallback)
            net = rtts.get(v.region)
            if net is None:
                net = rtts[v.region] = rtt_s(origin, v.region)
            queue = t_p * (q_hat * v.running_tokens + v.queued_prefill_tokens)
            prefill = t_p * uncached_tokens(lp, matched.get(v.id, 0), bs)
            cost = queue + prefill + net
            if cost < best_cost:
                best, best_cost, best_terms = v, cost, (net, queue, prefill)
        net, queue, prefill = best_terms
        return Decision(best.id, estimate=CostBreakdown(net, queue, prefill, best_cost),
                        reason=f"least GORGO cost {best_cost * 1e3:.1f} ms")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_gorgo_proxy(params: Mapping[str, Any], rng: np.random.Generator) -> GorgoProxyPolicy:
    return GorgoProxyPolicy(parse_params(GorgoProxyParams, "gorgo_proxy", params))


# ------------------------------------------------------------------------------------------ gorgo
@dataclass(frozen=True, slots=True)
class GorgoParams:
    """Parameters of ``gorgo`` (distributed; defaults from the GORGO paper).

    Attributes:
        q_hat, t_p_s, default_t_p_s: as for ``gorgo_proxy``.
        local_running_cap: a replica has room while it runs fewer requests than this; ``None`` (the
            default) caps nothing. The paper used 5, sized for short chat requests on SGLang.
        local_max_waiting: ... and while no more than this many requests wait in its engine queue
            (0: the engine would start the request at once). This is the default notion of room:
            it holds for any GPU and any output length, where a running-count cap does not.
        local_kv_cap: ... and while its KV use is below this share (0.95).
        recheck_s: how often the shell asks again about a held request, seconds (20 ms). The policy
            does not use it: the simulator and the router read ``policy.recheck_s``.
        sync_period_s: how often the shell refreshes its view of the peers' replicas, seconds (about
            once a second in the paper). Read by the shell as ``policy.sync_period_s``.
        peer_queue: price a peer's queue too: ``t_p * (q_hat * running + queued)`` from its last
            polled view plus the prompt tokens this balancer forwarded to it since that poll.
            The paper's ``C_s`` has no queue term (``False``); without one, every balancer that
            sees the same idle peer in a one-second-old view forwards to it at once.
    """

    q_hat: float = 0.0
    t_p_s: float | None = None
    default_t_p_s: float = _GORGO_T_P_S
    local_running_cap: int | None = None
    local_max_waiting: int | None = 0
    local_kv_cap: float = 0.95
    recheck_s: float = 0.02
    sync_period_s: float = 1.0
    peer_queue: bool = True

    def __post_init__(self) -> None:
        _check_t_p("gorgo", self.t_p_s, self.default_t_p_s, self.q_hat)
        if self.local_running_cap is not None and self.local_running_cap < 1:
            raise ValueError(f"gorgo: local_running_cap must be >= 1, got {self.local_running_cap}")
        if self.local_max_waiting is not None and self.local_max_waiting < 0:
            raise ValueError(f"gorgo: local_max_waiting must be >= 0, got {self.local_max_waiting}")
        if not 0.0 < self.local_kv_cap <= 1.0:
            raise ValueError(f"gorgo: local_kv_cap must be in (0, 1], got {self.local_kv_cap}")
        check_positive("gorgo", recheck_s=self.recheck_s, sync_period_s=self.sync_period_s)


class GorgoPolicy:
    """Distributed GORGO: one balancer per region, serving locally first, forwarding at most once.

    The deciding router sits in ``snapshot.here``; local replicas are those with ``region == here``
    (fresh views), the others belong to peer regions (views as stale as the last sync, ``age > 0``).
    A replica *has room* when it is available (healthy, not full), runs fewer than
    ``local_running_cap`` requests (no cap by default), has at most ``local_max_waiting`` requests
    waiting in its engine (0 by default) and uses less than ``local_kv_cap`` of its KV blocks. Rule:

    1. some local replica has room: serve on the one with the least ``queue + prefill`` (ties:
       snapshot order);
    2. the request was already forwarded (``snapshot.hops >= 1``): never forward again; ``HOLD``;
    3. otherwise compare ``C_local = min over available local s of queue(s) + prefill(s)``
       (``inf`` when none is available) with, for each peer region ``r`` holding a replica with
       room, ``C_r = min over those s of RTT(here, r) + prefill(s)``; ``L_hit`` of a peer's replica
       is what ``snapshot.prefix`` reports, which in the paper covers only what this balancer
       forwarded there. Forward to the cheapest peer region (ties: first in snapshot order) if
       ``C_r < C_local``;
    4. else ``HOLD``: the request queues at this balancer and the shell asks again every
       ``recheck_s`` seconds.

    With ``peer_queue`` (the default) ``C_r`` also carries the peer replica's queue term from its
    polled view plus the prompt tokens this balancer forwarded to it since that poll, and any
    available peer counts. With ``peer_queue=False`` (the paper's rule) peers count only when a
    replica there has room by the stale view, priced as if it would start the request at once.

    Starvation: a held request ends its wait when a local replica has room again (its running
    requests finish, and the balancer stops feeding it while it holds) or, if it was not forwarded,
    when a peer becomes cheaper. Under sustained overload of every region, requests wait at their
    balancers for room, as in the paper. No request waits forever as long as the local replicas
    make progress and the shell re-asks held requests oldest first: each time a replica's running
    count drops below the cap, the oldest held request takes the slot. A region with no replica of
    its own would hold a forwarded request forever; the policy forwards only to regions in which it
    sees a replica with room.

    Estimates, seconds: serving locally, network = RTT(here -> replica region), queue, prefill and
    their sum; forwarding, network = RTT(here -> peer region), queue 0, prefill on the peer's best
    replica and total ``C_r``.
    """

    name = "gorgo"

    def __init__(self, params: GorgoParams) -> None:
        self.params = params
        # (time, peer replica id, prompt tokens) of recent forwards: work a stale view cannot show
        self._sent: dict[str, deque[tuple[float, int]]] = {}

    @property
    def recheck_s(self) -> float:
        """Seconds between two asks about a held request (the shell's retry period)."""
        return self.params.recheck_s

    @property
    def sync_period_s(self) -> float:
        """Seconds between two refreshes of the peers' state in the shell."""
        return self.params.sync_period_s

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        p = self.params
        here = snapshot.here
        run_cap = p.local_running_cap if p.local_running_cap is not None else 1 << 62
        wait_cap = p.local_max_waiting if p.local_max_waiting is not None else 1 << 62
        kv_cap = p.local_kv_cap
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes else {}
        bs = snapshot.block_size
        lp = request.prompt_tokens
        q_hat = p.q_hat
        override = p.t_p_s
        fallback = p.default_t_p_s
        # pass over local replicas: best with room, best available
        room_best: InstanceView | None = None
        room_cost = math.inf
        room_terms = (0.0, 0.0)
        local_cost = math.inf
        any_peer = False
        for v in snapshot.instances.values():
            if v.region != here:
                any_peer = True
                continue
            if not v.healthy or v.full:
                continue
            t_p = prefill_s_per_token(v, override, fallback)
            queue = t_p * (q_hat * v.running_tokens + v.queued_prefill_tokens)
            prefill = t_p * uncached_tokens(lp, matched.get(v.id, 0), bs)
            cost = queue + prefill
            if cost < local_cost:
                local_cost = cost
            if v.running < run_cap and v.waiting <= wait_cap and v.kv_usage < kv_cap and cost < room_cost:
                room_best, room_cost, room_terms = v, cost, (queue, prefill)
        if room_best is not None:
            net = snapshot.rtt_s(here, room_best.region)
            queue, prefill = room_terms
            return Decision(room_best.id, estimate=CostBreakdown(net, queue, prefill, net + queue + prefill),
                            reason="local replica has room")
        if snapshot.hops >= 1:
            return Decision(None, reason="forwarded here: waiting for local room")
        if not any_peer:
            return Decision(None, reason="no local room, no peer: queued locally")
        # peers: cheapest region by RTT(here, r) + queue (stale view + what this balancer sent there
        # since) + prefill on its best replica
        now = snapshot.now
        sent = self._sent
        horizon = now - 2.0 * self.params.sync_period_s
        peer_best: str | None = None
        peer_best_id = ""
        peer_cost = math.inf
        peer_terms = (0.0, 0.0, 0.0)
        rtts: dict[str, float] = {}
        for v in snapshot.instances.values():
            region = v.region
            if region == here or not v.healthy or v.full or v.kv_usage >= kv_cap:
                continue
            if not p.peer_queue and (v.running >= run_cap or v.waiting > wait_cap):
                continue  # the paper's rule: only peers with room, priced as if idle
            hop = rtts.get(region)
            if hop is None:
                hop = rtts[region] = snapshot.rtt_s(here, region)
            t_p = prefill_s_per_token(v, override, fallback)
            since = now - v.age
            unseen = 0
            log = sent.get(v.id)
            if log:
                while log and log[0][0] < horizon:
                    log.popleft()
                for t, tokens in reversed(log):  # newest first; stop at what the view already shows
                    if t < since:
                        break
                    unseen += tokens
            queue = t_p * (q_hat * v.running_tokens + v.queued_prefill_tokens + unseen) if p.peer_queue else 0.0
            prefill = t_p * uncached_tokens(lp, matched.get(v.id, 0), bs)
            cost = hop + queue + prefill
            if cost < peer_cost:
                peer_best, peer_best_id, peer_cost, peer_terms = region, v.id, cost, (hop, queue, prefill)
        if peer_best is not None and peer_cost < local_cost:
            net, queue, prefill = peer_terms
            log = sent.get(peer_best_id)
            if log is None:
                log = sent[peer_best_id] = deque(maxlen=_SENT_LOG)
            log.append((now, lp))
            local = "none available" if local_cost == math.inf else f"{local_cost * 1e3:.1f} ms"
            return Decision(peer_best, forward=True, estimate=CostBreakdown(net, queue, prefill, peer_cost),
                            reason=f"forward: peer {peer_cost * 1e3:.1f} ms < local {local}")
        return Decision(None, reason="no local room, no cheaper peer: queued locally")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_gorgo(params: Mapping[str, Any], rng: np.random.Generator) -> GorgoPolicy:
    return GorgoPolicy(parse_params(GorgoParams, "gorgo", params))
