"""KV-cache events from the replicas: a ZMQ subscriber per replica that corrects the prefix mirror.

A replica configured with ``kv_events: {endpoint, encoding?, topic?}`` publishes vLLM's KV-cache
events on a ZMQ PUB socket (vLLM's ``--kv-events-config``, or ``isthmus emulate
--kv-events-endpoint``). :class:`KvEventSubscriber` connects a SUB socket to it and applies every
batch to the router's :class:`~isthmus.core.prefix_index.PrefixIndex` of that replica through a
:data:`KvEventSink` (:meth:`isthmus.router.state.ClusterState.apply_kv_events`); batches that have
queued up by the time one is read (at most ``MAX_MESSAGES_APPLIED_TOGETHER``) are applied together,
in order, with one call of the sink, so that a busy subscriber works through a backlog in large,
cheap steps:

- ``BlockStored`` -> ``record(replica, block_hashes)``: the run's first block the most recent, and
  the runs of one batch recorded last to first, so a prompt's earlier blocks stay the more recent
  ones (the order :meth:`PrefixIndex.record` keeps for the router's own records);
- ``BlockRemoved`` -> ``remove(replica, block_hashes)``;
- ``AllBlocksCleared`` -> ``clear(replica)``.

Only events for the GPU cache (``medium`` absent, ``None`` or ``"GPU"``) are applied; events for
other media (CPU offload tiers) and of unknown types are counted and skipped.

Wire format (see :mod:`isthmus.kv_events` and ``../shared/design/MODELS.md`` §5): multipart
``[topic, seq, payload]`` with ``seq`` 8 bytes big-endian and ``payload`` one msgpack ``EventBatch``,
either positional (``[ts, [event, ...], dp_rank]`` with tagged arrays ``["BlockStored",
block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``, ``["BlockRemoved",
block_hashes, medium]``, ``["AllBlocksCleared"]``) or tagged maps (``{"ts", "events",
"data_parallel_rank"}`` with events ``{"type": "BlockStored", ...}``). Extra trailing array items and
extra map keys are accepted. A message that cannot be decoded is counted in
:attr:`KvEventStats.malformed`, logged with a rate-limited warning and skipped: the loop never dies
of a bad message.

Reconciliation. PUB/SUB drops silently: a subscriber that joins late misses what was stored before,
and a slow one may miss batches. Missing sequence numbers are counted (:attr:`KvEventStats.missed`)
and logged; a sequence number that goes back means the publisher restarted
(:attr:`KvEventStats.restarts`). Nothing is reset in either case: the router's own records of what
it sent where stay in the mirror, and events only add precision (they confirm stores, and remove what
the engine evicted), as MODELS.md §5 prescribes.

Hash compatibility. The mirror is keyed by the router's block hashes
(:func:`isthmus.core.hashing.hash_token_blocks` over the prompt's token ids, ``block_size`` tokens a
block). The engine double publishes exactly those values when it tokenizes as the router does (the
same ``tokenizer`` file, or both the built-in one), so its events and the router's records agree.
A real vLLM publishes its own block hashes (sha256 of the block's tokens and its parent's hash,
possibly as bytes); the mirror then learns from its events only if the router's block hashing is
configured to match vLLM's, which this module does not do (out of scope): such events add entries
the router never looks up and remove nothing it recorded, so they are harmless but useless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isthmus.kv_events import (
    ClearedBlocks,
    KvChange,
    MalformedBatch,
    RemovedBlocks,
    StoredBlocks,
    decode_batch,
)
from isthmus.router.config import KvEventsConfig

log = logging.getLogger("isthmus.router.kv_events")

DEFAULT_POLL_S = 0.5
MAX_MESSAGES_APPLIED_TOGETHER = 16  # queued messages decoded and applied in one go (keeps each step ~10 ms)


KvEventSink = Callable[[str, Sequence[KvChange]], None]
"""Applies one decoded batch of ``replica_id``'s changes (in order) to the mirror; must not block."""


@dataclass(slots=True)
class KvEventStats:
    """Counters of one subscriber.

    Attributes:
        batches: messages decoded and applied.
        events: events applied (GPU medium, known type).
        skipped: events ignored (another medium, unknown type).
        malformed: messages dropped because they could not be decoded.
        missed: batches lost, from gaps in the sequence numbers.
        restarts: times the sequence number went back (the publisher restarted).
        last_seq: the last sequence number seen, ``None`` before the first message.
    """

    batches: int = 0
    events: int = 0
    skipped: int = 0
    malformed: int = 0
    missed: int = 0
    restarts: int = 0
    last_seq: int | None = None


def _often(n: int) -> bool:
    """Whether the ``n``-th occurrence of something should be logged (1, 10, 100, then every 1000)."""
    return n in (1, 10, 100) or n % 1000 == 0


class KvEventSubscriber:
    """One replica's KV-event subscription: a SUB socket and the task that applies what it receives.

    :meth:`start` (from the running loop) connects and starts the task; :meth:`stop` cancels it and
    closes the socket. ZMQ connects in the background and reconnects by itself, so a publisher that
    is not up yet, or restarts, needs nothing from here. Every wait is bounded: the task polls the
    socket ``poll_s`` at a time, and the sink is synchronous.
    """

    def __init__(self, replica_id: str, config: KvEventsConfig, sink: KvEventSink, *,
                 poll_s: float = DEFAULT_POLL_S) -> None:
        self.replica_id = replica_id
        self.config = config
        self.stats = KvEventStats()
        self._sink = sink
        self._poll_ms = max(1, int(poll_s * 1000))
        self._sock: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self, context: Any) -> None:
        """Connect a SUB socket of ``context`` (a ``zmq.asyncio.Context``) and start receiving."""
        import zmq

        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode("utf-8"))
        sock.connect(self.config.endpoint)
        self._sock = sock
        self._task = asyncio.create_task(self._run(), name=f"kv events {self.replica_id}")

    async def stop(self) -> None:
        """Stop receiving and close the socket (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _run(self) -> None:
        import zmq

        sock = self._sock
        while True:
            if not await sock.poll(self._poll_ms, zmq.POLLIN):
                continue
            messages: list[Sequence[bytes]] = []
            while len(messages) < MAX_MESSAGES_APPLIED_TOGETHER:  # what has queued up, in order
                try:
                    messages.append(await sock.recv_multipart(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
            if messages:
                self.handle_many(messages)

    def handle(self, frames: Sequence[bytes]) -> bool:
        """Decode and apply one multipart message; return whether it was applied. Never raises
        for a bad message (it is counted and logged) nor for a failing sink (logged likewise)."""
        return self.handle_many([frames]) == 1

    def handle_many(self, messages: Sequence[Sequence[bytes]]) -> int:
        """Decode several multipart messages (received in this order) and apply their changes with
        one call of the sink, which is the same as one call per message in turn (the sink applies
        changes in order) and much cheaper per block when messages have queued up. Returns how many
        were applied; bad messages are counted, logged and skipped, as by :meth:`handle`."""
        changes: list[KvChange] = []
        decoded = skipped = 0
        for frames in messages:
            try:
                if len(frames) != 3:
                    raise MalformedBatch(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
                _, seq_frame, payload = frames
                if len(seq_frame) != 8:
                    raise MalformedBatch(f"the sequence frame must be 8 bytes, got {len(seq_frame)}")
                batch, ignored = decode_batch(bytes(payload), self.config.encoding)
            except MalformedBatch as exc:
                self.stats.malformed += 1
                if _often(self.stats.malformed):
                    log.warning("malformed KV event message from %s dropped (%d so far): %s", self.replica_id,
                                self.stats.malformed, exc)
                continue
            self._sequence(int.from_bytes(seq_frame, "big"))
            changes += batch
            skipped += ignored
            decoded += 1
        if not decoded:
            return 0
        try:
            self._sink(self.replica_id, changes)
        except Exception as exc:  # a sink bug must not end the subscription
            self.stats.malformed += decoded
            if _often(self.stats.malformed):
                log.warning("KV events of %s could not be applied (%d so far): %s: %s", self.replica_id,
                            self.stats.malformed, type(exc).__name__, exc)
            return 0
        self.stats.batches += decoded
        self.stats.events += len(changes)
        self.stats.skipped += skipped
        return decoded

    def _sequence(self, seq: int) -> None:
        st = self.stats
        last = st.last_seq
        st.last_seq = seq
        if last is None:
            if seq > 0:
                log.info("KV events of %s: joined at batch %d; earlier stores are known from the router's "
                         "own records only", self.replica_id, seq)
            return
        if seq > last + 1:
            st.missed += seq - last - 1
            log.warning("KV events of %s: %d batches missed (%d so far)", self.replica_id, seq - last - 1,
                        st.missed)
        elif seq <= last:
            st.restarts += 1
            log.warning("KV events of %s: sequence went back from %d to %d (publisher restarted)",
                        self.replica_id, last, seq)


class KvEventSubscribers:
    """The subscribers of every replica with ``kv_events`` configured, sharing one ZMQ context."""

    def __init__(self, endpoints: Mapping[str, KvEventsConfig], sink: KvEventSink, *,
                 poll_s: float = DEFAULT_POLL_S) -> None:
        self.subscribers: dict[str, KvEventSubscriber] = {
            rid: KvEventSubscriber(rid, cfg, sink, poll_s=poll_s) for rid, cfg in endpoints.items()}
        self._context: Any = None

    def start(self) -> None:
        """Connect every subscriber (call from the running event loop; nothing when there are none)."""
        if not self.subscribers:
            return
        import zmq.asyncio

        self._context = zmq.asyncio.Context()
        for s in self.subscribers.values():
            s.start(self._context)
            log.info("subscribed to the KV events of %s at %s", s.replica_id, s.config.endpoint)

    async def stop(self) -> None:
        """Stop every subscriber and terminate the context (idempotent)."""
        for s in self.subscribers.values():
            await s.stop()
        if self._context is not None:
            self._context.term()
            self._context = None


__all__ = [
    "ClearedBlocks", "KvChange", "KvEventSink", "KvEventStats", "KvEventSubscriber", "KvEventSubscribers",
    "MalformedBatch", "RemovedBlocks", "StoredBlocks", "decode_batch",
]
