"""preble: exploit long prefixes, explore by windowed load, rebalance the heaviest replica."""

from __future__ import annotations

import math

import pytest
from policy_fakes import FakePrefixView, req, snap, view

from isthmus.policies import default_registry

T_P, T_D = 1e-4, 1e-3  # s per prefill token, s per decode token


def make(**params: object):
    return default_registry().create("preble", {"t_p_s": T_P, "t_d_s": T_D, **params})


def test_exploit_takes_the_least_loaded_holder_of_the_longest_prefix():
    vs = [view("a", running=5), view("b", running=2), view("c")]
    # 60 of 100 blocks = 0.6 of the prompt on a and b
    d = make().choose(req(prompt=1600), snap(vs, prefix=FakePrefixView({"a": 60, "b": 60, "c": 10})))
    assert d.target == "b"
    assert d.reason.startswith("exploit")
    assert d.estimate.prefill_s == pytest.approx(T_P * (1600 - 60 * 16))


def test_explore_spreads_by_window_cost_and_prefers_partial_hits():
    pol = make()
    vs = [view("a"), view("b"), view("c")]
    got = [pol.choose(req(f"r{i}", prompt=1600), snap(vs, now=float(i))).target for i in range(3)]
    assert got == ["a", "b", "c"]
    per_request = T_P * 1600 + T_D * 100
    assert pol.window_cost_s("a") == pytest.approx(per_request)
    # equal window loads: a 40 % hit (not enough to exploit) lowers the prefill term
    d = pol.choose(req("r3", prompt=1600), snap(vs, now=3.0, prefix=FakePrefixView({"c": 40})))
    assert d.target == "c" and d.reason.startswith("explore")
    assert d.estimate.queue_s == pytest.approx(per_request)
    assert d.estimate.total_s == pytest.approx(d.estimate.network_s + per_request + T_P * (1600 - 640))


def test_window_forgets_after_three_minutes():
    pol = make()
    vs = [view("a"), view("b")]
    assert pol.choose(req("r0"), snap(vs, now=0.0)).target == "a"
    assert pol.choose(req("r1"), snap(vs, now=100.0)).target == "b"
    # at t = 180.5 the first record (t = 0) is gone, the second is not
    assert pol.choose(req("r2"), snap(vs, now=180.5)).target == "a"
    assert pol.window_cost_s("b") == pytest.approx(T_P * 1600 + T_D * 100)
    pol.choose(req("r3"), snap(vs, now=1000.0))
    assert pol.window_cost_s("b") == 0.0  # exactly: an empty window leaves no residue


def test_rebalance_shifts_traffic_off_the_heaviest_replica():
    pol = make()
    vs = [view("a"), view("b")]
    hot = FakePrefixView({"a": 80})  # 0.8 of a 1600-token prompt, cached on a
    assert pol.choose(req("r0"), snap(vs, now=0.0)).target == "a"  # W(a) = 0.26
    assert pol.choose(req("r1"), snap(vs, now=0.1)).target == "b"  # W(b) = 0.26
    d = pol.choose(req("r2"), snap(vs, now=0.2, prefix=hot))  # W equal: exploit a, W(a) = 0.392
    assert d.target == "a" and d.reason.startswith("exploit")
    d = pol.choose(req("r3"), snap(vs, now=0.3, prefix=hot))  # 0.392 > 1.5 x 0.26: rebalance
    assert d.target == "b" and d.reason.startswith("rebalance")
    assert pol.window_cost_s("b") == pytest.approx(0.26 + T_P * 1600 + T_D * 100)
    # a higher threshold keeps exploiting
    pol = make(rebalance_ratio=2.0)
    for i, p in enumerate((None, None, hot, hot)):
        d = pol.choose(req(f"r{i}"), snap(vs, now=i / 10, prefix=p))
    assert d.target == "a"


def test_prefill_time_comes_from_the_replica_profile_unless_overridden():
    vs = [view("slow", prefill_s_per_token=2e-4), view("fast", prefill_s_per_token=5e-5), view("x")]
    d = default_registry().create("preble").choose(req(prompt=1000), snap(vs))
    assert d.target == "fast"
    assert d.estimate.prefill_s == pytest.approx(5e-5 * 1000)
    d = default_registry().create("preble").choose(req(prompt=1000), snap([view("x")]))
    assert d.estimate.prefill_s == pytest.approx(0.0938e-3 * 1000)
    assert math.isfinite(d.estimate.total_s)
