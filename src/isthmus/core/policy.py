"""The routing-policy contract and the registry that maps names to policies."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from isthmus.core.errors import RegistryError
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot


@dataclass(slots=True)
class CostBreakdown:
    """A policy's estimate for its choice, seconds (``nan`` where a policy does not estimate).

    ``total_s`` is ``network_s + queue_s + prefill_s`` where a policy gives all three. The fields
    after it are optional predictions of SLO-aware policies: ``decode_s`` (time from the first to
    the last token), ``ttft_s`` / ``e2e_s`` (the client-observed TTFT and end-to-end latency,
    measured from the request's ``arrival``), ``tpot_s`` (time per output token; the simulator
    reports the error of these three against what happened) and ``usd`` (the money the choice
    costs, US dollars).
    """

    network_s: float = float("nan")
    queue_s: float = float("nan")
    prefill_s: float = float("nan")
    total_s: float = float("nan")
    decode_s: float = float("nan")
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    usd: float = float("nan")
    tpot_s: float = float("nan")


@dataclass(slots=True)
class Decision:
    """Where a request goes.

    Attributes:
        target: replica id, or a peer region's router when ``forward``; ``None`` means hold the
            request at the router and ask again later (nothing available now), unless ``reject``.
        forward: the target is a peer router, not a replica.
        estimate: the policy's cost estimate, logged and exported.
        reason: short human-readable why (for a rejection, the message the client gets).
        reject: ``None`` (the default) unless the policy refuses the request: then a short
            machine-readable code (e.g. :data:`REJECT_SLO`), ``target`` is ``None`` and the shell
            drops the request at once. The simulator counts it as rejected under this code; the
            router answers HTTP 429 with an OpenAI-style error body whose ``code`` is this value
            and whose ``message`` is ``reason``.
        priority: scheduling priority of the request from now on, lower first (vLLM's
            convention, 0 normal); ``None`` leaves it as it is. A deadline-ordered router queue
            orders held requests by it before their deadlines, and a replica's engine queue
            admits lower values first (vLLM's ``priority`` field under its priority scheduler).
    """

    target: str | None
    forward: bool = False
    estimate: CostBreakdown = field(default_factory=CostBreakdown)
    reason: str = ""
    reject: str | None = None
    priority: int | None = None

    def __post_init__(self) -> None:
        if self.reject is not None and (self.target is not None or not self.reject):
            raise ValueError("a rejecting decision has no target and a non-empty reject code")


HOLD = Decision(target=None, reason="no replica available")

REJECT_SLO = "slo_unattainable"
"""Reject code of a request whose SLO no replica can meet (see :class:`Decision`)."""


def uses_prefix(policy: object) -> bool:
    """Whether ``policy`` may look at prefix caches (its ``uses_prefix`` attribute; default True)."""
    return bool(getattr(policy, "uses_prefix", True))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to a routed request; fed back to adaptive policies.

    Times are seconds at the client from the request's send. ``output_tokens``: the tokens it
    actually generated (``None``: unknown, read as ``request.max_output_tokens``).
    """

    request: Request
    target: str
    decided_at: float
    ttft_s: float
    e2e_s: float
    cached_tokens: int
    ok: bool = True
    output_tokens: int | None = None

    @property
    def generated_tokens(self) -> int:
        """Output tokens the request produced: ``output_tokens``, else ``request.max_output_tokens``."""
        return self.output_tokens if self.output_tokens is not None else self.request.max_output_tokens


class Policy(Protocol):
    """A routing policy: a pure function of (request, snapshot), plus optional learning from outcomes.

    ``choose`` must not read the clock, do I/O, or use a global random generator; randomness comes
    from the generator the registry passes to the factory.

    A policy may set ``uses_prefix = False`` to tell its shell that it never calls
    ``snapshot.prefix.match``, so the shell need not keep a prefix index for it (absent means True);
    ``uses_decode_step = True`` to ask the shell to fill ``InstanceView.decode_step_s`` (absent means
    False); and ``queue_order`` (``"fifo"`` or ``"edf"``) for the order of the requests its router
    holds, when the configuration does not set one (absent means ``"fifo"``).
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
