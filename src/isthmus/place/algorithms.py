"""Block placement and request routing: PETALS' own rule, CG-BPRR, and improvements on CG-BPRR.

All from Sun, He, Ji and Parag (arXiv 2512.21884) unless said otherwise:

- :func:`cg_bprr` — Algorithm 1, *conservative greedy block placement with shortest-path request
  routing*: (1) every server takes ``m_j = min(⌊M_j / (s_m + s_c·|R|)⌋, L)`` blocks, which leaves
  cache for all ``|R|`` sessions passing all its blocks; (2) servers in order of amortized per-block
  time ``t̃_j = τ_j + max_c t_cj / m_j`` each take the window of ``m_j`` blocks that holds at least one
  under-served block and the most total amortized time; (3) each session takes the shortest chain.
  Theorem 2 bounds the mean per-token time; :func:`theorem2_bound` computes the bound.
- :func:`petals_placement` / :func:`petals_routes` — PETALS' rule as the paper models it: a server
  takes as many blocks as memory allows after reserving cache for a fixed token budget
  (``petals.server.server._choose_num_blocks``), servers join one at a time and each takes the window
  whose sorted block throughputs are lexicographically smallest (``petals.server.block_selection``);
  a session takes the path that is shortest by PETALS' estimate (half pings between consecutive
  servers, a per-hop overhead, compute, a penalty at servers without free cache).
- :func:`reservation_search` and :func:`local_search` — not in the paper: CG-BP with cache reserved
  for fewer sessions than provisioned (when all still route), then moving, growing and shrinking
  single windows while the mean session time (the MILP's objective) improves.

Shortest chains: a chain can only go from a server to one that ends further, so the servers sorted
by their last block form a DAG and one pass of dynamic programming finds the shortest chain
(:func:`shortest_chain`), ``O(n²)`` per session with numpy over the predecessors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from isthmus.place.model import (
    Instance,
    LinkCost,
    Placement,
    PlacementError,
    Route,
    blocks_used,
    route_cost,
    sessions_per_client,
)

ExtraCost = Callable[[int, np.ndarray], np.ndarray]
"""``extra(j, k)``: cost added to entering server ``j`` to process ``k`` blocks (vectorised over ``k``);
``inf`` forbids the hop."""


# ----------------------------------------------------------------------------------------- chains
def shortest_chain(placement: Placement, blocks: int, enter_s: np.ndarray, block_s: np.ndarray,
                   exit_s: np.ndarray | None = None,
                   extra: ExtraCost | None = None) -> tuple[float, tuple[int, ...]] | None:
    """The cheapest chain covering blocks ``1..blocks``, or ``None`` when there is none.

    Hop ``i -> j`` is allowed when ``a_j ≤ e_i + 1 ≤ e_j`` (``e``: last block held); the first server
    must start at block 1, the last end at ``blocks``. Entering ``j`` from ``i`` and processing its
    ``k = e_j − e_i`` new blocks costs ``enter_s[.., j] + k·block_s[j] + extra(j, k)``; leaving the
    last server costs ``exit_s[j]``.

    Args:
        enter_s: ``(n,)`` when entering ``j`` costs the same from anywhere (hub and spoke), else
            ``(n + 1, n)`` with row 0 the client and row ``1 + i`` server ``i``.
        block_s: ``(n,)`` cost per block processed.
        exit_s: ``(n,)`` cost from the last server back to the client (default 0).
        extra: load-dependent cost, see :data:`ExtraCost`.

    Returns:
        ``(cost, servers)``; ties go to the chain found first (servers in order of last block, then index).
    """
    start, end, used = placement.start, placement.end, placement.used
    n = len(start)
    full = np.ndim(enter_s) == 2
    dist = np.full(n, np.inf)
    pred = np.full(n, -2, dtype=np.int64)
    idx = np.flatnonzero(used)
    for j in idx[np.argsort(end[idx], kind="stable")]:
        best, arg = np.inf, -2
        if start[j] == 1:
            k0 = np.array([end[j]])
            c0 = float((enter_s[0, j] if full else enter_s[j]) + block_s[j] * end[j])
            if extra is not None:
                c0 += float(extra(int(j), k0)[0])
            if c0 < best:
                best, arg = c0, -1
        prev = np.flatnonzero(used & (end < end[j]) & (end + 1 >= start[j]) & np.isfinite(dist))
        if prev.size:
            k = end[j] - end[prev]
            c = dist[prev] + (enter_s[1 + prev, j] if full else enter_s[j]) + block_s[j] * k
            if extra is not None:
                c = c + extra(int(j), k)
            m = int(np.argmin(c))
            if c[m] < best:
                best, arg = float(c[m]), int(prev[m])
        dist[j], pred[j] = best, arg
    last = np.flatnonzero(used & (end == blocks) & np.isfinite(dist))
    if last.size == 0:
        return None
    total = dist[last] + (0.0 if exit_s is None else exit_s[last])
    j = int(last[int(np.argmin(total))])
    best_total = float(np.min(total))
    path = [j]
    while pred[j] >= 0:
        j = int(pred[j])
        path.append(j)
    return best_total, tuple(reversed(path))


def _capacity_forbid(free: np.ndarray) -> ExtraCost:
    """``extra`` that forbids hops needing more caches than ``free`` holds."""
    def extra(j: int, k: np.ndarray) -> np.ndarray:
        return np.where(k <= free[j], 0.0, np.inf)
    return extra


def route_sessions(inst: Instance, placement: Placement, cost: LinkCost, sessions: int) -> tuple[Route, ...]:
    """Route ``sessions`` concurrent sessions (split among clients by weight) one after another, each on
    its client's cheapest chain with enough free caches left; the caches it takes stay taken.

    A chain is reused for as many sessions as it has room for, so a placement whose caches never run
    short (CG-BPRR's, Lemma 3) costs one shortest-chain search per client.

    Raises:
        PlacementError: some session finds no chain with room.
    """
    free = placement.cache_slots.copy()
    remaining = sessions_per_client(inst.client_weights, sessions)
    extra = _capacity_forbid(free)
    routes: list[Route] = []
    while remaining.sum() > 0:
        for c in np.flatnonzero(remaining > 0):
            found = shortest_chain(placement, inst.blocks, cost.hop_s[c], cost.block_s, extra=extra)
            if found is None:
                done = len(routes)
                raise PlacementError(f"no chain with free attention caches for session {done + 1} of {sessions} "
                                     f"(client {inst.client_names[c]})")
            path = found[1]
            ks = blocks_used(placement, path)
            room = min(int(free[j]) // k for j, k in zip(path, ks, strict=True))
            q = int(min(remaining[c], room))
            for j, k in zip(path, ks, strict=True):
                free[j] -= q * k
            routes.extend(Route(int(c), path) for _ in range(q))
            remaining[c] -= q
    return tuple(routes)


def mean_cost(cost: LinkCost, placement: Placement, routes: tuple[Route, ...]) -> float:
    """Mean of ``cost`` over ``routes``."""
    return float(np.mean([route_cost(cost, placement, r) for r in routes])) if routes else float("nan")


# ----------------------------------------------------------------------------------------- CG-BPRR
@dataclass(frozen=True)
class GreedyTrace:
    """How CG-BP placed the servers (what Theorem 2 needs).

    Attributes:
        order: servers with at least one block, in the order they were placed (increasing ``t̃_j``).
        covering: ``K``, the fewest leading servers of ``order`` that serve every block for ``|R|`` sessions.
        amortized_s: ``t̃_j = τ_j + max_c t_cj / m_j`` (``inf`` where ``m_j = 0``).
    """

    order: np.ndarray
    covering: int
    amortized_s: np.ndarray


def conservative_counts(inst: Instance, sessions: int) -> np.ndarray:
    """Step 1 of CG-BPRR: ``m_j = min(⌊M_j / (s_m + s_c·|R|)⌋, L)`` (and at most ``max_blocks``)."""
    per_block = inst.model.block_bytes + inst.cache_bytes * sessions
    m = np.floor(np.asarray(inst.memory_bytes, float) / per_block * (1 + 1e-12)).astype(np.int64)
    return np.minimum(np.minimum(m, inst.blocks), inst.max_blocks).astype(np.int64)


def lexicographic_min_window(values: np.ndarray, width: int) -> int:
    """0-based start of the window of ``width`` whose sorted values are lexicographically smallest
    (ties to the first), PETALS' block-selection rule."""
    rows = np.sort(sliding_window_view(values, width), axis=1)
    return int(np.lexsort(rows.T[::-1])[0])


def cg_bp(inst: Instance, sessions: int) -> tuple[Placement, GreedyTrace]:
    """Steps 1 and 2 of CG-BPRR (the placement the online algorithm keeps): conservative block
    counts, then greedy windows in order of amortized per-block time.

    Each block ``b`` keeps its capacity ``C_b`` (sessions the servers holding it can take) and its
    amortized time ``T_b`` (starting at ``|R|`` sessions on a virtual server slower than every real
    one). While some block has ``C_b < |R|``, a server takes the window with an under-served block and
    the largest ``Σ T_b`` (first such window on ties); once all are served, the window whose sorted
    capacities are lexicographically smallest.

    Raises:
        PlacementError: the servers cannot serve every block for ``sessions`` sessions.
    """
    if sessions < 1:
        raise ValueError("sessions must be >= 1")
    blocks = inst.blocks
    m = conservative_counts(inst, sessions)
    if int(m.sum()) < blocks:
        raise PlacementError(f"with cache reserved for {sessions} concurrent sessions the servers hold "
                             f"{int(m.sum())} blocks in total, fewer than the model's {blocks}; "
                             f"provision fewer sessions")
    usable = m > 0
    worst_rtt = inst.decode_rtt_s.max(axis=0)
    amortized = np.full(inst.n_servers, np.inf)
    amortized[usable] = inst.decode_s_per_block[usable] + worst_rtt[usable] / m[usable]
    order = np.flatnonzero(usable)[np.argsort(amortized[usable], kind="stable")]
    virtual = float(amortized[usable].max()) + 1.0
    per_server = np.zeros(inst.n_servers, dtype=np.int64)
    per_server[usable] = np.floor((np.asarray(inst.memory_bytes, float)[usable] - inst.model.block_bytes * m[usable])
                                  / (inst.cache_bytes * m[usable]) * (1 + 1e-12)).astype(np.int64)
    capacity = np.zeros(blocks, dtype=np.int64)
    amortized_time = np.full(blocks, sessions * virtual)
    start = np.ones(inst.n_servers, dtype=np.int64)
    covering = 0
    for i, j in enumerate(order):
        width = int(m[j])
        if np.any(capacity < sessions):
            sums = sliding_window_view(amortized_time, width).sum(axis=1)
            under = sliding_window_view(capacity < sessions, width).any(axis=1)
            score = np.where(under, sums, -np.inf)
            top = float(score.max())
            a = int(np.flatnonzero(score >= top - 1e-9 * abs(top))[0])
        else:
            a = lexicographic_min_window(capacity, width)
        window = slice(a, a + width)
        served = np.minimum(np.maximum(sessions - capacity[window], 0), per_server[j])
        amortized_time[window] -= (virtual - amortized[j]) * served
        capacity[window] += per_server[j]
        start[j] = a + 1
        if covering == 0 and np.all(capacity >= sessions):
            covering = i + 1
    if covering == 0:
        raise PlacementError(f"the servers cannot serve every block for {sessions} concurrent sessions")
    placement = Placement(start=start, count=m, cache_slots=inst.cache_slots(m))
    return placement, GreedyTrace(order=order, covering=covering, amortized_s=amortized)


def theorem2_bound(inst: Instance, placement: Placement, trace: GreedyTrace, cost: LinkCost) -> float:
    """Theorem 2 of Sun et al.: CG-BPRR's mean path cost is at most
    ``Σ_{j≤K} t̃_j·m_j − τ_K·(Σ_{j≤K} m_j − L)`` over the first ``K`` servers placed.

    With :meth:`Instance.decode_cost` this is the paper's bound on the mean per-token time
    (``t̃_j·m_j = max_c t_cj + τ_j·m_j``). The argument holds for any cost of the form
    ``hop_s[c, j] + k·block_s[j]``: the first ``K`` servers fill blocks ``1..L`` left to right, the
    ``K``-th overlapping the others by ``Σ m_j − L`` blocks that a session skips, so their chain costs
    at most the bound and the shortest chain no more; hence the ``cost`` argument.
    """
    top = trace.order[: trace.covering]
    m = placement.count[top]
    worst_hop = cost.hop_s[:, top].max(axis=0)
    overlap = int(m.sum()) - inst.blocks
    return float(np.sum(worst_hop + m * cost.block_s[top]) - cost.block_s[top[-1]] * overlap)


@dataclass(frozen=True)
class PlacedSolution:
    """A placement with the routes of ``|R|`` concurrent sessions."""

    placement: Placement
    routes: tuple[Route, ...]


def cg_bprr(inst: Instance, sessions: int) -> tuple[PlacedSolution, GreedyTrace]:
    """CG-BPRR (Algorithm 1): CG-BP's placement, each session on its client's shortest chain by
    session time (:meth:`Instance.request_cost`)."""
    placement, trace = cg_bp(inst, sessions)
    routes = route_sessions(inst, placement, inst.request_cost(), sessions)
    return PlacedSolution(placement, routes), trace


# ----------------------------------------------------------------------------------------- PETALS
@dataclass(frozen=True, eq=False)
class PetalsParams:
    """PETALS' own settings, as its server and client use them.

    Attributes:
        cache_tokens: tokens of attention cache a server reserves per block it holds
            (``attn_cache_tokens``: 4096 for models without grouped-query attention, 16384 with).
        autograd_bytes: memory a server leaves free for autograd (2 GiB for BLOOM-176B, in
            proportion to ``d_model`` for other models).
        hop_overhead_s: PETALS' per-hop serialisation estimate in its route choice (18 ms measured).
        alloc_penalty_s: penalty PETALS' route choice adds at a server without free cache.
        forward_rps: each server's measured forward throughput (tokens/s through one block).
        network_rps: each server's measured network throughput.
    """

    forward_rps: np.ndarray
    network_rps: np.ndarray
    cache_tokens: int = 4096
    autograd_bytes: float = 2.0 * 2**30
    hop_overhead_s: float = 0.018
    alloc_penalty_s: float = 10.0

    def announced_throughput(self, counts: np.ndarray) -> np.ndarray:
        """The throughput a server announces for each of its blocks: compute shared by the blocks
        a session uses on average (``(1 + m)/2``), capped by the network."""
        avg_blocks = (1.0 + np.asarray(counts, float)) / 2.0
        return np.minimum(np.asarray(self.forward_rps, float) / avg_blocks, np.asarray(self.network_rps, float))


def petals_counts(inst: Instance, params: PetalsParams) -> np.ndarray:
    """PETALS' ``_choose_num_blocks``: ``⌊(M − autograd) / (s_m + 2·d_model·cache_tokens·bytes)⌋``,
    at most ``L``."""
    per_block = inst.model.block_bytes + inst.model.cache_bytes_per_block(params.cache_tokens)
    m = np.floor((np.asarray(inst.memory_bytes, float) - params.autograd_bytes) / per_block).astype(np.int64)
    return np.clip(np.minimum(m, inst.max_blocks), 0, inst.blocks).astype(np.int64)


def petals_cache_slots(inst: Instance, params: PetalsParams, counts: np.ndarray) -> np.ndarray:
    """Attention caches a PETALS server holds: its reserved budget (``cache_tokens`` per block held)
    in sessions of ``l_I + l`` tokens, never more than the memory left."""
    budget = np.asarray(counts, float) * inst.model.cache_bytes_per_block(params.cache_tokens)
    slots = np.floor(budget / inst.cache_bytes * (1 + 1e-12)).astype(np.int64)
    return np.minimum(slots, inst.cache_slots(counts))


def petals_placement(inst: Instance, params: PetalsParams, join_order: np.ndarray) -> Placement:
    """PETALS' placement when servers join in ``join_order``.

    Raises:
        PlacementError: the servers leave some block unheld.
    """
    m = petals_counts(inst, params)
    throughput = params.announced_throughput(m)
    block_throughput = np.zeros(inst.blocks)
    start = np.ones(inst.n_servers, dtype=np.int64)
    for j in join_order:
        if m[j] == 0:
            continue
        a = lexicographic_min_window(block_throughput, int(m[j]))
        start[j] = a + 1
        block_throughput[a: a + m[j]] += throughput[j]
    placement = Placement(start=start, count=m, cache_slots=petals_cache_slots(inst, params, m))
    missing = np.flatnonzero(placement.coverage(inst.blocks) == 0)
    if missing.size:
        raise PlacementError(f"PETALS' placement leaves {missing.size} of {inst.blocks} blocks unheld "
                             f"(its servers hold {int(m.sum())} blocks in total)")
    return placement


def petals_enter_cost(inst: Instance, params: PetalsParams, client: int) -> tuple[np.ndarray, np.ndarray]:
    """PETALS' estimate of a hop: ``(enter (n+1, n), exit (n,))`` from half pings plus its overhead."""
    enter = np.empty((inst.n_servers + 1, inst.n_servers))
    enter[0] = inst.client_rtt_s[client] / 2.0 + params.hop_overhead_s
    enter[1:] = inst.server_rtt_s / 2.0 + params.hop_overhead_s
    return enter, inst.client_rtt_s[client] / 2.0


def petals_penalty(free: np.ndarray, penalty_s: float) -> ExtraCost:
    """``extra`` adding PETALS' allocation penalty at servers whose free caches are too few."""
    def extra(j: int, k: np.ndarray) -> np.ndarray:
        return np.where(k <= free[j], 0.0, penalty_s)
    return extra


def petals_routes(inst: Instance, params: PetalsParams, placement: Placement,
                  sessions: int) -> tuple[tuple[Route, ...], int]:
    """PETALS' route choice for ``sessions`` concurrent sessions, one after another.

    Returns:
        ``(routes, short)``: the routes, and how many of them found too few free caches on their
        chain (those sessions would wait: PETALS penalises full servers but does not avoid them).
    """
    free = placement.cache_slots.copy()
    extra = petals_penalty(free, params.alloc_penalty_s)
    routes: list[Route] = []
    short = 0
    counts = sessions_per_client(inst.client_weights, sessions)
    for c in range(inst.n_clients):
        enter, exit_s = petals_enter_cost(inst, params, c)
        for _ in range(int(counts[c])):
            found = shortest_chain(placement, inst.blocks, enter, inst.decode_s_per_block, exit_s, extra)
            if found is None:
                raise PlacementError("PETALS' placement has no chain through blocks 1..L")
            path = found[1]
            ks = blocks_used(placement, path)
            if any(free[j] < k for j, k in zip(path, ks, strict=True)):
                short += 1
            else:
                for j, k in zip(path, ks, strict=True):
                    free[j] -= k
            routes.append(Route(c, path))
    return tuple(routes), short


# ----------------------------------------------------------------------------------------- improvements
def reservation_search(inst: Instance, sessions: int) -> tuple[PlacedSolution, int, float]:
    """CG-BP with cache reserved for ``R' ≤ |R|`` sessions instead of ``|R|``, the ``R'`` whose placement
    routes all ``|R|`` sessions (:func:`route_sessions`) with the smallest mean session time.

    Not in the paper, though it calls ``|R|`` a knob between fewer blocks per server (more chains in
    parallel) and more (shorter chains). CG-BP's reservation assumes every session passes every
    block of every server; a server late in a chain, or one of several holding the same blocks, sees
    fewer. ``R' = |R|`` is CG-BPRR itself, so the result is never worse.

    Returns:
        ``(solution, R', mean session time)``.

    Raises:
        PlacementError: no ``R'`` gives a placement that routes every session (not even ``|R|``).
    """
    cost = inst.request_cost()
    best: tuple[PlacedSolution, int, float] | None = None
    for reserve in range(sessions, 0, -1):
        try:
            placement, _ = cg_bp(inst, reserve)
            routes = route_sessions(inst, placement, cost, sessions)
        except PlacementError:
            continue
        value = mean_cost(cost, placement, routes)
        if best is None or value < best[2] * (1 - 1e-9):
            best = (PlacedSolution(placement, routes), reserve, value)
    if best is None:
        raise PlacementError(f"no reservation lets CG-BP route {sessions} concurrent sessions")
    return best



@dataclass(frozen=True)
class LocalSearchResult:
    """Outcome of :func:`local_search`.

    Attributes:
        solution: the best placement found and its routes.
        objective_s: its mean session time (``request_cost`` over the routes).
        initial_s: the starting solution's.
        moves: improving moves applied.
        evaluations: candidate placements evaluated.
    """

    solution: PlacedSolution
    objective_s: float
    initial_s: float
    moves: int
    evaluations: int


def _evaluate(inst: Instance, start: np.ndarray, count: np.ndarray, cost: LinkCost,
              sessions: int) -> tuple[float, PlacedSolution] | None:
    if np.any(count > inst.max_blocks) or np.any(count < 0):
        return None
    if np.any(inst.model.block_bytes * count > np.asarray(inst.memory_bytes, float) * (1 + 1e-12)):
        return None
    placement = Placement(start=start, count=count, cache_slots=inst.cache_slots(count))
    if np.any(placement.coverage(inst.blocks) == 0):
        return None
    try:
        routes = route_sessions(inst, placement, cost, sessions)
    except PlacementError:
        return None
    return mean_cost(cost, placement, routes), PlacedSolution(placement, routes)


_STEPS = (1, 2, 4, 8, 16)


def _moves(inst: Instance, placement: Placement, j: int, anchors: np.ndarray) -> list[tuple[int, int]]:
    """Candidate ``(start, count)`` for server ``j``, without its current one: the window shifted
    (by 1..16 blocks, to either end, or next to a window on a current route); resized by 1..16 blocks
    keeping its start, its end, or reaching block 1 or block ``L``; or emptied."""
    blocks = inst.blocks
    a, m = int(placement.start[j]), int(placement.count[j])
    most = int(min(inst.max_blocks[j], blocks, np.floor(float(inst.memory_bytes[j]) / inst.model.block_bytes)))
    out: set[tuple[int, int]] = set()
    if m > 0:
        starts = {a + d for s in _STEPS for d in (-s, s)} | {1, blocks - m + 1}
        for i in anchors:
            if i != j and placement.count[i] > 0:
                starts |= {int(placement.end[i]) + 1, int(placement.start[i]) - m}
        out |= {(s, m) for s in starts if 1 <= s <= blocks - m + 1}
        out.add((1, 0))
    end = a + m - 1 if m > 0 else blocks
    for size in {m + d for s in _STEPS for d in (-s, s)}:
        if 1 <= size <= most:
            for s in ((a if m > 0 else 1), end - size + 1, 1, blocks - size + 1):
                if 1 <= s <= blocks - size + 1:
                    out.add((s, size))
    out.discard((a, m))
    return sorted(out)


def local_search(inst: Instance, initial: PlacedSolution, sessions: int, max_moves: int = 100,
                 max_evaluations: int = 5000) -> LocalSearchResult:
    """First-improvement local search on a placement, for the MILP's objective (mean session time
    of ``sessions`` concurrent sessions routed by :func:`route_sessions`).

    A move changes one server's window (:func:`_moves`): shift it (by 1..16 blocks, to either end, or
    next to a window on a current route), resize it by 1..16 blocks (keeping its start or its end, or
    reaching block 1 or ``L``), or empty it. Block counts may exceed CG-BP's conservative ones as
    long as every session still finds a chain with free caches. Servers on current routes are tried
    first. Deterministic; stops at a local optimum,
    after ``max_moves`` improvements or ``max_evaluations`` candidates.
    """
    cost = inst.request_cost()
    best = initial
    best_value = mean_cost(cost, initial.placement, initial.routes)
    initial_value = best_value
    moves = evaluations = 0
    improved = True
    while improved and moves < max_moves and evaluations < max_evaluations:
        improved = False
        on_routes = sorted({j for r in best.routes for j in r.servers})
        anchors = np.asarray(on_routes, dtype=np.int64)
        others = [j for j in range(inst.n_servers) if j not in set(on_routes)]
        for j in on_routes + others:
            for s, m in _moves(inst, best.placement, j, anchors):
                if evaluations >= max_evaluations:
                    break
                start = best.placement.start.copy()
                count = best.placement.count.copy()
                start[j], count[j] = s, m
                evaluations += 1
                got = _evaluate(inst, start, count, cost, sessions)
                if got is not None and got[0] < best_value * (1 - 1e-9):
                    best_value, best = got[0], got[1]
                    moves += 1
                    improved = True
                    break
            if improved or evaluations >= max_evaluations:
                break
    return LocalSearchResult(solution=best, objective_s=best_value, initial_s=initial_value, moves=moves,
                             evaluations=evaluations)
