"""Registration and typed parameters of the policies."""

from __future__ import annotations

import numpy as np
import pytest

from isthmus.core.errors import RegistryError
from isthmus.policies import default_registry

NEW = ["cache_aware", "gorgo", "gorgo_proxy", "lodestar", "preble", "prefix_trie", "session_affinity", "slo", "weighted"]


def test_registry_holds_the_baselines_and_the_field():
    assert default_registry().names() == sorted(["random", "round_robin", "least_load", *NEW])


@pytest.mark.parametrize("name", NEW)
def test_unknown_parameters_raise_a_registry_error_naming_the_policy(name):
    with pytest.raises(RegistryError, match=rf"{name}.*unknown parameter.*bogus"):
        default_registry().create(name, {"bogus": 1})


@pytest.mark.parametrize(("name", "params"), [
    ("cache_aware", {"cache_threshold": "0.5"}),
    ("cache_aware", {"balance_abs_threshold": 32.5}),
    ("cache_aware", {"balance_abs_threshold": True}),
    ("gorgo_proxy", {"q_hat": None}),
    ("gorgo_proxy", {"max_in_flight": 2.0}),
    ("gorgo", {"local_kv_cap": False}),
    ("session_affinity", {"virtual_nodes": "160"}),
    ("preble", {"window_s": [180]}),
])
def test_wrong_types_are_rejected(name, params):
    with pytest.raises(RegistryError, match=name):
        default_registry().create(name, params)


@pytest.mark.parametrize(("name", "params"), [
    ("cache_aware", {"cache_threshold": 1.5}),
    ("cache_aware", {"balance_abs_threshold": -1}),
    ("gorgo_proxy", {"max_in_flight": 0}),
    ("gorgo_proxy", {"t_p_s": 0}),
    ("gorgo_proxy", {"q_hat": float("nan")}),
    ("gorgo", {"local_kv_cap": 0}),
    ("gorgo", {"recheck_s": -0.02}),
    ("session_affinity", {"virtual_nodes": 0}),
    ("preble", {"rebalance_ratio": 0.9}),
    ("preble", {"window_s": float("inf")}),
    ("weighted", {"weights": {"prefix": 0, "queue": 0, "kv": 0}}),
])
def test_out_of_range_values_are_rejected(name, params):
    with pytest.raises(RegistryError, match=name):
        default_registry().create(name, params)


def test_ints_are_accepted_for_floats_and_none_where_optional():
    reg = default_registry()
    pol = reg.create("gorgo_proxy", {"q_hat": 1, "t_p_s": None, "max_in_flight": 4}, rng=np.random.default_rng(0))
    assert pol.params.q_hat == 1.0 and isinstance(pol.params.q_hat, float)
    assert reg.create("cache_aware", {"balance_rel_threshold": 2}).params.balance_rel_threshold == 2.0
    assert reg.create("gorgo", {"sync_period_s": 1}).sync_period_s == 1.0
