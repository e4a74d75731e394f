"""What a router knows of the cluster at one instant: the input of every policy."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from isthmus.core.prefix_index import PrefixIndex as PrefixIndex
from isthmus.core.topology import PriceBook


@dataclass(slots=True)
class InstanceView:
    """One replica as seen at snapshot time (policies read it and never change it; not frozen, since
    a frozen dataclass sets every field through ``object.__setattr__`` and the router builds one per
    replica per decision: ``tests/policies/test_policy_properties.py`` checks that no policy writes
    to its input).

    Attributes:
        id, region, gpu: identity.
        running: requests in the running batch.
        waiting: requests queued at the engine (plus any the router holds for it).
        running_tokens: prompt tokens of running requests (GORGO's ``Σ running prompt tokens``).
        queued_prefill_tokens: prompt tokens still to prefill among waiting requests.
        kv_usage: share of KV blocks in use, 0..1.
        healthy: passes health checks.
        full: at its in-flight cap; policies must not pick it.
        age: how stale this view is, seconds.
        in_flight: requests sent to it and not finished, as the router counts them.
        prefill_s_per_token: prefill seconds per prompt token of its GPU x model profile (GORGO's
            ``t_p``); ``nan`` when unknown.
        model: the model it serves; ``None`` when unknown (serves any request).
        max_num_seqs: its engine's cap on running sequences; 0 when unknown.
        decode_step_s: seconds of one decode-only step of its running batch plus one more
            sequence, from its profile (:func:`isthmus.core.slo.decode_step_estimate`); ``nan`` when
            not computed. Shells fill it for policies that set ``uses_decode_step = True``.
        deferred_waiting, deferred_prefill_tokens: the part of ``waiting`` and of
            ``queued_prefill_tokens`` that belongs to requests queued at a priority > 0 (lower than
            normal), which a normal-priority request overtakes.
    """

    id: str
    region: str
    gpu: str
    running: int = 0
    waiting: int = 0
    running_tokens: int = 0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0
    healthy: bool = True
    full: bool = False
    age: float = 0.0
    in_flight: int = 0
    prefill_s_per_token: float = math.nan
    model: str | None = None
    max_num_seqs: int = 0
    decode_step_s: float = math.nan
    deferred_waiting: int = 0
    deferred_prefill_tokens: int = 0

    @property
    def available(self) -> bool:
        """May receive a new request."""
        return self.healthy and not self.full

    @property
    def load(self) -> int:
        """Running plus waiting requests (the least-load metric)."""
        return self.running + self.waiting


class PrefixIndexView(Protocol):
    """Cached-prefix lengths per replica for a block-hash sequence."""

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        """Number of leading blocks of ``block_hashes`` cached on each replica (absent means 0)."""
        ...


class NoPrefixInfo:
    """A prefix view that knows nothing (every replica matches 0 blocks)."""

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        return {}


class CallbackPrefixView:
    """A prefix view backed by one lookup function per replica (e.g. the simulator's exact caches)."""

    def __init__(self, lookups: Mapping[str, Callable[[Sequence[int]], int]]) -> None:
        self._lookups = lookups

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        return {rid: n for rid, fn in self._lookups.items() if (n := fn(block_hashes))}


@dataclass(slots=True)
class ClusterSnapshot:
    """Input of :meth:`Policy.choose`, built by the router's collectors or by the simulator; read-only
    by contract (as :class:`InstanceView`).

    Attributes:
        now: time of the snapshot, seconds (policies read time only from here).
        here: region of the deciding router.
        instances: replica id -> view, in a stable order.
        rtt_s: ``rtt_s(a, b)``: round-trip seconds between regions ``a`` and ``b``.
        prefix: cached-prefix lengths per replica.
        block_size: tokens per KV block, to turn matched blocks into tokens.
        hops: how many times this request was already forwarded between regional routers
            (the hop header); a policy must not forward a request with ``hops >= 1``.
        prices: GPU and egress prices (the topology's); ``None`` when the shell knows none.
    """

    now: float
    here: str
    instances: Mapping[str, InstanceView]
    rtt_s: Callable[[str, str], float]
    prefix: PrefixIndexView = field(default_factory=NoPrefixInfo)
    block_size: int = 16
    hops: int = 0
    prices: PriceBook | None = None

    def available(self) -> list[InstanceView]:
        """Replicas that may receive a request (healthy and not full), in snapshot order."""
        return [v for v in self.instances.values() if v.available]
