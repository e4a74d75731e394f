"""Plots of simulation results (matplotlib, Agg, no pyplot state).

matplotlib is an optional dependency (``pip install isthmus[plot]``) and is imported inside the
functions, so importing this module, and starting the CLI, stays fast.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isthmus.core.errors import IsthmusError
from isthmus.sim.report import write_atomic


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
