"""The engine model in wall-clock time: one asyncio task steps a :class:`~isthmus.engine.Replica`.

While the replica has work, the task runs one engine step (the scheduler decides the batch at the
step's start), waits for the step's modelled duration times ``time_scale`` and then delivers the
step's sampled tokens to their requests, exactly as a GPU engine returns a step's tokens when the step
completes. Requests that arrive meanwhile join at the next step. Steps are timed against deadlines
(each step ends ``duration * time_scale`` after the previous one ended), so the loop's own overhead
does not accumulate; when the loop falls behind by more than :data:`MAX_LAG_S` (an overloaded CPU)
it restarts its clock rather than replaying the backlog in a burst.

The replica's own times (arrival, first scheduling) are modelled seconds: wall seconds since the
engine started divided by ``time_scale``. Latency metrics use wall time (``time.monotonic``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.request import Request
from isthmus.emulator.kv_events import KvCacheWatcher, KvEvent
from isthmus.engine.replica import Replica, StepResult

log = logging.getLogger(__name__)

MAX_LAG_S = 0.05
"""How far (wall seconds) the step loop may fall behind its deadlines before it resets them."""


@dataclass(eq=False, slots=True)
class Generation:
    """One request on the engine double and the tokens it has produced so far.

    ``output_ids`` are drawn up front (the request generates exactly ``len(output_ids)`` tokens);
    the engine advances ``produced`` and sets ``changed`` whenever it does, or when the request ends
    (``done``; ``error`` says why if it did not finish normally). Times are ``time.monotonic``.
    ``priority`` orders the replica's waiting queue: lower first, arrival order within one value
    (vLLM's priority scheduling; 0 is the normal priority).
    """

    id: str
    prompt_ids: Sequence[int]
    output_ids: list[int]
    received_at: float
    priority: int = 0
    produced: int = 0
    done: bool = False
    error: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class EngineObserver(Protocol):
    """Who hears about tokens (the metrics)."""

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None: ...

    def next_token(self, itl_s: float) -> None: ...

    def finished(self, e2e_s: float, ttft_s: float, prompt_tokens: int, output_tokens: int,
                 reason: str = "length") -> None: ...


class EngineDouble:
    """Owns the replica and its step loop; the HTTP handlers :meth:`submit` and :meth:`abort`.

    Args:
        replica: built with ``track_tokens=True``.
        time_scale: wall seconds per modelled second.
        observer: told of every delivered token.
        kv_sink: called with each step's KV events when a watcher is given.
        kv_watcher: follows the replica's prefix cache for KV events.
        clock: monotonic wall clock, seconds.
    """

    def __init__(self, replica: Replica, time_scale: float, observer: EngineObserver, *,
                 kv_watcher: KvCacheWatcher | None = None,
                 kv_sink: Callable[[list[KvEvent]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not replica.track_tokens:
            raise ValueError("the engine double needs a replica built with track_tokens=True")
        self.replica = replica
        self.time_scale = time_scale
        self._observer = observer
        self._watcher = kv_watcher
        self._kv_sink = kv_sink
        self._clock = clock
        self._t0 = clock()
        self._gens: dict[str, Generation] = {}
        self._wake = asyncio.Event()
        self.block_size = replica.spec.block_size

    def model_now(self) -> float:
        """Modelled seconds since the engine started."""
        return (self._clock() - self._t0) / self.time_scale

    def __len__(self) -> int:
        return len(self._gens)

    def submit(self, gen: Generation) -> None:
        """Queue ``gen`` on the replica; raises ``ValueError`` if its id is in use or it cannot fit."""
        if gen.id in self._gens:
            raise ValueError(f"request id {gen.id} is already in use")
        hashes = hash_token_blocks(gen.prompt_ids, self.block_size)
        req = Request(gen.id, self.model_now(), "local", len(gen.prompt_ids), hashes, len(gen.output_ids))
        self.replica.add_request(req, req.arrival, gen.priority)
        self._gens[gen.id] = gen
        if self._watcher is not None:
            self._watcher.register(gen.id, gen.prompt_ids, hashes)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Drop a request (its client went away); ``False`` if it already ended."""
        gen = self._gens.pop(request_id, None)
        if gen is None:
            return False
        self.replica.abort(request_id)
        if self._watcher is not None:
            self._watcher.unregister(request_id)
        gen.done = True
        gen.error = gen.error or "aborted"
        gen.changed.set()
        return True

    def publish_kv(self, events: list[KvEvent]) -> None:
        if events and self._kv_sink is not None:
            self._kv_sink(events)

    async def run(self) -> None:
        """Step while there is work, forever (cancel the task to stop)."""
        clock = self._clock
        replica = self.replica
        deadline = clock()
        while True:
            if not replica.has_work:
                self._wake.clear()
                await self._wake.wait()
                deadline = clock()
            now = clock()
            if now - deadline > MAX_LAG_S:
                deadline = now
            try:
                result = replica.step(self.model_now())
            except Exception:
                log.exception("engine step failed; failing every request on the engine")
                self._fail_all("engine step failed")
                continue
            if result is None:
                continue
            if self._watcher is not None:
                self.publish_kv(self._watcher.events(prefill_step=result.prefill_tokens > 0))
            deadline += result.duration * self.time_scale
            slept = False
            while (delay := deadline - clock()) > 0:
                await asyncio.sleep(delay)
                slept = True
            if not slept:
                await asyncio.sleep(0)  # behind schedule: still let the HTTP side run
            self._deliver(result)

    def _deliver(self, result: StepResult) -> None:
        now = self._clock()
        gens = self._gens
        obs = self._observer
        for rid in result.sampled:
            gen = gens.get(rid)
            if gen is None:
                continue  # aborted while its step ran
            gen.produced += 1
            if gen.first_token_at is None:
                gen.first_token_at = now
                obs.first_token(now - gen.received_at, gen.prompt_tokens)
            else:
                assert gen.last_token_at is not None
                obs.next_token(now - gen.last_token_at)
            gen.last_token_at = now
            gen.changed.set()
        for fin in result.finished:
            gen = gens.pop(fin.request.id, None)
            if gen is None:
                continue
            if self._watcher is not None:
                self._watcher.unregister(gen.id)
            gen.done = True
            gen.changed.set()
            first = gen.first_token_at if gen.first_token_at is not None else now
            obs.finished(now - gen.received_at, first - gen.received_at, gen.prompt_tokens, gen.produced)

    def _fail_all(self, reason: str) -> None:
        for rid in list(self._gens):
            gen = self._gens[rid]
            gen.error = reason
            self.abort(rid)
