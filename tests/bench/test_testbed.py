"""The testbed with real processes: engine doubles, the relay process, routers (no mocks).

Every test runs a small scenario at a high acceleration (time scale 0.2: RTTs 5x shorter)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from isthmus.bench.testbed import ORIGIN_HEADER, Testbed, TestbedError
from isthmus.core.errors import ConfigError, RegistryError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "scenarios" / "tiny.yaml"
TS = 0.2
CLI = [sys.executable, "-c", "import typer; from isthmus.bench.testbed_cli import testbed; typer.run(testbed)"]

REGIONAL = """\
name: three_regions
topology:
  regions: [us-west, germany, israel]
  rtt_ms:
    us-west: {germany: 281, israel: 183}
    germany: {israel: 60}
replicas:
  - {region: us-west, gpu: H100, model: Llama-3.1-8B}
  - {region: germany, gpu: A100-80GB, model: Llama-3.1-8B}
workload: {kind: poisson, rate_rps: 1, limit: 10}
router: {mode: proxy, region: germany}
policies:
  - least_load
  - {name: least_load, label: least_load_regional, router: {mode: regional, sync_period_s: 0.5}}
"""


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _complete(url: str, origin: str, model: str, stream: bool = True) -> tuple[int, dict[str, str], bytes, float]:
    """POST /v1/completions to ``url`` as a client in ``origin``: (status, headers, body, seconds)."""
    host, port = _hostport(url)
    body = json.dumps({"model": model, "prompt": "The testbed says hello", "max_tokens": 4, "stream": stream})
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body,
                     headers={"content-type": "application/json", ORIGIN_HEADER: origin})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.perf_counter() - t0
    finally:
        conn.close()


def _no_children_left(pids: list[int]) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    ours = [p for p in psutil.Process().children(recursive=True) if p.pid in pids]
    assert ours == []


def test_proxy_testbed_routes_streams_and_stops_clean(tmp_path: Path) -> None:
    tb = Testbed(TINY, "round_robin", time_scale=TS, log_dir=tmp_path / "run")
    with tb:
        m = tb.manifest_or_fail()
        assert (m["scenario"], m["policy"], m["mode"], m["time_scale"]) == ("tiny", "round_robin", "proxy", TS)
        assert set(m["entry"]) == {"us-west", "israel"}
        assert [r["region"] for r in m["routers"]] == ["us-west"]  # no region given: the first
        assert {r["id"] for r in m["replicas"]} == {"us-west-0", "israel-0"}
        assert json.loads((tmp_path / "run" / "manifest.json").read_text())["entry"] == m["entry"]
        far = [r for r in m["relays"] if (r["from"], r["to"]) == ("israel", "us-west")]
        assert len(far) == 1 and far[0]["one_way_ms"] == pytest.approx(183 / 2 * TS)
        region_of = {r["id"]: r["region"] for r in m["replicas"]}
        topo = tb.topology
        targets = set()
        for origin in ("israel", "us-west", "israel", "us-west"):
            status, headers, body, elapsed = _complete(m["entry"][origin], origin, m["model"])
            assert status == 200, body
            target = headers["x-isthmus-target"]
            targets.add(target)
            assert body.rstrip().endswith(b"data: [DONE]")
            assert body.startswith(b"data: ")
            # client -> proxy and proxy -> replica, each a scaled round trip, at the least
            floor = (topo.rtt(origin, "us-west") + topo.rtt("us-west", region_of[target])) * TS
            assert elapsed >= floor - 0.002, (origin, target, elapsed, floor)
            if origin == "israel":
                assert elapsed >= 0.183 * TS - 0.002
        assert targets == {"us-west-0", "israel-0"}  # round robin reached both, through the relays
        pids = tb.pids()
        assert len(pids) == 4  # 2 engines, 1 router, 1 relay process
    _no_children_left(pids)
    assert tb.pids() == []
    assert (tmp_path / "run" / "router-us-west.log").stat().st_size > 0


def test_regional_testbed_has_a_router_per_region_with_replicas(tmp_path: Path) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(REGIONAL)
    with Testbed(path, "least_load_regional", time_scale=TS, log_dir=tmp_path / "run") as tb:
        m = tb.manifest_or_fail()
        assert m["mode"] == "regional"
        assert sorted(r["region"] for r in m["routers"]) == ["germany", "us-west"]
        pairs = {(r["from"], r["to"]) for r in m["relays"]}
        assert {("us-west", "germany"), ("germany", "us-west")} <= pairs  # peers reach each other delayed
        # israel has no replica, so no router: its clients enter at the nearest region's (germany)
        israel = [r for r in m["relays"] if r["from"] == "israel"]
        assert [(r["to"], r["one_way_ms"]) for r in israel] == [("germany", pytest.approx(30 * TS))]
        cfg = (tmp_path / "run" / "router-germany.yaml").read_text()
        assert "sync_period_s: 0.1" in cfg and "mode: regional" in cfg
        for origin in ("israel", "us-west", "germany"):
            status, headers, body, elapsed = _complete(m["entry"][origin], origin, m["model"], stream=False)
            assert status == 200, body
            assert headers["x-isthmus-target"] in {"us-west-0", "germany-0"}
        status, _, _, elapsed = _complete(m["entry"]["israel"], "israel", m["model"])
        assert status == 200 and elapsed >= 0.060 * TS - 0.002
        pids = tb.pids()
    _no_children_left(pids)


def test_bad_inputs_fail_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(RegistryError):
        Testbed(TINY, "no_such_policy")
    with pytest.raises(ConfigError):
        Testbed(tmp_path / "missing.yaml")
    with pytest.raises(TestbedError, match="regional"):
        path = tmp_path / "three.yaml"
        path.write_text(REGIONAL)
        Testbed(path, "least_load_regional", router="external", router_cmd="x {port}")
    with pytest.raises(TestbedError, match="placeholder"):
        Testbed(TINY, router="external", router_cmd="x {prot}")


def test_external_router_gets_the_worker_urls(tmp_path: Path) -> None:
    script = tmp_path / "fake_router.py"
    script.write_text(
        "import sys, json, http.server\n"
        "host, port, argv_file, *workers = sys.argv[1:]\n"
        "open(argv_file, 'w').write(json.dumps(workers))\n"
        "http.server.HTTPServer((host, int(port)), http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    argv_file = tmp_path / "argv.json"
    cmd = f"{sys.executable} {script} {{host}} {{port}} {argv_file} {{workers}}"
    with Testbed(TINY, time_scale=TS, router="external", router_cmd=cmd, log_dir=tmp_path / "run") as tb:
        m = tb.manifest_or_fail()
        workers = json.loads(argv_file.read_text())
        relays_to_engines = {f"http://{r['listen']}" for r in m["relays"]
                             if r["upstream"] in {u["url"].removeprefix("http://") for u in m["replicas"]}}
        assert set(workers) == relays_to_engines and len(workers) == 2
        status, _, _, elapsed = _complete(m["entry"]["israel"], "israel", m["model"])
        assert status in (404, 501)  # the fake router answered, through the israel -> us-west relay
        assert elapsed >= 0.183 * TS - 0.002
        pids = tb.pids()
    _no_children_left(pids)


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_exits_2_on_a_bad_scenario_or_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("gpu: H100", "gpu: B9000", 1))
    r = _run_cli(str(bad))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "B9000" in lines[0]
    r = _run_cli(str(TINY), "--policy", "no_such_policy")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no_such_policy" in r.stderr


def test_cli_runs_until_sigterm_then_stops_everything(tmp_path: Path) -> None:
    manifest = tmp_path / "out" / "testbed.json"
    proc = subprocess.Popen([*CLI, str(TINY), "--time-scale", str(TS), "--manifest", str(manifest),
                             "--logs", str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 30
        while not manifest.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        m: dict[str, Any] = json.loads(manifest.read_text())
        pids = [r["pid"] for r in m["routers"] + m["replicas"]] + [m["relay_pid"]]
        status, headers, _, _ = _complete(m["entry"]["us-west"], "us-west", m["model"])
        assert status == 200 and headers["x-isthmus-target"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert m["entry"]["israel"] in out  # the table says where to send
    for pid in pids:
        assert not psutil.pid_exists(pid), pid
