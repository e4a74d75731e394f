"""Reports of simulation runs: the JSON document, its atomic writing, and the terminal tables.

The JSON document (keys may be added, never renamed)::

    {"scenario": str, "seed": int,
     "results": [{"policy": str, "requests": int, "completed": int,
                  "ttft_s": {"mean", "p50", "p90", "p99"}, "tpot_s": {...}, "e2e_s": {...},
                  "throughput_rps": float, "prefix_hit_rate": float, "cross_region_share": float, ...}]}

Latencies are seconds, throughput is completed requests per simulated second, rates and shares are
in [0, 1]. Runs whose requests carry SLO classes add ``slo`` (attainment and goodput per class,
rejections by code), runs whose policy predicts TTFT / E2E add ``estimator`` (its error), and runs
on a topology with prices add ``cost`` (GPU and egress US dollars, and per million tokens); see
:meth:`isthmus.sim.metrics.SimResult.summary`. A statistic over no samples is ``null``. Wall-clock figures are excluded unless asked
for (``timing``), so the same scenario and seed give byte-identical files: keys are sorted, floats
are printed by orjson's shortest round-trip repr.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

LATENCY_KEYS: tuple[str, ...] = ("ttft_s", "tpot_s", "e2e_s")
"""Latency statistics every result carries, each ``{"mean", "p50", "p90", "p99"}`` in seconds."""
STAT_KEYS: tuple[str, ...] = ("mean", "p50", "p90", "p99")
SCALAR_KEYS: tuple[str, ...] = ("requests", "completed", "throughput_rps", "prefix_hit_rate", "cross_region_share")
"""Scalars every result carries besides ``policy`` and the latency statistics."""


class Summarizable(Protocol):
    """What a report needs of a run: :class:`~isthmus.sim.metrics.SimResult` satisfies it."""

    wall_s: float
    events: int

    def summary(self) -> dict[str, Any]: ...


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python ones and non-finite floats into ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


def result_record(label: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of ``results``: the run's summary, reported under ``label``.

    Raises ``KeyError`` naming a documented key the summary lacks, so a report never silently
    drops a figure.
    """
    rec = _plain(summary)
    rec["policy"] = label
    for key in SCALAR_KEYS:
        if key not in rec:
            raise KeyError(f"summary of {label!r} lacks {key!r}")
    for key in LATENCY_KEYS:
        stats = rec.get(key)
        if not isinstance(stats, dict) or any(s not in stats for s in STAT_KEYS):
            raise KeyError(f"summary of {label!r} lacks {key!r} with {list(STAT_KEYS)}")
    return rec


def build_report(scenario: str, seed: int, records: Sequence[Mapping[str, Any]],
                 timing: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The JSON document. ``timing`` (per policy label: wall seconds, events per wall second...) is
    included only when given, under its own key, because it differs from run to run."""
    doc: dict[str, Any] = {"scenario": scenario, "seed": int(seed), "results": [dict(r) for r in records]}
    if timing is not None:
        doc["timing"] = _plain(timing)
    return doc


def dumps_report(doc: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a report: indented by 2, keys sorted, trailing newline."""
    return orjson.dumps(_plain(doc), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename, so
    ``path`` holds either its old content or all of ``data``, never a part. Creates parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(path: Path, doc: Mapping[str, Any]) -> None:
    """:func:`dumps_report` then :func:`write_atomic`."""
    write_atomic(path, dumps_report(doc))


# ----------------------------------------------------------------------------------------- terminal
def _ms(value: Any) -> str:
    return "—" if value is None else f"{1000.0 * float(value):,.1f}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100.0 * float(value):.1f} %"


def policy_table(record: Mapping[str, Any]) -> Group:
    """Latency percentiles (ms) of one policy, and a line with its throughput and shares."""
    t = Table(title=f"[bold]{record['policy']}[/bold]: {record['completed']:,} of {record['requests']:,} completed",
              title_justify="left")
    t.add_column("metric", no_wrap=True)
    for s in STAT_KEYS:
        t.add_column(f"{s} (ms)", justify="right", no_wrap=True)
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"), ("queue_s", "queue")):
        stats = record.get(key)
        if isinstance(stats, Mapping):
            t.add_row(label, *(_ms(stats.get(s)) for s in STAT_KEYS))
    line = Text(f"throughput {record['throughput_rps']:.3f} req/s, prefix hit rate {_pct(record['prefix_hit_rate'])}, "
                f"cross-region {_pct(record['cross_region_share'])}")
    lines: list[RenderableType] = [t, line]
    slo = record.get("slo")
    if isinstance(slo, Mapping):
        per_class = ", ".join(f"{name} {_pct(c.get('attainment'))}" for name, c in slo.get("classes", {}).items())
        lines.append(Text(f"SLO attainment {_pct(slo.get('attainment'))} ({per_class}), goodput "
                          f"{float(slo.get('goodput_rps') or 0.0):.3f} req/s, rejected {slo.get('rejected', 0)}"))
    est = record.get("estimator")
    if isinstance(est, Mapping):
        parts = [f"{key.upper()} mean abs error {_ms(e['abs_err_s'].get('mean'))} ms (median relative "
                 f"{_pct(e['rel_err'].get('p50'))})" for key, e in est.items()
                 if key != "per_class" and isinstance(e, Mapping)]
        lines.append(Text("estimator: " + "; ".join(parts)))
    cost = record.get("cost")
    if isinstance(cost, Mapping):
        lines.append(Text(f"cost: ${_usd(cost.get('usd_per_mtok'))} per million tokens (fleet), "
                          f"${_usd(cost.get('usd_per_mtok_busy'))} (busy GPU time), egress ${_usd(cost.get('egress_usd'))}"))
    return Group(*lines, Text(""))


def _usd(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4g}"


_COMPARED: tuple[tuple[str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("TTFT mean (ms)", lambda r: _ms(r["ttft_s"]["mean"])),
    ("TTFT p50 (ms)", lambda r: _ms(r["ttft_s"]["p50"])),
    ("TTFT p90 (ms)", lambda r: _ms(r["ttft_s"]["p90"])),
    ("TTFT p99 (ms)", lambda r: _ms(r["ttft_s"]["p99"])),
    ("TPOT p50 (ms)", lambda r: _ms(r["tpot_s"]["p50"])),
    ("E2E p50 (ms)", lambda r: _ms(r["e2e_s"]["p50"])),
    ("throughput (req/s)", lambda r: f"{r['throughput_rps']:.3f}"),
    ("prefix hit rate", lambda r: _pct(r["prefix_hit_rate"])),
    ("cross-region share", lambda r: _pct(r["cross_region_share"])),
)

_COMPARED_IF_PRESENT: tuple[tuple[str, str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("TTFT bound mean (ms)", "bound_ttft_s", lambda r: _ms(r["bound_ttft_s"].get("mean"))),
    ("regret mean (×)", "regret", lambda r: _times(r["regret"].get("mean"))),
    ("regret p99 (×)", "regret", lambda r: _times(r["regret"].get("p99"))),
    ("forwarded share", "forward_share", lambda r: _pct(r["forward_share"])),
    ("SLO attainment", "slo", lambda r: _pct(r["slo"].get("attainment"))),
    ("goodput (req/s)", "slo", lambda r: f"{float(r['slo'].get('goodput_rps') or 0.0):.3f}"),
    ("rejected", "slo", lambda r: str(r["slo"].get("rejected", 0))),
    ("$ / M tokens (fleet)", "cost", lambda r: _usd(r["cost"].get("usd_per_mtok"))),
    ("$ / M tokens (busy)", "cost", lambda r: _usd(r["cost"].get("usd_per_mtok_busy"))),
    ("TTFT est. error (ms)", "estimator", lambda r: _ms((r["estimator"].get("ttft") or {}).get("abs_err_s", {}).get("mean"))),
)
"""Rows shown when the runs report the figure (``key``), i.e. by simulators that compute it."""


def _sec(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3g}"


def _times(value: Any) -> str:
    return "—" if value is None else f"{float(value):.2f}"


def comparison_table(records: Sequence[Mapping[str, Any]], width: int | None = None) -> Group:
    """Policies side by side: one column per policy, one row per headline figure (plus the TTFT
    lower bound, the regret and the forwarded share when the runs report them).

    Figures are never cut: long policy names wrap in the header, and when the policies do not fit
    in ``width`` characters (default: no limit) they are split over several tables, each repeating
    the row labels.
    """
    rows: list[tuple[str, list[str]]] = [(label, [cell(r) for r in records]) for label, cell in _COMPARED]
    for label, key, cell in _COMPARED_IF_PRESENT:
        if any(isinstance(r.get(key), Mapping | int | float) for r in records):
            rows.append((label, [cell(r) if r.get(key) is not None else "—" for r in records]))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(max(len(cells[k]) for _, cells in rows), min(len(str(r["policy"])), 12))
              for k, r in enumerate(records)]
    chunks: list[list[int]] = [[]]
    used = label_width
    for k, w in enumerate(widths):
        if chunks[-1] and width is not None and used + 2 + w > width:
            chunks.append([])
            used = label_width
        chunks[-1].append(k)
        used += 2 + w
    tables: list[Table] = []
    for n, chunk in enumerate(chunks):
        title = "[bold]policies compared[/bold]" + (f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else "")
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        t.add_column("", no_wrap=True, min_width=label_width)
        for k in chunk:
            t.add_column(str(records[k]["policy"]), justify="right", overflow="fold", min_width=widths[k])
        for label, cells in rows:
            t.add_row(label, *(cells[k] for k in chunk))
        tables.append(t)
    return Group(*tables)


def sweep_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """A sweep's points, one row per (policy, rate, RTT scale) in the order of ``records``: TTFT
    mean, p50 and p99 in seconds (3 significant digits), the regret (TTFT mean / its lower bound)
    and the cross-region share, each averaged over the seeds that succeeded; how many seeds
    succeeded and how many failed."""
    groups: dict[tuple[Any, Any, Any], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["policy"], r["rate_rps"], r["rtt_scale"]), []).append(r)
    t = Table(title="[bold]sweep[/bold]: TTFT in seconds, averaged over seeds", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("policy", "req/s", "rtt×", "seeds", "mean", "p50", "p99", "regret", "x-reg", "fail"):
        if name == "policy":
            width = min(14, max([len(str(p)) for p, _, _ in groups] + [len(name)]))
            t.add_column(name, overflow="fold", min_width=width)
        else:
            t.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for (policy, rate, scale), recs in groups.items():
        ok = [r for r in recs if "error" not in r]

        def avg(key: str, stat: str | None, ok: list[Mapping[str, Any]] = ok) -> float | None:
            vals = [r.get(key) if stat is None else (r.get(key) or {}).get(stat) for r in ok]
            finite = [float(v) for v in vals if isinstance(v, int | float) and math.isfinite(float(v))]
            return sum(finite) / len(finite) if finite else None

        failed = len(recs) - len(ok)
        t.add_row(str(policy), f"{float(rate):g}", f"{float(scale):g}", str(len(ok)),
                  _sec(avg("ttft_s", "mean")), _sec(avg("ttft_s", "p50")), _sec(avg("ttft_s", "p99")),
                  _sec(avg("regret", "mean")), _pct(avg("cross_region_share", None)),
                  f"[red]{failed}[/red]" if failed else "0")
    return t


@contextmanager
def progress_bar(console: Console, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A live bar for one run; yields the ``progress`` callback (completed requests so far).

    ``total`` ``None`` shows a count without a bar end (the request count is known only after a run).
    Nothing is drawn when ``console`` is not a terminal.
    """
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)

        def update(completed: int) -> None:
            bar.update(task, completed=completed)

        yield update
