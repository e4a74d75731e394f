"""From a :class:`WorkloadSpec` to the stream of :class:`~isthmus.core.request.Request` a simulation replays."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from isthmus.core.errors import ConfigError, TraceError
from isthmus.core.request import Request
from isthmus.workloads._files import resolve
from isthmus.workloads.origins import OriginAssigner
from isthmus.workloads.readers import TraceStats, read_sharegpt_lengths, read_timed, scan_trace
from isthmus.workloads.records import TraceRecord
from isthmus.workloads.spec import FILE_KINDS, TIMED_KINDS, LengthSpec, WorkloadSpec
from isthmus.workloads.synthetic import (
    LengthPair,
    arrival_times,
    fixed_lengths,
    independent_requests,
    load_length_table,
    lognormal_lengths,
    session_requests,
    shared_prefix_requests,
    table_lengths,
)

# Independent random streams spawned from the seed, by purpose. Fixed positions: the arrivals of a
# seed do not change when, say, the origin weights do, so runs that differ in one respect see the
# same draws in every other.
_ARRIVALS, _LENGTHS, _CONTENT, _ORIGINS = range(4)
_STREAMS = 4

Timed = Iterator[tuple[float, TraceRecord]]


def _trace_path(spec: WorkloadSpec, base_dir: Path) -> Path:
    if spec.path is None:
        raise ConfigError(f"path: required for kind {spec.kind!r}")
    return resolve(spec.path, base_dir)


def _timed_kind(spec: WorkloadSpec, what: str) -> None:
    if spec.kind not in TIMED_KINDS:
        raise ConfigError(f"kind {spec.kind!r} has no arrival times in a file; {what} is defined only for "
                          f"{', '.join(sorted(TIMED_KINDS))}")


def trace_stats(spec: WorkloadSpec, base_dir: Path) -> TraceStats:
    """Count, first and last arrival of the trace file of a timed kind (one streaming pass)."""
    _timed_kind(spec, "trace_stats")
    return scan_trace(spec.kind, _trace_path(spec, base_dir))  # type: ignore[arg-type]


def native_rate(spec: WorkloadSpec, base_dir: Path) -> float:
    """Mean request rate before rescaling, requests per second.

    For a timed trace file: ``count / (last - first arrival)`` of one copy, found by one streaming
    pass (:class:`TraceError` when undefined). For the other kinds: ``rate_rps``.
    """
    if spec.kind not in TIMED_KINDS:
        assert spec.rate_rps is not None  # the spec's validator requires it
        return spec.rate_rps
    return trace_stats(spec, base_dir).rate_rps


def trace_span(spec: WorkloadSpec, base_dir: Path) -> float:
    """Seconds from the first to the last arrival of one copy of a timed trace file, as recorded."""
    return trace_stats(spec, base_dir).span_s


def offered_rate(spec: WorkloadSpec, base_dir: Path) -> float:
    """Long-run mean request rate of :func:`build_requests`' stream, requests per second.

    ``(rate_rps or the native rate) / time_scale``, ignoring ``limit`` and ``duration_s``; for
    ``phases``, the requests of every phase over their time together (a phase without ``limit`` or
    ``duration_s`` counts as one second at its rate).
    """
    if spec.kind == "phases":
        n = t = 0.0
        for phase in spec.phases:
            rate = offered_rate(phase, base_dir)
            count = phase.limit if phase.limit is not None else math.inf
            if phase.duration_s is not None:
                count = min(count, rate * phase.duration_s * phase.time_scale)
            if count == math.inf:
                count = rate
            n += count
            t += count / rate
        return n / t / spec.time_scale
    rate = spec.rate_rps if spec.rate_rps is not None else native_rate(spec, base_dir)
    return rate / spec.time_scale


def _lengths(spec: LengthSpec, rng: np.random.Generator, base_dir: Path) -> Iterator[LengthPair]:
    if spec.dist == "fixed":
        return fixed_lengths(spec.prompt_tokens, spec.output_tokens)
    if spec.dist == "lognormal":
        return lognormal_lengths(spec.prompt_tokens, spec.output_tokens, spec.prompt_sigma, spec.output_sigma,
                                 rng)
    assert spec.path is not None  # LengthSpec's validator requires it
    path = resolve(spec.path, base_dir)
    try:
        prompts, outputs = load_length_table(path)
    except ValueError as exc:
        raise TraceError(str(exc)) from None
    return table_lengths(prompts, outputs, rng)


def _timed_trace(spec: WorkloadSpec, path: Path) -> Timed:
    """Records of a timed trace file with their output arrival times (repeat, rescale, time_scale).

    Needs one scan of the file first when ``rate_rps`` is set or ``repeat > 1``, done here (not
    lazily) so a malformed file fails when the stream is built.
    """
    kind = spec.kind
    stats: TraceStats | None = None
    factor = spec.time_scale
    period = 0.0
    if spec.rate_rps is not None or spec.repeat > 1:
        stats = scan_trace(kind, path)  # type: ignore[arg-type]
        if spec.rate_rps is not None:
            factor *= stats.rate_rps / spec.rate_rps
        if stats.count > 1:
            period = stats.span_s * stats.count / (stats.count - 1)
    first = stats.first_s if stats is not None else None

    def stream() -> Timed:
        start = first
        for copy in range(spec.repeat):
            offset = copy * period
            for rec in read_timed(kind, path, block_size=spec.block_size, namespace=copy):  # type: ignore[arg-type]
                if start is None:
                    start = rec.arrival_s
                yield (rec.arrival_s - start + offset) * factor, rec

    return stream()


def _untimed(records: Iterator[TraceRecord], scale: float) -> Timed:
    for rec in records:
        yield rec.arrival_s * scale, rec


def _sharegpt_lengths(spec: WorkloadSpec, path: Path, arrivals: Iterator[float]) -> Iterator[TraceRecord]:
    for _ in range(spec.repeat):
        for (prompt, output), t in zip(read_sharegpt_lengths(path), arrivals, strict=False):
            yield TraceRecord(t, prompt, output)


def _phase_seed(seed: int, k: int) -> int:
    """The seed of phase ``k`` of a ``phases`` workload: an independent stream of ``seed``."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> 1)


def _phases(spec: WorkloadSpec, regions: Sequence[str], seed: int, base_dir: Path) -> Iterator[Request]:
    """The phases' requests one after the other (:class:`WorkloadSpec`), ``time_scale`` applied."""
    start = 0.0
    for k, phase in enumerate(spec.phases):
        last = math.nan
        for r in build_requests(phase, regions, _phase_seed(seed, k), base_dir):
            last = start + r.arrival
            yield dataclasses.replace(r, arrival=last * spec.time_scale)
        if last == last:  # the phase had requests: the next one starts one mean gap later
            start = last + 1.0 / offered_rate(phase, base_dir)


def _finish(timed: Timed, spec: WorkloadSpec, origins: OriginAssigner) -> Iterator[Request]:
    """Apply ``duration_s``, ``limit`` and ``max_prompt_tokens``; number the requests; draw origins."""
    limit = spec.limit if spec.limit is not None else math.inf
    duration = spec.duration_s if spec.duration_s is not None else math.inf
    cap = spec.max_prompt_tokens
    cap_blocks = cap // spec.block_size if cap is not None else 0
    assign = origins.assign
    count = 0
    try:
        for t, rec in timed:
            if t > duration:
                return
            prompt = rec.prompt_tokens
            hashes = rec.block_hashes
            if cap is not None and prompt > cap:
                prompt = cap
                hashes = hashes[:cap_blocks]
            output = rec.output_tokens
            yield Request(f"r{count:06d}", t, assign(rec.session), prompt, hashes, output if output > 0 else 1,
                          None, rec.session)
            count += 1
            if count >= limit:
                return
    finally:
        close = getattr(timed, "close", None)
        if close is not None:
            close()


def _renumber(requests: Iterator[Request], spec: WorkloadSpec) -> Iterator[Request]:
    """Apply ``limit`` and ``duration_s`` to requests that have everything else; number them."""
    limit = spec.limit if spec.limit is not None else math.inf
    duration = spec.duration_s if spec.duration_s is not None else math.inf
    for count, r in enumerate(requests):
        if r.arrival > duration or count >= limit:
            return
        yield dataclasses.replace(r, id=f"r{count:06d}")


def build_requests(spec: WorkloadSpec, regions: Sequence[str], seed: int, base_dir: Path) -> Iterator[Request]:
    """The request stream of a workload, lazily, one request at a time.

    Contract:

    * ids ``"r000000"``, ``"r000001"``, ... in arrival order (more digits past a million);
    * arrivals in seconds, non-decreasing, the first at exactly 0;
    * ``max_output_tokens`` is the recorded or drawn output length, at least 1;
    * ``origin`` from ``spec.origins`` over ``regions``; ``session`` from the source;
    * the same ``(spec, regions, seed)`` and files give the same requests, value for value.
      Randomness comes from independent streams spawned from ``seed`` (arrivals, lengths, prompt
      content, origins), so e.g. changing origin weights leaves arrivals and prompts unchanged.

    Memory stays bounded by one record plus, for ``sessions``, the conversations in progress; the
    length table of ``lengths.dist: sharegpt`` is held in memory. Configuration and file problems
    surface here, before the first request: :class:`ConfigError` for an unknown region in
    ``origins.weights``, :class:`TraceError` for a missing file (and, when the spec needs a pass
    over the file to rescale or repeat it, for any malformed line); other malformed lines raise
    :class:`TraceError` while streaming.

    Args:
        spec: the workload.
        regions: region names of the scenario; origins are drawn from these.
        seed: non-negative integer seed.
        base_dir: directory relative paths in ``spec`` are resolved against.
    """
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if spec.kind == "phases":
        return _renumber(_phases(spec, regions, seed, base_dir), spec)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(_STREAMS)]
    origin_rng = streams[_ORIGINS]
    salt = origin_rng.bytes(16)
    origins = OriginAssigner(regions, spec.origins.weights, spec.origins.per_session, origin_rng, salt)
    kind = spec.kind
    path = _trace_path(spec, base_dir) if kind in FILE_KINDS else None
    if path is not None and not path.is_file():
        raise TraceError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    timed: Timed
    if path is not None and kind in TIMED_KINDS:
        timed = _timed_trace(spec, path)
    else:
        assert spec.rate_rps is not None  # the spec's validator requires it
        rate = spec.rate_rps / spec.turns_mean if kind == "sessions" else spec.rate_rps
        arrivals = arrival_times(spec.arrival, rate, spec.cv, streams[_ARRIVALS])
        records: Iterator[TraceRecord]
        if path is not None:  # sharegpt_lengths
            records = _sharegpt_lengths(spec, path, arrivals)
        else:
            lengths = _lengths(spec.lengths, streams[_LENGTHS], base_dir)
            content = streams[_CONTENT]
            if kind == "poisson":
                records = independent_requests(arrivals, lengths)
            elif kind == "sessions":
                records = session_requests(arrivals, lengths, content, turns_mean=spec.turns_mean,
                                           think_time_s=spec.think_time_s, block_size=spec.block_size)
            elif kind == "shared_prefix":
                records = shared_prefix_requests(arrivals, lengths, content, groups=spec.groups,
                                                 system_prompt_tokens=spec.system_prompt_tokens,
                                                 group_skew=spec.group_skew, block_size=spec.block_size)
            else:  # pragma: no cover - the Literal type lists every kind
                raise ConfigError(f"kind: unknown workload kind {kind!r}")
        timed = _untimed(records, spec.time_scale)
    return _finish(timed, spec, origins)
