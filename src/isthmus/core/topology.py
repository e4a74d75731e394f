"""Regions and the network between them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

DEFAULT_BYTES_PER_TOKEN = 4.0
"""Bytes of text per token when pricing egress: about four UTF-8 characters per token of English
text with Llama-style tokenizers (an assumption; set ``bytes_per_token`` to model something else,
e.g. KV-cache transfer at ``kv_bytes_per_token``)."""


class PriceBook(Protocol):
    """What an SLO- and cost-aware policy needs to price a choice; :class:`Topology` is one.

    ``gpu_price(gpu)``: US dollars per GPU hour of that GPU type (0 when unknown);
    ``egress_price(a, b)``: US dollars per GB (1e9 bytes) moved from region ``a`` to ``b`` (0 inside a
    region or when unknown); ``bytes_per_token``: bytes one prompt or output token weighs on the wire.
    """

    @property
    def bytes_per_token(self) -> float: ...

    def gpu_price(self, gpu: str) -> float: ...

    def egress_price(self, a: str, b: str) -> float: ...


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
        bytes_per_token: bytes per token when pricing egress (:data:`DEFAULT_BYTES_PER_TOKEN`).

    A topology is a :class:`PriceBook`: :meth:`gpu_price` and :meth:`egress_price` read the two
    price tables (0 where they say nothing).
    """

    regions: tuple[str, ...]
    rtt_s: np.ndarray
    bandwidth_bps: np.ndarray | None = None
    egress_usd_per_gb: np.ndarray | None = None
    gpu_usd_per_hour: Mapping[str, float] = field(default_factory=dict)
    bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN
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
        for gpu, price in self.gpu_usd_per_hour.items():
            if not (math.isfinite(price) and price >= 0):
                raise ValueError(f"gpu_usd_per_hour[{gpu!r}] must be finite and >= 0, got {price}")
        if not (math.isfinite(self.bytes_per_token) and self.bytes_per_token >= 0):
            raise ValueError(f"bytes_per_token must be finite and >= 0, got {self.bytes_per_token}")
        object.__setattr__(self, "_index", {r: i for i, r in enumerate(self.regions)})
        self.rtt_s.setflags(write=False)

    @property
    def has_prices(self) -> bool:
        """Whether the topology gives any GPU or egress price."""
        return bool(self.gpu_usd_per_hour) or self.egress_usd_per_gb is not None

    def gpu_price(self, gpu: str) -> float:
        """US dollars per hour of one ``gpu`` (0 when the topology gives no price for it)."""
        return float(self.gpu_usd_per_hour.get(gpu, 0.0))

    def egress_price(self, a: str, b: str) -> float:
        """US dollars per GB moved from region ``a`` to region ``b`` (0 without an egress table)."""
        if self.egress_usd_per_gb is None:
            return 0.0
        return float(self.egress_usd_per_gb[self._index[a], self._index[b]])

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
                        dict(self.gpu_usd_per_hour), self.bytes_per_token)
