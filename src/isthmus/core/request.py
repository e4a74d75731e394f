"""What a policy and an engine see of one request."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level targets of a request, in seconds; ``None`` means no target.

    An SLO is also an SLO *class*: requests with the same ``name`` share its targets (see
    :mod:`isthmus.core.slo` for classes, their resolution and the deadline queue).

    Attributes:
        name: the SLO class the request belongs to.
        ttft_s: time to first token, measured at the client from its send.
        tpot_s: mean time per output token after the first.
        e2e_s: end-to-end latency, from the client's send to its last token.
        priority: the class's scheduling priority; lower runs first (vLLM's convention), 0 is
            the normal priority. Queues that honour priorities order by it before deadlines.
    """

    name: str = "default"
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an SLO class needs a non-empty name")
        for field, v in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2e_s", self.e2e_s)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {self.name!r}: {field} must be finite and > 0, got {v}")


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as routing and scheduling see it.

    Attributes:
        id: unique id within a run.
        arrival: time the client sends it, seconds (virtual or wall clock, the owner decides).
        origin: name of the region the client is in.
        prompt_tokens: prompt length in tokens.
        block_hashes: chained hashes of the prompt's *full* blocks (see :mod:`isthmus.core.hashing`);
            ``len(block_hashes) <= prompt_tokens // block_size``.
        max_output_tokens: tokens to generate. Engines generate exactly this many (traces record the
            real output length, so replay ignores end-of-sequence).
        slo: optional targets (the request's SLO class).
        session: optional session key (multi-turn conversations), for affinity policies.
        model: the model the client asked for; ``None`` (every simulated request) means any
            replica serves it. Requests of one model form the groups a deadline queue blocks together.
    """

    id: str
    arrival: float
    origin: str
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    max_output_tokens: int
    slo: SLO | None = None
    session: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.id}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.max_output_tokens < 1:
            raise ValueError(f"request {self.id}: max_output_tokens must be >= 1, got {self.max_output_tokens}")
