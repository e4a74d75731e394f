"""Streaming readers of the public LLM-serving traces.

Every reader takes a plain or gzipped file, reads it one line at a time (memory stays bounded by one
record, whatever the file's size) and yields :class:`~isthmus.workloads.records.TraceRecord` in file
order. A malformed line raises :class:`~isthmus.core.errors.TraceError` whose message starts with
``<path>:<line>:`` (1-based line numbers); a missing file raises it naming the path. Formats whose
lines carry times (Mooncake, Azure, ShareGPT token workloads) must be in non-decreasing time order:
a timestamp that goes backwards is an error, not something to sort.

Formats:

* Mooncake (FAST'25) JSON lines: ``timestamp`` (ms), ``input_length``, ``output_length``,
  ``hash_ids`` (prefix ids of 512-token blocks) -- :func:`read_mooncake`;
* Azure LLM inference trace 2023/2024 CSV: ``TIMESTAMP`` (``2023-11-16 18:15:46.6805900``),
  ``ContextTokens``, ``GeneratedTokens`` -- :func:`read_azure`;
* ShareGPT workloads with token ids (LLMServingSim format) JSON lines: ``input_toks``,
  ``output_toks``, ``arrival_time_ns``, ``input_tok_ids``, optional ``output_tok_ids`` --
  :func:`read_sharegpt_tokens`;
* ShareGPT length statistics CSV: ``num_prefill_tokens``, ``num_decode_tokens`` (no times) --
  :func:`read_sharegpt_lengths`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from isthmus.core.errors import TraceError
from isthmus.core.hashing import DEFAULT_BLOCK_SIZE, ROOT_HASH, expand_coarse_hash_ids, hash_token_blocks
from isthmus.workloads._files import PathLike, numbered_lines, open_binary
from isthmus.workloads.records import TraceRecord

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per hash id in the Mooncake traces."""

MAX_NAMESPACE = (1 << 14) - 1
"""Largest hash namespace :func:`isthmus.core.hashing.expand_coarse_hash_ids` can pack."""

_MAX_PACKED_ID = 1 << 48  # coarse id * blocks per id must stay below the namespace bits

TimedKind = Literal["mooncake", "azure", "sharegpt_tokens"]


class _BadField(ValueError):
    """A field of one line is missing or invalid; the caller adds the file and line."""


def _fail(path: PathLike, lineno: int, message: str) -> TraceError:
    return TraceError(f"{path}:{lineno}: {message}")


def _int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; integral floats (``12.0``) are accepted."""
    if type(value) is not int:
        if type(value) is float and value.is_integer():
            value = int(value)
        else:
            raise _BadField(f"field {name!r} must be an integer, got {value!r}")
    if value < minimum:
        raise _BadField(f"field {name!r} must be >= {minimum}, got {value}")
    return value


def _number(value: Any, name: str) -> float:
    """``value`` as a finite float (ints accepted, booleans and strings not)."""
    if type(value) is not int and type(value) is not float:
        raise _BadField(f"field {name!r} must be a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise _BadField(f"field {name!r} must be finite, got {value!r}")
    return f


def _json_object(line: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise _BadField(f"invalid JSON: {exc}") from None
    if type(obj) is not dict:
        raise _BadField(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _int_list(value: Any, name: str) -> list[int]:
    if type(value) is not list:
        raise _BadField(f"field {name!r} must be a list of integers, got {type(value).__name__}")
    for v in value:
        if type(v) is not int:
            raise _BadField(f"field {name!r} must be a list of integers, found {v!r}")
    return value


def read_mooncake(
    path: PathLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    namespace: int = 0,
    hashes: bool = True,
) -> Iterator[TraceRecord]:
    """Stream a Mooncake trace (JSON lines).

    ``arrival_s`` is ``timestamp / 1000``. Block hashes expand each 512-token hash id into
    ``512 / block_size`` block hashes with :func:`~isthmus.core.hashing.expand_coarse_hash_ids`
    (only blocks full within ``input_length``); ``namespace`` (0 to :data:`MAX_NAMESPACE`) keeps
    the hashes of replayed copies apart. ``hashes=False`` skips the expansion (empty
    ``block_hashes``) for a cheap pass over times and lengths. ``session`` is ``None``: the format
    has none. (In the conversation trace every request starts with hash id 0, a shared system
    prompt: all its requests share their first 512 tokens.)
    """
    if MOONCAKE_BLOCK_TOKENS % block_size:
        raise ValueError(f"block size {block_size} does not divide {MOONCAKE_BLOCK_TOKENS}")
    if not 0 <= namespace <= MAX_NAMESPACE:
        raise ValueError(f"namespace must be in [0, {MAX_NAMESPACE}], got {namespace}")
    per_id = MOONCAKE_BLOCK_TOKENS // block_size
    max_id = _MAX_PACKED_ID // per_id
    loads = orjson.loads
    expand = expand_coarse_hash_ids
    previous = -math.inf
    with open_binary(path) as f:
        for lineno, line in numbered_lines(f, path):
            try:
                try:
                    obj = loads(line)
                except orjson.JSONDecodeError:
                    if not line.strip():
                        continue
                    obj = _json_object(line)  # raises with the decoder's message
                if type(obj) is not dict:
                    raise _BadField(f"expected a JSON object, got {type(obj).__name__}")
                ts = obj["timestamp"]
                n_in = obj["input_length"]
                n_out = obj["output_length"]
                ids = obj["hash_ids"]
                if type(ts) is not int:
                    ts = _number(ts, "timestamp")
                if type(n_in) is not int or n_in < 1:
                    n_in = _int(n_in, "input_length", 1)
                if type(n_out) is not int or n_out < 0:
                    n_out = _int(n_out, "output_length", 0)
                if type(ids) is not list:
                    raise _BadField(f"field 'hash_ids' must be a list of integers, got {type(ids).__name__}")
                if ids:
                    try:
                        lo, hi = min(ids), max(ids)
                        ok = lo >= 0 and hi < max_id
                    except TypeError:
                        ok = False
                    if not ok:
                        _int_list(ids, "hash_ids")
                        raise _BadField(f"field 'hash_ids' must hold integers in [0, {max_id}), "
                                        f"got values in [{min(ids)}, {max(ids)}]")
                arrival = ts / 1000.0
                if arrival < previous:
                    raise _BadField(f"timestamp {ts} is earlier than the previous line's "
                                    f"{previous * 1000.0:g}; the trace must be in time order")
                previous = arrival
                if hashes:
                    try:
                        block_hashes = expand(ids, n_in, MOONCAKE_BLOCK_TOKENS, block_size, namespace)
                    except TypeError:
                        _int_list(ids, "hash_ids")
                        raise
                else:
                    _int_list(ids, "hash_ids")
                    block_hashes = ()
            except KeyError as exc:
                raise _fail(path, lineno, f"missing field {exc.args[0]!r}") from None
            except _BadField as exc:
                raise _fail(path, lineno, str(exc)) from None
            yield TraceRecord(arrival, n_in, n_out, block_hashes)


def read_sharegpt_tokens(
    path: PathLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    namespace: int = 0,
    hashes: bool = True,
    keep_token_ids: bool = False,
) -> Iterator[TraceRecord]:
    """Stream a ShareGPT workload with token ids (LLMServingSim JSON lines).

    ``arrival_s`` is ``arrival_time_ns / 1e9``; ``prompt_tokens`` is ``input_toks``, which must
    equal ``len(input_tok_ids)``. Block hashes are ``hash_token_blocks(input_tok_ids,
    block_size)`` -- exactly what a router computes for the same tokens -- when ``namespace`` is 0;
    another namespace chains from a different root so replayed copies share no prefix.
    ``keep_token_ids`` fills ``token_ids`` (and ``output_token_ids`` when the line has them) for
    components that replay the real text.
    """
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    parent = ROOT_HASH if namespace == 0 else hash((ROOT_HASH, -1, namespace))
    previous = -math.inf
    with open_binary(path) as f:
        for lineno, line in numbered_lines(f, path):
            if not line.strip():
                continue
            try:
                obj = _json_object(line)
                n_in = _int(obj["input_toks"], "input_toks", 1)
                n_out = _int(obj["output_toks"], "output_toks", 0)
                t_ns = _number(obj["arrival_time_ns"], "arrival_time_ns")
                ids = _int_list(obj["input_tok_ids"], "input_tok_ids")
                if len(ids) != n_in:
                    raise _BadField(f"input_toks is {n_in} but input_tok_ids has {len(ids)} ids")
                out_ids: list[int] | None = None
                if keep_token_ids and "output_tok_ids" in obj:
                    out_ids = _int_list(obj["output_tok_ids"], "output_tok_ids")
                arrival = t_ns / 1e9
                if arrival < previous:
                    raise _BadField(f"arrival_time_ns {obj['arrival_time_ns']} is earlier than the previous "
                                    f"line's; the trace must be in time order")
                previous = arrival
            except KeyError as exc:
                raise _fail(path, lineno, f"missing field {exc.args[0]!r}") from None
            except _BadField as exc:
                raise _fail(path, lineno, str(exc)) from None
            yield TraceRecord(
                arrival,
                n_in,
                n_out,
                hash_token_blocks(ids, block_size, parent) if hashes else (),
                None,
                tuple(ids) if keep_token_ids else None,
                tuple(out_ids) if out_ids is not None else None,
            )


def _csv_rows(path: PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, int], list[str]]]:
    """``(line number, column index by name, row)`` for each data row of a CSV file with a header.

    The header must name every column in ``required``. Empty rows are skipped.
    """
    with open_binary(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader, None)
            if header is None:
                raise _fail(path, 1, "empty file: expected a CSV header")
            columns = {name.strip(): i for i, name in enumerate(header)}
            for name in required:
                if name not in columns:
                    raise _fail(path, 1, f"missing column {name!r} (header: {', '.join(header)})")
            width = max(columns[name] for name in required) + 1
            for row in reader:
                if not row:
                    continue
                if len(row) < width:
                    raise _fail(path, reader.line_num, f"expected at least {width} columns, got {len(row)}")
                yield reader.line_num, columns, row
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise _fail(path, reader.line_num + 1, f"unreadable CSV: {exc}") from None


def _csv_int(text: str, name: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise _BadField(f"column {name!r} must be an integer, got {text!r}") from None
        if not f.is_integer():
            raise _BadField(f"column {name!r} must be an integer, got {text!r}") from None
        value = int(f)
    if value < minimum:
        raise _BadField(f"column {name!r} must be >= {minimum}, got {value}")
    return value


def parse_azure_timestamp(text: str) -> tuple[datetime, float]:
    """Split an Azure ``TIMESTAMP`` into whole seconds and the fraction of a second.

    ``2023-11-16 18:15:46.6805900`` has seven fractional digits (100 ns), more than
    :meth:`datetime.fromisoformat` keeps, so the fraction is parsed separately and exactly:
    ``(datetime(2023, 11, 16, 18, 15, 46), 0.68059)``.
    """
    whole, dot, frac = text.strip().partition(".")
    try:
        moment = datetime.fromisoformat(whole)
    except ValueError:
        raise _BadField(f"invalid TIMESTAMP {text!r}") from None
    if not dot:
        return moment, 0.0
    if not frac.isdigit() or not frac.isascii():
        raise _BadField(f"invalid TIMESTAMP {text!r}")
    return moment, int(frac) / 10 ** len(frac)


def read_azure(path: PathLike) -> Iterator[TraceRecord]:
    """Stream an Azure LLM inference trace (CSV with ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``).

    ``arrival_s`` is seconds since the first row's timestamp (to 100 ns). The format carries no
    prefix information: ``block_hashes`` is empty. Timestamps are naive (no time zone), as in the
    published files.
    """
    first: datetime | None = None
    first_frac = 0.0
    previous = -math.inf
    for lineno, columns, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            moment, frac = parse_azure_timestamp(row[columns["TIMESTAMP"]])
            if first is None:
                first, first_frac = moment, frac
            try:
                whole_s = (moment - first).total_seconds()
            except TypeError:
                raise _BadField("TIMESTAMP mixes time-zone-aware and naive times") from None
            arrival = whole_s + (frac - first_frac)
            if arrival < previous:
                raise _BadField(f"TIMESTAMP {row[columns['TIMESTAMP']]!r} is earlier than the previous row's; "
                                f"the trace must be in time order")
            previous = arrival
            n_in = _csv_int(row[columns["ContextTokens"]], "ContextTokens", 1)
            n_out = _csv_int(row[columns["GeneratedTokens"]], "GeneratedTokens", 0)
        except _BadField as exc:
            raise _fail(path, lineno, str(exc)) from None
        yield TraceRecord(arrival, n_in, n_out)


def read_sharegpt_lengths(path: PathLike) -> Iterator[tuple[int, int]]:
    """Stream ``(prompt_tokens, output_tokens)`` pairs from a ShareGPT length-statistics CSV.

    Columns ``num_prefill_tokens`` (>= 1) and ``num_decode_tokens`` (>= 0); other columns are
    ignored. The file has no times: pair it with an arrival process.
    """
    for lineno, columns, row in _csv_rows(path, ("num_prefill_tokens", "num_decode_tokens")):
        try:
            n_in = _csv_int(row[columns["num_prefill_tokens"]], "num_prefill_tokens", 1)
            n_out = _csv_int(row[columns["num_decode_tokens"]], "num_decode_tokens", 0)
        except _BadField as exc:
            raise _fail(path, lineno, str(exc)) from None
        yield n_in, n_out


@dataclass(frozen=True, slots=True)
class TraceStats:
    """What one cheap pass over a timed trace file finds.

    Attributes:
        count: number of requests.
        first_s: first arrival, seconds on the reader's clock.
        last_s: last arrival, seconds on the reader's clock.
    """

    count: int
    first_s: float
    last_s: float

    @property
    def span_s(self) -> float:
        """``last_s - first_s``, seconds."""
        return self.last_s - self.first_s

    @property
    def rate_rps(self) -> float:
        """Mean request rate ``count / (last_s - first_s)``, requests per second.

        Raises :class:`TraceError` when it is undefined (fewer than two requests, or all at once).
        """
        if self.count < 2 or self.span_s <= 0:
            raise TraceError(f"cannot determine the request rate of a trace with {self.count} request(s) "
                             f"spanning {self.span_s:g} s")
        return self.count / self.span_s


def read_timed(kind: TimedKind, path: PathLike, *, block_size: int = DEFAULT_BLOCK_SIZE,
               namespace: int = 0, hashes: bool = True, keep_token_ids: bool = False) -> Iterator[TraceRecord]:
    """The reader of ``kind`` with the options that apply to it (others are ignored)."""
    if kind == "mooncake":
        return read_mooncake(path, block_size=block_size, namespace=namespace, hashes=hashes)
    if kind == "sharegpt_tokens":
        return read_sharegpt_tokens(path, block_size=block_size, namespace=namespace, hashes=hashes,
                                    keep_token_ids=keep_token_ids)
    if kind == "azure":
        return read_azure(path)
    raise ValueError(f"not a timed trace kind: {kind!r}")


def scan_trace(kind: TimedKind, path: PathLike) -> TraceStats:
    """Count the requests of a timed trace file and find its first and last arrival, streaming.

    Validates every line as the reader does (a malformed file raises here already) but computes
    no hashes. An empty file raises :class:`TraceError`.
    """
    count = 0
    first = last = math.nan
    for rec in read_timed(kind, path, hashes=False):
        if count == 0:
            first = rec.arrival_s
        last = rec.arrival_s
        count += 1
    if count == 0:
        raise TraceError(f"{path}: no requests in trace")
    return TraceStats(count, first, last)
