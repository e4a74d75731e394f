"""Central routers side by side on one testbed and one trace replay: isthmus, sglang-router, vllm-router.

For each router in ``--routers`` (and each of ``--repeats`` rounds, routers interleaved so that a
slow patch of the shared machine does not fall on one router only), starts the scenario's testbed
in proxy mode (:class:`isthmus.bench.testbed.Testbed`: one ``isthmus emulate`` engine double per
replica, the delay relays with the scenario's one-way latencies times ``--time-scale``) with that
router as the central proxy, replays the first ``--limit`` requests of the scenario's workload
through it with :func:`isthmus.bench.loadgen.run_bench` (open loop, each request sent from its
origin region's relay to the proxy), stops everything, and goes on to the next router:

- ``isthmus:POLICY``: ``isthmus serve`` with a policy of the scenario (``gorgo_proxy``, ``least_load``);
- ``sglang-router:POLICY`` and ``vllm-router:POLICY``: the pip-installable Rust routers, run as the
  testbed's external router (``router="external"``) with ``--worker-urls`` the relays to the
  replicas, every listener on 127.0.0.1 (``--host`` and ``--prometheus-host``); installed with pip
  into a virtual environment of their own (``--rust-venv``) on first use.

The external routers see none of isthmus's own inputs (the ``x-isthmus-origin`` header, the
scenario's RTTs, the engines' queues through ``/metrics``): they route on what they see themselves
(prompt text, their own in-flight counts). The client's region still matters to them as to
everyone: each request crosses the relay from its origin region to the proxy's region, and the
proxy's choice of replica costs the relay from the proxy's region to that replica's.

Reported per router (scenario seconds, statistics over completed requests): TTFT mean / p50 / p99,
TPOT mean, throughput (completed requests per scenario second, first arrival to last completion),
output tokens per second, errors and timeouts, the replicas' prefix-cache hit rate over the run,
the requests each replica served (from the engines' ``vllm:request_success_total``, since the
external routers add no ``x-isthmus-target`` header), the router's CPU seconds and the load
generator's send lag. Everything (engines, relays, router, load generator) shares this machine's
cores, so differences of a few per cent are noise: ``--repeats 2`` or more shows the spread.

Usage::

    python benchmarks/routers_side_by_side.py [--limit 300] [--time-scale 1.0] [--repeats 1]
        [--routers isthmus:gorgo_proxy,isthmus:least_load,sglang-router:cache_aware,...]
        [--json out/routers_side_by_side.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from _common import free_port

from isthmus.bench.loadgen import Manifest, run_bench
from isthmus.bench.testbed import Testbed, TestbedError, sigterm_raises

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROUTERS = ("isthmus:gorgo_proxy", "isthmus:least_load", "sglang-router:cache_aware",
                   "vllm-router:cache_aware", "vllm-router:round_robin")
RUST_PACKAGES = {"sglang-router": "sglang-router", "vllm-router": "vllm-router"}
PROXY_POLICY = "gorgo_proxy"
"""The scenario policy whose router set-up (proxy mode, proxy region) the external routers take."""


# ---------------------------------------------------------------------- the Rust routers
def rust_venv(venv: Path, names: list[str]) -> dict[str, Path | str]:
    """Entry points of the Rust routers ``names`` in ``venv`` (created and filled with pip on first
    use, as ``benchmarks/router_overhead.py`` does), else why not."""
    out: dict[str, Path | str] = {}
    if not names:
        return out
    if not (venv / "bin" / "pip").exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            return {n: f"cannot create {venv}: {made.stderr.strip()[-300:]}" for n in names}
    for name in names:
        exe = venv / "bin" / name
        if not exe.exists():
            print(f"installing {RUST_PACKAGES[name]} into {venv} ...", flush=True)
            done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", RUST_PACKAGES[name]],
                                  capture_output=True, text=True)
            if done.returncode != 0 or not exe.exists():
                out[name] = f"pip install {RUST_PACKAGES[name]} failed: {done.stderr.strip()[-300:]}"
                continue
        out[name] = exe
    return out


def package_version(python: Path, package: str) -> str:
    done = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def router_cmd(name: str, exe: Path, policy: str) -> str:
    """The testbed's external-router template ({host}, {port}, {workers}) for a Rust router."""
    common = (f"--host {{host}} --port {{port}} --worker-urls {{workers}} --policy {policy} "
              f"--prometheus-host {{host}} --prometheus-port {free_port()} --max-concurrent-requests 1024")
    if name == "sglang-router":
        return f"{exe} launch {common} --log-level warn"
    return f"{exe} {common} --log-level warning"


# ---------------------------------------------------------------------- measuring
_SUCCESS = re.compile(r"^vllm:request_success_total(?:\{[^}]*\})?\s+(\S+)", re.M)


def served_counts(replicas: list[dict[str, Any]]) -> dict[str, float]:
    """``vllm:request_success_total`` of every replica (summed over its labels), by replica id."""
    out: dict[str, float] = {}
    for rep in replicas:
        try:
            with urllib.request.urlopen(f"{rep['url']}/metrics", timeout=5) as resp:
                text = resp.read().decode(errors="replace")
            out[rep["id"]] = math.fsum(float(v) for v in _SUCCESS.findall(text))
        except OSError:
            out[rep["id"]] = math.nan
    return out


def cpu_s(pid: int) -> float:
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def one_run(scenario: Path, key: str, args: argparse.Namespace, exe: Path | None, log_dir: Path) -> dict[str, Any]:
    """Testbed with router ``key`` (``NAME:POLICY``), one replay, the figures; everything stopped."""
    name, policy = key.split(":", 1)
    if name == "isthmus":
        tb = Testbed(scenario, policy, time_scale=args.time_scale, log_dir=log_dir, seed=args.seed)
    else:
        assert exe is not None
        tb = Testbed(scenario, PROXY_POLICY, time_scale=args.time_scale, log_dir=log_dir, seed=args.seed,
                     router="external", router_cmd=router_cmd(name, exe, policy))
    with tb:
        manifest = tb.start()
        router_pid = int(manifest["routers"][0]["pid"])
        before = served_counts(manifest["replicas"])
        cpu0 = cpu_s(router_pid)
        result = run_bench(scenario, Manifest.from_dict(manifest), limit=args.limit, seed=args.seed, label=key,
                           timeout_s=args.timeout_s)
        router_cpu = cpu_s(router_pid) - cpu0
        after = served_counts(manifest["replicas"])
        failed = tb.failed()
    s = result.summary()
    return {
        "router": key, "startup_s": manifest.get("startup_s"), "requests": s["requests"], "completed": s["completed"],
        "errors": s["errors"], "timeouts": s["timeouts"], "error_kinds": s["error_kinds"],
        "ttft_s": s["ttft_s"], "tpot_s": s["tpot_s"], "e2e_s": s["e2e_s"],
        "throughput_rps": s["throughput_rps"], "output_tokens_per_s": s["output_tokens_per_s"],
        "prefix_hit_rate": s["prefix_hit_rate"],
        "served_by_replica": {r: after[r] - before.get(r, 0.0) for r in after},
        "router_cpu_s": router_cpu, "send_lag_wall_s": s["send_lag_s"], "wall_s": s["wall_s"],
        "children_exited": failed,
    }


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over repeats of the table's figures, with min and max where there are several runs."""
    def pick(r: dict[str, Any], path: tuple[str, ...]) -> float:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        return float(v) if isinstance(v, int | float) and v is not None else math.nan

    fields = {"ttft_mean_s": ("ttft_s", "mean"), "ttft_p50_s": ("ttft_s", "p50"), "ttft_p99_s": ("ttft_s", "p99"),
              "tpot_mean_s": ("tpot_s", "mean"), "throughput_rps": ("throughput_rps",),
              "output_tokens_per_s": ("output_tokens_per_s",), "prefix_hit_rate": ("prefix_hit_rate",),
              "router_cpu_s": ("router_cpu_s",), "send_lag_p99_wall_s": ("send_lag_wall_s", "p99")}
    out: dict[str, Any] = {"runs": len(runs), "errors": sum(r["errors"] for r in runs),
                           "timeouts": sum(r["timeouts"] for r in runs),
                           "completed": sum(r["completed"] for r in runs), "requests": sum(r["requests"] for r in runs)}
    for f, path in fields.items():
        vals = [pick(r, path) for r in runs]
        out[f] = _mean(vals)
        finite = [v for v in vals if math.isfinite(v)]
        if len(finite) > 1:
            out[f + "_range"] = [min(finite), max(finite)]
    served: dict[str, float] = {}
    for r in runs:
        for rep, n in r["served_by_replica"].items():
            served[rep] = served.get(rep, 0.0) + n
    out["served_by_replica"] = served
    return out


def fmt_table(summary: dict[str, dict[str, Any]]) -> str:
    head = (f"{'router':26s} {'TTFT mean':>9s} {'p50':>7s} {'p99':>7s} {'TPOT mean':>9s} {'req/s':>6s} "
            f"{'tok/s':>6s} {'prefix':>6s} {'errors':>6s} {'router CPU':>10s}  served (us-west/germany/israel)")
    lines = [head]
    for key, s in summary.items():
        if "why" in s:
            lines.append(f"{key:26s} not measured: {s['why'][:150]}")
            continue
        served = "/".join(f"{v:.0f}" for v in s["served_by_replica"].values())
        hit = s["prefix_hit_rate"]
        lines.append(f"{key:26s} {s['ttft_mean_s']:8.2f}s {s['ttft_p50_s']:6.2f}s {s['ttft_p99_s']:6.2f}s "
                     f"{s['tpot_mean_s'] * 1e3:7.1f}ms {s['throughput_rps']:6.2f} {s['output_tokens_per_s']:6.0f} "
                     f"{hit * 100 if hit is not None and math.isfinite(hit) else math.nan:5.1f}% "
                     f"{s['errors'] + s['timeouts']:6d} {s['router_cpu_s']:9.1f}s  {served}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "gorgo_v1.yaml")
    ap.add_argument("--routers", default=",".join(DEFAULT_ROUTERS),
                    help="comma-separated NAME:POLICY, NAME one of isthmus, sglang-router, vllm-router")
    ap.add_argument("--limit", type=int, default=300, help="requests replayed per run (the trace's first)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per scenario second")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all routers (interleaved)")
    ap.add_argument("--seed", type=int, default=None, help="workload and testbed seed (default: the scenario's)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per-request limit, scenario seconds")
    ap.add_argument("--rust-venv", type=Path, default=Path(tempfile.gettempdir()) / "isthmus-bench-rust-routers",
                    help="virtual environment for the Rust routers (created and filled with pip when missing)")
    ap.add_argument("--logs", type=Path, default=None, help="keep every run's testbed logs under this directory")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()
    keys = [k.strip() for k in args.routers.split(",") if k.strip()]
    for k in keys:
        name = k.split(":", 1)[0]
        if ":" not in k or name not in ("isthmus", *RUST_PACKAGES):
            ap.error(f"--routers: bad entry {k!r} (NAME:POLICY, NAME one of isthmus, sglang-router, vllm-router)")

    rust = rust_venv(args.rust_venv, sorted({k.split(":", 1)[0] for k in keys} & set(RUST_PACKAGES)))
    versions = {"isthmus": importlib.metadata.version("isthmus"), "python": platform.python_version()}
    for name, exe in rust.items():
        versions[name] = package_version(args.rust_venv / "bin" / "python", RUST_PACKAGES[name]) \
            if isinstance(exe, Path) else f"unavailable: {exe}"
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    why: dict[str, str] = {}
    load_before = os.getloadavg()
    logs_root = args.logs or Path(tempfile.mkdtemp(prefix="isthmus-sbs-"))
    t_all = time.monotonic()
    with sigterm_raises():
        for rnd in range(args.repeats):
            for key in keys:
                name = key.split(":", 1)[0]
                exe = rust.get(name)
                if name != "isthmus" and not isinstance(exe, Path):
                    why[key] = str(exe)
                    continue
                print(f"[round {rnd + 1}/{args.repeats}] {key}: limit {args.limit}, time scale {args.time_scale} ...",
                      flush=True)
                t0 = time.monotonic()
                try:
                    r = one_run(args.scenario, key, args, exe if isinstance(exe, Path) else None,
                                logs_root / f"{rnd}-{key.replace(':', '-')}")
                except TestbedError as exc:
                    why[key] = str(exc)[-800:]
                    print(f"  failed: {why[key][:300]}", flush=True)
                    continue
                runs[key].append(r)
                print(f"  {time.monotonic() - t0:.0f} s: TTFT mean {r['ttft_s']['mean']:.2f} s, "
                      f"p99 {r['ttft_s']['p99']:.2f} s, errors {r['errors']}, timeouts {r['timeouts']}", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for key in keys:
        summary[key] = combine(runs[key]) if runs[key] else {"why": why.get(key, "no run")}
    machine = {"cores": psutil.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "total_s": time.monotonic() - t_all}
    print(f"\n{args.scenario.name}: first {args.limit} requests, time scale {args.time_scale}, "
          f"{args.repeats} round(s); scenario seconds; {machine['cores']} cores shared by everything; "
          f"load average before {load_before[0]:.2f}, after {machine['loadavg_after'][0]:.2f}")
    print(fmt_table(summary))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        doc = {"settings": settings, "versions": versions, "machine": machine, "summary": summary, "runs": runs,
               "logs": str(logs_root)}
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
