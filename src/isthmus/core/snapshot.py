"""What a router knows of the cluster at one instant: the input of every policy."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One replica as seen at snapshot time.

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


class PrefixIndex:
    """A router-side mirror of what each replica probably caches: an LRU of block hashes per replica.

    The router records the blocks of every request it sends (``record``), and forgets the least
    recently used blocks of a replica beyond ``capacity_blocks`` (the replica's KV size), the way
    the replica's own LRU would. This is GORGO-proxy's "mirror of what the proxy sent where"; KV
    events from the engine can correct it (``remove``).

    A prompt's blocks are recorded last-to-first, so its first blocks are the most recent: when a
    replica's cache fills, the tails of old prompts go first, as in vLLM, which frees a request's
    blocks in reverse. Lookups use a hash -> holders bitmask: a miss on the first block costs one
    dict lookup whatever the number of replicas, and a match of any length costs a bisection per
    point where some replica drops out (a walk block by block once ``remove`` has broken the
    nesting).
    """

    def __init__(self, capacity_blocks: Mapping[str, int]) -> None:
        self._capacity = dict(capacity_blocks)
        self._ids = list(capacity_blocks)
        self._bit = {rid: 1 << i for i, rid in enumerate(self._ids)}
        # Per replica, a plain dict used as an LRU: re-inserting a key moves it to the recent end.
        self._blocks: dict[str, dict[int, None]] = {rid: {} for rid in capacity_blocks}
        self._holders: dict[int, int] = {}  # block hash -> bitmask of replicas holding it
        self._nested = True  # no block was removed out of LRU order: holders shrink along a prompt

    def record(self, replica: str, block_hashes: Sequence[int]) -> None:
        """Mark ``block_hashes`` as cached on ``replica``, the first block the most recently used."""
        lru = self._blocks[replica]
        bit = self._bit[replica]
        holders = self._holders
        ordered = block_hashes[::-1]
        for h in lru.keys() & block_hashes:
            del lru[h]
        lru.update(dict.fromkeys(ordered))
        get = holders.get
        for h in ordered:
            holders[h] = get(h, 0) | bit
        over = len(lru) - self._capacity[replica]
        if over > 0:
            clear = ~bit
            for h in list(islice(lru, over)):
                del lru[h]
                m = holders[h] & clear
                if m:
                    holders[h] = m
                else:
                    del holders[h]

    def blocks(self, replica: str) -> int:
        """Blocks the mirror holds for ``replica`` (0 for an unknown one)."""
        lru = self._blocks.get(replica)
        return len(lru) if lru is not None else 0

    def remove(self, replica: str, block_hashes: Sequence[int]) -> None:
        """Forget ``block_hashes`` on ``replica`` (e.g. on a KV ``BlockRemoved`` event)."""
        self._nested = False
        lru = self._blocks[replica]
        clear = ~self._bit[replica]
        holders = self._holders
        for h in block_hashes:
            if lru.pop(h, 0) is None:
                m = holders[h] & clear
                if m:
                    holders[h] = m
                else:
                    del holders[h]

    def clear(self, replica: str) -> None:
        """Forget everything about ``replica`` (e.g. ``AllBlocksCleared``, or a restart)."""
        self.remove(replica, list(self._blocks[replica]))

    def __len__(self) -> int:
        """Blocks recorded over all replicas."""
        return sum(len(b) for b in self._blocks.values())

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        if not self._nested:
            return self._walk(block_hashes)
        # Records always cover a prompt from its first block and evict tails first, so a replica
        # holding block i holds every block before it: the holder set shrinks along the prompt,
        # and each point where it shrinks can be found by bisection.
        out: dict[str, int] = {}
        get = self._holders.get
        n = len(block_hashes)
        if n == 0:
            return out
        mask = get(block_hashes[0], 0)
        lo = 0
        while mask:
            if get(block_hashes[n - 1], 0) & mask == mask:
                self._emit(out, mask, n)
                break
            hi = n - 1  # invariant: all of mask holds block lo, not all hold block hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if get(block_hashes[mid], 0) & mask == mask:
                    lo = mid
                else:
                    hi = mid
            still = get(block_hashes[hi], 0) & mask
            self._emit(out, mask & ~still, hi)
            mask = still
            lo = hi
        return out

    def _walk(self, block_hashes: Sequence[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        holders = self._holders
        mask = -1
        n = 0
        for h in block_hashes:
            m = holders.get(h, 0) & mask
            if m != mask and n:
                self._emit(out, mask & ~m, n)
            mask = m
            if not mask:
                return out
            n += 1
        if n and mask:
            self._emit(out, mask, n)
        return out

    def _emit(self, out: dict[str, int], bits: int, n: int) -> None:
        ids = self._ids
        while bits:
            low = bits & -bits
            out[ids[low.bit_length() - 1]] = n
            bits ^= low


@dataclass(frozen=True)
class ClusterSnapshot:
    """Immutable input of :meth:`Policy.choose`, built by the router's collectors or by the simulator.

    Attributes:
        now: time of the snapshot, seconds (policies read time only from here).
        here: region of the deciding router.
        instances: replica id -> view, in a stable order.
        rtt_s: ``rtt_s(a, b)``: round-trip seconds between regions ``a`` and ``b``.
        prefix: cached-prefix lengths per replica.
        block_size: tokens per KV block, to turn matched blocks into tokens.
        hops: how many times this request was already forwarded between regional routers
            (the hop header); a policy must not forward a request with ``hops >= 1``.
    """

    now: float
    here: str
    instances: Mapping[str, InstanceView]
    rtt_s: Callable[[str, str], float]
    prefix: PrefixIndexView = field(default_factory=NoPrefixInfo)
    block_size: int = 16
    hops: int = 0

    def available(self) -> list[InstanceView]:
        """Replicas that may receive a request (healthy and not full), in snapshot order."""
        return [v for v in self.instances.values() if v.available]
