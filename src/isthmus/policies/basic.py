"""Baseline policies: random, round robin, least load."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.policies._support import available_views, least_load


def _no_params(name: str, params: Mapping[str, Any]) -> None:
    if params:
        raise TypeError(f"{name} takes no parameters, got {sorted(params)}")


class RandomPolicy:
    """Uniformly random among available replicas (from the seeded generator it is given)."""

    name = "random"
    uses_prefix = False

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        cands = snapshot.available()
        if not cands:
            return HOLD
        v = cands[int(self._rng.integers(len(cands)))]
        return Decision(v.id, estimate=CostBreakdown(network_s=snapshot.rtt_s(request.origin, v.region)),
                        reason="random")

    def observe(self, outcome: Outcome) -> None:
        return None


class RoundRobinPolicy:
    """Cycles through replicas in snapshot order, skipping unavailable ones."""

    name = "round_robin"
    uses_prefix = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        ids = list(snapshot.instances)
        for k in range(len(ids)):
            v = snapshot.instances[ids[(self._next + k) % len(ids)]]
            if v.available:
                self._next = (self._next + k + 1) % len(ids)
                return Decision(v.id, estimate=CostBreakdown(network_s=snapshot.rtt_s(request.origin, v.region)),
                                reason="round robin")
        return HOLD

    def observe(self, outcome: Outcome) -> None:
        return None


class LeastLoadPolicy:
    """Fewest running + waiting requests (GORGO's baseline 1; SkyServe's ``least_load``).

    Ties go to the lower RTT from the request's origin, then to snapshot order, so the choice is a
    deterministic function of the snapshot.
    """

    name = "least_load"
    uses_prefix = False

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        best, rtt = least_load(available_views(snapshot), request.origin, snapshot.rtt_s)
        if best is None:
            return HOLD
        return Decision(best.id, estimate=CostBreakdown(network_s=rtt),
                        reason=f"least load ({best.running + best.waiting} running+waiting)")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_random(params: Mapping[str, Any], rng: np.random.Generator) -> RandomPolicy:
    _no_params("random", params)
    return RandomPolicy(rng)


def make_round_robin(params: Mapping[str, Any], rng: np.random.Generator) -> RoundRobinPolicy:
    _no_params("round_robin", params)
    return RoundRobinPolicy()


def make_least_load(params: Mapping[str, Any], rng: np.random.Generator) -> LeastLoadPolicy:
    _no_params("least_load", params)
    return LeastLoadPolicy()
