"""A small discrete-event simulator of sessions on a placement: arrivals, chains, caches, retries.

Sessions arrive (Poisson, :func:`poisson_arrivals`) at their clients. On each attempt the router
picks a chain for the current state; if every server on it has the free attention caches the session
needs there (``k_j`` of them, one per block processed), the session takes them and runs; otherwise it
tries again after PETALS' client back-off (``min(1 s · 2^(n−1), 60 s)`` before the ``n``-th retry,
``petals.client.routing.sequence_manager``), choosing again. A running session holds its caches
until it ends. Its times follow the model of Sun et al. (:mod:`isthmus.place.model`): after the
session setup, the first token comes ``Σ (t^I_cj + k_j·τ^I_j)`` later and the session ends after
``l − 1`` more tokens of ``Σ (t_cj + k_j·τ_j)`` each; the paper measured that a session's speed does
not depend on the others sharing its servers, so only memory couples sessions.

Routers (:data:`ROUTERS`):

- ``ws_rr``: WS-RR, the paper's online router: the shortest chain by session time where entering a
  server adds the wait until enough of its caches free (known from the running sessions' ends);
  hops needing more caches than the server has are excluded.
- ``shortest``: the shortest chain by session time, blind to load (CG-BPRR's offline rule online).
- ``petals``: PETALS' own choice (half pings, per-hop overhead, compute, a penalty at servers without
  free caches).

Pure: the arrivals (drawn from a seeded ``numpy.random.Generator``) are an argument; the run reads
no clock and no file and is the same for the same input.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isthmus.place.algorithms import (
    ExtraCost,
    PetalsParams,
    petals_enter_cost,
    petals_penalty,
    shortest_chain,
)
from isthmus.place.model import Instance, Placement, PlacementError, blocks_used

ROUTERS = ("ws_rr", "shortest", "petals")


@dataclass(frozen=True)
class Arrivals:
    """Session arrival times (s, increasing) and the client of each."""

    times_s: np.ndarray
    clients: np.ndarray


def poisson_arrivals(rng: np.random.Generator, rate_rps: float, sessions: int, weights: np.ndarray) -> Arrivals:
    """``sessions`` Poisson arrivals at ``rate_rps`` (the first at time 0, as in the paper's runs), each
    from a client drawn by ``weights``."""
    if rate_rps <= 0 or sessions < 1:
        raise ValueError("rate_rps must be > 0 and sessions >= 1")
    gaps = rng.exponential(1.0 / rate_rps, size=sessions)
    gaps[0] = 0.0
    clients = rng.choice(len(weights), size=sessions, p=np.asarray(weights, float))
    return Arrivals(times_s=np.cumsum(gaps), clients=clients.astype(np.int64))


@dataclass(frozen=True)
class RetryPolicy:
    """PETALS' client back-off: before the ``n``-th retry wait ``min(min_s·2^(n−1), max_s)``."""

    min_s: float = 1.0
    max_s: float = 60.0

    def delay(self, retry: int) -> float:
        return float(min(self.min_s * 2.0 ** (retry - 1), self.max_s))


@dataclass
class _ServerState:
    """Free caches and the running sessions' (end time, caches held) per server."""

    free: np.ndarray
    running: list[dict[int, tuple[float, int]]] = field(default_factory=list)

    def wait_cost(self, now: float) -> ExtraCost:
        """WS-RR's wait: time until ``k`` caches are free at server ``j`` (``inf`` if it never holds ``k``)."""
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def extra(j: int, k: np.ndarray) -> np.ndarray:
            out = np.zeros(k.shape)
            short = k > self.free[j]
            if not short.any():
                return out
            if j not in cache:
                held = sorted(self.running[j].values())  # by end time
                ends = np.array([t for t, _ in held], float)
                freed = self.free[j] + np.cumsum(np.array([c for _, c in held], dtype=np.int64))
                cache[j] = ends, freed
            ends, freed = cache[j]
            idx = np.searchsorted(freed, k[short], side="left")  # first end after which k are free
            wait = np.full(idx.shape, np.inf)
            ok = idx < len(ends)
            wait[ok] = np.maximum(ends[idx[ok]] - now, 0.0)
            out[short] = wait
            return out

        return extra


Router = Callable[[int, float, _ServerState], tuple[int, ...] | None]


def make_router(kind: str, inst: Instance, placement: Placement, petals: PetalsParams | None = None) -> Router:
    """The chain choice ``router(client, now, state) -> servers`` of ``kind`` (see :data:`ROUTERS`)."""
    cost = inst.request_cost()
    if kind == "ws_rr":
        def ws_rr(client: int, now: float, state: _ServerState) -> tuple[int, ...] | None:
            found = shortest_chain(placement, inst.blocks, cost.hop_s[client], cost.block_s, extra=state.wait_cost(now))
            return None if found is None else found[1]
        return ws_rr
    if kind == "shortest":
        fixed: dict[int, tuple[int, ...] | None] = {}

        def shortest(client: int, now: float, state: _ServerState) -> tuple[int, ...] | None:
            if client not in fixed:
                found = shortest_chain(placement, inst.blocks, cost.hop_s[client], cost.block_s)
                fixed[client] = None if found is None else found[1]
            return fixed[client]
        return shortest
    if kind == "petals":
        if petals is None:
            raise ValueError("the petals router needs PetalsParams")
        params = petals
        tables = {c: petals_enter_cost(inst, params, c) for c in range(inst.n_clients)}

        def petals_route(client: int, now: float, state: _ServerState) -> tuple[int, ...] | None:
            enter, exit_s = tables[client]
            found = shortest_chain(placement, inst.blocks, enter, inst.decode_s_per_block, exit_s,
                                   petals_penalty(state.free, params.alloc_penalty_s))
            return None if found is None else found[1]
        return petals_route
    raise ValueError(f"unknown router {kind!r}; routers: {', '.join(ROUTERS)}")


@dataclass(frozen=True)
class SimResult:
    """Per-session outcomes of one run (times in seconds, absolute unless said otherwise)."""

    output_tokens: int
    arrival_s: np.ndarray
    start_s: np.ndarray
    first_token_s: np.ndarray
    end_s: np.ndarray
    retries: np.ndarray
    hops: np.ndarray
    max_concurrent: int

    def summary(self) -> dict[str, Any]:
        """Mean time per token (all tokens, waits included, the paper's metric), first-token time,
        waits and chain lengths."""
        ttft = self.first_token_s - self.arrival_s
        wait = self.start_s - self.arrival_s
        total = self.end_s - self.arrival_s
        pct = {f"p{q}": float(np.percentile(ttft, q)) for q in (50, 90, 99)}
        return {
            "sessions": len(self.arrival_s),
            "time_per_token_s": float(total.sum() / (len(total) * self.output_tokens)),
            "ttft_s": {"mean": float(ttft.mean()), **pct},
            "decode_per_token_s": float(np.mean((self.end_s - self.first_token_s) / max(self.output_tokens - 1, 1))),
            "wait_s": float(wait.mean()),
            "waited_share": float(np.mean(wait > 0)),
            "retries_mean": float(self.retries.mean()),
            "hops_mean": float(self.hops.mean()),
            "max_concurrent": int(self.max_concurrent),
        }


def simulate(inst: Instance, placement: Placement, router: Router, arrivals: Arrivals,
             retry: RetryPolicy | None = None, max_attempts: int = 10_000) -> SimResult:
    """Run every session of ``arrivals`` to its end on ``placement`` with ``router``.

    Events are ordered by ``(time, kind, sequence)`` with session ends before attempts at the same
    instant, so caches freed at ``t`` are free for a session trying at ``t``.

    Raises:
        PlacementError: the router finds no chain at all, or a session never gets its caches
            within ``max_attempts`` tries (a chain needing more caches than a server has).
    """
    retry = retry or RetryPolicy()
    n_sessions = len(arrivals.times_s)
    state = _ServerState(free=placement.cache_slots.copy(), running=[{} for _ in range(inst.n_servers)])
    prefill, decode = inst.prefill_cost(), inst.decode_cost()
    rest = inst.output_tokens - 1
    start = np.full(n_sessions, np.nan)
    first = np.full(n_sessions, np.nan)
    end = np.full(n_sessions, np.nan)
    retries = np.zeros(n_sessions, dtype=np.int64)
    hops = np.zeros(n_sessions, dtype=np.int64)
    holding: dict[int, list[tuple[int, int]]] = {}
    end_kind, try_kind = 0, 1
    events: list[tuple[float, int, int, int]] = [(float(t), try_kind, s, s) for s, t in enumerate(arrivals.times_s)]
    heapq.heapify(events)
    seq = n_sessions
    active = max_active = 0
    while events:
        now, kind, _, s = heapq.heappop(events)
        if kind == end_kind:
            for j, k in holding.pop(s):
                state.free[j] += k
                del state.running[j][s]
            active -= 1
            continue
        client = int(arrivals.clients[s])
        path = router(client, now, state)
        if path is None:
            raise PlacementError(f"no chain through blocks 1..{inst.blocks} for client {inst.client_names[client]}")
        ks = blocks_used(placement, path)
        if all(state.free[j] >= k for j, k in zip(path, ks, strict=True)):
            to_first = inst.session_setup_s + sum(prefill.hop_s[client, j] + k * prefill.block_s[j]
                                                  for j, k in zip(path, ks, strict=True))
            per_token = sum(decode.hop_s[client, j] + k * decode.block_s[j] for j, k in zip(path, ks, strict=True))
            start[s], first[s] = now, now + to_first
            end[s] = now + to_first + rest * per_token
            hops[s] = len(path)
            holding[s] = list(zip(path, ks, strict=True))
            for j, k in holding[s]:
                state.free[j] -= k
                state.running[j][s] = (float(end[s]), k)
            active += 1
            max_active = max(max_active, active)
            heapq.heappush(events, (float(end[s]), end_kind, seq, s))
        else:
            retries[s] += 1
            if retries[s] >= max_attempts:
                raise PlacementError(f"session {s} found no free caches in {max_attempts} attempts")
            heapq.heappush(events, (now + retry.delay(int(retries[s])), try_kind, seq, s))
        seq += 1
    return SimResult(output_tokens=inst.output_tokens, arrival_s=np.asarray(arrivals.times_s, float), start_s=start,
                     first_token_s=first, end_s=end, retries=retries, hops=hops, max_concurrent=max_active)
