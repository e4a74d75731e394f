"""Requests held at the router when the policy says "not now" (a ``Decision`` without a target).

Held requests are re-asked every ``recheck_s`` seconds, as the simulator does, in the order of a
:class:`~isthmus.core.slo.DeadlineQueue`:

- ``fifo`` (default): oldest first, and the round stops at the first one still without a target,
  so a younger request never overtakes an older one (GORGO's starvation argument needs this);
- ``edf``: by priority, then earliest SLO deadline, within groups of requests of the same model
  (a request that cannot be placed blocks only its own group for that round); a request held for
  ``max_hold_s`` moves to the front (starvation protection).

While some request is held, a new one joins the queue without being asked.

``attempt`` callables both decide and commit (count the request on its target) synchronously, so the
several requests one round releases see each other's effect on the replicas' counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from isthmus.core.slo import DeadlineQueue, QueueOrder

T = TypeVar("T")


class _Held(Generic[T]):
    __slots__ = ("attempt", "future")

    def __init__(self, attempt: Callable[[], T | None], future: asyncio.Future[T]) -> None:
        self.attempt = attempt
        self.future = future


class HoldQueue(Generic[T]):
    """The held requests and the task that re-asks them.

    Args:
        recheck_s: seconds between two rounds.
        release: called with a result that was produced for a request that stopped waiting in the
            meantime (client gone, wait over), so the caller can undo its commit.
        order: ``fifo`` or ``edf`` (module docstring).
        max_hold_s: ``edf``: held this long, a request goes to the front.
        clock: seconds, on the clock of the deadlines given to :meth:`wait`.
    """

    def __init__(self, recheck_s: float, release: Callable[[T], None], order: QueueOrder = "fifo",
                 max_hold_s: float = math.inf, clock: Callable[[], float] = time.monotonic) -> None:
        self.recheck_s = recheck_s
        self._release = release
        self._clock = clock
        self._queue: DeadlineQueue[_Held[T]] = DeadlineQueue(order, max_hold_s)
        self._pump: asyncio.Task[None] | None = None

    @property
    def order(self) -> QueueOrder:
        return self._queue.order

    def __len__(self) -> int:
        return len(self._queue)

    async def wait(self, attempt: Callable[[], T | None], timeout_s: float, *, deadline_s: float = math.inf,
                   priority: int = 0, group: Hashable = None) -> T | None:
        """Hold a request until ``attempt()`` returns a result (returned) or ``timeout_s`` passes (``None``).

        ``deadline_s`` (on the clock), ``priority`` (lower first) and ``group`` order it under ``edf``.
        ``attempt`` may raise: the exception propagates to this caller.
        """
        if timeout_s <= 0:
            return None
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        handle = self._queue.push(_Held(attempt, fut), now=self._clock(), deadline_s=deadline_s, priority=priority,
                                  group=group)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="hold queue")
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            # a result may have arrived in the same loop iteration as the timeout
            return fut.result() if fut.done() and not fut.cancelled() and fut.exception() is None else None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # committed for a waiter that is gone: undo
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(KeyError):
                self._queue.remove(handle)

    @staticmethod
    def _place(held: _Held[T]) -> bool:
        """Offer ``held`` its attempt; ``True`` when it is settled (placed, failed or no longer waiting)."""
        if held.future.done():
            return True
        try:
            result = held.attempt()
        except Exception as exc:  # the caller's error, delivered to the caller
            held.future.set_exception(exc)
            return True
        if result is None:
            return False
        held.future.set_result(result)
        return True

    async def _run(self) -> None:
        queue = self._queue
        while queue:
            await asyncio.sleep(self.recheck_s)
            queue.drain(self._clock(), self._place)

    async def close(self) -> None:
        """Stop the re-asking task (held requests then wait out their timeouts)."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
