"""The routing-policy contract and the registry that maps names to policies."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from isthmus.core.errors import RegistryError
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """A policy's estimate for its choice, seconds (``nan`` where a policy does not estimate)."""

    network_s: float = float("nan")
    queue_s: float = float("nan")
    prefill_s: float = float("nan")
    total_s: float = float("nan")


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes.

    Attributes:
        target: replica id, or a peer region's router when ``forward``; ``None`` means hold the
            request at the router and ask again later (nothing available now).
        forward: the target is a peer router, not a replica.
        estimate: the policy's cost estimate, logged and exported.
        reason: short human-readable why.
    """

    target: str | None
    forward: bool = False
    estimate: CostBreakdown = CostBreakdown()
    reason: str = ""


HOLD = Decision(target=None, reason="no replica available")


def uses_prefix(policy: object) -> bool:
    """Whether ``policy`` may look at prefix caches (its ``uses_prefix`` attribute; default True)."""
    return bool(getattr(policy, "uses_prefix", True))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to a routed request; fed back to adaptive policies."""

    request: Request
    target: str
    decided_at: float
    ttft_s: float
    e2e_s: float
    cached_tokens: int
    ok: bool = True


class Policy(Protocol):
    """A routing policy: a pure function of (request, snapshot), plus optional learning from outcomes.

    ``choose`` must not read the clock, do I/O, or use a global random generator; randomness comes
    from the generator the registry passes to the factory.

    A policy may set ``uses_prefix = False`` to tell its shell that it never calls
    ``snapshot.prefix.match``, so the shell need not keep a prefix index for it (absent means True).
    """

    name: str

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision: ...

    def observe(self, outcome: Outcome) -> None: ...


PolicyFactory = Callable[[Mapping[str, Any], np.random.Generator], Policy]


class PolicyRegistry:
    """Names -> factories. Unknown or duplicate names raise :class:`RegistryError`.

    A factory takes the policy's parameters (a mapping from config) and a seeded generator, and
    raises ``TypeError`` / ``ValueError`` on bad parameters; :meth:`create` turns those into a
    :class:`RegistryError` naming the policy.
    """

    def __init__(self) -> None:
        self._factories: dict[str, PolicyFactory] = {}

    def register(self, name: str, factory: PolicyFactory) -> None:
        if name in self._factories:
            raise RegistryError(f"policy {name!r} is already registered")
        self._factories[name] = factory

    def create(self, name: str, params: Mapping[str, Any] | None = None,
               rng: np.random.Generator | None = None) -> Policy:
        try:
            factory = self._factories[name]
        except KeyError:
            raise RegistryError(f"unknown policy {name!r}; known: {sorted(self._factories)}") from None
        try:
            return factory(dict(params or {}), rng if rng is not None else np.random.default_rng(0))
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"policy {name!r}: bad parameters {dict(params or {})}: {exc}") from exc

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._factories))
