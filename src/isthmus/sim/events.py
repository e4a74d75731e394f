"""A minimal discrete-event loop: a heap of ``(time, priority, sequence, kind, payload)``.

Tie-break: events at the same time run in ascending ``priority``; events with the same time and
priority run in the order they were scheduled (``sequence``). The simulator uses priorities so that
at one instant engine step completions are applied first, then deliveries to replicas, then
arrivals at routers, then clients sending new requests, then router retries, then routers polling
their peers: a decision at time *t* sees every step that ended at *t*.
"""

from __future__ import annotations

import heapq
from typing import Any

STEP_END = 0
DELIVER = 1
ARRIVAL = 2
SEND = 3
RETRY = 4
SYNC = 5


class EventLoop:
    """Events ordered by (time, priority, sequence); no clock of its own beyond the last popped time."""

    __slots__ = ("_heap", "_seq", "now", "processed")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.processed = 0

    def schedule(self, time: float, priority: int, kind: int, payload: Any = None) -> None:
        """Schedule ``kind`` at ``time`` (must not be earlier than the current time)."""
        if time < self.now:
            raise ValueError(f"event at {time} is in the past (now {self.now})")
        self._seq += 1
        heapq.heappush(self._heap, (time, priority, self._seq, kind, payload))

    def pop(self) -> tuple[float, int, Any] | None:
        """The next event as ``(time, kind, payload)``, advancing ``now``; ``None`` when empty."""
        if not self._heap:
            return None
        time, _prio, _seq, kind, payload = heapq.heappop(self._heap)
        self.now = time
        self.processed += 1
        return time, kind, payload

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
