"""``isthmus bench``: prompts built from block hashes, and open-loop replays over real HTTP against real
engine doubles (``isthmus emulate``) and a real router (``isthmus serve``) in subprocesses."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from isthmus.bench.loadgen import (
    Manifest,
    Targets,
    completions_url,
    load_manifest,
    parse_prefix_counters,
    run_bench,
)
from isthmus.bench.prompts import PromptBuilder, block_text, prompt_text
from isthmus.cli import build_app
from isthmus.core.errors import ConfigError
from isthmus.core.hashing import expand_coarse_hash_ids, hash_token_blocks
from isthmus.core.request import Request
from isthmus.core.tokenizer import ByteChunkTokenizer
from isthmus.sim.report import LATENCY_KEYS, SCALAR_KEYS, STAT_KEYS
from isthmus.sim.scenario import load_scenario

ISTHMUS = Path(sys.executable).parent / "isthmus"
READY = re.compile(rb"serving .* on http://127\.0\.0\.1:(\d+)")
TIME_SCALE = 0.05
ENGINE = ("--model", "Mistral-7B", "--gpu", "A100", "--served-model-name", "m", "--time-scale", str(TIME_SCALE),
          "--num-gpu-blocks", "4000")
TOK = ByteChunkTokenizer()


# ----------------------------------------------------------------------------------------- prompts
def req(rid: str, prompt: int, hashes: tuple[int, ...] = (), out: int = 4) -> Request:
    return Request(rid, 0.0, "east", prompt, hashes, out)


def test_prompt_has_exactly_the_requests_tokens_with_blocks_aligned() -> None:
    hashes = expand_coarse_hash_ids([0, 7, 9], 1200)  # 512-token Mooncake ids -> 16-token blocks
    for prompt, hs in ((1200, hashes), (1, ()), (17, ()), (16, hashes[:1]), (1024, hashes[:64])):
        text = prompt_text(req("r1", prompt, hs))
        ids = TOK.encode(text)
        assert len(ids) == prompt and len(text) == 4 * prompt and text.isascii()
        # each hashed block is one 16-token block of the built-in tokenizer's ids
        for i, h in enumerate(hs):
            assert TOK.decode(ids[16 * i:16 * (i + 1)]) == block_text(h, 64)


def test_shared_block_prefix_is_a_shared_text_and_token_prefix() -> None:
    a_ids, b_ids = [0, 1, 2, 3], [0, 1, 5]
    a = req("r1", 1900, expand_coarse_hash_ids(a_ids, 1900))
    b = req("r2", 1500, expand_coarse_hash_ids(b_ids, 1500))
    ta, tb = prompt_text(a), prompt_text(b)
    shared = 2 * 512 * 4  # two coarse blocks of 512 tokens of 4 characters
    assert ta[:shared] == tb[:shared] and ta[shared:shared + 64] != tb[shared:shared + 64]
    # the engine's chained hashes over the token ids agree on exactly those 64 blocks
    ha, hb = hash_token_blocks(TOK.encode(ta)), hash_token_blocks(TOK.encode(tb))
    common = next(i for i, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y)
    assert common == 64
    # the same request twice gives the same text; same hashes, other ids: same hashed part only
    assert prompt_text(a) == ta
    c = req("r3", 1900, a.block_hashes)
    tc = prompt_text(c)
    assert tc[:len(a.block_hashes) * 64] == ta[:len(a.block_hashes) * 64] and tc != ta


def test_distinct_hashes_give_distinct_text_and_tails_are_unique() -> None:
    rng = np.random.default_rng(0)
    hashes = {int(h) for h in rng.integers(-(2**63), 2**63 - 1, 2000)} | {0, -1, 2**63 - 1}
    assert len({block_text(h, 64) for h in hashes}) == len(hashes)
    # requests without hashes (Azure, poisson): every full block unique to the request
    t1, t2 = prompt_text(req("r1", 64)), prompt_text(req("r2", 64))
    assert t1[:64] != t2[:64]
    assert hash_token_blocks(TOK.encode(t1))[0] != hash_token_blocks(TOK.encode(t2))[0]
    # a salt separates runs; other block sizes and chunk widths keep the exact length
    assert prompt_text(req("r1", 64), salt="run2") != t1
    for bs, cb in ((32, 4), (8, 2), (1, 4)):
        r = req("r9", 70, tuple(range(70 // bs)))
        text = PromptBuilder(block_size=bs, chunk_bytes=cb).text(r)
        assert len(ByteChunkTokenizer(cb).encode(text)) == 70
    with pytest.raises(ValueError, match="do not fit"):
        prompt_text(req("r1", 20, (1, 2)))


def test_targets_manifest_and_counters() -> None:
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("https://h/v1/completions") == "https://h/v1/completions"
    with pytest.raises(ConfigError):
        completions_url("h:1")
    m = Manifest.from_dict({"scenario": "s", "policy": "p", "mode": "proxy", "time_scale": 0.1, "model": "m",
                            "entry": {"east": "http://a:1", "west": "http://b:2"}, "routers": [],
                            "replicas": [{"id": "east-0", "url": "http://c:3"}, "x"], "relays": []})
    t = Targets.of_manifest(m)
    assert t.url_for("west") == "http://b:2/v1/completions" and m.metrics_urls() == ["http://c:3/metrics"]
    with pytest.raises(ConfigError, match="no entry point"):
        t.check(["east", "asia"])
    for bad in ({}, {"entry": {}}, {"entry": {"a": 3}}, {"entry": {"a": "http://x"}, "time_scale": 0}):
        with pytest.raises(ConfigError):
            Manifest.from_dict(bad)
    page = ('# HELP x\nvllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 25.0\n')
    assert parse_prefix_counters(page) == (100.0, 25.0) and parse_prefix_counters("up 1\n") is None


# ----------------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"process did not start:\n{log.read_text(errors='replace')}") from None
            time.sleep(0.05)


def post_json(url: str, body: dict[str, Any]) -> None:
    import urllib.request

    r = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(r, timeout=5) as resp:
        assert resp.status == 200


class Bed:
    """Two engine doubles (regions east and west) and one ``isthmus serve`` proxy in east."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.engines: list[str] = []
        self.router = ""

    def start(self) -> Bed:
        logs = []
        for k in range(2):
            log = self.tmp / f"emulate-{k}.log"
            with log.open("wb") as sink:
                self.procs.append(subprocess.Popen([str(ISTHMUS), "emulate", "--port", "0", *ENGINE],
                                                   stdout=sink, stderr=subprocess.STDOUT))
            logs.append(log)
        deadline = time.monotonic() + 30
        for proc, log in zip(self.procs, logs, strict=True):
            while True:
                m = READY.search(log.read_bytes())
                if m:
                    self.engines.append(f"http://127.0.0.1:{int(m.group(1))}")
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"emulator did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.02)
        port = free_port()
        cfg = {"listen": {"host": "127.0.0.1", "port": port}, "region": "east", "mode": "proxy",
               "regions": {"measure": False, "rtt_ms": {"east": {"west": 80}}},
               "replicas": [{"url": u, "region": r, "gpu": "A100", "model": "Mistral-7B"}
                            for u, r in zip(self.engines, ("east", "west"), strict=True)],
               "models": ["m"], "policy": {"name": "least_load"},
               "health": {"probe_period_s": 0.05, "probe_timeout_s": 0.5}, "scrape_period_s": 0.05,
               "log_level": "warning"}
        (self.tmp / "router.yaml").write_text(yaml.safe_dump(cfg))
        log = self.tmp / "router.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([str(ISTHMUS), "serve", str(self.tmp / "router.yaml")], stdout=sink,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_port(port, proc, log)
        self.router = f"http://127.0.0.1:{port}"
        return self

    def manifest(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "scenario": "bench_test", "policy": "least_load", "mode": "proxy", "time_scale": TIME_SCALE,
            "model": "m", "entry": {"east": self.router, "west": self.router},
            "routers": [{"region": "east", "url": self.router}],
            "replicas": [{"id": f"{r}-0", "region": r, "url": u}
                         for u, r in zip(self.engines, ("east", "west"), strict=True)],
            "relays": []}))
        return path

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    tb = Bed(tmp_path_factory.mktemp("testbed"))
    try:
        yield tb.start()
    finally:
        tb.stop()


SCENARIO = """\
name: bench_test
topology:
  regions: [east, west]
  rtt_ms: {{east: {{west: 80}}}}
replicas:
  - {{region: east, gpu: A100-80GB, model: Mistral-7B}}
  - {{region: west, gpu: A100-80GB, model: Mistral-7B}}
workload:
{workload}
router: {{mode: proxy, region: east}}
policies: [least_load]
seed: 3
"""


def mooncake_scenario(tmp: Path, n: int = 30, gap_ms: int = 200) -> Path:
    """A small Mooncake-format trace: every request starts with the same two 512-token blocks."""
    lines = [json.dumps({"timestamp": k * gap_ms, "input_length": 1100 + 7 * k, "output_length": 12,
                         "hash_ids": [0, 1, 100 + k]}) for k in range(n)]
    (tmp / "trace.jsonl").write_text("\n".join(lines) + "\n")
    workload = "  kind: mooncake\n  path: trace.jsonl"
    path = tmp / "mooncake.yaml"
    path.write_text(SCENARIO.format(workload=workload))
    return path


def poisson_scenario(tmp: Path, n: int = 40, rate: float = 20.0) -> Path:
    workload = (f"  kind: poisson\n  rate_rps: {rate}\n  limit: {n}\n"
                "  lengths: {prompt_tokens: 100, output_tokens: 10}")
    path = tmp / "poisson.yaml"
    path.write_text(SCENARIO.format(workload=workload))
    return path


# ----------------------------------------------------------------------------------------- replays
def test_replay_through_a_router_measures_every_request(testbed: Bed, tmp_path: Path) -> None:
    scenario = mooncake_scenario(tmp_path)
    manifest = testbed.manifest(tmp_path / "manifest.json")
    result = run_bench(scenario, manifest)
    outs = result.outcomes
    assert len(outs) == 30 and all(o.completed for o in outs), [o.error for o in outs if not o.completed]
    assert all(o.ttft_s > 0 and o.output_tokens == 12 and len(o.itl_s) == 11 for o in outs)
    rec = result.record()
    assert rec["policy"] == "least_load" and rec["requests"] == rec["completed"] == 30
    assert rec["errors"] == rec["timeouts"] == 0
    ttft, tpot, e2e = rec["ttft_s"], rec["tpot_s"], rec["e2e_s"]
    assert 0 < ttft["p50"] <= ttft["p99"] and e2e["p50"] > 0
    # scenario seconds: a decode step of this model is tens of ms, far below a second
    assert 0.001 < tpot["p50"] < 1.0 and tpot["p50"] < e2e["p50"]
    assert set(rec["served_regions"]) <= {"east", "west"} and sum(rec["served_regions"].values()) == 30
    assert set(rec["served_by"]) <= {"east-0", "west-0"}
    assert 0.0 <= rec["cross_region_share"] <= 1.0
    # 1024 of each ~1200-token prompt is shared: the engines' prefix caches hit
    assert rec["prefix_hit_rate"] is not None and rec["prefix_hit_rate"] > 0.4
    assert set(rec["per_region"]) == {"east", "west"}
    assert sum(r["requests"] for r in rec["per_region"].values()) == 30

    # the shared figures have the simulator's keys and shapes
    sim = load_scenario(scenario).run("least_load").summary()
    for key in (*SCALAR_KEYS, *LATENCY_KEYS, "output_tokens_per_s", "per_region"):
        assert key in rec and key in sim, key
    for key in LATENCY_KEYS:
        assert set(rec[key]) == set(sim[key]) == set(STAT_KEYS)
    # the engines' prefix caches saw the sharing the simulator's saw (hash-built prompts, blocks aligned)
    assert rec["prefix_hit_rate"] == pytest.approx(sim["prefix_hit_rate"], abs=0.05)
    shared_region_keys = set(sim["per_region"]["east"]) & set(rec["per_region"]["east"])
    assert {"completed", "ttft_s", "tpot_s", "e2e_s", "throughput_rps", "cross_region_share"} <= shared_region_keys
    doc = result.document()
    assert doc["scenario"] == "bench_test" and doc["seed"] == 3 and len(doc["results"]) == 1
    assert doc["bench"]["time_scale"] == TIME_SCALE


def test_arrivals_are_honoured(testbed: Bed, tmp_path: Path) -> None:
    scenario = poisson_scenario(tmp_path, n=40, rate=20.0)
    requests = list(load_scenario(scenario).requests(3))
    scale = 0.2
    t = time.perf_counter()
    result = run_bench(scenario, target=testbed.engines[0], time_scale=scale)
    took = time.perf_counter() - t
    assert all(o.completed for o in result.outcomes)
    lags = np.array([o.send_lag_s for o in result.outcomes])
    # the machine may be shared: generous bounds, still far below the ~10 ms mean wall gap
    assert np.median(lags) < 0.01 and lags.max() < 0.2
    due = np.array([o.due_s for o in result.outcomes])
    assert np.allclose(due, [r.arrival * scale for r in requests])
    last = requests[-1].arrival * scale
    tail = max(o.end_s - o.due_s for o in result.outcomes)
    assert last <= result.wall_s <= last + tail + 0.2 and took < result.wall_s + 5.0
    rec = result.record()
    assert rec["served_regions"] == {"unknown": 40} and rec["cross_region_share"] is None
    assert rec["send_lag_s"]["max"] == pytest.approx(lags.max())
    # latencies come back in scenario seconds: the same replay twice as fast reports similar TPOT
    assert 0.001 < rec["tpot_s"]["p50"] < 1.0


def test_refused_connections_errors_and_timeouts_are_counted(testbed: Bed, tmp_path: Path) -> None:
    scenario = poisson_scenario(tmp_path, n=6, rate=50.0)
    closed = f"http://127.0.0.1:{free_port()}"
    result = run_bench(scenario, target=closed, time_scale=0.1, scrape_prefix=False)
    rec = result.record()
    assert rec["completed"] == 0 and rec["errors"] == 6 and rec["error_kinds"] == {"connect": 6}
    assert rec["ttft_s"]["p50"] is None and rec["throughput_rps"] == 0.0

    engine = testbed.engines[1]
    post_json(f"{engine}/admin/fault", {"error_rate": 1.0, "error_status": 503})
    try:
        rec = run_bench(scenario, target=engine, time_scale=0.1, model="m").record()
    finally:
        post_json(f"{engine}/admin/fault", {})
    assert rec["completed"] == 0 and rec["error_kinds"] == {"status 503": 6}
    rec = run_bench(scenario, target=engine, time_scale=0.1, model="nope").record()
    assert rec["error_kinds"] == {"status 404": 6}

    post_json(f"{engine}/admin/fault", {"stall_after": 1})
    try:
        rec = run_bench(scenario, target=engine, time_scale=0.1, timeout_s=3.0).record()  # 0.3 wall seconds
    finally:
        post_json(f"{engine}/admin/fault", {})
    assert rec["timeouts"] == 6 and rec["errors"] == 0 and rec["error_kinds"] == {"timeout": 6}


# ----------------------------------------------------------------------------------------- CLI
def test_cli_writes_json_and_plot(testbed: Bed, tmp_path: Path) -> None:
    scenario = mooncake_scenario(tmp_path, n=10, gap_ms=100)
    manifest = testbed.manifest(tmp_path / "manifest.json")
    out, png = tmp_path / "bench.json", tmp_path / "ttft.png"
    r = CliRunner().invoke(build_app(), ["bench", str(scenario), "--testbed", str(manifest), "--limit", "8",
                                   "--json", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    rec = doc["results"][0]
    assert rec["requests"] == rec["completed"] == 8 and rec["policy"] == "least_load"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT" in r.output and "send lag" in r.output
    assert load_manifest(manifest).time_scale == TIME_SCALE


@pytest.mark.parametrize("args, message", [
    (["missing.yaml", "--target", "http://127.0.0.1:9"], "no such scenario file"),
    (["{bad}", "--target", "http://127.0.0.1:9"], "workload"),
    (["{good}"], "exactly one of"),
    (["{good}", "--target", "http://127.0.0.1:9", "--testbed", "{good}"], "exactly one of"),
    (["{good}", "--testbed", "{good}"], "not valid JSON"),
    (["{good}", "--target", "localhost:9"], "not an http"),
    (["{good}", "--target", "http://127.0.0.1:9", "--time-scale", "0"], "--time-scale"),
    (["{good}", "--target", "http://127.0.0.1:9", "--rate", "-1"], "--rate"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    good = poisson_scenario(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("rate_rps: 20.0", "rate_rps: -3"))
    args = [a.format(good=good, bad=bad) for a in args]
    r = CliRunner().invoke(build_app(), ["bench", *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output


def test_manifest_without_the_origin_region_is_a_config_error(tmp_path: Path) -> None:
    scenario = poisson_scenario(tmp_path)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"entry": {"east": "http://127.0.0.1:9"}, "time_scale": 1}))
    with pytest.raises(ConfigError, match="'west'"):
        run_bench(scenario, manifest)
    assert math.isfinite(load_manifest(manifest).time_scale)
