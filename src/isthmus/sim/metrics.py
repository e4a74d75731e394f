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
    slo_class: array = field(default_factory=lambda: array("i"))
    slo_met: array = field(default_factory=lambda: array("b"))
    pred_ttft: array = field(default_factory=lambda: array("d"))
    pred_e2e: array = field(default_factory=lambda: array("d"))
    pred_tpot: array = field(default_factory=lambda: array("d"))

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
    prefill of the uncached part over all replicas at send time, no queueing), ``hops`` (forwards),
    ``slo_class`` (index into ``slo_classes``, -1 without an SLO), ``slo_met`` (the request met every
    target of its SLO; true without one), ``pred_ttft_s`` / ``pred_e2e_s`` / ``pred_tpot_s`` (the
    deciding policy's predicted client TTFT / E2E / TPOT, ``nan`` when it gave none).

    ``rejections``: SLO class name (``""`` without one) -> reject code -> requests refused.
    ``cost``: GPU and egress totals when the topology has prices (see :meth:`summary`).
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
    slo_classes: tuple[str, ...] = ()
    slo_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    slo_met: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    pred_ttft_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_e2e_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_tpot_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rejections: dict[str, dict[str, int]] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

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
            slo_class=np.frombuffer(log.slo_class, dtype=np.int32),
            slo_met=np.frombuffer(log.slo_met, dtype=np.int8).astype(bool),
            pred_ttft_s=np.frombuffer(log.pred_ttft, dtype=np.float64),
            pred_e2e_s=np.frombuffer(log.pred_e2e, dtype=np.float64),
            pred_tpot_s=np.frombuffer(log.pred_tpot, dtype=np.float64),
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
        """The result entry of ``isthmus simulate --json`` (wall-clock figures excluded: reproducible).

        Besides the latency figures, when some request had an SLO class, ``slo``
        (:meth:`slo_summary`); when a policy predicted TTFT / E2E, ``estimator``
        (:meth:`estimator_summary`); when the topology has prices, ``cost`` (:meth:`cost_summary`).
        """
        out: dict[str, Any] = {"policy": self.policy, "requests": self.requests}
        out.update(self._summary(None))
        out["preemptions"] = self.preemptions
        out["rejected"] = self.rejected
        out["per_region"] = {
            r: {k: v for k, v in self._summary(self.origin == i).items()}
            for i, r in enumerate(self.regions)
        }
        out.update({k: v for k, v in sorted(self.counters.items())})
        if self.slo_classes:
            out["slo"] = self.slo_summary()
        est = self.estimator_summary()
        if est is not None:
            out["estimator"] = est
        if self.cost:
            out["cost"] = self.cost_summary()
        return out

    def _span(self) -> float:
        n = self.arrival_s.size
        return float(self.finish_s.max() - self.arrival_s.min()) if n else 0.0

    def slo_summary(self) -> dict[str, Any]:
        """SLO attainment per class and over all requests with an SLO.

        Per class: ``requests`` (completed + rejected), ``completed``, ``rejected`` (by code in
        ``rejections``), ``attained`` (completed within every target), ``attainment`` (attained /
        requests: a rejected request misses), ``goodput_rps`` (attained per second of the run's
        span, first arrival to last finish) and the class's TTFT / TPOT / E2E percentiles, seconds.
        The top level sums the classes (requests without an SLO are left out).
        """
        span = self._span()
        classes: dict[str, Any] = {}
        tot_req = tot_att = tot_rej = tot_done = 0
        codes: dict[str, int] = {}
        for k, name in enumerate(self.slo_classes):
            mask = self.slo_class == k
            done = int(mask.sum())
            attained = int((self.slo_met & mask).sum())
            rej = self.rejections.get(name, {})
            n_rej = sum(rej.values())
            n = done + n_rej
            classes[name] = {
                "requests": n, "completed": done, "rejected": n_rej, "rejections": dict(sorted(rej.items())),
                "attained": attained, "attainment": attained / n if n else math.nan,
                "goodput_rps": attained / span if span > 0 else 0.0,
                "ttft_s": percentiles(self.ttft_s[mask]), "tpot_s": percentiles(self.tpot_s[mask]),
                "e2e_s": percentiles(self.e2e_s[mask]),
            }
            tot_req += n
            tot_att += attained
            tot_rej += n_rej
            tot_done += done
            for c, v in rej.items():
                codes[c] = codes.get(c, 0) + v
        return {
            "classes": classes, "requests": tot_req, "completed": tot_done, "rejected": tot_rej,
            "rejections": dict(sorted(codes.items())), "attained": tot_att,
            "attainment": tot_att / tot_req if tot_req else math.nan,
            "goodput_rps": tot_att / span if span > 0 else 0.0,
        }

    def estimator_summary(self) -> dict[str, Any] | None:
        """Error of the policy's predictions against what happened, over the completed requests it
        predicted (``None`` when it predicted none): for TTFT, E2E and TPOT, ``n``, ``abs_err_s``
        (percentiles of |predicted - simulated|, seconds), ``rel_err`` (percentiles of that over the
        simulated value) and ``bias_s`` (mean of predicted - simulated: > 0 overestimates).

        The E2E prediction plans for the class's mean output length, not the request's, so its
        error holds the output-length error too; TPOT's does not. With SLO classes, ``per_class``
        gives the same figures for each class's requests."""
        out = self._estimator_errors(None)
        if out and self.slo_classes:
            per_class = {name: self._estimator_errors(self.slo_class == k) for k, name in enumerate(self.slo_classes)}
            out["per_class"] = {name: e for name, e in per_class.items() if e}
        return out or None

    def _estimator_errors(self, mask: np.ndarray | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, pred, real in (("ttft", self.pred_ttft_s, self.ttft_s), ("e2e", self.pred_e2e_s, self.e2e_s),
                                ("tpot", self.pred_tpot_s, self.tpot_s)):
            ok = np.isfinite(pred) & np.isfinite(real)
            if mask is not None:
                ok &= mask
            if not ok.any():
                continue
            err = pred[ok] - real[ok]
            rel = np.abs(err) / np.maximum(real[ok], 1e-9)
            out[key] = {"n": int(ok.sum()), "abs_err_s": percentiles(np.abs(err)), "rel_err": percentiles(rel),
                        "bias_s": float(err.mean())}
        return out

    def cost_summary(self) -> dict[str, Any]:
        """Money: the raw totals of ``cost`` (GPU hours provisioned over the span and busy in engine
        steps, their US dollars at the topology's prices, egress GB and US dollars), the tokens
        served (prompt + output of completed requests) and US dollars per million tokens, both with
        the provisioned GPU cost (``usd_per_mtok``: what a fixed fleet costs) and with the busy GPU
        cost (``usd_per_mtok_busy``: what per-use billing would cost); ``usd_per_good_mtok``: the
        provisioned cost per million tokens of requests that met their SLO."""
        c = dict(self.cost)
        tokens = float(self.prompt_tokens.sum() + self.output_tokens.sum())
        good = self.slo_met
        good_tokens = float(self.prompt_tokens[good].sum() + self.output_tokens[good].sum())
        fleet = c.get("gpu_usd_provisioned", 0.0) + c.get("egress_usd", 0.0)
        busy = c.get("gpu_usd_busy", 0.0) + c.get("egress_usd", 0.0)
        c["tokens"] = tokens
        c["usd_per_mtok"] = fleet / tokens * 1e6 if tokens else math.nan
        c["usd_per_mtok_busy"] = busy / tokens * 1e6 if tokens else math.nan
        c["usd_per_good_mtok"] = fleet / good_tokens * 1e6 if good_tokens else math.nan
        return c
