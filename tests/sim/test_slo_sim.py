"""SLO classes end to end in the simulator: scenario files, class assignment, the deadline-ordered router
queue, policy rejections, engine priorities, attainment, the estimator's error and the money."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from isthmus.core import (
    SLO,
    ConfigError,
    Decision,
    InstanceSpec,
    Outcome,
    Request,
    Topology,
    builtin_perf_model,
)
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.engine import Replica
from isthmus.policies import default_registry
from isthmus.sim import Simulation
from isthmus.sim.report import comparison_table, policy_table, result_record
from isthmus.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]

SCENARIO = textwrap.dedent("""\
    name: slo_small
    topology:
      regions: [east, west]
      rtt_ms: {east: {west: 80}}
      gpu_usd_per_hour: {A100: 2.0, A30: 0.5}
      egress_usd_per_gb: {east: {west: 0.02}}
    replicas:
      - {region: east, gpu: A100, model: Llama-3.1-8B}
      - {region: west, gpu: A30, model: Llama-3.1-8B}
    workload:
      kind: poisson
      rate_rps: 12
      limit: 300
      lengths: {dist: lognormal, prompt_tokens: 900, output_tokens: 120, prompt_sigma: 0.6, output_sigma: 0.8}
    slo:
      classes:
        - {name: interactive, ttft_ms: 800, tpot_ms: 60}
        - {name: batch, e2e_ms: 15000, priority: 1}
      shares: {interactive: 0.7, batch: 0.3}
    router: {region: east}
    policies:
      - least_load
      - {name: slo, label: slo_reject, params: {unattainable: reject}}
    seed: 4
    """)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_scenario(write(tmp_path, text))
    return str(info.value)


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize(("old", "new", "where", "what"), [
    ("shares: {interactive: 0.7, batch: 0.3}", "shares: {interactive: 0.7, gold: 0.3}",
     ":19: slo.shares.gold", "unknown SLO class 'gold'"),
    ("- {name: batch, e2e_ms: 15000, priority: 1}", "- {name: interactive, e2e_ms: 15000}",
     ":18: slo.classes.1.name", "duplicate SLO class 'interactive'"),
    ("- {name: batch, e2e_ms: 15000, priority: 1}", "- {name: batch, priority: 1}",
     ":18: slo.classes.1", "needs at least one of ttft_ms"),
    ("ttft_ms: 800", "ttft_ms: -800", ":17: slo.classes.0.ttft_ms", "greater than 0"),
    ("shares: {interactive: 0.7, batch: 0.3}", "shares: {interactive: 0, batch: 0}",
     ":19: slo.shares", "positive sum"),
    ("shares: {interactive: 0.7, batch: 0.3}", "default: gold", ":19: slo.default", "unknown SLO class 'gold'"),
    ("router: {region: east}", "router: {region: east, queue: lifo}", ":20: router.queue", "'fifo' or 'edf'"),
    ("router: {region: east}", "router: {region: east, max_hold_s: 0}", ":20: router.max_hold_s", "greater than 0"),
    ("egress_usd_per_gb: {east: {west: 0.02}}", "egress_usd_per_gb: {east: {west: 0.02}}\n  bytes_per_token: -1",
     ":7: topology.bytes_per_token", "greater than or equal to 0"),
    ("params: {unattainable: reject}", "params: {unattainable: drop}", ":23: policies.1",
     "unattainable must be one of"),
])
def test_bad_slo_settings_name_the_file_line_and_field(tmp_path: Path, old: str, new: str, where: str,
                                                       what: str) -> None:
    assert old in SCENARIO
    msg = error_of(tmp_path, SCENARIO.replace(old, new))
    assert where in msg and what in msg, msg


def test_classes_are_drawn_from_their_own_stream(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, SCENARIO))
    start, end = SCENARIO.index("slo:\n"), SCENARIO.index("router:")
    plain = load_scenario(write(tmp_path, SCENARIO[:start] + SCENARIO[end:]))
    a, b, c = list(sc.requests(4)), list(sc.requests(4)), list(plain.requests(4))
    assert a == b and all(r.slo is None for r in c)
    assert [(r.arrival, r.prompt_tokens, r.origin) for r in a] == [(r.arrival, r.prompt_tokens, r.origin) for r in c]
    names = [r.slo.name for r in a if r.slo is not None]
    assert len(names) == 300 and 0.6 < names.count("interactive") / 300 < 0.8
    assert {r.slo for r in a} == {SLO("interactive", ttft_s=0.8, tpot_s=0.06), SLO("batch", e2e_s=15.0, priority=1)}
    assert [r.slo for r in sc.requests(5)] != [r.slo for r in a]


def test_per_session_classes_keep_a_conversation_in_one_class(tmp_path: Path) -> None:
    text = SCENARIO.replace("kind: poisson", "kind: sessions\n  turns_mean: 4\n  think_time_s: 1").replace(
        "shares: {interactive: 0.7, batch: 0.3}", "shares: {interactive: 0.5, batch: 0.5}\n  per_session: true")
    reqs = list(load_scenario(write(tmp_path, text)).requests(1))
    by_session: dict[str, set[str]] = {}
    for r in reqs:
        assert r.session is not None and r.slo is not None
        by_session.setdefault(r.session, set()).add(r.slo.name)
    assert all(len(v) == 1 for v in by_session.values())
    assert {n for v in by_session.values() for n in v} == {"interactive", "batch"}


def test_the_bundled_scenario_runs_every_policy_on_a_short_prefix() -> None:
    sc = load_scenario(REPO / "scenarios" / "slo_multiregion.yaml").with_workload(limit=150)
    assert sc.router_setup("slo").queue == "edf" and sc.router_setup("least_load").queue == "fifo"
    assert sc.router_setup("slo_hold_fifo").queue == "fifo"
    for p in sc.config.policies:
        s = sc.run(p.key).summary()
        assert s["slo"]["requests"] == 150 and s["cost"]["usd_per_mtok"] > 0


# ------------------------------------------------------------------------------------------ runs
def test_reject_counts_the_refused_and_conserves_requests(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, SCENARIO.replace("rate_rps: 12", "rate_rps: 30")))
    res = sc.run("slo_reject")
    s = res.summary()
    slo = s["slo"]
    assert res.completed + res.rejected == res.requests == 300
    assert slo["rejected"] == res.rejected > 0 and slo["rejections"] == {"slo_unattainable": res.rejected}
    assert sum(c["requests"] for c in slo["classes"].values()) == 300
    for c in slo["classes"].values():
        assert c["attainment"] == pytest.approx(c["attained"] / c["requests"])
        assert c["completed"] + c["rejected"] == c["requests"]
    span = float(res.finish_s.max() - res.arrival_s.min())
    assert slo["goodput_rps"] == pytest.approx(slo["attained"] / span)
    # attainment recomputed from the per-request figures
    met = [((t <= 0.8) and not (p > 0.06)) if k == 0 else (e <= 15.0)
           for k, t, p, e in zip(res.slo_class, res.ttft_s, res.tpot_s, res.e2e_s, strict=True)]
    assert slo["attained"] == sum(met)
    again = sc.run("slo_reject").summary()
    assert again == s  # same seed, same figures
    base = sc.run("least_load").summary()
    assert base["slo"]["rejected"] == 0 and "estimator" not in base
    assert slo["attainment"] > base["slo"]["attainment"]


def test_estimator_error_is_reported_against_the_simulated_outcome(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, SCENARIO))
    res = sc.run("slo_reject")
    est = res.summary()["estimator"]
    ok = np.isfinite(res.pred_ttft_s)
    assert est["ttft"]["n"] == ok.sum() == res.completed > 200
    err = res.pred_ttft_s[ok] - res.ttft_s[ok]
    assert est["ttft"]["abs_err_s"]["mean"] == pytest.approx(np.abs(err).mean())
    assert est["ttft"]["bias_s"] == pytest.approx(err.mean())
    assert est["ttft"]["rel_err"]["p50"] < 0.5 and est["tpot"]["n"] == est["e2e"]["n"] == est["ttft"]["n"]
    record = result_record("slo_reject", res.summary())
    text = "".join(str(x) for x in (policy_table(record).renderables, comparison_table([record]).renderables))
    assert "SLO" in text


def test_plain_runs_report_nothing_new() -> None:
    topo = Topology.from_pairs(["east"], {})
    reqs = [Request(f"r{i}", i * 0.1, "east", 64, (), 4) for i in range(20)]
    s = Simulation(topo, [InstanceSpec("e0", "east", "A100", "Mistral-7B")],
                   default_registry().create("least_load"), reqs).run().summary()
    assert not {"slo", "cost", "estimator", "demoted"} & set(s)


def test_money_adds_up_by_hand() -> None:
    topo = Topology.from_pairs(["east", "west"], {("east", "west"): 100.0}, gpu_usd_per_hour={"A100-80GB": 3.6},
                               egress_usd_per_gb=np.array([[0.0, 0.5], [0.5, 0.0]]), bytes_per_token=4.0)
    req = Request("r0", 0.0, "east", 1000, (), 10)
    res = Simulation(topo, [InstanceSpec("e0", "east", "A100-80GB", "Llama-3.1-8B")],
                     default_registry().create("least_load"), [req], router_region="west").run()
    c = res.summary()["cost"]
    # east -> west (router) -> east (replica): two crossings each way, prompt in and output out
    assert c["egress_gb"] == pytest.approx(2 * (1000 + 10) * 4.0 / 1e9)
    assert c["egress_usd"] == pytest.approx(2 * (1000 + 10) * 4.0 * 0.5 / 1e9)
    e2e = float(res.e2e_s[0])
    assert c["gpu_usd_provisioned"] == pytest.approx(e2e * 3.6 / 3600)
    assert c["gpu_hours_busy"] == pytest.approx((e2e - 0.2) / 3600)  # busy from delivery to the last token
    assert c["tokens"] == 1010
    assert c["usd_per_mtok"] == pytest.approx((c["gpu_usd_provisioned"] + c["egress_usd"]) / 1010 * 1e6)
    assert c["usd_per_mtok_busy"] == pytest.approx((c["gpu_usd_busy"] + c["egress_usd"]) / 1010 * 1e6)


# ------------------------------------------------------------------------------------------ queue order
class Gate:
    """Holds everything until ``open_at``, then places one request per round (a fake policy)."""

    name = "gate"
    uses_prefix = False

    def __init__(self, open_at: float) -> None:
        self.open_at = open_at
        self.last_now = -1.0
        self.order: list[str] = []

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        if snapshot.now < self.open_at or snapshot.now == self.last_now:
            return Decision(None)
        self.last_now = snapshot.now
        self.order.append(request.id)
        return Decision("e0")

    def observe(self, outcome: Outcome) -> None:
        return None


ONE = Topology.from_pairs(["east"], {})
BATCH = SLO("batch", e2e_s=20.0, priority=1)
INTERACTIVE = SLO("interactive", ttft_s=1.0)
GOLD = SLO("gold", ttft_s=0.5)


def _release_order(reqs: list[Request], **kw: object) -> list[str]:
    gate = Gate(open_at=1.0)
    res = Simulation(ONE, [InstanceSpec("e0", "east", "A100", "Mistral-7B")], gate, reqs, **kw).run()  # type: ignore[arg-type]
    assert res.completed == len(reqs)
    return gate.order


def test_held_requests_leave_earliest_deadline_first_or_in_arrival_order() -> None:
    reqs = [Request("batch", 0.00, "east", 64, (), 2, slo=BATCH),
            Request("interactive", 0.01, "east", 64, (), 2, slo=INTERACTIVE),
            Request("gold", 0.02, "east", 64, (), 2, slo=GOLD),
            Request("none", 0.03, "east", 64, (), 2),
            Request("interactive2", 0.04, "east", 64, (), 2, slo=INTERACTIVE)]
    assert _release_order(reqs) == ["batch", "interactive", "gold", "none", "interactive2"]
    assert _release_order(reqs, queue_order="edf", max_hold_s=100.0) == [
        "gold", "interactive", "interactive2", "none", "batch"]


def test_starvation_protection_serves_a_request_held_too_long_first() -> None:
    reqs = [Request("old-batch", 0.0, "east", 64, (), 2, slo=BATCH)]
    reqs += [Request(f"i{k}", 0.9 + k * 0.001, "east", 64, (), 2, slo=INTERACTIVE) for k in range(3)]
    assert _release_order(reqs, queue_order="edf", max_hold_s=100.0) == ["i0", "i1", "i2", "old-batch"]
    assert _release_order(reqs, queue_order="edf", max_hold_s=0.5) == ["old-batch", "i0", "i1", "i2"]


# ------------------------------------------------------------------------------------------ engine
def test_engine_admits_lower_priority_values_first_and_keeps_arrival_order_within_one() -> None:
    spec = InstanceSpec("e0", "east", "A100", "Mistral-7B", max_num_seqs=1)
    rep = Replica(spec, builtin_perf_model("A100", "Mistral-7B"), 1000)
    rep.add_request(Request("first", 0.0, "east", 32, (), 1), 0.0)
    rep.add_request(Request("second", 0.0, "east", 32, (), 8), 0.0)
    first = rep.step(0.0, horizon=0.0)  # "first" runs alone and finishes; "second" takes the only slot
    assert first is not None and [f.request.id for f in first.finished] == ["first"]
    rep.step(first.duration, horizon=first.duration)  # the rest wait for the single sequence slot
    for rid, prio in (("low-a", 5), ("normal-a", 0), ("low-b", 5), ("urgent", -1), ("normal-b", 0)):
        rep.add_request(Request(rid, 0.0, "east", 32, (), 1), 0.0, priority=prio)
        rep.check()
    assert [s.req.id for s in rep.waiting] == ["urgent", "normal-a", "normal-b", "low-a", "low-b"]
    v = rep.view()
    assert v.deferred_waiting == 2 and v.deferred_prefill_tokens == 64 and v.model == "Mistral-7B"
    done: list[str] = []
    t = 1.0
    while rep.has_work:
        res = rep.step(t, horizon=t)
        assert res is not None
        done += [f.request.id for f in res.finished]
        t += res.duration
        rep.check()
    assert done == ["second", "urgent", "normal-a", "normal-b", "low-a", "low-b"]
    assert math.isfinite(t)


def test_regional_routers_with_deadline_queues_forward_and_conserve_requests(tmp_path: Path) -> None:
    text = SCENARIO.replace("router: {region: east}", "router: {mode: regional, queue: edf, max_hold_s: 2}").replace(
        "rate_rps: 12", "rate_rps: 30").replace(
        "  - least_load\n", "  - gorgo\n  - {name: slo, label: slo_hold, params: {max_waiting: 1}}\n")
    sc = load_scenario(write(tmp_path, text))
    gorgo = sc.run("gorgo")
    assert gorgo.completed == 300 and gorgo.counters["forwards"] > 0 and gorgo.counters["held"] > 0
    held = sc.run("slo_hold")
    assert held.completed == 300 and held.counters["held"] > 0
    rejecting = sc.run("slo_reject")
    assert rejecting.completed + rejecting.rejected == 300 and rejecting.rejected > 0
