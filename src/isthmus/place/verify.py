"""An independent feasibility check of a placement and its routes.

Written apart from the algorithms and the MILP on purpose (plain loops over the definitions, no shared
helpers beyond the data classes), so that a bug in a solver's bookkeeping cannot hide itself. Every
solution any algorithm returns goes through :func:`check_solution` before it is reported.

What it checks (Sun et al., arXiv 2512.21884, section 3.1):

- each used server holds a run of blocks inside ``1..L`` and no more than its ``max_blocks``;
- the runs together cover every block ``1..L``;
- weights and reserved caches fit: ``s_m·m_j + s_c·slots_j ≤ M_j``;
- each route is a chain: the first server starts at block 1; for consecutive ``i -> j``,
  ``a_j ≤ a_i + m_i ≤ a_j + m_j − 1`` (Lemma 1: the next block after ``i`` is at ``j`` and ``j``
  goes further); the last server ends at block ``L``; no server twice;
- the sessions routed concurrently fit in the caches: ``Σ_r k^r_j ≤ slots_j`` at every server;
- optionally, the number of routes.
"""

from __future__ import annotations

from collections.abc import Sequence

from isthmus.place.model import Instance, Placement, Route

_REL_TOL = 1e-9


def check_placement(inst: Instance, placement: Placement) -> list[str]:
    """Violations of the placement alone (blocks, coverage, memory); empty when it is feasible."""
    problems: list[str] = []
    n, blocks = inst.n_servers, inst.blocks
    if len(placement.start) != n:
        return [f"placement has {len(placement.start)} servers, the instance {n}"]
    covered = [False] * (blocks + 1)
    for j in range(n):
        a, m, slots = int(placement.start[j]), int(placement.count[j]), int(placement.cache_slots[j])
        name = inst.server_names[j]
        if m < 0 or slots < 0:
            problems.append(f"{name}: negative block count or cache slots")
            continue
        if m > int(inst.max_blocks[j]):
            problems.append(f"{name}: holds {m} blocks, at most {int(inst.max_blocks[j])} allowed")
        if m > 0:
            if a < 1 or a + m - 1 > blocks:
                problems.append(f"{name}: blocks {a}..{a + m - 1} outside 1..{blocks}")
                continue
            for b in range(a, a + m):
                covered[b] = True
        need = inst.model.block_bytes * m + inst.cache_bytes * slots
        if need > float(inst.memory_bytes[j]) * (1 + _REL_TOL):
            problems.append(f"{name}: needs {need / 1e9:.3f} GB for {m} blocks and {slots} caches, "
                            f"has {float(inst.memory_bytes[j]) / 1e9:.3f} GB")
    missing = [b for b in range(1, blocks + 1) if not covered[b]]
    if missing:
        shown = ", ".join(str(b) for b in missing[:10]) + (" ..." if len(missing) > 10 else "")
        problems.append(f"blocks held by no server: {shown}")
    return problems


def check_routes(inst: Instance, placement: Placement, routes: Sequence[Route]) -> list[str]:
    """Violations of the routes under ``placement`` (chain rules, cache capacity)."""
    problems: list[str] = []
    n, blocks = inst.n_servers, inst.blocks
    load = [0] * n
    for r, route in enumerate(routes):
        if not 0 <= route.client < inst.n_clients:
            problems.append(f"route {r}: unknown client {route.client}")
            continue
        if not route.servers:
            problems.append(f"route {r}: visits no server")
            continue
        if len(set(route.servers)) != len(route.servers):
            problems.append(f"route {r}: visits a server twice")
            continue
        reached = 0  # last block processed so far
        for j in route.servers:
            if not 0 <= j < n:
                problems.append(f"route {r}: unknown server {j}")
                break
            a, m = int(placement.start[j]), int(placement.count[j])
            if m <= 0:
                problems.append(f"route {r}: {inst.server_names[j]} holds no block")
                break
            end = a + m - 1
            if not (a <= reached + 1 <= end):
                problems.append(f"route {r}: {inst.server_names[j]} holds {a}..{end}, "
                                f"cannot continue after block {reached}")
                break
            load[j] += end - reached
            reached = end
        else:
            if reached != blocks:
                problems.append(f"route {r}: ends at block {reached}, not {blocks}")
    for j in range(n):
        if load[j] > int(placement.cache_slots[j]):
            problems.append(f"{inst.server_names[j]}: the routes need {load[j]} attention caches, "
                            f"it holds {int(placement.cache_slots[j])}")
    return problems


def check_solution(inst: Instance, placement: Placement, routes: Sequence[Route] = (),
                   sessions: int | None = None) -> list[str]:
    """Every violation of the placement and of ``routes`` (and of their number when ``sessions`` is given)."""
    problems = check_placement(inst, placement)
    if len(placement.start) != inst.n_servers:
        return problems
    problems += check_routes(inst, placement, routes)
    if sessions is not None and len(routes) != sessions:
        problems.append(f"{len(routes)} routes for {sessions} sessions")
    return problems
