"""Small real fakes for policy tests: a fixed prefix view, an RTT table, snapshot builders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot, InstanceView


class FakePrefixView:
    """A prefix view that reports fixed matched-block counts per replica.

    A count is capped at the request's number of blocks; zero counts are left out, like the real
    views do. ``calls`` counts ``match`` calls, so tests can check a policy calls it once.
    """

    def __init__(self, blocks: Mapping[str, int] | None = None) -> None:
        self.blocks = dict(blocks or {})
        self.calls = 0

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        self.calls += 1
        n = len(block_hashes)
        return {rid: min(m, n) for rid, m in self.blocks.items() if min(m, n) > 0}


class RttTable:
    """Symmetric RTTs between regions, seconds; ``intra_s`` inside a region."""

    def __init__(self, pairs: Mapping[tuple[str, str], float] | None = None, intra_s: float = 0.002) -> None:
        self._rtt: dict[tuple[str, str], float] = {}
        for (a, b), v in (pairs or {}).items():
            self._rtt[(a, b)] = self._rtt[(b, a)] = v
        self.intra_s = intra_s

    def __call__(self, a: str, b: str) -> float:
        if a == b:
            return self._rtt.get((a, b), self.intra_s)
        return self._rtt[(a, b)]


def view(rid: str, region: str = "east", **kw: object) -> InstanceView:
    return InstanceView(id=rid, region=region, gpu=str(kw.pop("gpu", "A100")), **kw)  # type: ignore[arg-type]


def snap(views: Sequence[InstanceView], *, here: str = "east", prefix: FakePrefixView | None = None,
         rtt: RttTable | None = None, hops: int = 0, now: float = 0.0, block_size: int = 16) -> ClusterSnapshot:
    return ClusterSnapshot(now=now, here=here, instances={v.id: v for v in views},
                           rtt_s=rtt if rtt is not None else RttTable(), prefix=prefix or FakePrefixView(),
                           block_size=block_size, hops=hops)


def req(rid: str = "r0", *, origin: str = "east", prompt: int = 1600, blocks: int | None = None,
        out: int = 100, session: str | None = None, arrival: float = 0.0) -> Request:
    n = prompt // 16 if blocks is None else blocks
    return Request(rid, arrival, origin, prompt, tuple(range(1, n + 1)), out, session=session)
