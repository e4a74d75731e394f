"""``isthmus validate``: the replay of the bundled real vLLM run, and bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from isthmus.core.errors import ConfigError, TraceError
from isthmus.validate import METRIC_KEYS, load_profile, main, read_meta, run_validation

DATA = Path(__file__).resolve().parents[1] / "data" / "llmservingsim"
GT = DATA / "vllm_ground_truth" / "RTX4090" / "Llama-3.1-8B"
WORKLOAD = DATA / "workloads" / "sharegpt-llama-3.1-8b-300-sps10.jsonl.gz"


@pytest.fixture(scope="module")
def table_report():
    return run_validation(GT)


def test_bundled_rtx4090_run_meets_the_targets(table_report):
    r = table_report
    assert (r.gpu, r.model, r.perf, r.requests) == ("RTX4090", "Llama-3.1-8B", "table", 300)
    m = r.metrics
    assert abs(m["tpot_mean_s"].error) < 0.10
    assert abs(m["e2e_mean_s"].error) < 0.10
    assert abs(m["ttft_mean_s"].error) < 0.15
    assert abs(m["ttft_p50_s"].error) < 0.15 and abs(m["ttft_p90_s"].error) < 0.15


def test_real_side_follows_the_documented_timestamps(table_report):
    rows = [json.loads(line) for line in (GT / "requests.jsonl").read_text().splitlines()]
    q = np.array([r["queued_ts"] for r in rows])
    first = np.array([r["first_token_ts"] for r in rows])
    last = np.array([r["last_token_ts"] for r in rows])
    out = np.array([r["output_toks"] for r in rows])
    m = table_report.metrics
    assert m["ttft_mean_s"].real == pytest.approx(np.mean(first - q))
    assert m["ttft_p90_s"].real == pytest.approx(np.percentile(first - q, 90))
    assert m["tpot_mean_s"].real == pytest.approx(np.mean((last - first) / (out - 1)))
    assert m["e2e_mean_s"].real == pytest.approx(np.mean(last - q))
    # queued_ts is the engine's arrival: its offsets follow the workload's to within 0.25 s.
    with gzip.open(WORKLOAD, "rt") as fh:
        arrivals = np.array([json.loads(line)["arrival_time_ns"] / 1e9 for line in fh])
    lag = (q - q[0]) - (arrivals - arrivals[0])
    assert np.ptp(lag) < 0.25


def test_roofline_option_runs_the_same_replay():
    r = run_validation(GT, workload=WORKLOAD, perf="roofline")
    assert r.perf == "roofline" and r.requests == 300
    for key in METRIC_KEYS:
        assert abs(r.metrics[key].error) < 0.25


def test_main_prints_and_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    assert main(GT, None, out) == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"ground_truth", "gpu", "model", "requests", "metrics"}
    assert doc["gpu"] == "RTX4090" and doc["requests"] == 300
    assert set(doc["metrics"]) == set(METRIC_KEYS)
    for v in doc["metrics"].values():
        assert set(v) == {"sim", "real", "error"}
        assert v["error"] == pytest.approx((v["sim"] - v["real"]) / v["real"])
    assert "TTFT mean" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- bad input
def _layout(tmp_path: Path, n: int = 12, gz: bool = False) -> Path:
    """A small ground truth in the upstream layout: the first ``n`` requests of the bundled run."""
    gt = tmp_path / "data" / "vllm_ground_truth" / "RTX4090" / "Llama-3.1-8B"
    gt.mkdir(parents=True)
    shutil.copy(GT / "meta.json", gt / "meta.json")
    lines = (GT / "requests.jsonl").read_text().splitlines()[:n]
    (gt / "requests.jsonl").write_text("\n".join(lines) + "\n")
    wl = tmp_path / "data" / "workloads"
    wl.mkdir()
    with gzip.open(WORKLOAD, "rt") as fh:
        rows = [next(fh) for _ in range(n)]
    name = "sharegpt-llama-3.1-8b-300-sps10.jsonl"
    if gz:
        with gzip.open(wl / (name + ".gz"), "wt") as fh:
            fh.writelines(rows)
    else:
        (wl / name).write_text("".join(rows))
    (tmp_path / "data" / "profiles").symlink_to(DATA / "profiles")
    return gt


@pytest.mark.parametrize("gz", [False, True])
def test_any_directory_of_the_layout_works(tmp_path, gz):
    gt = _layout(tmp_path, gz=gz)
    r = run_validation(gt)
    assert r.requests == 12 and r.gpu == "RTX4090"
    assert all(np.isfinite(m.sim) and m.sim > 0 for m in r.metrics.values())


def test_engine_settings_come_from_meta():
    s = read_meta(GT)
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.num_kv_blocks, s.block_size) == (256, 2048, 2588, 16)
    assert s.enable_chunked_prefill and s.enable_prefix_caching and s.tensor_parallel_size == 1


def _edit_meta(gt: Path, edit) -> None:
    meta = json.loads((gt / "meta.json").read_text())
    edit(meta)
    (gt / "meta.json").write_text(json.dumps(meta))


def test_malformed_meta_is_a_clear_error(tmp_path, capsys):
    gt = _layout(tmp_path)
    (gt / "meta.json").write_text("{not json")
    assert main(gt) == 2
    err = capsys.readouterr().err
    assert "meta.json" in err and "not valid JSON" in err and "Traceback" not in err

    _edit_meta_ok = _layout(tmp_path / "b")

    def drop_blocks(meta):
        del meta["kv_cache"]["num_gpu_blocks"]
        del meta["resolved_config"]["cache_config"]["num_gpu_blocks"]

    _edit_meta(_edit_meta_ok, drop_blocks)
    with pytest.raises(ConfigError, match=r"meta\.json: missing field 'kv_cache\.num_gpu_blocks'"):
        run_validation(_edit_meta_ok)
    _edit_meta(_edit_meta_ok, lambda m: m["kv_cache"].update(num_gpu_blocks=2588, block_size="16"))
    with pytest.raises(ConfigError, match=r"'kv_cache\.block_size' must be an integer"):
        run_validation(_edit_meta_ok)
    _edit_meta(_edit_meta_ok, lambda m: m["kv_cache"].update(num_gpu_blocks=20, block_size=16))
    with pytest.raises(TraceError, match="KV blocks"):
        run_validation(_edit_meta_ok)


def test_missing_or_malformed_workload_is_a_clear_error(tmp_path, capsys):
    gt = _layout(tmp_path)
    wl = tmp_path / "data" / "workloads" / "sharegpt-llama-3.1-8b-300-sps10.jsonl"
    rows = wl.read_text().splitlines()
    wl.unlink()
    with pytest.raises(TraceError, match=r"workload 'workloads/sharegpt.*' named by .*meta\.json not found"):
        run_validation(gt)
    assert main(gt, tmp_path / "nope.jsonl") == 2
    assert "nope.jsonl: workload not found" in capsys.readouterr().err

    bad = json.loads(rows[3])
    del bad["input_tok_ids"]
    rows[3] = json.dumps(bad)
    wl.write_text("\n".join(rows) + "\n")
    with pytest.raises(TraceError, match=r"jsonl:4: missing field 'input_tok_ids'"):
        run_validation(gt)


def test_mismatched_ground_truth_and_missing_profile(tmp_path):
    gt = _layout(tmp_path)
    lines = (gt / "requests.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["input_toks"] += 1
    lines[2] = json.dumps(row)
    (gt / "requests.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match="bench-2 has input_toks"):
        run_validation(gt)
    with pytest.raises(ConfigError, match="profiles root not found"):
        run_validation(GT, profiles_root=tmp_path / "none")
    with pytest.raises(ConfigError, match="no profile for GPU"):
        run_validation(GT, profiles_root=tmp_path)
    with pytest.raises(ConfigError, match="perf must be"):
        run_validation(GT, perf="magic")  # type: ignore[arg-type]


def test_a_sparser_profile_of_another_gpu_loads():
    # RTXPRO6000's sweep mixes two grid spacings, so its axes are not a product grid.
    m = load_profile(DATA / "profiles" / "RTXPRO6000" / "Llama-3.1-8B" / "bf16" / "tp1")
    rtx4090 = load_profile(DATA / "profiles" / "RTX4090" / "Llama-3.1-8B" / "bf16" / "tp1")
    for shape in ((0, 0.0, 0, 1, 1000), (0, 0.0, 0, 39, 39 * 1060), (2048, 2048 * 1024.0, 1, 0, 0)):
        assert 0 < m.step_time(*shape) < rtx4090.step_time(*shape)  # more bandwidth and FLOPs
    assert np.all(np.diff([m.step_time(0, 0.0, 0, 32, 32 * k) for k in range(1, 40000, 97)]) >= 0)


def test_load_profile_names_the_bad_file(tmp_path):
    prof = tmp_path / "profiles" / "RTX4090" / "Llama-3.1-8B" / "bf16" / "tp1"
    shutil.copytree(DATA / "profiles" / "RTX4090" / "Llama-3.1-8B" / "bf16" / "tp1", prof)
    assert load_profile(prof).num_layers == 32
    text = (prof / "attention.csv").read_text().splitlines()
    text[5] = "16,0,0,0,abc"
    (prof / "attention.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ConfigError, match=r"attention\.csv, line 6: column 'time_us' is not a number"):
        load_profile(prof)
    (prof / "dense.csv").unlink()
    with pytest.raises(ConfigError, match=r"dense\.csv: not found"):
        load_profile(prof)
