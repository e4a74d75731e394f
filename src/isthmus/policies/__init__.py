"""Routing policies: pure functions of (request, snapshot) -> Decision, registered by name."""

from isthmus.core.policy import PolicyRegistry
from isthmus.policies.basic import (
    LeastLoadPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_least_load,
    make_random,
    make_round_robin,
)


def default_registry() -> PolicyRegistry:
    """A fresh registry holding every built-in policy."""
    reg = PolicyRegistry()
    reg.register("random", make_random)
    reg.register("round_robin", make_round_robin)
    reg.register("least_load", make_least_load)
    return reg


__all__ = ["LeastLoadPolicy", "RandomPolicy", "RoundRobinPolicy", "default_registry"]
