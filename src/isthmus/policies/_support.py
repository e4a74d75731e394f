"""What several policies share: typed parameters from a config mapping, and small picking helpers.

Parameters: each policy declares a frozen dataclass of its parameters, whose defaults are the single
place they are defined. :func:`parse_params` builds it from the mapping a scenario file or the router
config gives the factory, checking names and types:

- an unknown name raises ``TypeError`` naming it and the known ones;
- ``float`` fields take ints or floats (not bools), ``int`` fields ints (not bools), ``bool`` fields
  bools, ``str`` fields strings, ``X | None`` fields ``None`` too; a field whose type is itself a
  parameter dataclass takes a mapping, parsed the same way (partial mappings keep the other
  defaults);
- ranges are the dataclass's business: its ``__post_init__`` raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from isthmus.core.snapshot import ClusterSnapshot, InstanceView

P = TypeVar("P")


def parse_params(cls: type[P], policy: str, params: Mapping[str, Any]) -> P:
    """An instance of the parameter dataclass ``cls`` from ``params`` (see the module docstring).

    Raises:
        TypeError: unknown name, or a value of the wrong type.
        ValueError: a value out of range (raised by ``cls``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a parameter dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise TypeError(f"{policy}: unknown parameter(s) {unknown}; known: {sorted(fields)}")
    values = {name: _coerce(policy, name, hints[name], value) for name, value in params.items()}
    return cls(**values)


def _coerce(policy: str, name: str, hint: Any, value: Any) -> Any:
    where = f"{policy}: parameter {name!r}"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(policy, name, inner[0], value)
        raise TypeError(f"{where}: unsupported type {hint!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise TypeError(f"{where} must be a {hint.__name__}, got {value!r}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{where} must be a mapping, got {value!r}")
        return parse_params(hint, f"{policy}.{name}", value)
    raise TypeError(f"{where}: unsupported type {hint!r}")


def check_positive(policy: str, **values: float) -> None:
    """Raise ``ValueError`` unless every value is finite and > 0."""
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{policy}: {name} must be finite and > 0, got {v}")


def check_non_negative(policy: str, **values: float) -> None:
    """Raise ``ValueError`` unless every value is finite and >= 0."""
    for name, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{policy}: {name} must be finite and >= 0, got {v}")


def available_views(snapshot: ClusterSnapshot) -> list[InstanceView]:
    """``snapshot.available()``, spelled out: replicas that are healthy and not full, in order.

    The same set as :attr:`InstanceView.available` (the property tests check every decision against
    that property); the condition is written out because a property call per view is a third of
    this loop's cost on a 32-replica snapshot.
    """
    return [v for v in snapshot.instances.values() if v.healthy and not v.full]


def least_load(views: Iterable[InstanceView], origin: str,
               rtt_s: Callable[[str, str], float]) -> tuple[InstanceView | None, float]:
    """The view with the fewest running + waiting requests, and its RTT from ``origin``, seconds.

    Ties go to the lower ``rtt_s(origin, region)``, then to iteration order. RTTs are computed only
    to break ties and for the winner. ``(None, nan)`` when ``views`` is empty. The caller filters
    availability.
    """
    best: InstanceView | None = None
    best_load = 0
    best_rtt = math.nan
    for v in views:
        load = v.running + v.waiting
        if best is None or load < best_load:
            best, best_load, best_rtt = v, load, math.nan
        elif load == best_load:
            if best_rtt != best_rtt:  # nan: not computed yet
                best_rtt = rtt_s(origin, best.region)
            r = rtt_s(origin, v.region)
            if r < best_rtt:
                best, best_rtt = v, r
    if best is not None and best_rtt != best_rtt:
        best_rtt = rtt_s(origin, best.region)
    return best, best_rtt


def prefill_s_per_token(view: InstanceView, override_s: float | None, fallback_s: float) -> float:
    """GORGO's ``t_p`` for ``view``: ``override_s`` if given, else the view's profile, else ``fallback_s``."""
    if override_s is not None:
        return override_s
    t = view.prefill_s_per_token
    return t if t == t else fallback_s  # nan != nan


def uncached_tokens(prompt_tokens: int, matched_blocks: int, block_size: int) -> int:
    """Prompt tokens left to prefill when ``matched_blocks`` leading blocks are cached (>= 0)."""
    rest = prompt_tokens - matched_blocks * block_size
    return rest if rest > 0 else 0
