"""The block-coverage picture of ``isthmus place --plot``: one panel per algorithm, one bar per server
over the blocks it holds (coloured by server type), and how many servers hold each block.

matplotlib is imported here only, when a picture is asked for.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from isthmus.core.errors import IsthmusError
from isthmus.place.run import PlaceRun


class PlotUnavailableError(IsthmusError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailableError` now if matplotlib is missing (before a long run, not after)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'isthmus[plot]'")


def coverage_png(run: PlaceRun) -> bytes:
    """The picture as PNG bytes (no timestamp in its metadata: the same run gives the same bytes)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'isthmus[plot]'") from exc
    inst = run.setup.instance
    shown = [r for r in run.results if r.placement is not None]
    kinds = sorted(set(inst.server_kinds))
    colours = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    rows = max(len(shown), 1)
    fig = Figure(figsize=(10, 0.9 + 0.22 * inst.n_servers * rows + 0.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    blocks = np.arange(1, inst.blocks + 1)
    for ax, res in zip(axes, shown, strict=False):
        assert res.placement is not None
        p = res.placement
        for j in range(inst.n_servers):
            if p.count[j] > 0:
                ax.barh(j, p.count[j], left=p.start[j] - 0.5, height=0.7, color=colours[inst.server_kinds[j]],
                        edgecolor="black", linewidth=0.4)
        ax.set_yticks(range(inst.n_servers), labels=list(inst.server_names), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0.5, inst.blocks + 0.5)
        cover = ax.twinx()
        cover.step(blocks, p.coverage(inst.blocks), where="mid", color="grey", linewidth=1.0)
        cover.set_ylabel("servers", fontsize=7, color="grey")
        cover.tick_params(labelsize=7, colors="grey")
        cover.set_ylim(0, max(int(p.coverage(inst.blocks).max()), 1) * 1.15)
        sim = res.simulated
        tail = f", simulated {sim['time_per_token_s']:.3f} s/token" if sim else ""
        ax.set_title(f"{res.name} ({res.status}){tail}", fontsize=9, loc="left")
    axes[-1].set_xlabel("block")
    handles = [ax.bar(0, 0, color=colours[k], label=k) for k in kinds for ax in axes[:1]]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(f"{run.setup.config.name}: block coverage (|R| = {run.sessions})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def plot_coverage(run: PlaceRun, path: Path) -> None:
    """Write :func:`coverage_png` to ``path`` (directories created)."""
    data = coverage_png(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
