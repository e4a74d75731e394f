"""Joint block placement and request routing as a mixed-integer linear program, solved by HiGHS.

The problem of Sun, He, Ji and Parag (arXiv 2512.21884, section 3.2.2): choose each server's run of
blocks and each of ``|R|`` concurrent sessions' chain so that the total session time is smallest,
with every server's weights and attention caches within its memory. Same objective and constraints
as the paper; one change in the variables: the sessions of one client are interchangeable, so the
program counts the sessions on each link (an integer, written in binary) instead of giving every
session its own routing variables. This is equivalent (any integer flow decomposes into that many
chains, because chains only go to servers that end further) and removes the symmetry that makes
the per-session program hard.

Variables (``n`` servers, ``L`` blocks, client ``c`` with ``R_c`` sessions, ``B_c`` bits):

- ``a_j ∈ [1, L]``, ``e_j ∈ [0, L]`` integer: first and last block of server ``j``
  (``m_j = e_j − a_j + 1 ≥ 0``);
- per client and link ``ℓ = (i -> j)`` (``i``: the client's source or a server; ``j``: a server or
  the client's sink): bits ``x_ℓb`` with ``F_ℓ = Σ_b 2^b·x_ℓb`` sessions on the link, a binary
  ``u_ℓ ≥`` "link used", and for links into a server ``y_ℓb ≥ x_ℓb·(e_j − e_i)`` (blocks processed),
  linearised with big-M ``L``.

Constraints: flow of ``R_c`` from source to sink and conservation at every server; ``F_ℓ ≤ R_c·u_ℓ``;
route feasibility when ``u_ℓ = 1`` (source -> ``j``: ``a_j ≤ 1`` and ``e_j ≥ 1``; ``i -> j``:
``a_j ≤ e_i + 1`` and ``e_i + 1 ≤ e_j``; ``j`` -> sink: ``e_j ≥ L``; so every server on a chain holds
the next block and ends further, none is passed through empty); memory ``s_m·m_j + s_c·Σ 2^b·y ≤ M_j``;
``m_j ≤ max_blocks``. Identical servers (same memory, speeds and RTTs) are ordered by ``e_j`` to
break their symmetry, which keeps the optimum. Objective: ``Σ hop_cj·F + block_j·Σ 2^b·y`` with the
costs of :meth:`~isthmus.place.model.Instance.request_cost`.

The solver's status is always checked: only ``optimal`` is optimal; a time-limited incumbent is
returned flagged as such, and every solution is rebuilt into chains and checked by
:func:`~isthmus.place.verify.check_solution` before it is returned. scipy is imported here only
(``scipy.optimize.milp``, HiGHS).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from isthmus.core.errors import IsthmusError
from isthmus.place.algorithms import PlacedSolution, mean_cost
from isthmus.place.model import Instance, Placement, Route, sessions_per_client
from isthmus.place.verify import check_solution

MilpStatus = Literal["optimal", "time_limit", "infeasible", "failed", "skipped"]


class SolverUnavailableError(IsthmusError):
    """scipy (with HiGHS) is not installed."""


@dataclass(frozen=True)
class MilpOutcome:
    """What the MILP gave.

    Attributes:
        status: ``optimal``; ``time_limit`` (an incumbent, not proven optimal: see ``gap``);
            ``infeasible``; ``failed`` (no usable solution: the time limit came before any, the solver
            erred, or its solution did not check out);
            ``skipped`` (larger than the variable limit, not built).
        message: the solver's message or the reason.
        solution: the placement and routes (``None`` unless optimal or time_limit).
        objective_s: mean session time of ``solution``, recomputed from its chains.
        dual_bound_s: the solver's lower bound on the optimal mean session time.
        gap: relative gap between incumbent and bound.
        wall_s: solver wall time.
        variables, constraints: size of the program.
    """

    status: MilpStatus
    message: str
    solution: PlacedSolution | None = None
    objective_s: float | None = None
    dual_bound_s: float | None = None
    gap: float | None = None
    wall_s: float = 0.0
    variables: int = 0
    constraints: int = 0

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


@dataclass
class _Program:
    """The program in coordinate form, with the index maps needed to read a solution back."""

    n_vars: int
    cost: list[float]
    lower: list[float]
    upper: list[float]
    integral: list[int]
    rows: list[int]
    cols: list[int]
    vals: list[float]
    row_lo: list[float]
    row_hi: list[float]
    # per client: (links, x indices per link [bits], sessions)
    flows: list[tuple[list[tuple[int, int]], list[list[int]], int]]

    def var(self, lo: float, hi: float, integral: bool, cost: float = 0.0) -> int:
        self.cost.append(cost)
        self.lower.append(lo)
        self.upper.append(hi)
        self.integral.append(1 if integral else 0)
        self.n_vars += 1
        return self.n_vars - 1

    def row(self, terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.row_lo)
        for col, val in terms:
            self.rows.append(r)
            self.cols.append(col)
            self.vals.append(val)
        self.row_lo.append(lo)
        self.row_hi.append(hi)


SOURCE, SINK = -1, -2


def _identical_groups(inst: Instance) -> list[list[int]]:
    """Servers that are interchangeable for the program (same memory, speeds, cap and client RTTs)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j in range(inst.n_servers):
        key = (float(inst.memory_bytes[j]), float(inst.prefill_s_per_block[j]), float(inst.decode_s_per_block[j]),
               int(inst.max_blocks[j]), tuple(np.round(inst.client_rtt_s[:, j], 12)))
        groups.setdefault(key, []).append(j)
    return [g for g in groups.values() if len(g) > 1]


def _build(inst: Instance, sessions: int, cutoff_s: float | None) -> _Program:
    n, blocks = inst.n_servers, inst.blocks
    cost = inst.request_cost()
    prog = _Program(0, [], [], [], [], [], [], [], [], [], [])
    a = [prog.var(1, blocks, True) for _ in range(n)]
    e = [prog.var(0, blocks, True) for _ in range(n)]
    big = float(blocks)
    most = np.minimum(np.floor(np.asarray(inst.memory_bytes, float) / inst.model.block_bytes), inst.max_blocks)
    min_hops = float(np.ceil(blocks / max(float(most.max()), 1.0)))
    scale = 1e-9  # memory rows in GB
    mem_terms: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for c, r_c in enumerate(sessions_per_client(inst.client_weights, sessions)):
        r_c = int(r_c)
        if r_c == 0:
            continue
        bits = r_c.bit_length()
        links = [(SOURCE, j) for j in range(n)] + [(i, j) for i in range(n) for j in range(n) if i != j] \
            + [(j, SINK) for j in range(n)]
        xs: list[list[int]] = []
        into: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        out_of: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        from_source: list[tuple[int, float]] = []
        to_sink: list[tuple[int, float]] = []
        blocks_done: list[tuple[int, float]] = []
        visits: list[tuple[int, float]] = []
        for i, j in links:
            hop = float(cost.hop_s[c, j]) if j != SINK else 0.0
            x = [prog.var(0, 1, True, hop * 2**b) for b in range(bits)]
            xs.append(x)
            u = prog.var(0, 1, True)
            flow = [(x[b], float(2**b)) for b in range(bits)]
            prog.row([*flow, (u, -float(r_c))], -np.inf, 0.0)  # F <= R_c * u
            if j == SINK:
                to_sink += flow
                out_of[i] += flow
                prog.row([(e[i], -1.0), (u, big)], -np.inf, 0.0)  # e_i >= L when used
                continue
            into[j] += flow
            visits += flow
            if i == SOURCE:
                from_source += flow
                prog.row([(a[j], 1.0), (u, big)], -np.inf, big + 1)  # a_j <= 1 when used
                # e_j >= 1 when used (``e_i + 1 <= e_j`` with e_source = 0): the first server processes
                # block 1, it cannot be an empty server (e_j = 0 < a_j) passed through at no cost
                prog.row([(e[j], -1.0), (u, 1.0)], -np.inf, 0.0)
            else:
                out_of[i] += flow
                prog.row([(a[j], 1.0), (e[i], -1.0), (u, big)], -np.inf, big + 1)  # a_j <= e_i + 1
                prog.row([(e[i], 1.0), (e[j], -1.0), (u, big + 1)], -np.inf, big)  # e_i + 1 <= e_j
            block = float(cost.block_s[j])
            for b in range(bits):
                y = prog.var(0, big, False, block * 2**b)
                # y >= x_b * (e_j - e_i): e_j - e_i + L x_b - y <= L ; and y <= L x_b
                terms = [(e[j], 1.0), (x[b], big), (y, -1.0)]
                if i != SOURCE:
                    terms.append((e[i], -1.0))
                prog.row(terms, -np.inf, big)
                prog.row([(y, 1.0), (x[b], -big)], -np.inf, 0.0)
                mem_terms[j].append((y, inst.cache_bytes * 2**b * scale))
                blocks_done.append((y, float(2**b)))
        prog.row(from_source, r_c, r_c)
        prog.row(to_sink, r_c, r_c)
        # valid cuts that tighten the relaxation: a session processes all L blocks, over at least
        # ceil(L / most blocks any server can hold) servers
        prog.row(blocks_done, r_c * big, np.inf)
        prog.row(visits, r_c * min_hops, np.inf)
        for j in range(n):
            prog.row(into[j] + [(col, -v) for col, v in out_of[j]], 0.0, 0.0)
        prog.flows.append((links, xs, c))
    for j in range(n):
        sm = inst.model.block_bytes * scale
        prog.row([(e[j], sm), (a[j], -sm), *mem_terms[j]], -np.inf, float(inst.memory_bytes[j]) * scale - sm)
        prog.row([(e[j], 1.0), (a[j], -1.0)], -1.0, float(inst.max_blocks[j]) - 1.0)  # 0 <= m_j <= max
    for group in _identical_groups(inst):
        for p, q in itertools.pairwise(group):
            prog.row([(e[p], 1.0), (e[q], -1.0)], -np.inf, 0.0)
    if cutoff_s is not None:
        prog.row([(k, v) for k, v in enumerate(prog.cost) if v != 0.0], -np.inf, cutoff_s * sessions * (1 + 1e-9))
    return prog


def _decompose(inst: Instance, prog: _Program, x: np.ndarray) -> list[Route]:
    """Chains from the link flows: walk source -> sink along links with flow left, once per session."""
    routes: list[Route] = []
    for links, xs, c in prog.flows:
        flow = {link: int(sum(round(x[v]) * 2**b for b, v in enumerate(bits)))
                for link, bits in zip(links, xs, strict=True)}
        total = sum(f for (i, _), f in flow.items() if i == SOURCE)
        for _ in range(total):
            node, path = SOURCE, []
            for _step in range(inst.n_servers + 1):
                nxt = next((j for (i, j), f in flow.items() if i == node and f > 0), None)
                if nxt is None:
                    raise ValueError(f"flow of client {c} stops at {node}")
                flow[(node, nxt)] -= 1
                if nxt == SINK:
                    break
                path.append(nxt)
                node = nxt
            else:
                raise ValueError(f"flow of client {c} does not reach the sink")
            routes.append(Route(c, tuple(path)))
    return routes


def solve_milp(inst: Instance, sessions: int, time_limit_s: float = 60.0, mip_rel_gap: float = 1e-4,
               cutoff_s: float | None = None, max_variables: int = 200_000) -> MilpOutcome:
    """Solve the joint problem for ``sessions`` concurrent sessions with HiGHS.

    Args:
        time_limit_s: HiGHS time limit; on reaching it the incumbent (if any) is returned with
            status ``time_limit``, never as optimal.
        mip_rel_gap: relative gap at which HiGHS stops as optimal.
        cutoff_s: only accept solutions whose mean session time is at most this (e.g. CG-BPRR's, so
            that the search starts from the greedy's value; scipy's interface takes no starting point).
        max_variables: do not build larger programs (status ``skipped``).

    Raises:
        SolverUnavailableError: scipy is not installed.
    """
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_array
    except ImportError as exc:
        raise SolverUnavailableError(f"the MILP needs scipy (HiGHS): pip install scipy ({exc})") from None
    n = inst.n_servers
    estimate = 2 * n + sum(
        (n * n + n) * (1 + 2 * int(r).bit_length()) for r in sessions_per_client(inst.client_weights, sessions) if r)
    if estimate > max_variables:
        return MilpOutcome("skipped", f"about {estimate:,} variables, more than the limit {max_variables:,}",
                           variables=estimate)
    prog = _build(inst, sessions, cutoff_s)
    a_mat = csr_array((prog.vals, (prog.rows, prog.cols)), shape=(len(prog.row_lo), prog.n_vars))
    started = time.perf_counter()
    res = milp(np.asarray(prog.cost), integrality=np.asarray(prog.integral),
               bounds=Bounds(np.asarray(prog.lower, float), np.asarray(prog.upper, float)),
               constraints=LinearConstraint(a_mat, np.asarray(prog.row_lo), np.asarray(prog.row_hi)),
               options={"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "disp": False})
    wall = time.perf_counter() - started
    return interpret(inst, sessions, prog, res, wall)


def interpret(inst: Instance, sessions: int, prog: _Program, res: Any, wall_s: float) -> MilpOutcome:
    """Turn scipy's ``OptimizeResult`` into a checked :class:`MilpOutcome` (status first, then the
    solution rebuilt into chains and verified)."""
    def outcome(status: MilpStatus, message: str, solution: PlacedSolution | None = None,
                objective: float | None = None, dual: float | None = None, gap: float | None = None) -> MilpOutcome:
        return MilpOutcome(status, message, solution, objective, dual, gap, wall_s, prog.n_vars, len(prog.row_lo))

    message = str(getattr(res, "message", ""))
    bound = getattr(res, "mip_dual_bound", None)
    dual = float(bound) / sessions if bound is not None and np.isfinite(bound) else None
    gap_raw = getattr(res, "mip_gap", None)
    gap = float(gap_raw) if gap_raw is not None and np.isfinite(gap_raw) else None
    status_code = int(getattr(res, "status", 4))
    x = getattr(res, "x", None)
    if status_code == 2:
        return outcome("infeasible", message or "infeasible")
    if status_code not in (0, 1) or x is None:
        why = "time limit reached before any solution" if status_code == 1 else "solver failed"
        return outcome("failed", f"{why}: {message}", dual=dual)
    status: MilpStatus = "optimal" if status_code == 0 else "time_limit"
    x = np.asarray(x, float)
    n = inst.n_servers
    start = np.rint(x[:n]).astype(np.int64)
    end = np.rint(x[n: 2 * n]).astype(np.int64)
    count = np.maximum(end - start + 1, 0)
    start = np.where(count > 0, start, 1)
    placement = Placement(start=start, count=count, cache_slots=inst.cache_slots(count))
    try:
        routes = _decompose(inst, prog, x)
    except ValueError as exc:
        return outcome("failed", f"solution does not decompose into chains: {exc}", dual=dual)
    problems = check_solution(inst, placement, routes, sessions)
    if problems:
        return outcome("failed", "solution fails the feasibility check: " + "; ".join(problems[:3]), dual=dual)
    objective = mean_cost(inst.request_cost(), placement, tuple(routes))
    solver_mean = float(res.fun) / sessions
    if objective > solver_mean * (1 + 1e-6) + 1e-9:
        return outcome("failed", f"recomputed mean session time {objective:.6f} s exceeds the solver's "
                                 f"{solver_mean:.6f} s", dual=dual)
    return outcome(status, message, PlacedSolution(placement, tuple(routes)), objective, dual, gap)
