"""Report assembly: JSON shape and canonical bytes, atomic writes, terminal tables, the CDF plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from rich.console import Console

from isthmus.sim.plot import (
    ecdf,
    format_seconds,
    plot_sweep,
    render_sweep_ttft,
    render_sweep_winners,
    render_ttft_cdf,
    short_seconds,
)
from isthmus.sim.report import (
    LATENCY_KEYS,
    SCALAR_KEYS,
    STAT_KEYS,
    build_report,
    comparison_table,
    dumps_report,
    policy_table,
    result_record,
    sweep_table,
    write_atomic,
    write_report,
)
from isthmus.sim.sweep import CellStats


def summary(**changes: Any) -> dict[str, Any]:
    stats = {"mean": np.float64(0.5), "p50": 0.4, "p90": 0.9, "p99": 1.5}
    out: dict[str, Any] = {
        "policy": "least_load", "requests": np.int64(10), "completed": 10,
        "ttft_s": dict(stats), "tpot_s": {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan},
        "e2e_s": dict(stats), "queue_s": dict(stats), "throughput_rps": 2.5, "prefix_hit_rate": np.float32(0.25),
        "cross_region_share": 0.1, "per_region": {"a": {"completed": 10}},
    }
    out.update(changes)
    return out


def test_record_takes_the_label_and_plain_types() -> None:
    rec = result_record("ll-2", summary())
    assert rec["policy"] == "ll-2"
    assert type(rec["requests"]) is int and type(rec["prefix_hit_rate"]) is float
    assert rec["tpot_s"]["p50"] is None  # nan -> null
    assert rec["per_region"] == {"a": {"completed": 10}}  # extra keys are kept


@pytest.mark.parametrize("missing", [*SCALAR_KEYS, *LATENCY_KEYS])
def test_record_refuses_a_summary_without_a_documented_key(missing: str) -> None:
    s = summary()
    del s[missing]
    with pytest.raises(KeyError, match=missing):
        result_record("x", s)


def test_report_shape_and_canonical_bytes() -> None:
    doc = build_report("demo", 7, [result_record("b", summary()), result_record("a", summary())])
    data = dumps_report(doc)
    parsed = orjson.loads(data)
    assert set(parsed) == {"scenario", "seed", "results"} and parsed["seed"] == 7
    assert [r["policy"] for r in parsed["results"]] == ["b", "a"]  # run order, not sorted
    for r in parsed["results"]:
        assert {"policy", *SCALAR_KEYS, *LATENCY_KEYS} <= set(r)
        for key in LATENCY_KEYS:
            assert set(r[key]) == set(STAT_KEYS)
    assert data == dumps_report(orjson.loads(data)) and data.endswith(b"}\n")
    assert data.index(b'"results"') < data.index(b'"scenario"') < data.index(b'"seed"')  # sorted keys


def test_timing_only_when_asked() -> None:
    assert "timing" not in build_report("s", 0, [])
    assert build_report("s", 0, [], timing={"a": {"wall_s": 1.0}})["timing"] == {"a": {"wall_s": 1.0}}


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "r.json"
    write_report(target, build_report("s", 1, []))
    assert orjson.loads(target.read_bytes())["seed"] == 1
    blocker = tmp_path / "dir.json"
    blocker.mkdir()  # renaming a file over a directory fails
    with pytest.raises(OSError):
        write_atomic(blocker, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "sub"]  # no temp file left
    assert list(blocker.iterdir()) == []


def test_tables_render_the_figures() -> None:
    console = Console(record=True, width=120)
    rec = result_record("least_load", summary())
    console.print(policy_table(rec))
    console.print(comparison_table([rec, result_record("random", summary(throughput_rps=1.0))]))
    text = console.export_text()
    for needle in ("least_load: 10 of 10 completed", "TTFT", "500.0", "1,500.0", "throughput 2.500 req/s",
                   "prefix hit rate 25.0 %", "cross-region 10.0 %", "random", "1.000", "—"):
        assert needle in text, needle


def test_ecdf_and_tick_labels() -> None:
    x, y = ecdf(np.array([3.0, math.nan, 1.0, 0.0, 2.0, math.inf]))
    assert x.tolist() == [1.0, 2.0, 3.0] and y.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [format_seconds(v) for v in (0.02, 0.5, 1.0, 20.0, 200.0)] == ["20 ms", "500 ms", "1 s", "20 s", "200 s"]


def test_cdf_png_is_deterministic() -> None:
    series = [("a", np.array([0.1, 0.2, 0.4])), ("b", np.array([0.05, 1.0])), ("empty", np.array([]))]
    png = render_ttft_cdf(series, "t")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png == render_ttft_cdf(series, "t")


def test_comparison_shows_bound_regret_and_forwards_when_reported_and_splits_to_fit() -> None:
    plain = result_record("least_load", summary())
    rich_rec = result_record("gorgo", summary(bound_ttft_s={"mean": 0.25, "p50": 0.2, "p90": 0.3, "p99": 0.5},
                                              regret={"mean": 2.0, "p99": 3.0}, forward_share=0.125))
    console = Console(record=True, width=200)
    console.print(comparison_table([plain, rich_rec]))
    text = console.export_text()
    for needle in ("TTFT bound mean (ms)", "250.0", "regret mean (×)", "2.00", "3.00", "forwarded share", "12.5 %"):
        assert needle in text, needle
    console = Console(record=True, width=200)
    console.print(comparison_table([plain]))
    assert "regret" not in console.export_text()  # a simulator that does not report it shows no row

    many = [result_record(f"policy_number_{k}", summary()) for k in range(6)]
    console = Console(record=True, width=80)
    console.print(comparison_table(many, width=80))
    text = console.export_text()
    assert "policies compared (1/2)" in text and "policies compared (2/2)" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert text.count("1,500.0") == 6  # every policy's TTFT p99, once: no column dropped or cut


def test_sweep_table_averages_seeds_and_counts_failures() -> None:
    def cell(policy: str, seed: int, p50: float, **extra: Any) -> dict[str, Any]:
        rec = result_record(policy, summary(ttft_s={"mean": p50, "p50": p50, "p90": p50, "p99": 2 * p50}))
        rec.update(rate_rps=2.0, rtt_scale=1.0, seed=seed, **extra)
        return rec

    cells = [cell("least_load", 0, 1.0), cell("least_load", 1, 3.0),
             {"policy": "gorgo", "rate_rps": 2.0, "rtt_scale": 1.0, "seed": 0, "error": "RuntimeError: x"}]
    console = Console(record=True, width=80)
    console.print(sweep_table(cells))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if line.strip().startswith("least_load")).split()
    assert row[1:7] == ["2", "1", "2", "2", "2", "4"]  # rate, rtt scale, seeds, mean, p50, p99 (s)
    failed = next(line for line in lines if line.strip().startswith("gorgo")).split()
    assert failed[3] == "0" and failed[-1] == "1" and "—" in failed


def test_sweep_plots_are_deterministic_pngs(tmp_path: Path) -> None:
    stats = [
        CellStats(policy=p, rate_rps=r, rtt_scale=s, seeds=1, failed=0, ttft_mean_s=m * r * s,
                  ttft_p50_s=0.8 * m * r * s, ttft_p90_s=m * r * s, ttft_p99_s=3 * m * r * s,
                  regret_mean=2.0, cross_region_share=0.5)
        for p, m in (("least_load", 1.0), ("gorgo_proxy", 0.7), ("prefix_trie", 1.3))
        for r in (1.0, 2.0) for s in (0.5, 1.0)
    ]
    gap = CellStats("gorgo_proxy", 3.0, 1.0, 0, 1, *(math.nan,) * 6)  # a point whose seeds all failed
    winners = render_sweep_winners([*stats, gap], "least_load", ["gorgo_proxy"], "t")
    assert winners.startswith(b"\x89PNG")
    assert winners == render_sweep_winners([*stats, gap], "least_load", ["gorgo_proxy"], "t")
    assert render_sweep_winners(stats, baseline="missing").startswith(b"\x89PNG")  # no ratio column
    a, b = plot_sweep([*stats, gap], tmp_path / "s.png", aware=["gorgo_proxy"])
    assert a.read_bytes() == render_sweep_ttft([*stats, gap]) and b == tmp_path / "s_winners.png"
    assert b.read_bytes().startswith(b"\x89PNG")
    assert [short_seconds(x) for x in (0.4021, 1.254, 18.34)] == ["402 ms", "1.25 s", "18.3 s"]
