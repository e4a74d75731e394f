"""GORGO: the proxy's argmin of queue + prefill + RTT, and the distributed balancer's forwarding rule."""

from __future__ import annotations

import pytest
from policy_fakes import FakePrefixView, RttTable, req, snap, view

from isthmus.core.policy import CostBreakdown
from isthmus.policies import default_registry

T_P = 1e-4
RTT = RttTable({("east", "west"): 0.25, ("east", "south"): 0.4, ("west", "south"): 0.3}, intra_s=0.002)


# The paper's settings: an in-flight cap of 10 at the proxy; room = fewer than 5 running, and a
# peer priced without a queue term. The defaults differ (no caps, room = empty engine queue, peers'
# queues priced); tests of the defaults are at the end.
PAPER_PROXY = {"max_in_flight": 10, "q_hat": 1.0}
PAPER_GORGO = {"local_running_cap": 5, "local_max_waiting": None, "peer_queue": False, "q_hat": 1.0}


def proxy(**params: object):
    return default_registry().create("gorgo_proxy", {"t_p_s": T_P, **PAPER_PROXY, **params})


def gorgo(**params: object):
    return default_registry().create("gorgo", {"t_p_s": T_P, **PAPER_GORGO, **params})


# ------------------------------------------------------------------------------------------ gorgo_proxy
@pytest.mark.parametrize(("queued", "winner"), [(2479, "near"), (2481, "far")])
def test_proxy_trades_rtt_against_queue_exactly_by_its_formula(queued, winner):
    # near: 0.002 + T_P * queued + T_P * 1600; far: 0.25 + T_P * 1600 -> equal at 2480 queued tokens
    vs = [view("near", "east", queued_prefill_tokens=queued), view("far", "west")]
    d = proxy().choose(req(origin="east", prompt=1600), snap(vs, rtt=RTT))
    assert d.target == winner
    if winner == "far":
        assert d.estimate == CostBreakdown(0.25, 0.0, T_P * 1600, 0.25 + T_P * 1600)
    else:
        e = d.estimate
        assert (e.network_s, e.queue_s, e.prefill_s) == (0.002, T_P * queued, T_P * 1600)
        assert e.total_s == pytest.approx(0.002 + T_P * (queued + 1600))


def test_proxy_weighs_running_tokens_by_q_hat_and_credits_cached_prefixes():
    vs = [view("a", running_tokens=1000, queued_prefill_tokens=500), view("b", queued_prefill_tokens=1100)]
    # q_hat = 1: a 1500 queued-equivalent tokens vs b 1100 -> b; q_hat = 0.5: a 1000 vs 1100 -> a
    assert proxy().choose(req(), snap(vs)).target == "b"
    d = proxy(q_hat=0.5).choose(req(), snap(vs))
    assert d.target == "a" and d.estimate.queue_s == pytest.approx(T_P * 1000)
    # 50 cached blocks on a save 800 prefill tokens
    d = proxy().choose(req(prompt=1600), snap(vs, prefix=FakePrefixView({"a": 50})))
    assert d.target == "a" and d.estimate.prefill_s == pytest.approx(T_P * 800)


def test_proxy_caps_in_flight_and_queues_when_every_replica_is_at_the_cap():
    vs = [view("cheap", in_flight=10), view("dear", "west", in_flight=9)]
    assert proxy().choose(req(), snap(vs, rtt=RTT)).target == "dear"
    vs = [view("cheap", in_flight=10), view("dear", "west", in_flight=12)]
    d = proxy().choose(req(), snap(vs, rtt=RTT))
    assert d.target is None and not d.forward
    assert proxy(max_in_flight=11).choose(req(), snap(vs, rtt=RTT)).target == "cheap"


def test_proxy_prefill_time_per_replica_profile_override_and_fallback():
    vs = [view("a", prefill_s_per_token=2e-4), view("b")]  # b: unknown -> 0.0938 ms
    d = default_registry().create("gorgo_proxy").choose(req(prompt=1000), snap(vs))
    assert d.target == "b" and d.estimate.prefill_s == pytest.approx(0.0938e-3 * 1000)
    d = default_registry().create("gorgo_proxy", {"default_t_p_s": 3e-4}).choose(req(prompt=1000), snap(vs))
    assert d.target == "a"
    d = proxy().choose(req(prompt=1000), snap(vs))  # t_p_s overrides both: tie, snapshot order
    assert d.target == "a" and d.estimate.prefill_s == pytest.approx(T_P * 1000)


# ------------------------------------------------------------------------------------------ gorgo
def _busy_local(**kw: object):
    return view("e0", "east", running=5, running_tokens=3000, queued_prefill_tokens=2000, **kw)


def test_serves_locally_while_a_local_replica_has_room():
    vs = [view("e0", "east", running=4, queued_prefill_tokens=50_000), view("w0", "west")]
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT, prefix=FakePrefixView({"w0": 100})))
    assert d.target == "e0" and not d.forward
    assert d.estimate == CostBreakdown(0.002, T_P * 50_000, T_P * 1600, 0.002 + T_P * 51_600)
    # among local replicas with room, the cheapest; a cheaper one without room is skipped
    vs = [view("e0", "east", running=5), view("e1", "east", running=1, queued_prefill_tokens=900),
          view("e2", "east", running=0, queued_prefill_tokens=800, kv_usage=0.96)]
    assert gorgo().choose(req(), snap(vs, rtt=RTT)).target == "e1"


def test_forwards_to_the_cheapest_peer_only_when_it_beats_local():
    # C_local = T_P * (3000 + 2000 + 1600) = 0.66; C_west = 0.25 + 0.16 = 0.41; C_south = 0.4 + 0.16
    vs = [_busy_local(), view("w0", "west"), view("s0", "south")]
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT))
    assert (d.target, d.forward) == ("west", True)
    assert d.estimate == CostBreakdown(0.25, 0.0, T_P * 1600, 0.25 + T_P * 1600)
    # 98 of 100 blocks cached on the farther peer: C_south = 0.4 + T_P * 32 = 0.4032 < C_west = 0.41
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT, prefix=FakePrefixView({"s0": 98})))
    assert (d.target, d.forward) == ("south", True)
    # local cheaper than every peer: hold, do not forward
    vs = [view("e0", "east", running=5, queued_prefill_tokens=1000), view("w0", "west")]
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT))  # C_local = 0.26 < 0.41
    assert d.target is None and not d.forward


def test_never_forwards_a_request_that_was_already_forwarded():
    vs = [_busy_local(), view("w0", "west")]
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT, hops=1))
    assert d.target is None and not d.forward
    vs = [view("e0", "east", running=2), view("w0", "west")]
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT, hops=1, prefix=FakePrefixView({"w0": 100})))
    assert d.target == "e0" and not d.forward


def test_peers_without_room_are_not_forwarded_to():
    vs = [_busy_local(), view("w0", "west", running=5), view("s0", "south", kv_usage=0.99),
          view("s1", "south", healthy=False)]
    d = gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT))
    assert d.target is None
    vs = [_busy_local(), view("w0", "west", running=5), view("s0", "south")]
    assert gorgo().choose(req(prompt=1600), snap(vs, rtt=RTT)).target == "south"


def test_forwards_when_no_local_replica_is_available_and_holds_when_nothing_is():
    vs = [view("e0", "east", healthy=False), view("w0", "west", running=4)]
    d = gorgo().choose(req(), snap(vs, rtt=RTT))
    assert (d.target, d.forward) == ("west", True)
    assert gorgo().choose(req(), snap([view("e0", "east", full=True)], rtt=RTT)).target is None


def test_caps_and_shell_periods_are_parameters():
    pol = gorgo(local_running_cap=8, local_kv_cap=0.99, recheck_s=0.05, sync_period_s=2)
    assert (pol.recheck_s, pol.sync_period_s) == (0.05, 2.0)
    vs = [_busy_local(kv_usage=0.97), view("w0", "west")]
    assert pol.choose(req(prompt=1600), snap(vs, rtt=RTT)).target == "e0"
    default = default_registry().create("gorgo")
    assert (default.recheck_s, default.sync_period_s) == (0.02, 1.0)


# ------------------------------------------------------------------------------------------ defaults
def test_default_proxy_caps_nothing():
    vs = [view("cheap", in_flight=500)]
    pol = default_registry().create("gorgo_proxy", {"t_p_s": T_P})
    assert pol.choose(req(), snap(vs, rtt=RTT)).target == "cheap"


def test_default_room_is_an_empty_engine_queue():
    pol = default_registry().create("gorgo", {"t_p_s": T_P})
    vs = [view("e0", "east", running=40, running_tokens=100, queued_prefill_tokens=0), view("w0", "west")]
    assert pol.choose(req(prompt=1600), snap(vs, rtt=RTT)).target == "e0"  # 40 running, nothing waiting


def test_default_prices_a_peers_queue_and_what_was_forwarded_since_its_view():
    pol = default_registry().create("gorgo", {"t_p_s": T_P})
    # local: 1 waiting, C_local = T_P * (1.0 * 3000 + 2000 + 1600) = 0.66
    pol = default_registry().create("gorgo", {"t_p_s": T_P, "q_hat": 1.0})
    local = view("e0", "east", running=5, waiting=1, running_tokens=3000, queued_prefill_tokens=2000)
    # west, as polled 0.5 s ago: C = 0.25 + T_P * (1000 + 1600) = 0.51 -> forward
    west = view("w0", "west", queued_prefill_tokens=1000, age=0.5)
    d = pol.choose(req(prompt=1600), snap([local, west], rtt=RTT, now=10.0))
    assert (d.target, d.forward) == ("west", True)
    assert d.estimate.queue_s == pytest.approx(T_P * 1000)
    # the same view again: the 1,600 tokens just forwarded now count: 0.25 + T_P * 4200 = 0.67 > 0.66
    d = pol.choose(req(prompt=1600), snap([local, west], rtt=RTT, now=10.1))
    assert d.target is None and not d.forward
