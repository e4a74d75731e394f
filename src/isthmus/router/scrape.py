"""What an engine's Prometheus ``/metrics`` says about its load (vLLM and SGLang names, MODELS.md §5).

Only a handful of gauges matter to routing, and an engine's page carries hundreds of histogram
lines, so :func:`parse_engine_metrics` keeps the lines of the wanted families (their samples and
``# TYPE`` / ``# HELP`` lines) before handing them to ``prometheus_client``'s parser: a scrape every
100 ms then costs the event loop tens of microseconds, not milliseconds.

Newer vLLM versions label each data-parallel rank (``engine="0"``, ...): request counts are summed
over the samples, KV use is averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

Engine = Literal["vllm", "sglang"]

# role -> metric names, first match wins (vLLM renamed its KV gauge)
_NAMES: dict[Engine, dict[str, tuple[str, ...]]] = {
    "vllm": {
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "cache_config": ("vllm:cache_config_info",),
    },
    "sglang": {
        "running": ("sglang:num_running_reqs",),
        "waiting": ("sglang:num_queue_reqs",),
        "kv_usage": ("sglang:token_usage",),
        "cache_config": (),
    },
}


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One scrape's worth of engine state.

    Attributes:
        running: requests in the running batch (``None``: the page does not say).
        waiting: requests queued in the engine (``None``: the page does not say).
        kv_usage: share of KV blocks in use, 0..1 (``None``: the page does not say).
        num_kv_blocks: the engine's KV cache size in blocks, from ``vllm:cache_config_info``.
        block_size: its tokens per block, from the same.
    """

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    num_kv_blocks: int | None = None
    block_size: int | None = None


def _prefixes(engine: Engine) -> tuple[tuple[str, ...], frozenset[str]]:
    names = frozenset(n for group in _NAMES[engine].values() for n in group)
    # a sample line starts with "name{" or "name "; comment lines with "# TYPE name " / "# HELP name "
    starts = tuple(f"{n}{c}" for n in names for c in ("{", " ")) + tuple(
        f"# {kind} {n} " for n in names for kind in ("TYPE", "HELP"))
    return starts, names


_PREFIXES = {engine: _prefixes(engine) for engine in _NAMES}


def parse_engine_metrics(text: str, engine: Engine = "vllm") -> EngineLoad:
    """The load an engine's ``/metrics`` page reports (absent gauges are ``None``).

    Raises:
        ValueError: the kept lines are not valid Prometheus text.
    """
    starts, names = _PREFIXES[engine]
    kept = "\n".join(line for line in text.splitlines() if line.startswith(starts))
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(kept + "\n"):
        for s in family.samples:
            if s.name in names:
                values.setdefault(s.name, []).append((s.labels, s.value))

    def first(role: str) -> list[tuple[dict[str, str], float]] | None:
        for name in _NAMES[engine][role]:
            if name in values:
                return values[name]
        return None

    running = first("running")
    waiting = first("waiting")
    kv = first("kv_usage")
    blocks: int | None = None
    block_size: int | None = None
    info = first("cache_config")
    if info:
        labels = info[0][0]
        try:
            blocks = int(labels["num_gpu_blocks"])
            block_size = int(labels["block_size"])
        except (KeyError, ValueError):
            blocks = block_size = None
    return EngineLoad(
        running=round(sum(v for _, v in running)) if running else None,
        waiting=round(sum(v for _, v in waiting)) if waiting else None,
        kv_usage=min(1.0, max(0.0, sum(v for _, v in kv) / len(kv))) if kv else None,
        num_kv_blocks=blocks if blocks and blocks > 0 else None,
        block_size=block_size if block_size and block_size > 0 else None,
    )
