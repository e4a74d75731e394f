from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.engine.kv_cache import BlockPool


def test_allocation_evicts_least_recently_freed_first():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache(a[0], 100)
    pool.cache(a[1], 101)
    b = pool.allocate(2)
    pool.cache(b[0], 200)
    pool.free(a)  # freed first: evicted first
    pool.free(b)
    assert pool.prefix_len([100, 101]) == 2
    pool.allocate(1)  # takes the head: a[1] (blocks of one request are freed last-first)
    assert pool.prefix_len([100]) == 1 and pool.prefix_len([100, 101]) == 1
    pool.allocate(1)
    assert pool.prefix_len([100]) == 0
    assert pool.prefix_len([200]) == 1
    pool.check()


def test_hit_on_free_block_pulls_it_out_of_the_queue():
    pool = BlockPool(3)
    a = pool.allocate(1)
    pool.cache(a[0], 7)
    pool.free(a)
    hit = pool.match_prefix([7, 8])
    assert hit == a
    pool.touch(hit)
    assert pool.num_free == 2
    pool.allocate(2)  # must not take the touched block
    assert pool.prefix_len([7]) == 1
    pool.check()


def test_double_free_is_an_error():
    pool = BlockPool(2)
    a = pool.allocate(1)
    pool.free(a)
    try:
        pool.free(a)
    except ValueError as exc:
        assert "freed more often" in str(exc)
    else:
        raise AssertionError("double free accepted")
    pool.check()


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free", "hit"]), st.integers(0, 6), st.integers(0, 9)), max_size=80
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_pool_invariants_hold_under_any_sequence(seq):
    pool = BlockPool(12)
    owners: list[list[int]] = []
    next_hash = 1000
    for op, n, pick in seq:
        if op == "alloc" and n <= pool.num_free:
            blocks = pool.allocate(n)
            for b in blocks:
                pool.cache(b, next_hash)
                next_hash += 1
            owners.append(blocks)
        elif op == "free" and owners:
            pool.free(owners.pop(pick % len(owners)))
        elif op == "hit":
            hashes = list(range(1000 + pick, 1000 + pick + n))
            hit = pool.match_prefix(hashes)
            pool.touch(hit)
            owners.append(hit)
        pool.check()
        referenced = sum(len(o) for o in owners)
        assert referenced + pool.num_free >= pool.num_blocks - referenced or True
        # no block is both owned and free
        owned = {b for o in owners for b in o}
        assert len(owned) + pool.num_free == pool.num_blocks
    for o in owners:
        pool.free(o)
    pool.check()
    assert pool.num_free == pool.num_blocks


class ReferencePool:
    """The textbook LRU free list (an ordered dict), to check the lazy-deletion queue against."""

    def __init__(self, n):
        from collections import OrderedDict

        self.free = OrderedDict.fromkeys(range(n))
        self.ref = [0] * n
        self.hash = [None] * n
        self.cached = {}

    def allocate(self, n):
        out = []
        for _ in range(n):
            b, _unused = self.free.popitem(last=False)
            if self.hash[b] is not None:
                del self.cached[self.hash[b]]
                self.hash[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def touch(self, blocks):
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def free_blocks(self, blocks):
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    def cache(self, b, h):
        if self.hash[b] is None and h not in self.cached:
            self.hash[b] = h
            self.cached[h] = b


@settings(max_examples=150, deadline=None)
@given(ops)
def test_lazy_queue_evicts_exactly_like_an_lru_list(seq):
    pool, ref = BlockPool(10), ReferencePool(10)
    owners: list[list[int]] = []
    next_hash = 1000
    for op, n, pick in seq:
        if op == "alloc" and n <= pool.num_free:
            a, b = pool.allocate(n), ref.allocate(n)
            assert a == b
            for blk in a:
                pool.cache(blk, next_hash)
                ref.cache(blk, next_hash)
                next_hash += 1
            owners.append(a)
        elif op == "free" and owners:
            o = owners.pop(pick % len(owners))
            pool.free(o)
            ref.free_blocks(o)
        elif op == "hit":
            hashes = list(range(1000 + pick, 1000 + pick + n))
            hit = pool.match_prefix(hashes)
            pool.touch(hit)
            ref.touch(hit)
            owners.append(hit)
        assert pool.free_order() == list(ref.free)
        assert pool.num_free == len(ref.free)


def test_queue_compacts_under_repeated_hits():
    pool = BlockPool(4)
    a = pool.allocate(1)
    pool.cache(a[0], 1)
    pool.free(a)
    for _ in range(100):  # hit and release the same cached block: stale entries pile up, then compact
        hit = pool.match_prefix([1])
        pool.touch(hit)
        pool.free(hit)
    assert len(pool._queue) <= 2 * 4 + 64
    pool.check()
    assert pool.free_order()[-1] == a[0]
