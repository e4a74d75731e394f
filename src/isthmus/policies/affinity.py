"""Session affinity by consistent hashing: a hash ring with virtual nodes (Karger et al., 1997)."""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.policies._support import available_views, least_load, parse_params


def stable_hash64(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and run (BLAKE2b, 8-byte digest).

    Python's ``hash(str)`` is salted per process, which would move every session on a restart.
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def _member_points(member: str, count: int) -> tuple[int, ...]:
    words: list[int] = []
    for j in range((count + 7) // 8):
        words.extend(struct.unpack(">8Q", hashlib.blake2b(f"{member}#{j}".encode()).digest()))
    return tuple(words[:count])


class HashRing:
    """A consistent-hash ring: each member owns ``virtual_nodes`` points on a 64-bit circle.

    A key belongs to the member owning the first point at or after the key's hash, wrapping around.
    Removing a member moves only the keys it owned (to the next points' owners); adding one takes
    keys only from others' arcs, about ``1 / members`` of them. The points of member ``m`` are the
    big-endian 64-bit words of ``BLAKE2b-512(f"{m}#{j}")`` for ``j = 0, 1, ...`` (eight per digest),
    the first ``virtual_nodes`` of them; equal points are ordered by member name, so the ring is a
    function of the member set alone.
    """

    __slots__ = ("_members", "_owners", "_points")

    def __init__(self, members: Iterable[str], virtual_nodes: int) -> None:
        pts = sorted((p, m) for m in members for p in _member_points(m, virtual_nodes))
        self._points = [p for p, _ in pts]
        self._owners = [m for _, m in pts]
        self._members = frozenset(self._owners)

    def __len__(self) -> int:
        return len(self._members)

    def walk(self, key_hash: int) -> Iterable[str]:
        """Members in ring order from ``key_hash`` clockwise, each point's owner (repeats possible)."""
        n = len(self._points)
        start = bisect.bisect_left(self._points, key_hash)
        owners = self._owners
        for i in range(n):
            yield owners[(start + i) % n]

    def owner(self, key_hash: int) -> str | None:
        """The member ``key_hash`` maps to; ``None`` for an empty ring."""
        return next(iter(self.walk(key_hash)), None)


@dataclass(frozen=True, slots=True)
class SessionAffinityParams:
    """Parameters of ``session_affinity``.

    Attributes:
        virtual_nodes: points per replica on the ring (160, libketama's figure); more points spread
            sessions more evenly and cost more memory and rebuild time.
    """

    virtual_nodes: int = 160

    def __post_init__(self) -> None:
        if not 1 <= self.virtual_nodes <= 10_000:
            raise ValueError(f"session_affinity: virtual_nodes must be in [1, 10000], got {self.virtual_nodes}")


class SessionAffinityPolicy:
    """Same session, same replica: consistent hashing of ``request.session`` over the replicas.

    The ring's members are all replicas of the snapshot (available or not), so a replica that is
    briefly unhealthy or full keeps its arc: its sessions go to the next available member clockwise
    while it is out, and come back when it is available again. Sessions of other replicas never
    move when a replica leaves or joins the snapshot, except those the joining one takes over.
    Requests without a session go to the least-loaded available replica (ties: lowest RTT from the
    origin, then snapshot order). The ring is rebuilt only when the snapshot's replica set changes.
    The estimate carries the network term, RTT(origin -> replica region), seconds.
    """

    name = "session_affinity"
    uses_prefix = False

    def __init__(self, params: SessionAffinityParams) -> None:
        self.params = params
        self._ring_ids: tuple[str, ...] = ()
        self._ring = HashRing((), params.virtual_nodes)

    def _ring_for(self, ids: tuple[str, ...]) -> HashRing:
        if ids != self._ring_ids:
            self._ring = HashRing(ids, self.params.virtual_nodes)
            self._ring_ids = ids
        return self._ring

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        instances = snapshot.instances
        if request.session is None:
            view, rtt = least_load(available_views(snapshot), request.origin, snapshot.rtt_s)
            if view is None:
                return HOLD
            return Decision(view.id, estimate=CostBreakdown(network_s=rtt), reason="no session: least load")
        if not any(v.healthy and not v.full for v in instances.values()):
            return HOLD
        ring = self._ring_for(tuple(instances))
        home: str | None = None
        for rid in ring.walk(stable_hash64(request.session)):
            if home is None:
                home = rid
            view = instances[rid]
            if view.healthy and not view.full:
                why = "session home" if rid == home else f"session home {home} unavailable: next on ring"
                return Decision(rid, estimate=CostBreakdown(network_s=snapshot.rtt_s(request.origin, view.region)),
                                reason=why)
        return HOLD  # unreachable: some member is available

    def observe(self, outcome: Outcome) -> None:
        return None


def make_session_affinity(params: Mapping[str, Any], rng: np.random.Generator) -> SessionAffinityPolicy:
    return SessionAffinityPolicy(parse_params(SessionAffinityParams, "session_affinity", params))
