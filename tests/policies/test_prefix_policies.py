"""prefix_trie and cache_aware: longest cached prefix, SGLang's imbalance switch."""

from __future__ import annotations

import pytest
from policy_fakes import FakePrefixView, RttTable, req, snap, view

from isthmus.policies import default_registry


def make(name: str, **params: object):
    return default_registry().create(name, params)


# ------------------------------------------------------------------------------------------ prefix_trie
def test_prefix_trie_takes_the_longest_prefix_whatever_the_load_and_distance():
    vs = [view("near", "east", running=0), view("far", "west", running=50, waiting=90)]
    s = snap(vs, prefix=FakePrefixView({"near": 10, "far": 60}), rtt=RttTable({("east", "west"): 0.3}))
    d = make("prefix_trie").choose(req(prompt=1600), s)
    assert d.target == "far"
    assert d.estimate.network_s == pytest.approx(0.3)
    assert s.prefix.calls == 1


def test_prefix_trie_never_takes_an_unavailable_holder():
    vs = [view("a", healthy=False), view("b", full=True), view("c")]
    s = snap(vs, prefix=FakePrefixView({"a": 90, "b": 80, "c": 1}))
    assert make("prefix_trie").choose(req(), s).target == "c"
    assert make("prefix_trie").choose(req(), snap([view("a", healthy=False)])).target is None


def test_prefix_trie_ties_go_to_least_load_then_rtt_then_order():
    rtt = RttTable({("east", "west"): 0.1})
    pol = make("prefix_trie")
    # equal matches: least load wins
    vs = [view("a", running=3), view("b", running=1), view("c", running=2)]
    assert pol.choose(req(), snap(vs, prefix=FakePrefixView({"a": 5, "b": 5, "c": 5}))).target == "b"
    # equal matches and loads: lower RTT from the origin wins
    vs = [view("w", "west", running=1), view("e", "east", running=1)]
    assert pol.choose(req(origin="east"), snap(vs, rtt=rtt)).target == "e"
    # all equal: snapshot order
    vs = [view("x"), view("y")]
    assert pol.choose(req(), snap(vs)).target == "x"


# ------------------------------------------------------------------------------------------ cache_aware
def _pair(load_hit: int, load_other: int):
    vs = [view("hit", running=load_hit), view("other", running=load_other)]
    return vs, FakePrefixView({"hit": 80})  # 80 blocks x 16 = 1280 of 1600 tokens = 0.8


def test_cache_aware_follows_the_cache_when_balanced():
    vs, prefix = _pair(20, 0)  # diff 20 <= 32: balanced
    assert make("cache_aware").choose(req(prompt=1600), snap(vs, prefix=prefix)).target == "hit"


def test_cache_aware_switches_to_least_load_when_imbalanced():
    vs, prefix = _pair(100, 10)  # 90 > 32 and 100 > 1.1 x 10
    s = snap(vs, prefix=prefix)
    d = make("cache_aware").choose(req(prompt=1600), s)
    assert d.target == "other"
    assert "imbalanced" in d.reason
    assert s.prefix.calls == 0  # the cache is not even consulted


def test_cache_aware_needs_both_conditions_for_imbalance():
    # absolute difference 35 > 32, but 400 <= 1.1 x 365: balanced, so the cache decides
    vs, prefix = _pair(400, 365)
    assert make("cache_aware").choose(req(prompt=1600), snap(vs, prefix=prefix)).target == "hit"
    # relative 3x, but absolute 20 <= 32: balanced
    vs, prefix = _pair(30, 10)
    assert make("cache_aware").choose(req(prompt=1600), snap(vs, prefix=prefix)).target == "hit"


def test_cache_aware_cli_thresholds_are_parameters():
    vs, prefix = _pair(50, 10)  # imbalanced for the Rust core defaults, not for the CLI's 64 / 1.5
    assert make("cache_aware").choose(req(prompt=1600), snap(vs, prefix=prefix)).target == "other"
    cli = make("cache_aware", balance_abs_threshold=64, balance_rel_threshold=1.5)
    assert cli.choose(req(prompt=1600), snap(vs, prefix=prefix)).target == "hit"


def test_cache_aware_low_match_goes_to_least_load():
    vs = [view("hit", running=5), view("other", running=2)]
    # 50 blocks x 16 = 800 of 1600 = 0.5, not > 0.5
    d = make("cache_aware").choose(req(prompt=1600), snap(vs, prefix=FakePrefixView({"hit": 50})))
    assert d.target == "other"
    d = make("cache_aware", cache_threshold=0.3).choose(req(prompt=1600),
                                                        snap(vs, prefix=FakePrefixView({"hit": 50})))
    assert d.target == "hit"


def test_cache_aware_ignores_unavailable_replicas_in_the_balance():
    # the heavy replica is full: among the candidates the loads are balanced
    vs = [view("heavy", running=500, full=True), view("hit", running=12), view("other", running=10)]
    d = make("cache_aware").choose(req(prompt=1600), snap(vs, prefix=FakePrefixView({"hit": 80, "heavy": 99})))
    assert d.target == "hit"
