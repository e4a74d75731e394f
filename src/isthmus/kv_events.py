"""vLLM's KV-cache events on the wire: encoding (the engine double publishes) and decoding (the
router subscribes), in one place.

Wire format (as vLLM's ``vllm/distributed/kv_events.py`` publishes it): each message is a ZMQ
multipart ``[topic, seq, payload]`` where ``topic`` is the configured topic (UTF-8, empty by
default), ``seq`` the batch's sequence number as 8 bytes big-endian (0, 1, 2, ... per publisher) and
``payload`` one msgpack-encoded ``EventBatch``. One batch is sent per engine step that changed the
cache. Two encodings, chosen by ``--kv-events-encoding``:

``array`` (vLLM before the map change; msgspec ``array_like`` structs with a tag)::

    [ts, [event, ...], data_parallel_rank]
    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

``map`` (newer vLLM; tagged maps, tag field ``"type"``)::

    {"ts": ts, "events": [event, ...], "data_parallel_rank": 0}
    {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": h | None, "token_ids": [...],
     "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}
    {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"}
    {"type": "AllBlocksCleared"}

``ts`` is the Unix time in seconds (float). Block hashes are the engine's chained hashes
(:func:`isthmus.core.hashing.hash_token_blocks` over the request's token ids, signed 64-bit ints),
so a router that tokenizes the same way computes the same values. ``parent_block_hash`` is ``None``
for a prompt's first block, as in vLLM. A ``BlockStored`` carries a run of consecutive blocks of one
prompt and their ``len(block_hashes) * block_size`` tokens; ``BlockRemoved`` is sent when a cached
block is evicted to be reused; ``AllBlocksCleared`` when the whole cache was reset
(``POST /reset_prefix_cache`` with nothing running). Only prompt blocks are cached, so only they
appear. A late subscriber misses what was sent before it joined (ZMQ PUB/SUB).

Publishing side: :class:`BlockStored`, :class:`BlockRemoved`, :class:`AllBlocksCleared` and
:func:`encode_batch`. Subscribing side: :func:`decode_batch` turns a payload into the changes a
prefix mirror needs (:class:`StoredBlocks`, :class:`RemovedBlocks`, :class:`ClearedBlocks`),
accepting either encoding (also mixed: vLLM 0.3x sends an array batch of map events), extra fields and
bytes hashes (newer vLLM), and applying only GPU-medium events; anything it cannot read raises
:class:`MalformedBatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

Encoding = Literal["auto", "array", "map"]
GPU_MEDIA = (None, "GPU")
MEDIUM_GPU = "GPU"


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive blocks of one prompt entered the cache."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks were evicted."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every cached block was dropped."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


def _event_array(e: KvEvent) -> list[Any]:
    if isinstance(e, BlockStored):
        return ["BlockStored", list(e.block_hashes), e.parent_block_hash, list(e.token_ids), e.block_size, None,
                MEDIUM_GPU]
    if isinstance(e, BlockRemoved):
        return ["BlockRemoved", list(e.block_hashes), MEDIUM_GPU]
    return ["AllBlocksCleared"]


def _event_map(e: KvEvent) -> dict[str, Any]:
    if isinstance(e, BlockStored):
        return {"type": "BlockStored", "block_hashes": list(e.block_hashes), "parent_block_hash": e.parent_block_hash,
                "token_ids": list(e.token_ids), "block_size": e.block_size, "lora_id": None, "medium": MEDIUM_GPU,
                "lora_name": None}
    if isinstance(e, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(e.block_hashes), "medium": MEDIUM_GPU}
    return {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[KvEvent], ts: float, encoding: Literal["array", "map"],
                 data_parallel_rank: int = 0) -> bytes:
    """One ``EventBatch`` as msgpack bytes, in the given encoding (module docstring)."""
    if encoding == "array":
        doc: Any = [ts, [_event_array(e) for e in events], data_parallel_rank]
    else:
        doc = {"ts": ts, "events": [_event_map(e) for e in events], "data_parallel_rank": data_parallel_rank}
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed



class MalformedBatch(ValueError):
    """A KV event message that cannot be decoded (the message says why)."""


@dataclass(frozen=True, slots=True)
class StoredBlocks:
    """A run of consecutive blocks entered the replica's cache (first block first).

    Attributes:
        block_hashes: the engine's hashes of the blocks.
        parent_block_hash: the engine's hash of the block before the run (``None``: the prompt's start).
        token_ids: the run's tokens (``len(block_hashes) * block_size`` of them), empty when not sent.
        block_size: tokens per block, 0 when not sent.
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    block_size: int = 0


@dataclass(frozen=True, slots=True)
class RemovedBlocks:
    """Blocks were evicted from the replica's cache."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClearedBlocks:
    """The replica's whole cache was dropped."""


KvChange = StoredBlocks | RemovedBlocks | ClearedBlocks

def _hash(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray):  # newer vLLM: raw sha256 digests; never equal to ours
        return int.from_bytes(value, "big", signed=True)
    raise MalformedBatch(f"a block hash must be an int or bytes, got {type(value).__name__}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise MalformedBatch(f"block_hashes must be a list, got {type(value).__name__}")
    return tuple(_hash(v) for v in value)


def _parent(value: Any) -> int | None:
    return None if value is None else _hash(value)


def _tokens(value: Any, size: Any) -> tuple[tuple[int, ...], int]:
    """Token ids and block size of a ``BlockStored`` when both are well-formed, else ``((), 0)``
    (they are optional for the mirror: without them the engine's hashes are taken as they are)."""
    if (isinstance(value, list | tuple) and isinstance(size, int) and not isinstance(size, bool) and size > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return tuple(value), size
    return (), 0


def _event_from_array(e: Any) -> KvChange | None:
    if not isinstance(e, list | tuple) or not e or not isinstance(e[0], str):
        raise MalformedBatch("an array-encoded event must be a list starting with its type name")
    kind = e[0]
    if kind == "BlockStored":
        if len(e) < 3:
            raise MalformedBatch("BlockStored needs block_hashes and parent_block_hash")
        medium = e[6] if len(e) > 6 else None
        if medium not in GPU_MEDIA:
            return None
        tokens, size = _tokens(e[3] if len(e) > 3 else None, e[4] if len(e) > 4 else None)
        return StoredBlocks(_hashes(e[1]), _parent(e[2]), tokens, size)
    if kind == "BlockRemoved":
        if len(e) < 2:
            raise MalformedBatch("BlockRemoved needs block_hashes")
        medium = e[2] if len(e) > 2 else None
        return RemovedBlocks(_hashes(e[1])) if medium in GPU_MEDIA else None
    if kind == "AllBlocksCleared":
        return ClearedBlocks()
    return None


def _event_any(e: Any) -> KvChange | None:
    return _event_from_map(e) if isinstance(e, dict) else _event_from_array(e)


def _event_from_map(e: Any) -> KvChange | None:
    if not isinstance(e, dict) or not isinstance(e.get("type"), str):
        raise MalformedBatch("a map-encoded event must be a map with a string 'type'")
    kind = e["type"]
    if e.get("medium") not in GPU_MEDIA:
        return None
    try:
        if kind == "BlockStored":
            tokens, size = _tokens(e.get("token_ids"), e.get("block_size"))
            return StoredBlocks(_hashes(e["block_hashes"]), _parent(e.get("parent_block_hash")), tokens, size)
        if kind == "BlockRemoved":
            return RemovedBlocks(_hashes(e["block_hashes"]))
    except KeyError as exc:
        raise MalformedBatch(f"{kind} lacks {exc}") from None
    if kind == "AllBlocksCleared":
        return ClearedBlocks()
    return None


def decode_batch(payload: bytes, encoding: Encoding = "auto") -> tuple[list[KvChange], int]:
    """The changes in one msgpack ``EventBatch`` (in order) and the number of events skipped.

    ``encoding`` ``array`` / ``map`` accepts only that encoding; ``auto`` either.

    Raises:
        MalformedBatch: the payload is not a batch of the accepted encodings.
    """
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedBatch(f"not msgpack: {type(exc).__name__}") from None
    events: Any
    # vLLM 0.3x sends the batch as an array and each event as a tagged map: an event is read by its own
    # shape, unless one encoding was asked for
    decode: Callable[[Any], KvChange | None] = (
        _event_from_array if encoding == "array" else _event_from_map if encoding == "map" else _event_any)
    if isinstance(batch, list) and encoding != "map":
        if len(batch) < 2:
            raise MalformedBatch("an array-encoded batch must be [ts, events, ...]")
        events = batch[1]
    elif isinstance(batch, dict) and encoding != "array":
        events = batch.get("events")
    else:
        raise MalformedBatch(f"a batch must be a {'list or map' if encoding == 'auto' else encoding}, "
                             f"got {type(batch).__name__}")
    if not isinstance(events, list):
        raise MalformedBatch("the batch's events must be a list")
    out: list[KvChange] = []
    skipped = 0
    for e in events:
        change = decode(e)
        if change is None:
            skipped += 1
        else:
            out.append(change)
    return out, skipped


