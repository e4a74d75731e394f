import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.core import InstanceSpec, Request, builtin_perf_model, hash_token_blocks
from isthmus.engine import Replica

PERF = builtin_perf_model("A100", "Mistral-7B")


def _replica(blocks=400, **kw):
    spec = InstanceSpec("r0", "a", "A100", "Mistral-7B", num_kv_blocks=blocks, **kw)
    return Replica(spec, PERF, blocks)


def _req(i, tokens, out, arrival=0.0):
    return Request(f"q{i}", arrival, "a", len(tokens), hash_token_blocks(tokens), out)


class Spy:
    """A perf model that records every step's shape (a real model underneath, not a mock)."""

    def __init__(self):
        self.calls = []

    def step_time(self, *shape):
        self.calls.append(shape)
        return PERF.step_time(*shape)


def _drain(rep, now=0.0, horizon=None, check=True):
    finished, first = [], {}
    while rep.has_work:
        res = rep.step(now, now if horizon is None else horizon)
        now += res.duration
        for rid in res.first_tokens:
            first[rid] = now
        finished += res.finished
        if check:
            rep.check()
    return finished, first, now


def test_single_request_timeline_matches_perf_model():
    rep = _replica()
    rep.add_request(_req(0, list(range(100)), 3), 0.0)
    fin, first, end = _drain(rep)
    prefill = PERF.step_time(100, 100 * 50.0, 1, 0, 0)
    assert math.isclose(first["q0"], prefill)
    d1 = PERF.step_time(0, 0.0, 0, 1, 100)
    d2 = PERF.step_time(0, 0.0, 0, 1, 101)
    assert math.isclose(end, prefill + d1 + d2)
    assert fin[0].first_token_at == first["q0"] and fin[0].finished_at == end


def test_token_budget_chunks_long_prompts():
    spy = Spy()
    spec = InstanceSpec("r0", "a", "A100", "Mistral-7B", num_kv_blocks=400, max_num_batched_tokens=512)
    rep = Replica(spec, spy, 400)
    rep.add_request(_req(0, list(range(1300)), 2), 0.0)
    _drain(rep)
    prefills = [c[0] for c in spy.calls if c[2]]
    assert prefills == [512, 512, 276]


def test_without_chunked_prefill_a_long_prompt_waits_for_an_empty_budget():
    spec = InstanceSpec("r0", "a", "A100", "Mistral-7B", num_kv_blocks=400, max_num_batched_tokens=4096,
                        enable_chunked_prefill=False)
    rep = Replica(spec, PERF, 400)
    rep.add_request(_req(0, list(range(3000)), 5), 0.0)
    rep.add_request(_req(1, list(range(5000, 7000)), 5), 0.0)
    res = rep.step(0.0, 0.0)
    assert res.prefill_tokens == 3000  # the second does not fit the rest of the budget and is not split
    _drain(rep)


def test_cached_prefix_is_not_prefilled_again():
    spy = Spy()
    spec = InstanceSpec("r0", "a", "A100", "Mistral-7B", num_kv_blocks=400)
    rep = Replica(spec, spy, 400)
    shared = list(range(320))
    rep.add_request(_req(0, [*shared, 1, 2, 3], 2), 0.0)
    _drain(rep)
    spy.calls.clear()
    rep.add_request(_req(1, [*shared, 9, 9, 9, 9], 2), 1.0)
    fin, _, _ = _drain(rep, now=1.0)
    assert fin[0].cached_tokens == 320
    assert spy.calls[0][0] == 4  # only the 4 new tokens
    assert rep.prefix_hits_tokens == 320 and rep.prefix_queries_tokens == 323 + 324


def test_full_hit_still_computes_the_last_token():
    rep = _replica()
    toks = list(range(64))
    rep.add_request(_req(0, toks, 1), 0.0)
    _drain(rep)
    rep.add_request(_req(1, toks, 1), 0.0)
    fin, _, _ = _drain(rep)
    assert fin[0].cached_tokens == 48  # at most prompt - 1 tokens hit: 3 of 4 blocks


def test_preemption_recomputes_and_conserves_requests():
    rep = _replica(blocks=40, max_num_seqs=8)
    rng = np.random.default_rng(1)
    for i in range(8):
        rep.add_request(_req(i, list(rng.integers(0, 1000, 150)), 120), 0.0)
    fin, _, _ = _drain(rep)
    assert sorted(f.request.id for f in fin) == sorted(f"q{i}" for i in range(8))
    assert rep.preemptions > 0 and any(f.preemptions for f in fin)
    assert rep.pool.num_free == 40


def test_fused_decode_steps_equal_single_steps():
    def run(horizon):
        rep = _replica()
        rng = np.random.default_rng(3)
        for i in range(6):
            rep.add_request(_req(i, list(rng.integers(0, 1000, int(rng.integers(20, 300)))),
                                 int(rng.integers(1, 90))), 0.0)
        fin, _first, end = _drain(rep, horizon=horizon)
        return {f.request.id: (f.first_token_at, f.finished_at) for f in fin}, end, rep.steps

    single, end1, steps1 = run(None)
    fused, end2, steps2 = run(math.inf)
    assert steps1 == steps2
    assert math.isclose(end1, end2, rel_tol=1e-9)
    for rid, (a, b) in single.items():
        assert math.isclose(fused[rid][0], a, rel_tol=1e-9) and math.isclose(fused[rid][1], b, rel_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 400), st.integers(1, 40), st.integers(0, 3), st.floats(0, 2)),
             min_size=1, max_size=25),
    st.integers(12, 80),
    st.booleans(),
)
def test_engine_invariants(reqs, blocks, fuse):
    """Blocks never leak or double-free, every request finishes once, with its exact output length."""
    rep = _replica(blocks=blocks, max_num_seqs=6, max_num_batched_tokens=256)
    prefixes = [list(range(1000 * k, 1000 * k + 200)) for k in range(4)]
    pending = sorted(
        (arr, i, _req(i, (prefixes[p] + list(range(5000 + i * 500, 5000 + i * 500 + n)))[: max(n, 1)], out, arr))
        for i, (n, out, p, arr) in enumerate(reqs)
    )
    # requests that can never fit in the pool are not offered (vLLM rejects them at admission)
    pending = [x for x in pending if -(-(x[2].prompt_tokens + x[2].max_output_tokens) // 16) <= blocks]
    offered = [x[2].id for x in pending]
    now, done = 0.0, []
    while pending or rep.has_work:
        while pending and pending[0][0] <= now:
            rep.add_request(pending.pop(0)[2], now)
        horizon = pending[0][0] if (fuse and pending) else (math.inf if fuse else now)
        res = rep.step(now, horizon)
        if res is None:
            now = pending[0][0]
            continue
        now += res.duration
        done += res.finished
        rep.check()
    ids = [f.request.id for f in done]
    assert sorted(ids) == sorted(offered)
    assert rep.pool.num_free == blocks
    for f in done:
        assert f.first_token_at <= f.finished_at
        assert f.cached_tokens <= f.request.prompt_tokens - 1


def test_a_request_larger_than_the_cache_is_refused_at_once():
    rep = _replica(blocks=4)
    try:
        rep.add_request(_req(0, list(range(60)), 10), 0.0)
    except ValueError as exc:
        assert "needs 5 KV blocks" in str(exc)
    else:
        raise AssertionError("accepted a request that can never fit")
    assert not rep.has_work


def test_token_tracking_reports_every_sampled_token_once():
    spec = InstanceSpec("r0", "a", "A100", "Mistral-7B", num_kv_blocks=400)
    rep = Replica(spec, PERF, 400, track_tokens=True)
    rep.add_request(_req(0, list(range(100)), 5), 0.0)
    rep.add_request(_req(1, list(range(500, 520)), 3), 0.0)
    counts: dict[str, int] = {}
    now = 0.0
    while rep.has_work:
        res = rep.step(now, math.inf)  # no fusion even with an open horizon
        assert res.num_steps == 1
        for rid in res.sampled:
            counts[rid] = counts.get(rid, 0) + 1
        now += res.duration
    assert counts == {"q0": 5, "q1": 3}
