"""Preble-style prefix-cache-and-load routing (Srivatsa et al., "Preble: Efficient Distributed Prompt
Scheduling for LLM Serving", ICLR 2025; the baseline Lodestar compares against, as AIBrix ships it)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.policies._support import (
    available_views,
    check_positive,
    least_load,
    parse_params,
    prefill_s_per_token,
    uncached_tokens,
)


@dataclass(frozen=True, slots=True)
class PrebleParams:
    """Parameters of ``preble``.

    Attributes:
        exploit_threshold: route by cache when the best match covers more than this share of the
            prompt's tokens (Preble: cached part larger than the uncached part, i.e. 0.5).
        window_s: history window of the load cost model, seconds (Preble / AIBrix: 3 minutes).
        rebalance_ratio: redirect when the most loaded replica's window cost exceeds this times the
            least loaded's (Preble's ``Th_bal``, 1.5).
        t_p_s: prefill seconds per prompt token for every replica; ``None`` uses each replica's
            profile (``InstanceView.prefill_s_per_token``) and ``default_t_p_s`` where unknown.
        default_t_p_s: prefill seconds per token when neither is known (GORGO's fit for Mistral-7B on
            an A100 under SGLang: 0.0938 ms/token, MODELS.md §1).
        t_d_s: replica seconds per generated token in the window cost: 47 ms per step / 64 sequences
            = 0.73 ms, Llama-3.1-8B on an H100 under vLLM at concurrency 64 (MODELS.md §1), i.e. the
            replica time a decode token takes in a busy batch.
    """

    exploit_threshold: float = 0.5
    window_s: float = 180.0
    rebalance_ratio: float = 1.5
    t_p_s: float | None = None
    default_t_p_s: float = 0.0938e-3
    t_d_s: float = 0.73e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.exploit_threshold <= 1.0:
            raise ValueError(f"preble: exploit_threshold must be in [0, 1], got {self.exploit_threshold}")
        if not (math.isfinite(self.rebalance_ratio) and self.rebalance_ratio >= 1.0):
            raise ValueError(f"preble: rebalance_ratio must be finite and >= 1, got {self.rebalance_ratio}")
        check_positive("preble", window_s=self.window_s, default_t_p_s=self.default_t_p_s, t_d_s=self.t_d_s)
        if self.t_p_s is not None:
            check_positive("preble", t_p_s=self.t_p_s)


class PreblePolicy:
    """Exploit a long cached prefix, else explore by a windowed load cost, with load rebalancing.

    Let ``m(s)`` be the leading prompt blocks cached on available replica ``s`` (from
    ``snapshot.prefix``), ``B`` the block size, ``L_p`` the prompt length, ``t_p(s)`` the prefill
    seconds per token (see :class:`PrebleParams`) and ``t_d`` the decode seconds per token.

    Window cost (Preble's per-GPU load ``L_i``, seconds): the policy remembers every request it
    routed, as ``(time, replica, prefill_s + decode_s)`` with
    ``prefill_s = t_p(s) * max(L_p - m(s) * B, 0)`` (the uncached tokens it sent) and
    ``decode_s = t_d * max_output_tokens``, and forgets records older than ``window_s`` before
    ``snapshot.now``. ``W(s)`` is the sum of ``prefill_s + decode_s``
    over the remembered records of ``s``: the GPU time the router has recently asked of ``s``.

    Rule, over the available replicas (healthy, not full):

    1. exploit: if ``max_s m(s) * B / L_p > exploit_threshold``, the replicas holding that longest
       prefix are the candidates, and the least loaded of them wins (running + waiting now; ties:
       lower ``W``, lower RTT from the origin, snapshot order);
    2. explore: otherwise the argmin of ``W(s) + t_p(s) * (L_p - m(s) * B)``, the window load plus
       this request's own prefill there (ties: RTT, snapshot order). Preble's third term, the cost
       of evicting what this prompt displaces, is left out: the snapshot does not say what a
       replica would evict;
    3. rebalance: if the chosen replica is the most loaded one, ``W(chosen) = max_s W(s)``, and
       ``max_s W(s) > rebalance_ratio * min_s W(s)``, the request goes to the replica with the
       least ``W`` instead (ties: least load, lower RTT, snapshot order). This is Preble's
       post-assignment load adjustment: traffic that would add to the heaviest replica is shifted
       to the lightest until they are within the ratio, at the price of its cache hits there.

    State: the records (one per routed request, at most a window's worth) and per-replica sums.
    ``snapshot.now`` must not decrease between calls (records are pruned from the oldest end). A
    ``HOLD`` records nothing. The estimate: network = RTT(origin -> replica region), queue = ``W``
    of the chosen replica, prefill = its ``t_p * (L_p - m * B)``, total = their sum, seconds.
    """

    name = "preble"

    def __init__(self, params: PrebleParams) -> None:
        self.params = params
        self._records: deque[tuple[float, str, float]] = deque()
        self._window_cost: dict[str, float] = {}
        self._window_count: dict[str, int] = {}

    def window_cost_s(self, replica: str) -> float:
        """``W(replica)`` as of the last decision, seconds."""
        return self._window_cost.get(replica, 0.0)

    def note_routed(self, now: float, replica: str, cost_s: float) -> None:
        """Count in ``W(replica)`` a request that another policy routed to ``replica`` at ``now``.

        ``cost_s`` is its ``prefill_s + decode_s`` as defined in the class docstring, seconds. A
        policy that uses ``preble`` as its fallback (``lodestar``) calls this for the requests it
        routes itself, so the window costs stay those of the whole traffic. ``now`` must not
        decrease between calls, as for :meth:`choose`.
        """
        self._prune(now)
        self._record(now, replica, cost_s)

    def _prune(self, now: float) -> None:
        horizon = now - self.params.window_s
        recs = self._records
        cost = self._window_cost
        count = self._window_count
        while recs and recs[0][0] < horizon:
            _, rid, c = recs.popleft()
            count[rid] -= 1
            if count[rid]:
                cost[rid] -= c
            else:  # drop the entry: no rounding residue outlives a replica's last record
                del count[rid], cost[rid]

    def _record(self, now: float, replica: str, cost_s: float) -> None:
        self._records.append((now, replica, cost_s))
        self._window_cost[replica] = self._window_cost.get(replica, 0.0) + cost_s
        self._window_count[replica] = self._window_count.get(replica, 0) + 1

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        cands = available_views(snapshot)
        if not cands:
            return HOLD
        p = self.params
        self._prune(snapshot.now)
        wcost = self._window_cost
        bs = snapshot.block_size
        lp = request.prompt_tokens
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes else {}
        best_m = 0
        for v in cands:
            m = matched.get(v.id, 0)
            if m > best_m:
                best_m = m
        origin = request.origin
        rtt_s = snapshot.rtt_s
        chosen = cands[0]
        if best_m * bs / lp > p.exploit_threshold:
            key: tuple[int, float, float] | None = None
            for v in cands:
                if matched.get(v.id, 0) == best_m:
                    k = (v.running + v.waiting, wcost.get(v.id, 0.0), rtt_s(origin, v.region))
                    if key is None or k < key:
                        chosen, key = v, k
            how = f"exploit: {best_m} cached blocks"
        else:
            best_c = math.inf
            best_r = math.nan
            override = p.t_p_s
            fallback = p.default_t_p_s
            for v in cands:
                t_p = override if override is not None else v.prefill_s_per_token
                if t_p != t_p:  # nan: profile unknown
                    t_p = fallback
                uncached = lp - matched.get(v.id, 0) * bs
                c = wcost.get(v.id, 0.0) + (t_p * uncached if uncached > 0 else 0.0)
                if c < best_c:
                    chosen, best_c, best_r = v, c, math.nan
                elif c == best_c:
                    if best_r != best_r:
                        best_r = rtt_s(origin, chosen.region)
                    r = rtt_s(origin, v.region)
                    if r < best_r:
                        chosen, best_r = v, r
            how = "explore: least window load + prefill"
        if wcost:
            w_max = w_min = wcost.get(cands[0].id, 0.0)
            for v in cands:
                w = wcost.get(v.id, 0.0)
                if w > w_max:
                    w_max = w
                elif w < w_min:
                    w_min = w
            if wcost.get(chosen.id, 0.0) == w_max and w_max > p.rebalance_ratio * w_min:
                light, _ = least_load((v for v in cands if wcost.get(v.id, 0.0) == w_min), origin, rtt_s)
                assert light is not None
                how = f"rebalance: {chosen.id} is the most loaded ({w_max:.3f} s in window)"
                chosen = light
        t_p = prefill_s_per_token(chosen, p.t_p_s, p.default_t_p_s)
        prefill = t_p * uncached_tokens(lp, matched.get(chosen.id, 0), bs)
        queue = wcost.get(chosen.id, 0.0)
        network = rtt_s(origin, chosen.region)
        self._record(snapshot.now, chosen.id, prefill + p.t_d_s * request.max_output_tokens)
        return Decision(chosen.id, estimate=CostBreakdown(network, queue, prefill, network + queue + prefill),
                        reason=how)

    def observe(self, outcome: Outcome) -> None:
        return None


def make_preble(params: Mapping[str, Any], rng: np.random.Generator) -> PreblePolicy:
    return PreblePolicy(parse_params(PrebleParams, "preble", params))
