"""``isthmus compare``: the simulator against a real testbed (engine doubles, relays, routers in
subprocesses; no mocks), on the tiny scenario with a small limit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from isthmus.bench.compare import FIGURES, figures, relative_error
from isthmus.bench.compare_cli import compare

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "scenarios" / "tiny.yaml"
POLICY_KEYS = {"policy", "mode", "simulated", "measured", "rel_error", "within_tolerance", "cross_region_share",
               "sim_band", "rel_error_vs_band", "requests", "completed",
               "errors", "timeouts", "send_lag_p99_s", "cpu", "wall_s", "startup_s"}


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(compare)

    @app.command()
    def other() -> None:  # two commands, so 'compare' is a subcommand as in 'isthmus compare'
        """Unused."""

    return app


def test_relative_error_and_figures() -> None:
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert relative_error(None, 1.0) is None and relative_error(1.0, 0.0) is None
    rec = {"ttft_s": {"mean": 2.0, "p99": float("nan")}, "tpot_s": {"mean": 0.05}, "throughput_rps": 3}
    assert figures(rec) == {"ttft_mean_s": 2.0, "ttft_p99_s": None, "tpot_mean_s": 0.05, "throughput_rps": 3.0}
    assert [name for name, _, _ in FIGURES] == list(figures(rec))


def test_compare_tiny_reports_both_sides_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    r = CliRunner().invoke(cli(), ["compare", str(TINY), "--policy", "round_robin,least_load", "--limit", "16",
                                   "--time-scale", "0.2", "--band-runs", "2", "--json", str(out), "--logs", str(tmp_path / "logs")])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert {"scenario", "seed", "limit", "time_scale", "tolerance", "machine", "wall_s", "policies", "simulated",
            "measured"} <= set(doc)
    assert (doc["scenario"], doc["limit"], doc["time_scale"]) == ("tiny", 16, 0.2)
    assert doc["machine"]["cpus"] >= 1 and len(doc["machine"]["load_avg_start"]) == 3
    assert [p["policy"] for p in doc["policies"]] == ["round_robin", "least_load"]
    for row, sim, real in zip(doc["policies"], doc["simulated"], doc["measured"], strict=True):
        assert set(row) >= POLICY_KEYS
        assert row["requests"] == row["completed"] == 16 and row["errors"] == row["timeouts"] == 0
        assert sim["requests"] == real["requests"] == 16 and sim["policy"] == real["policy"] == row["policy"]
        for side in ("simulated", "measured"):
            assert set(row[side]) == {name for name, _, _ in FIGURES}
            assert all(isinstance(v, float) and v > 0 for v in row[side].values()), row
        for name, err in row["rel_error"].items():
            assert isinstance(err, float) and math.isfinite(err), (name, err)
            assert err == pytest.approx((row["measured"][name] - row["simulated"][name]) / row["simulated"][name])
        assert row["cpu"]["total"] > 0 and {"engine", "router", "relays", "loadgen"} <= set(row["cpu"])
        assert row["mode"] == "proxy"
        band = row["sim_band"]
        assert band["runs"] == 2 and band["min"] <= band["mean"] <= band["max"] and band["sd"] >= 0
        assert row["rel_error_vs_band"] == pytest.approx((row["measured"]["ttft_mean_s"] - band["mean"]) / band["mean"])
    assert (tmp_path / "logs" / "least_load" / "manifest.json").is_file()
    assert "TTFT mean s" in r.output and "round_robin" in r.output and "sim band" in r.output


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "no such scenario file"),
    (["{tiny}", "--policy", "nope"], "nope"),
    (["{tiny}", "--policy", " , "], "no policy named"),
    (["{tiny}", "--time-scale", "0"], "--time-scale"),
    (["{tiny}", "--tolerance", "-1"], "--tolerance"),
    (["{tiny}", "--policy", "least_load,least_load"], "named twice"),
])
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    r = CliRunner().invoke(cli(), ["compare", *(a.format(tiny=TINY) for a in args)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
