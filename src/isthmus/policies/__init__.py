"""Routing policies: pure functions of (request, snapshot) -> Decision, registered by name."""

from isthmus.core.policy import PolicyRegistry
from isthmus.policies.affinity import HashRing, SessionAffinityPolicy, make_session_affinity
from isthmus.policies.basic import (
    LeastLoadPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_least_load,
    make_random,
    make_round_robin,
)
from isthmus.policies.gorgo import GorgoPolicy, GorgoProxyPolicy, make_gorgo, make_gorgo_proxy
from isthmus.policies.lodestar import LodestarPolicy, make_lodestar
from isthmus.policies.preble import PreblePolicy, make_preble
from isthmus.policies.prefix import CacheAwarePolicy, PrefixTriePolicy, make_cache_aware, make_prefix_trie
from isthmus.policies.slo import SLOParams, SLOPolicy, make_slo
from isthmus.policies.weighted import WeightedPolicy, make_weighted


def default_registry() -> PolicyRegistry:
    """A fresh registry holding every built-in policy."""
    reg = PolicyRegistry()
    reg.register("random", make_random)
    reg.register("round_robin", make_round_robin)
    reg.register("least_load", make_least_load)
    reg.register("prefix_trie", make_prefix_trie)
    reg.register("cache_aware", make_cache_aware)
    reg.register("weighted", make_weighted)
    reg.register("session_affinity", make_session_affinity)
    reg.register("preble", make_preble)
    reg.register("gorgo_proxy", make_gorgo_proxy)
    reg.register("gorgo", make_gorgo)
    reg.register("lodestar", make_lodestar)
    reg.register("slo", make_slo)
    return reg


__all__ = [
    "CacheAwarePolicy",
    "GorgoPolicy",
    "GorgoProxyPolicy",
    "HashRing",
    "LeastLoadPolicy",
    "LodestarPolicy",
    "PreblePolicy",
    "PrefixTriePolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SLOParams",
    "SLOPolicy",
    "SessionAffinityPolicy",
    "WeightedPolicy",
    "default_registry",
]
