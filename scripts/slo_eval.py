"""Evaluate SLO- and cost-aware routing on ``scenarios/slo_multiregion.yaml``.

Two sweeps, each an ordinary :func:`isthmus.sim.sweep.run_sweep` (deterministic cells, any number of
workers gives the same figures):

1. load: every policy of the scenario at each rate of ``--rates`` (req/s), over ``--seeds``;
2. the alpha curve: ``slo`` with ``alpha`` from ``--alphas`` (seconds per US dollar) at
   ``--alpha-rate`` req/s, over the same seeds.

Prints markdown tables (SLO attainment per class, goodput, rejected, $ per million tokens, the
estimator's error, the relative attainment gain over the FIFO baselines), writes every cell as JSON to
``--json`` (default ``out/slo_eval.json``) and, with matplotlib, the figures to ``--plot-dir``
(``slo_attainment.png``, ``slo_alpha.png``).

    python scripts/slo_eval.py                       # the figures of docs/results.md, "SLOs and cost across regions"
    python scripts/slo_eval.py --rates 20,30 --seeds 0 --alphas 0,10000   # a quick look
    python scripts/slo_eval.py --from-json out/slo_eval.json   # the tables again, no simulation
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from isthmus.sim.report import dumps_report, write_atomic
from isthmus.sim.scenario import PolicyConfig, Scenario, load_scenario
from isthmus.sim.sweep import SweepGrid, run_sweep

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("least_load", "gorgo_proxy")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _get(rec: Mapping[str, Any], *path: str) -> float:
    cur: Any = rec
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return math.nan
        cur = cur[key]
    return float(cur) if isinstance(cur, int | float) and cur is not None else math.nan


def aggregate(cells: Sequence[Mapping[str, Any]], key: str) -> dict[tuple[str, float], dict[str, float]]:
    """Per (policy label, ``key`` value): the headline figures averaged over seeds."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for c in cells:
        if "error" in c:
            raise SystemExit(f"cell failed: {c}")
        groups.setdefault((str(c["policy"]), float(c[key])), []).append(c)
    out: dict[tuple[str, float], dict[str, float]] = {}
    for k, recs in groups.items():
        classes = sorted(recs[0]["slo"]["classes"])
        row = {
            "seeds": float(len(recs)),
            "attainment": _mean([_get(r, "slo", "attainment") for r in recs]),
            "goodput_rps": _mean([_get(r, "slo", "goodput_rps") for r in recs]),
            "rejected_share": _mean([_get(r, "slo", "rejected") / _get(r, "slo", "requests") for r in recs]),
            "usd_per_mtok": _mean([_get(r, "cost", "usd_per_mtok") for r in recs]),
            "usd_per_mtok_busy": _mean([_get(r, "cost", "usd_per_mtok_busy") for r in recs]),
            "usd_per_good_mtok": _mean([_get(r, "cost", "usd_per_good_mtok") for r in recs]),
            "egress_usd": _mean([_get(r, "cost", "egress_usd") for r in recs]),
            "ttft_p99_s": _mean([_get(r, "ttft_s", "p99") for r in recs]),
            "ttft_abs_err_s": _mean([_get(r, "estimator", "ttft", "abs_err_s", "mean") for r in recs]),
            "ttft_rel_err_p50": _mean([_get(r, "estimator", "ttft", "rel_err", "p50") for r in recs]),
            "ttft_bias_s": _mean([_get(r, "estimator", "ttft", "bias_s") for r in recs]),
            "tpot_rel_err_p50": _mean([_get(r, "estimator", "tpot", "rel_err", "p50") for r in recs]),
            "e2e_abs_err_s": _mean([_get(r, "estimator", "e2e", "abs_err_s", "mean") for r in recs]),
            "e2e_rel_err_p50": _mean([_get(r, "estimator", "e2e", "rel_err", "p50") for r in recs]),
        }
        for name in classes:
            row[f"attainment_{name}"] = _mean([_get(r, "slo", "classes", name, "attainment") for r in recs])
            row[f"ttft_bias_s_{name}"] = _mean([_get(r, "estimator", "per_class", name, "ttft", "bias_s") for r in recs])
            row[f"ttft_abs_err_s_{name}"] = _mean([_get(r, "estimator", "per_class", name, "ttft", "abs_err_s", "mean")
                                                   for r in recs])
        out[k] = row
    return out


def _pct(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{100 * v:.1f} %"


def _num(v: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(v) else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def load_tables(agg: Mapping[tuple[str, float], Mapping[str, float]], policies: Sequence[str],
                rates: Sequence[float]) -> str:
    out = []
    classes = sorted(k.removeprefix("attainment_") for k in next(iter(agg.values())) if k.startswith("attainment_"))
    rows = [[p, *(_pct(agg[(p, r)]["attainment"]) for r in rates)] for p in policies]
    out.append("SLO attainment (all classes; a rejected request misses)\n\n"
               + _table(["policy", *(f"{r:g} req/s" for r in rates)], rows))
    for name in classes:
        rows = [[p, *(_pct(agg[(p, r)][f"attainment_{name}"]) for r in rates)] for p in policies]
        out.append(f"SLO attainment of class {name}\n\n" + _table(["policy", *(f"{r:g}" for r in rates)], rows))
    rows = [[p, *(_num(agg[(p, r)]["goodput_rps"], 2) for r in rates)] for p in policies]
    out.append("goodput (requests meeting their SLO per second)\n\n" + _table(["policy", *(f"{r:g}" for r in rates)], rows))
    rows = [[p, *(_pct(agg[(p, r)]["rejected_share"]) for r in rates)] for p in policies]
    out.append("rejected (share of requests)\n\n" + _table(["policy", *(f"{r:g}" for r in rates)], rows))
    rows = [[p, *(f"{_num(agg[(p, r)]['usd_per_mtok'], 4)} / {_num(agg[(p, r)]['usd_per_mtok_busy'], 4)}"
                  for r in rates)] for p in policies]
    out.append("US dollars per million tokens: fleet (provisioned GPU hours) / busy GPU time (+ egress in both)\n\n"
               + _table(["policy", *(f"{r:g}" for r in rates)], rows))
    rows = [[p, *(_num(agg[(p, r)]["usd_per_good_mtok"], 4) for r in rates)] for p in policies]
    out.append("US dollars (fleet) per million tokens of requests that met their SLO\n\n"
               + _table(["policy", *(f"{r:g}" for r in rates)], rows))
    for base in BASELINES:
        if base not in policies:
            continue
        rows = []
        for p in policies:
            if p in BASELINES:
                continue
            cells = []
            for r in rates:
                b, a = agg[(base, r)]["attainment"], agg[(p, r)]["attainment"]
                cells.append("—" if not b > 0 else f"{100 * (a / b - 1):+.0f} %")
            rows.append([p, *cells])
        out.append(f"relative SLO attainment gain over {base} (FIFO)\n\n"
                   + _table(["policy", *(f"{r:g}" for r in rates)], rows))
    est = [p for p in policies if math.isfinite(agg[(p, rates[0])]["ttft_abs_err_s"])]
    rows = [[p, f"{r:g}", _num(agg[(p, r)]["ttft_abs_err_s"] * 1e3, 0), _pct(agg[(p, r)]["ttft_rel_err_p50"]),
             _num(agg[(p, r)]["ttft_bias_s"] * 1e3, 0), _pct(agg[(p, r)]["tpot_rel_err_p50"]),
             _num(agg[(p, r)]["e2e_abs_err_s"], 2), _pct(agg[(p, r)]["e2e_rel_err_p50"])]
            for p in est for r in rates]
    out.append("estimator error against the simulated outcome\n\n" + _table(
        ["policy", "req/s", "TTFT mean abs (ms)", "TTFT median rel", "TTFT bias (ms)", "TPOT median rel",
         "E2E mean abs (s)", "E2E median rel"], rows))
    rows = [[p, f"{r:g}", *(f"{_num(agg[(p, r)][f'ttft_abs_err_s_{c}'] * 1e3, 0)} / "
                            f"{_num(agg[(p, r)][f'ttft_bias_s_{c}'] * 1e3, 0)}" for c in classes)]
            for p in est for r in rates]
    out.append("TTFT estimator error per class: mean absolute / bias (ms)\n\n"
               + _table(["policy", "req/s", *classes], rows))
    return "\n\n".join(out)


def alpha_table(agg: Mapping[tuple[str, float], Mapping[str, float]], labels: Sequence[tuple[str, float]],
                rate: float) -> str:
    rows = [[f"{a:g}", _pct(agg[(lab, rate)]["attainment"]), _num(agg[(lab, rate)]["goodput_rps"], 2),
             _num(agg[(lab, rate)]["usd_per_mtok_busy"], 4), _num(agg[(lab, rate)]["usd_per_mtok"], 4),
             _num(agg[(lab, rate)]["egress_usd"], 5)] for lab, a in labels]
    return (f"the alpha curve: slo at {rate:g} req/s\n\n"
            + _table(["alpha (s per $)", "SLO attainment", "goodput (req/s)", "$ / M tokens (busy)",
                      "$ / M tokens (fleet)", "egress $"], rows))


def plot(agg: Mapping[tuple[str, float], Mapping[str, float]], policies: Sequence[str], rates: Sequence[float],
         alpha_agg: Mapping[tuple[str, float], Mapping[str, float]], alpha_labels: Sequence[tuple[str, float]],
         alpha_rate: float, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p in policies:
        axes[0].plot(rates, [100 * agg[(p, r)]["attainment"] for r in rates], marker="o", label=p)
        axes[1].plot(rates, [agg[(p, r)]["goodput_rps"] for r in rates], marker="o", label=p)
    axes[0].set(xlabel="offered load (req/s)", ylabel="SLO attainment (%)", title="SLO attainment")
    axes[1].set(xlabel="offered load (req/s)", ylabel="goodput (req/s)", title="goodput")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    first = out_dir / "slo_attainment.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [alpha_agg[(lab, alpha_rate)]["usd_per_mtok_busy"] for lab, _ in alpha_labels]
    ys = [100 * alpha_agg[(lab, alpha_rate)]["attainment"] for lab, _ in alpha_labels]
    ax.plot(xs, ys, marker="o")
    for (_, a), x, y in zip(alpha_labels, xs, ys, strict=True):
        ax.annotate(f"α={a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="$ per million tokens (busy GPU time + egress)", ylabel="SLO attainment (%)",
           title=f"cost–attainment over α (slo, {alpha_rate:g} req/s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    second = out_dir / "slo_alpha.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "slo_multiregion.yaml")
    ap.add_argument("--rates", default="10,15,20,25,30,35,40", help="load sweep, req/s")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alphas", default="0,1000,3000,10000,30000,100000,1000000", help="seconds per US dollar")
    ap.add_argument("--alpha-rate", type=float, default=25.0, help="load of the alpha curve, req/s")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", type=Path, default=REPO / "out" / "slo_eval.json")
    ap.add_argument("--plot-dir", type=Path, default=None, help="write slo_attainment.png and slo_alpha.png here")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the tables (and plots) of a file this script wrote, without simulating")
    args = ap.parse_args()

    if args.from_json is not None:
        doc = orjson.loads(args.from_json.read_bytes())
        load_cells, alpha_cells = doc["load"]["cells"], doc["alpha"]["cells"]
        policies = list(doc["load"]["grid"]["policies"])
        rates = [float(r) for r in doc["load"]["grid"]["rates_rps"]]
        alpha_rate = float(doc["alpha_rate_rps"])
        labels = [(lab, float(a)) for lab, a in doc["alphas"]]
        head = f"# {doc['scenario']}: seeds {doc['load']['grid']['seeds']} (from {args.from_json})"
    else:
        sc: Scenario = load_scenario(args.scenario)
        policies = [p.key for p in sc.config.policies]
        rates = _floats(args.rates)
        alpha_rate = args.alpha_rate
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        t0 = time.perf_counter()
        load = run_sweep(sc, SweepGrid(tuple(policies), tuple(rates), (1.0,), seeds), workers=args.workers)
        labels = [(f"slo_alpha_{a:g}", a) for a in _floats(args.alphas)]
        extra = tuple(PolicyConfig(name="slo", label=lab, params={"alpha": a}) for lab, a in labels)
        sc_alpha = dataclasses.replace(sc, config=sc.config.model_copy(update={"policies": extra}))
        curve = run_sweep(sc_alpha, SweepGrid(tuple(lab for lab, _ in labels), (alpha_rate,), (1.0,), seeds),
                          workers=args.workers)
        load_cells, alpha_cells = list(load.records), list(curve.records)
        head = (f"# {sc.name}: seeds {list(seeds)}, {len(load_cells) + len(alpha_cells)} runs in "
                f"{time.perf_counter() - t0:.0f} s")
        doc = {"scenario": sc.name, "load": load.document(), "alpha": curve.document(),
               "alpha_rate_rps": alpha_rate, "alphas": [[lab, a] for lab, a in labels]}
        write_atomic(args.json, dumps_report(doc))
    agg = aggregate(load_cells, "rate_rps")
    alpha_agg = aggregate(alpha_cells, "rate_rps")
    print(head + "\n")
    print(load_tables(agg, policies, rates))
    print()
    print(alpha_table(alpha_agg, labels, alpha_rate))
    if args.from_json is None:
        print(f"\nwrote {args.json}")
    if args.plot_dir is not None:
        for path in plot(agg, policies, rates, alpha_agg, labels, alpha_rate, args.plot_dir):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
