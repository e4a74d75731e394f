"""What a router adds to time-to-first-token: the same load sent directly to the engines, then through it.

Starts ``--engines`` backends (fixed-timing fake servers, or engine doubles ``isthmus emulate`` with
step times scaled by ``--time-scale``) and every router in front of them, all on loopback: ``isthmus serve`` and, unless
``--skip-rust``, the Rust routers ``vllm-router`` and ``sglang-router`` (installed with pip into a
virtual environment of their own, ``--rust-venv``, on first use; every listener bound to 127.0.0.1),
every router with the same policy ``--policy``. Requests are streamed ``/v1/completions`` with
``--prompt-chars`` characters of distinct prompt; TTFT is measured at the client, from sending the
request to its first ``data:`` event. Phases, each run straight to the engines (round robin) and
through every router:

1. one at a time (``--single`` requests of one token): the overhead of one hop with nothing else running;
2. open loop, per level N of ``--streams``: Poisson arrivals (the same gaps for every target) at
   ``--load-factor`` x the rate the engines sustain directly with N streams in a closed loop, each
   request ``--max-tokens`` long, so that about N streams are in flight (``--requests``, at least
   ``--open-seconds`` of arrivals); a router's overhead is the
   difference of its TTFT percentiles and the direct run's;
3. closed loop, per level N: N streams kept busy with short requests (``--closed-max-tokens``) until
   ``--closed-requests`` completed: the highest rate sustained with N concurrent streams.

With the fake backends, each answer's first event also says how long the backend itself took to
write it (its timer fires on the event loop's millisecond grid); TTFT less that wait is reported too
("net"), a figure with less of the backend's own noise.

Every router runs from the start, and each phase is run in ``--rounds`` rounds: in a round every
target (direct, then each router) runs the phase once, in an order rotated from round to round, so
that a busy minute on a shared machine falls on every target alike. Added latency is reported as the
median over rounds of (router - the same round's direct run), with the range over rounds, and as the
difference of the percentiles of all rounds' samples pooled.

Each router's CPU time per request and resident memory (its process tree) are reported too.
Everything shares this machine's cores (engines, router, load generator): under load, a router's
added latency includes waiting for a core.

Usage::

    python benchmarks/router_overhead.py [--streams 50,200] [--rounds 5] [--requests 400] [--skip-rust]
        [--backend fake|emulate] [--json out/router_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
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
from _common import free_port, package_version, wait_for_url, write_json

ISTHMUS = Path(sys.executable).parent / "isthmus"
_PHASES = itertools.count()  # every load phase gets prompts of its own
_BACKEND_WAIT = re.compile(rb'"backend_wait_us": ?(\d+)')


def start_engine(log: Path, time_scale: float) -> tuple[subprocess.Popen[bytes], str]:
    """One engine double on a free port; (process, base URL) once it says where it listens."""
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(ISTHMUS), "emulate", "--port", "0", "--model", "Mistral-7B", "--gpu", "A100",
                                 "--served-model-name", "m", "--time-scale", str(time_scale)],
                                stdout=sink, stderr=subprocess.STDOUT)
    return proc, wait_for_url(proc, log, timeout_s=30)


# ---------------------------------------------------------------------- a fake backend with fixed timing
def fake_backend_app(ttft_s: float, itl_s: float) -> Any:
    """An OpenAI-style streaming server whose answers take fixed times: the first token ``ttft_s`` after
    the request, then one every ``itl_s``, whatever else is running (no batching, no queue), so that
    what a router adds is not hidden in the engine's own variance. ``/health``, ``/v1/models`` and a
    ``/metrics`` page with vLLM's gauge names (all zero) let every router treat it as a vLLM server."""
    from aiohttp import web

    metrics = ("vllm:num_requests_running{model_name=\"m\"} 0\nvllm:num_requests_waiting{model_name=\"m\"} 0\n"
               "vllm:kv_cache_usage_perc{model_name=\"m\"} 0\n")

    async def completions(request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        body = await request.json()
        n = int(body.get("max_tokens", 16))
        first = float(body.get("fake_ttft_ms", ttft_s * 1e3)) / 1e3  # a request may set its own timing
        gap = float(body.get("fake_itl_ms", itl_s * 1e3)) / 1e3
        await asyncio.sleep(first)
        if not body.get("stream"):
            text = "x" * n
            return web.json_response({"id": "c", "object": "text_completion", "model": "m", "choices": [
                {"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(n):
            if k and gap > 0:
                await asyncio.sleep(gap)
            event: dict[str, Any] = {"id": "c", "object": "text_completion", "model": "m", "choices": [
                {"index": 0, "text": "x", "finish_reason": "length" if k == n - 1 else None}]}
            if not k:  # how long this server itself took to its first event (its timer's slack included)
                event["backend_wait_us"] = round((time.perf_counter() - arrived) * 1e6)
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "fake"}]})

    async def prom(request: web.Request) -> web.Response:
        return web.Response(text=metrics, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", prom)
    return app


def start_fake(log: Path, ttft_s: float, itl_s: float) -> tuple[subprocess.Popen[bytes], str]:
    """One fake backend (this script with ``--fake-backend PORT``) on a free port; (process, base URL)."""
    port = free_port()
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, __file__, "--fake-backend", str(port), "--fake-ttft-ms",
                                 str(ttft_s * 1e3), "--fake-itl-ms", str(itl_s * 1e3)], stdout=sink,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake backend did not start:\n{log.read_text(errors='replace')}") from None
            time.sleep(0.05)


def run_fake(port: int, ttft_ms: float, itl_ms: float) -> None:
    from aiohttp import web

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(fake_backend_app(ttft_ms / 1e3, itl_ms / 1e3), host="127.0.0.1", port=port, access_log=None,
                print=None)


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


class _Load:
    """Streamed ``/v1/completions`` requests over ``targets`` (round robin), each timed at the client."""

    def __init__(self, targets: list[str], prompt_chars: int, max_tokens: int,
                 extra: dict[str, Any] | None = None) -> None:
        self.targets = targets
        self.extra = extra or {}
        self.prompt_chars = prompt_chars
        self.max_tokens = max_tokens
        self.phase = next(_PHASES)
        self.ttft: list[float] = []
        self.net: list[float] = []  # TTFT less the backend's own wait to its first event, when it says
        self.e2e: list[float] = []
        self.errors = 0
        self.in_flight = 0

    async def one(self, session: aiohttp.ClientSession, k: int, record: bool) -> None:
        base = "The router benchmark prompt. "
        # distinct prompts (phase and counter up front), in every phase: prefix caching flatters no target
        prompt = (f"{self.phase}.{k} " + base * (self.prompt_chars // len(base) + 1))[:self.prompt_chars]
        body = {"model": "m", "prompt": prompt, "max_tokens": self.max_tokens, "stream": True, **self.extra}
        t0 = time.perf_counter()
        first = None
        wait = None
        self.in_flight += 1
        try:
            async with session.post(f"{self.targets[k % len(self.targets)]}/v1/completions", json=body) as resp:
                async for chunk in resp.content.iter_any():
                    if first is None and b"data:" in chunk:
                        first = time.perf_counter()
                        said = _BACKEND_WAIT.search(chunk)
                        wait = int(said.group(1)) / 1e6 if said else None
                ok = resp.status == 200 and first is not None
        except aiohttp.ClientError:
            ok = False
        finally:
            self.in_flight -= 1
        if not record:
            return
        if not ok or first is None:
            self.errors += 1
            return
        self.ttft.append(first - t0)
        if wait is not None:
            self.net.append(first - t0 - wait)
        self.e2e.append(time.perf_counter() - t0)

    def result(self, wall: float, **extra: Any) -> dict[str, Any]:
        return {"requests": len(self.ttft), "errors": self.errors, "wall_s": wall, "ttft_s": _pcts(self.ttft),
                "ttft_net_s": _pcts(self.net), "e2e_s": _pcts(self.e2e),
                "throughput_rps": len(self.ttft) / wall if wall > 0 else 0.0,
                "_samples": {"ttft": self.ttft, "net": self.net, "e2e": self.e2e}, **extra}


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120))


async def run_load(targets: list[str], streams: int, requests: int, prompt_chars: int, max_tokens: int,
                   warmup: int = 20, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Closed loop: keep ``streams`` requests in flight over ``targets`` until ``requests`` finished
    (``extra``: more body fields, e.g. a fake backend's timing)."""
    load = _Load(targets, prompt_chars, max_tokens, extra)
    issued = 0
    async with _session() as session:
        await asyncio.gather(*(load.one(session, -k - 1, False) for k in range(warmup)))

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                await load.one(session, issued, True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - t0
    return load.result(wall)


async def run_open(targets: list[str], rate: float, requests: int, prompt_chars: int, max_tokens: int,
                   seed: int = 0, warmup: int = 20) -> dict[str, Any]:
    """Open loop: ``requests`` Poisson arrivals at ``rate`` req/s (the same gaps for the same seed, so
    every target gets the same arrival pattern), each awaited; also the mean and peak of requests in
    flight (time-weighted, sampled every 10 ms) and how late sends were."""
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(requests)]
    load = _Load(targets, prompt_chars, max_tokens)
    lag: list[float] = []
    samples: list[int] = []
    async with _session() as session:
        await asyncio.gather(*(load.one(session, -k - 1, False) for k in range(warmup)))
        tasks: list[asyncio.Task[None]] = []
        done = False

        async def sample() -> None:
            while not done:
                samples.append(load.in_flight)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        due = t0
        for k, gap in enumerate(gaps):
            due += gap
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.append(time.perf_counter() - due)
            tasks.append(asyncio.create_task(load.one(session, k, True)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        done = True
        await sampler
    return load.result(wall, offered_rps=rate, in_flight_mean=statistics.fmean(samples) if samples else 0.0,
                       in_flight_max=max(samples, default=0), send_lag_s=_pcts(lag))


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


def measure(pid: int, run: Any) -> dict[str, Any]:
    """Run the load coroutine ``run`` against the router ``pid``: the load's figures, CPU and RSS."""
    cpu0 = cpu_s(pid)
    result: dict[str, Any] = asyncio.run(run)
    used = cpu_s(pid) - cpu0
    result["router_cpu_s"] = used
    result["router_cpu_ms_per_request"] = 1e3 * used / max(1, result["requests"])
    result["router_rss_mb"] = rss_mb(pid)
    return result


def _rotated(names: list[str], k: int) -> list[str]:
    return names[k % len(names):] + names[:k % len(names)]


def _pool(rounds: list[dict[str, Any]], key: str) -> list[float]:
    return [x for r in rounds for x in r["_samples"][key]]


def _summary(rounds: list[dict[str, Any]], wall_key: str = "wall_s") -> dict[str, Any]:
    """One target's figures over its rounds: percentiles of all samples pooled, the rounds' own."""
    ttft = _pool(rounds, "ttft")
    wall = sum(r[wall_key] for r in rounds)
    out: dict[str, Any] = {
        "requests": len(ttft), "errors": sum(r["errors"] for r in rounds), "ttft_s": _pcts(ttft),
        "ttft_net_s": _pcts(_pool(rounds, "net")), "e2e_s": _pcts(_pool(rounds, "e2e")), "throughput_rps": len(ttft) / wall if wall > 0 else 0.0,
        "rounds": [{k: v for k, v in r.items() if k != "_samples"} for r in rounds],
    }
    if "in_flight_mean" in rounds[0]:
        out["in_flight_mean"] = statistics.fmean(r["in_flight_mean"] for r in rounds)
        out["in_flight_max"] = max(r["in_flight_max"] for r in rounds)
    if "router_cpu_s" in rounds[0]:
        cpu = sum(r["router_cpu_s"] for r in rounds)
        out["router_cpu_s"] = cpu
        out["router_cpu_ms_per_request"] = 1e3 * cpu / max(1, out["requests"])
        out["router_rss_mb"] = max(r["router_rss_mb"] for r in rounds)
    return out


def _added(target: dict[str, Any], direct: dict[str, Any], key: str = "ttft_s") -> dict[str, Any]:
    """TTFT (``key``) added over direct: of the pooled percentiles, and per round (each round's phase
    against the direct phase of the same round, minutes apart at most) with the median over rounds."""
    pooled = {k: target[key][k] - direct[key][k] for k in ("p50", "p90", "p99", "mean")
              if k in target[key] and k in direct[key]}
    per_round = [{k: t[key][k] - d[key][k] for k in ("p50", "p90", "p99", "mean")
                  if k in t[key] and k in d[key]} for t, d in zip(target["rounds"], direct["rounds"], strict=True)]
    median = {k: statistics.median(r[k] for r in per_round if k in r) for k in ("p50", "p90", "p99", "mean")
              if any(k in r for r in per_round)}
    return {"pooled": pooled, "median_of_rounds": median, "per_round": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="50,200", help="concurrent streams, comma-separated levels")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds: in each, every target (direct and each router) runs every phase once, in an "
                         "order rotated from round to round")
    ap.add_argument("--requests", type=int, default=400,
                    help="open loop: requests per phase, level, target and round (at least --open-seconds' worth)")
    ap.add_argument("--open-seconds", type=float, default=8.0, help="open loop: shortest phase, seconds of arrivals")
    ap.add_argument("--closed-requests", type=int, default=5000,
                    help="closed loop: requests per phase, level, target and round")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=1.0, help="engine step times x this")
    ap.add_argument("--single", type=int, default=40,
                    help="requests sent one at a time per target and round (0: skip), for the uncontended overhead")
    ap.add_argument("--prompt-chars", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16, help="output tokens per request, open-loop phases")
    ap.add_argument("--closed-max-tokens", type=int, default=16, help="output tokens per request, closed-loop phases")
    ap.add_argument("--load-factor", type=float, default=0.9,
                    help="open-loop rate as a fraction of the direct closed-loop rate at that many streams")
    ap.add_argument("--policy", default="round_robin",
                    help="every router's policy (round_robin spreads load as the direct phase does)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the open-loop arrival gaps (round k: seed + k)")
    ap.add_argument("--skip-rust", action="store_true", help="measure isthmus only, not vllm-router / sglang-router")
    ap.add_argument("--rust-venv", type=Path, default=Path(tempfile.gettempdir()) / "isthmus-bench-rust-routers",
                    help="virtual environment for the Rust routers (created and filled with pip when missing)")
    ap.add_argument("--backend", choices=("fake", "emulate"), default="fake",
                    help="fake: fixed-timing streaming servers (what a router adds, alone); emulate: engine doubles")
    ap.add_argument("--fake-ttft-ms", type=float, default=20.0, help="fake backend: time to the first token")
    ap.add_argument("--fake-itl-ms", type=float, default=60.0,
                    help="fake backend: time between tokens (streams last ttft + (max_tokens - 1) x this)")
    ap.add_argument("--closed-fake-ms", type=float, default=2.0,
                    help="fake backend, closed-loop phases: time to the first token and between tokens")
    ap.add_argument("--fake-backend", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()
    if args.fake_backend is not None:
        run_fake(args.fake_backend, args.fake_ttft_ms, args.fake_itl_ms)
        return
    levels = [int(x) for x in str(args.streams).split(",") if x.strip()]
    top = max(levels)
    with contextlib.suppress(ImportError):  # the load generator on uvloop too: less of its own jitter in every TTFT
        import uvloop

        uvloop.install()
    rounds = max(1, args.rounds)

    routers: dict[str, dict[str, Any]] = {"isthmus": {"available": True}}
    rust: dict[str, Path | str] = {} if args.skip_rust else rust_venv(args.rust_venv)
    for name, exe in rust.items():
        routers[name] = ({"available": True, "version": package_version(args.rust_venv / "bin" / "python", RUST_PACKAGES[name])}
                         if isinstance(exe, Path) else {"available": False, "why": exe})

    rates: dict[str, float] = {}
    prompt = args.prompt_chars
    fast = ({"fake_ttft_ms": args.closed_fake_ms, "fake_itl_ms": args.closed_fake_ms} if args.backend == "fake"
            else None)
    # raw rounds: phase -> target -> [one result per round]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    load_avg: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = [start_fake(work / f"engine{k}.log", args.fake_ttft_ms / 1e3, args.fake_itl_ms / 1e3)
                   if args.backend == "fake" else start_engine(work / f"engine{k}.log", args.time_scale)
                   for k in range(args.engines)]
        urls = [u for _, u in engines]
        procs: dict[str, subprocess.Popen[bytes]] = {}
        targets: dict[str, list[str]] = {"direct": urls}
        try:
            # every router runs from the start (idle when it is not measured), so that the phases can be interleaved
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
                procs[name], targets[name] = proc, [url]
                info["rss_mb_idle"] = rss_mb(proc.pid)
            names = list(targets)

            def phase(key: str, make: Any) -> None:
                """Every target once per round, in an order rotated from round to round."""
                per = raw.setdefault(key, {n: [] for n in names})
                for k in range(rounds):
                    load_avg.append(psutil.getloadavg()[0])
                    for name in _rotated(names, k):
                        run = make(targets[name], k)
                        per[name].append(asyncio.run(run) if name == "direct" else measure(procs[name].pid, run))

            if args.single:  # one token each: only the first is timed
                phase("single", lambda t, k: run_load(t, 1, args.single, prompt, 1, warmup=5))
            for n in levels:
                # the open-loop rate: a fraction of what the engines sustain directly at n streams
                calib = asyncio.run(run_load(urls, n, min(args.requests, 4 * n), prompt, args.max_tokens))
                rates[str(n)] = rate = args.load_factor * calib["throughput_rps"]
                count = max(args.requests, round(rate * args.open_seconds))
                phase(f"open{n}", lambda t, k, rate=rate, count=count: run_open(t, rate, count, prompt,
                                                                                 args.max_tokens, args.seed + k))
                phase(f"closed{n}", lambda t, k, n=n: run_load(t, n, args.closed_requests, prompt,
                                                               args.closed_max_tokens, extra=fast))
            for name, proc in procs.items():
                routers[name]["rss_mb_after"] = rss_mb(proc.pid)
        finally:
            stop(list(procs.values()))
            stop([p for p, _ in engines])

    summary = {key: {name: _summary(rs) for name, rs in per.items()} for key, per in raw.items()}
    for per in summary.values():
        for name, s in per.items():
            if name != "direct":
                s["added_ttft_s"] = _added(s, per["direct"])
                if s["ttft_net_s"] and per["direct"]["ttft_net_s"]:
                    s["added_ttft_net_s"] = _added(s, per["direct"], "ttft_net_s")
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
              "cores": psutil.cpu_count(), "load_average_at_rounds": load_avg, "routers": routers,
              "open_loop_rate_rps": rates,
              "open_loop": {str(n): summary[f"open{n}"] for n in levels},
              "closed_loop": {str(n): summary[f"closed{n}"] for n in levels},
              "one_at_a_time": summary.get("single", {})}
    backend = (f"fake backends (first token {args.fake_ttft_ms:g} ms, then one every {args.fake_itl_ms:g} ms)"
               if args.backend == "fake" else f"engine doubles (time scale {args.time_scale})")
    print(f"{args.engines} {backend}; {rounds} rounds, each running every target in turn (order rotated), "
          f"open loop {args.requests}+ requests ({args.open_seconds:g}+ s) and closed loop {args.closed_requests} "
          f"per phase and round; policy {args.policy}; {psutil.cpu_count()} cores shared "
          f"by everything; load average {min(load_avg, default=0):.1f}-{max(load_avg, default=0):.1f}")
    for name, info in routers.items():
        if not info["available"]:
            print(f"{name}: not measured ({info.get('why', '')[:200]})")

    def ms(x: float) -> str:
        return f"{x * 1e3:7.2f}"

    def spread(a: dict[str, Any], k: str) -> str:
        xs = [r[k] for r in a["per_round"] if k in r]
        return f"{ms(min(xs)).strip()}..{ms(max(xs)).strip()}" if xs else ""

    for n in levels:
        rows = report["open_loop"][str(n)]
        d = rows["direct"]
        print(f"\n{n} streams, open loop at {rates[str(n)]:.1f} req/s ({args.max_tokens} output tokens): direct TTFT "
              f"p50 {d['ttft_s'].get('p50', 0) * 1e3:.2f} ms, p99 {d['ttft_s'].get('p99', 0) * 1e3:.2f} ms, "
              f"{d['in_flight_mean']:.0f} in flight on average (peak {d['in_flight_max']})")
        print("TTFT added, ms: median over rounds of (router - direct of the same round) [range over rounds]; pooled")
        print(f"{'router':14s} {'+p50':>22s} {'+p99':>22s} {'pooled +p50':>11s} {'pooled +p99':>11s} "
              f"{'CPU/req':>8s} {'errors':>6s}")
        for name, r in rows.items():
            if name == "direct":
                continue
            a = r["added_ttft_s"]
            m, p = a["median_of_rounds"], a["pooled"]
            print(f"{name:14s} {ms(m.get('p50', 0))} [{spread(a, 'p50'):>12s}] {ms(m.get('p99', 0))} "
                  f"[{spread(a, 'p99'):>12s}] {ms(p.get('p50', 0)):>11s} {ms(p.get('p99', 0)):>11s} "
                  f"{r['router_cpu_ms_per_request']:6.2f}ms {r['errors']:6d}")
        if any("added_ttft_net_s" in r for r in rows.values()):
            print("the same, net of each backend's own wait to its first event (its timer's slack out of the noise):")
            for name, r in rows.items():
                if "added_ttft_net_s" not in r:
                    continue
                a = r["added_ttft_net_s"]
                m, p = a["median_of_rounds"], a["pooled"]
                print(f"{name:14s} {ms(m.get('p50', 0))} [{spread(a, 'p50'):>12s}] {ms(m.get('p99', 0))} "
                      f"[{spread(a, 'p99'):>12s}] {ms(p.get('p50', 0)):>11s} {ms(p.get('p99', 0)):>11s}")
        print(f"{n} streams, closed loop ({args.closed_max_tokens} output tokens): sustained req/s, median over "
              "rounds [range]")
        for name, r in report["closed_loop"][str(n)].items():
            tps = [x["throughput_rps"] for x in r["rounds"]]
            extra = "" if name == "direct" else (f"  CPU/req {r['router_cpu_ms_per_request']:.2f} ms, RSS "
                                                 f"{r['router_rss_mb']:.0f} MB")
            print(f"  {name:14s} {statistics.median(tps):8.1f} [{min(tps):.0f}..{max(tps):.0f}]  errors "
                  f"{r['errors']}{extra}")
    single = report["one_at_a_time"]
    if single:
        print("\none request at a time, TTFT p50 added (median over rounds): " + ", ".join(
            f"{name} +{r['added_ttft_s']['median_of_rounds'].get('p50', 0) * 1e3:.2f} ms"
            for name, r in single.items() if name != "direct"))
    if args.json is not None:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
