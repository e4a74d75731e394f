"""The failures an engine double is currently injecting, changeable at run time."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from isthmus.core.errors import ConfigError
from isthmus.emulator.config import FaultSpec

_FIELDS = {f.name: f for f in dataclasses.fields(FaultSpec)}


def fault_spec_from_json(data: Any) -> FaultSpec:
    """A :class:`FaultSpec` from a JSON object with its field names (missing fields: no fault).

    Raises :class:`~isthmus.core.errors.ConfigError` for a non-object, an unknown field or a bad value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("the fault spec must be a JSON object")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown fault field(s) {unknown}; known: {sorted(_FIELDS)}")
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if key in ("die_exit", "unhealthy"):
            ok = isinstance(value, bool)
        elif key in ("error_rate", "stall_s"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"fault field {key!r} has a value of the wrong type: {value!r}")
        kw[key] = value
    return FaultSpec(**kw)


class FaultState:
    """The current :class:`FaultSpec` and the seeded generator that decides injected errors."""

    def __init__(self, spec: FaultSpec, seed: int) -> None:
        self.spec = spec
        self._rng = np.random.default_rng([seed & ((1 << 64) - 1), 0xFA17])

    def draw_error(self) -> bool:
        """Whether this generation request gets an injected error (``error_rate`` of them do)."""
        rate = self.spec.error_rate
        if rate <= 0.0:
            return False
        return rate >= 1.0 or float(self._rng.random()) < rate

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self.spec)
