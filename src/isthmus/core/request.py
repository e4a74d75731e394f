"""What a policy and an engine see of one request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level targets of a request, in seconds; ``None`` means no target.

    ``ttft_s``: time to first token; ``tpot_s``: mean time per output token after the first;
    ``e2e_s``: end-to-end latency. ``name`` is the SLO class the request belongs to.
    """

    name: str = "default"
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None


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
        slo: optional targets.
        session: optional session key (multi-turn conversations), for affinity policies.
    """

    id: str
    arrival: float
    origin: str
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    max_output_tokens: int
    slo: SLO | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.id}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.max_output_tokens < 1:
            raise ValueError(f"request {self.id}: max_output_tokens must be >= 1, got {self.max_output_tokens}")
