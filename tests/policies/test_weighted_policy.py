"""weighted: llm-d style scorers in [0, 1], weighted argmax."""

from __future__ import annotations

import pytest
from policy_fakes import FakePrefixView, RttTable, req, snap, view

from isthmus.core.errors import RegistryError
from isthmus.policies import default_registry


def make(**params: object):
    return default_registry().create("weighted", params)


def test_scores_are_the_documented_weighted_sum():
    # a: prefix 50/100, load 4 of max 8, kv 0.5 -> 3*0.5 + 2*0.5 + 2*0.5 = 3.5
    # b: prefix 0, load 8 of 8, kv 0.0       -> 0 + 0 + 2*1 = 2.0
    # c: prefix 0, load 0, kv 0.9            -> 0 + 2 + 2*0.1 = 2.2
    vs = [view("a", running=4, kv_usage=0.5), view("b", running=8), view("c", kv_usage=0.9)]
    d = make().choose(req(prompt=1600), snap(vs, prefix=FakePrefixView({"a": 50})))
    assert d.target == "a"
    assert d.reason == "weighted score 3.500"
    # without the prefix scorer, c wins (2.2 vs 2.0 vs 2.0 * 0.5 + 2 * 0.5 = 2.0)
    d = make(weights={"prefix": 0}).choose(req(prompt=1600), snap(vs, prefix=FakePrefixView({"a": 50})))
    assert d.target == "c"


def test_kv_scorer_breaks_an_otherwise_equal_choice():
    vs = [view("a", kv_usage=0.7), view("b", kv_usage=0.2)]
    assert make().choose(req(), snap(vs)).target == "b"


def test_exact_ties_go_to_lower_rtt_then_snapshot_order():
    rtt = RttTable({("east", "west"): 0.2})
    vs = [view("w", "west"), view("e", "east")]
    assert make().choose(req(origin="east"), snap(vs, rtt=rtt)).target == "e"
    assert make().choose(req(origin="west"), snap(vs, rtt=rtt)).target == "w"
    assert make().choose(req(), snap([view("x"), view("y")])).target == "x"


def test_weights_are_a_partial_mapping_and_checked():
    assert make(weights={"queue": 5}).params.weights.prefix == 3.0
    with pytest.raises(RegistryError, match="weighted"):
        make(weights={"latency": 1})
    with pytest.raises(RegistryError, match="weighted"):
        make(weights={"kv": -1})
    with pytest.raises(RegistryError, match="weighted"):
        make(weights=3)
