"""A paged KV cache with automatic prefix caching, as vLLM v1 keeps it.

Blocks are fixed-size pages of ``block_size`` tokens. A full block may carry a hash (see
:mod:`isthmus.core.hashing`); while it does, any request whose prompt starts with the same blocks
reuses it instead of recomputing it.

Free blocks wait in one queue. A freed block keeps its hash and goes to the *tail*; allocation takes
from the *head* and drops the hash of the block it takes. The head therefore holds the least
recently freed blocks, and eviction is LRU. A free block that a new request hits is taken out of
the queue wherever it is.

The queue is a deque with lazy deletion: a hit on a free block leaves its entry in place, and the
entry is skipped when it reaches the head (the block is referenced again, or has a newer entry
further back). ``_qcount[b]`` counts the entries of block ``b`` in the deque, so an entry is live
exactly when ``ref[b] == 0`` and it is the last entry of ``b``. The deque is compacted when stale
entries outnumber the blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import KeysView, Sequence


class BlockPool:
    """Blocks, reference counts, the hash -> block map and the LRU free queue.

    Invariants (checked by :meth:`check`): every block is either referenced (``ref > 0``) or in the
    free queue, never both; a hash maps to exactly one block and that block carries the hash.
    """

    __slots__ = ("_cached", "_hash", "_n_free", "_qcount", "_queue", "_ref", "block_size", "enable_caching",
                 "num_blocks")

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        self._queue: deque[int] = deque(range(num_blocks))
        self._qcount = [1] * num_blocks
        self._n_free = num_blocks

    @property
    def num_free(self) -> int:
        """Blocks in the free queue (cached-but-unreferenced ones included)."""
        return self._n_free

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some request (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - self._n_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks that carry a hash (resident prefix entries)."""
        return len(self._cached)

    def cached_hashes(self) -> KeysView[int]:
        """Hashes of the resident blocks: a live, read-only view (for KV event publishers)."""
        return self._cached.keys()

    def match_prefix(self, block_hashes: Sequence[int], limit: int | None = None) -> list[int]:
        """Block ids holding the longest cached prefix of ``block_hashes`` (at most ``limit`` blocks)."""
        if not self.enable_caching:
            return []
        cached = self._cached
        out: list[int] = []
        for h in block_hashes if limit is None else block_hashes[:limit]:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def prefix_len(self, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks of ``block_hashes`` that are resident."""
        if not self.enable_caching:
            return 0
        cached = self._cached
        n = 0
        for h in block_hashes:
            if h not in cached:
                break
            n += 1
        return n

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on each of ``blocks`` (cache hits), taking free ones out of the queue."""
        ref = self._ref
        taken = 0
        for b in blocks:
            if ref[b] == 0:
                taken += 1
            ref[b] += 1
        self._n_free -= taken

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks from the head of the free queue, dropping their old hashes.

        The caller checks ``num_free >= n`` first; asking for more raises ``ValueError``.
        """
        if n > self._n_free:
            raise ValueError(f"asked for {n} blocks, {self._n_free} free")
        pop = self._queue.popleft
        ref, qc, hashes, cached = self._ref, self._qcount, self._hash, self._cached
        out: list[int] = []
        append = out.append
        left = n
        while left:
            b = pop()
            c = qc[b] - 1
            qc[b] = c
            if c or ref[b]:
                continue  # stale entry
            ref[b] = 1
            h = hashes[b]
            if h is not None:
                del cached[h]
                hashes[b] = None
            append(b)
            left -= 1
        self._n_free -= n
        return out

    def cache(self, block: int, block_hash: int) -> None:
        """Give a full, referenced block its hash, unless another block already holds that hash."""
        if not self.enable_caching or self._hash[block] is not None or block_hash in self._cached:
            return
        self._hash[block] = block_hash
        self._cached[block_hash] = block

    def cache_range(self, blocks: Sequence[int], block_hashes: Sequence[int], start: int, end: int) -> None:
        """:meth:`cache` for ``blocks[i]`` with ``block_hashes[i]``, ``start <= i < end``."""
        if not self.enable_caching:
            return
        hashes, cached = self._hash, self._cached
        for i in range(start, end):
            b = blocks[i]
            h = block_hashes[i]
            if hashes[b] is None and h not in cached:
                hashes[b] = h
                cached[h] = b

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; blocks reaching zero go to the free-queue tail.

        Blocks are released in reverse order, so a request's last blocks (least likely to be shared)
        are evicted first, as in vLLM.
        """
        ref, qc, q = self._ref, self._qcount, self._queue
        released = 0
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if r <= 0:
                if r < 0:
                    ref[b] = 0
                    raise ValueError(f"block {b} freed more often than referenced")
                q.append(b)
                qc[b] += 1
                released += 1
        self._n_free += released
        if len(q) > 2 * self.num_blocks + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop stale queue entries, keeping the order of live ones."""
        ref = self._ref
        seen: set[int] = set()
        live: list[int] = []
        for b in reversed(self._queue):
            if ref[b] == 0 and b not in seen:
                seen.add(b)
                live.append(b)
        live.reverse()
        self._queue = deque(live)
        qc = [0] * self.num_blocks
        for b in live:
            qc[b] = 1
        self._qcount = qc

    def reset_prefix_cache(self) -> list[int]:
        """Drop every hash of free blocks (vLLM's ``reset_prefix_cache``); returns the removed hashes."""
        removed: list[int] = []
        for h, b in list(self._cached.items()):
            if self._ref[b] == 0:
                del self._cached[h]
                self._hash[b] = None
                removed.append(h)
        return removed

    def check(self) -> None:
        """Assert the invariants; for tests."""
        live: dict[int, int] = {}
        counts: dict[int, int] = {}
        for pos, b in enumerate(self._queue):
            counts[b] = counts.get(b, 0) + 1
            live[b] = pos
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0, f"block {b} has negative refs"
            assert self._qcount[b] == counts.get(b, 0), f"block {b}: queue count off"
            in_free = self._ref[b] == 0
            assert not in_free or b in live, f"block {b} is unreferenced but not queued"
            h = self._hash[b]
            if h is not None:
                assert self._cached.get(h) == b, f"block {b} hash {h} not mapped back"
        assert self._n_free == sum(1 for r in self._ref if r == 0)
        for h, b in self._cached.items():
            assert self._hash[b] == h

    def free_order(self) -> list[int]:
        """Free blocks from head (next to be evicted) to tail; for tests."""
        last: dict[int, int] = {}
        for pos, b in enumerate(self._queue):
            last[b] = pos
        return [b for pos, b in enumerate(self._queue) if last[b] == pos and self._ref[b] == 0]
