"""Run the configured algorithms on one setup: placement, routes, prediction, check, simulation.

For each algorithm the offline solution (placement and the chains of ``|R|`` concurrent sessions) is
checked by :func:`~isthmus.place.verify.check_solution`, its model prediction computed, and the
placement simulated online on the same Poisson arrivals as every other algorithm: PETALS with its own
route choice, the others with the configured router (WS-RR by default). PETALS' placement reserves
cache for its fixed token budget, not for concurrent sessions, so its chains are only checked as
chains; how many of its ``|R|`` sessions would find no cache is reported.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isthmus.place.algorithms import (
    GreedyTrace,
    PlacedSolution,
    cg_bprr,
    local_search,
    mean_cost,
    petals_placement,
    petals_routes,
    reservation_search,
    route_sessions,
    shortest_chain,
    theorem2_bound,
)
from isthmus.place.config import ALGORITHMS, MS, PlaceSetup
from isthmus.place.milp import MilpOutcome, solve_milp
from isthmus.place.model import Instance, Placement, PlacementError, Route
from isthmus.place.simulate import RetryPolicy, make_router, poisson_arrivals, simulate
from isthmus.place.verify import check_placement, check_routes, check_solution


@dataclass(frozen=True)
class AlgorithmRun:
    """One algorithm's outcome.

    Attributes:
        name: algorithm key (:data:`~isthmus.place.config.ALGORITHMS`).
        status: ``ok``; for the MILPs the solver status (``optimal``, ``time_limit``, ``infeasible``,
            ``failed``, ``skipped``); ``error`` when the algorithm found no solution.
        message: why, for anything but ``ok`` / ``optimal``.
        placement, routes: the offline solution (``None`` / empty without one).
        predicted: the model's figures for ``routes`` (seconds): ``session_s`` (mean session, setup
            included), ``time_per_token_s`` (``session_s / l``), ``decode_per_token_s``, ``ttft_s``.
        simulated: :meth:`~isthmus.place.simulate.SimResult.summary` of the online run.
        details: algorithm-specific figures (Theorem 2 bound, MILP gap and bound, local search).
        wall_s: time to decide the placement and routes.
    """

    name: str
    status: str
    message: str = ""
    placement: Placement | None = None
    routes: tuple[Route, ...] = ()
    predicted: dict[str, float] | None = None
    simulated: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass(frozen=True)
class PlaceRun:
    """All algorithms on one setup, with the shared settings."""

    setup: PlaceSetup
    sessions: int
    sessions_auto: bool
    seed: int
    results: tuple[AlgorithmRun, ...]


def auto_concurrent_sessions(inst: Instance, rate_rps: float) -> int:
    """``|R|`` as the paper's experiments choose it: the mean plus one standard deviation of the
    Poisson number of sessions in flight, ``λ·T + √(λ·T)`` with ``T`` the time of one session alone
    (CG-BPRR for one session, setup included, weighted over clients), at most
    ``⌊(Σ M_j − s_m·(L + n)) / (s_c·(L + n))⌋``, and lowered until CG-BP has a placement.

    Raises:
        PlacementError: not even one session can be served.
    """
    solo, _ = cg_bprr(inst, 1)
    cost = inst.request_cost()
    times = []
    for c in range(inst.n_clients):
        found = shortest_chain(solo.placement, inst.blocks, cost.hop_s[c], cost.block_s)
        times.append(math.inf if found is None else found[0])
    t_one = inst.session_setup_s + float(np.dot(inst.client_weights, times))
    load = rate_rps * t_one
    wanted = round(load + math.sqrt(load))
    spread = inst.blocks + inst.n_servers
    cap = math.floor((float(np.sum(inst.memory_bytes)) - inst.model.block_bytes * spread) / (inst.cache_bytes * spread))
    sessions = max(1, min(wanted, cap))
    while sessions > 1:
        try:
            cg_bprr(inst, sessions)
            break
        except PlacementError:
            sessions -= 1
    return sessions


def predict(inst: Instance, placement: Placement, routes: Sequence[Route]) -> dict[str, float]:
    """The model's figures for ``routes`` (see :attr:`AlgorithmRun.predicted`)."""
    r = tuple(routes)
    session = inst.session_setup_s + mean_cost(inst.request_cost(), placement, r)
    return {
        "session_s": session,
        "time_per_token_s": session / inst.output_tokens,
        "decode_per_token_s": mean_cost(inst.decode_cost(), placement, r),
        "ttft_s": inst.session_setup_s + mean_cost(inst.prefill_cost(), placement, r),
    }


def _with_setup(inst: Instance, extra_ms: float) -> Instance:
    return inst if extra_ms == 0 else dataclasses.replace(inst, session_setup_s=inst.session_setup_s + extra_ms * MS)


def _milp_details(out: MilpOutcome) -> dict[str, Any]:
    return {"milp": {"status": out.status, "objective_session_s": out.objective_s,
                     "dual_bound_session_s": out.dual_bound_s, "gap": out.gap, "solver_wall_s": out.wall_s, "variables": out.variables,
                     "constraints": out.constraints}}


def run_setup(setup: PlaceSetup, algorithms: Sequence[str] | None = None, seed: int | None = None,
              on_done: Callable[[AlgorithmRun], None] | None = None) -> PlaceRun:
    """Run ``algorithms`` (default: the config's) on ``setup``.

    Raises:
        PlacementError: ``concurrent_sessions: auto`` and not even one session can be served.
        ValueError: an unknown algorithm name.
    """
    cfg = setup.config
    names = list(cfg.algorithms if algorithms is None else algorithms)
    for a in names:
        if a not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {a!r}; algorithms: {', '.join(ALGORITHMS)}")
    inst = setup.instance
    wl = cfg.workload
    auto = wl.concurrent_sessions == "auto"
    sessions = auto_concurrent_sessions(inst, wl.rate_rps) if auto else int(wl.concurrent_sessions)
    run_seed = wl.seed if seed is None else seed
    arrivals = poisson_arrivals(np.random.default_rng(run_seed), wl.rate_rps, wl.sessions, inst.client_weights)
    retry = RetryPolicy(cfg.retry.min_s, cfg.retry.max_s)
    greedy = _Greedy(inst, sessions)

    results: list[AlgorithmRun] = []
    for name in names:
        started = time.perf_counter()
        try:
            result = _decide(name, setup, sessions, greedy, run_seed)
        except PlacementError as exc:
            result = AlgorithmRun(name, "error", str(exc), wall_s=time.perf_counter() - started)
        if result.placement is not None:
            variant = _with_setup(inst, cfg.extra_setup_ms.get(name, 0.0))
            router = make_router("petals" if name == "petals" else cfg.router, variant, result.placement, setup.petals)
            try:
                sim = simulate(variant, result.placement, router, arrivals, retry).summary()
                result = dataclasses.replace(result, predicted=predict(variant, result.placement, result.routes),
                                             simulated=sim)
            except PlacementError as exc:
                result = dataclasses.replace(result, status="error", message=f"simulation: {exc}")
        results.append(result)
        if on_done is not None:
            on_done(result)
    return PlaceRun(setup=setup, sessions=sessions, sessions_auto=auto, seed=run_seed, results=tuple(results))


class _Greedy:
    """CG-BPRR's solution, computed once for the algorithms that start from it (or its error)."""

    def __init__(self, inst: Instance, sessions: int) -> None:
        self.inst, self.sessions = inst, sessions
        self.value: tuple[PlacedSolution, GreedyTrace, float] | PlacementError | None = None

    def get(self) -> tuple[PlacedSolution, GreedyTrace, float]:
        """``(solution, trace, seconds taken)``; raises CG-BPRR's :class:`PlacementError` every time."""
        if self.value is None:
            t0 = time.perf_counter()
            try:
                self.value = (*cg_bprr(self.inst, self.sessions), time.perf_counter() - t0)
            except PlacementError as exc:
                self.value = exc
        if isinstance(self.value, PlacementError):
            raise self.value
        return self.value


def _checked(name: str, inst: Instance, solution: PlacedSolution, sessions: int, status: str = "ok",
             message: str = "", **kw: Any) -> AlgorithmRun:
    problems = check_solution(inst, solution.placement, solution.routes, sessions)
    if problems:
        return AlgorithmRun(name, "error", "failed the feasibility check: " + "; ".join(problems[:3]), **kw)
    return AlgorithmRun(name, status, message, solution.placement, solution.routes, **kw)


def _decide(name: str, setup: PlaceSetup, sessions: int,
            greedy: _Greedy, seed: int) -> AlgorithmRun:
    cfg, inst = setup.config, setup.instance
    t0 = time.perf_counter()
    if name == "petals":
        if cfg.petals.join_order == "file":
            order = np.arange(inst.n_servers)
        else:
            order = np.random.default_rng(cfg.petals.seed if cfg.petals.seed is not None else seed).permutation(
                inst.n_servers)
        placement = petals_placement(inst, setup.petals, order)
        routes, short = petals_routes(inst, setup.petals, placement, sessions)
        wall = time.perf_counter() - t0
        unlimited = dataclasses.replace(placement, cache_slots=np.full(inst.n_servers, np.iinfo(np.int64).max // 4))
        problems = check_placement(inst, placement) + check_routes(inst, unlimited, routes)
        if problems:
            return AlgorithmRun(name, "error", "failed the feasibility check: " + "; ".join(problems[:3]), wall_s=wall)
        return AlgorithmRun(name, "ok", "", placement, routes, wall_s=wall,
                            details={"join_order": [inst.server_names[j] for j in order],
                                     "sessions_without_cache": short})
    if name == "cg_bprr":
        solution, trace, wall = greedy.get()
        decode_routes = route_sessions(inst, solution.placement, inst.decode_cost(), sessions)
        details = {"theorem2": {
            "covering_servers": trace.covering,
            "per_token_bound_s": theorem2_bound(inst, solution.placement, trace, inst.decode_cost()),
            "per_token_s": mean_cost(inst.decode_cost(), solution.placement, decode_routes),
            "session_bound_s": theorem2_bound(inst, solution.placement, trace, inst.request_cost()),
            "session_s": mean_cost(inst.request_cost(), solution.placement, solution.routes),
        }}
        return _checked(name, inst, solution, sessions, wall_s=wall, details=details)
    if name == "cg_bprr_ls":
        solution, _, wall = greedy.get()
        initial = mean_cost(inst.request_cost(), solution.placement, solution.routes)
        tuned, reserve, tuned_value = reservation_search(inst, sessions)
        ls = local_search(inst, tuned, sessions, cfg.local_search.max_moves, cfg.local_search.max_evaluations)
        details = {"local_search": {"initial_session_s": initial, "reserved_sessions": reserve,
                                    "reserved_session_s": tuned_value, "session_s": ls.objective_s,
                                    "improvement": 1.0 - ls.objective_s / initial, "moves": ls.moves,
                                    "evaluations": ls.evaluations}}
        return _checked(name, inst, ls.solution, sessions, wall_s=wall + time.perf_counter() - t0, details=details)
    if name in ("milp", "milp_cg"):
        cutoff = None
        extra: dict[str, Any] = {}
        if name == "milp_cg":
            solution, _, _ = greedy.get()
            cutoff = mean_cost(inst.request_cost(), solution.placement, solution.routes)
            extra = {"cutoff_session_s": cutoff}
            t0 = time.perf_counter()
        out = solve_milp(inst, sessions, cfg.milp.time_limit_s, cfg.milp.mip_rel_gap, cutoff, cfg.milp.max_variables)
        details = _milp_details(out)
        details["milp"].update(extra)
        wall = time.perf_counter() - t0
        if out.solution is None:
            return AlgorithmRun(name, out.status, out.message, details=details, wall_s=wall)
        message = "" if out.optimal else (f"not proven optimal: time limit {cfg.milp.time_limit_s:g} s, gap "
                                          f"{100 * (out.gap or float('nan')):.1f} %")
        return _checked(name, inst, out.solution, sessions, status=out.status, message=message, details=details,
                        wall_s=wall)
    raise ValueError(f"unknown algorithm {name!r}")
