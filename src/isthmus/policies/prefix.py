"""Prefix-cache policies of the field: longest cached prefix, and SGLang router's ``cache_aware``.

Both read the cached-prefix lengths from ``snapshot.prefix.match`` (one call per decision; it is the
expensive part) and never pick an unavailable replica: filter first (healthy and not full), then
score, then pick with a documented deterministic tie-break.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot, InstanceView
from isthmus.policies._support import available_views, least_load, parse_params


def _longest_prefix(cands: list[InstanceView], matched: Mapping[str, int], origin: str,
                    snapshot: ClusterSnapshot) -> tuple[InstanceView, int, float]:
    """Among non-empty ``cands``: the most matched blocks; ties -> least load -> lowest RTT -> order.

    Returns the view, its matched blocks and its RTT from ``origin``, seconds.
    """
    best_m = 0
    for v in cands:
        m = matched.get(v.id, 0)
        if m > best_m:
            best_m = m
    tied = cands if best_m == 0 else [v for v in cands if matched.get(v.id, 0) == best_m]
    view, rtt = least_load(tied, origin, snapshot.rtt_s)
    assert view is not None  # cands is non-empty
    return view, best_m, rtt


# ------------------------------------------------------------------------------------------ prefix_trie
@dataclass(frozen=True, slots=True)
class PrefixTrieParams:
    """``prefix_trie`` has no parameters."""


class PrefixTriePolicy:
    """Longest cached prefix only (GORGO's PREFIXTRIE baseline).

    Picks the available replica whose cache holds the most leading blocks of the prompt, ignoring
    network and load. Ties (including "nobody holds any of it") go to the least load
    (running + waiting), then to the lowest RTT from the request's origin, then to snapshot order.
    The estimate carries only the network term: RTT(origin -> replica region), seconds.
    """

    name = "prefix_trie"

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        cands = available_views(snapshot)
        if not cands:
            return HOLD
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes else {}
        view, m, rtt = _longest_prefix(cands, matched, request.origin, snapshot)
        return Decision(view.id, estimate=CostBreakdown(network_s=rtt),
                        reason=f"longest cached prefix ({m} blocks)")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_prefix_trie(params: Mapping[str, Any], rng: np.random.Generator) -> PrefixTriePolicy:
    parse_params(PrefixTrieParams, "prefix_trie", params)
    return PrefixTriePolicy()


# ------------------------------------------------------------------------------------------ cache_aware
@dataclass(frozen=True, slots=True)
class CacheAwareParams:
    """Parameters of ``cache_aware`` (defaults: SGLang router's Rust core).

    Attributes:
        cache_threshold: route by cache only when the best match covers more than this share of the
            prompt's tokens, 0..1 (SGLang: 0.5 in the Rust core; 0.3 in later CLIs).
        balance_abs_threshold: imbalance needs ``max_load - min_load`` above this, requests.
        balance_rel_threshold: ... and ``max_load`` above this times ``min_load``.
    """

    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_aware: cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"cache_aware: balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
        if not (math.isfinite(self.balance_rel_threshold) and self.balance_rel_threshold > 0):
            raise ValueError(f"cache_aware: balance_rel_threshold must be finite and > 0, "
                             f"got {self.balance_rel_threshold}")


class CacheAwarePolicy:
    """SGLang router's ``cache_aware`` rule (sgl-router, ``policies/cache_aware.rs``).

    Over the available replicas (load = running + waiting requests):

    1. if the cluster is imbalanced, ``max_load - min_load > balance_abs_threshold`` and
       ``max_load > balance_rel_threshold * min_load``, pick the least-loaded replica;
    2. else, if the best cached prefix covers more than ``cache_threshold`` of the prompt,
       ``matched_blocks * block_size / prompt_tokens > cache_threshold``, pick the replica holding
       it (ties: least load);
    3. else pick the least-loaded replica. SGLang routes to the replica with the smallest
       approximate radix tree there (most free cache); the snapshot has no tree sizes, and least load
       is the closest signal it has, so that is what this uses.

    Defaults 0.5 / 32 / 1.1 are the Rust core's; SGLang's launch CLI defaults to 64 and 1.5 for the
    balance thresholds (and later CLIs to 0.3 for the cache threshold): pass them as parameters to
    reproduce a CLI deployment. Least-load ties go to the lowest RTT from the origin, then to
    snapshot order. The loads compared in step 1 are those of the available replicas (filter first):
    a full replica is not a candidate, so it does not count as the imbalance's heavy end.
    """

    name = "cache_aware"

    def __init__(self, params: CacheAwareParams) -> None:
        self.params = params

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        cands = available_views(snapshot)
        if not cands:
            return HOLD
        p = self.params
        max_load = min_load = cands[0].running + cands[0].waiting
        for v in cands:
            load = v.running + v.waiting
            if load > max_load:
                max_load = load
            elif load < min_load:
                min_load = load
        origin = request.origin
        if max_load - min_load > p.balance_abs_threshold and max_load > p.balance_rel_threshold * min_load:
            view, rtt = least_load(cands, origin, snapshot.rtt_s)
            assert view is not None
            return Decision(view.id, estimate=CostBreakdown(network_s=rtt),
                            reason=f"imbalanced (loads {min_load}..{max_load}): least load")
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes else {}
        view, m, rtt = _longest_prefix(cands, matched, origin, snapshot)
        ratio = m * snapshot.block_size / request.prompt_tokens
        if ratio > p.cache_threshold:
            return Decision(view.id, estimate=CostBreakdown(network_s=rtt),
                            reason=f"cache match {ratio:.2f} > {p.cache_threshold}")
        view, rtt = least_load(cands, origin, snapshot.rtt_s)
        assert view is not None
        return Decision(view.id, estimate=CostBreakdown(network_s=rtt),
                        reason=f"cache match {ratio:.2f} <= {p.cache_threshold}: least load")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_cache_aware(params: Mapping[str, Any], rng: np.random.Generator) -> CacheAwarePolicy:
    return CacheAwarePolicy(parse_params(CacheAwareParams, "cache_aware", params))
