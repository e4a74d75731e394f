"""How fast the simulator replays a real trace, how that cost grows, and how it compares with Vidur.

Replays the full Mooncake conversation trace (12,031 requests, ~59 min) on the 3-region, 12-replica
scenario (``scenarios/mooncake_3region_full.yaml``) under ``least_load``, at 1x, 4x and 16x the trace
(the workload's ``repeat``: copies back to back, so the load stays the same and the cost should grow
linearly). Each size runs in a fresh subprocess, which reports its wall time (the simulation's own
``run``, and the whole process), events, and its peak resident memory (``ru_maxrss``).

Reported per size: simulated requests per wall second, events per wall second, wall seconds, peak
RSS, and the cost per request relative to 1x. Targets: the full trace (1x) in < 20 s; < 1 GB at 16x.

Then Vidur (``pip install vidur``, in its own venv) is given the same trace on 12 H100 replicas with
its least-outstanding-requests scheduler, as shipped (no ``HF_HUB_OFFLINE``), under a time limit: if
it runs, the ratio of wall times is reported; if not, the exact error it stopped with.

Usage::

    python benchmarks/sim_speed.py [--sizes 1,4,16] [--json out/sim_speed.json] [--skip-vidur]

The whole benchmark stays under ~10 minutes on 2 cores (Vidur's install, when its venv is not there
yet, takes a few of them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = REPO / "scenarios" / "mooncake_3region_full.yaml"
TARGET_1X_WALL_S = 20.0
TARGET_16X_RSS_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------- one size
def run_worker(scenario_path: Path, policy: str, size: int) -> dict[str, Any]:
    """Simulate ``size`` back-to-back copies of the scenario's trace in this process; figures as a dict.

    ``wall_s`` is the simulation loop alone (request generation included: the stream is lazy);
    ``process_wall_s`` adds loading the scenario and building the run. Memory is this process's
    peak resident set, bytes.
    """
    t0 = time.perf_counter()
    from isthmus.sim.scenario import load_scenario

    sc = load_scenario(scenario_path)
    if size > 1:
        sc = sc.with_workload(repeat=size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = sc.run(policy)
    summary = result.summary()
    return {
        "size": size,
        "policy": policy,
        "requests": result.requests,
        "completed": result.completed,
        "events": result.events,
        "wall_s": result.wall_s,
        "process_wall_s": time.perf_counter() - t0,
        "sim_span_s": result.sim_span_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_run_bytes": rss_before,
        "ttft_p50_s": summary["ttft_s"]["p50"],
        "ttft_p99_s": summary["ttft_s"]["p99"],
    }


def measure_size(scenario_path: Path, policy: str, size: int, timeout_s: float) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh interpreter and add rates; a failure is recorded, not raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(size),
           "--scenario", str(scenario_path), "--policy", policy]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"size": size, "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"size": size, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1],
                "returncode": proc.returncode}
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    fig["subprocess_wall_s"] = time.perf_counter() - t0
    fig["requests_per_wall_s"] = fig["requests"] / fig["wall_s"]
    fig["events_per_wall_s"] = fig["events"] / fig["wall_s"]
    return fig


# ----------------------------------------------------------------------------------------- Vidur
def _vidur_python(venv: Path, install_timeout_s: float) -> tuple[Path | None, str]:
    """The venv's interpreter with Vidur installed (creating the venv if needed), or ``None`` and why."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import vidur, importlib.metadata as m; print(m.version('vidur'))"]
    if python.exists():
        ok = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
        if ok.returncode == 0:
            return python, f"vidur {ok.stdout.strip()} (existing venv {venv})"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        inst = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "vidur"], capture_output=True,
                              text=True, timeout=install_timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"pip install vidur did not finish in {install_timeout_s:.0f} s"
    except subprocess.CalledProcessError as exc:
        return None, f"cannot create a venv: {exc.stderr!r}"
    if inst.returncode != 0:
        return None, "pip install vidur failed: " + " | ".join(inst.stderr.strip().splitlines()[-3:])
    ok = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
    if ok.returncode != 0:
        return None, "vidur installed but does not import: " + " | ".join(ok.stderr.strip().splitlines()[-2:])
    return python, f"vidur {ok.stdout.strip()} (installed into {venv})"


def write_vidur_trace(scenario_path: Path, path: Path) -> int:
    """The scenario's requests (one copy) as Vidur's trace-replay CSV; returns the request count."""
    from isthmus.sim.scenario import load_scenario

    sc = load_scenario(scenario_path)
    n = 0
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Date", "Time", "PromptTokenCount", "CompletionTokenCount"])
        for r in sc.requests(sc.config.seed):
            w.writerow(["2023-08-21", f"{r.arrival:.6f}", r.prompt_tokens, r.max_output_tokens])
            n += 1
    return n


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")


def last_exception(text: str) -> str | None:
    """The last ``SomeError: message`` line of a Python traceback in ``text``."""
    found = None
    for line in text.splitlines():
        if _EXC_LINE.match(line.strip()):
            found = line.strip()
    return found


def try_vidur(scenario_path: Path, venv: Path, timeout_s: float, install_timeout_s: float,
              isthmus_wall_s: float | None) -> dict[str, Any]:
    """Run Vidur on the same trace; what happened, as a dict (``status``: ran / failed / unavailable / timeout)."""
    python, how = _vidur_python(venv, install_timeout_s)
    out: dict[str, Any] = {"install": how}
    if python is None:
        out.update(status="unavailable", error=how)
        return out
    with tempfile.TemporaryDirectory(prefix="isthmus-vidur-") as tmp:
        work = Path(tmp)
        trace = work / "trace.csv"
        out["requests"] = write_vidur_trace(scenario_path, trace)
        cmd = [str(python), "-m", "vidur.main",
               "--replica_config_model_name", "meta-llama/Llama-3-8B", "--replica_config_device", "h100",
               "--cluster_config_num_replicas", "12", "--global_scheduler_config_type", "lor",
               "--request_generator_config_type", "trace_replay",
               "--trace_request_generator_config_trace_file", str(trace),
               "--trace_request_generator_config_date", "2023-08-21",
               "--trace_request_generator_config_prefill_scale_factor", "1",
               "--trace_request_generator_config_decode_scale_factor", "1",
               "--trace_request_generator_config_time_scale_factor", "1",
               "--trace_request_generator_config_max_tokens", "131072",
               "--metrics_config_output_dir", str(work / "out"),
               "--random_forrest_execution_time_predictor_config_cache_dir", str(work / "cache"),
               "--no-metrics_config_store_plots", "--no-metrics_config_enable_chrome_trace"]
        out["command"] = " ".join(cmd[1:]).replace(str(work), "$TMP")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env["WANDB_MODE"] = "disabled"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=work, env=env,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            out.update(status="timeout", wall_s=timeout_s, error=f"no result within {timeout_s:.0f} s",
                       last_log=stderr.strip().splitlines()[-1:] or None)
            return out
        wall = time.perf_counter() - t0
        log = proc.stderr + proc.stdout
    out["wall_s"] = wall
    if proc.returncode == 0:
        out["status"] = "ran"
        if isthmus_wall_s:
            out["vidur_over_isthmus_wall"] = wall / isthmus_wall_s
        return out
    out["status"] = "failed"
    out["returncode"] = proc.returncode
    out["error"] = last_exception(log) or (log.strip().splitlines() or ["(no output)"])[-1]
    frames = re.findall(r'File "[^"]*/site-packages/(vidur/[^"]+)", line (\d+), in (\w+)', log)
    if frames:
        path, line, func = frames[-1]
        out["failed_in"] = f"{path}:{line} in {func}"
    hub = [line.split("] ", 1)[-1] for line in log.splitlines() if "Failed to load predictions from HF" in line]
    if hub:
        out["first_failure"] = hub[0]
    if "snapshot_download" in log or "LocalEntryNotFoundError" in log:
        default_ds = ["project-vajra/dev-staging-meta-llama-llama-3-8b-h100", "project-vajra/dev-staging-h100-dgx"]
        out["why"] = ("Vidur fetches its execution-time predictions, then its profiling data sets, from the "
                      "Hugging Face hub at start (huggingface_hub.snapshot_download in "
                      "SklearnExecutionTimePredictor); the wheel ships no profiles, and without network access "
                      "the hub call fails before any request is simulated. Hub data sets of its default configuration: "
                      + ", ".join(default_ds))
    return out


# ----------------------------------------------------------------------------------------- report
def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MB"


def print_figures(report: dict[str, Any]) -> None:
    """The figures, as plain text."""
    print(f"scenario {report['scenario']} ({report['policy']}), {report['cpus']} CPUs, Python {report['python']}")
    print(f"{'size':>5} {'requests':>9} {'events':>10} {'wall s':>8} {'req/s':>8} {'events/s':>10} "
          f"{'peak RSS':>9} {'cost/req vs 1x':>15}")
    for r in report["sizes"]:
        if "error" in r:
            print(f"{r['size']:>4}x  failed: {r['error']}")
            continue
        print(f"{r['size']:>4}x {r['requests']:>9,} {r['events']:>10,} {r['wall_s']:>8.2f} "
              f"{r['requests_per_wall_s']:>8,.0f} {r['events_per_wall_s']:>10,.0f} {_mb(r['peak_rss_bytes']):>9} "
              f"{r.get('cost_per_request_vs_1x', float('nan')):>15.2f}")
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value']} (limit {t['limit']}): {'met' if t['met'] else 'MISSED'}")
    v = report.get("vidur")
    if v is not None:
        print(f"vidur: {v['status']} ({v.get('install', '')})")
        if v["status"] == "ran":
            print(f"  wall {v['wall_s']:.1f} s, {v.get('vidur_over_isthmus_wall', float('nan')):.1f}x isthmus's")
        else:
            print(f"  error: {v.get('error')}")
            for key in ("failed_in", "why"):
                if key in v:
                    print(f"  {key.replace('_', ' ')}: {v[key]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO)
    p.add_argument("--policy", default="least_load")
    p.add_argument("--sizes", default="1,4,16", help="comma-separated trace multiples (workload repeat)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--skip-vidur", action="store_true")
    p.add_argument("--vidur-venv", type=Path, default=Path(tempfile.gettempdir()) / "isthmus-bench-vidur-venv")
    p.add_argument("--vidur-timeout", type=float, default=180.0, help="seconds for Vidur's run")
    p.add_argument("--vidur-install-timeout", type=float, default=420.0, help="seconds for pip install vidur")
    p.add_argument("--size-timeout", type=float, default=600.0, help="seconds per size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args.scenario, args.policy, args.size)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    report: dict[str, Any] = {
        "scenario": str(args.scenario.relative_to(REPO) if args.scenario.is_relative_to(REPO) else args.scenario),
        "policy": args.policy, "cpus": os.cpu_count(), "python": sys.version.split()[0], "sizes": [],
    }
    for size in sizes:
        fig = measure_size(args.scenario, args.policy, size, args.size_timeout)
        report["sizes"].append(fig)
        status = fig.get("error") or f"{fig['wall_s']:.2f} s, {_mb(fig['peak_rss_bytes'])}"
        print(f"{size}x: {status}", file=sys.stderr, flush=True)
    ok = [f for f in report["sizes"] if "error" not in f]
    base = next((f for f in ok if f["size"] == 1), None)
    for f in ok:
        if base is not None:
            f["cost_per_request_vs_1x"] = (f["wall_s"] / f["requests"]) / (base["wall_s"] / base["requests"])
    report["children_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    targets: dict[str, Any] = {}
    if base is not None:
        targets["full trace wall s"] = {"value": round(base["wall_s"], 2), "limit": TARGET_1X_WALL_S,
                                        "met": base["wall_s"] < TARGET_1X_WALL_S}
    big = next((f for f in ok if f["size"] == 16), None)
    if big is not None:
        targets["16x peak RSS"] = {"value": _mb(big["peak_rss_bytes"]), "limit": _mb(TARGET_16X_RSS_BYTES),
                                   "met": big["peak_rss_bytes"] < TARGET_16X_RSS_BYTES}
    report["targets"] = targets
    if not args.skip_vidur:
        print("vidur: installing / running ...", file=sys.stderr, flush=True)
        report["vidur"] = try_vidur(args.scenario, args.vidur_venv, args.vidur_timeout, args.vidur_install_timeout,
                                    base["wall_s"] if base else None)
    print_figures(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        tmp.replace(args.json)
    return 0 if len(ok) == len(sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
