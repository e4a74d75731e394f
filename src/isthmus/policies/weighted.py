"""Weighted scorers, the llm-d inference scheduler's way: filter -> scorers in [0, 1] -> weighted argmax."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.policies._support import available_views, check_non_negative, parse_params


@dataclass(frozen=True, slots=True)
class ScorerWeights:
    """Weight of each scorer (llm-d's default scheduling profile: prefix 3, queue 2, KV 2)."""

    prefix: float = 3.0
    queue: float = 2.0
    kv: float = 2.0

    def __post_init__(self) -> None:
        check_non_negative("weighted.weights", prefix=self.prefix, queue=self.queue, kv=self.kv)
        if self.prefix + self.queue + self.kv <= 0:
            raise ValueError("weighted.weights: at least one weight must be > 0")


@dataclass(frozen=True, slots=True)
class WeightedParams:
    """Parameters of ``weighted``.

    Attributes:
        weights: ``{prefix, queue, kv}``; a partial mapping keeps the other defaults.
    """

    weights: ScorerWeights = field(default_factory=ScorerWeights)


class WeightedPolicy:
    """Weighted sum of three scorers, argmax (llm-d inference scheduler: filter -> scorers -> picker).

    Filter: available replicas (healthy, not full). Scorers, each in [0, 1], for candidate ``s``:

    - prefix: ``matched_blocks(s) / len(block_hashes)``, the share of the prompt's full blocks cached
      on ``s`` (llm-d's prefix-cache scorer); 0 for a prompt shorter than one block;
    - queue: ``1 - load(s) / max_load``, with ``load = running + waiting`` and ``max_load`` the
      largest load among the candidates (1 for all when every load is 0). llm-d's queue scorer
      min-max normalizes the waiting queue instead, which turns a difference of one request into
      the full [0, 1] range; dividing by the maximum keeps the score proportional to the load;
    - KV: ``1 - kv_usage(s)``, clipped to [0, 1] (llm-d's KV-cache-utilization scorer).

    Score ``= w_prefix * prefix + w_queue * queue + w_kv * kv``. Picker: the highest score; exact
    ties go to the lowest RTT from the origin, then to snapshot order. The estimate carries the
    network term, RTT(origin -> replica region), seconds.
    """

    name = "weighted"

    def __init__(self, params: WeightedParams) -> None:
        self.params = params

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        cands = available_views(snapshot)
        if not cands:
            return HOLD
        w = self.params.weights
        n_blocks = len(request.block_hashes)
        matched = snapshot.prefix.match(request.block_hashes) if n_blocks and w.prefix else {}
        max_load = 0
        for v in cands:
            load = v.running + v.waiting
            if load > max_load:
                max_load = load
        w_prefix = w.prefix / n_blocks if n_blocks else 0.0
        w_queue = w.queue / max_load if max_load else 0.0
        origin = request.origin
        rtt_s = snapshot.rtt_s
        best = cands[0]
        best_score = -1.0
        best_rtt = float("nan")
        for v in cands:
            kv = v.kv_usage
            kv_free = 1.0 - (kv if kv < 1.0 else 1.0) if kv > 0.0 else 1.0
            score = (w_prefix * matched.get(v.id, 0) + w.queue - w_queue * (v.running + v.waiting)
                     + w.kv * kv_free)
            if score > best_score:
                best, best_score, best_rtt = v, score, float("nan")
            elif score == best_score:
                if best_rtt != best_rtt:
                    best_rtt = rtt_s(origin, best.region)
                r = rtt_s(origin, v.region)
                if r < best_rtt:
                    best, best_rtt = v, r
        if best_rtt != best_rtt:
            best_rtt = rtt_s(origin, best.region)
        return Decision(best.id, estimate=CostBreakdown(network_s=best_rtt),
                        reason=f"weighted score {best_score:.3f}")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_weighted(params: Mapping[str, Any], rng: np.random.Generator) -> WeightedPolicy:
    return WeightedPolicy(parse_params(WeightedParams, "weighted", params))
