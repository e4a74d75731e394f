"""Placement configs (strict, located errors) and the ``isthmus place`` command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import orjson
import pytest
from place_cases import PLACE
from typer.testing import CliRunner

from isthmus.cli import build_app
from isthmus.core.errors import ConfigError
from isthmus.place.config import load_config
from isthmus.place.run import auto_concurrent_sessions, run_setup

TINY = PLACE / "tiny.yaml"


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_every_bundled_config_loads() -> None:
    for path in sorted(PLACE.glob("*.yaml")):
        setup = load_config(path)
        assert setup.instance.n_servers >= 4 and setup.instance.blocks >= 4, path


def test_topology_config_places_servers_on_random_nodes_reproducibly() -> None:
    a, b = (load_config(PLACE / "abovenet.yaml") for _ in range(2))
    assert a.instance.server_names == b.instance.server_names and len(a.instance.server_names) == 9
    assert a.instance.server_kinds.count("A100") == 2 and len(set(a.instance.server_sites)) == 9
    assert a.instance.client_sites[0] not in a.instance.server_sites
    # RTTs from the delay column, doubled; overheads from the config
    assert np.all(a.instance.client_rtt_s > 0) and a.instance.token_overhead_s == pytest.approx(0.1)
    assert a.instance.prompt_overhead_s == pytest.approx((67 + 0.7049 * 20) / 1e3)


def test_auto_concurrency_follows_the_papers_rule() -> None:
    setup = load_config(PLACE / "clustered_9.yaml")
    sessions = auto_concurrent_sessions(setup.instance, 0.5)
    # one session alone takes ~58.7 s: 0.5 req/s * 58.7 s = 29.4 in flight, + one sd -> 35
    assert sessions == 35
    assert auto_concurrent_sessions(setup.instance, 0.1) == 8


@pytest.mark.parametrize(("text", "expected"), [
    ("name: [", "YAML syntax error"),
    ("- a\n", "must be a YAML mapping"),
])
def test_unparsable_files_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, text))


def test_missing_file_is_named(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such placement config file"


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("block_gb: 0.01", "block_gb: -1", ":8: model.block_gb: Input should be greater than 0"),
    ("rate_rps: 0.05", "rate_rps: 0.05\n  burst: 3", "workload.burst: unknown field"),
    ("concurrent_sessions: 4", "concurrent_sessions: 0", "workload.concurrent_sessions: must be >= 1 or 'auto'"),
    ("- {type: gpu, at: east, count: 2}", "- {type: tpu, at: east, count: 2}",
     "servers.0.type: unknown server type 'tpu'; types: gpu"),
    ("- {at: east}", "- {at: north}", "clients.0.at: unknown site 'north'"),
    ("algorithms: [petals, cg_bprr, cg_bprr_ls, milp, milp_cg]", "algorithms: [petals, magic]",
     "algorithms.1: unknown algorithm 'magic'"),
    ("rtt_ms: {east: {west: 60}}", "rtt_ms: {east: {west: 60}}\n  clusters: {intra_ms: 1, inter_ms: 2}",
     "network: give exactly one of clusters, rtt_ms, topology"),
    ("memory_gb: 0.08", "memory_gb: .inf", "server_types.gpu.memory_gb: must be a finite number"),
])
def test_bad_fields_are_located(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = TINY.read_text()
    assert old in text
    msg = error_of(write(tmp_path, text.replace(old, new)))
    assert msg.startswith(str(tmp_path / "p.yaml")) and expected in msg, msg


def test_topology_errors_are_located(tmp_path: Path) -> None:
    base = (PLACE / "abovenet.yaml").read_text().replace("../../data/topology_zoo/", str(PLACE.parents[1] / "data" /
                                                                                     "topology_zoo") + "/")
    missing = base.replace("Abvt.graph", "Nowhere.graph")
    assert "network.topology: no such topology file" in error_of(write(tmp_path, missing))
    broken = tmp_path / "broken.graph"
    broken.write_text("NODES 2\nlabel x y\n0_A 0 0\n")
    msg = error_of(write(tmp_path, base.replace(str(PLACE.parents[1] / "data" / "topology_zoo" / "Abvt.graph"),
                                                str(broken))))
    assert "network.topology" in msg and "file ends after 1 of 2 nodes" in msg
    explicit = base.replace("sites: {seed: 0, servers: {A100: 2, MIG: 7}, clients: 1}",
                            "servers: [{type: A100, at: Gotham}]\nclients: [{at: Miami}]")
    assert "servers.0.at: unknown node 'Gotham'" in error_of(write(tmp_path, explicit))
    too_many = base.replace("MIG: 7}", "MIG: 70}")
    assert "sites: 73 sites asked for, the topology has 23 nodes" in error_of(write(tmp_path, too_many))
    clustered = (PLACE / "clustered_9.yaml").read_text() + "sites: {servers: {A100: 1}}\n"
    assert "sites: random sites need network.topology" in error_of(write(tmp_path, clustered))


def test_run_compares_the_algorithms_on_identical_arrivals() -> None:
    run = run_setup(load_config(TINY), ["petals", "cg_bprr", "cg_bprr_ls", "milp"])
    by = {r.name: r for r in run.results}
    assert all(r.simulated is not None and r.simulated["sessions"] == 40 for r in run.results)
    assert by["milp"].status == "optimal" and by["cg_bprr"].status == "ok"
    assert by["cg_bprr_ls"].predicted is not None and by["cg_bprr"].predicted is not None
    assert by["cg_bprr_ls"].predicted["session_s"] < 0.4 * by["cg_bprr"].predicted["session_s"]
    th = by["cg_bprr"].details["theorem2"]
    assert th["per_token_s"] <= th["per_token_bound_s"] * (1 + 1e-12)


def test_place_command_prints_and_writes(tmp_path: Path) -> None:
    out, png = tmp_path / "place.json", tmp_path / "cover.png"
    result = CliRunner().invoke(build_app(), ["place", str(TINY), "--algorithm", "petals,cg_bprr,milp",
                                              "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "algorithms compared" in result.stdout and "placement" in result.stdout and "Theorem 2" in result.stdout
    doc = orjson.loads(out.read_bytes())
    assert doc["config"] == "tiny" and doc["instance"]["concurrent_sessions"] == 4
    assert [a["name"] for a in doc["algorithms"]] == ["petals", "cg_bprr", "milp"]
    milp = doc["algorithms"][2]
    assert milp["status"] == "optimal" and milp["details"]["milp"]["gap"] is not None
    assert sum(r["sessions"] for r in milp["routes"]) == 4
    for a in doc["algorithms"]:
        assert {p["first_block"] for p in a["placement"]} and a["simulated"]["time_per_token_s"] > 0
        assert set(a["predicted"]) == {"session_s", "time_per_token_s", "decode_per_token_s", "ttft_s"}
    assert png.read_bytes().startswith(b"\x89PNG")


def test_place_command_milp_time_limit_option(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(build_app(), ["place", str(TINY), "--algorithm", "milp", "--milp-time-limit", "5",
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert orjson.loads(out.read_bytes())["algorithms"][0]["status"] == "optimal"


@pytest.mark.parametrize(("args", "expected"), [
    (["--algorithm", "petals,fastest"], "unknown algorithm 'fastest'"),
    (["--algorithm", ","], "no algorithm named"),
    (["--milp-time-limit", "0"], "--milp-time-limit must be a number > 0"),
])
def test_bad_options_exit_2_with_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(build_app(), ["place", str(TINY), *args, "--json", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr
    assert not out.exists()


def test_bad_config_exits_2_in_a_real_process(tmp_path: Path) -> None:
    bad = write(tmp_path, TINY.read_text().replace("d_model: 16384", "d_model: lots"), "bad.yaml")
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-c", "from isthmus.cli import main; main()", "place", str(bad),
                           "--json", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:8: model.d_model:")
    assert not out.exists()


def test_unwritable_output_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(build_app(), ["place", str(TINY), "--algorithm", "cg_bprr",
                                              "--json", str(blocker / "out.json")])
    assert result.exit_code == 1 and "cannot write" in result.stderr
