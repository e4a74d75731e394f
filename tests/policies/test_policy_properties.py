"""Invariants every registered policy keeps, on random snapshots (hypothesis)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fakes import FakePrefixView, RttTable

from isthmus.core.policy import HOLD, Decision
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot, InstanceView
from isthmus.policies import default_registry

REGIONS = ("east", "west", "south")
POLICIES = default_registry().names()


_VIEW = st.builds(
    lambda region, gpu, running, waiting, rt, qt, kv, healthy, full, age, in_flight, t_p: dict(
        region=region, gpu=gpu, running=running, waiting=waiting, running_tokens=rt,
        queued_prefill_tokens=qt, kv_usage=kv, healthy=healthy, full=full, age=age, in_flight=in_flight,
        prefill_s_per_token=t_p),
    st.sampled_from(REGIONS), st.sampled_from(("A100", "H100")), st.integers(0, 12), st.integers(0, 40),
    st.integers(0, 60_000), st.integers(0, 60_000), st.floats(0.0, 1.0),
    st.sampled_from((True, True, True, False)), st.sampled_from((False, False, False, True)),
    st.sampled_from((0.0, 0.5, 1.0)), st.integers(0, 14), st.sampled_from((math.nan, 5e-5, 9.38e-5, 2e-4)),
)
_RTTS = st.tuples(st.floats(0.005, 0.5), st.floats(0.005, 0.5), st.floats(0.005, 0.5), st.floats(0.0, 0.005))
_SESSION = st.none() | st.sampled_from(("s1", "s2", "conv-9"))


@st.composite
def cases(draw: st.DrawFn) -> tuple[Request, ClusterSnapshot]:
    fields = draw(st.lists(_VIEW, min_size=1, max_size=8))
    vs = [InstanceView(id=f"i{i}", **f) for i, f in enumerate(fields)]
    ew, es, ws, intra = draw(_RTTS)
    rtt = RttTable({("east", "west"): ew, ("east", "south"): es, ("west", "south"): ws}, intra_s=intra)
    prompt = draw(st.integers(1, 4000))
    n_blocks = draw(st.integers(0, prompt // 16))
    matched = draw(st.lists(st.integers(0, n_blocks), min_size=len(vs), max_size=len(vs)))
    prefix = FakePrefixView({v.id: m for v, m in zip(vs, matched, strict=True)})
    request = Request(f"r{draw(st.integers(0, 10**6))}", 0.0, draw(st.sampled_from(REGIONS)), prompt,
                      tuple(range(7, 7 + n_blocks)), draw(st.integers(1, 500)), session=draw(_SESSION))
    snapshot = ClusterSnapshot(now=draw(st.floats(0.0, 1e4)), here=draw(st.sampled_from(REGIONS)),
                               instances={v.id: v for v in vs}, rtt_s=rtt, prefix=prefix,
                               hops=draw(st.integers(0, 2)))
    return request, snapshot


def _valid(d: Decision, snapshot: ClusterSnapshot) -> bool:
    if d.target is None:
        return not d.forward
    if d.forward:
        return (snapshot.hops == 0 and d.target != snapshot.here
                and any(v.available and v.region == d.target for v in snapshot.instances.values()))
    v = snapshot.instances.get(d.target)
    return v is not None and v.available


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_every_policy_picks_only_available_replicas_or_holds_or_forwards_once(case):
    request, snapshot = case
    reg = default_registry()
    for name in POLICIES:
        before = snapshot.prefix.calls  # type: ignore[attr-defined]
        d = reg.create(name, rng=np.random.default_rng(3)).choose(request, snapshot)
        assert _valid(d, snapshot), (name, d)
        assert snapshot.prefix.calls - before <= 1, name  # type: ignore[attr-defined]
        if not d.forward and d.target is not None and not math.isnan(d.estimate.total_s):
            e = d.estimate
            assert e.total_s == e.network_s + e.queue_s + e.prefill_s or math.isclose(
                e.total_s, e.network_s + e.queue_s + e.prefill_s), name
        if any(v.available for v in snapshot.instances.values()) and name in (
                "random", "round_robin", "least_load", "prefix_trie", "cache_aware", "weighted",
                "session_affinity", "preble"):
            assert d.target is not None, name  # these hold only when nothing is available


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(cases(), min_size=1, max_size=8))
def test_decisions_are_reproducible_from_the_seed(steps):
    # snapshots in time order, as a shell gives them
    ordered = sorted(steps, key=lambda c: c[1].now)
    reg = default_registry()
    for name in POLICIES:
        a = reg.create(name, rng=np.random.default_rng(42))
        b = reg.create(name, rng=np.random.default_rng(42))
        got_a = [repr(a.choose(r, s)) for r, s in ordered]
        got_b = [repr(b.choose(r, s)) for r, s in ordered]
        assert got_a == got_b, name


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_no_policy_writes_to_its_snapshot(case):
    """Views and snapshots are plain (not frozen) dataclasses for speed: reading only is a policy's contract."""
    request, snapshot = case
    views = {k: dataclasses.replace(v) for k, v in snapshot.instances.items()}
    fields = {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}
    reg = default_registry()
    for name in POLICIES:
        d = reg.create(name, rng=np.random.default_rng(3)).choose(request, snapshot)
        assert snapshot.instances == views, name
        assert {f: getattr(snapshot, f) for f in fields} == fields, name
        assert Decision(target=None, reason="no replica available") == HOLD, (name, d)
