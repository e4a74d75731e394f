"""SLO classes in the load generator, the testbed's router configs and ``isthmus compare``.

Replays run against real processes: an engine double (``isthmus emulate``), and a small aiohttp
server of this module that answers as an SLO-aware router would (429 ``slo_unattainable`` for the
classes it cannot serve, ``x-isthmus-slo-class`` on what it relays)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from typer.testing import CliRunner

from isthmus.bench.compare import PolicyComparison, slo_comparison
from isthmus.bench.compare_cli import compare_table
from isthmus.bench.loadgen import SLO_CLASS_HEADER, SLO_HEADER, run_bench
from isthmus.bench.testbed import Testbed, TestbedError
from isthmus.cli import build_app
from isthmus.core.slo import slo_attained
from isthmus.router.config import RouterConfig
from isthmus.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "scenarios" / "tiny.yaml"
ISTHMUS = Path(sys.executable).parent / "isthmus"
READY = re.compile(rb"serving .* on http://127\.0\.0\.1:(\d+)")
REASON = "SLO class 'interactive' cannot be met on any replica (best estimate, on east-0: TTFT 1.233 s > 1 s)"

SCENARIO = """\
name: slo_bench
topology:
  regions: [east]
replicas:
  - {{region: east, gpu: A100-80GB, model: Mistral-7B}}
workload:
  kind: poisson
  rate_rps: {rate}
  limit: {n}
  lengths: {{prompt_tokens: 100, output_tokens: 10}}
slo:
  classes:
{classes}
  shares: {shares}
policies: [least_load]
seed: 5
"""


def scenario(tmp: Path, classes: list[str], shares: str, n: int, rate: float) -> Path:
    path = tmp / "slo_bench.yaml"
    path.write_text(SCENARIO.format(rate=rate, n=n, shares=shares,
                                    classes="\n".join(f"    - {c}" for c in classes)))
    return path


# ----------------------------------------------------------------------------------------- a router's answers
@dataclass
class FakeRouter:
    """Answers 429 ``slo_unattainable`` to ``interactive`` requests, 429 ``rate_limit_exceeded`` (an
    overload, not a rejection) to the request ids in ``overloaded``, and streams three tokens to the
    others; records the SLO class header of every request by request id."""

    url: str = ""
    seen: dict[str, str | None] = field(default_factory=dict)
    overloaded: set[str] = field(default_factory=set)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("x-request-id", "")
        slo = request.headers.get(SLO_HEADER)
        self.seen[rid] = slo
        await request.read()
        if slo == "interactive":
            return web.json_response({"error": {"message": REASON, "type": "rate_limit_error", "param": None,
                                                "code": "slo_unattainable"}}, status=429)
        if rid in self.overloaded:
            return web.json_response({"error": {"message": "too many requests in progress; retry later",
                                                "type": "rate_limit_error", "param": None,
                                                "code": "rate_limit_exceeded"}}, status=429)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", SLO_CLASS_HEADER: slo or ""})
        await resp.prepare(request)
        for k in range(3):
            chunk = {"choices": [{"index": 0, "text": f" t{k}", "finish_reason": "length" if k == 2 else None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}}
        await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
def fake_router() -> Iterator[FakeRouter]:
    fake = FakeRouter()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    app = web.Application()
    app.router.add_post("/v1/completions", fake.completions)
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        fake.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined]
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


TWO_CLASSES = ["{name: interactive, ttft_ms: 1000, tpot_ms: 80}", "{name: batch, e2e_ms: 20000, priority: 1}"]


def test_header_rejections_and_failures_per_class(fake_router: FakeRouter, tmp_path: Path) -> None:
    path = scenario(tmp_path, TWO_CLASSES, "{interactive: 0.5, batch: 0.5}", n=24, rate=50.0)
    requests = list(load_scenario(path).requests(5))
    cls = {r.id: r.slo.name for r in requests if r.slo is not None}
    n_int = sum(1 for c in cls.values() if c == "interactive")
    n_batch = len(requests) - n_int
    assert len(cls) == 24 and n_int >= 3 and n_batch >= 3
    first_batch = next(r.id for r in requests if cls[r.id] == "batch")
    fake_router.overloaded = {f"bench-{first_batch}"}

    result = run_bench(path, target=fake_router.url, time_scale=0.2, scrape_prefix=False)
    # every request named its class in the header
    assert fake_router.seen == {f"bench-{rid}": c for rid, c in cls.items()}
    for o in result.outcomes:
        assert o.slo_class == cls[o.id]
        if o.slo_class == "interactive":
            assert (o.status, o.rejected, o.reject_reason, o.error) == (429, "slo_unattainable", REASON, None)
            assert not o.completed and not o.failed
        elif o.id == first_batch:
            assert o.failed and o.rejected is None and o.error is not None and o.error.startswith("status 429")
        else:
            assert o.completed and o.slo_applied == "batch"

    rec = result.record()
    assert (rec["requests"], rec["completed"], rec["rejected"], rec["errors"]) == (24, n_batch - 1, n_int, 1)
    assert rec["rejections"] == {"slo_unattainable": n_int}
    assert rec["rejection_examples"] == {"slo_unattainable": [REASON]}
    assert rec["error_kinds"] == {"status 429": 1}  # an overloaded router's 429 is an error, not a rejection
    slo = rec["slo"]
    inter, batch = slo["classes"]["interactive"], slo["classes"]["batch"]
    assert list(slo["classes"]) == ["interactive", "batch"]  # the scenario's order
    assert (inter["requests"], inter["completed"], inter["rejected"], inter["failed"], inter["attained"]) == (
        n_int, 0, n_int, 0, 0)
    assert inter["rejections"] == {"slo_unattainable": n_int} and inter["attainment"] == 0.0
    assert inter["goodput_rps"] == 0.0 and inter["ttft_s"]["p50"] is None
    # a fast server meets the batch class's 20 s end to end; the overloaded request is a miss
    assert (batch["requests"], batch["completed"], batch["rejected"], batch["failed"], batch["attained"]) == (
        n_batch, n_batch - 1, 0, 1, n_batch - 1)
    assert batch["attainment"] == pytest.approx((n_batch - 1) / n_batch)
    assert (slo["requests"], slo["rejected"], slo["failed"], slo["attained"]) == (24, n_int, 1, n_batch - 1)
    assert slo["attainment"] == pytest.approx((n_batch - 1) / 24)
    assert slo["goodput_rps"] == pytest.approx(rec["throughput_rps"]) and slo["goodput_rps"] > 0


def test_cli_prints_and_writes_slo_figures(fake_router: FakeRouter, tmp_path: Path) -> None:
    path = scenario(tmp_path, TWO_CLASSES, "{interactive: 0.5, batch: 0.5}", n=12, rate=50.0)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(build_app(), ["bench", str(path), "--target", fake_router.url, "--time-scale", "0.2",
                                   "--json", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())["results"][0]
    n_int = rec["slo"]["classes"]["interactive"]["requests"]
    assert rec["rejected"] == n_int > 0 and rec["errors"] == 0
    assert "SLO attainment" in r.output and "SLO interactive: attained of requests" in r.output
    assert "slo_unattainable" in r.output and f"rejected {n_int}" in r.output


# ----------------------------------------------------------------------------------------- engine doubles
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("engine") / "emulate.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(ISTHMUS), "emulate", "--port", "0", "--model", "Mistral-7B", "--gpu", "A100",
                                 "--served-model-name", "m", "--time-scale", "0.05"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (m := READY.search(log.read_bytes())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"emulator did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{int(m.group(1))}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_attainment_and_goodput_measured_on_an_engine_double(engine: str, tmp_path: Path) -> None:
    classes = ["{name: loose, e2e_ms: 600000}", "{name: first_token_now, ttft_ms: 1}",
               "{name: done_now, e2e_ms: 1, priority: 1}"]
    path = scenario(tmp_path, classes, "{loose: 0.5, first_token_now: 0.25, done_now: 0.25}", n=30, rate=20.0)
    ts = 0.05
    result = run_bench(path, target=engine, time_scale=ts, model="m", scrape_prefix=False)
    outs = result.outcomes
    assert all(o.completed for o in outs), [o.error for o in outs if not o.completed]
    # each request judged on its own client-measured latencies, scenario seconds
    for o in outs:
        assert o.slo is not None
        assert o.slo_met(ts) == slo_attained(o.slo, o.ttft_s / ts, o.tpot_s() / ts, o.e2e_s / ts)
        # a 7B model on an A100 cannot answer within 1 ms; 10 minutes end to end it always does
        assert o.slo_met(ts) == (o.slo_class == "loose")
    rec = result.record()
    slo = rec["slo"]
    by_class = {name: sum(1 for o in outs if o.slo_class == name) for name in ("loose", "first_token_now",
                                                                                "done_now")}
    assert all(n > 0 for n in by_class.values()) and sum(by_class.values()) == 30
    for name, c in slo["classes"].items():
        assert (c["requests"], c["completed"], c["rejected"], c["failed"]) == (by_class[name], by_class[name], 0, 0)
        assert c["attainment"] == (1.0 if name == "loose" else 0.0)
        assert c["ttft_s"]["p50"] > 0 and c["e2e_s"]["p99"] >= c["e2e_s"]["p50"]
    assert slo["attained"] == by_class["loose"] and slo["attainment"] == pytest.approx(by_class["loose"] / 30)
    # goodput: requests meeting their SLO per scenario second, over the same span as the throughput
    assert slo["goodput_rps"] == pytest.approx(rec["throughput_rps"] * by_class["loose"] / 30)
    assert slo["classes"]["loose"]["goodput_rps"] == pytest.approx(slo["goodput_rps"])
    assert rec["rejected"] == 0 and rec["rejections"] == {}

    # the simulator's keys, and the same classes for the same seed
    sim = load_scenario(path).run("least_load").summary()["slo"]
    assert set(sim) <= set(slo) and set(slo) - set(sim) == {"failed"}
    for name in by_class:
        assert set(sim["classes"][name]) <= set(slo["classes"][name])
        assert sim["classes"][name]["requests"] == by_class[name]


# ----------------------------------------------------------------------------------------- testbed configs
TESTBED = """\
name: slo_testbed
topology:
  regions: [us-west, germany]
  rtt_ms: {us-west: {germany: 281}}
  gpu_usd_per_hour: {H100: 3.0, A100-80GB: 1.8}
  egress_usd_per_gb: {us-west: {germany: 0.02}}
  bytes_per_token: 4
replicas:
  - {region: us-west, gpu: H100, model: Llama-3.1-8B, max_num_seqs: 64}
  - {region: germany, gpu: A100-80GB, model: %(model)s, count: 2}
workload: {kind: poisson, rate_rps: 1, limit: 10}
slo:
  classes:
    - {name: interactive, ttft_ms: 1000, tpot_ms: 80}
    - {name: batch, e2e_ms: 20000, priority: 1}
  shares: {interactive: 0.6, batch: 0.4}
  per_session: false
  default: batch
  by_model: {Llama-3.1-8B: interactive, %(other)s: batch}
router: {mode: proxy, region: germany, max_hold_s: 10}
policies:
  - {name: slo, label: slo_reject, params: {unattainable: reject}}
  - {name: slo, label: slo_fifo, router: {queue: fifo}}
  - least_load
"""


def write_testbed_scenario(tmp: Path, model: str = "Llama-3.1-8B", other: str = "some-other-model") -> Path:
    path = tmp / "slo_testbed.yaml"
    path.write_text(TESTBED % {"model": model, "other": other})
    return path


def test_router_config_carries_slo_classes_prices_queue_and_engine_settings(tmp_path: Path) -> None:
    path = write_testbed_scenario(tmp_path)
    tb = Testbed(path, "slo_reject", time_scale=0.5, log_dir=tmp_path / "run")
    urls = {i.id: f"http://127.0.0.1:{9000 + k}" for k, i in enumerate(tb.instances)}
    cfg = tb.router_config("germany", urls)
    assert cfg["slo"] == {
        "classes": [{"name": "interactive", "ttft_ms": 500.0, "tpot_ms": 40.0, "priority": 0},  # wall ms
                    {"name": "batch", "e2e_ms": 10000.0, "priority": 1}],
        "default": "batch",
        "by_model": {"Llama-3.1-8B": "interactive"},  # the served name; a model the testbed lacks is left out
    }
    regions = cfg["regions"]
    assert regions["gpu_usd_per_hour"] == {"H100": 3.0, "A100-80GB": 1.8}
    assert regions["egress_usd_per_gb"] == {"us-west": {"germany": 0.02}} and regions["bytes_per_token"] == 4.0
    assert regions["rtt_ms"]["us-west"]["germany"] == pytest.approx(281 * 0.5)
    assert cfg["limits"]["queue"] == "edf" and cfg["limits"]["max_hold_s"] == pytest.approx(5.0)
    assert [(r["id"], r["max_num_seqs"], r["priority"]) for r in cfg["replicas"]] == [
        ("us-west-0", 64, True), ("germany-0", 128, True), ("germany-1", 128, True)]
    assert cfg["policy"] == {"name": "slo", "params": {"unattainable": "reject"}, "seed": 0}

    # the router's own schema takes it, and resolves classes as the workload names them
    router = RouterConfig.model_validate(cfg)
    assert router.limits.queue == "edf" and router.replicas[0].max_num_seqs == 64 and router.replicas[0].priority
    assert router.slo is not None
    catalog = router.slo.catalog()
    batch, by_model = catalog.resolve(header="batch"), catalog.resolve(model="Llama-3.1-8B")
    assert batch is not None and batch.e2e_s == pytest.approx(10.0)
    assert by_model is not None and by_model.name == "interactive"
    assert router.regions.prices().gpu_price("H100") == 3.0

    # the queue order is resolved as the simulator resolves it: the file, then the policy, then fifo
    for label, queue in (("slo_fifo", "fifo"), ("least_load", "fifo")):
        cfg = Testbed(path, label, time_scale=0.5, log_dir=tmp_path / "run").router_config("germany", urls)
        assert cfg["limits"] == {**cfg["limits"], "queue": queue, "max_hold_s": pytest.approx(5.0)}
        RouterConfig.model_validate(cfg)


def test_router_config_without_slo_or_prices_and_bad_inputs(tmp_path: Path) -> None:
    tb = Testbed(TINY, "round_robin", time_scale=0.2, log_dir=tmp_path / "run")
    urls = {i.id: "http://127.0.0.1:9" for i in tb.instances}
    cfg = tb.router_config("us-west", urls)
    assert "slo" not in cfg and set(cfg["regions"]) == {"rtt_ms", "intra_region_rtt_ms", "measure"}
    assert all(r["priority"] is True and r["max_num_seqs"] >= 1 for r in cfg["replicas"])
    RouterConfig.model_validate(cfg)
    with pytest.raises(TestbedError, match="no router in region"):
        tb.router_config("israel", urls)
    with pytest.raises(TestbedError, match="no URL"):
        tb.router_config("us-west", {})
    # two models of the testbed (served under one name) mapped to two classes: refused before start
    path = write_testbed_scenario(tmp_path, model="Mistral-7B", other="Mistral-7B")
    with pytest.raises(TestbedError, match="two classes"):
        Testbed(path, "slo_reject", log_dir=tmp_path / "run")


# ----------------------------------------------------------------------------------------- compare
def _record(policy: str, inter: float, batch: float, goodput: float, rejected: int) -> dict[str, Any]:
    def entry(att: float, n: int = 10) -> dict[str, Any]:
        return {"attainment": att, "goodput_rps": goodput, "rejected": rejected, "requests": n}

    return {"policy": policy, "requests": 20, "ttft_s": {"mean": 1.0, "p99": 2.0}, "tpot_s": {"mean": 0.05},
            "throughput_rps": 2.0, "slo": {**entry((inter + batch) / 2, 20),
                                           "classes": {"interactive": entry(inter), "batch": entry(batch)}}}


def test_compare_puts_slo_attainment_side_by_side() -> None:
    sim, real = _record("slo", 0.9, 1.0, 2.0, 1), _record("slo", 0.8, 1.0, 1.5, 3)
    got = slo_comparison(sim, real)
    assert got is not None and list(got["classes"]) == ["interactive", "batch"]
    inter = got["classes"]["interactive"]
    assert inter["simulated"] == {"attainment": 0.9, "goodput_rps": 2.0, "rejected": 1.0}
    assert inter["measured"]["attainment"] == 0.8 and inter["attainment_diff"] == pytest.approx(-0.1)
    assert got["all"]["attainment_diff"] == pytest.approx(-0.05)
    assert got["all"]["goodput_rel_error"] == pytest.approx(-0.25)
    assert slo_comparison({"ttft_s": {}}, {"ttft_s": {}}) is None
    # a class only one side has still gets a row, the other side's figures null
    real["slo"]["classes"]["extra"] = {"attainment": 1.0}
    extra = slo_comparison(sim, real)["classes"]["extra"]  # type: ignore[index]
    assert extra["simulated"]["attainment"] is None and extra["attainment_diff"] is None

    row = PolicyComparison(policy="slo", mode="proxy", simulated=sim, measured=real).row()
    assert row["slo"]["classes"]["batch"]["attainment_diff"] == 0.0
    assert "slo" not in PolicyComparison(policy="x", mode="proxy", simulated={}, measured={}).row()

    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(compare_table([row], title="t", tolerance=0.1))
    text = console.export_text()
    assert "SLO attained" in text and "interactive" in text and "-10.0 pt" in text and "goodput req/s" in text
