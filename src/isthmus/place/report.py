"""What ``isthmus place`` prints and writes: tables, the JSON document and the coverage picture.

The JSON document (keys may be added, never renamed)::

    {"config": name, "source": path, "seed": int,
     "instance": {"blocks", "block_gb", "cache_mb_per_block_session", "input_tokens", "output_tokens",
                  "concurrent_sessions", "concurrent_sessions_auto", "rate_rps", "sessions", "router",
                  "servers": [{"name", "type", "site", "memory_gb", "decode_ms_per_block",
                               "prefill_ms_per_block"}],
                  "clients": [{"name", "site", "weight"}]},
     "algorithms": [{"name", "status", "message", "wall_s",
                     "placement": [{"server", "type", "site", "first_block", "last_block", "blocks",
                                    "cache_slots"}],          # servers holding blocks only
                     "routes": [{"client", "servers", "blocks", "sessions"}],   # distinct chains
                     "predicted": {"session_s", "time_per_token_s", "decode_per_token_s", "ttft_s"},
                     "simulated": {"sessions", "time_per_token_s", "ttft_s": {"mean", "p50", "p90", "p99"},
                                   "decode_per_token_s", "wait_s", "waited_share", "retries_mean",
                                   "hops_mean", "max_concurrent"},
                     "details": {...}}]}              # theorem2 / milp / local_search / PETALS' figures

Times in seconds.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich import box
from rich.table import Table

from isthmus.place.model import blocks_used
from isthmus.place.run import AlgorithmRun, PlaceRun


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, non-finite floats to ``None``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def algorithm_record(run: PlaceRun, res: AlgorithmRun) -> dict[str, Any]:
    """The JSON record of one algorithm."""
    inst = run.setup.instance
    placement_rows: list[dict[str, Any]] = []
    route_rows: list[dict[str, Any]] = []
    if res.placement is not None:
        p = res.placement
        for j in np.flatnonzero(p.used):
            placement_rows.append({"server": inst.server_names[j], "type": inst.server_kinds[j],
                                   "site": inst.server_sites[j], "first_block": int(p.start[j]),
                                   "last_block": int(p.end[j]), "blocks": int(p.count[j]),
                                   "cache_slots": int(p.cache_slots[j])})
        for (client, servers), count in sorted(Counter((r.client, r.servers) for r in res.routes).items()):
            route_rows.append({"client": inst.client_names[client], "servers": [inst.server_names[j] for j in servers],
                               "blocks": blocks_used(p, servers), "sessions": count})
    return _plain({"name": res.name, "status": res.status, "message": res.message, "wall_s": res.wall_s,
                   "placement": placement_rows, "routes": route_rows, "predicted": res.predicted,
                   "simulated": res.simulated, "details": res.details})


def run_document(run: PlaceRun) -> dict[str, Any]:
    """The whole JSON document of a run (see the module docstring)."""
    setup = run.setup
    inst, cfg = setup.instance, setup.config
    servers = [{"name": inst.server_names[j], "type": inst.server_kinds[j], "site": inst.server_sites[j],
                "memory_gb": float(inst.memory_bytes[j]) / 1e9,
                "decode_ms_per_block": float(inst.decode_s_per_block[j]) * 1e3,
                "prefill_ms_per_block": float(inst.prefill_s_per_block[j]) * 1e3} for j in range(inst.n_servers)]
    clients = [{"name": inst.client_names[c], "site": inst.client_sites[c], "weight": float(inst.client_weights[c])}
               for c in range(inst.n_clients)]
    return _plain({
        "config": cfg.name,
        "source": None if setup.source is None else str(setup.source),
        "seed": run.seed,
        "instance": {"blocks": inst.blocks, "block_gb": inst.model.block_bytes / 1e9,
                     "cache_mb_per_block_session": inst.cache_bytes / 1e6, "input_tokens": inst.input_tokens,
                     "output_tokens": inst.output_tokens, "concurrent_sessions": run.sessions,
                     "concurrent_sessions_auto": run.sessions_auto, "rate_rps": cfg.workload.rate_rps,
                     "sessions": cfg.workload.sessions, "router": cfg.router, "servers": servers, "clients": clients},
        "algorithms": [algorithm_record(run, r) for r in run.results],
    })


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` indented, keys sorted, through a temporary file and a rename (never half-written)."""
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------- terminal
def _s(v: Any, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.{digits}f}"


def header_line(run: PlaceRun) -> str:
    """One line describing the instance."""
    inst, cfg = run.setup.instance, run.setup.config
    kinds = Counter(inst.server_kinds)
    fleet = ", ".join(f"{n} × {k}" for k, n in kinds.items())
    how = "auto" if run.sessions_auto else "given"
    return (f"{cfg.name}: {inst.model.name}, {inst.blocks} blocks of {inst.model.block_bytes / 1e9:.2f} GB; {fleet}; "
            f"{inst.n_clients} client(s); l_I = {inst.input_tokens}, l = {inst.output_tokens}; "
            f"{cfg.workload.rate_rps:g} req/s, {cfg.workload.sessions} sessions (seed {run.seed}); "
            f"provisioned for |R| = {run.sessions} concurrent ({how}); cache {inst.cache_bytes / 1e6:.2f} MB per "
            f"block per session")


def placement_table(run: PlaceRun, res: AlgorithmRun) -> Table:
    """Server -> blocks for one algorithm, and the distinct chains in the caption."""
    rec = algorithm_record(run, res)
    t = Table(title=f"[bold]{res.name}[/bold]: placement", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("server", "left"), ("type", "left"), ("site", "left"), ("blocks", "right"),
                          ("count", "right"), ("cache slots", "right")):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rec["placement"]:
        t.add_row(row["server"], row["type"], row["site"], f"{row['first_block']}–{row['last_block']}",
                  str(row["blocks"]), f"{row['cache_slots']:,}")
    chains = [f"{r['client']}: " + " → ".join(f"{s}[{k}]" for s, k in zip(r["servers"], r["blocks"], strict=True))
              + f" × {r['sessions']}" for r in rec["routes"]]
    if chains:
        t.caption = "chains (blocks processed at each server) × sessions:\n" + "\n".join(chains[:12]) + (
            f"\n... {len(chains) - 12} more" if len(chains) > 12 else "")
        t.caption_justify = "left"
    return t


def detail_lines(res: AlgorithmRun) -> list[str]:
    """Algorithm-specific figures, one line each."""
    d = res.details
    lines = []
    if "theorem2" in d:
        th = d["theorem2"]
        lines.append(f"Theorem 2: mean per-token time {th['per_token_s']:.4f} s, bound {th['per_token_bound_s']:.4f} s "
                     f"(first {th['covering_servers']} servers placed); mean session time {th['session_s']:.3f} s, "
                     f"bound {th['session_bound_s']:.3f} s")
    if "local_search" in d:
        ls = d["local_search"]
        lines.append(f"CG-BPRR improved: mean session time {ls['initial_session_s']:.3f} s; with cache reserved for "
                     f"{ls['reserved_sessions']} sessions {ls['reserved_session_s']:.3f} s; after local search "
                     f"{ls['session_s']:.3f} s ({100 * ls['improvement']:.1f} % lower, {ls['moves']} moves, "
                     f"{ls['evaluations']} evaluations)")
    if "milp" in d:
        m = d["milp"]
        lines.append(f"MILP: {m['status']}, mean session time {_s(m['objective_session_s'])} s, lower bound "
                     f"{_s(m['dual_bound_session_s'])} s, gap {_s(None if m['gap'] is None else 100 * m['gap'], 2)} %, "
                     f"{m['variables']:,} variables, {m['constraints']:,} constraints, {m['solver_wall_s']:.1f} s")
    if "sessions_without_cache" in d:
        lines.append(f"PETALS: {d['sessions_without_cache']} of the provisioned sessions find no free cache on their "
                     f"chain; join order {', '.join(d['join_order'])}")
    if res.message:
        lines.append(f"{res.status}: {res.message}")
    return lines


def comparison_table(run: PlaceRun) -> Table:
    """Predicted and simulated time per token, first-token time and waits per algorithm."""
    base = next((r.simulated["time_per_token_s"] for r in run.results if r.name == "petals" and r.simulated), None)
    t = Table(title="[bold]algorithms compared[/bold] (seconds; time per token = session time / l, waits included)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("algorithm", "status", "servers", "hops", "predicted s/token", "simulated s/token", "vs PETALS",
                 "TTFT mean", "TTFT p99", "waited", "decide s"):
        t.add_column(name, justify="left" if name in ("algorithm", "status") else "right", no_wrap=True)
    for r in run.results:
        sim, pred = r.simulated, r.predicted
        vs = "—"
        if base and sim:
            vs = f"{100 * (sim['time_per_token_s'] / base - 1):+.1f} %"
        t.add_row(r.name, r.status, "—" if r.placement is None else str(int(r.placement.used.sum())),
                  _s(sim and sim["hops_mean"], 2), _s(pred and pred["time_per_token_s"]),
                  _s(sim and sim["time_per_token_s"]), vs, _s(sim and sim["ttft_s"]["mean"], 2),
                  _s(sim and sim["ttft_s"]["p99"], 2), "—" if not sim else f"{100 * sim['waited_share']:.0f} %",
                  f"{r.wall_s:.2f}")
    return t
