"""The ``isthmus`` command line, in process (CliRunner) and once as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from isthmus.cli import build_app

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "scenarios" / "tiny.yaml"


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = runner.invoke(build_app(), ["--help"])
    assert result.exit_code == 0
    assert "simulate" in result.stdout and "validate" in result.stdout


def test_simulate_writes_the_documented_json_identically_twice(runner: CliRunner, tmp_path: Path) -> None:
    app = build_app()
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for out in (first, second):
        result = runner.invoke(app, ["simulate", str(TINY), "--json", str(out)])
        assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()
    doc = orjson.loads(first.read_bytes())
    assert doc["scenario"] == "tiny" and doc["seed"] == 0 and "timing" not in doc
    assert [r["policy"] for r in doc["results"]] == ["random", "round_robin", "least_load"]
    for r in doc["results"]:
        assert r["requests"] == r["completed"] == 200
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert set(r[key]) >= {"mean", "p50", "p90", "p99"}
            assert 0 < r[key]["p50"] <= r[key]["p99"]
        assert r["throughput_rps"] > 0
        assert 0 <= r["prefix_hit_rate"] <= 1 and 0 <= r["cross_region_share"] <= 1
    assert "policies compared" in result.stdout and "TTFT" in result.stdout


def test_policy_and_seed_options_and_plot(runner: CliRunner, tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "cdf.png"
    result = runner.invoke(build_app(), ["simulate", str(TINY), "--policy", "least_load,random", "--seed", "5",
                                         "--json", str(out), "--plot", str(png), "--timing"])
    assert result.exit_code == 0, result.output
    doc = orjson.loads(out.read_bytes())
    assert doc["seed"] == 5 and [r["policy"] for r in doc["results"]] == ["least_load", "random"]
    assert set(doc["timing"]) == {"least_load", "random"} and doc["timing"]["random"]["wall_s"] > 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_unknown_policy_exits_2_before_running(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = runner.invoke(build_app(), ["simulate", str(TINY), "--policy", "least_load,fastest", "--json", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown policy 'fastest'" in result.stderr and "least_load:" not in result.stderr
    assert not out.exists()


def test_bad_scenario_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("gpu: H100", "gpu: B200", 1))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", "from isthmus.cli import main; main()", "simulate", str(bad),
                           "--json", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and f"{bad}:" in lines[0] and "replicas.0.gpu: unknown GPU 'B200'" in lines[0]
    assert not out.exists()


def test_missing_scenario_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(build_app(), ["simulate", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "no such scenario file" in result.stderr


def test_validate_reports_a_bad_directory(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(build_app(), ["validate", str(tmp_path)])
    assert result.exit_code == 2
    assert "meta.json" in result.stderr and "Traceback" not in result.output


def test_sweep_help_lists_the_grid_options(runner: CliRunner) -> None:
    result = runner.invoke(build_app(), ["sweep", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--policy", "--rates", "--rtt-scale", "--seeds", "--workers", "--ray-address", "--json", "--plot"):
        assert option in result.stdout, option
    assert "sweep" in runner.invoke(build_app(), ["--help"]).stdout


def test_sweep_writes_the_documented_json_identically_with_1_and_2_workers(runner: CliRunner,
                                                                           tmp_path: Path) -> None:
    args = ["sweep", str(TINY), "--policy", "least_load,random", "--rates", "5,10", "--seeds", "0"]
    first, second, png = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "s.png"
    result = runner.invoke(build_app(), [*args, "--workers", "2", "--json", str(first), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(build_app(), [*args, "--workers", "1", "--json", str(second)])
    assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()
    doc = orjson.loads(first.read_bytes())
    assert doc["scenario"] == "tiny" and doc["failed"] == 0
    assert {k: doc["grid"][k] for k in ("policies", "rates_rps", "rtt_scales", "seeds")} == {
        "policies": ["least_load", "random"], "rates_rps": [5.0, 10.0], "rtt_scales": [1.0], "seeds": [0]}
    assert [(c["policy"], c["rate_rps"], c["rtt_scale"], c["seed"]) for c in doc["cells"]] == [
        ("least_load", 5.0, 1.0, 0), ("least_load", 10.0, 1.0, 0), ("random", 5.0, 1.0, 0), ("random", 10.0, 1.0, 0)]
    for c in doc["cells"]:
        assert c["requests"] == c["completed"] == 200 and 0 < c["ttft_s"]["p50"] <= c["ttft_s"]["p99"]
    assert png.read_bytes().startswith(b"\x89PNG") and (tmp_path / "s_winners.png").read_bytes().startswith(b"\x89PNG")
    assert "least_load" in result.stdout and "sweep" in result.stdout


def test_sweep_exits_3_when_a_cell_fails_and_still_writes_the_rest(
        runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import isthmus.policies
    from isthmus.core.policy import PolicyRegistry

    class Broken:
        name = "broken"

        def choose(self, request: object, snapshot: object) -> None:
            raise RuntimeError("policy bug")

        def observe(self, outcome: object) -> None:
            return None

    builtin = isthmus.policies.default_registry

    def with_broken() -> PolicyRegistry:
        reg = builtin()
        reg.register("broken", lambda params, rng: Broken())  # type: ignore[arg-type, return-value]
        return reg

    monkeypatch.setattr(isthmus.policies, "default_registry", with_broken)
    out = tmp_path / "r.json"
    result = runner.invoke(build_app(), ["sweep", str(TINY), "--policy", "least_load,broken", "--workers", "1",
                                         "--json", str(out)])
    assert result.exit_code == 3, result.output
    assert "cell failed: policy=broken" in result.stderr and "RuntimeError: policy bug" in result.stderr
    assert "1 of 2 cells failed" in result.stderr
    doc = orjson.loads(out.read_bytes())
    assert doc["failed"] == 1 and "error" in doc["cells"][1] and doc["cells"][0]["completed"] == 200


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--rates", "5,fast", "--rates"), ("--rtt-scale", "-1", "RTT scales"), ("--policy", "least_load,fastest",
                                                                            "unknown policy 'fastest'")])
def test_sweep_usage_errors_exit_2(runner: CliRunner, option: str, value: str, message: str) -> None:
    result = runner.invoke(build_app(), ["sweep", str(TINY), option, value, "--workers", "1"])
    assert result.exit_code == 2 and message in result.output
