"""CG-BPRR, its Theorem 2 bound, PETALS' rule, shortest chains and the improvements on CG-BPRR."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from place_cases import PLACE, instances, make_instance

from isthmus.place.algorithms import (
    PetalsParams,
    cg_bp,
    cg_bprr,
    conservative_counts,
    lexicographic_min_window,
    local_search,
    mean_cost,
    petals_counts,
    petals_placement,
    petals_routes,
    reservation_search,
    route_sessions,
    shortest_chain,
    theorem2_bound,
)
from isthmus.place.config import load_config
from isthmus.place.model import Instance, Placement, PlacementError, Route, route_cost
from isthmus.place.verify import check_placement, check_solution


def brute_force_chain(inst: Instance, placement: Placement, client: int) -> float:
    """Cheapest valid chain by enumerating every ordered subset of servers (tiny instances only)."""
    cost = inst.request_cost()
    best = np.inf
    used = [j for j in range(inst.n_servers) if placement.count[j] > 0]
    for size in range(1, len(used) + 1):
        for chain in itertools.permutations(used, size):
            reached, ok = 0, True
            for j in chain:
                a, e = int(placement.start[j]), int(placement.end[j])
                if not a <= reached + 1 <= e:
                    ok = False
                    break
                reached = e
            if ok and reached == inst.blocks:
                best = min(best, route_cost(cost, placement, Route(client, chain)))
    return float(best)


@settings(max_examples=120, deadline=None)
@given(inst=instances(max_servers=5, max_blocks=8), data=st.data())
def test_shortest_chain_matches_brute_force(inst: Instance, data: st.DataObject) -> None:
    n, blocks = inst.n_servers, inst.blocks
    count = np.array(data.draw(st.lists(st.integers(0, blocks), min_size=n, max_size=n)))
    start = np.array([data.draw(st.integers(1, blocks - m + 1)) if m else 1 for m in count])
    placement = Placement(start, count, np.zeros(n))
    cost = inst.request_cost()
    found = shortest_chain(placement, blocks, cost.hop_s[0], cost.block_s)
    expected = brute_force_chain(inst, placement, 0)
    if found is None:
        assert expected == np.inf
    else:
        assert found[0] == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert route_cost(cost, placement, Route(0, found[1])) == pytest.approx(found[0], rel=1e-12, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(inst=instances(), sessions=st.integers(1, 5))
def test_theorem2_bounds_cg_bprr(inst: Instance, sessions: int) -> None:
    """Theorem 2 (Sun et al.): mean per-token time <= sum_{j<=K} t~_j m_j - tau_K (sum m_j - L), when
    sessions take their shortest chain by per-token time; the same argument bounds session time."""
    try:
        placement, trace = cg_bp(inst, sessions)
    except PlacementError:
        assume(False)
        return
    for cost in (inst.decode_cost(), inst.request_cost()):
        routes = route_sessions(inst, placement, cost, sessions)
        bound = theorem2_bound(inst, placement, trace, cost)
        assert mean_cost(cost, placement, routes) <= bound * (1 + 1e-12) + 1e-12
    # the paper's form, written out: t~_j m_j = max_c t_cj + tau_j m_j
    top = trace.order[: trace.covering]
    m = placement.count[top]
    paper = float(np.sum(trace.amortized_s[top] * m) - inst.decode_s_per_block[top[-1]] * (m.sum() - inst.blocks))
    assert theorem2_bound(inst, placement, trace, inst.decode_cost()) == pytest.approx(paper, rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(inst=instances(), sessions=st.integers(1, 5))
def test_every_placement_covers_all_blocks_and_fits(inst: Instance, sessions: int) -> None:
    try:
        solution, _ = cg_bprr(inst, sessions)
    except PlacementError:
        # the only way CG-BPRR fails: the conservative counts cannot hold the model
        assert int(conservative_counts(inst, sessions).sum()) < inst.blocks
    else:
        assert check_solution(inst, solution.placement, solution.routes, sessions) == []
        # conservative counts: no cache ever runs short (Lemma 3), so every session of a client takes one chain
        for c in range(inst.n_clients):
            assert len({r.servers for r in solution.routes if r.client == c}) <= 1
        tuned, reserve, value = reservation_search(inst, sessions)
        assert 1 <= reserve <= sessions
        assert check_solution(inst, tuned.placement, tuned.routes, sessions) == []
        assert value <= mean_cost(inst.request_cost(), solution.placement, solution.routes) * (1 + 1e-12)
        ls = local_search(inst, tuned, sessions, max_evaluations=200)
        assert check_solution(inst, ls.solution.placement, ls.solution.routes, sessions) == []
        assert ls.objective_s <= value * (1 + 1e-12)
    params = PetalsParams(forward_rps=np.full(inst.n_servers, 1000.0), network_rps=np.full(inst.n_servers, 500.0),
                          cache_tokens=64, autograd_bytes=0.0)
    try:
        placement = petals_placement(inst, params, np.arange(inst.n_servers))
    except PlacementError:
        assert int(petals_counts(inst, params).sum()) < inst.blocks
    else:
        assert check_placement(inst, placement) == []


def test_conservative_counts_leave_cache_for_every_session() -> None:
    inst = make_instance([10.0, 10.0, 3.0], [1, 1, 1], [1, 1, 1], [[5, 5, 5]], blocks=6, cache_gb=0.5)
    m = conservative_counts(inst, 2)
    assert list(m) == [5, 5, 1]  # floor(10 / (1 + 0.5 * 2)), floor(3 / 2)
    placement, trace = cg_bp(inst, 2)
    sessions_fit = (inst.memory_bytes - inst.model.block_bytes * m) / (inst.cache_bytes * m)
    assert np.all(sessions_fit >= 2)
    assert trace.covering == 2 and check_placement(inst, placement) == []


def test_greedy_fills_left_to_right_in_order_of_amortized_time() -> None:
    # server 2 is fastest per block, then server 0; server 1 is far from the client
    inst = make_instance([5.0, 5.0, 5.0], [2.0, 2.0, 1.0], [1, 1, 1], [[10, 100, 10]], blocks=6, cache_gb=0.25)
    placement, trace = cg_bp(inst, 1)
    assert list(trace.order) == [2, 0, 1]
    assert list(placement.count) == [4, 4, 4]
    # first two servers placed: blocks 1-4, then the window reaching block 6; the third on the least-held blocks
    assert placement.start[2] == 1 and placement.start[0] == 3 and trace.covering == 2
    routes = route_sessions(inst, placement, inst.request_cost(), 1)
    assert routes == (Route(0, (2, 0)),)


def test_cg_bp_refuses_when_memory_cannot_hold_the_model() -> None:
    inst = make_instance([2.0, 2.0], [1, 1], [1, 1], [[5, 5]], blocks=5, cache_gb=0.5)
    with pytest.raises(PlacementError, match="fewer than the model's 5"):
        cg_bp(inst, 2)


def test_petals_block_selection_takes_the_least_served_window() -> None:
    # the authors' own check of PETALS' rule: 40 blocks at throughput 770, 30 unserved, 4 blocks to place
    throughputs = np.array([770.0] * 40 + [0.0] * 30)
    assert lexicographic_min_window(throughputs, 4) == 40
    assert lexicographic_min_window(np.array([3.0, 1.0, 1.0, 2.0, 1.0]), 2) == 1


def test_petals_rule_on_the_clustered_deployment() -> None:
    setup = load_config(PLACE / "clustered_9.yaml")
    inst, params = setup.instance, setup.petals
    counts = petals_counts(inst, params)
    # (79.138 GB - 2 GiB) / (1.32336 GB + 2 * 14336 * 4096 * 2 B) = 49; MIG slices capped at 4
    assert list(counts) == [49, 49] + [4] * 7
    placement = petals_placement(inst, params, np.arange(inst.n_servers))
    assert check_placement(inst, placement) == []
    # sessions hold 2 * 14336 * 148 * 2 B per block: 4096 / 148 sessions' worth per block held
    assert placement.cache_slots[0] == (49 * 4096 // 148)
    routes, short = petals_routes(inst, params, placement, 40)
    assert len(routes) == 40 and short > 0  # more sessions than its fixed cache budget holds


def test_cg_bprr_on_the_clustered_deployment() -> None:
    inst = load_config(PLACE / "clustered_9.yaml").instance
    solution, trace = cg_bprr(inst, 35)
    # 79.138 / (1.32336 + 35 * 2 * 14336 * 148 * 2 B) = 48.8: two A100s of 48 blocks cover the model
    assert list(solution.placement.count[:2]) == [48, 48] and trace.covering == 2
    assert {r.servers for r in solution.routes} == {(0, 1)}
    assert check_solution(inst, solution.placement, solution.routes, 35) == []


def test_reservation_search_escapes_the_conservative_trap() -> None:
    """The paper's suboptimality example: servers that could each hold the whole model for one session."""
    inst = load_config(PLACE / "tiny.yaml").instance
    cg, _ = cg_bprr(inst, 4)
    assert set(cg.placement.count) == {1} and all(len(r.servers) == 4 for r in cg.routes)
    tuned, reserve, value = reservation_search(inst, 4)
    assert reserve == 1 and all(len(r.servers) == 1 for r in tuned.routes)
    assert value < 0.4 * mean_cost(inst.request_cost(), cg.placement, cg.routes)


def test_local_search_improves_on_cg_bprr() -> None:
    """Two servers, four sessions: CG-BP reserves cache for all four on every block, so each server
    holds 3 of the 4 blocks and every session crosses both; the local search gives the second server
    the whole model, which it can serve alone for three of the four sessions."""
    inst = make_instance([8.0, 9.5], [9.3, 6.0], [21.1, 11.2], [[54, 92]], blocks=4, cache_gb=0.35)
    cg, _ = cg_bprr(inst, 4)
    start = mean_cost(inst.request_cost(), cg.placement, cg.routes)
    ls = local_search(inst, cg, 4)
    assert ls.moves >= 1 and ls.objective_s < 0.8 * start
    assert ls.initial_s == pytest.approx(start)
    assert check_solution(inst, ls.solution.placement, ls.solution.routes, 4) == []
    again = local_search(inst, cg, 4)
    assert again.objective_s == ls.objective_s and again.evaluations == ls.evaluations  # deterministic
