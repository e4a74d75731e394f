"""``slo``: meet each request's SLO at the lowest efficiency cost (QLM's estimator plus money).

For every available replica ``j`` (healthy, not full, serving the request's model when both are
known) the policy estimates, with :func:`isthmus.core.slo.estimate_completion`::

    C_q = W_q + P + D_q + L_j                     completion time, seconds
    E_q = C_q + alpha * usd_q                     efficiency cost, alpha in seconds per US dollar

(terms and units in :mod:`isthmus.core.slo`; prices from ``snapshot.prices``, i.e. the topology
file). The output length it plans for is the request's class's running mean plus
``output_quantile_z`` standard deviations, learned from outcomes (:meth:`SLOPolicy.observe`); the
time per output token is the replica profile's decode step times a per-replica correction, an
mean of observed over predicted TPOT: a plain mean of a replica's first ``1 / tpot_learning_rate``
outcomes, then exponentially weighted with weight ``tpot_learning_rate``.

Rule, with *room* meaning the replica's engine queue holds at most ``max_waiting`` requests (any
replica has room when ``max_waiting`` is ``None``):

1. among the replicas with room, those whose predicted TTFT, TPOT and E2E meet the request's SLO:
   choose the least ``E_q`` (ties: snapshot order);
2. some replica has room but none meets the SLO: the ``unattainable`` action --
   ``best_effort``: the least ``E_q`` with room anyway; ``deprioritize``: the same replica, with the
   request's priority raised by ``demote_by`` (lower runs first: its engine queue admits it after
   normal requests, and a deadline-ordered router queue serves it after them); ``reject``: refuse
   it now (``Decision.reject == REJECT_SLO``, the reason names the class and the best estimate);
3. no replica has room: hold (the shell's queue re-asks). If even an empty queue on every replica
   would miss the SLO, the request is already lost: ``reject`` refuses it now (early, instead of
   holding it until it is late), ``deprioritize`` holds it at the lowered priority, ``best_effort``
   holds it as it is.

A request without an SLO is placed by step 1 with no target to meet. The shell's router queue
order defaults to ``queue`` (``edf``, deadline first; a scenario's ``router.queue`` overrides it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isthmus.core.policy import REJECT_SLO, CostBreakdown, Decision, Outcome
from isthmus.core.request import SLO, Request
from isthmus.core.slo import (
    DEFAULT_DECODE_STEP_S,
    DEFAULT_PREFILL_S_PER_TOKEN,
    QUEUE_ORDERS,
    CompletionEstimate,
    EstimatorConfig,
    OutputLengthHistory,
    QueueOrder,
    estimate_completion,
)
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.policies._support import check_non_negative, check_positive, parse_params

ACTIONS: tuple[str, ...] = ("best_effort", "deprioritize", "reject")
"""What ``slo`` does with a request no replica can serve within its SLO."""

_PENDING_MAX = 1 << 16  # decisions remembered until their outcome (bounds memory if outcomes are lost)


@dataclass(frozen=True, slots=True)
class SLOParams:
    """Parameters of ``slo``.

    Attributes:
        alpha: weight of money against time in ``E_q``, seconds per US dollar (0: fastest that
            meets the SLO).
        unattainable: ``best_effort``, ``deprioritize`` or ``reject`` (module docstring).
        cross_region_penalty_s: added to ``L_j`` when the replica is outside the request's origin
            region, seconds.
        max_waiting: a replica has room while its engine queue holds at most this many requests;
            ``None``: always (the policy never holds while a replica is available).
        prior_output_tokens: output length planned for before ``min_samples`` outcomes, tokens.
        output_quantile_z: plan for ``mean + z * std`` output tokens of the class.
        min_samples: outcomes of a class before its own mean is used (else all classes').
        history_window: the output-length mean forgets with weight ``1 / history_window``.
        tpot_learning_rate: weight of each outcome in the per-replica TPOT correction once the
            replica has had ``1 / tpot_learning_rate`` outcomes (before: their plain mean; 0: off).
        default_t_p_s: prefill seconds per token where a replica's profile is unknown.
        default_decode_step_s: decode step where a replica's profile is unknown, seconds.
        kv_full: KV use from which a replica counts as saturated in ``W_q``.
        demote_by: priority added by ``deprioritize`` (10: behind the classes of a usual catalog,
            whose priorities are small).
        queue: the router queue order this policy asks its shell for: ``edf`` or ``fifo``.
    """

    alpha: float = 0.0
    unattainable: str = "best_effort"
    cross_region_penalty_s: float = 0.0
    max_waiting: int | None = None
    prior_output_tokens: float = 256.0
    output_quantile_z: float = 0.0
    min_samples: int = 20
    history_window: int = 2000
    tpot_learning_rate: float = 0.05
    default_t_p_s: float = DEFAULT_PREFILL_S_PER_TOKEN
    default_decode_step_s: float = DEFAULT_DECODE_STEP_S
    kv_full: float = 0.95
    demote_by: int = 10
    queue: str = "edf"

    def __post_init__(self) -> None:
        if self.unattainable not in ACTIONS:
            raise ValueError(f"slo: unattainable must be one of {list(ACTIONS)}, got {self.unattainable!r}")
        if self.queue not in QUEUE_ORDERS:
            raise ValueError(f"slo: queue must be one of {list(QUEUE_ORDERS)}, got {self.queue!r}")
        check_non_negative("slo", alpha=self.alpha, cross_region_penalty_s=self.cross_region_penalty_s,
                           output_quantile_z=self.output_quantile_z, tpot_learning_rate=self.tpot_learning_rate)
        check_positive("slo", default_t_p_s=self.default_t_p_s, default_decode_step_s=self.default_decode_step_s)
        if not (math.isfinite(self.prior_output_tokens) and self.prior_output_tokens >= 1):
            raise ValueError(f"slo: prior_output_tokens must be >= 1, got {self.prior_output_tokens}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"slo: max_waiting must be >= 0, got {self.max_waiting}")
        if self.min_samples < 1 or self.history_window < 1:
            raise ValueError("slo: min_samples and history_window must be >= 1")
        if self.tpot_learning_rate > 1:
            raise ValueError(f"slo: tpot_learning_rate must be <= 1, got {self.tpot_learning_rate}")
        if not 0.0 < self.kv_full <= 1.0:
            raise ValueError(f"slo: kv_full must be in (0, 1], got {self.kv_full}")
        if self.demote_by < 1:
            raise ValueError(f"slo: demote_by must be >= 1, got {self.demote_by}")


def _breakdown(e: CompletionEstimate, predicts: bool = True) -> CostBreakdown:
    """``e`` as a decision's estimate; ``predicts=False`` leaves out the client TTFT / E2E (the
    estimate assumed a priority the request will not run at)."""
    nan = math.nan
    return CostBreakdown(network_s=e.network_s, queue_s=e.queue_s, prefill_s=e.prefill_s,
                         total_s=e.network_s + e.queue_s + e.prefill_s, decode_s=e.decode_s,
                         ttft_s=e.ttft_s if predicts else nan, e2e_s=e.e2e_s if predicts else nan, usd=e.usd,
                         tpot_s=e.tpot_s if predicts else nan)


class SLOPolicy:
    """SLO- and cost-aware placement with an action for the unattainable (module docstring)."""

    name = "slo"
    uses_prefix = True
    uses_decode_step = True

    def __init__(self, params: SLOParams) -> None:
        self.params = params
        self._estimator = EstimatorConfig(default_prefill_s_per_token=params.default_t_p_s,
                                          default_decode_step_s=params.default_decode_step_s,
                                          cross_region_penalty_s=params.cross_region_penalty_s,
                                          kv_full=params.kv_full)
        self.lengths = OutputLengthHistory(params.prior_output_tokens, params.min_samples, params.history_window)
        self._tpot_scale: dict[str, float] = {}
        self._tpot_seen: dict[str, int] = {}
        self._pending: dict[str, tuple[str, float]] = {}

    @property
    def queue_order(self) -> QueueOrder:
        """The router queue order this policy asks its shell for."""
        return "fifo" if self.params.queue == "fifo" else "edf"

    def tpot_scale(self, replica: str) -> float:
        """The learned correction of ``replica``'s profile TPOT (1 before any outcome)."""
        return self._tpot_scale.get(replica, 1.0)

    def estimates(self, request: Request, snapshot: ClusterSnapshot) -> list[CompletionEstimate]:
        """The estimate for every candidate replica, in snapshot order (for inspection and logs)."""
        cands, matched, out, mean_all = self._inputs(request, snapshot)
        return [self._estimate(request, snapshot, v, matched, out, mean_all) for v in cands]

    def _inputs(self, request: Request, snapshot: ClusterSnapshot) -> tuple[list[Any], Mapping[str, int], float, float]:
        model = request.model
        cands = [v for v in snapshot.instances.values()
                 if v.healthy and not v.full and (model is None or v.model is None or v.model == model)]
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes and cands else {}
        slo = request.slo
        mean, std = self.lengths.predict(slo.name if slo is not None else None)
        out = mean + self.params.output_quantile_z * std
        return cands, matched, out if out > 1.0 else 1.0, self.lengths.overall()[0]

    def _estimate(self, request: Request, snapshot: ClusterSnapshot, v: Any, matched: Mapping[str, int],
                  out: float, mean_all: float) -> CompletionEstimate:
        return estimate_completion(
            request, v, now=snapshot.now, here=snapshot.here, rtt_s=snapshot.rtt_s,
            cached_tokens=matched.get(v.id, 0) * snapshot.block_size, output_tokens=out,
            mean_output_tokens=mean_all, prices=snapshot.prices, config=self._estimator,
            tpot_scale=self._tpot_scale.get(v.id, 1.0),
            priority=request.slo.priority if request.slo is not None else 0)

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        p = self.params
        slo = request.slo
        base = slo.priority if slo is not None else 0
        cands, matched, out, mean_all = self._inputs(request, snapshot)
        if not cands:
            return Decision(None, reason="no replica available", priority=base)
        alpha = p.alpha
        cap = p.max_waiting
        best: CompletionEstimate | None = None
        best_cost = math.inf
        fallback: CompletionEstimate | None = None
        fallback_cost = math.inf
        full: list[CompletionEstimate] = []
        for v in cands:
            e = self._estimate(request, snapshot, v, matched, out, mean_all)
            if cap is not None and v.waiting > cap:
                full.append(e)
                continue
            cost = e.completion_s + alpha * e.usd
            if cost < fallback_cost:
                fallback, fallback_cost = e, cost
            if cost < best_cost and (slo is None or e.misses(slo) is None):
                best, best_cost = e, cost
        if best is not None:
            return self._send(request, best, base, "meets SLO" if slo is not None else "no SLO", best_cost)
        assert slo is not None or fallback is None  # without an SLO every candidate with room qualifies
        action = p.unattainable
        if fallback is not None:
            assert slo is not None
            if action == "reject":
                return self._reject(slo, fallback)
            if action == "deprioritize":
                return self._send(request, fallback, base + p.demote_by, "SLO unattainable, deprioritized",
                                  fallback_cost, predicts=False)
            return self._send(request, fallback, base, "SLO unattainable, best effort", fallback_cost)
        # no replica has room: hold, unless the request is lost even on an empty queue
        if slo is not None:
            lost = all(dataclasses.replace(e, queue_s=0.0).misses(slo) is not None for e in full)
            if lost:
                quickest = min(full, key=lambda e: e.completion_s - e.queue_s)
                if action == "reject":
                    return self._reject(slo, dataclasses.replace(quickest, queue_s=0.0))
                if action == "deprioritize":
                    return Decision(None, reason="no replica with room; SLO unattainable: held, deprioritized",
                                    priority=base + p.demote_by)
        return Decision(None, reason=f"no replica with at most {cap} waiting: held", priority=base)

    def _send(self, request: Request, e: CompletionEstimate, priority: int, why: str, cost: float,
              predicts: bool = True) -> Decision:
        pending = self._pending
        if len(pending) >= _PENDING_MAX:
            del pending[next(iter(pending))]
        scale = self._tpot_scale.get(e.replica, 1.0)
        pending[request.id] = (e.replica, e.tpot_s / scale)
        return Decision(e.replica, estimate=_breakdown(e, predicts), priority=priority,
                        reason=f"{why}: E {cost:.3f} s (C {e.completion_s:.3f} s, ${e.usd:.2e})")

    def _reject(self, slo: SLO, e: CompletionEstimate) -> Decision:
        return Decision(None, reject=REJECT_SLO, estimate=_breakdown(e),
                        reason=f"SLO class {slo.name!r} cannot be met on any replica "
                               f"(best estimate, on {e.replica}: {e.misses(slo)})")

    def observe(self, outcome: Outcome) -> None:
        req = outcome.request
        tokens = outcome.generated_tokens
        pend = self._pending.pop(req.id, None)
        if not outcome.ok:
            return
        self.lengths.observe(req.slo.name if req.slo is not None else None, tokens)
        lr = self.params.tpot_learning_rate
        if pend is None or lr <= 0.0 or tokens < 2:
            return
        replica, step = pend
        observed = (outcome.e2e_s - outcome.ttft_s) / (tokens - 1)
        if not (observed > 0.0 and step > 0.0 and math.isfinite(observed)):
            return
        ratio = min(max(observed / step, 0.1), 50.0)
        n = self._tpot_seen.get(replica, 0) + 1
        self._tpot_seen[replica] = n
        w = 1.0 / n if 1.0 / n > lr else lr  # a plain mean of the first 1 / lr outcomes, then an EWMA
        old = self._tpot_scale.get(replica, 1.0)
        self._tpot_scale[replica] = old + w * (ratio - old)


def make_slo(params: Mapping[str, Any], rng: np.random.Generator) -> SLOPolicy:
    return SLOPolicy(parse_params(SLOParams, "slo", params))
