"""Which region each request comes from."""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from isthmus.core.errors import ConfigError

_BATCH = 4096


class OriginAssigner:
    """Draws each request's origin region from fixed weights.

    Per request (the default), every call to :meth:`assign` draws a region with probability
    ``weight / sum(weights)`` from ``rng`` (in batches, so the sequence does not depend on how the
    calls are spread). With ``per_session``, a request that has a session key gets the region that
    key maps to: a keyed BLAKE2b hash of the key, as a uniform number in [0, 1), picks the region
    from the same weights, so every request of a session gets the same region, the key decides it
    alone (no table of sessions is kept), and the key of the hash -- ``salt`` -- comes from the
    seed. Requests without a session fall back to per-request draws.

    Args:
        regions: the scenario's regions; their order fixes the mapping from draws to regions.
        weights: ``{region: weight}``, weights finite and >= 0 with a positive sum; regions left out
            get weight 0. ``None`` means uniform over ``regions``.
        per_session: assign by session key when there is one.
        rng: source of per-request draws.
        salt: key of the session hash (up to 64 bytes); draw it from the seed.

    Raises:
        ConfigError: no regions, a weight for an unknown region (named, as
            ``origins.weights.<region>``), or invalid weights.
    """

    def __init__(self, regions: Sequence[str], weights: Mapping[str, float] | None, per_session: bool,
                 rng: np.random.Generator, salt: bytes = b"") -> None:
        if not regions:
            raise ConfigError("origins: no regions to assign requests to")
        if len(set(regions)) != len(regions):
            raise ConfigError(f"origins: duplicate region names in {list(regions)}")
        if weights is None:
            w = [1.0] * len(regions)
        else:
            for name, value in weights.items():
                if name not in regions:
                    raise ConfigError(f"origins.weights.{name}: unknown region {name!r}; regions: {list(regions)}")
                if not math.isfinite(value) or value < 0:
                    raise ConfigError(f"origins.weights.{name}: weight must be finite and >= 0, got {value}")
            w = [float(weights.get(r, 0.0)) for r in regions]
        total = math.fsum(w)
        if not total > 0:
            raise ConfigError("origins.weights: weights must have a positive sum")
        self._regions = tuple(regions)
        self._p = np.asarray(w) / total
        cumulative = np.cumsum(self._p)
        cumulative[-1] = 1.0
        self._cumulative = cumulative.tolist()
        positive = [r for r, x in zip(regions, w, strict=True) if x > 0]
        self._only = positive[0] if len(positive) == 1 else None
        self._per_session = per_session
        self._rng = rng
        self._salt = salt
        self._draws: list[int] = []
        self._next = 0

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions, in the order given."""
        return self._regions

    @property
    def probabilities(self) -> dict[str, float]:
        """Probability of each region."""
        return dict(zip(self._regions, self._p.tolist(), strict=True))

    def assign(self, session: str | None = None) -> str:
        """The origin of the next request, whose session key is ``session`` (or ``None``)."""
        if self._only is not None:
            return self._only
        if session is not None and self._per_session:
            return self.region_of_session(session)
        if self._next == len(self._draws):
            self._draws = self._rng.choice(len(self._regions), _BATCH, p=self._p).tolist()
            self._next = 0
        region = self._regions[self._draws[self._next]]
        self._next += 1
        return region

    def region_of_session(self, session: str) -> str:
        """The region every request of ``session`` gets (a pure function of the key and the salt)."""
        digest = hashlib.blake2b(session.encode(), digest_size=8, key=self._salt).digest()
        u = (int.from_bytes(digest, "big") >> 11) / 2.0**53  # exactly in [0, 1)
        index = bisect.bisect_right(self._cumulative, u)
        return self._regions[min(index, len(self._regions) - 1)]
