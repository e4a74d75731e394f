"""The model of pipelined (PETALS-style) inference that placement optimises.

Sun, He, Ji and Parag, "Optimizing Resource Allocation for Geographically-Distributed Inference by
Large Language Models" (arXiv 2512.21884), section 2. A model of ``L`` transformer blocks is served
by servers that each hold one run of consecutive blocks ``[a_j, a_j + m_j - 1]`` (1-based). A
session (one request) of client ``c`` walks a chain of servers that together cover blocks ``1..L``;
the client relays the activations between consecutive servers (hub and spoke), so every hop costs a
client-to-server round trip. On path ``p``, with ``k_j`` the blocks server ``j`` processes, a session
with ``l_I`` prompt tokens and ``l`` output tokens takes (seconds)::

    T = Σ_{j∈p} (t^I_cj + k_j·τ^I_j) + (l − 1)·Σ_{j∈p} (t_cj + k_j·τ_j)

``t^I_cj`` / ``t_cj`` are the client-server round trips with the prompt and with one token (raw RTT
plus a fixed serialisation overhead), ``τ^I_j`` the per-block time of the prefill and ``τ_j`` the
per-block time of one decoded token. The first token comes after the first sum; ``Σ (t_cj + k_j·τ_j)``
is the per-token (decode) time that the paper's Theorem 2 bounds.

Memory at server ``j``: ``s_m·m_j + s_c·Σ_r k^r_j ≤ M_j``, where ``s_m`` is the size of one block and
``s_c = 2·d_model·(l_I + l)·bytes`` the attention cache (K and V) of one block for one session.

Units: seconds and bytes throughout; configuration files use milliseconds and GB (10^9 bytes).
Nothing here reads a file, a clock or a global random generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from isthmus.core.errors import IsthmusError


class PlacementError(IsthmusError):
    """No placement or route exists for the instance as given (e.g. too little memory for the sessions)."""


@dataclass(frozen=True)
class ModelSpec:
    """The served model, as placement sees it.

    Attributes:
        name: label only.
        blocks: ``L``, the number of transformer blocks.
        block_bytes: ``s_m``, bytes of one block's weights as loaded (e.g. NF4 for BLOOM-176B: 1.32 GB).
        d_model: hidden size; the attention cache of one token in one block is ``2·d_model`` values.
        cache_bytes_per_value: bytes per cached key/value element (2 for fp16 / bf16).
    """

    name: str
    blocks: int
    block_bytes: float
    d_model: int
    cache_bytes_per_value: float = 2.0

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if not (self.block_bytes > 0 and self.d_model > 0 and self.cache_bytes_per_value > 0):
            raise ValueError("block_bytes, d_model and cache_bytes_per_value must be > 0")

    def cache_bytes_per_block(self, tokens: int) -> float:
        """Attention cache of one block for one session of ``tokens`` tokens: ``2·d_model·tokens·bytes``."""
        return 2.0 * self.d_model * tokens * self.cache_bytes_per_value


@dataclass(frozen=True)
class LinkCost:
    """A linear path cost: visiting server ``j`` from client ``c`` and processing ``k`` blocks there
    costs ``hop_s[c, j] + k·block_s[j]``. Every objective placement uses has this form."""

    hop_s: np.ndarray
    block_s: np.ndarray


@dataclass(frozen=True, eq=False)
class Instance:
    """Servers, clients, network, model and session shape: everything an algorithm decides on.

    Arrays are indexed by server ``j`` (``n`` servers) and client ``c`` (``C`` clients).

    Attributes:
        model: the served model.
        input_tokens: ``l_I``, prompt tokens per session.
        output_tokens: ``l``, generated tokens per session (>= 1).
        server_names, server_kinds, server_sites: labels (kind: GPU type; site: network location).
        memory_bytes: ``M_j``, GPU memory usable for blocks and caches.
        prefill_s_per_block: ``τ^I_j``, time of one block over the whole prompt.
        decode_s_per_block: ``τ_j``, time of one block for one generated token.
        max_blocks: most blocks server ``j`` may hold (``L`` when unlimited).
        client_names, client_sites: labels.
        client_weights: share of sessions from each client (sums to 1).
        client_rtt_s: raw round trip between client ``c`` and server ``j``, shape ``(C, n)``.
        server_rtt_s: raw round trip between servers, shape ``(n, n)``; only PETALS' own route
            choice uses it (it estimates paths from server-to-server pings).
        token_overhead_s: added to the raw RTT for one decoded token's hop (serialisation, transfer).
        prompt_overhead_s: added to the raw RTT for the prompt's hop.
        session_setup_s: fixed time to open a session before its first hop.
    """

    model: ModelSpec
    input_tokens: int
    output_tokens: int
    server_names: tuple[str, ...]
    server_kinds: tuple[str, ...]
    server_sites: tuple[str, ...]
    memory_bytes: np.ndarray
    prefill_s_per_block: np.ndarray
    decode_s_per_block: np.ndarray
    max_blocks: np.ndarray
    client_names: tuple[str, ...]
    client_sites: tuple[str, ...]
    client_weights: np.ndarray
    client_rtt_s: np.ndarray
    server_rtt_s: np.ndarray
    token_overhead_s: float = 0.0
    prompt_overhead_s: float = 0.0
    session_setup_s: float = 0.0

    def __post_init__(self) -> None:
        n, c = len(self.server_names), len(self.client_names)
        if n < 1 or c < 1:
            raise ValueError("an instance needs at least one server and one client")
        if self.input_tokens < 0 or self.output_tokens < 1:
            raise ValueError("input_tokens must be >= 0 and output_tokens >= 1")
        for name in ("memory_bytes", "prefill_s_per_block", "decode_s_per_block", "max_blocks"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"{name} must have one entry per server ({n})")
        if np.shape(self.client_weights) != (c,) or np.shape(self.client_rtt_s) != (c, n):
            raise ValueError("client_weights must be (C,) and client_rtt_s (C, n)")
        if np.shape(self.server_rtt_s) != (n, n):
            raise ValueError("server_rtt_s must be (n, n)")
        if len(self.server_kinds) != n or len(self.server_sites) != n or len(self.client_sites) != c:
            raise ValueError("one kind and one site per server, one site per client")
        for name in ("memory_bytes", "prefill_s_per_block", "decode_s_per_block", "client_rtt_s",
                     "server_rtt_s", "client_weights"):
            arr = np.asarray(getattr(self, name), dtype=float)
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{name} must be finite and >= 0")
        if np.any(np.asarray(self.max_blocks) < 0):
            raise ValueError("max_blocks must be >= 0")
        if not np.isclose(float(np.sum(self.client_weights)), 1.0):
            raise ValueError("client_weights must sum to 1")
        if min(self.token_overhead_s, self.prompt_overhead_s, self.session_setup_s) < 0:
            raise ValueError("overheads must be >= 0")

    @property
    def n_servers(self) -> int:
        return len(self.server_names)

    @property
    def n_clients(self) -> int:
        return len(self.client_names)

    @property
    def blocks(self) -> int:
        """``L``."""
        return self.model.blocks

    @property
    def cache_bytes(self) -> float:
        """``s_c``: attention cache of one block for one session of ``l_I + l`` tokens, bytes."""
        return self.model.cache_bytes_per_block(self.input_tokens + self.output_tokens)

    @property
    def decode_rtt_s(self) -> np.ndarray:
        """``t_cj``: per-token round trip client ``c`` <-> server ``j``, ``(C, n)``."""
        return self.client_rtt_s + self.token_overhead_s

    @property
    def prompt_rtt_s(self) -> np.ndarray:
        """``t^I_cj``: the prompt's round trip client ``c`` <-> server ``j``, ``(C, n)``."""
        return self.client_rtt_s + self.prompt_overhead_s

    def request_cost(self) -> LinkCost:
        """Cost whose path sum is a session's time ``T`` (without the fixed setup): prefill plus
        ``l − 1`` decoded tokens. The objective of CG-BPRR's routing and of the MILP."""
        rest = self.output_tokens - 1
        return LinkCost(hop_s=self.prompt_rtt_s + rest * self.decode_rtt_s,
                        block_s=self.prefill_s_per_block + rest * self.decode_s_per_block)

    def decode_cost(self) -> LinkCost:
        """Cost whose path sum is the per-token (decode) time ``Σ (t_cj + k_j·τ_j)``."""
        return LinkCost(hop_s=self.decode_rtt_s.copy(), block_s=np.asarray(self.decode_s_per_block, float).copy())

    def prefill_cost(self) -> LinkCost:
        """Cost whose path sum is the time from the first hop to the first token."""
        return LinkCost(hop_s=self.prompt_rtt_s.copy(), block_s=np.asarray(self.prefill_s_per_block, float).copy())

    def cache_slots(self, counts: np.ndarray) -> np.ndarray:
        """Attention caches (one block for one session each) that fit beside ``counts`` blocks:
        ``⌊(M_j − s_m·m_j) / s_c⌋``, at least 0."""
        free = np.asarray(self.memory_bytes, float) - self.model.block_bytes * np.asarray(counts, float)
        # a hair of tolerance so that an exact fit is not lost to rounding
        return np.maximum(np.floor(free / self.cache_bytes * (1 + 1e-12)), 0).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Placement:
    """Which blocks each server holds, and how many attention caches it keeps for sessions.

    Attributes:
        start: ``a_j``, first block held (1-based); meaningless when ``count[j] == 0``.
        count: ``m_j``, blocks held (0: the server is not used).
        cache_slots: attention caches (one block, one session each) the server can hold at once.
    """

    start: np.ndarray
    count: np.ndarray
    cache_slots: np.ndarray

    def __post_init__(self) -> None:
        for name in ("start", "count", "cache_slots"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        if not (self.start.shape == self.count.shape == self.cache_slots.shape) or self.start.ndim != 1:
            raise ValueError("start, count and cache_slots must be 1-D arrays of one length")

    @property
    def end(self) -> np.ndarray:
        """Last block held, ``a_j + m_j − 1`` (``a_j − 1`` when nothing is held)."""
        return self.start + self.count - 1

    @property
    def used(self) -> np.ndarray:
        """Servers holding at least one block."""
        return self.count > 0

    def coverage(self, blocks: int) -> np.ndarray:
        """How many servers hold each block ``1..blocks``."""
        cover = np.zeros(blocks + 1, dtype=np.int64)
        for a, m in zip(self.start[self.used], self.count[self.used], strict=True):
            cover[a - 1] += 1
            cover[min(a - 1 + m, blocks)] -= 1
        return np.cumsum(cover)[:blocks]


@dataclass(frozen=True)
class Route:
    """One session's chain: its client and the servers it visits in order."""

    client: int
    servers: tuple[int, ...]


def blocks_used(placement: Placement, servers: Sequence[int]) -> list[int]:
    """``k_j`` for each server of a chain: the first processes blocks ``1..e``, each next one the blocks
    from the previous server's end to its own."""
    ends = placement.end
    out: list[int] = []
    reached = 0
    for j in servers:
        out.append(int(ends[j]) - reached)
        reached = int(ends[j])
    return out


def route_cost(cost: LinkCost, placement: Placement, route: Route) -> float:
    """``Σ_{j∈p} (hop_s[c, j] + k_j·block_s[j])`` for ``route``."""
    ks = blocks_used(placement, route.servers)
    return float(sum(cost.hop_s[route.client, j] + k * cost.block_s[j] for j, k in zip(route.servers, ks, strict=True)))


def sessions_per_client(weights: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` sessions among clients in proportion to ``weights`` (largest remainder; ties to
    the lower index)."""
    w = np.asarray(weights, float)
    exact = w / w.sum() * total
    base = np.floor(exact).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        order = np.argsort(-(exact - base), kind="stable")
        base[order[:short]] += 1
    return base
