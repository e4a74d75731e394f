"""What the router adds to time-to-first-token: the same load sent directly to the engines, then through it.

Starts ``--engines`` engine doubles (``isthmus emulate``, step times scaled by ``--time-scale``) and one
router (``isthmus serve``, policy ``--policy``) in front of them, all on loopback. A load generator keeps
``--streams`` streamed ``/v1/completions`` requests in flight (each ``--prompt-chars`` characters of
prompt, ``--max-tokens`` output tokens) until ``--requests`` have completed, first sending straight to
the engines (round robin), then through the router. TTFT is measured at the client, from sending the
request to receiving the first ``data:`` event; the router's overhead is the difference of the two
runs' percentiles.

Before that, ``--single`` requests are sent one at a time both ways: the overhead of one hop with no
contention. Everything shares this machine's cores (engines, router, load generator), so the figures
at 50 streams include CPU contention: the router is one more busy process, and each hop adds socket
sends (on sandboxed kernels a loopback ``send`` can cost hundreds of microseconds). The router's own
CPU time over its phase is reported too.

Usage::

    python benchmarks/router_overhead.py [--streams 50] [--requests 1000] [--time-scale 0.1] [--json out/router_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

ISTHMUS = Path(sys.executable).parent / "isthmus"
READY = re.compile(rb"serving .* on http://127\.0\.0\.1:(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_engine(log: Path, time_scale: float) -> tuple[subprocess.Popen[bytes], str]:
    """One engine double on a free port; (process, base URL) once it says where it listens."""
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(ISTHMUS), "emulate", "--port", "0", "--model", "Mistral-7B", "--gpu", "A100",
                                 "--served-model-name", "m", "--time-scale", str(time_scale)],
                                stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        m = READY.search(log.read_bytes())
        if m:
            return proc, f"http://127.0.0.1:{int(m.group(1))}"
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"engine did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def start_router(workdir: Path, engines: list[str], policy: str, streams: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port}, "region": "local", "models": ["m"],
        "replicas": [{"url": u, "region": "local", "gpu": "A100", "model": "Mistral-7B"} for u in engines],
        "policy": {"name": policy}, "limits": {"max_concurrent": max(1024, 4 * streams)}, "log_level": "warning",
    }
    path = workdir / "router.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (workdir / "router.log").open("wb")
    proc = subprocess.Popen([str(ISTHMUS), "serve", str(path)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start:\n{(workdir / 'router.log').read_text()}") from None
            time.sleep(0.05)


async def run_load(targets: list[str], streams: int, requests: int, prompt_chars: int, max_tokens: int,
                   warmup: int = 20) -> dict[str, Any]:
    """Keep ``streams`` requests in flight over ``targets`` (round robin) until ``requests`` finished."""
    ttft: list[float] = []
    e2e: list[float] = []
    errors = 0
    issued = 0
    base = "The router benchmark prompt. "
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(session: aiohttp.ClientSession, k: int, record: bool) -> None:
        nonlocal errors
        # distinct prompts (a counter up front), so prefix caching does not flatter either phase
        prompt = (f"{k} " + base * (prompt_chars // len(base) + 1))[:prompt_chars]
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        t0 = time.perf_counter()
        first = None
        try:
            async with session.post(f"{targets[k % len(targets)]}/v1/completions", json=body) as resp:
                async for chunk in resp.content.iter_any():
                    if first is None and b"data:" in chunk:
                        first = time.perf_counter()
                ok = resp.status == 200 and first is not None
        except aiohttp.ClientError:
            ok = False
        if not record:
            return
        if not ok or first is None:
            errors += 1
            return
        ttft.append(first - t0)
        e2e.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(one(session, -k - 1, False) for k in range(warmup)))

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                await one(session, issued, True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - t0
    return {"requests": len(ttft), "errors": errors, "wall_s": wall, "ttft_s": _pcts(ttft), "e2e_s": _pcts(e2e),
            "throughput_rps": len(ttft) / wall if wall > 0 else 0.0}


def _pcts(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    q = statistics.quantiles(s, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(s), "max": s[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=0.1)
    ap.add_argument("--single", type=int, default=100,
                    help="requests sent one at a time per phase first (0: skip), for the uncontended overhead")
    ap.add_argument("--prompt-chars", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--policy", default="round_robin",
                    help="router policy (round_robin spreads load as the direct phase does)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = [start_engine(work / f"engine{k}.log", args.time_scale) for k in range(args.engines)]
        urls = [u for _, u in engines]
        router, router_url = start_router(work, urls, args.policy, args.streams)
        try:
            single: dict[str, Any] = {}
            if args.single:
                one = (1, args.single, args.prompt_chars, args.max_tokens)
                single = {"direct": asyncio.run(run_load(urls, *one)),
                          "router": asyncio.run(run_load([router_url], *one))}
            load = (args.streams, args.requests, args.prompt_chars, args.max_tokens)
            direct = asyncio.run(run_load(urls, *load))
            cpu0 = psutil.Process(router.pid).cpu_times()
            routed = asyncio.run(run_load([router_url], *load))
            cpu1 = psutil.Process(router.pid).cpu_times()
        finally:
            for proc in [router, *(p for p, _ in engines)]:
                proc.send_signal(signal.SIGTERM)
            for proc in [router, *(p for p, _ in engines)]:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    router_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    added = {k: routed["ttft_s"][k] - direct["ttft_s"][k] for k in ("p50", "p90", "p99", "mean")
             if k in routed["ttft_s"] and k in direct["ttft_s"]}
    report = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"}},
        "direct": direct,
        "router": routed,
        "added_ttft_s": added,
        "router_cpu_s": router_cpu,
        "router_cpu_ms_per_request": 1e3 * router_cpu / max(1, routed["requests"]),
        "one_at_a_time": single,
    }
    print(f"{args.streams} concurrent streams, {args.requests} requests, {args.engines} engine doubles "
          f"(time scale {args.time_scale}), policy {args.policy}")
    print(f"{'':10s} {'TTFT p50':>10s} {'p90':>10s} {'p99':>10s} {'req/s':>8s} {'errors':>7s}")
    for name, r in (("direct", direct), ("router", routed)):
        t = r["ttft_s"]
        print(f"{name:10s} {t.get('p50', 0) * 1e3:9.2f}ms {t.get('p90', 0) * 1e3:9.2f}ms {t.get('p99', 0) * 1e3:9.2f}ms "
              f"{r['throughput_rps']:8.1f} {r['errors']:7d}")
    print(f"{'added':10s} {added.get('p50', 0) * 1e3:9.2f}ms {added.get('p90', 0) * 1e3:9.2f}ms "
          f"{added.get('p99', 0) * 1e3:9.2f}ms")
    print(f"router CPU: {router_cpu:.2f} s, {report['router_cpu_ms_per_request']:.2f} ms per request")
    if single:
        d, r = single["direct"]["ttft_s"], single["router"]["ttft_s"]
        print(f"one request at a time: TTFT p50 {d.get('p50', 0) * 1e3:.2f} ms direct, "
              f"{r.get('p50', 0) * 1e3:.2f} ms through the router")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
