"""Reproduce the placement results of Sun, He, Ji and Parag (arXiv 2512.21884) with ``isthmus place``,
and measure how much a local search and the MILP improve on CG-BPRR (docs/results.md, "Placement
for pipelined inference (isthmus place)").

1. The paper's settings: the clustered deployment of 9 servers (2 A100 + 7 MIG; client in each of
   the three clusters) and of 26 (5 + 21; client in cluster0), and 9 random servers on AboveNet,
   BellCanada and GTS-CE; each at l ∈ {64, 128} output tokens and 0.1 / 0.5 sessions/s, over
   ``--seeds`` runs (arrivals, PETALS' join order and, on the Topology Zoo networks, the servers'
   nodes change with the run). Per cell: mean simulated time per token of PETALS, CG-BPRR (with
   WS-RR online) and the MILP's placement (first run only, with its status), the reduction against
   PETALS, and the same pair with the fixed per-session allocation delays the authors' simulator adds
   (250 s for PETALS, 60 s for theirs; added as ``delay / l`` per token, i.e. without the extra waiting
   that longer sessions would cause).
2. Improvements on CG-BPRR: CG-BPRR, CG-BPRR with the reservation search and local search
   (``cg_bprr_ls``) and the MILP bounded by CG-BPRR's value (``milp_cg``), offline (mean session time of
   the provisioned sessions) and simulated, on the paper's settings and on heavier loads.

Prints the tables (markdown) and writes every record as JSON.

Usage::

    python scripts/place_reproduce.py [--seeds 5] [--milp-time-limit 60] [--json out/place/reproduce.json]
    python scripts/place_reproduce.py --tables-from out/place/reproduce.json   # the tables again, no runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from isthmus.place.config import PlaceSetup, build_setup, load_config
from isthmus.place.run import AlgorithmRun, run_setup

ROOT = Path(__file__).resolve().parent.parent
PLACE = ROOT / "scenarios" / "place"

SETTINGS: tuple[tuple[str, str | None, str], ...] = (
    ("clustered_9", "cluster0", "clustered, 9 servers, client in cluster0"),
    ("clustered_9", "cluster1", "clustered, 9 servers, client in cluster1 (A100s)"),
    ("clustered_9", "cluster2", "clustered, 9 servers, client in cluster2 (MIGs)"),
    ("clustered_26", "cluster0", "clustered, 26 servers, client in cluster0"),
    ("abovenet", None, "AboveNet, 9 servers"),
    ("bellcanada", None, "BellCanada, 9 servers"),
    ("gtsce", None, "GTS-CE, 9 servers"),
)
GRID = ((0.1, 64), (0.1, 128), (0.5, 64), (0.5, 128))
HEAVY = (("clustered_9", "cluster0", 2.0, 128), ("clustered_26", "cluster0", 1.0, 128),
         ("clustered_26", "cluster0", 2.0, 128), ("tiny", None, 0.05, 128))
PAPER_DELAYS_MS = {"petals": 250_000.0, "cg_bprr": 60_000.0}
"""Per-session allocation delays of the authors' online simulator (test_general_case_online.m)."""

# The paper's Tables III and VI (s per token) at (0.1, 64), (0.1, 128), (0.5, 64), (0.5, 128), as
# printed: Table III gives the testbed's figure with the authors' simulator's in parentheses.
PAPER: dict[tuple[str, str | None], dict[str, tuple[str, ...]]] = {
    ("clustered_9", "cluster0"): {"petals": ("6.23 (5.33)", "4.76 (4.74)", "6.28 (5.33)", "5.14 (4.74)"),
                                  "proposed": ("1.92 (1.59)", "1.43 (0.92)", "2.00 (1.59)", "1.34 (0.92)")},
    ("clustered_9", "cluster1"): {"petals": ("5.44 (5.17)", "4.60 (4.58)", "5.56 (5.17)", "4.79 (4.58)"),
                                  "proposed": ("1.78 (1.65)", "1.04 (0.83)", "1.88 (1.65)", "1.11 (0.83)")},
    ("clustered_9", "cluster2"): {"petals": ("5.30 (4.85)", "4.85 (4.07)", "5.34 (4.85)", "5.25 (4.07)"),
                                  "proposed": ("1.79 (1.59)", "1.31 (0.92)", "1.94 (1.59)", "1.37 (0.92)")},
    ("abovenet", None): {"petals": ("4.98 (4.75)", "4.03 (3.88)", "5.26 (5.11)", "4.58 (4.10)"),
                         "proposed": ("1.86 (1.63)", "1.44 (1.36)", "1.97 (1.83)", "1.35 (1.05)")},
    ("bellcanada", None): {"petals": ("6.31 (6.03)", "3.82 (3.49)", "6.74 (6.19)", "4.16 (3.41)"),
                           "proposed": ("1.33 (1.41)", "1.26 (0.92)", "1.49 (1.41)", "1.11 (0.92)")},
    ("gtsce", None): {"petals": ("7.05 (6.12)", "4.69 (3.47)", "6.89 (5.97)", "4.89 (3.37)"),
                      "proposed": ("1.38 (1.41)", "0.95 (0.91)", "1.35 (1.40)", "1.07 (0.91)")},
}


def variant(name: str, client: str | None, rate: float, tokens: int, seed: int, milp_limit: float) -> PlaceSetup:
    """The bundled config ``name`` with another load, output length, seed or client site."""
    path = PLACE / f"{name}.yaml"
    cfg = load_config(path).config
    update: dict[str, Any] = {
        "workload": cfg.workload.model_copy(update={"rate_rps": rate, "output_tokens": tokens, "seed": seed}),
        "petals": cfg.petals.model_copy(update={"seed": seed}),
        "milp": cfg.milp.model_copy(update={"time_limit_s": milp_limit}),
    }
    if client is not None:
        update["clients"] = [c.model_copy(update={"at": client}) for c in cfg.clients]
    if cfg.sites is not None:
        update["sites"] = cfg.sites.model_copy(update={"seed": seed})
    return build_setup(cfg.model_copy(update=update), path.parent, path)


def record(res: AlgorithmRun) -> dict[str, Any]:
    sim, pred = res.simulated or {}, res.predicted or {}
    milp = res.details.get("milp", {})
    ls = res.details.get("local_search", {})
    return {"status": res.status, "message": res.message, "wall_s": res.wall_s,
            "sim_time_per_token_s": sim.get("time_per_token_s"), "sim_ttft_s": (sim.get("ttft_s") or {}).get("mean"),
            "waited_share": sim.get("waited_share"), "hops": sim.get("hops_mean"),
            "pred_session_s": pred.get("session_s"), "pred_time_per_token_s": pred.get("time_per_token_s"),
            "milp_gap": milp.get("gap"), "milp_bound_session_s": milp.get("dual_bound_session_s"),
            "milp_session_s": milp.get("objective_session_s"), "reserved_sessions": ls.get("reserved_sessions"),
            "cg_session_s": ls.get("initial_session_s"), "improved_session_s": ls.get("session_s")}


def one_run(setup: PlaceSetup, algorithms: list[str]) -> tuple[int, dict[str, dict[str, Any]]]:
    run = run_setup(setup, algorithms)
    return run.sessions, {r.name: record(r) for r in run.results}


def mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(got) if got else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def pct(new: float | None, base: float | None, digits: int = 0) -> str:
    if new is None or not base:
        return "—"
    change = round(100 * (new / base - 1), digits)
    return f"{change + 0.0:+.{digits}f} %"  # + 0.0: no "-0"


def label_of(cell: dict[str, Any]) -> str:
    for name, client, label in SETTINGS:
        if (name, client) == (cell["setting"], cell["client"]):
            return label
    return f"{cell['setting']}{'' if cell['client'] is None else ', client in ' + cell['client']}"


def milp_text(milp: dict[str, Any], base: float | None) -> str:
    """The MILP's offline value as a change from ``base`` (CG-BPRR's, same run), with its status."""
    if milp["milp_session_s"] is None:
        return f"— ({milp['status']})"
    gap = f", gap {100 * milp['milp_gap']:.1f} %" if milp["status"] == "time_limit" and milp["milp_gap"] is not None else ""
    return f"{pct(milp['milp_session_s'], base, 1)} ({milp['status']}{gap})"


def paper_table(doc: dict[str, Any]) -> list[str]:
    out = [f"## Paper settings ({doc['seeds']} runs per cell; s per token, simulated, waits included)", "",
           "| setting | l | req/s | \\|R\\| | paper PETALS | paper proposed | PETALS | CG-BPRR | vs PETALS "
           "| MILP vs CG-BPRR, offline (run 0) | + the authors' allocation delays: PETALS / CG-BPRR / vs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in doc["paper_settings"]:
        runs, sessions, tokens = cell["runs"], cell["concurrent_sessions"], cell["output_tokens"]
        k = GRID.index((cell["rate_rps"], tokens))
        pet = mean([x["petals"]["sim_time_per_token_s"] for x in runs])
        cg = mean([x["cg_bprr"]["sim_time_per_token_s"] for x in runs])
        dp = None if pet is None else pet + PAPER_DELAYS_MS["petals"] / 1e3 / tokens
        dc = None if cg is None else cg + PAPER_DELAYS_MS["cg_bprr"] / 1e3 / tokens
        paper = PAPER.get((cell["setting"], cell["client"]), {})
        out.append(f"| {label_of(cell)} | {tokens} | {cell['rate_rps']:g} | {min(sessions)}–{max(sessions)} | "
                   f"{paper.get('petals', ('—',) * 4)[k]} | {paper.get('proposed', ('—',) * 4)[k]} | {fmt(pet, 3)} | "
                   f"{fmt(cg, 3)} | {pct(cg, pet)} | {milp_text(runs[0]['milp'], runs[0]['cg_bprr_ls']['cg_session_s'])} "
                   f"| {fmt(dp)} / {fmt(dc)} / {pct(dc, dp)} |")
    return out


def improvement_table(doc: dict[str, Any]) -> list[str]:
    out = ["## Improving on CG-BPRR (offline: mean session time of the |R| provisioned sessions, s; "
           "simulated: s per token)", "",
           "| setting | l | req/s | \\|R\\| | CG-BPRR | reservation + local search (R') | MILP ≤ CG-BPRR vs CG-BPRR "
           "(run 0) | sim CG-BPRR | sim improved | improvement (offline / simulated) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in doc["paper_settings"] + doc["heavier_loads"]:
        runs, sessions = cell["runs"], cell["concurrent_sessions"]
        cg_off = mean([x["cg_bprr_ls"]["cg_session_s"] for x in runs])
        ls_off = mean([x["cg_bprr_ls"]["improved_session_s"] for x in runs])
        reserve = sorted({x["cg_bprr_ls"]["reserved_sessions"] for x in runs})
        cg_sim = mean([x["cg_bprr"]["sim_time_per_token_s"] for x in runs])
        ls_sim = mean([x["cg_bprr_ls"]["sim_time_per_token_s"] for x in runs])
        out.append(f"| {label_of(cell)} | {cell['output_tokens']} | {cell['rate_rps']:g} | "
                   f"{min(sessions)}–{max(sessions)} | {fmt(cg_off)} | {fmt(ls_off)} "
                   f"({', '.join(str(v) for v in reserve)}) | "
                   f"{milp_text(runs[0]['milp_cg'], runs[0]['cg_bprr_ls']['cg_session_s'])} | {fmt(cg_sim, 3)} | "
                   f"{fmt(ls_sim, 3)} | {pct(ls_off, cg_off, 1)} / {pct(ls_sim, cg_sim, 1)} |")
    return out


def experiments(seeds: int, milp_limit: float) -> dict[str, Any]:
    """Every run of both tables; progress on stderr."""
    def cell(name: str, client: str | None, rate: float, tokens: int, algs: list[str],
             first_only: list[str]) -> dict[str, Any]:
        runs, sessions = [], []
        for seed in range(seeds):
            r, recs = one_run(variant(name, client, rate, tokens, seed, milp_limit),
                              algs + (first_only if seed == 0 else []))
            sessions.append(r)
            runs.append(recs)
        print(f"{name} {client or ''} l={tokens} {rate:g} req/s: done", file=sys.stderr, flush=True)
        return {"setting": name, "client": client, "rate_rps": rate, "output_tokens": tokens,
                "concurrent_sessions": sessions, "runs": runs}

    paper = [cell(name, client, rate, tokens, ["petals", "cg_bprr", "cg_bprr_ls"], ["milp", "milp_cg"])
             for name, client, _ in SETTINGS for rate, tokens in GRID]
    heavy = [cell(name, client, rate, tokens, ["cg_bprr", "cg_bprr_ls"], ["milp_cg"])
             for name, client, rate, tokens in HEAVY]
    return {"seeds": seeds, "milp_time_limit_s": milp_limit, "paper_settings": paper, "heavier_loads": heavy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="runs per cell (default 5)")
    ap.add_argument("--milp-time-limit", type=float, default=60.0, help="HiGHS time limit, s (default 60)")
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "place" / "reproduce.json")
    ap.add_argument("--tables-from", type=Path, metavar="FILE",
                    help="print the tables of an earlier run's JSON instead of running again")
    args = ap.parse_args()
    started = time.perf_counter()
    if args.tables_from is not None:
        doc = json.loads(args.tables_from.read_text())
    else:
        doc = experiments(args.seeds, args.milp_time_limit)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("\n".join([*paper_table(doc), "", *improvement_table(doc)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
