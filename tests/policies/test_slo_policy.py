"""The ``slo`` policy: feasible-and-cheapest placement, the unattainable actions, learning from outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from policy_fakes import RttTable, snap, view

from isthmus.core import SLO, Outcome, Request, Topology
from isthmus.core.errors import RegistryError
from isthmus.core.policy import REJECT_SLO
from isthmus.policies import SLOPolicy, default_registry

INTERACTIVE = SLO("interactive", ttft_s=1.0, tpot_s=0.08)
BATCH = SLO("batch", e2e_s=20.0, priority=1)
RTT = RttTable({("east", "west"): 0.1}, intra_s=0.002)
PRICES = Topology.from_pairs(["east", "west"], {("east", "west"): 100.0},
                             gpu_usd_per_hour={"H100": 4.0, "A30": 0.5})


def make(**params: object) -> SLOPolicy:
    pol = default_registry().create("slo", params, rng=np.random.default_rng(0))
    assert isinstance(pol, SLOPolicy)
    return pol


def req(rid: str = "r0", slo: SLO | None = INTERACTIVE, prompt: int = 1000, arrival: float = 0.0,
        origin: str = "east", model: str | None = None) -> Request:
    return Request(rid, arrival, origin, prompt, (), 100, slo=slo, model=model)


def fast(rid: str = "fast", **kw: object) -> object:
    return view(rid, "east", gpu="H100", prefill_s_per_token=5e-5, decode_step_s=0.01, **kw)


def slow(rid: str = "slow", **kw: object) -> object:
    return view(rid, "east", gpu="A30", prefill_s_per_token=2.5e-4, decode_step_s=0.03, **kw)


def test_parameters_are_checked() -> None:
    reg = default_registry()
    for bad in ({"unattainable": "drop"}, {"alpha": -1}, {"queue": "lifo"}, {"max_waiting": -1},
                {"demote_by": 0}, {"tpot_learning_rate": 2}):
        with pytest.raises(RegistryError, match="slo"):
            reg.create("slo", bad)
    assert make(queue="fifo").queue_order == "fifo" and make().queue_order == "edf"


def test_picks_the_fastest_replica_that_meets_the_slo_at_alpha_zero() -> None:
    s = snap([slow(), fast(queued_prefill_tokens=2000)])
    d = make().choose(req(), s)
    # fast: 0.1 s queue + 0.05 s prefill + 99 x 10 ms decode; slow: 0.25 s prefill + 99 x 30 ms
    assert d.target == "fast" and d.reject is None and d.priority == 0
    e = d.estimate
    assert e.queue_s == pytest.approx(0.1) and e.prefill_s == pytest.approx(0.05)
    assert e.total_s == pytest.approx(e.network_s + e.queue_s + e.prefill_s)
    assert e.ttft_s == pytest.approx(e.total_s) and e.e2e_s == pytest.approx(e.ttft_s + e.decode_s)
    assert e.tpot_s == pytest.approx(0.01)


def test_alpha_trades_time_for_money() -> None:
    s = snap([fast(), slow()])
    s = type(s)(now=s.now, here=s.here, instances=s.instances, rtt_s=s.rtt_s, prefix=s.prefix, prices=PRICES)
    batch = req(slo=BATCH)
    assert make(alpha=0.0).choose(batch, s).target == "fast"
    d = make(alpha=1e6).choose(batch, s)
    assert d.target == "slow" and d.estimate.usd > 0  # both meet 20 s; the A30 costs less


def test_each_unattainable_action() -> None:
    s = snap([slow(queued_prefill_tokens=20_000), fast(queued_prefill_tokens=40_000)])
    r = req(prompt=2000)  # TTFT target 1 s; the best replica needs > 2 s
    best = make().choose(r, s)
    assert best.target is not None and best.reject is None and best.priority == 0
    assert math.isfinite(best.estimate.ttft_s) and best.estimate.ttft_s > 1.0
    low = make(unattainable="deprioritize").choose(r, s)
    assert low.target == best.target and low.priority == 10
    assert math.isnan(low.estimate.ttft_s)  # no prediction: it will not run at the planned priority
    assert make(unattainable="deprioritize", demote_by=3).choose(req(slo=SLO("b", ttft_s=0.1, priority=1)),
                                                                 s).priority == 4
    rej = make(unattainable="reject").choose(r, s)
    assert rej.target is None and rej.reject == REJECT_SLO
    assert "'interactive'" in rej.reason and "TTFT" in rej.reason and "> 1 s" in rej.reason


def test_holds_without_room_and_rejects_early_when_lost_anyway() -> None:
    s = snap([fast(waiting=3), slow(waiting=5)])
    pol = make(max_waiting=2, unattainable="reject")
    d = pol.choose(req(), s)
    assert d.target is None and d.reject is None  # could still make it: wait for room
    late = req(arrival=-5.0)  # waited 5 s already: no replica can meet 1 s any more
    d = pol.choose(late, s)
    assert d.reject == REJECT_SLO
    d = make(max_waiting=2, unattainable="deprioritize").choose(late, s)
    assert d.target is None and d.reject is None and d.priority == 10
    d = make(max_waiting=2).choose(late, s)
    assert d.target is None and d.priority == 0
    assert make(max_waiting=2).choose(req(), snap([fast(waiting=1), slow(waiting=5)])).target == "fast"


def test_no_candidate_and_model_filter() -> None:
    assert make().choose(req(), snap([fast(healthy=False)])).target is None
    s = snap([fast(model="other"), slow(model="llama")])
    assert make().choose(req(model="llama"), s).target == "slow"
    assert make().choose(req(slo=None), s).target == "fast"  # no model asked for, no SLO: fastest


def test_output_history_and_tpot_correction_are_learned_from_outcomes() -> None:
    pol = make(min_samples=2, tpot_learning_rate=0.25)
    s = snap([fast()])
    for k in range(3):
        r = Request(f"r{k}", 0.0, "east", 1000, (), 401, slo=BATCH)
        d = pol.choose(r, s)
        assert d.target == "fast"
        # what happened: 400 tokens after the first at 20 ms each, twice the profile's 10 ms
        pol.observe(Outcome(r, "fast", 0.0, ttft_s=0.2, e2e_s=0.2 + 400 * 0.02, cached_tokens=0))
    assert pol.lengths.predict("batch")[0] == pytest.approx(401.0)
    assert pol.tpot_scale("fast") == pytest.approx(2.0)  # observed 20 ms / predicted 10 ms, every time
    d = pol.choose(Request("r9", 0.0, "east", 1000, (), 5, slo=BATCH), s)
    assert d.estimate.decode_s == pytest.approx(400 * 0.01 * pol.tpot_scale("fast"))
    # a failed outcome teaches nothing
    pol.observe(Outcome(Request("x", 0.0, "east", 10, (), 9000, slo=BATCH), "fast", 0.0, 1.0, 2.0, 0, ok=False))
    assert pol.lengths.count("batch") == 3


def test_same_inputs_same_decisions() -> None:
    rng = np.random.default_rng(5)
    cases = []
    for k in range(30):
        vs = [fast(queued_prefill_tokens=int(rng.integers(0, 30_000)), running=int(rng.integers(0, 50))),
              slow(queued_prefill_tokens=int(rng.integers(0, 10_000))),
              view("w", "west", gpu="A30", prefill_s_per_token=1e-4, waiting=int(rng.integers(0, 6)))]
        cases.append((req(f"r{k}", slo=(INTERACTIVE, BATCH, None)[k % 3], arrival=k * 0.1),
                      snap(vs, now=k * 0.1 + 0.01, rtt=RTT)))
    a, b = make(max_waiting=3, unattainable="reject"), make(max_waiting=3, unattainable="reject")
    assert [repr(a.choose(r, s)) for r, s in cases] == [repr(b.choose(r, s)) for r, s in cases]
