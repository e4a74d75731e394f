"""Learning curves of online-learned policies: rolling mean TTFT against time, and when it settles.

Pure numpy apart from :func:`plot_learning_curves`, which needs the ``plot`` extra (matplotlib).
Times are seconds of (virtual) arrival time; TTFTs are seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def rolling_mean(arrival_s: np.ndarray, ttft_s: np.ndarray, window_s: float,
                 step_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean TTFT of the requests that arrived in ``(t - window_s, t]``, for ``t`` on a grid.

    The grid runs from ``first arrival + window_s`` to the last arrival in steps of ``step_s``
    (default ``window_s / 10``). Requests are taken by arrival time, in any order. Windows with
    no request give ``nan``. Returns ``(t, mean)``; both empty when the span is shorter than a
    window.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    step = window_s / 10.0 if step_s is None else step_s
    if step <= 0:
        raise ValueError(f"step_s must be > 0, got {step}")
    order = np.argsort(arrival_s, kind="stable")
    a = np.asarray(arrival_s, dtype=np.float64)[order]
    y = np.asarray(ttft_s, dtype=np.float64)[order]
    if a.size == 0 or a[-1] - a[0] < window_s:
        return np.empty(0), np.empty(0)
    t = np.arange(a[0] + window_s, a[-1] + step * 0.5, step)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    hi = np.searchsorted(a, t, side="right")
    lo = np.searchsorted(a, t - window_s, side="right")
    n = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)
    return t, mean


def tail_level(arrival_s: np.ndarray, ttft_s: np.ndarray, tail_share: float = 0.25,
               end_s: float | None = None) -> float:
    """The converged level: mean TTFT of the requests arriving in the last ``tail_share`` of the
    span from the first arrival to ``end_s`` (default the last arrival), seconds."""
    if not 0 < tail_share <= 1:
        raise ValueError(f"tail_share must be in (0, 1], got {tail_share}")
    a = np.asarray(arrival_s, dtype=np.float64)
    if a.size == 0:
        return math.nan
    end = float(a.max()) if end_s is None else end_s
    start = float(a.min())
    sel = (a >= end - tail_share * (end - start)) & (a <= end)
    return float(np.asarray(ttft_s)[sel].mean()) if sel.any() else math.nan


def time_to_within(t: np.ndarray, mean: np.ndarray, level: float, tol: float = 0.05,
                   after_s: float = -math.inf) -> float:
    """The first grid time ``>= after_s`` from which the rolling mean stays at or below
    ``level * (1 + tol)`` (nan windows ignored), seconds; ``nan`` if it never does."""
    limit = level * (1.0 + tol)
    ok = (mean <= limit) | np.isnan(mean)
    idx = np.nonzero(t >= after_s)[0]
    if idx.size == 0:
        return math.nan
    bad = np.nonzero(~ok[idx])[0]
    if bad.size == 0:
        return float(t[idx[0]])
    k = idx[bad[-1]] + 1
    return float(t[k]) if k < t.size else math.nan


def plot_learning_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *,
                         title: str, marks: Sequence[tuple[float, str]] = (), window_s: float | None = None) -> None:
    """Write a PNG: one line per policy (rolling mean TTFT, seconds, against arrival time) and a
    dashed vertical line per mark ``(time, label)`` (e.g. the first fit, a workload shift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for label, (t, m) in curves.items():
        ax.plot(t, m, label=label, lw=1.4 if label.startswith("lodestar") else 1.0)
    for x, text in marks:
        ax.axvline(x, ls="--", lw=0.8, color="grey")
        ax.text(x, 1.0, f" {text}", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=8,
                color="dimgrey")
    ax.set_xlabel("arrival time (s)")
    what = f"rolling mean TTFT, {window_s:g} s window (s)" if window_s else "rolling mean TTFT (s)"
    ax.set_ylabel(what)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
