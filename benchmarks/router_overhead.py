"""What a router adds to time-to-first-token: the same load sent directly to the engines, then through it.

Starts ``--engines`` engine doubles (``isthmus emulate``, step times scaled by ``--time-scale``) and, one
after the other, each router in front of them, all on loopback: ``isthmus serve`` and, unless
``--skip-rust``, the Rust routers ``vllm-router`` and ``sglang-router`` (installed with pip into a
virtual environment of their own, ``--rust-venv``, on first use; every listener bound to 127.0.0.1),
every router with the same policy ``--policy``. For each level of ``--streams``, a load generator
keeps that many streamed ``/v1/completions`` requests in flight (each ``--prompt-chars`` characters of
prompt, ``--max-tokens`` output tokens) until ``--requests`` have completed, first straight to the
engines (round robin), then through each router. TTFT is measured at the client, from sending the
request to receiving the first ``data:`` event; a router's overhead is the difference of its run's
percentiles and the direct run's. Each router's CPU time per request and resident memory (its process
tree) are reported too; the load is closed-loop, so req/s is the rate sustained at that concurrency.

Before that, ``--single`` requests are sent one at a time to every target: the overhead of one hop with
no contention. Everything shares this machine's cores (engines, router, load generator), so the figures
under load include CPU contention: the router is one more busy process, and each hop adds socket
sends (on sandboxed kernels a loopback ``send`` can cost hundreds of microseconds).

Usage::

    python benchmarks/router_overhead.py [--streams 50,200] [--requests 1000] [--time-scale 0.1] [--skip-rust]
        [--json out/router_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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
_PHASES = itertools.count()  # every load phase gets prompts of its own


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
    phase = next(_PHASES)
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(session: aiohttp.ClientSession, k: int, record: bool) -> None:
        nonlocal errors
        # distinct prompts (phase and counter up front), in every phase: prefix caching flatters no target
        prompt = (f"{phase}.{k} " + base * (prompt_chars // len(base) + 1))[:prompt_chars]
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


# ---------------------------------------------------------------------- the Rust routers, for comparison
RUST_PACKAGES = {"vllm-router": "vllm-router", "sglang-router": "sglang-router"}


def rust_venv(venv: Path) -> dict[str, Path | str]:
    """The Rust routers' entry points in ``venv`` (created and filled on first use), else why not."""
    out: dict[str, Path | str] = {}
    if not (venv / "bin" / "pip").exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            return {name: f"cannot create {venv}: {made.stderr.strip()[-300:]}" for name in RUST_PACKAGES}
    for name, package in RUST_PACKAGES.items():
        exe = venv / "bin" / name
        if not exe.exists():
            done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", package], capture_output=True, text=True)
            if done.returncode != 0 or not exe.exists():
                out[name] = f"pip install {package} failed: {done.stderr.strip()[-300:]}"
                continue
        out[name] = exe
    return out


def package_version(venv: Path, package: str) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def rust_command(name: str, exe: Path, port: int, engines: list[str], policy: str, streams: int) -> list[str]:
    """Command line of a Rust router on 127.0.0.1 (its metrics listener too) in front of ``engines``."""
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *engines, "--policy", policy,
              "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
              "--max-concurrent-requests", str(max(1024, 4 * streams)), "--log-level", "warning" if
              name == "vllm-router" else "warn"]
    return [str(exe), "launch", *common] if name == "sglang-router" else [str(exe), *common]


async def _ready(url: str, deadline: float) -> bool:
    """Whether ``url`` answers a small completion with 200 before ``deadline``."""
    body = {"model": "m", "prompt": "ready?", "max_tokens": 1, "stream": False}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    return False


def start_rust_router(workdir: Path, name: str, exe: Path, engines: list[str], policy: str,
                      streams: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    logpath = workdir / f"{name}.log"
    with logpath.open("wb") as sink:
        proc = subprocess.Popen(rust_command(name, exe, port, engines, policy, streams), stdout=sink,
                                stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    if not asyncio.run(_ready(url, time.monotonic() + 60)) or proc.poll() is not None:
        stop([proc])
        raise RuntimeError(f"{name} did not start:\n{logpath.read_text(errors='replace')[-2000:]}")
    return proc, url


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_s(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def measure(pid: int, url: str, load: tuple[int, int, int, int]) -> dict[str, Any]:
    """One loaded phase through the router ``pid`` at ``url``: the load's figures, CPU and RSS."""
    cpu0 = cpu_s(pid)
    result = asyncio.run(run_load([url], *load))
    used = cpu_s(pid) - cpu0
    result["router_cpu_s"] = used
    result["router_cpu_ms_per_request"] = 1e3 * used / max(1, result["requests"])
    result["router_rss_mb"] = rss_mb(pid)
    return result


def added(routed: dict[str, Any], direct: dict[str, Any]) -> dict[str, float]:
    return {k: routed["ttft_s"][k] - direct["ttft_s"][k] for k in ("p50", "p90", "p99", "mean")
            if k in routed["ttft_s"] and k in direct["ttft_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="50,200", help="concurrent streams, comma-separated levels")
    ap.add_argument("--requests", type=int, default=1000, help="requests per level and target")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=0.1)
    ap.add_argument("--single", type=int, default=100,
                    help="requests sent one at a time per target first (0: skip), for the uncontended overhead")
    ap.add_argument("--prompt-chars", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--policy", default="round_robin",
                    help="every router's policy (round_robin spreads load as the direct phase does)")
    ap.add_argument("--skip-rust", action="store_true", help="measure isthmus only, not vllm-router / sglang-router")
    ap.add_argument("--rust-venv", type=Path, default=Path(tempfile.gettempdir()) / "isthmus-bench-rust-routers",
                    help="virtual environment for the Rust routers (created and filled with pip when missing)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()
    levels = [int(x) for x in str(args.streams).split(",") if x.strip()]
    top = max(levels)

    routers: dict[str, dict[str, Any]] = {"isthmus": {"available": True}}
    rust: dict[str, Path | str] = {} if args.skip_rust else rust_venv(args.rust_venv)
    for name, exe in rust.items():
        routers[name] = ({"available": True, "version": package_version(args.rust_venv, RUST_PACKAGES[name])}
                         if isinstance(exe, Path) else {"available": False, "why": exe})

    single: dict[str, Any] = {}
    per_level: dict[str, dict[str, Any]] = {str(n): {} for n in levels}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = [start_engine(work / f"engine{k}.log", args.time_scale) for k in range(args.engines)]
        urls = [u for _, u in engines]
        try:
            one = (1, args.single, args.prompt_chars, args.max_tokens)
            if args.single:
                single["direct"] = asyncio.run(run_load(urls, *one))
            for n in levels:
                per_level[str(n)]["direct"] = asyncio.run(run_load(urls, n, args.requests, args.prompt_chars,
                                                                   args.max_tokens))
            for name, info in routers.items():
                if not info["available"]:
                    continue
                try:
                    if name == "isthmus":
                        proc, url = start_router(work, urls, args.policy, top)
                    else:
                        exe = rust[name]
                        assert isinstance(exe, Path)
                        proc, url = start_rust_router(work, name, exe, urls, args.policy, top)
                except RuntimeError as exc:
                    info.update(available=False, why=str(exc)[-500:])
                    continue
                try:
                    info["rss_mb_idle"] = rss_mb(proc.pid)
                    if args.single:
                        single[name] = asyncio.run(run_load([url], *one))
                    for n in levels:
                        r = measure(proc.pid, url, (n, args.requests, args.prompt_chars, args.max_tokens))
                        r["added_ttft_s"] = added(r, per_level[str(n)]["direct"])
                        per_level[str(n)][name] = r
                finally:
                    stop([proc])
        finally:
            stop([p for p, _ in engines])

    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
              "cores": psutil.cpu_count(), "routers": routers, "levels": per_level, "one_at_a_time": single}
    print(f"{args.engines} engine doubles (time scale {args.time_scale}), {args.requests} requests per level, "
          f"policy {args.policy}, {psutil.cpu_count()} cores shared by everything")
    for name, info in routers.items():
        if not info["available"]:
            print(f"{name}: not measured ({info.get('why', '')[:200]})")
    for n in levels:
        rows = per_level[str(n)]
        d = rows["direct"]["ttft_s"]
        print(f"\n{n} concurrent streams: direct TTFT p50 {d.get('p50', 0) * 1e3:.2f} ms, p99 {d.get('p99', 0) * 1e3:.2f} ms, "
              f"{rows['direct']['throughput_rps']:.1f} req/s")
        print(f"{'router':14s} {'+p50':>9s} {'+p90':>9s} {'+p99':>9s} {'req/s':>8s} {'CPU/req':>9s} {'RSS':>8s} "
              f"{'errors':>6s}")
        for name, r in rows.items():
            if name == "direct":
                continue
            a = r["added_ttft_s"]
            print(f"{name:14s} {a.get('p50', 0) * 1e3:7.2f}ms {a.get('p90', 0) * 1e3:7.2f}ms "
                  f"{a.get('p99', 0) * 1e3:7.2f}ms {r['throughput_rps']:8.1f} {r['router_cpu_ms_per_request']:7.2f}ms "
                  f"{r['router_rss_mb']:6.0f}MB {r['errors']:6d}")
    if single:
        base = single["direct"]["ttft_s"].get("p50", 0)
        print(f"\none request at a time, TTFT p50: direct {base * 1e3:.2f} ms; " + ", ".join(
            f"{name} +{(r['ttft_s'].get('p50', 0) - base) * 1e3:.2f} ms" for name, r in single.items()
            if name != "direct"))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
