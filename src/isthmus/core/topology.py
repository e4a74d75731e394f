"""Regions and the network between them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Topology:
    """Regions, the RTT between every pair, and optional bandwidth and prices.

    Attributes:
        regions: region names; their order fixes the matrix index.
        rtt_s: ``rtt_s[i, j]`` is the round-trip time from region ``i`` to region ``j``, seconds.
            The diagonal is the RTT from a client to a server inside the same region (may be > 0).
        bandwidth_bps: optional ``[i, j]`` bandwidth in bytes per second.
        egress_usd_per_gb: optional ``[i, j]`` price of moving one GB from ``i`` to ``j``.
        gpu_usd_per_hour: optional price of one GPU hour per GPU type.
    """

    regions: tuple[str, ...]
    rtt_s: np.ndarray
    bandwidth_bps: np.ndarray | None = None
    egress_usd_per_gb: np.ndarray | None = None
    gpu_usd_per_hour: Mapping[str, float] = field(default_factory=dict)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.regions)
        if n == 0:
            raise ValueError("a topology needs at least one region")
        if len(set(self.regions)) != n:
            raise ValueError(f"duplicate region names in {list(self.regions)}")
        for name, arr in (("rtt_s", self.rtt_s), ("bandwidth_bps", self.bandwidth_bps),
                          ("egress_usd_per_gb", self.egress_usd_per_gb)):
            if arr is None:
                continue
            if arr.shape != (n, n):
                raise ValueError(f"{name} must be {n}x{n}, got {arr.shape}")
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{name} must be finite and >= 0")
        object.__setattr__(self, "_index", {r: i for i, r in enumerate(self.regions)})
        self.rtt_s.setflags(write=False)

    @classmethod
    def from_pairs(
        cls,
        regions: Iterable[str],
        rtt_ms: Mapping[tuple[str, str], float],
        intra_region_rtt_ms: float = 0.0,
        **kwargs: object,
    ) -> Topology:
        """Build from ``{(a, b): rtt_ms}``; a missing ``(b, a)`` mirrors ``(a, b)``.

        A missing diagonal entry gets ``intra_region_rtt_ms``; a missing off-diagonal pair is an error.
        """
        names = tuple(regions)
        idx = {r: i for i, r in enumerate(names)}
        n = len(names)
        m = np.full((n, n), np.nan)
        for (a, b), v in rtt_ms.items():
            for r in (a, b):
                if r not in idx:
                    raise ValueError(f"RTT given for unknown region {r!r}")
            m[idx[a], idx[b]] = v / 1000.0
        for i in range(n):
            for j in range(n):
                if np.isnan(m[i, j]):
                    if not np.isnan(m[j, i]):
                        m[i, j] = m[j, i]
                    elif i == j:
                        m[i, j] = intra_region_rtt_ms / 1000.0
                    else:
                        raise ValueError(f"no RTT between {names[i]!r} and {names[j]!r}")
        return cls(regions=names, rtt_s=m, **kwargs)  # type: ignore[arg-type]

    def index(self, region: str) -> int:
        """Matrix index of ``region``; ``KeyError`` naming it if unknown."""
        try:
            return self._index[region]
        except KeyError:
            raise KeyError(f"unknown region {region!r}; known: {list(self.regions)}") from None

    def rtt(self, a: str, b: str) -> float:
        """Round-trip time from region ``a`` to region ``b``, seconds."""
        return float(self.rtt_s[self._index[a], self._index[b]])

    def one_way(self, a: str, b: str) -> float:
        """One-way latency ``a`` -> ``b``: half the RTT, seconds."""
        return 0.5 * float(self.rtt_s[self._index[a], self._index[b]])

    def scaled(self, factor: float) -> Topology:
        """The same topology with every RTT multiplied by ``factor`` (for sweeps)."""
        return Topology(self.regions, self.rtt_s * factor, self.bandwidth_bps, self.egress_usd_per_gb,
                        dict(self.gpu_usd_per_hour))
