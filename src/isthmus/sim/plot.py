"""Plots of simulation results and sweeps (matplotlib, Agg, no pyplot state).

matplotlib is an optional dependency (``pip install isthmus[plot]``) and is imported inside the
functions, so importing this module, and starting the CLI, stays fast.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from isthmus.core.errors import IsthmusError
from isthmus.sim.report import write_atomic

if TYPE_CHECKING:
    from isthmus.sim.sweep import CellStats


class PlotUnavailableError(IsthmusError):
    """matplotlib is not installed."""


def ecdf(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF of the finite, positive ``samples``: sorted values ``x`` and ``F(x) = k / n``."""
    x = np.sort(samples[np.isfinite(samples) & (samples > 0)])
    return x, np.arange(1, x.size + 1, dtype=float) / max(x.size, 1)


def format_seconds(x: float) -> str:
    """A tick label for ``x`` seconds: ``"20 ms"``, ``"1.5 s"``, ``"200 s"``."""
    if x < 1.0:
        return f"{x * 1000.0:g} ms"
    return f"{x:g} s"


def render_ttft_cdf(series: Sequence[tuple[str, np.ndarray]], title: str = "") -> bytes:
    """PNG bytes of one TTFT CDF line per ``(label, ttft_seconds)``, log x axis in seconds.

    Non-finite and non-positive samples are left out (a log axis cannot show them); a series with
    no sample left is listed in the legend with ``(no data)``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'isthmus[plot]'") from exc

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = np.inf, -np.inf
    for label, samples in series:
        x, y = ecdf(np.asarray(samples, dtype=float))
        if x.size == 0:
            ax.plot([], [], label=f"{label} (no data)")
            continue
        lo, hi = min(lo, float(x[0])), max(hi, float(x[-1]))
        ax.step(np.concatenate(([x[0]], x)), np.concatenate(([0.0], y)), where="post", label=label, linewidth=1.5)
    if hi >= lo:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        decades = np.log10(hi / lo) if hi > lo else 0.0
        ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if decades <= 3.0 else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_seconds(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("time to first token (log scale)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_ttft_cdf(series: Sequence[tuple[str, np.ndarray]], path: Path, title: str = "") -> None:
    """Write :func:`render_ttft_cdf` to ``path`` atomically."""
    write_atomic(path, render_ttft_cdf(series, title))


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailableError` now if matplotlib is missing (before a long run, not after)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'isthmus[plot]'")


# ----------------------------------------------------------------------------------------- sweeps
def _figure_tools() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'isthmus[plot]'") from exc
    return Figure, FigureCanvasAgg


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def short_seconds(x: float) -> str:
    """A cell label for ``x`` seconds, 2-3 significant digits: ``"402 ms"``, ``"1.25 s"``, ``"18.3 s"``."""
    if x < 1.0:
        return f"{x * 1000.0:.0f} ms"
    if x < 10.0:
        return f"{x:.2f} s"
    return f"{x:.1f} s"


def _log_seconds_axis(axis: Any, lo: float, hi: float) -> None:
    """Log scale in seconds with readable ticks: 1-2-5 per decade over up to 3 decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo) if hi > lo > 0 else 0.0
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if decades <= 3.0 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: format_seconds(v)))
    axis.set_minor_formatter(NullFormatter())


def _ordered(values: Sequence[Any]) -> list[Any]:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def render_sweep_ttft(stats: Sequence[CellStats], title: str = "") -> bytes:
    """PNG bytes: TTFT against offered load, one line per policy, one panel per RTT scale.

    The line is the median TTFT (the mean over seeds of each run's p50) and the shaded band reaches
    up to the P99 (mean over seeds of each run's p99), on a log y axis in seconds. Points without a
    successful run are left out (a gap in the line).
    """
    Figure, Canvas = _figure_tools()

    scales = sorted(_ordered([s.rtt_scale for s in stats]))
    policies = _ordered([s.policy for s in stats])
    fig = Figure(figsize=(max(5.0, 4.2 * len(scales)), 4.6), dpi=110)
    Canvas(fig)
    axes = fig.subplots(1, max(1, len(scales)), sharey=True, squeeze=False)[0]
    colors = [f"C{k % 10}" for k in range(len(policies))]
    shown = np.array([v for s in stats for v in (s.ttft_p50_s, s.ttft_p99_s) if math.isfinite(v) and v > 0])
    for ax, scale in zip(axes, scales, strict=False):
        for policy, color in zip(policies, colors, strict=True):
            pts = sorted((s for s in stats if s.policy == policy and s.rtt_scale == scale), key=lambda s: s.rate_rps)
            x = np.array([s.rate_rps for s in pts], dtype=float)
            p50 = np.array([s.ttft_p50_s for s in pts], dtype=float)
            p99 = np.array([s.ttft_p99_s for s in pts], dtype=float)
            ok = np.isfinite(p50) & (p50 > 0) & np.isfinite(p99)
            p50, p99 = np.where(ok, p50, np.nan), np.where(ok, p99, np.nan)
            ax.plot(x, p50, marker="o", markersize=3.5, color=color, linewidth=1.6, label=policy)
            ax.fill_between(x, p50, p99, color=color, alpha=0.15, linewidth=0)
            ax.plot(x, p99, color=color, linewidth=0.8, linestyle="--", alpha=0.7)
        ax.set_yscale("log")
        if shown.size:
            _log_seconds_axis(ax.yaxis, float(shown.min()), float(shown.max()))
        ax.set_xlabel("offered load (req/s)")
        ax.set_title(f"RTT × {scale:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("TTFT: median (line) to P99 (band, dashed)")
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(len(policies), 4) or 1
    rows = -(-len(policies) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.05 * rows + 0.02, 1.0, 1.0))
    return _png(fig)


def render_sweep_winners(stats: Sequence[CellStats], baseline: str | None = "least_load",
                         aware: Sequence[str] = (), title: str = "") -> bytes:
    """PNG bytes: where network awareness matters, per (offered load, RTT scale).

    Rows: mean TTFT, then P99 TTFT (each the mean over seeds). Left column: which policy has the
    lowest value (cell colour and label). Right column, when ``baseline`` is in ``stats``: the best
    of the ``aware`` policies (of every other policy when ``aware`` is empty) divided by the
    baseline's, on a log colour scale centred on 1 (blue: better than the baseline).
    """
    Figure, Canvas = _figure_tools()
    from matplotlib.colors import BoundaryNorm, ListedColormap, TwoSlopeNorm

    rates = sorted(_ordered([s.rate_rps for s in stats]))
    scales = sorted(_ordered([s.rtt_scale for s in stats]))
    policies = _ordered([s.policy for s in stats])
    table = {(s.policy, s.rate_rps, s.rtt_scale): s for s in stats}
    with_ratio = baseline is not None and baseline in policies
    contenders = [p for p in (aware or policies) if p != baseline and p in policies]
    with_ratio = with_ratio and bool(contenders)
    fig = Figure(figsize=(max(6.0, 1.1 * len(rates) + 3.0) * (2 if with_ratio else 1) * 0.75,
                          2 * max(2.6, 0.6 * len(scales) + 1.6)), dpi=110)
    Canvas(fig)
    axes = fig.subplots(2, 2 if with_ratio else 1, squeeze=False)
    cmap = ListedColormap([f"C{k % 10}" for k in range(len(policies))])
    norm = BoundaryNorm(np.arange(len(policies) + 1) - 0.5, cmap.N)

    def value(policy: str, rate: float, scale: float, attr: str) -> float:
        s = table.get((policy, rate, scale))
        return math.nan if s is None else float(getattr(s, attr))

    for row, (attr, name) in enumerate((("ttft_mean_s", "mean TTFT"), ("ttft_p99_s", "P99 TTFT"))):
        winner = np.full((len(scales), len(rates)), np.nan)
        ratio = np.full((len(scales), len(rates)), np.nan)
        ax = axes[row][0]
        for i, scale in enumerate(scales):
            for j, rate in enumerate(rates):
                vals = [(value(p, rate, scale, attr), k) for k, p in enumerate(policies)]
                vals = [(v, k) for v, k in vals if math.isfinite(v)]
                if vals:
                    best, k = min(vals)
                    winner[i, j] = k
                    ax.text(j, i, f"{policies[k]}\n{short_seconds(best)}", ha="center", va="center",
                            fontsize="x-small", color="white")
                if with_ratio:
                    assert baseline is not None
                    base = value(baseline, rate, scale, attr)
                    others = [value(p, rate, scale, attr) for p in contenders]
                    others = [v for v in others if math.isfinite(v)]
                    if others and math.isfinite(base) and base > 0:
                        ratio[i, j] = min(others) / base
        ax.imshow(np.ma.masked_invalid(winner), cmap=cmap, norm=norm, origin="lower", aspect="auto")
        ax.set_title(f"lowest {name}", fontsize="medium")
        if with_ratio:
            ax2 = axes[row][1]
            logs = np.log10(ratio)
            span = float(np.nanmax(np.abs(logs))) if np.isfinite(logs).any() else 1.0
            span = max(span, 0.05)
            im = ax2.imshow(np.ma.masked_invalid(logs), cmap="RdBu_r", origin="lower", aspect="auto",
                            norm=TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span))
            for i in range(len(scales)):
                for j in range(len(rates)):
                    if math.isfinite(ratio[i, j]):
                        dark = abs(float(logs[i, j])) > 0.6 * span
                        ax2.text(j, i, f"{ratio[i, j]:.2f}×", ha="center", va="center", fontsize="small",
                                 color="white" if dark else "black")
            who = "network-aware" if aware else "other"
            ax2.set_title(f"{name}: best {who} / {baseline}", fontsize="medium")
            bar = fig.colorbar(im, ax=ax2)
            bar.set_label("log10 ratio")
        for a in axes[row]:
            a.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
            a.set_yticks(range(len(scales)), [f"{s:g}" for s in scales])
            a.set_xlabel("offered load (req/s)")
            a.set_ylabel("RTT scale")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def plot_sweep(stats: Sequence[CellStats], path: Path, *, baseline: str | None = "least_load",
               aware: Sequence[str] = (), title: str = "") -> tuple[Path, Path]:
    """Write both sweep figures atomically: TTFT against load to ``path`` and the winner map to
    ``<stem>_winners<suffix>`` beside it. Returns the two paths."""
    winners = path.with_name(f"{path.stem}_winners{path.suffix or '.png'}")
    write_atomic(path, render_sweep_ttft(stats, title))
    write_atomic(winners, render_sweep_winners(stats, baseline, aware, title))
    return path, winners
