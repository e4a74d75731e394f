"""Chained block hashes: the identity of a cached KV block.

A full block of ``block_size`` tokens is identified by ``hash((parent_hash, tokens))`` where
``parent_hash`` is the hash of the block before it (``ROOT_HASH`` for the first). Two prompts share
the first *k* hashes exactly when they share their first ``k * block_size`` tokens, which is what
vLLM's automatic prefix caching relies on. Only full blocks are hashed.

The hash is CPython's tuple hash over ints, which is not salted (unlike ``str`` hashing), so it is
identical across processes and runs on 64-bit builds: the router, the emulator and the simulator
compute the same values for the same tokens.

Traces that carry hash ids for coarser blocks (Mooncake: 512 tokens per id) are expanded to
``block_size`` blocks by :func:`expand_coarse_hash_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 16
ROOT_HASH = 0x6973_7468_6D75_73  # "isthmus"; parent of the first block

# Hashes derived from coarse trace ids live in their own range, far from tuple hashes in practice.
_COARSE_TAG = 1 << 62


def hash_token_blocks(
    tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, parent: int = ROOT_HASH
) -> tuple[int, ...]:
    """Chained hashes of every full ``block_size`` block of ``tokens``, in order."""
    out: list[int] = []
    h = parent
    full = len(tokens) - len(tokens) % block_size
    for start in range(0, full, block_size):
        h = hash((h, tuple(tokens[start : start + block_size])))
        out.append(h)
    return tuple(out)


def expand_coarse_hash_ids(
    hash_ids: Sequence[int],
    prompt_tokens: int,
    coarse_block: int = 512,
    block_size: int = DEFAULT_BLOCK_SIZE,
    namespace: int = 0,
) -> tuple[int, ...]:
    """Map prefix hash ids of ``coarse_block``-token blocks to ``block_size``-token block hashes.

    Trace hash ids are already prefix identities (equal ids at a position mean equal prefixes up to
    the end of that coarse block), so sub-block ``j`` of coarse id ``h`` gets the deterministic id
    ``(namespace, h, j)`` packed into one int, with no chaining needed. Only sub-blocks that are full
    within ``prompt_tokens`` are returned. ``namespace`` separates copies of a trace that is
    replayed more than once (their prefixes must not collide).
    """
    if coarse_block % block_size:
        raise ValueError(f"coarse block {coarse_block} is not a multiple of block size {block_size}")
    per = coarse_block // block_size
    n_full = min(prompt_tokens // block_size, len(hash_ids) * per)
    tag = _COARSE_TAG | (namespace << 48)
    out: list[int] = []
    for i, hid in enumerate(hash_ids):
        base = tag | (hid * per)
        take = min(per, n_full - i * per)
        if take <= 0:
            break
        out.extend(range(base, base + take))
    return tuple(out)
