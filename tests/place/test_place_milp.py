"""The joint MILP (HiGHS through scipy): optimum at most CG-BPRR, statuses never taken for optimal,
solutions checked."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from place_cases import PLACE, instances, make_instance

from isthmus.place.algorithms import cg_bprr, mean_cost
from isthmus.place.config import load_config
from isthmus.place.milp import _build, _Program, interpret, solve_milp
from isthmus.place.model import Instance, ModelSpec, PlacementError
from isthmus.place.verify import check_solution

pytest.importorskip("scipy.optimize")


def test_tiny_optimum_beats_cg_bprr_by_its_known_margin() -> None:
    inst = load_config(PLACE / "tiny.yaml").instance
    out = solve_milp(inst, 4, time_limit_s=20)
    assert out.status == "optimal" and out.optimal and out.solution is not None
    assert check_solution(inst, out.solution.placement, out.solution.routes, 4) == []
    # every session on a server of its own holding the whole model
    assert sorted(len(r.servers) for r in out.solution.routes) == [1, 1, 1, 1]
    cg, _ = cg_bprr(inst, 4)
    cg_value = mean_cost(inst.request_cost(), cg.placement, cg.routes)
    assert out.objective_s is not None and out.objective_s < 0.4 * cg_value
    assert out.dual_bound_s == pytest.approx(out.objective_s, rel=1e-3)


@settings(max_examples=12, deadline=None)
@given(inst=instances(max_servers=3, max_blocks=4, max_clients=2), sessions=st.integers(1, 3))
def test_milp_is_at_most_cg_bprr_on_small_instances(inst: Instance, sessions: int) -> None:
    try:
        cg, _ = cg_bprr(inst, sessions)
    except PlacementError:
        assume(False)
        return
    out = solve_milp(inst, sessions, time_limit_s=10, mip_rel_gap=1e-7)
    assert out.status == "optimal", out.message
    assert out.solution is not None and out.objective_s is not None
    assert check_solution(inst, out.solution.placement, out.solution.routes, sessions) == []
    assert out.objective_s <= mean_cost(inst.request_cost(), cg.placement, cg.routes) * (1 + 1e-6) + 1e-9
    assert out.objective_s == pytest.approx(mean_cost(inst.request_cost(), out.solution.placement,
                                                      out.solution.routes))


def _free_hops_instance() -> Instance:
    """Hypothesis' falsifying example: zero RTTs and overheads, so a hop into a server costs nothing,
    and ``s0`` can hold the one block but no cache beside it."""
    return Instance(
        model=ModelSpec(name="toy", blocks=1, block_bytes=1e9, d_model=1000, cache_bytes_per_value=0.5e9 / 6000),
        input_tokens=2, output_tokens=1, server_names=("s0", "s1"), server_kinds=("gpu", "gpu"),
        server_sites=("x", "x"), memory_bytes=np.array([1e9, 2e9]), prefill_s_per_block=np.array([0.001, 0.001]),
        decode_s_per_block=np.array([0.001, 0.001]), max_blocks=np.array([1, 1], dtype=np.int64),
        client_names=("c0",), client_sites=("x",), client_weights=np.array([1.0]), client_rtt_s=np.zeros((1, 2)),
        server_rtt_s=np.zeros((2, 2)), token_overhead_s=0.0, prompt_overhead_s=0.0, session_setup_s=0.0)


def test_free_hops_do_not_route_through_an_empty_server() -> None:
    # regression: a link from the source only required a_j <= 1, so a chain could start at a server
    # holding no block (e_j = 0) when the hop into it was free; the check then rejected the solution
    inst = _free_hops_instance()
    out = solve_milp(inst, 1, time_limit_s=10, mip_rel_gap=1e-7)
    assert out.status == "optimal", out.message
    assert out.solution is not None and out.objective_s is not None
    assert check_solution(inst, out.solution.placement, out.solution.routes, 1) == []
    assert [r.servers for r in out.solution.routes] == [(1,)]
    assert out.objective_s == pytest.approx(0.001)


def test_free_hops_on_a_longer_chain_hold_a_block_at_every_server() -> None:
    # the same with 3 blocks, 3 servers and 3 sessions (failed the check before the fix too): every server
    # on every chain holds the next block, whatever the (free) hops
    inst = make_instance([2.0, 3.0, 9.0], [1, 1, 1], [1, 1, 1], [[0, 0, 0]], blocks=3, cache_gb=0.5, output_tokens=1)
    out = solve_milp(inst, 3, time_limit_s=10, mip_rel_gap=1e-7)
    assert out.status == "optimal", out.message
    assert out.solution is not None
    assert check_solution(inst, out.solution.placement, out.solution.routes, 3) == []
    assert all(out.solution.placement.count[j] > 0 for r in out.solution.routes for j in r.servers)


def test_cutoff_keeps_only_solutions_at_least_as_good() -> None:
    inst = make_instance([8.0, 9.5], [9.3, 6.0], [21.1, 11.2], [[54, 92]], blocks=4, cache_gb=0.35)
    cg, _ = cg_bprr(inst, 4)
    cg_value = mean_cost(inst.request_cost(), cg.placement, cg.routes)
    out = solve_milp(inst, 4, time_limit_s=10, cutoff_s=cg_value)
    assert out.optimal and out.objective_s is not None and out.objective_s <= cg_value
    # a cutoff below the optimum leaves nothing feasible: reported, no solution
    low = solve_milp(inst, 4, time_limit_s=10, cutoff_s=0.5 * out.objective_s)
    assert low.status == "infeasible" and low.solution is None


def test_infeasible_instance_is_reported_not_solved() -> None:
    inst = make_instance([2.0, 2.0], [1, 1], [1, 1], [[5, 5]], blocks=5, cache_gb=0.5)
    out = solve_milp(inst, 1, time_limit_s=5)
    assert out.status == "infeasible" and out.solution is None and out.objective_s is None


def test_too_large_programs_are_skipped() -> None:
    inst = load_config(PLACE / "clustered_9.yaml").instance
    out = solve_milp(inst, 35, max_variables=100)
    assert out.status == "skipped" and out.solution is None and "limit 100" in out.message


def _fake(status: int, x: np.ndarray | None, fun: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(status=status, x=x, fun=fun, message="fake", mip_gap=0.25, mip_dual_bound=1.0)


def test_statuses_are_never_taken_for_optimal() -> None:
    inst = make_instance([9.0, 9.0], [1, 1], [1, 1], [[5, 5]], blocks=3, cache_gb=0.5)
    prog = _build(inst, 1, None)
    # time limit without an incumbent: failed, nothing returned
    out = interpret(inst, 1, prog, _fake(1, None), 1.0)
    assert out.status == "failed" and out.solution is None and "time limit" in out.message
    assert interpret(inst, 1, prog, _fake(2, None), 1.0).status == "infeasible"
    assert interpret(inst, 1, prog, _fake(4, None), 1.0).status == "failed"
    # a real incumbent reported as time-limited keeps that status
    solved = solve_milp(inst, 1, time_limit_s=5)
    assert solved.optimal
    x = np.zeros(prog.n_vars)
    res = interpret(inst, 1, prog, _fake(1, _solution_vector(inst, prog), fun=1e9), 1.0)
    assert res.status == "time_limit" and not res.optimal and res.gap == 0.25
    # a vector that breaks the constraints is caught by the independent check
    bad = interpret(inst, 1, prog, _fake(0, x, fun=0.0), 1.0)
    assert bad.status == "failed" and bad.solution is None


def _solution_vector(inst: Instance, prog: _Program) -> np.ndarray:
    """A feasible point: solve the same program and return HiGHS' vector."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    a = csr_array((prog.vals, (prog.rows, prog.cols)), shape=(len(prog.row_lo), prog.n_vars))
    res = milp(np.asarray(prog.cost), integrality=np.asarray(prog.integral),
               bounds=Bounds(np.asarray(prog.lower, float), np.asarray(prog.upper, float)),
               constraints=LinearConstraint(a, np.asarray(prog.row_lo), np.asarray(prog.row_hi)),
               options={"time_limit": 5.0})
    assert res.status == 0
    return np.asarray(res.x)
