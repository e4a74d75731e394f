"""Lodestar's learning curves and its behaviour across a workload shift (docs/results.md, "Lodestar").

1. Learning curves: for each given scenario, runs ``preble`` (the heuristic Lodestar falls back to)
   and the scenario's ``lodestar`` entries, and plots the rolling mean TTFT against arrival time
   (``docs/img/lodestar_curve_<scenario>.png``). Reports each lodestar's converged level (mean TTFT
   of the last quarter of arrivals), the time its rolling mean comes within 5 % of that level for
   good (after its first fit), and the same for its ratio to preble on the same arrivals.
2. Shift: ``scenarios/lodestar_shift.yaml`` (8 x A30 at 10 req/s; 2,000 requests of a
   ``shared_prefix`` mix with 5 % of prompt tokens shared, then 2,000 with 50 % shared: a workload of
   kind ``phases``), every policy of the scenario; TTFT before and after the shift, and how soon
   lodestar settles after it.

Usage::

    python scripts/lodestar_eval.py [--scenarios a.yaml,b.yaml] [--json out/lodestar/eval.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from isthmus.policies.lodestar import LodestarPolicy
from isthmus.sim.learning_curve import plot_learning_curves, rolling_mean, tail_level, time_to_within
from isthmus.sim.metrics import SimResult
from isthmus.sim.scenario import load_scenario
from isthmus.sim.simulator import Simulation

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCENARIOS = ("lodestar_homogeneous", "lodestar_heterogeneous", "lodestar_multiregion")
WINDOW_S = 120.0


def _summary(res: SimResult, sel: np.ndarray | None = None) -> dict[str, float]:
    y = res.ttft_s if sel is None else res.ttft_s[sel]
    return {"mean_s": float(y.mean()), "p99_s": float(np.percentile(y, 99)), "n": int(y.size)}


def _run(sim: Simulation) -> tuple[SimResult, Any, float]:
    t0 = time.perf_counter()
    res = sim.run()
    return res, sim.policy, time.perf_counter() - t0


def _settle(res: SimResult, pol: LodestarPolicy, base: SimResult | None, start_s: float,
            end_s: float | None = None) -> dict[str, float]:
    """Converged level and time to come within 5 % of it, after ``start_s``."""
    a, y = res.arrival_s, res.ttft_s
    sel = a >= start_s
    if end_s is not None:
        sel &= a <= end_s
    level = tail_level(a[sel], y[sel])
    t, m = rolling_mean(a[sel], y[sel], WINDOW_S)
    first_fit = pol.fit_log[0][0] if pol.fit_log else math.nan
    fit_after = [f for f, _ in pol.fit_log if f >= start_s]
    after = fit_after[0] if fit_after else start_s
    out = {"level_s": level, "first_fit_s": first_fit, "within_5pct_at_s": time_to_within(t, m, level, 0.05, after)}
    if base is not None:
        # ratio to the baseline on the same arrivals: load noise cancels
        bsel = base.arrival_s >= start_s
        if end_s is not None:
            bsel &= base.arrival_s <= end_s
        tb, mb = rolling_mean(base.arrival_s[bsel], base.ttft_s[bsel], WINDOW_S)
        n = min(t.size, tb.size)
        ratio = m[:n] / mb[:n]
        tail = ratio[int(n * 0.75):]
        r_level = float(np.nanmean(tail)) if tail.size else math.nan
        out["ratio_level"] = r_level
        out["ratio_within_5pct_at_s"] = time_to_within(t[:n], ratio, r_level, 0.05, after)
    return out


def curves(paths: list[Path], img_dir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for path in paths:
        sc = load_scenario(path)
        labels = ["preble"] + [p.key for p in sc.config.policies if p.name == "lodestar"]
        runs: dict[str, tuple[SimResult, Any, float]] = {}
        for label in labels:
            runs[label] = _run(sc.simulation(label))
            print(f"{sc.name}: {label} {runs[label][2]:.1f} s wall")
        base = runs["preble"][0]
        entry: dict[str, Any] = {}
        marks: list[tuple[float, str]] = []
        for label, (res, pol, wall) in runs.items():
            e: dict[str, Any] = {**_summary(res), "wall_s": wall}
            if isinstance(pol, LodestarPolicy):
                e.update(_settle(res, pol, base, 0.0))
                e["stats"] = dict(pol.stats)
                if pol.fit_log and not marks:
                    marks.append((pol.fit_log[0][0], "first fit"))
            entry[label] = e
        plot_learning_curves({k: rolling_mean(r.arrival_s, r.ttft_s, WINDOW_S) for k, (r, _, _) in runs.items()},
                             img_dir / f"lodestar_curve_{sc.name}.png", title=f"{sc.name}: rolling mean TTFT",
                             marks=marks, window_s=WINDOW_S)
        report[sc.name] = entry
    return report


def shift(img_dir: Path) -> dict[str, Any]:
    sc = load_scenario(ROOT / "scenarios" / "lodestar_shift.yaml")
    seed = sc.config.seed
    first = sc.config.workload.phases[0].limit
    assert first is not None
    start = next(r.arrival for k, r in enumerate(sc.requests(seed)) if k == first)  # phase 2's first request
    runs: dict[str, tuple[SimResult, Any, float]] = {}
    for label in (p.key for p in sc.config.policies):
        runs[label] = _run(sc.simulation(label, seed))
        print(f"shift: {label} {runs[label][2]:.1f} s wall")
    base = runs["preble"][0]
    report: dict[str, Any] = {"shift_at_s": start}
    for label, (res, pol, wall) in runs.items():
        before = res.arrival_s < start
        e: dict[str, Any] = {"before": _summary(res, before), "after": _summary(res, ~before), "wall_s": wall,
                             "all": _summary(res)}
        if isinstance(pol, LodestarPolicy):
            e["settle_after_shift"] = _settle(res, pol, base, start)
            e["stats"] = dict(pol.stats)
            e["fits_at_s"] = [round(f, 1) for f, _ in pol.fit_log]
        report[label] = e
    plot_learning_curves({k: rolling_mean(r.arrival_s, r.ttft_s, 30.0) for k, (r, _, _) in runs.items()
                          if k in ("least_load", "preble", "gorgo_proxy", "lodestar", "lodestar_nokv")},
                         img_dir / "lodestar_curve_shift.png",
                         title="shift from 5 % to 50 % shared prefix, 8 x A30, 10 req/s",
                         marks=[(start, "shift 5 % -> 50 %")], window_s=30.0)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(f"scenarios/{s}.yaml" for s in DEFAULT_SCENARIOS))
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "lodestar" / "eval.json")
    ap.add_argument("--no-shift", action="store_true")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.scenarios.split(",") if p]
    report = {"curves": curves(paths, args.img_dir)}
    if not args.no_shift:
        report["shift"] = shift(args.img_dir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
