"""Workloads: trace readers and synthetic generators that produce the :class:`~isthmus.core.Request` stream.

Pipeline: a source (a streaming reader of a trace file, or a seeded generator) yields
:class:`TraceRecord` in arrival order; :func:`build_requests` rescales and shapes the times
(``rate_rps``, ``time_scale``, ``repeat``), bounds the stream (``limit``, ``duration_s``), caps
prompts (``max_prompt_tokens``), draws each request's origin region and numbers the requests.
:class:`WorkloadSpec` is the configuration; everything random comes from the seed.
"""

from isthmus.workloads.build import build_requests, native_rate, offered_rate, trace_span, trace_stats
from isthmus.workloads.origins import OriginAssigner
from isthmus.workloads.readers import (
    TraceStats,
    parse_azure_timestamp,
    read_azure,
    read_mooncake,
    read_sharegpt_lengths,
    read_sharegpt_tokens,
    read_timed,
    scan_trace,
)
from isthmus.workloads.records import TraceRecord
from isthmus.workloads.spec import LengthSpec, OriginSpec, WorkloadKind, WorkloadSpec
from isthmus.workloads.synthetic import (
    VOCAB_SIZE,
    arrival_times,
    fixed_lengths,
    gamma_arrivals,
    independent_requests,
    load_length_table,
    lognormal_lengths,
    poisson_arrivals,
    session_requests,
    shared_prefix_requests,
    table_lengths,
)

__all__ = [
    "VOCAB_SIZE", "LengthSpec", "OriginAssigner", "OriginSpec", "TraceRecord", "TraceStats", "WorkloadKind",
    "WorkloadSpec", "arrival_times", "build_requests", "fixed_lengths", "gamma_arrivals",
    "independent_requests", "load_length_table", "lognormal_lengths", "native_rate", "offered_rate",
    "parse_azure_timestamp", "poisson_arrivals", "read_azure", "read_mooncake", "read_sharegpt_lengths",
    "read_sharegpt_tokens", "read_timed", "scan_trace", "session_requests", "shared_prefix_requests",
    "table_lengths", "trace_span", "trace_stats",
]
