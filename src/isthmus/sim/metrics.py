"""Per-request records kept compactly, and the summaries reports are made of."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_FIELDS_F = ("arrival", "ttft", "e2e", "tpot", "queue", "finish")
_FIELDS_I = ("origin", "served", "prompt", "cached", "output", "preemptions")


@dataclass
class RequestLog:
    """Append-only columns, one row per completed request (8 bytes per value, no per-row objects)."""

    arrival: array = field(default_factory=lambda: array("d"))
    ttft: array = field(default_factory=lambda: array("d"))
    e2e: array = field(default_factory=lambda: array("d"))
    tpot: array = field(default_factory=lambda: array("d"))
    queue: array = field(default_factory=lambda: array("d"))
    finish: array = field(default_factory=lambda: array("d"))
    bound: array = field(default_factory=lambda: array("d"))
    origin: array = field(default_factory=lambda: array("i"))
    served: array = field(default_factory=lambda: array("i"))
    prompt: array = field(default_factory=lambda: array("q"))
    cached: array = field(default_factory=lambda: array("q"))
    output: array = field(default_factory=lambda: array("q"))
    preemptions: array = field(default_factory=lambda: array("i"))
    hops: array = field(default_factory=lambda: array("i"))

    def __len__(self) -> int:
        return len(self.arrival)


def percentiles(values: np.ndarray) -> dict[str, float]:
    """Mean, p50, p90, p99 of the finite values (``nan`` for an empty set)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


@dataclass
class SimResult:
    """Outcome of one simulation run.

    Per-request arrays (completed requests, in completion order): ``arrival_s`` (client send time),
    ``ttft_s`` (client-observed time to first token, network included), ``e2e_s``, ``tpot_s``
    (``nan`` for one-token outputs), ``queue_s`` (held at a router + waiting at the replica before
    first scheduled), ``origin`` / ``served`` (region indices into ``regions``), ``prompt_tokens``,
    ``cached_tokens``, ``output_tokens``, ``bound_ttft_s`` (the lower bound on TTFT: best RTT plus
    prefill of the uncached part over all replicas at send time, no queueing), ``hops`` (forwards).
    """

    policy: str
    regions: tuple[str, ...]
    requests: int
    completed: int
    events: int
    wall_s: float
    sim_span_s: float
    arrival_s: np.ndarray
    ttft_s: np.ndarray
    e2e_s: np.ndarray
    tpot_s: np.ndarray
    queue_s: np.ndarray
    finish_s: np.ndarray
    bound_ttft_s: np.ndarray
    hops: np.ndarray
    origin: np.ndarray
    served: np.ndarray
    prompt_tokens: np.ndarray
    cached_tokens: np.ndarray
    output_tokens: np.ndarray
    preemptions: int = 0
    rejected: int = 0
    counters: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_log(cls, log: RequestLog, **kw: Any) -> SimResult:
        return cls(
            arrival_s=np.frombuffer(log.arrival, dtype=np.float64),
            ttft_s=np.frombuffer(log.ttft, dtype=np.float64),
            e2e_s=np.frombuffer(log.e2e, dtype=np.float64),
            tpot_s=np.frombuffer(log.tpot, dtype=np.float64),
            queue_s=np.frombuffer(log.queue, dtype=np.float64),
            finish_s=np.frombuffer(log.finish, dtype=np.float64),
            bound_ttft_s=np.frombuffer(log.bound, dtype=np.float64),
            hops=np.frombuffer(log.hops, dtype=np.int32),
            origin=np.frombuffer(log.origin, dtype=np.int32),
            served=np.frombuffer(log.served, dtype=np.int32),
            prompt_tokens=np.frombuffer(log.prompt, dtype=np.int64),
            cached_tokens=np.frombuffer(log.cached, dtype=np.int64),
            output_tokens=np.frombuffer(log.output, dtype=np.int64),
            completed=len(log),
            **kw,
        )

    def _summary(self, mask: np.ndarray | None) -> dict[str, Any]:
        sel = (lambda a: a) if mask is None else (lambda a: a[mask])
        arrival, finish = sel(self.arrival_s), sel(self.finish_s)
        prompt, cached = sel(self.prompt_tokens), sel(self.cached_tokens)
        n = int(arrival.size)
        span = float(finish.max() - arrival.min()) if n else 0.0
        ttft = percentiles(sel(self.ttft_s))
        bound = percentiles(sel(self.bound_ttft_s))
        return {
            "completed": n,
            "ttft_s": ttft,
            "bound_ttft_s": bound,
            "regret": {
                "mean": ttft["mean"] / bound["mean"] if bound["mean"] > 0 else math.nan,
                "p99": ttft["p99"] / bound["p99"] if bound["p99"] > 0 else math.nan,
            },
            "tpot_s": percentiles(sel(self.tpot_s)),
            "e2e_s": percentiles(sel(self.e2e_s)),
            "queue_s": percentiles(sel(self.queue_s)),
            "throughput_rps": n / span if span > 0 else 0.0,
            "output_tokens_per_s": float(sel(self.output_tokens).sum()) / span if span > 0 else 0.0,
            "prefix_hit_rate": float(cached.sum() / prompt.sum()) if n and prompt.sum() else 0.0,
            "cross_region_share": float(np.mean(sel(self.origin) != sel(self.served))) if n else 0.0,
        }

    def summary(self) -> dict[str, Any]:
        """The result entry of ``isthmus simulate --json`` (wall-clock figures excluded: reproducible)."""
        out: dict[str, Any] = {"policy": self.policy, "requests": self.requests}
        out.update(self._summary(None))
        out["preemptions"] = self.preemptions
        out["rejected"] = self.rejected
        out["per_region"] = {
            r: {k: v for k, v in self._summary(self.origin == i).items()}
            for i, r in enumerate(self.regions)
        }
        out.update({k: v for k, v in sorted(self.counters.items())})
        return out
