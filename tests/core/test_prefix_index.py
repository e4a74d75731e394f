"""PrefixIndex and BoundedHashMap against straightforward dict-based references.

Prompts are chained (a block's value stands for the whole prefix up to it, as the router's hashes
do), so a replica holding a block holds the blocks before it unless ``remove`` cut it out, which is
what the index's bisection assumes; the reference always walks block by block. Block values come
from a pool with the edge cases of the 64-bit keys: 0 (the value of a free slot), -1, the ends of
the signed range, and ints outside it that equal others modulo 2**64 only when meant to.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Sequence
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.core import prefix_index
from isthmus.core.prefix_index import BoundedHashMap, PrefixIndex

M64 = 1 << 64
EDGE = [0, -1, 1, 2**63 - 1, 2**63, 2**64 + 5, 3 * 2**64 + 7, 2**200 + 9, -(2**63) + 11]  # distinct mod 2**64


class ReferenceIndex:
    """Per replica, a dict used as an LRU (oldest first); ``match`` walks block by block."""

    def __init__(self, capacity: dict[str, int]) -> None:
        self.capacity = {r: max(0, c) for r, c in capacity.items()}
        self.lru: dict[str, dict[int, None]] = {r: {} for r in capacity}

    def record(self, r: str, hashes: Sequence[int]) -> None:
        lru = self.lru[r]
        for h in reversed(hashes):  # each block touched, the first one last
            lru.pop(h % M64, None)
            lru[h % M64] = None
        while len(lru) > self.capacity[r]:
            del lru[next(iter(lru))]

    def remove(self, r: str, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.lru[r].pop(h % M64, None)

    def clear(self, r: str) -> None:
        self.lru[r].clear()

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        out = {}
        for r, lru in self.lru.items():
            n = 0
            while n < len(hashes) and hashes[n] % M64 in lru:
                n += 1
            if n:
                out[r] = n
        return out

    def blocks(self, r: str) -> int:
        return len(self.lru.get(r, {}))

    def __len__(self) -> int:
        return sum(len(lru) for lru in self.lru.values())


class Chains:
    """Block values for token prompts: one value per distinct prefix (edge values first)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = self.rng.sample(EDGE, len(EDGE))
        self.ids: dict[tuple[int, ...], int] = {}

    def __call__(self, tokens: Sequence[int]) -> list[int]:
        out = []
        for i in range(1, len(tokens) + 1):
            key = tuple(tokens[:i])
            if key not in self.ids:
                k = len(self.ids)
                self.ids[key] = self.pool[k] if k < len(self.pool) else self.rng.getrandbits(64) - 2**63
            out.append(self.ids[key])
        return out


tokens = st.lists(st.integers(0, 2), max_size=9)
op = st.tuples(st.sampled_from(["record", "record", "record", "remove", "clear"]), st.integers(0, 3), tokens,
               st.integers(0, 2**16))


def expected_counts(table: prefix_index._Table) -> list[int]:
    """The pass-over counts of ``table`` recomputed from its entries."""
    taken = [s for s in range(table.length) if table.live[s]]
    homes = table.home(table.keys[taken]) >> table.shift
    counts = [0] * len(table.over)
    for home, slot in zip(homes.tolist(), taken, strict=True):
        g = home
        while g != slot >> table.shift:
            counts[g] += 1
            g = (g + 1) % len(counts)
    return counts


def check_tables(index: PrefixIndex) -> None:
    """What the index keeps agrees with itself: exact pass-over counts, one LRU entry per holder bit."""
    holders = index._holders
    assert holders.over.tolist() == expected_counts(holders)
    assert not holders.keys[holders.live == 0].any()  # a freed slot's key is 0
    bits = 0
    for i, lru in enumerate(index._replicas):
        assert lru.table.over.tolist() == expected_counts(lru.table)
        slots = lru.table.keys[:lru.table.length].nonzero()[0]
        assert len(slots) == lru.count <= lru.capacity
        assert (lru.order.pos != 0).nonzero()[0].tolist() == slots.tolist()  # a log position iff taken
        assert all(index._held_by(lru.table.keys[slots].astype(int) - 1, i))
        bits += lru.count
    held = sum(bin(int.from_bytes(index._masks[s].tobytes(), "little")).count("1")
               for s in range(holders.length) if holders.live[s])
    assert held == bits


def run_against_reference(capacities: list[int], ops: list[tuple[str, int, list[int], int]], queries: list[list[int]],
                          seed: int, wide: bool = False) -> None:
    replicas = [f"r{i}" for i in range(70 if wide else len(capacities))]
    cap = {r: capacities[i % len(capacities)] for i, r in enumerate(replicas)}
    index, ref, chain = PrefixIndex(cap), ReferenceIndex(cap), Chains(seed)
    for kind, who, toks, pick in ops:
        r = replicas[(who * 23) % len(replicas)]
        hashes = chain(toks)
        if kind == "record":
            index.record(r, hashes)
            ref.record(r, hashes)
        elif kind == "remove":  # some blocks of a prompt, from the middle too (breaks the nesting)
            gone = [h for j, h in enumerate(hashes) if pick >> j & 1]
            index.remove(r, gone)
            ref.remove(r, gone)
        else:
            index.clear(r)
            ref.clear(r)
        for q in queries:
            assert index.match(chain(q)) == ref.match(chain(q))
        assert len(index) == len(ref)
        assert [index.blocks(x) for x in replicas] == [ref.blocks(x) for x in replicas]
    if prefix_index._SATURATED == 0xFFFF:
        check_tables(index)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.lists(op, max_size=40), st.lists(tokens, max_size=4),
       st.integers(0, 2**32))
def test_index_behaves_like_the_reference_one_block_at_a_time(capacities, ops, queries, seed):
    run_against_reference(capacities, ops, queries, seed)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.lists(op, max_size=40), st.lists(tokens, max_size=4),
       st.integers(0, 2**32))
def test_index_behaves_like_the_reference_in_batches(capacities, ops, queries, seed):
    with mock.patch.object(prefix_index, "_ONE_BY_ONE", 0), mock.patch.object(prefix_index, "_FEW_REMOVED", 0):
        run_against_reference(capacities, ops, queries, seed)  # every record and removal through numpy


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=3), st.lists(op, max_size=30), st.lists(tokens, max_size=3),
       st.integers(0, 2**32), st.booleans())
def test_index_with_more_than_64_replicas_behaves_like_the_reference(capacities, ops, queries, seed, batches):
    with mock.patch.object(prefix_index, "_ONE_BY_ONE", 0 if batches else 96):
        run_against_reference(capacities, ops, queries, seed, wide=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=3), st.lists(op, max_size=40), st.lists(tokens, max_size=3),
       st.integers(0, 2**32), st.booleans())
def test_saturated_pass_over_counts_keep_lookups_right(capacities, ops, queries, seed, batches):
    # counts stop at 2 instead of 2**16 - 1 and then stay: lookups go further than needed, never wrong
    with mock.patch.object(prefix_index, "_SATURATED", 2), mock.patch.object(
            prefix_index, "_ONE_BY_ONE", 0 if batches else 96), mock.patch.object(
            prefix_index, "_FEW_REMOVED", 0 if batches else 64):
        run_against_reference(capacities, ops, queries, seed)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.lists(op, max_size=40), st.lists(tokens, max_size=3),
       st.integers(0, 2**32), st.booleans())
def test_dense_tables_behave_like_the_reference(capacities, ops, queries, seed, batches):
    # tables 95 % full at capacity: keys often away from their home, probing often wrapping around
    with mock.patch.object(prefix_index, "_HOLDERS_LOAD", 0.95), mock.patch.object(
            prefix_index, "_LRU_LOAD", 0.95), mock.patch.object(
            prefix_index, "_ONE_BY_ONE", 0 if batches else 96), mock.patch.object(
            prefix_index, "_FEW_REMOVED", 0 if batches else 64):
        run_against_reference(capacities, ops, queries, seed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.lists(op, max_size=40), st.lists(tokens, max_size=3),
       st.integers(0, 2**32), st.integers(1, 8), st.integers(0, 2), st.sampled_from([0, 16]), st.booleans(),
       st.sampled_from([2, 0xFFFF]))
def test_index_behaves_like_the_reference_across_paths(capacities, ops, queries, seed, one_by_one, few, few_runs, dense,
                                                       saturated):
    # prompts up to `one_by_one` blocks go a block at a time and longer ones through numpy, on the same tables;
    # a vectorised round leaves at most `few` keys to plain Python (so several rounds run), pass-over counts
    # change in plain Python for up to `few_runs` entries, through numpy beyond; tables may be 95 % full at
    # capacity, counts may stop at 2
    load = 0.95 if dense else None
    with mock.patch.object(prefix_index, "_ONE_BY_ONE", one_by_one), mock.patch.object(
            prefix_index, "_FEW_REMOVED", one_by_one), mock.patch.object(prefix_index, "_FEW", few), mock.patch.object(
            prefix_index, "_FEW_RUNS", few_runs), mock.patch.object(
            prefix_index, "_HOLDERS_LOAD", load or prefix_index._HOLDERS_LOAD), mock.patch.object(
            prefix_index, "_LRU_LOAD", load or prefix_index._LRU_LOAD), mock.patch.object(
            prefix_index, "_SATURATED", saturated):
        run_against_reference(capacities, ops, queries, seed)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) - 2**63 for _ in range(n)]


@pytest.mark.parametrize(("one_by_one", "others"), [(0, 0), (300, 0), (64, 0), (0, 67), (300, 67)])
def test_long_prompts_and_turnover_against_the_reference(one_by_one, others):
    """Capacities of hundreds of blocks, prompts up to 300 blocks, continued or new: the ring logs
    wrap and get compacted, the tables churn (``others``: more replicas, beyond 64 in all; with
    ``one_by_one`` 64, prompts go either way on the same tables)."""
    rng = random.Random(7)
    cap = {**{f"o{k}": 0 for k in range(others)}, "a": 300, "b": 500, "c": 40}  # a, b, c past bit 64 then
    index, ref = PrefixIndex(cap), ReferenceIndex(cap)
    prompts: list[list[int]] = []
    with mock.patch.object(prefix_index, "_ONE_BY_ONE", one_by_one):
        for step in range(400):
            if prompts and rng.random() < 0.5:
                base = rng.choice(prompts)
                p = base[:rng.randrange(len(base) + 1)] + random_prompt(rng, rng.randrange(0, 200))
            else:
                p = random_prompt(rng, rng.randrange(0, 300))
            prompts.append(p)
            r = rng.choice("abc")
            if step % 17 == 16:
                gone = rng.sample(p, len(p) // 3)
                index.remove(r, gone)
                ref.remove(r, gone)
            else:
                index.record(r, p)
                ref.record(r, p)
            q = rng.choice(prompts)
            assert index.match(q) == ref.match(q)
            assert len(index) == len(ref)
        check_tables(index)


def test_empty_prompts_and_capacity_zero_or_one():
    index = PrefixIndex({"zero": 0, "one": 1})
    index.record("zero", [])
    index.record("zero", [1, 2, 3])
    assert index.match([1, 2, 3]) == {} and index.blocks("zero") == 0
    index.record("one", [5, 6, 7])  # only the first block (the most recent) stays
    assert index.match([5, 6, 7]) == {"one": 1} and len(index) == 1
    index.record("one", [8])
    assert index.match([5]) == {} and index.match([8, 9]) == {"one": 1}
    assert index.match([]) == {}
    index.remove("one", [])
    assert index.match([8]) == {"one": 1}


def test_a_block_repeated_in_a_prompt_takes_the_recency_of_its_first_position():
    for one_by_one in (0, 96):
        with mock.patch.object(prefix_index, "_ONE_BY_ONE", one_by_one):
            index = PrefixIndex({"r": 2})
            index.record("r", [1, 2, 1])  # touched 1, 2, 1: block 1 the most recent
            assert index.blocks("r") == 2
            index.record("r", [3])  # evicts the least recent: block 2
            assert index.match([1]) == {"r": 1} and index.match([2]) == {} and index.match([3]) == {"r": 1}


def test_hashes_are_64_bit_keys():
    index = PrefixIndex({"r": 10})
    index.record("r", [0, -1, 2**63 - 1, -(2**63)])
    assert index.match([0, -1, 2**63 - 1, -(2**63)]) == {"r": 4}
    # the same blocks modulo 2**64
    assert index.match([2**64, 2**64 - 1, 2**63 - 1 + 2**128, 2**63]) == {"r": 4}
    index.record("r", [2**70 + 3])
    assert index.match([3]) == {"r": 1}
    index.remove("r", [2**64 - 1])
    assert index.match([0, -1]) == {"r": 1} and index.blocks("r") == 4


def test_a_block_held_by_many_replicas():
    replicas = {f"r{i}": 4 for i in range(100)}
    index = PrefixIndex(replicas)
    for r in replicas:
        index.record(r, [10, 11])
    assert index.match([10, 11, 12]) == dict.fromkeys(replicas, 2)
    index.remove("r7", [11])
    index.record("r99", [20, 21, 22])  # evicts 11 then 10 from r99 (capacity 4): only 10 stays
    got = index.match([10, 11])
    assert got["r7"] == 1 and got["r99"] == 1 and got["r0"] == 2 and len(got) == 100
    index.clear("r0")
    assert "r0" not in index.match([10])


def test_unknown_replica():
    index = PrefixIndex({"r": 4})
    with pytest.raises(KeyError):
        index.record("nope", [1])
    assert index.blocks("nope") == 0


def test_memory_is_fixed_and_small_per_block():
    cap = {f"r{i}": 20_000 for i in range(4)}
    index = PrefixIndex(cap)
    per_entry = index.nbytes / sum(cap.values())
    assert per_entry <= 40, per_entry
    rng = random.Random(3)
    for k in range(200):  # fill past the capacity
        index.record(f"r{k % 4}", random_prompt(rng, 512))
    size = index.nbytes
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(200):  # the index turns over
            index.record(f"r{k % 4}", random_prompt(rng, rng.choice([8, 64, 512])))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert index.nbytes == size and len(index) == 80_000
    assert grown < 64 * 1024, grown  # nothing kept per block (the last prompt's arrays at most)


class ReferenceMap:
    """A dict trimmed from its front, as the router kept engine names."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.d: dict[int, int] = {}

    def update(self, keys: Sequence[int], values: Sequence[int]) -> None:
        self.d.update(zip((k % M64 for k in keys), values, strict=True))
        for k in list(self.d)[:max(0, len(self.d) - self.capacity)]:
            del self.d[k]

    def pop_many(self, keys: Sequence[int]) -> list[int]:
        return [self.d.pop(k % M64, k % M64) for k in keys]


def signed(k: int) -> int:
    k %= M64
    return k - M64 if k >= 2**63 else k


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 12), st.lists(st.tuples(st.sampled_from(["update", "update", "pop", "clear"]),
                                               st.lists(st.integers(0, 30), max_size=20)), max_size=30),
       st.integers(0, 2**32), st.booleans())
def test_bounded_map_behaves_like_a_trimmed_dict(capacity, ops, seed, batches):
    with mock.patch.object(prefix_index, "_FEW_REMOVED", 0 if batches else 64):
        check_map_against_reference(capacity, ops, seed)


def check_map_against_reference(capacity: int, ops: list[tuple[str, list[int]]], seed: int) -> None:
    rng = random.Random(seed)
    values = [*EDGE, *(rng.getrandbits(64) - 2**63 for _ in range(40))]
    m, ref = BoundedHashMap(capacity), ReferenceMap(capacity)
    for kind, picks in ops:
        keys = [values[p] for p in picks]
        if kind == "update":
            vals = [rng.getrandbits(64) - 2**63 for _ in keys]
            m.update(keys, vals)
            ref.update(keys, vals)
        elif kind == "pop":
            assert m.pop_many(keys).tolist() == [signed(v) for v in ref.pop_many(keys)]
        else:
            m.clear()
            ref.d.clear()
        assert len(m) == len(ref.d) <= capacity
        for v in values[:12]:
            assert m.get(v, -5) == ref.d.get(v % M64, -5)
