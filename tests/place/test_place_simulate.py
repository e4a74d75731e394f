"""The session simulator: conservation, determinism, closed-form back-off, WS-RR's waits."""

from __future__ import annotations

import numpy as np
import pytest
from place_cases import PLACE, make_instance

from isthmus.place.algorithms import PetalsParams, cg_bprr
from isthmus.place.config import load_config
from isthmus.place.model import Instance, Placement, Route, route_cost
from isthmus.place.simulate import Arrivals, RetryPolicy, make_router, poisson_arrivals, simulate


def two_whole_servers(slots: int = 4, far_ms: float = 60.0) -> tuple[Instance, Placement]:
    """Two servers holding the whole 4-block model, each with caches for one session; server 0 is
    near the client (10 ms), server 1 farther (``far_ms``)."""
    inst = make_instance([9.0, 9.0], [5.0, 5.0], [10.0, 10.0], [[10.0, far_ms]], blocks=4, cache_gb=0.5,
                         output_tokens=100, setup_ms=50.0)
    return inst, Placement(start=[1, 1], count=[4, 4], cache_slots=[slots, slots])


def session_time(inst: Instance, placement: Placement, server: int) -> float:
    return inst.session_setup_s + route_cost(inst.request_cost(), placement, Route(0, (server,)))


def test_retry_policy_is_petals_backoff() -> None:
    policy = RetryPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_poisson_arrivals_are_seeded_and_start_at_zero() -> None:
    a = poisson_arrivals(np.random.default_rng(3), 0.5, 4000, np.array([0.25, 0.75]))
    b = poisson_arrivals(np.random.default_rng(3), 0.5, 4000, np.array([0.25, 0.75]))
    assert np.array_equal(a.times_s, b.times_s) and np.array_equal(a.clients, b.clients)
    assert a.times_s[0] == 0 and np.all(np.diff(a.times_s) >= 0)
    assert np.mean(np.diff(a.times_s)) == pytest.approx(2.0, rel=0.05)
    assert np.mean(a.clients == 1) == pytest.approx(0.75, abs=0.03)


def test_without_contention_every_session_runs_as_predicted() -> None:
    inst, placement = two_whole_servers(slots=10_000)
    arrivals = poisson_arrivals(np.random.default_rng(0), 0.2, 50, inst.client_weights)
    res = simulate(inst, placement, make_router("ws_rr", inst, placement), arrivals)
    s = res.summary()
    near = session_time(inst, placement, 0)
    assert s["sessions"] == 50 and s["wait_s"] == 0 and s["retries_mean"] == 0 and s["hops_mean"] == 1
    assert np.allclose(res.end_s - res.arrival_s, near)
    assert s["time_per_token_s"] == pytest.approx(near / inst.output_tokens)
    prefill = inst.session_setup_s + route_cost(inst.prefill_cost(), placement, Route(0, (0,)))
    assert s["ttft_s"]["mean"] == pytest.approx(prefill)


def test_backoff_matches_the_closed_form() -> None:
    """One server with cache for one session: the second session retries after 1, 2, 4, ... s and
    starts at the first retry after the first session ends."""
    inst, _ = two_whole_servers()
    one = Placement(start=[1, 1], count=[4, 0], cache_slots=[4, 0])
    service = session_time(inst, one, 0)
    arrivals = Arrivals(times_s=np.array([0.0, 0.5]), clients=np.array([0, 0]))
    res = simulate(inst, one, make_router("ws_rr", inst, one), arrivals)
    t, n = 0.5, 0
    while t < service:
        n += 1
        t += min(2.0 ** (n - 1), 60.0)
    assert res.retries[1] == n and res.start_s[1] == pytest.approx(t)
    assert res.end_s[1] == pytest.approx(t + service) and res.max_concurrent == 1


def test_ws_rr_weighs_the_wait_against_a_slower_server() -> None:
    arrivals = Arrivals(times_s=np.array([0.0, 0.1]), clients=np.array([0, 0]))
    # a little farther (20 ms): the far server's session is shorter than waiting ~3 s for the near one
    inst, placement = two_whole_servers(far_ms=20.0)
    near, far = session_time(inst, placement, 0), session_time(inst, placement, 1)
    assert far < near - 0.1 + near
    ws = simulate(inst, placement, make_router("ws_rr", inst, placement), arrivals)
    assert ws.retries.sum() == 0 and ws.start_s[1] == pytest.approx(0.1) and ws.end_s[1] == pytest.approx(0.1 + far)
    # load-blind shortest chains wait for the near server instead
    blind = simulate(inst, placement, make_router("shortest", inst, placement), arrivals)
    assert blind.retries[1] > 0 and blind.start_s[1] >= blind.end_s[0]
    # much farther (60 ms): waiting for the near server is quicker, and WS-RR waits
    inst, placement = two_whole_servers(far_ms=60.0)
    near, far = session_time(inst, placement, 0), session_time(inst, placement, 1)
    assert near - 0.1 + near < far
    ws = simulate(inst, placement, make_router("ws_rr", inst, placement), arrivals)
    assert ws.retries[1] == 2 and ws.start_s[1] == pytest.approx(3.1)  # retries at 1.1 s and 3.1 s
    assert ws.end_s[1] == pytest.approx(3.1 + near)


def test_petals_router_penalises_full_servers() -> None:
    inst, placement = two_whole_servers(far_ms=60.0)
    arrivals = Arrivals(times_s=np.array([0.0, 0.1]), clients=np.array([0, 0]))
    params = PetalsParams(forward_rps=np.ones(2), network_rps=np.ones(2), alloc_penalty_s=10.0)
    res = simulate(inst, placement, make_router("petals", inst, placement, params), arrivals)
    assert res.retries.sum() == 0  # the penalty sends the second session to the far server
    lax = PetalsParams(forward_rps=np.ones(2), network_rps=np.ones(2), alloc_penalty_s=0.0)
    res = simulate(inst, placement, make_router("petals", inst, placement, lax), arrivals)
    assert res.retries[1] > 0


def test_simulation_is_deterministic_and_conserves_sessions() -> None:
    setup = load_config(PLACE / "clustered_9.yaml")
    inst = setup.instance
    solution, _ = cg_bprr(inst, 10)  # provisioned well below the offered load: sessions must wait
    arrivals = poisson_arrivals(np.random.default_rng(1), 0.5, 60, inst.client_weights)
    runs = [simulate(inst, solution.placement, make_router("ws_rr", inst, solution.placement), arrivals)
            for _ in range(2)]
    a, b = runs
    for field in ("start_s", "first_token_s", "end_s", "retries", "hops"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.all(np.isfinite(a.end_s)) and np.all(a.start_s >= a.arrival_s)
    assert np.all(a.first_token_s > a.start_s) and np.all(a.end_s > a.first_token_s)
    assert a.summary()["sessions"] == 60


def test_unknown_router_is_refused() -> None:
    inst, placement = two_whole_servers()
    with pytest.raises(ValueError, match="unknown router"):
        make_router("fastest", inst, placement)
    with pytest.raises(ValueError, match="PetalsParams"):
        make_router("petals", inst, placement)
