"""Small placement instances for the tests: a builder and a hypothesis strategy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from isthmus.place.model import Instance, ModelSpec

REPO = Path(__file__).resolve().parents[2]
PLACE = REPO / "scenarios" / "place"
GB = 1e9


def make_instance(memory_gb: Sequence[float], decode_ms: Sequence[float], prefill_ms: Sequence[float],
                  client_rtt_ms: Sequence[Sequence[float]], blocks: int, cache_gb: float, block_gb: float = 1.0,
                  max_blocks: Sequence[int] | None = None, output_tokens: int = 8,
                  token_overhead_ms: float = 0.0, setup_ms: float = 0.0) -> Instance:
    """An instance with ``s_m = block_gb`` and ``s_c = cache_gb`` exactly (2 prompt tokens, ``output_tokens``)."""
    n = len(memory_gb)
    rtt = np.asarray(client_rtt_ms, float) / 1e3
    tokens = 2 + output_tokens
    model = ModelSpec("toy", blocks, block_gb * GB, d_model=1000, cache_bytes_per_value=cache_gb * GB / (2000 * tokens))
    return Instance(
        model=model, input_tokens=2, output_tokens=output_tokens,
        server_names=tuple(f"s{j}" for j in range(n)), server_kinds=("gpu",) * n, server_sites=("x",) * n,
        memory_bytes=np.asarray(memory_gb, float) * GB, prefill_s_per_block=np.asarray(prefill_ms, float) / 1e3,
        decode_s_per_block=np.asarray(decode_ms, float) / 1e3,
        max_blocks=np.asarray(max_blocks if max_blocks is not None else [blocks] * n, dtype=np.int64),
        client_names=tuple(f"c{c}" for c in range(rtt.shape[0])), client_sites=("x",) * rtt.shape[0],
        client_weights=np.full(rtt.shape[0], 1.0 / rtt.shape[0]), client_rtt_s=rtt,
        server_rtt_s=np.zeros((n, n)), token_overhead_s=token_overhead_ms / 1e3, session_setup_s=setup_ms / 1e3)


@st.composite
def instances(draw: st.DrawFn, max_servers: int = 5, max_blocks: int = 10, max_clients: int = 2) -> Instance:
    """Random small instances: 1 GB blocks, caches of 0.05..0.6 GB, 1..12 GB of memory, RTTs up to 200 ms."""
    n = draw(st.integers(1, max_servers))
    c = draw(st.integers(1, max_clients))
    blocks = draw(st.integers(1, max_blocks))
    floats = st.floats
    memory = draw(st.lists(floats(1.0, 12.0), min_size=n, max_size=n))
    decode = draw(st.lists(floats(0.5, 20.0), min_size=n, max_size=n))
    prefill = draw(st.lists(floats(1.0, 100.0), min_size=n, max_size=n))
    rtt = [draw(st.lists(floats(0.0, 200.0), min_size=n, max_size=n)) for _ in range(c)]
    cache = draw(floats(0.05, 0.6))
    caps = draw(st.one_of(st.none(), st.lists(st.integers(1, blocks), min_size=n, max_size=n)))
    return make_instance(memory, decode, prefill, rtt, blocks, cache, max_blocks=caps,
                         output_tokens=draw(st.integers(1, 64)), token_overhead_ms=draw(floats(0.0, 50.0)))
