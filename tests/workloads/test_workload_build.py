import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from isthmus.core import ConfigError, Request, TraceError
from isthmus.workloads import (
    OriginAssigner,
    OriginSpec,
    WorkloadSpec,
    build_requests,
    native_rate,
    offered_rate,
    read_mooncake,
    trace_span,
)

ROOT = Path(__file__).resolve().parents[2]
CONVERSATION = "data/mooncake/conversation_trace.jsonl.gz"
MOONCAKE_SYNTHETIC = "data/mooncake/synthetic_trace.jsonl.gz"
AZURE_CONV = "data/azure/AzureLLMInferenceTrace_conv.csv.gz"
SHAREGPT_TOKENS = "data/llmservingsim/workloads/sharegpt-llama-3.1-8b-300-sps10.jsonl.gz"
SHAREGPT_LENGTHS = "data/sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv.gz"
REGIONS = ("us-east", "eu-west", "ap-south")


def build(seed: int = 0, regions: tuple[str, ...] = REGIONS, **spec: object) -> list[Request]:
    return list(build_requests(WorkloadSpec.model_validate(spec), regions, seed, ROOT))


def rate(requests: list[Request]) -> float:
    return len(requests) / (requests[-1].arrival - requests[0].arrival)


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "mooncake", "path": MOONCAKE_SYNTHETIC, "limit": 1500},
        {"kind": "azure", "path": AZURE_CONV, "limit": 3000},
        {"kind": "sharegpt_tokens", "path": SHAREGPT_TOKENS},
        {"kind": "sharegpt_lengths", "path": SHAREGPT_LENGTHS, "rate_rps": 50.0, "limit": 3000},
        {"kind": "poisson", "rate_rps": 5.0, "limit": 1000, "lengths": {"dist": "lognormal"}},
        {"kind": "sessions", "rate_rps": 5.0, "duration_s": 300.0, "origins": {"per_session": True}},
        {"kind": "shared_prefix", "rate_rps": 5.0, "limit": 1000, "arrival": "gamma", "cv": 2.0},
        {"kind": "phases", "phases": [{"kind": "poisson", "rate_rps": 5.0, "limit": 300},
                                      {"kind": "azure", "path": AZURE_CONV, "limit": 300}]},
    ],
    ids=lambda s: s["kind"],
)
def test_every_kind_meets_the_stream_contract(spec):
    requests = build(**spec)
    assert len(requests) > 100
    assert [r.id for r in requests] == [f"r{i:06d}" for i in range(len(requests))]
    assert requests[0].arrival == 0.0
    assert all(a.arrival <= b.arrival for a, b in itertools.pairwise(requests))
    assert {r.origin for r in requests} == set(REGIONS)
    assert all(r.prompt_tokens >= 1 and r.max_output_tokens >= 1 for r in requests)
    assert all(len(r.block_hashes) <= r.prompt_tokens // 16 for r in requests)
    assert build(**spec) == requests
    assert build(seed=1, **spec) != requests


def test_mooncake_requests_carry_the_trace():
    requests = build(kind="mooncake", path=CONVERSATION, limit=500)
    records = list(itertools.islice(read_mooncake(ROOT / CONVERSATION), 500))
    assert len(requests) == 500
    for req, rec in zip(requests, records, strict=True):
        assert (req.arrival, req.prompt_tokens, req.max_output_tokens, req.block_hashes) == (
            rec.arrival_s, rec.prompt_tokens, max(rec.output_tokens, 1), rec.block_hashes)
        assert req.session is None


def test_seed_changes_draws_but_arrivals_of_a_trace_stay():
    a = build(seed=3, kind="azure", path=AZURE_CONV, limit=2000)
    b = build(seed=4, kind="azure", path=AZURE_CONV, limit=2000)
    assert [r.arrival for r in a] == [r.arrival for r in b]
    assert [r.origin for r in a] != [r.origin for r in b]
    # changing the origins leaves arrivals and prompts of a synthetic workload alone
    base = {"kind": "sessions", "rate_rps": 3.0, "limit": 800}
    c = build(seed=5, **base)
    d = build(seed=5, **base, origins={"weights": {"us-east": 1, "eu-west": 5}})
    assert [(r.arrival, r.block_hashes) for r in c] == [(r.arrival, r.block_hashes) for r in d]


# ------------------------------------------------------------------------------------ rates, shaping
@pytest.mark.parametrize(("path", "kind", "target"), [(AZURE_CONV, "azure", 12.5), (MOONCAKE_SYNTHETIC, "mooncake", 1.0),
                                                      (SHAREGPT_TOKENS, "sharegpt_tokens", 40.0)])
def test_rescale_hits_the_target_rate(path, kind, target):
    native = native_rate(WorkloadSpec(kind=kind, path=path), ROOT)
    requests = build(kind=kind, path=path, rate_rps=target)
    assert rate(requests) == pytest.approx(target, rel=0.01)
    assert abs(native - target) / target > 0.2  # the test rescales for real
    assert requests[0].arrival == 0.0


def test_native_rate_span_and_offered_rate():
    spec = WorkloadSpec(kind="mooncake", path=CONVERSATION)
    assert native_rate(spec, ROOT) == pytest.approx(12_031 / 3536.999)
    assert trace_span(spec, ROOT) == pytest.approx(3536.999)
    scaled = WorkloadSpec(kind="mooncake", path=CONVERSATION, rate_rps=6.0, time_scale=2.0)
    assert offered_rate(scaled, ROOT) == pytest.approx(3.0)
    assert native_rate(WorkloadSpec(kind="poisson", rate_rps=7.0, limit=10), ROOT) == 7.0
    with pytest.raises(ConfigError, match="no arrival times"):
        trace_span(WorkloadSpec(kind="poisson", rate_rps=7.0, limit=10), ROOT)


def test_time_scale_stretches_arrivals():
    base = build(kind="azure", path=AZURE_CONV, limit=1000)
    slow = build(kind="azure", path=AZURE_CONV, limit=1000, time_scale=2.0)
    assert [r.arrival for r in slow] == pytest.approx([2 * r.arrival for r in base])
    both = build(kind="azure", path=AZURE_CONV, rate_rps=10.0, time_scale=2.0)
    assert rate(both) == pytest.approx(5.0, rel=0.01)
    synthetic = build(kind="poisson", rate_rps=10.0, limit=5000, time_scale=4.0)
    assert rate(synthetic) == pytest.approx(2.5, rel=0.05)


def _mooncake_head(tmp_path: Path, lines: int) -> str:
    path = tmp_path / "head.jsonl.gz"
    with gzip.open(ROOT / CONVERSATION, "rb") as src, gzip.open(path, "wb") as dst:
        dst.writelines(itertools.islice(src, lines))
    return str(path)


def test_repeat_replays_copies_that_share_no_prefix(tmp_path):
    path = _mooncake_head(tmp_path, 400)
    once = build(kind="mooncake", path=path)
    twice = build(kind="mooncake", path=path, repeat=2)
    n = len(once)
    assert n == 400 and len(twice) == 2 * n
    assert len({r.id for r in twice}) == 2 * n
    first, second = twice[:n], twice[n:]
    assert [(r.arrival, r.block_hashes) for r in first] == [(r.arrival, r.block_hashes) for r in once]
    assert not {h for r in first for h in r.block_hashes} & {h for r in second for h in r.block_hashes}
    # within a copy, requests still share what they shared in the trace (the system prompt block)
    assert all(r.block_hashes[:32] == second[0].block_hashes[:32] for r in second)
    # copy 1 is copy 0 shifted by one period (span + one mean gap); the rate is preserved
    period = second[0].arrival
    assert period == pytest.approx(once[-1].arrival * n / (n - 1))
    assert [r.arrival - period for r in second] == pytest.approx([r.arrival for r in first])
    assert rate(twice) == pytest.approx(rate(once), rel=0.01)
    tokens = build(kind="sharegpt_tokens", path=SHAREGPT_TOKENS, repeat=3, rate_rps=20.0)
    assert len(tokens) == 900 and rate(tokens) == pytest.approx(20.0, rel=0.01)
    hashes = [{h for r in tokens[k * 300:(k + 1) * 300] for h in r.block_hashes} for k in range(3)]
    assert not (hashes[0] & hashes[1] or hashes[1] & hashes[2] or hashes[0] & hashes[2])


def test_limit_duration_and_prompt_cap():
    full = build(kind="azure", path=AZURE_CONV)
    assert len(build(kind="azure", path=AZURE_CONV, limit=123)) == 123
    within = build(kind="azure", path=AZURE_CONV, duration_s=600.0)
    assert len(within) == sum(r.arrival <= 600.0 for r in full) and within[-1].arrival <= 600.0
    capped = build(kind="mooncake", path=CONVERSATION, limit=300, max_prompt_tokens=4000)
    plain = build(kind="mooncake", path=CONVERSATION, limit=300)
    assert any(p.prompt_tokens > 4000 for p in plain)
    for c, p in zip(capped, plain, strict=True):
        assert c.prompt_tokens == min(p.prompt_tokens, 4000)
        assert c.block_hashes == p.block_hashes[: 4000 // 16]
    sessions = build(kind="sessions", rate_rps=2.0, duration_s=120.0)
    assert sessions[-1].arrival <= 120.0 and len(sessions) > 100


def test_streams_lazily():
    stream = build_requests(WorkloadSpec(kind="mooncake", path=CONVERSATION, repeat=16), REGIONS, 0, ROOT)
    head = list(itertools.islice(stream, 5))
    assert [r.id for r in head] == ["r000000", "r000001", "r000002", "r000003", "r000004"]
    stream.close()


# -------------------------------------------------------------------------------------------- origins
def test_origin_weights():
    requests = build(kind="mooncake", path=CONVERSATION, origins={"weights": {"us-east": 3, "ap-south": 1}},
                     limit=4000)
    share = sum(r.origin == "us-east" for r in requests) / len(requests)
    assert share == pytest.approx(0.75, abs=0.03)  # 5 standard errors
    assert {r.origin for r in requests} == {"us-east", "ap-south"}
    single = build(kind="azure", path=AZURE_CONV, limit=100, origins={"weights": {"eu-west": 1}})
    assert {r.origin for r in single} == {"eu-west"}


def test_unknown_region_is_a_config_error():
    spec = WorkloadSpec(kind="azure", path=AZURE_CONV, origins=OriginSpec(weights={"mars": 1.0}))
    with pytest.raises(ConfigError, match=r"origins\.weights\.mars: unknown region 'mars'"):
        build_requests(spec, REGIONS, 0, ROOT)  # raised when building, before any request is read
    with pytest.raises(ValidationError, match="positive sum"):
        OriginSpec(weights={"us-east": 0.0})
    with pytest.raises(ConfigError, match="no regions"):
        build_requests(WorkloadSpec(kind="azure", path=AZURE_CONV), [], 0, ROOT)


def test_per_session_origins_are_consistent():
    requests = build(kind="sessions", rate_rps=4.0, limit=3000, origins={"per_session": True})
    origin_of: dict[str, set[str]] = {}
    for r in requests:
        assert r.session is not None
        origin_of.setdefault(r.session, set()).add(r.origin)
    assert all(len(v) == 1 for v in origin_of.values())
    counts = {region: sum(v == {region} for v in origin_of.values()) for region in REGIONS}
    assert all(abs(c / len(origin_of) - 1 / 3) < 0.07 for c in counts.values())
    per_request = build(kind="sessions", rate_rps=4.0, limit=3000)
    mixed = {}
    for r in per_request:
        mixed.setdefault(r.session, set()).add(r.origin)
    assert any(len(v) > 1 for v in mixed.values())


def test_per_session_falls_back_to_per_request_draws():
    assigner = OriginAssigner(REGIONS, {"us-east": 1, "eu-west": 1}, True, np.random.default_rng(0), b"k")
    assert {assigner.assign("s1") for _ in range(50)} == {assigner.region_of_session("s1")}
    assert {assigner.assign(None) for _ in range(200)} == {"us-east", "eu-west"}
    assert assigner.probabilities == {"us-east": 0.5, "eu-west": 0.5, "ap-south": 0.0}


# ------------------------------------------------------------------------------------- synthetic kinds
def test_sessions_rate_counts_requests_not_sessions():
    requests = build(kind="sessions", rate_rps=5.0, turns_mean=3.0, think_time_s=2.0, duration_s=2000.0)
    assert rate(requests) == pytest.approx(5.0, rel=0.1)
    sessions = {r.session for r in requests}
    assert len(requests) / len(sessions) == pytest.approx(3.0, rel=0.1)


def test_gamma_arrivals_through_the_spec():
    requests = build(kind="poisson", rate_rps=20.0, arrival="gamma", cv=2.5, limit=20_000)
    gaps = np.diff([r.arrival for r in requests])
    assert gaps.std() / gaps.mean() == pytest.approx(2.5, rel=0.15)
    assert rate(requests) == pytest.approx(20.0, rel=0.05)


def test_sharegpt_lengths_replays_the_table_with_synthetic_arrivals():
    requests = build(kind="sharegpt_lengths", path=SHAREGPT_LENGTHS, rate_rps=100.0)
    assert len(requests) == 30_731
    assert (requests[0].prompt_tokens, requests[0].max_output_tokens) == (74, 918)
    assert rate(requests) == pytest.approx(100.0, rel=0.03)
    table = build(kind="poisson", rate_rps=5.0, limit=500, lengths={"dist": "sharegpt", "path": SHAREGPT_LENGTHS})
    assert len({r.prompt_tokens for r in table}) > 100


# ---------------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "mooncake"}, "path: required"),
        ({"kind": "poisson", "rate_rps": 1.0}, "limit or duration_s"),
        ({"kind": "poisson", "limit": 10}, "rate_rps: required"),
        ({"kind": "poisson", "rate_rps": 1.0, "limit": 10, "path": "x"}, "path: not used by kind 'poisson'"),
        ({"kind": "mooncake", "path": "x", "turns_mean": 3}, "turns_mean: not used by kind 'mooncake'"),
        ({"kind": "azure", "path": "x", "arrival": "gamma"}, "arrival: not used"),
        ({"kind": "poisson", "rate_rps": 1.0, "limit": 10, "cv": 2.0}, "cv: only used with arrival 'gamma'"),
        ({"kind": "sessions", "rate_rps": 1.0, "limit": 10, "repeat": 2}, "repeat: not used"),
        ({"kind": "mooncake", "path": "x", "block_size": 24}, "block_size: must divide 512"),
        ({"kind": "mooncake", "path": "x", "rate": 3}, "Extra inputs"),
        ({"kind": "trace", "path": "x"}, "kind"),
        ({"kind": "azure", "path": "x", "rate_rps": -1}, "greater than 0"),
        ({"kind": "poisson", "rate_rps": 1.0, "limit": 10, "lengths": {"dist": "sharegpt"}}, "path: required"),
    ],
)
def test_invalid_specs_are_rejected(spec, message):
    with pytest.raises(ValidationError, match=message):
        WorkloadSpec.model_validate(spec)


def test_spec_is_frozen_and_survives_a_dump_round_trip():
    spec = WorkloadSpec(kind="sessions", rate_rps=2.0, limit=10, turns_mean=6.0,
                        origins=OriginSpec(per_session=True))
    with pytest.raises(ValidationError):
        spec.limit = 5  # type: ignore[misc]
    assert WorkloadSpec.model_validate(spec.model_dump()) == spec
    data = WorkloadSpec(kind="mooncake", path=CONVERSATION).model_dump()
    data.update(repeat=4, limit=500)  # what a scenario's with_workload does
    assert WorkloadSpec.model_validate(data).repeat == 4


def test_missing_trace_file_fails_when_building(tmp_path):
    with pytest.raises(TraceError, match=r"nope\.jsonl: no such file"):
        build_requests(WorkloadSpec(kind="mooncake", path="nope.jsonl"), REGIONS, 0, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1]}\n{"timestamp": 1}\n')
    stream = build_requests(WorkloadSpec(kind="mooncake", path=str(bad)), REGIONS, 0, tmp_path)
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: missing field"):
        list(stream)
    # a rescale needs a pass over the file, so the error comes at once
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: missing field"):
        build_requests(WorkloadSpec(kind="mooncake", path="bad.jsonl", rate_rps=1.0), REGIONS, 0, tmp_path)


# ------------------------------------------------------------------------------------------ phases
SHIFT = [{"kind": "shared_prefix", "rate_rps": 10.0, "limit": 400, "groups": 4, "system_prompt_tokens": 64},
         {"kind": "shared_prefix", "rate_rps": 20.0, "limit": 600, "groups": 4, "system_prompt_tokens": 512}]


def test_phases_follow_one_another_each_as_it_would_run_alone():
    requests = build(kind="phases", phases=SHIFT)
    assert len(requests) == 1000
    first, second = requests[:400], requests[400:]
    alone = [build(seed=s, **p) for s, p in ((0, SHIFT[0]), (0, SHIFT[1]))]
    # each phase is its own workload (own random streams), shifted to start one mean gap after the last
    assert [r.prompt_tokens for r in second] == [r.prompt_tokens for r in build(
        seed=int(np.random.SeedSequence([0, 1]).generate_state(1, np.uint64)[0] >> 1), **SHIFT[1])]
    assert second[0].arrival == pytest.approx(first[-1].arrival + 1 / 10.0)
    assert len(alone[0]) == 400
    assert np.mean([r.prompt_tokens for r in second]) > np.mean([r.prompt_tokens for r in first])
    assert offered_rate(WorkloadSpec.model_validate({"kind": "phases", "phases": SHIFT}), ROOT) == \
        pytest.approx(1000 / (400 / 10 + 600 / 20))


def test_phases_limit_duration_and_time_scale_apply_to_the_whole():
    assert len(build(kind="phases", phases=SHIFT, limit=450)) == 450
    cut = build(kind="phases", phases=SHIFT, duration_s=50.0)
    assert cut[-1].arrival <= 50.0 and len(cut) > 400
    slow = build(kind="phases", phases=SHIFT, time_scale=2.0)
    assert slow[-1].arrival == pytest.approx(2 * build(kind="phases", phases=SHIFT)[-1].arrival)


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "phases"}, "at least one"),
    ({"kind": "phases", "phases": SHIFT, "rate_rps": 3.0}, "rate_rps"),
    ({"kind": "phases", "phases": [{"kind": "poisson", "rate_rps": 1.0, "duration_s": 5.0}, {"kind": "phases", "phases": SHIFT}]},
     "do not nest"),
    ({"kind": "phases", "phases": [{"kind": "poisson", "rate_rps": 1.0}, SHIFT[1]]}, "limit or duration_s"),
    ({"kind": "phases", "phases": [SHIFT[0], {**SHIFT[1], "block_size": 32}]}, "block_size"),
])
def test_bad_phases_are_refused(spec, message):
    with pytest.raises(ValidationError, match=message):
        WorkloadSpec.model_validate(spec)
