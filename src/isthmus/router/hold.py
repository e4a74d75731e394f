"""Requests held at the router when the policy says "not now" (a ``Decision`` without a target).

Held requests are re-asked oldest first every ``recheck_s`` seconds, as the simulator does: in each
round the oldest is asked first and the round stops at the first one still without a target, so a
younger request never overtakes an older one (GORGO's starvation argument needs this). While some
request is held, a new one joins the back of the line without being asked.

``attempt`` callables both decide and commit (count the request on its target) synchronously, so the
several requests one round releases see each other's effect on the replicas' counts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Held(Generic[T]):
    __slots__ = ("attempt", "future")

    def __init__(self, attempt: Callable[[], T | None], future: asyncio.Future[T]) -> None:
        self.attempt = attempt
        self.future = future


class HoldQueue(Generic[T]):
    """A FIFO of held requests and the task that re-asks them.

    Args:
        recheck_s: seconds between two rounds.
        release: called with a result that was produced for a request that stopped waiting in the
            meantime (client gone, wait over), so the caller can undo its commit.
    """

    def __init__(self, recheck_s: float, release: Callable[[T], None]) -> None:
        self.recheck_s = recheck_s
        self._release = release
        self._held: deque[_Held[T]] = deque()
        self._pump: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    async def wait(self, attempt: Callable[[], T | None], timeout_s: float) -> T | None:
        """Hold a request until ``attempt()`` returns a result (returned) or ``timeout_s`` passes (``None``).

        ``attempt`` may raise: the exception propagates to this caller.
        """
        if timeout_s <= 0:
            return None
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        held = _Held(attempt, fut)
        self._held.append(held)
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
            with contextlib.suppress(ValueError):
                self._held.remove(held)

    async def _run(self) -> None:
        held = self._held
        while held:
            await asyncio.sleep(self.recheck_s)
            while held:
                h = held[0]
                if h.future.done():
                    held.popleft()
                    continue
                try:
                    result = h.attempt()
                except Exception as exc:  # the caller's error, delivered to the caller
                    h.future.set_exception(exc)
                    held.popleft()
                    continue
                if result is None:
                    break
                h.future.set_result(result)
                held.popleft()

    async def close(self) -> None:
        """Stop the re-asking task (held requests then wait out their timeouts)."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
