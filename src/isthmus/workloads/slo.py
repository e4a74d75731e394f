"""SLO classes in configuration files, and how a workload gives each request its class.

:class:`SLOConfig` is the ``slo`` block of a scenario (and the shape a router configuration can
reuse): the classes with their targets in milliseconds, and the assignment::

    slo:
      classes:
        - {name: interactive, ttft_ms: 1500, tpot_ms: 100}
        - {name: batch, e2e_ms: 60000, priority: 1}
      shares: {interactive: 0.6, batch: 0.4}   # each request draws its class with these weights
      per_session: false                       # true: every request of a session gets one class
      default: batch                           # without shares, every request's class
      by_model: {}                             # model -> class (for the router; traces carry no model)

:func:`assign_slo_classes` applies it to a request stream. The draws come from their own generator
(:func:`slo_rng`), so giving a workload classes changes none of its arrivals, lengths or origins.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
from collections.abc import Iterable, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from isthmus.configfile import FieldError
from isthmus.core.request import SLO, Request
from isthmus.core.slo import SLOCatalog

# Stream index of the class draws among the workload's independent streams (build.py uses 0..3).
_SLO_STREAM = 4


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SLOClassConfig(_Frozen):
    """One SLO class: targets in milliseconds (at least one), and a priority (lower runs first)."""

    name: str = Field(min_length=1)
    ttft_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    tpot_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    e2e_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    priority: int = 0

    @model_validator(mode="after")
    def _some_target(self) -> SLOClassConfig:
        if self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None:
            raise FieldError((), f"class {self.name!r} needs at least one of ttft_ms, tpot_ms, e2e_ms")
        return self

    def slo(self) -> SLO:
        """The class as the core sees it (targets in seconds)."""

        def s(ms: float | None) -> float | None:
            return None if ms is None else ms / 1000.0

        return SLO(self.name, s(self.ttft_ms), s(self.tpot_ms), s(self.e2e_ms), self.priority)


class SLOConfig(_Frozen):
    """The ``slo`` block: classes and how requests get them (module docstring).

    ``shares`` (class -> weight >= 0, positive sum; classes left out get 0) or ``default`` must be
    given; with both, ``shares`` assigns and ``default`` only names the catalog's default.
    """

    classes: tuple[SLOClassConfig, ...] = Field(min_length=1)
    shares: dict[str, float] | None = None
    per_session: bool = False
    default: str | None = None
    by_model: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SLOConfig:
        names: set[str] = set()
        for k, c in enumerate(self.classes):
            if c.name in names:
                raise FieldError(("classes", k, "name"), f"duplicate SLO class {c.name!r}")
            names.add(c.name)
        known = sorted(names)
        if self.shares is not None:
            for name, w in self.shares.items():
                if name not in names:
                    raise FieldError(("shares", name), f"unknown SLO class {name!r}; classes: {known}")
                if not (math.isfinite(w) and w >= 0):
                    raise FieldError(("shares", name), f"must be a finite number >= 0, got {w}")
            if not sum(self.shares.values()) > 0:
                raise FieldError(("shares",), "weights must have a positive sum")
        if self.default is not None and self.default not in names:
            raise FieldError(("default",), f"unknown SLO class {self.default!r}; classes: {known}")
        for model, name in self.by_model.items():
            if name not in names:
                raise FieldError(("by_model", model), f"unknown SLO class {name!r}; classes: {known}")
        if self.shares is None and self.default is None:
            raise FieldError(("shares",), "give shares (each request draws a class) or default (one class for all)")
        if self.per_session and self.shares is None:
            raise FieldError(("per_session",), "only used with shares")
        return self

    def catalog(self) -> SLOCatalog:
        """The classes as a :class:`~isthmus.core.slo.SLOCatalog` (what a router resolves with)."""
        return SLOCatalog(tuple(c.slo() for c in self.classes), default=self.default, by_model=dict(self.by_model))


def slo_rng(seed: int) -> np.random.Generator:
    """The generator of a workload's class draws: its own stream of ``seed``, independent of the
    arrival, length, content and origin streams of :func:`~isthmus.workloads.build_requests`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SLO_STREAM,)))


def assign_slo_classes(requests: Iterable[Request], config: SLOConfig, rng: np.random.Generator) -> Iterator[Request]:
    """``requests`` with their SLO class set, lazily.

    With ``shares``, each request draws its class with probabilities proportional to the weights
    (one uniform draw per request, so the ``k``-th request's class depends only on the seed and
    ``k``); with ``per_session``, a request with a session takes the class its session id hashes to
    (a salted hash, salt from ``rng``), so a conversation keeps its class. Without ``shares``,
    every request gets ``default``.
    """
    catalog = config.catalog()
    if config.shares is None:
        assert config.default is not None  # the config's validator requires one of them
        slo = catalog.get(config.default)
        for req in requests:
            yield dataclasses.replace(req, slo=slo)
        return
    picked = [(catalog.get(name), w) for name, w in config.shares.items() if w > 0]
    total = sum(w for _, w in picked)
    bounds: list[float] = []
    acc = 0.0
    for _, w in picked:
        acc += w / total
        bounds.append(acc)
    bounds[-1] = 1.0
    classes = [c for c, _ in picked]
    salt = rng.bytes(16)
    per_session = config.per_session
    last = len(classes) - 1
    for req in requests:
        u = float(rng.random())
        if per_session and req.session is not None:
            digest = hashlib.blake2b(req.session.encode(), key=salt, digest_size=8).digest()
            u = int.from_bytes(digest, "big") / 2.0**64
        k = min(bisect.bisect_right(bounds, u), last)
        yield dataclasses.replace(req, slo=classes[k])
