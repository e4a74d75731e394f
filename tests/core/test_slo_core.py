"""SLO classes, their resolution, output-length history, the completion-time estimator, the deadline queue."""

from __future__ import annotations

import math

import numpy as np
import pytest

from isthmus.core import SLO, InstanceView, Request, Topology
from isthmus.core.slo import (
    DeadlineQueue,
    EstimatorConfig,
    OutputLengthHistory,
    SLOCatalog,
    UnknownSLOClassError,
    deadline_s,
    estimate_completion,
    resolve_slo_class,
    slo_attained,
)

INTERACTIVE = SLO("interactive", ttft_s=1.0, tpot_s=0.08)
BATCH = SLO("batch", e2e_s=20.0, priority=1)
GOLD = SLO("gold", ttft_s=0.5)


def catalog(**kw: object) -> SLOCatalog:
    return SLOCatalog((INTERACTIVE, BATCH, GOLD), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ classes
def test_slo_targets_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        SLO("x", ttft_s=0.0)
    with pytest.raises(ValueError, match="e2e_s"):
        SLO("x", e2e_s=math.inf)
    with pytest.raises(ValueError, match="name"):
        SLO("")


def test_catalog_rejects_duplicates_and_unknown_references() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SLOCatalog((INTERACTIVE, INTERACTIVE))
    with pytest.raises(ValueError, match=r"default.*'nope'"):
        catalog(default="nope")
    with pytest.raises(ValueError, match=r"by_model\['m'\].*'nope'"):
        catalog(by_model={"m": "nope"})
    with pytest.raises(ValueError, match="at least one"):
        SLOCatalog(())


def test_resolution_precedence_header_body_key_model_default() -> None:
    c = catalog(default="batch", by_model={"llama": "interactive"}, by_api_key={"sk-gold": "gold"})
    everything = {"header": "batch", "body": "interactive", "model": "llama", "api_key": "sk-gold"}
    assert resolve_slo_class(c, **everything) is BATCH  # the header wins
    assert resolve_slo_class(c, **{**everything, "header": None}) is INTERACTIVE  # then the body
    assert resolve_slo_class(c, **{**everything, "header": " ", "body": ""}) is GOLD  # then the key
    assert resolve_slo_class(c, model="llama", api_key="sk-other") is INTERACTIVE  # then the model
    assert resolve_slo_class(c, model="other") is BATCH  # then the default
    assert resolve_slo_class(catalog(), model="other") is None  # no default: no SLO
    assert c.resolve(header=" gold ") is GOLD


def test_an_explicit_unknown_class_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(UnknownSLOClassError, match=r"'platinum'.*batch.*gold.*interactive"):
        resolve_slo_class(catalog(default="batch"), header="platinum")
    with pytest.raises(UnknownSLOClassError):
        resolve_slo_class(catalog(), body="platinum")


def test_deadline_is_the_earliest_target_and_attainment_checks_every_target() -> None:
    r = Request("r", 10.0, "east", 10, (), 5, slo=SLO("both", ttft_s=2.0, e2e_s=1.5))
    assert deadline_s(r) == 11.5
    assert deadline_s(Request("r", 10.0, "east", 10, (), 5, slo=INTERACTIVE)) == 11.0
    assert deadline_s(Request("r", 10.0, "east", 10, (), 5)) == math.inf
    assert deadline_s(Request("r", 10.0, "east", 10, (), 5, slo=SLO("t", tpot_s=0.1))) == math.inf
    assert slo_attained(INTERACTIVE, 0.9, 0.08, 99.0)
    assert not slo_attained(INTERACTIVE, 1.1, 0.01, 1.2)
    assert not slo_attained(INTERACTIVE, 0.5, 0.081, 1.2)
    assert slo_attained(INTERACTIVE, 0.5, math.nan, 1.2)  # one output token: no TPOT
    assert not slo_attained(BATCH, 0.1, 0.01, 20.5)
    assert slo_attained(None, math.inf, math.inf, math.inf)


# ------------------------------------------------------------------------------------------ history
def test_output_history_is_welford_exact_within_the_window_and_falls_back() -> None:
    h = OutputLengthHistory(prior_tokens=100.0, min_samples=5, window=1000)
    assert h.predict("a") == (100.0, 0.0)
    xs = [10, 400, 35, 80, 120, 7, 999]
    for x in xs[:3]:
        h.observe("a", x)
    assert h.predict("a") == (100.0, 0.0)  # 3 < min_samples: the prior
    for x in xs[3:]:
        h.observe("a", x)
    mean, std = h.predict("a")
    assert mean == pytest.approx(np.mean(xs)) and std == pytest.approx(np.std(xs))
    assert h.predict("b") == h.overall()  # a class without history borrows the overall moments
    assert h.count("a") == 7 and h.count("b") == 0


def test_output_history_forgets_past_the_window() -> None:
    h = OutputLengthHistory(prior_tokens=10.0, min_samples=1, window=10)
    for _ in range(200):
        h.observe(None, 100)
    for _ in range(100):
        h.observe(None, 300)
    assert h.predict(None)[0] == pytest.approx(300.0, rel=1e-3)


# ------------------------------------------------------------------------------------------ estimator
TOPO = Topology.from_pairs(["east", "west"], {("east", "west"): 100.0}, intra_region_rtt_ms=2.0,
                           gpu_usd_per_hour={"H100": 3.6}, egress_usd_per_gb=np.array([[0.0, 0.5], [0.5, 0.0]]),
                           bytes_per_token=4.0)


def _view(**kw: object) -> InstanceView:
    base: dict[str, object] = dict(id="w0", region="west", gpu="H100", running=3, waiting=1,
                                   queued_prefill_tokens=2000, prefill_s_per_token=1e-4, decode_step_s=0.02,
                                   max_num_seqs=128, kv_usage=0.5)
    base.update(kw)
    return InstanceView(**base)  # type: ignore[arg-type]


def test_estimate_by_hand() -> None:
    req = Request("r", 1.0, "east", 1000, (), 50, slo=INTERACTIVE)
    e = estimate_completion(req, _view(), now=1.5, here="east", rtt_s=TOPO.rtt, cached_tokens=200,
                            output_tokens=101.0, mean_output_tokens=80.0, prices=TOPO)
    assert e.queue_s == pytest.approx(2000 * 1e-4)  # not saturated: prefill queued ahead only
    assert e.prefill_s == pytest.approx(800 * 1e-4)
    assert e.decode_s == pytest.approx(100 * 0.02)
    assert e.network_s == pytest.approx(0.100 + 0.001)  # RTT to the replica + half the intra RTT home
    assert e.elapsed_s == pytest.approx(0.5)
    assert e.completion_s == pytest.approx(0.2 + 0.08 + 2.0 + 0.101)
    assert e.ttft_s == pytest.approx(0.5 + 0.101 + 0.2 + 0.08)
    assert e.e2e_s == pytest.approx(e.ttft_s + 2.0)
    assert e.tpot_s == 0.02
    gpu_s = 0.08 + 101 * 0.02 / 4  # prefill + its share of the decode steps of 3 + 1 sequences
    assert e.gpu_s == pytest.approx(gpu_s)
    # egress: the prompt east -> west, the output west -> east, 4 bytes a token, $0.5 per GB
    assert e.egress_bytes == pytest.approx((1000 + 101) * 4.0)
    assert e.usd == pytest.approx(gpu_s * 3.6 / 3600 + (1000 + 101) * 4.0 * 0.5 / 1e9)
    assert e.efficiency_cost(1000.0) == pytest.approx(e.completion_s + 1000.0 * e.usd)
    assert e.misses(INTERACTIVE) is None
    assert e.misses(SLO("tight", ttft_s=0.5)) == "TTFT 0.881 s > 0.5 s"
    assert "TPOT" in (e.misses(SLO("t", tpot_s=0.01)) or "")
    assert "E2E" in (e.misses(SLO("e", e2e_s=2.0)) or "")


def test_estimate_saturated_replica_waits_for_running_requests_qlm_style() -> None:
    req = Request("r", 0.0, "west", 100, (), 10)
    v = _view(running=10, waiting=5, queued_prefill_tokens=0, kv_usage=0.97)
    e = estimate_completion(req, v, now=0.0, here="west", rtt_s=TOPO.rtt, output_tokens=10.0,
                            mean_output_tokens=200.0, tpot_scale=1.5)
    # (waiting + 1) requests ahead x mean output tokens / (running / tpot) tokens per second
    assert e.queue_s == pytest.approx(6 * 200.0 * 0.03 / 10)
    assert e.tpot_s == pytest.approx(0.03)
    seqs = estimate_completion(req, _view(running=100, waiting=28, queued_prefill_tokens=0), now=0.0, here="west",
                               rtt_s=TOPO.rtt, output_tokens=10.0, mean_output_tokens=200.0)
    assert seqs.queue_s == pytest.approx(29 * 200.0 * 0.02 / 100)  # the sequence cap is reached


def test_a_normal_priority_request_overtakes_deferred_work() -> None:
    v = _view(queued_prefill_tokens=3000, deferred_prefill_tokens=2500, waiting=4, deferred_waiting=3)
    req = Request("r", 0.0, "west", 100, (), 10)
    normal = estimate_completion(req, v, now=0.0, here="west", rtt_s=TOPO.rtt, output_tokens=10, mean_output_tokens=1)
    low = estimate_completion(req, v, now=0.0, here="west", rtt_s=TOPO.rtt, output_tokens=10, mean_output_tokens=1,
                              priority=1)
    assert normal.queue_s == pytest.approx(500 * 1e-4) and low.queue_s == pytest.approx(3000 * 1e-4)


def test_estimate_defaults_penalty_and_no_prices() -> None:
    req = Request("r", 0.0, "east", 100, (), 1)
    v = _view(prefill_s_per_token=math.nan, decode_step_s=math.nan, queued_prefill_tokens=0)
    cfg = EstimatorConfig(default_prefill_s_per_token=2e-4, default_decode_step_s=0.05, cross_region_penalty_s=0.3)
    e = estimate_completion(req, v, now=0.0, here="east", rtt_s=TOPO.rtt, output_tokens=1.0, mean_output_tokens=1.0,
                            config=cfg)
    assert e.prefill_s == pytest.approx(100 * 2e-4) and e.tpot_s == 0.05 and e.decode_s == 0.0
    assert e.network_s == pytest.approx(0.1 + 0.001 + 0.3)
    assert e.usd == 0.0 and e.egress_bytes == 0.0
    with pytest.raises(ValueError, match="kv_full"):
        EstimatorConfig(kv_full=0.0)


# ------------------------------------------------------------------------------------------ queue
def test_edf_orders_by_priority_then_deadline_and_fifo_by_arrival() -> None:
    q: DeadlineQueue[str] = DeadlineQueue("edf")
    f: DeadlineQueue[str] = DeadlineQueue("fifo")
    for name, deadline, prio in (("batch", 30.0, 1), ("late", 9.0, 0), ("early", 2.0, 0), ("none", math.inf, 0)):
        q.push(name, now=0.0, deadline_s=deadline, priority=prio)
        f.push(name, now=0.0, deadline_s=deadline, priority=prio)
    assert q.ordered(1.0) == ["early", "late", "none", "batch"]
    assert f.ordered(1.0) == ["batch", "late", "early", "none"]


def test_starvation_protection_moves_old_requests_to_the_front_oldest_first() -> None:
    q: DeadlineQueue[str] = DeadlineQueue("edf", max_hold_s=5.0)
    q.push("old-batch", now=0.0, deadline_s=100.0, priority=1)
    q.push("old", now=1.0, deadline_s=90.0)
    q.push("fresh", now=4.0, deadline_s=4.5)
    assert q.ordered(4.9) == ["fresh", "old", "old-batch"]
    assert q.ordered(5.5) == ["old-batch", "fresh", "old"]  # held 5.5 s >= 5 s
    assert q.ordered(6.0) == ["old-batch", "old", "fresh"]


def test_drain_places_in_order_and_blocks_a_group_on_its_first_failure() -> None:
    q: DeadlineQueue[str] = DeadlineQueue("edf")
    handles = {}
    for name, deadline, group in (("a1", 1.0, "A"), ("b1", 2.0, "B"), ("a2", 3.0, "A"), ("b2", 4.0, "B")):
        handles[name] = q.push(name, now=0.0, deadline_s=deadline, group=group)
    asked: list[str] = []

    def place(item: str) -> bool:
        asked.append(item)
        return item != "a1"  # model A has no room

    assert q.drain(0.0, place) == 2
    assert asked == ["a1", "b1", "b2"]  # a2 is not asked: a1 blocks its group
    assert q.ordered(0.0) == ["a1", "a2"] and len(q) == 2 and q.groups == 1
    assert q.drain(0.0, lambda item: False) == 0 and len(q) == 2
    q.reprioritize(handles["a1"], 5)
    assert q.ordered(0.0) == ["a2", "a1"]
    assert q.remove(handles["a2"]) == "a2" and q.ordered(0.0) == ["a1"]
    with pytest.raises(KeyError):
        q.remove(handles["a2"])


def test_fifo_drain_stops_at_the_first_request_it_cannot_place() -> None:
    q: DeadlineQueue[int] = DeadlineQueue("fifo")
    for k in range(5):
        q.push(k, now=float(k), deadline_s=10.0 - k)
    asked: list[int] = []
    assert q.drain(9.0, lambda k: asked.append(k) is None and k < 2) == 2
    assert asked == [0, 1, 2] and q.ordered(9.0) == [2, 3, 4]
    with pytest.raises(ValueError, match="order"):
        DeadlineQueue("lifo")  # type: ignore[arg-type]
