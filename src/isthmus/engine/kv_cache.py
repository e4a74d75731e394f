"""A paged KV cache with automatic prefix caching, as vLLM v1 keeps it.

Blocks are fixed-size pages of ``block_size`` tokens. A full block may carry a hash (see
:mod:`isthmus.core.hashing`); while it does, any request whose prompt starts with the same blocks
reuses it instead of recomputing it.

Free blocks wait in one queue. A freed block keeps its hash and goes to the *tail*; allocation takes
from the *head* and drops the hash of the block it takes. The head therefore holds the least
recently freed blocks, and eviction is LRU. A free block that a new request hits is taken out of
the queue wherever it is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockPool:
    """Blocks, reference counts, the hash -> block map and the LRU free queue.

    Invariants (checked by :meth:`check`): every block is either referenced (``ref > 0``) or in the
    free queue, never both; a hash maps to exactly one block and that block carries the hash.
    """

    __slots__ = ("_cached", "_free", "_hash", "_ref", "block_size", "enable_caching", "num_blocks")

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks in the free queue (cached-but-unreferenced ones included)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some request (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks that carry a hash (resident prefix entries)."""
        return len(self._cached)

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
        """Take a reference on each of ``blocks`` (cache hits), pulling free ones out of the queue."""
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks from the head of the free queue, dropping their old hashes.

        The caller checks ``num_free >= n`` first; asking for more raises ``ValueError``.
        """
        free = self._free
        if n > len(free):
            raise ValueError(f"asked for {n} blocks, {len(free)} free")
        popitem = free.popitem
        out = [popitem(False)[0] for _ in range(n)]
        ref, hashes, cached = self._ref, self._hash, self._cached
        for b in out:
            ref[b] = 1
            h = hashes[b]
            if h is not None:
                del cached[h]
                hashes[b] = None
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
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if r <= 0:
                if r < 0:
                    ref[b] = 0
                    raise ValueError(f"block {b} freed more often than referenced")
                free[b] = None

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
        for b in range(self.num_blocks):
            in_free = b in self._free
            assert self._ref[b] >= 0, f"block {b} has negative refs"
            assert (self._ref[b] == 0) == in_free, f"block {b}: ref={self._ref[b]} in_free={in_free}"
            h = self._hash[b]
            if h is not None:
                assert self._cached.get(h) == b, f"block {b} hash {h} not mapped back"
        for h, b in self._cached.items():
            assert self._hash[b] == h
