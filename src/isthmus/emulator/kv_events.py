"""vLLM's KV-cache events over ZMQ: what the engine double's prefix cache stores and evicts.

Wire format: :mod:`isthmus.kv_events` (shared with the router's subscriber).

The engine model has no event hook, so :class:`KvCacheWatcher` diffs the block pool's set of cached
hashes after each step: exact as to the resulting state (a block evicted and stored again within one
step shows no event, as it changed nothing), and cheap in decode-only steps.
"""

from __future__ import annotations

import logging
from collections.abc import KeysView, Sequence
from typing import Any

from isthmus.core.hashing import ROOT_HASH
from isthmus.emulator.config import KvEventsEncoding
from isthmus.engine.kv_cache import BlockPool
from isthmus.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    encode_batch,
)

log = logging.getLogger(__name__)

class KvEventPublisher:
    """A ZMQ PUB socket sending event batches; created by :meth:`open`, closed by :meth:`close`.

    Sending never blocks: a batch that finds the socket's queue full (``hwm`` messages) is dropped
    and logged, as a PUB socket drops for slow subscribers anyway.
    """

    def __init__(self, endpoint: str, encoding: KvEventsEncoding, topic: str = "", connect: bool = False,
                 hwm: int = 100_000) -> None:
        self.endpoint = endpoint
        self.encoding: KvEventsEncoding = encoding
        self._topic = topic.encode("utf-8")
        self._connect = connect
        self._hwm = hwm
        self._seq = 0
        self._ctx: Any = None
        self._sock: Any = None

    def open(self) -> str:
        """Create the socket and bind (or connect) it; returns the endpoint actually bound (a
        ``tcp://127.0.0.1:*`` endpoint gets its port filled in)."""
        import zmq

        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.LINGER, 0)
        if self._connect:
            sock.connect(self.endpoint)
        else:
            sock.bind(self.endpoint)
            last = sock.getsockopt(zmq.LAST_ENDPOINT)
            self.endpoint = last.decode() if isinstance(last, bytes) else str(last)
        self._sock = sock
        return self.endpoint

    def publish(self, events: Sequence[KvEvent], ts: float) -> None:
        """Send one batch (nothing if ``events`` is empty)."""
        if not events or self._sock is None:
            return
        import zmq

        payload = encode_batch(events, ts, self.encoding)
        try:
            self._sock.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("KV event batch %d dropped: the publisher queue is full", self._seq)
        self._seq += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


class KvCacheWatcher:
    """Turns changes of a :class:`~isthmus.engine.kv_cache.BlockPool`'s cached hashes into events.

    Register each request's token ids and block hashes while it is on the engine (its blocks can
    only be stored then), and call :meth:`events` after every step.
    """

    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._bs = pool.block_size
        self._known: set[int] = set(self._cached())
        # hash -> [parent hash or None, the block's tokens, number of registered requests holding it]
        self._blocks: dict[int, list[Any]] = {}
        self._by_request: dict[str, tuple[int, ...]] = {}

    def _cached(self) -> KeysView[int]:
        return self._pool.cached_hashes()

    def register(self, request_id: str, token_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        bs = self._bs
        blocks = self._blocks
        parent: int | None = None
        for i, h in enumerate(block_hashes):
            entry = blocks.get(h)
            if entry is None:
                blocks[h] = [parent, tuple(token_ids[i * bs:(i + 1) * bs]), 1]
            else:
                entry[2] += 1
            parent = h
        self._by_request[request_id] = tuple(block_hashes)

    def unregister(self, request_id: str) -> None:
        hashes = self._by_request.pop(request_id, ())
        blocks = self._blocks
        for h in hashes:
            entry = blocks[h]
            entry[2] -= 1
            if entry[2] == 0:
                del blocks[h]

    def events(self, prefill_step: bool = True) -> list[KvEvent]:
        """Events for what changed since the last call. ``prefill_step=False`` promises that the
        step computed no prompt tokens (so stored nothing), which makes an unchanged cache free."""
        cached = self._cached()
        known = self._known
        if prefill_step:
            removed = known - cached
            added = cached - known
        elif len(cached) == len(known):
            return []
        else:
            removed = known - cached
            added = set()
        if not removed and not added:
            return []
        known -= removed
        known |= added
        out: list[KvEvent] = []
        if removed:
            out.append(BlockRemoved(tuple(sorted(removed))))
        if added:
            out.extend(self._stored_runs(added))
        return out

    def cleared(self) -> list[KvEvent]:
        """Events after the cache was reset: ``AllBlocksCleared`` when nothing stays cached."""
        if self._cached():
            return self.events()
        self._known.clear()
        return [AllBlocksCleared()]

    def _stored_runs(self, added: set[int]) -> list[KvEvent]:
        """Group new hashes into runs of consecutive blocks, parents before children."""
        blocks = self._blocks
        children: dict[int, list[int]] = {}
        starts: list[int] = []
        for h in sorted(added):
            entry = blocks.get(h)
            parent = entry[0] if entry is not None else None
            if parent is not None and parent in added:
                children.setdefault(parent, []).append(h)
            else:
                starts.append(h)
        out: list[KvEvent] = []
        stack = list(reversed(starts))
        while stack:
            h = stack.pop()
            entry = blocks.get(h)
            parent = entry[0] if entry is not None else None
            run = [h]
            while True:
                kids = children.get(run[-1])
                if not kids:
                    break
                stack.extend(reversed(kids[1:]))
                run.append(kids[0])
            tokens: list[int] = []
            for b in run:
                e = blocks.get(b)
                if e is not None:
                    tokens.extend(e[1])
            out.append(BlockStored(tuple(run), None if parent in (None, ROOT_HASH) else parent, tuple(tokens),
                                   self._bs))
        return out
