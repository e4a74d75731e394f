"""The record every trace reader and synthetic generator yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of a workload, before it gets an id and an origin.

    Attributes:
        arrival_s: send time, seconds. Readers report it on the file's own clock, relative to the
            file's first request where the format has absolute times (Azure) and as recorded
            otherwise (Mooncake milliseconds / 1000, ShareGPT nanoseconds / 1e9). Generators start
            their clock at 0.
        prompt_tokens: prompt length, tokens (>= 1).
        output_tokens: output length the trace recorded, tokens (>= 0).
        block_hashes: chained hashes of the prompt's full blocks (see :mod:`isthmus.core.hashing`);
            empty when the source carries no prefix information.
        session: conversation key when the source has one (multi-turn generators), else ``None``.
        token_ids: the prompt's token ids, when the source has them and the reader was asked to
            keep them; else ``None``.
        output_token_ids: the recorded output's token ids, likewise.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()
    session: str | None = None
    token_ids: tuple[int, ...] | None = None
    output_token_ids: tuple[int, ...] | None = None
