"""The router's prefix mirror in fixed-size numpy tables: what each replica probably caches.

:class:`PrefixIndex` is GORGO-proxy's "mirror of what the proxy sent where": an LRU of block hashes
per replica, as large as the replica's KV cache, plus a hash -> holders table that answers
:meth:`PrefixIndex.match`. :class:`BoundedHashMap` is an int -> int map of bounded size that forgets
its oldest entries first (the router's engine-name -> router-hash translation of KV events).

Neither keeps a Python object per block. Every entry lives in numpy arrays allocated and written
once, from the capacities, when the structure is built, so memory neither grows nor fragments while
the contents turn over (nor creeps up as pages get touched for the first time).

Keys. A block hash is any Python int; it is stored modulo 2**64, as a signed 64-bit int, so ``h``
and ``h + 2**64`` name the same block. The router's own hashes (CPython's tuple hash,
:mod:`isthmus.core.hashing`) are signed 64-bit ints already, hence never merged; engine names that
are sha256 digests read as ints keep their low 64 bits. No key value is reserved: a freed slot's key
is set to 0 and the value beside it (a holders mask, a log position) tells a free slot from a live
block whose hash is 0.

Tables (``_Table``): open addressing with linear probing, over a prime number ``n`` of home groups
of 1 or 8 slots. Each group counts the entries that passed it (stored after it, their home at or
before it); a lookup stops at the end of the first group nobody passed, so deletions leave no
tombstones and lookups do not slow down under churn. Entries never move, so other structures point
at them by slot. The holders table has groups of one slot and homes ``(h mod n) * c mod n``, which
Python computes on small ints: ``match`` probes it one key at a time, a bisection over the prompt,
in plain Python on memoryviews. The other tables are bucketised (groups of 8, a key in any free slot
of the first group from its home that has one), which keeps clusters short under churn.

Batches and single blocks. A batch of keys (a long prompt, a batch of KV events) is looked up,
inserted or deleted with numpy calls over a window of slots per key; the few keys a round leaves
(not settled by their window, or beaten to a slot by another key of the batch) are finished in plain
Python, and so are pass-over counts that only a few entries change. A numpy call costs about what 10
to 30 lines of plain Python do, and a batch takes about a hundred of them whatever its size, while a
block takes some 45 lines: short prompts (up to ``_ONE_BY_ONE`` blocks) and short removals are done
a block at a time in plain Python over the same tables.

Order (``_Order``): an LRU or FIFO is a ring log of slots in the order their entries were (re)placed,
plus each slot's position in it. Making an entry the most recent appends it again; its older log
entry, whose position no longer matches, is skipped when the oldest are evicted. The ring has room
for 1/4 more entries than the capacity and is compacted (live entries moved to its front, in order)
when it fills up with stale ones.

Memory of a :class:`PrefixIndex`, per (replica, block) entry once full:

- the holders table, ``sum(capacities) / 0.5`` slots of key (8 B), holders bitmask (1, 2, 4 or 8 B
  for up to 8, 16, 32 or 64 replicas; beyond, 8 B per 64 replicas and a 1 B used flag) and
  pass-over count (2 B): 22 B per distinct block with up to 8 replicas, 36 B with up to 64;
- per replica, ``capacity / 0.65`` slots of holders slot (4 B) and log position (4 B), a 2 B count
  per 8 slots, and the ring log (4 B x 5/4): 17.7 B.

That is 39.7 B per entry with up to 8 replicas (53.7 B with up to 64) when no block is on two
replicas (a block several replicas hold has one holders entry); :attr:`PrefixIndex.nbytes` is the
exact figure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Idx = npt.NDArray[np.intp]
Keys = npt.NDArray[np.int64]

_M64 = (1 << 64) - 1
_HALF = 1 << 63
_MULTIPLIER = 0x9E3779B97F4A7C15  # of the home hashes (see _Table.home)
_MULTIPLIER_U64 = np.uint64(_MULTIPLIER)
_U32 = np.uint64(32)
_WINDOW = 8  # slots a vectorised probe reads per key and round (8 bool bytes make one uint64)
_OFFSETS = np.arange(_WINDOW, dtype=np.intp)
_TWO_GROUPS = np.arange(2 * _WINDOW, dtype=np.intp)  # the window of a key in groups of 8
_FEW = 8  # keys left after a vectorised round that plain Python finishes sooner than another round
_ONE_BY_ONE = 64  # prompts up to this many blocks are recorded a block at a time, in plain Python
_WALK_ONE_BY_ONE = 32  # match (without nesting) looks this many blocks up one at a time before numpy
_FEW_RUNS = 16  # pass-over counts of up to this many entries are changed in plain Python
_FEW_REMOVED = 8  # removals of up to this many blocks (and names) go one at a time, in plain Python
_SATURATED = 0xFFFF  # a pass-over count stops here and stays (lookups then go further: correct, slower)
_ONE16 = np.uint16(1)  # (a Python int would send ufunc.at down its slow, casting path)
_DETACHED = 0xFFFFFFFF  # the log position of an entry taken out of the log, about to be appended again
_LAST_POSITION = 0xFFFFFFF0  # log positions (1-based) stay below this: the log is renumbered first

_HOLDERS_LOAD = 0.5  # holders entries per slot at full capacity (under churn, half the keys stay home)
_LRU_LOAD = 0.65  # a replica's LRU table (bucketised)
_MAP_LOAD = 0.75  # a BoundedHashMap at its capacity (which a translation map seldom reaches)


def as_keys(hashes: Sequence[int] | npt.NDArray[Any]) -> Keys:
    """``hashes`` as block keys: each int modulo 2**64, as a signed 64-bit int (two's complement), in
    an int64 array (an int64 array is returned as it is, a uint64 one viewed)."""
    if isinstance(hashes, np.ndarray):
        if hashes.dtype == np.int64:
            return hashes
        if hashes.dtype == np.uint64:
            return hashes.view(np.int64)
        return hashes.astype(np.int64)
    n = len(hashes)
    try:
        return np.fromiter(hashes, np.int64, n)
    except OverflowError:  # some hash outside the signed 64-bit range
        return np.fromiter(map(_signed64, hashes), np.int64, n)


def _signed64(h: int) -> int:
    """``h`` modulo 2**64 as a signed 64-bit int."""
    return ((h + _HALF) & _M64) - _HALF


def _committed(shape: int | tuple[int, int], dtype: Any) -> npt.NDArray[Any]:
    """Zeros, written: the pages are resident from the start, so the process's memory does not creep
    up as a sparsely touched table or a ring log reaches pages it had not used yet."""
    a: npt.NDArray[Any] = np.empty(shape, dtype)
    a.fill(0)
    return a


def _next_prime(n: int) -> int:
    n = max(n, 3) | 1
    while any(n % d == 0 for d in range(3, int(n**0.5) + 1, 2)):
        n += 2
    return n


def _has_duplicates(a: npt.NDArray[Any]) -> bool:
    if len(a) < 2:
        return False
    s = np.sort(a)
    return bool(np.count_nonzero(s[1:] == s[:-1]))


def _first_occurrences(a: Keys) -> Keys:
    """``a`` without repeats, each value where it first occurs."""
    if not _has_duplicates(a):
        return a
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def _runs(first: Idx, lengths: Idx) -> Idx:
    """``first[j], first[j] + 1, ..., first[j] + lengths[j] - 1`` for each ``j`` in turn (lengths > 0)."""
    ends = np.cumsum(lengths)
    out = np.repeat(first + lengths - ends, lengths)  # first[j] minus where its run starts in out
    out += np.arange(int(ends[-1]))
    return out


class _Table:
    """Open addressing (module docstring): ``n`` home groups (a prime) of ``group`` slots, 1 or 8.

    A group of 8 more slots follows, nobody's home, so that a window of 8 slots read from a home
    never wraps around; probing goes on from the last slot to slot 0. The arrays have one more slot,
    at index -1, never probed and always free: ``find`` answers -1 for a missing key, and reading an
    owner's array there gives 0.

    A slot is free where ``live`` is 0: ``live`` is an array the owner writes (a holders mask, a log
    position), or ``keys`` itself, whose keys are then never 0. A freed slot's key is set to 0, so a
    key other than 0 found in the table is live. ``over[g]`` counts the entries whose home is group
    ``g`` or before it and that sit after it, so a lookup that reaches the end of group ``g`` goes on
    only when ``over[g]`` is not 0; a count that reaches 2**16 - 1 stays there (lookups past it
    remain correct, only longer).

    Groups of 1 are linear probing: a key sits in the first free slot from its home, most often the
    home itself, which is read first (the one-key lookups of ``match``, and a one-slot round before
    the 8-slot windows in batches). Groups of 8 are bucketised linear probing: a key takes any free
    slot of the first group from its home that has one, so clusters stay short at high load and
    under churn, and the counts rarely change; lookups read the whole group.
    """

    __slots__ = ("_fib", "_keys_mv", "_live_mv", "_over_mv", "_own_live", "_scale", "groups", "keys", "length",
                 "live", "mult", "over", "shift")

    def __init__(self, entries: int, load: float, key_dtype: type[np.integer[Any]],
                 live_dtype: type[np.unsignedinteger[Any]] | None = None, group: int = 1,
                 key_range: int = 0) -> None:
        self.shift = group.bit_length() - 1
        self.groups = n = _next_prime(int(entries / load / group) + 2)
        self.mult = _MULTIPLIER % n or 1
        self._fib = np.uint64(n)
        self._scale = (n << 32) // key_range if key_range else None
        self.length = length = n * group + _WINDOW  # slots probed
        self.keys: npt.NDArray[Any] = _committed(length + 1, key_dtype)
        self.over = _committed(length >> self.shift, np.uint16)
        self._own_live = live_dtype is not None
        self.live: npt.NDArray[Any] = _committed(length + 1, live_dtype) if live_dtype is not None else self.keys
        self._keys_mv = self.keys.data
        self._live_mv = self.live.data
        self._over_mv = self.over.data

    @property
    def nbytes(self) -> int:
        own = self.keys.nbytes + self.over.nbytes
        return own + self.live.nbytes if self._own_live else own

    def home(self, keys: npt.NDArray[Any]) -> Idx:
        """First slot of each key's home group (see :meth:`home_group`)."""
        h = self.home_group(keys)
        if self.shift:
            h <<= self.shift
        return h

    def home_group(self, keys: npt.NDArray[Any]) -> Idx:
        """Each key's home group.

        Groups of 1 (int64 keys, probed one at a time too): ``(key mod n) * c mod n`` for the prime
        number of groups ``n`` and a constant ``c``, a multiplicative hash Python computes on small
        ints. Groups of 8: keys below ``key_range`` (holders slots, already spread evenly by that
        hash) scaled to ``n``; other keys, the top 32 bits of ``key * 0x9E3779B97F4A7C15 mod 2**64``
        scaled to ``n`` (Fibonacci hashing).
        """
        h: Idx
        if self.shift:
            if self._scale is not None:  # (key * scale < n * 2**32: int64 arithmetic will do)
                h = keys.astype(np.intp)
                h *= self._scale
                h >>= 32
                return h
            x = keys.view(np.uint64) * _MULTIPLIER_U64
            x >>= _U32
            x *= self._fib
            x >>= _U32
            return x.astype(np.intp)
        h = np.remainder(keys, self.groups, dtype=np.int64)
        h *= self.mult
        h %= self.groups
        return h

    def home_of(self, key: int) -> int:
        """:meth:`home` of one key (a signed 64-bit int)."""
        if self.shift:
            if self._scale is not None:
                return key * self._scale >> 32 << self.shift
            return (((key & _M64) * _MULTIPLIER & _M64) >> 32) * self.groups >> 32 << self.shift
        return key % self.groups * self.mult % self.groups

    def find(self, keys: npt.NDArray[Any], home: Idx | None = None) -> Idx:
        """The slot of each of ``keys`` (``home``: their :meth:`home`, if known), -1 where absent.

        Groups of 1: the home slot first, then windows of 8 slots from the slot after it; groups of 8:
        windows of two groups (most keys a group does not hold are in the next one). A key goes on past
        a window only if entries passed each of its slots (groups); the last few keys are looked for in
        plain Python.
        """
        m = len(keys)
        if not m:
            return np.empty(0, np.intp)
        start = self.home(keys) if home is None else home
        rows_of: Idx | None = None  # the rows of out the current keys are (None: all)
        check = self._own_live and np.count_nonzero(keys) < m  # key 0 matches freed slots: check those are live
        if not self.shift:  # the home slot first
            hit = self.keys[start] == keys
            if check:
                hit &= self.live[start] != 0
            out = np.where(hit, start, -1)
            more = self.over[start] != 0
            more[hit] = False
            rows_of = more.nonzero()[0]
            if not len(rows_of):
                return out
            keys, start = keys[rows_of], start[rows_of] + 1
        else:
            out = np.full(m, -1, np.intp)
        length, shift = self.length, self.shift
        offsets = _TWO_GROUPS if shift else _OFFSETS
        for lap in range(length // _WINDOW + 2):
            if len(keys) <= _FEW and rows_of is not None:
                for j, k, s in zip(rows_of.tolist(), keys.tolist(), start.tolist(), strict=True):
                    out[j] = self._find_one(k, s)
                return out
            window = start[:, None] + offsets
            if lap:  # (a first window, from a home or the slot after it, ends before the table does)
                window %= length
            match = self.keys.take(window) == keys[:, None]
            if check:
                match &= self.live.take(window) != 0
            rows, cols = match.nonzero()  # at most one live copy of a key
            if len(rows):
                out[rows if rows_of is None else rows_of[rows]] = window[rows, cols]
                if len(rows) == len(keys):
                    return out
            # not in the window: further on only if entries passed each of its slots (its groups)
            if shift:
                more = self.over[window[:, 0] >> shift] != 0
                more &= self.over[window[:, _WINDOW] >> shift] != 0
            else:
                more = (self.over.take(window) == 0).view(np.uint64).ravel() == 0  # (8 bools make one uint64)
            more[rows] = False
            rest = more.nonzero()[0]
            if not len(rest):
                return out
            rows_of = rest if rows_of is None else rows_of[rest]
            keys = keys[rest]
            start = (window[rest, -1] + 1) % length
        return out

    def _find_one(self, key: int, s: int) -> int:
        """The slot of ``key`` (a signed 64-bit int), probing from slot ``s`` on, -1 when absent."""
        keys, live, over, length = self._keys_mv, self._live_mv, self._over_mv, self.length
        mask = (1 << self.shift) - 1
        laps = 0
        while True:
            if keys[s] == key and live[s]:
                return s
            s += 1
            if not s & mask:
                if not over[(s >> self.shift) - 1]:
                    return -1
                if s == length:
                    s = 0
                    laps += 1
                    if laps > 1:
                        return -1

    def find_one(self, key: int) -> int:
        """The slot of ``key`` (any int, taken modulo 2**64), -1 when absent."""
        k = key if -_HALF <= key < _HALF else _signed64(key)
        return self._find_one(k, self.home_of(k))

    def delete_one(self, slot: int) -> None:
        """:meth:`delete` of one slot, in plain Python."""
        self._count_one(self.home_of(self._keys_mv[slot]), slot, -1)
        self._keys_mv[slot] = 0
        if self._own_live:
            self._live_mv[slot] = 0

    def _count_one(self, home: int, slot: int, step: int) -> None:
        shift = self.shift
        g = home >> shift
        end = slot >> shift
        if g == end:
            return
        over, groups = self._over_mv, len(self.over)
        while g != end:
            v = over[g]
            if v != _SATURATED:
                over[g] = v + step
            g += 1
            if g == groups:
                g = 0

    def insert(self, keys: npt.NDArray[Any], fill: Any, home: Idx | None = None) -> Idx:
        """Take a free slot for each of ``keys`` (distinct, none of them present) by writing ``fill``
        into ``live`` there (nothing more when ``live`` is ``keys``); return the slots.

        In rounds, each key reads a window from where it is (its home, first): 8 slots with groups of
        1, two groups with groups of 8 (a full home group is common at high load, two in a row are
        not). It claims the window's first free slot, or goes on after the window when it has none.
        Keys claiming the same slot: the write that lands wins, the others look again from there. Each
        round adds the slots (groups) the keys passed to the pass-over counts; the last few keys are
        placed in plain Python.
        """
        m = len(keys)
        if not m:
            return np.empty(0, np.intp)
        start = self.home(keys) if home is None else home
        table, live, length, shift = self.keys, self.live, self.length, self.shift
        slots = np.empty(0, np.intp)  # (made if some keys need another round)
        rows_of: Idx | None = None  # the rows of slots the current keys are (None: all)
        for lap in range(length + m):
            n = len(keys)
            # (from a home, a window ends before the table does: the 8 spare slots, the spare group)
            window = start[:, None] + (_TWO_GROUPS if shift else _OFFSETS)
            if lap:
                window %= length
            free = np.logical_not(live.take(window))
            first = free.argmax(axis=1)  # (0 without room)
            claim: Idx = start + first
            if lap:
                claim %= length
            word = free.view(np.uint64)  # (8 bools make one uint64)
            room = (word[:, 0] | word[:, 1] if shift else word.ravel()).astype(bool)
            n_room = np.count_nonzero(room)
            if n_room == n:
                table[claim] = keys
            elif n_room:
                table[claim[room]] = keys[room]
            won = table[claim] == keys  # (without room: another key's slot, the first read)
            n_won = np.count_nonzero(won)
            if self._own_live:
                live[claim if n_won == n else claim[won]] = fill
            if shift:  # passed over: the first group, when the slot is in the second; both without room
                if n_room == n:
                    at = start[first >= _WINDOW]
                else:
                    first[~room] = _WINDOW
                    at = np.concatenate([start[first >= _WINDOW], window[~room, _WINDOW]])
                if len(at):
                    at >>= shift
                    self._bump(at)
            else:  # passed over: the slots before the one claimed, the 8 of the window without room
                if n_room < n:
                    first[~room] = _WINDOW
                if np.count_nonzero(first) > _FEW_RUNS:
                    self._add(window[first[:, None] > _OFFSETS], 1)
                else:
                    moved = first.nonzero()[0]
                    if len(moved):
                        self._count_runs(start[moved], first[moved], 1)
            if n_won == n:
                if rows_of is None:
                    return claim
                slots[rows_of] = claim
                return slots
            if rows_of is None:
                slots = claim
            else:
                slots[rows_of] = claim
            lost = (~won).nonzero()[0]
            # on from the slot claimed (its group, with groups of 8), or after a window without room
            if len(lost) <= _FEW:
                for j in lost.tolist():
                    s = int(claim[j]) & ~((1 << shift) - 1) if room[j] else (int(window[j, -1]) + 1) % length
                    slot = self._place_one(int(keys[j]), s, fill)
                    self._count_one(s, slot, 1)
                    slots[j if rows_of is None else rows_of[j]] = slot
                return slots
            on = np.where(room, claim & ~((1 << shift) - 1), window[:, -1] + 1)[lost]
            on %= length
            rows_of, keys, start = lost if rows_of is None else rows_of[lost], keys[lost], on
        raise RuntimeError("prefix index: hash table full")  # callers keep the entries below the size

    def _place_one(self, key: int, s: int, fill: Any) -> int:
        live, length = self._live_mv, self.length
        s %= length
        for _ in range(length):
            if not live[s]:
                self._keys_mv[s] = key
                if self._own_live:
                    live[s] = int(fill)
                return s
            s += 1
            if s == length:
                s = 0
        raise RuntimeError("prefix index: hash table full")  # callers keep the entries below the size

    def delete(self, slots: Idx, keys: npt.NDArray[Any] | None = None, live: bool = True) -> None:
        """Free ``slots`` (distinct, taken; ``keys``: the keys there, if read already; ``live``: False if
        the owner has already set ``live`` to 0 there)."""
        if len(slots):
            self._uncount(self.home_group(self.keys[slots] if keys is None else keys), slots)
            self.keys[slots] = 0
            if live and self._own_live:
                self.live[slots] = 0

    def clear(self) -> None:
        self.keys.fill(0)
        self.over.fill(0)
        self.live.fill(0)

    def _bump(self, at: Idx) -> None:
        """Add 1 to the pass-over counts of the groups ``at``, once per occurrence (see :meth:`_add`)."""
        if len(at) <= _FEW_RUNS:
            over = self._over_mv
            for g in at.tolist():
                v = over[g]
                if v != _SATURATED:
                    over[g] = v + 1
        else:
            self._add(at, 1)

    def _count_runs(self, first: Idx, lengths: Idx, step: int) -> None:
        """Add ``step`` (1 or -1) to the pass-over counts of the groups ``first[j]`` to ``first[j] +
        lengths[j] - 1`` (modulo their number; lengths > 0), for each ``j`` (see :meth:`_add`)."""
        groups = len(self.over)
        if len(first) <= _FEW_RUNS:
            over = self._over_mv
            for g0, d in zip(first.tolist(), lengths.tolist(), strict=True):
                for g in range(g0, g0 + d):
                    if g >= groups:
                        g -= groups
                    v = over[g]
                    if v != _SATURATED:
                        over[g] = v + step
        else:
            at = _runs(first, lengths)
            at %= groups
            self._add(at, step)

    def _add(self, at: Idx, step: int) -> None:
        """Add ``step`` (1 or -1) to the pass-over counts of the groups ``at``, once per occurrence. A count
        at the top stays there. (A few are changed in plain Python by the callers.)"""
        over = self.over
        if step < 0:
            np.subtract.at(over, at[over[at] != _SATURATED], _ONE16)
        elif int(over[at].max()) + len(at) < _SATURATED:
            np.add.at(over, at, _ONE16)
        else:  # (some count may reach the top)
            u, times = np.unique(at, return_counts=True)
            over[u] = np.minimum(over[u].astype(np.int64) + times, _SATURATED)

    def _uncount(self, home: Idx, slots: Idx) -> None:
        """Take 1 from the pass-over counts of the groups from each home group to the one before its
        slot's (entries about to go)."""
        gap = (slots >> self.shift if self.shift else slots) - home  # (negative if the probe wrapped around)
        moved = gap.nonzero()[0]
        if len(moved):
            gap = gap[moved]
            gap %= len(self.over)
            self._count_runs(home[moved], gap, -1)


class _Order:
    """The order of a table's entries, oldest first (module docstring): a ring ``log`` of slots and,
    per slot, ``pos``: 1 + its position in the log (positions count up; the ring index is the
    position modulo the log's length), 0 for no entry, ``_DETACHED`` while being moved."""

    __slots__ = ("_log_mv", "_pos_mv", "head", "log", "pos", "tail")

    def __init__(self, pos: npt.NDArray[np.uint32], capacity: int) -> None:
        self.pos = pos
        self.log = _committed(capacity + max(capacity // 4, 64), np.uint32)
        self.head = 0  # position of the oldest log entry (live or not)
        self.tail = 0  # position the next entry gets
        self._pos_mv = pos.data
        self._log_mv = self.log.data

    def push(self, slots: Idx) -> None:
        """Append ``slots``, the last the most recent (an older entry of one of them becomes stale)."""
        n = len(slots)
        length = len(self.log)
        if self.tail + n - self.head > length or self.tail + n >= _LAST_POSITION:
            self.pos[slots] = _DETACHED  # their older entries, if any, go too
            self._compact()
        t = self.tail
        i = t % length
        if i + n <= length:
            self.log[i:i + n] = slots
        else:
            k = length - i
            self.log[i:] = slots[:k]
            self.log[:n - k] = slots[k:]
        self.pos[slots] = np.arange(t + 1, t + n + 1, dtype=np.uint32)
        self.tail = t + n

    def detach(self, slots: Idx) -> None:
        self.pos[slots] = _DETACHED

    def drop(self, slots: Idx) -> None:
        self.pos[slots] = 0

    def oldest(self, n: int) -> Idx:
        """Take the ``n`` oldest entries out of the order; their slots, oldest first."""
        log, pos = self.log, self.pos
        length = len(log)
        head, tail = self.head, self.tail
        i = head % length
        if i + n <= length and head + n <= tail:  # the n oldest log entries, if none of them is stale (most often)
            slots = log[i:i + n].astype(np.intp)
            if np.count_nonzero(pos[slots] == np.arange(head + 1, head + n + 1, dtype=np.uint32)) == n:
                self.head = head + n
                pos[slots] = 0
                return slots
        parts: list[npt.NDArray[np.uint32]] = []
        need = n
        while need > 0:
            i = head % length
            end = min(tail, head + 2 * need + 64, head + length - i)  # not past the tail nor the ring's end
            if end <= head:
                raise RuntimeError("prefix index: fewer entries in the log than counted")
            seg = log[i:i + end - head]
            alive = (pos.take(seg) == np.arange(head + 1, end + 1, dtype=np.uint32)).nonzero()[0]
            if len(alive) >= need:
                alive = alive[:need]
                head += int(alive[-1]) + 1
            else:
                head = end
            parts.append(seg.take(alive))
            need -= len(alive)
        self.head = head
        slots = (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.intp)
        pos[slots] = 0
        return slots

    def clear(self) -> None:
        self.pos.fill(0)
        self.head = self.tail = 0

    def _compact(self) -> None:
        """Renumber the live entries 1, 2, ... at the front of the log (stale ones go)."""
        length = len(self.log)
        i, n = self.head % length, self.tail - self.head
        seg = np.concatenate([self.log[i:i + n], self.log[:max(0, i + n - length)]])
        alive = seg[self.pos.take(seg) == np.arange(self.head + 1, self.tail + 1, dtype=np.uint32)]
        k = len(alive)
        self.log[:k] = alive
        self.pos[alive] = np.arange(1, k + 1, dtype=np.uint32)
        self.head, self.tail = 0, k


class _ReplicaLru:
    """One replica's LRU: a table of holders slots (stored + 1, so 0 is free) and their order."""

    __slots__ = ("capacity", "count", "order", "scale", "table")

    def __init__(self, capacity: int, holders_slots: int) -> None:
        self.capacity = capacity
        self.table = _Table(capacity, _LRU_LOAD, np.uint32, group=8, key_range=holders_slots + 1)
        self.scale = self.table._scale or 0  # home group of key k: k * scale >> 32
        self.order = _Order(_committed(len(self.table.keys), np.uint32), capacity)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.order.pos.nbytes + self.order.log.nbytes

    def clear(self) -> None:
        self.table.clear()
        self.order.clear()
        self.count = 0


def _mask_lookup(table: _Table, masks: npt.NDArray[Any]) -> Callable[[int], int]:
    """``get(h)``: the holders bitmask of block hash ``h`` (0 when absent), one key at a time, in
    plain Python on small ints (``table`` has groups of one slot; ``PrefixIndex.match`` has a copy
    of this loop inline)."""
    keys, over = table._keys_mv, table._over_mv
    n, c, length = table.groups, table.mult, table.length
    lo, hi = -_HALF, _HALF
    if masks.ndim == 1:
        values = masks.data

        def get(h: int) -> int:
            s = h % n * c % n
            wrapped = False
            while True:
                if keys[s] == h and (h or values[s]):  # (a free slot holds key 0)
                    return values[s]
                if not over[s]:
                    return 0 if lo <= h < hi else get(_signed64(h))  # another int: as its 64-bit key
                s += 1
                if s == length:
                    if wrapped:  # a whole lap: every slot passed over (cannot happen while one is free)
                        return 0
                    s, wrapped = 0, True

        return get
    raw = masks.data.cast("B")
    width = masks.shape[1] * 8

    def get_wide(h: int) -> int:
        s = h % n * c % n
        wrapped = False
        while True:
            if keys[s] == h and (h or any(raw[s * width:(s + 1) * width])):
                return int.from_bytes(raw[s * width:(s + 1) * width], "little")
            if not over[s]:
                return 0 if lo <= h < hi else get_wide(_signed64(h))
            s += 1
            if s == length:
                if wrapped:
                    return 0
                s, wrapped = 0, True

    return get_wide


class PrefixIndex:
    """A router-side mirror of what each replica probably caches: an LRU of block hashes per replica.

    The router records the blocks of every request it sends (``record``), and forgets the least
    recently used blocks of a replica beyond ``capacity_blocks`` (the replica's KV size), the way
    the replica's own LRU would. This is GORGO-proxy's "mirror of what the proxy sent where"; KV
    events from the engine can correct it (``remove``).

    A prompt's blocks are recorded last-to-first (as if touched one by one in that order), so its
    first blocks are the most recent: when a replica's cache fills, the tails of old prompts go
    first, as in vLLM, which frees a request's blocks in reverse. A block repeated within a prompt
    takes the recency of its first position. Lookups use a hash -> holders bitmask: a miss on the
    first block costs one lookup whatever the number of replicas, and a match of any length costs a
    bisection per point where some replica drops out (one vectorised pass over the prompt once
    ``remove`` has broken the nesting).

    Storage is fixed by the capacities (module docstring: about 40 B per entry with up to 8
    replicas); hashes are taken modulo 2**64. ``record`` and ``remove`` also take an int64 array.
    """

    def __init__(self, capacity_blocks: Mapping[str, int]) -> None:
        self._capacity = {rid: max(0, int(c)) for rid, c in capacity_blocks.items()}
        self._ids = list(self._capacity)
        self._index = {rid: i for i, rid in enumerate(self._ids)}
        n = len(self._ids)
        total = sum(self._capacity.values())
        self._wide = n > 64
        if not self._wide:
            dtype = np.uint8 if n <= 8 else np.uint16 if n <= 16 else np.uint32 if n <= 32 else np.uint64
            self._holders = _Table(total, _HOLDERS_LOAD, np.int64, dtype)
            self._masks: npt.NDArray[Any] = self._holders.live  # holders bitmask per slot; 0 at -1
            self._bits: list[Any] = [dtype(1 << i) for i in range(n)]
            self._unbits: list[Any] = [dtype(~(1 << i) & (1 << 8 * np.dtype(dtype).itemsize) - 1) for i in range(n)]
            self._fill: Any = None
        else:  # 64 replicas per uint64 word; the table's own live flag says which slots are taken
            self._holders = _Table(total, _HOLDERS_LOAD, np.int64, np.uint8)
            self._masks = _committed((len(self._holders.keys), -(-n // 64)), np.uint64)
            self._bits = [np.uint64(1 << (i & 63)) for i in range(n)]
            self._unbits = [np.uint64(~(1 << (i & 63)) & _M64) for i in range(n)]
            self._fill = np.uint8(1)
        self._replicas = [_ReplicaLru(self._capacity[rid], self._holders.length) for rid in self._ids]
        self._nested = True  # no block was removed out of LRU order: holders shrink along a prompt
        self._get = _mask_lookup(self._holders, self._masks)
        self._masks_mv = self._masks.data
        h = self._holders  # what match's inline lookup reads
        self._probe = (h._keys_mv, h._over_mv, self._masks_mv, h.groups, h.mult, h.length)

    @property
    def nbytes(self) -> int:
        """Bytes of every array the index keeps (fixed at construction)."""
        own = self._holders.nbytes + (self._masks.nbytes if self._wide else 0)
        return own + sum(r.nbytes for r in self._replicas)

    def record(self, replica: str, block_hashes: Sequence[int] | Keys) -> None:
        """Mark ``block_hashes`` as cached on ``replica``, the first block the most recently used."""
        i = self._index[replica]
        if not len(block_hashes):
            return
        lru = self._replicas[i]
        if len(block_hashes) <= _ONE_BY_ONE and not self._wide:
            self._record_one_by_one(i, block_hashes.tolist() if isinstance(block_hashes, np.ndarray) else block_hashes)
            return
        keys = _first_occurrences(as_keys(block_hashes))
        if len(keys) > lru.capacity:  # only the first `capacity` blocks stay, everything older goes
            self._forget_all(i)
            keys = keys[:lru.capacity]
            if not len(keys):
                return
        m = len(keys)
        home = self._holders.home(keys)
        hs = self._holders.find(keys, home)
        held = self._held_by(hs, i)
        n_held = np.count_nonzero(held)
        if n_held == m:  # all there already: only their order changes
            lru.order.push(lru.table.find(_lru_keys(hs))[::-1])
            return
        slots: Idx | None = None  # the LRU slot of each key (None while none is held)
        if n_held:  # the keys held move to the recent end; the others (fresh) are added
            fresh = (~held).nonzero()[0]
            old = held.nonzero()[0]
            slots = np.empty(m, np.intp)
            slots[old] = lru.table.find(_lru_keys(hs[old]))
            keys, home, hs = keys[fresh], home[fresh], hs[fresh]
        over = lru.count + len(keys) - lru.capacity
        if over > 0:
            if slots is not None:
                lru.order.detach(slots[old])  # (they are about to be appended: not evicted)
            self._evict(i, over)
        hs = self._hold(i, keys, home, hs)
        new = lru.table.insert(hs + 1, None)  # (the LRU keys: holders slots + 1)
        lru.count += len(keys)
        if slots is None:
            slots = new
        else:
            slots[fresh] = new
        lru.order.push(slots[::-1])

    def _hold(self, i: int, keys: Keys, home: Idx, hs: Idx) -> Idx:
        """Make replica ``i`` a holder of ``keys`` (distinct, not held by it), whose holders slots are
        ``hs`` (-1: none yet, the keys then get an entry; ``home``: their holders home). The slots."""
        unseen = hs < 0
        n_unseen = np.count_nonzero(unseen)
        if n_unseen < len(hs):  # held by other replicas
            self._add_holder(hs[~unseen] if n_unseen else hs, i)
        if n_unseen:
            fill = self._bits[i] if self._fill is None else self._fill
            if n_unseen == len(hs):
                hs = self._holders.insert(keys, fill, home)
                new = hs
            else:
                u = unseen.nonzero()[0]
                new = self._holders.insert(keys[u], fill, home[u])
                hs[u] = new
            if self._wide:
                self._add_holder(new, i)
        return hs

    def _record_one_by_one(self, i: int, block_hashes: Sequence[int] | Keys) -> None:
        """:meth:`record` in plain Python, a block at a time, on memoryviews of the same tables (for
        short prompts this takes fewer steps than the numpy calls of a batch).

        The blocks are touched last to first, each becoming the most recent, and the least recently
        used block goes whenever a new one would exceed the capacity; the state of an LRU depends
        only on the order of the touches, so this ends where the batch path does. The probing,
        placement and pass-over counting are those of :class:`_Table`, written out inline (a new LRU
        entry looks for a free slot of its group from the group's end: batches fill groups from the
        front).
        """
        lru = self._replicas[i]
        cap = lru.capacity
        if not cap:
            return
        holders, table, order = self._holders, lru.table, lru.order
        hkeys, hover, masks = holders._keys_mv, holders._over_mv, self._masks_mv
        hn, hc, hlen = holders.groups, holders.mult, holders.length
        lkeys, lover, llen, lscale = table._keys_mv, table._over_mv, table.length, lru.scale
        lgroups = llen >> 3
        pos, log, loglen = order._pos_mv, order._log_mv, len(order.log)
        head, tail, count = order.head, order.tail, lru.count
        limit = min(head + loglen, _LAST_POSITION) - 1  # the log is compacted before tail gets there
        bit, unbit = 1 << i, ~(1 << i)
        if min(block_hashes) < -_HALF or max(block_hashes) >= _HALF:  # other ints: as 64-bit keys
            block_hashes = [_signed64(h) for h in block_hashes]
        sat = _SATURATED  # (read here: tests lower it)
        for h in reversed(block_hashes):
            # the holders slot of h (linear probing from its home; -1: absent)
            s = home = h % hn * hc % hn
            while not (hkeys[s] == h and (h or masks[s])):
                if not hover[s]:
                    s = -1
                    break
                s = s + 1 if s + 1 < hlen else 0
            if s >= 0 and masks[s] & bit:  # held: find its LRU slot, to append it again
                k = s + 1
                e = (k * lscale >> 32) << 3
                while lkeys[e] != k:
                    e = e + 1 if e + 1 < llen else 0
            else:
                if count < cap:
                    count += 1
                else:  # evict the least recently used (the count stays): the oldest live log entry
                    old = log[head % loglen]
                    head += 1
                    while pos[old] != head:
                        old = log[head % loglen]
                        head += 1
                    pos[old] = 0
                    k = lkeys[old]
                    lkeys[old] = 0
                    g = k * lscale >> 32
                    while g != old >> 3:  # it had passed over groups: not any more
                        if lover[g] != sat:
                            lover[g] -= 1
                        g = g + 1 if g + 1 < lgroups else 0
                    k -= 1  # its holders slot
                    left = masks[k] & unbit
                    masks[k] = left
                    if not left:  # nobody holds it now: free its holders slot
                        g = hkeys[k] % hn * hc % hn
                        hkeys[k] = 0
                        while g != k:
                            if hover[g] != sat:
                                hover[g] -= 1
                            g = g + 1 if g + 1 < hlen else 0
                if s < 0:  # a new holders entry, in the first free slot from home
                    s = home
                    while masks[s]:
                        if hover[s] != sat:
                            hover[s] += 1
                        s = s + 1 if s + 1 < hlen else 0
                    hkeys[s] = h
                    masks[s] = bit
                else:
                    masks[s] |= bit
                k = s + 1  # a new LRU entry: a free slot of its home group, looked for from the group's end
                g = (k * lscale >> 32) << 3  # (batches fill groups from the front)
                e = g + 7
                while lkeys[e] and e != g:
                    e -= 1
                if lkeys[e]:  # the group is full: the first free slot after it, passing over the full groups
                    e = g + 8
                    while lkeys[e]:  # (the slot at -1, after the last, is always free: the scan stops there)
                        e += 1
                    if e == llen:
                        e = 0
                        while lkeys[e]:
                            e += 1
                    g >>= 3
                    while g != e >> 3:
                        if lover[g] != sat:
                            lover[g] += 1
                        g = g + 1 if g + 1 < lgroups else 0
                lkeys[e] = k
            if tail >= limit:  # (head has moved on since limit was set: it may be further now)
                limit = min(head + loglen, _LAST_POSITION) - 1
                if tail >= limit:
                    pos[e] = _DETACHED
                    order.head, order.tail = head, tail
                    order._compact()
                    head, tail = order.head, order.tail
                    limit = min(head + loglen, _LAST_POSITION) - 1
            log[tail % loglen] = e
            tail += 1
            pos[e] = tail
        order.head, order.tail, lru.count = head, tail, count

    def blocks(self, replica: str) -> int:
        """Blocks the mirror holds for ``replica`` (0 for an unknown one)."""
        i = self._index.get(replica)
        return self._replicas[i].count if i is not None else 0

    def remove(self, replica: str, block_hashes: Sequence[int] | Keys) -> None:
        """Forget ``block_hashes`` on ``replica`` (e.g. on a KV ``BlockRemoved`` event; an int64
        array, as :meth:`BoundedHashMap.pop_many` gives, is taken as it is)."""
        self._nested = False
        i = self._index[replica]
        if not len(block_hashes):
            return
        if len(block_hashes) <= _FEW_REMOVED and not self._wide:
            self._remove_one_by_one(i, block_hashes.tolist() if isinstance(block_hashes, np.ndarray) else block_hashes)
            return
        hs = self._holders.find(as_keys(block_hashes))
        hs = hs[self._held_by(hs, i)]
        if not len(hs):
            return
        if _has_duplicates(hs):
            hs = np.unique(hs)
        lru = self._replicas[i]
        lk = _lru_keys(hs)
        ls = lru.table.find(lk)
        lru.order.drop(ls)
        lru.table.delete(ls, lk)
        lru.count -= len(ls)
        self._drop_holder(hs, i)

    def _remove_one_by_one(self, i: int, block_hashes: Sequence[int]) -> None:
        """:meth:`remove` in plain Python, a block at a time (short lists)."""
        holders, lru, masks = self._holders, self._replicas[i], self._masks_mv
        bit = 1 << i
        for h in block_hashes:
            hs = holders.find_one(h)
            if hs < 0 or not masks[hs] & bit:
                continue
            table = lru.table
            ls = table._find_one(hs + 1, table.home_of(hs + 1))
            lru.order._pos_mv[ls] = 0
            table.delete_one(ls)
            lru.count -= 1
            left = masks[hs] & ~bit
            masks[hs] = left
            if not left:
                holders.delete_one(hs)

    def clear(self, replica: str) -> None:
        """Forget everything about ``replica`` (e.g. ``AllBlocksCleared``, or a restart)."""
        self._nested = False
        self._forget_all(self._index[replica])

    def __len__(self) -> int:
        """Blocks recorded over all replicas."""
        return sum(r.count for r in self._replicas)

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        if not self._nested:
            return self._walk(block_hashes)
        # Records always cover a prompt from its first block and evict tails first, so a replica
        # holding block i holds every block before it: the holder set shrinks along the prompt,
        # and each point where it shrinks can be found by bisection.
        out: dict[str, int] = {}
        n = len(block_hashes)
        if n == 0:
            return out
        get = self._get
        mask = get(block_hashes[0])
        if not mask:
            return out
        last = get(block_hashes[n - 1]) if n > 1 else mask
        if self._wide:
            return self._bisect(block_hashes, mask, last, out)
        keys, over, values, size, mult, length = self._probe
        small, big = -_HALF, _HALF
        lo = 0
        while mask:
            if last & mask == mask:
                self._emit(out, mask, n)
                break
            hi, at_hi = n - 1, last  # invariant: all of mask holds block lo, not all hold block hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                h = block_hashes[mid]
                s = h % size * mult % size  # get(h), inline
                while True:
                    if keys[s] == h:
                        got = values[s]
                        break
                    if not over[s]:
                        got = 0
                        break
                    s += 1
                    if s == length:
                        got = get(h)
                        break
                if not got and not (h and small <= h < big):  # 0 (free slots hold it), or not 64-bit
                    got = get(h)
                if got & mask == mask:
                    lo = mid
                else:
                    hi, at_hi = mid, got
            still = at_hi & mask
            self._emit(out, mask & ~still, hi)
            mask = still
            lo = hi
        return out

    def _bisect(self, block_hashes: Sequence[int], mask: int, last: int, out: dict[str, int]) -> dict[str, int]:
        """:meth:`match`'s bisection with ``get`` (the inline lookup is for masks of one word)."""
        get, n, lo = self._get, len(block_hashes), 0
        while mask:
            if last & mask == mask:
                self._emit(out, mask, n)
                break
            hi, at_hi = n - 1, last
            while hi - lo > 1:
                mid = (lo + hi) // 2
                got = get(block_hashes[mid])
                if got & mask == mask:
                    lo = mid
                else:
                    hi, at_hi = mid, got
            still = at_hi & mask
            self._emit(out, mask & ~still, hi)
            mask = still
            lo = hi
        return out

    # ------------------------------------------------------------------ internals
    def _walk(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Longest held prefix per replica: a running AND of the holders along the prompt, block by
        block for the first ``_WALK_ONE_BY_ONE`` blocks (most matches end there), vectorised after."""
        out: dict[str, int] = {}
        n = len(block_hashes)
        if not n:
            return out
        get = self._get
        mask = get(block_hashes[0])
        j = 1
        while mask and j < n and j < _WALK_ONE_BY_ONE:
            still = get(block_hashes[j]) & mask
            if still != mask:
                self._emit(out, mask & ~still, j)
                mask = still
            j += 1
        if mask and j < n:
            masks = self._masks[self._holders.find(as_keys(block_hashes[j:]))]  # (absent: the 0 row at -1)
            run = np.bitwise_and.accumulate(masks, axis=0)
            differs = run[1:] != run[:-1]
            if self._wide:
                differs = differs.any(axis=1)
            for k in [0, *(differs.nonzero()[0] + 1).tolist()]:
                still = (int.from_bytes(run[k].tobytes(), "little") if self._wide else int(run[k])) & mask
                if still != mask:
                    self._emit(out, mask & ~still, j + k)
                    mask = still
                    if not mask:
                        return out
        if mask:
            self._emit(out, mask, n)
        return out

    def _emit(self, out: dict[str, int], bits: int, n: int) -> None:
        ids = self._ids
        while bits:
            low = bits & -bits
            out[ids[low.bit_length() - 1]] = n
            bits ^= low

    def _held_by(self, hs: Idx, i: int) -> npt.NDArray[np.bool_]:
        """Whether replica ``i`` holds each holders slot (-1: no)."""
        held: npt.NDArray[np.bool_]
        if self._wide:
            held = (self._masks[hs, i >> 6] & self._bits[i]).astype(bool)
        else:
            held = (self._masks[hs] & self._bits[i]).astype(bool)
        return held

    def _add_holder(self, hs: Idx, i: int) -> None:
        """Set replica ``i``'s bit at holders slots ``hs`` (distinct)."""
        if self._wide:
            self._masks[hs, i >> 6] |= self._bits[i]
        else:
            self._masks[hs] |= self._bits[i]

    def _drop_holder(self, hs: Idx, i: int) -> None:
        """Clear replica ``i``'s bit at holders slots ``hs`` (distinct); free those nobody holds now."""
        if self._wide:
            self._masks[hs, i >> 6] &= self._unbits[i]
            gone = hs[~self._masks[hs].any(axis=1)]
            self._holders.delete(gone)
        else:
            left = self._masks[hs] & self._unbits[i]
            self._masks[hs] = left  # (where nobody is left, the slot is free: its key and counts remain)
            self._holders.delete(hs[left == 0] if np.count_nonzero(left) else hs, live=False)

    def _evict(self, i: int, n: int) -> None:
        """Forget replica ``i``'s ``n`` least recently used blocks."""
        lru = self._replicas[i]
        ls = lru.order.oldest(n)
        k = lru.table.keys[ls]  # their holders slots + 1
        lru.table.delete(ls, k)
        lru.count -= n
        self._drop_holder(k - 1, i)

    def _forget_all(self, i: int) -> None:
        lru = self._replicas[i]
        if lru.count:
            keys = lru.table.keys
            self._drop_holder(keys[keys.nonzero()[0]].astype(np.intp) - 1, i)
        lru.clear()


def _lru_keys(holders_slots: Idx) -> npt.NDArray[np.uint32]:
    return (holders_slots + 1).astype(np.uint32)


class BoundedHashMap:
    """At most ``capacity`` entries int -> int in fixed-size tables; past it, the oldest insertions go.

    Keys are taken modulo 2**64, values are signed 64-bit ints. It behaves as a dict that
    :meth:`update` fills and then trims from its front: updating a key's value does not make it
    newer. Memory, allocated at construction: ``capacity / 0.75`` slots of key, value and log
    position (20 B), a 2 B count per 8 slots, and the ring log (4 B x 5/4): 32 B per entry of
    capacity.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._table = _Table(self.capacity, _MAP_LOAD, np.int64, np.uint32, group=8)
        self._order = _Order(self._table.live, self.capacity)
        self._values = _committed(len(self._table.keys), np.int64)
        self._values_mv = self._values.data
        self._count = 0

    @property
    def nbytes(self) -> int:
        """Bytes of every array the map keeps (fixed at construction)."""
        return self._table.nbytes + self._values.nbytes + self._order.log.nbytes

    def __len__(self) -> int:
        return self._count

    def get(self, key: int, default: int) -> int:
        """The value of ``key``, or ``default``."""
        s = self._table.find_one(key)
        return int(self._values_mv[s]) if s >= 0 else default

    def update(self, keys: Sequence[int] | npt.NDArray[Any], values: Sequence[int] | npt.NDArray[Any]) -> None:
        """Set ``keys[j]`` to ``values[j]`` in order (a repeated key keeps its last value), then drop the
        oldest entries beyond the capacity."""
        k, v = as_keys(keys), as_keys(values)
        if len(k) != len(v):
            raise ValueError(f"{len(k)} keys but {len(v)} values")
        if not len(k):
            return
        if _has_duplicates(k):  # first positions, last values
            uniq, first = np.unique(k, return_index=True)
            _, last_reversed = np.unique(k[::-1], return_index=True)
            by_first = np.argsort(first)
            k, v = uniq[by_first], v[len(v) - 1 - last_reversed[by_first]]
        home = self._table.home(k)
        slots = self._table.find(k, home)
        present = (slots >= 0).nonzero()[0]
        fresh = (slots < 0).nonzero()[0]
        if len(fresh) >= self.capacity:  # the new keys alone fill it: only the last of them stay
            self.clear()
            keep = fresh[len(fresh) - self.capacity:]
            self._add(k[keep], v[keep], home[keep])
            return
        over = self._count + len(fresh) - self.capacity
        if over > 0:
            gone = self._order.oldest(over)
            self._table.delete(gone)
            self._count -= over
            present = present[self._order.pos.take(slots[present]) != 0]  # some may have just gone
        self._values[slots[present]] = v[present]
        self._add(k[fresh], v[fresh], home[fresh])

    def pop_many(self, keys: Sequence[int] | npt.NDArray[Any]) -> Keys:
        """``keys`` (as :func:`as_keys`) with each present key replaced by its value, and those entries
        removed: what ``[d.pop(key, key) for key in keys]`` gives (a repeated key is replaced once)."""
        if len(keys) <= _FEW_REMOVED:
            return np.fromiter(map(self._pop_one, keys.tolist() if isinstance(keys, np.ndarray) else keys), np.int64,
                               len(keys))
        k = as_keys(keys)
        out = k.copy()
        if not self._count or not len(k):
            return out
        slots = self._table.find(k)
        hit = (slots >= 0).nonzero()[0]
        if not len(hit):
            return out
        s = slots[hit]
        if _has_duplicates(s):
            _, first = np.unique(s, return_index=True)
            hit = hit[np.sort(first)]
            s = slots[hit]
        out[hit] = self._values.take(s)
        self._order.drop(s)
        self._table.delete(s)
        self._count -= len(s)
        return out

    def _pop_one(self, key: int) -> int:
        """``d.pop(key, key)`` (as a 64-bit key)."""
        k = key if -_HALF <= key < _HALF else _signed64(key)
        if not self._count:
            return k
        s = self._table.find_one(k)
        if s < 0:
            return k
        value: int = self._values_mv[s]
        self._table.delete_one(s)  # (its log position, the table's live value, goes to 0 too)
        self._count -= 1
        return value

    def clear(self) -> None:
        if self._count:
            self._table.clear()
            self._order.clear()
            self._count = 0

    def _add(self, keys: Keys, values: Keys, home: Idx) -> None:
        if len(keys):
            s = self._table.insert(keys, _DETACHED, home)
            self._values[s] = values
            self._order.push(s)
            self._count += len(s)
