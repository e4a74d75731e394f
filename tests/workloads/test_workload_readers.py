import gzip
import itertools
import math
import shutil
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.core import TraceError, expand_coarse_hash_ids, hash_token_blocks
from isthmus.workloads import (
    TraceRecord,
    parse_azure_timestamp,
    read_azure,
    read_mooncake,
    read_sharegpt_lengths,
    read_sharegpt_tokens,
    scan_trace,
)

DATA = Path(__file__).resolve().parents[2] / "data"
CONVERSATION = DATA / "mooncake" / "conversation_trace.jsonl.gz"
MOONCAKE_SYNTHETIC = DATA / "mooncake" / "synthetic_trace.jsonl.gz"
AZURE_CONV = DATA / "azure" / "AzureLLMInferenceTrace_conv.csv.gz"
AZURE_CODE = DATA / "azure" / "AzureLLMInferenceTrace_code.csv.gz"
SHAREGPT_LENGTHS = DATA / "sharegpt" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv.gz"
SHAREGPT_TOKENS = DATA / "llmservingsim" / "workloads" / "sharegpt-llama-3.1-8b-300-sps10.jsonl.gz"
EXAMPLE_TOKENS = DATA / "llmservingsim" / "workloads" / "example_trace.jsonl"


def _common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------- Mooncake
def test_mooncake_conversation_trace_counts_and_means():
    records = list(read_mooncake(CONVERSATION))
    assert len(records) == 12_031
    mean_in = sum(r.prompt_tokens for r in records) / len(records)
    mean_out = sum(r.output_tokens for r in records) / len(records)
    assert 11_500 < mean_in < 12_500 and 300 < mean_out < 400
    arrivals = [r.arrival_s for r in records]
    assert arrivals[0] == 0.0 and arrivals[-1] == pytest.approx(3536.999)
    assert all(a <= b for a, b in itertools.pairwise(arrivals))
    assert all(r.session is None and r.token_ids is None for r in records)
    # full 16-token blocks only: ~750 blocks per prompt on average
    assert all(len(r.block_hashes) <= r.prompt_tokens // 16 for r in records)
    assert 700 < sum(len(r.block_hashes) for r in records) / len(records) < 800


def test_mooncake_hashes_are_the_expanded_hash_ids_and_share_prefixes():
    import orjson

    with gzip.open(CONVERSATION, "rb") as f:
        raw = [orjson.loads(line) for line in itertools.islice(f, 1500)]
    records = list(itertools.islice(read_mooncake(CONVERSATION), 1500))
    for obj, rec in zip(raw, records, strict=True):
        assert rec.block_hashes == expand_coarse_hash_ids(obj["hash_ids"], obj["input_length"])
    # The first hash id is a system prompt every conversation shares: 32 shared 16-token blocks.
    assert raw[0]["hash_ids"][0] == raw[1]["hash_ids"][0] and raw[0]["hash_ids"][1] != raw[1]["hash_ids"][1]
    assert _common_prefix(records[0].block_hashes, records[1].block_hashes) == 32
    # In general: equal leading ids <=> equal leading block hashes, 32 blocks per id. Check
    # neighbours and every pair of requests that share more than the system prompt.
    by_two_ids: dict[tuple[int, ...], list[int]] = {}
    for i, obj in enumerate(raw):
        by_two_ids.setdefault(tuple(obj["hash_ids"][:2]), []).append(i)
    pairs = [pair for group in by_two_ids.values() for pair in itertools.combinations(group, 2)]
    assert len(pairs) > 100
    for i, j in [*pairs, *itertools.pairwise(range(len(raw)))]:
        ids = _common_prefix(raw[i]["hash_ids"], raw[j]["hash_ids"])
        ra, rb = records[i], records[j]
        expected = min(ids * 32, len(ra.block_hashes), len(rb.block_hashes))
        assert _common_prefix(ra.block_hashes, rb.block_hashes) == expected


def test_mooncake_namespace_separates_copies_and_block_size_applies():
    a = next(read_mooncake(MOONCAKE_SYNTHETIC))
    b = next(read_mooncake(MOONCAKE_SYNTHETIC, namespace=1))
    assert len(a.block_hashes) == len(b.block_hashes) and not set(a.block_hashes) & set(b.block_hashes)
    c = next(read_mooncake(MOONCAKE_SYNTHETIC, block_size=32))
    assert len(c.block_hashes) == a.prompt_tokens // 32
    assert next(read_mooncake(MOONCAKE_SYNTHETIC, hashes=False)).block_hashes == ()
    with pytest.raises(ValueError, match="divide"):
        next(read_mooncake(MOONCAKE_SYNTHETIC, block_size=24))


def test_mooncake_synthetic_trace_and_scan():
    stats = scan_trace("mooncake", MOONCAKE_SYNTHETIC)
    assert stats.count == 3_993 and stats.first_s == 0.0 and stats.last_s == pytest.approx(1022.025)
    assert stats.rate_rps == pytest.approx(3993 / 1022.025)
    conv = scan_trace("mooncake", CONVERSATION)
    assert conv.count == 12_031 and conv.span_s == pytest.approx(3536.999)


# -------------------------------------------------------------------------------------------- Azure
def test_azure_traces():
    conv = list(read_azure(AZURE_CONV))
    assert len(conv) == 19_366
    assert conv[0].arrival_s == 0.0
    # 18:15:50.9951690 - 18:15:46.6805900 and 19:14:08.4025270 - 18:15:46.6805900, to 100 ns
    assert conv[1].arrival_s == pytest.approx(4.314579, abs=1e-9)
    assert conv[-1].arrival_s == pytest.approx(3501.721937, abs=1e-9)
    assert (conv[0].prompt_tokens, conv[0].output_tokens) == (374, 44)
    assert all(r.block_hashes == () for r in conv)
    assert 1_000 < sum(r.prompt_tokens for r in conv) / len(conv) < 1_300
    code = list(read_azure(AZURE_CODE))
    assert len(code) == 8_819 and 1_900 < sum(r.prompt_tokens for r in code) / len(code) < 2_200


def test_azure_timestamp_keeps_the_seventh_digit():
    moment, frac = parse_azure_timestamp("2023-11-16 18:15:46.6805901")
    assert moment == datetime(2023, 11, 16, 18, 15, 46) and frac == pytest.approx(0.6805901, abs=1e-12)
    assert parse_azure_timestamp("2023-11-16 18:15:46") == (datetime(2023, 11, 16, 18, 15, 46), 0.0)


@settings(max_examples=50, deadline=None)
@given(ticks_100ns=st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=20))
def test_azure_arrivals_match_exact_arithmetic(ticks_100ns, tmp_path_factory):
    """Arrival = exact difference of 7-digit timestamps, whatever the day and second boundaries."""
    tmp = tmp_path_factory.mktemp("azure")
    start = datetime(2023, 12, 31, 23, 59, 0)
    ticks = sorted(ticks_100ns)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t in ticks:
        moment = start + timedelta(seconds=t // 10**7)
        lines.append(f"{moment:%Y-%m-%d %H:%M:%S}.{t % 10**7:07d},10,5")
    path = tmp / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    got = [r.arrival_s for r in read_azure(path)]
    exact = [float(Decimal(t - ticks[0]) / Decimal(10**7)) for t in ticks]
    assert got == pytest.approx(exact, abs=1e-6)


# ----------------------------------------------------------------------------------------- ShareGPT
def test_sharegpt_tokens_workload():
    records = list(read_sharegpt_tokens(SHAREGPT_TOKENS, keep_token_ids=True))
    assert len(records) == 300
    assert records[0].arrival_s == pytest.approx(0.046926808)
    assert records[-1].arrival_s == pytest.approx(29.183763203)
    for r in records:
        assert r.token_ids is not None and len(r.token_ids) == r.prompt_tokens
        assert r.output_token_ids is not None and len(r.output_token_ids) == r.output_tokens
        assert r.block_hashes == hash_token_blocks(r.token_ids, 16)
    assert next(read_sharegpt_tokens(SHAREGPT_TOKENS)).token_ids is None
    copy = next(read_sharegpt_tokens(SHAREGPT_TOKENS, namespace=1))
    assert not set(copy.block_hashes) & set(records[0].block_hashes)


def test_sharegpt_token_prefixes_are_shared_exactly():
    records = list(read_sharegpt_tokens(EXAMPLE_TOKENS, block_size=2, keep_token_ids=True))
    assert len(records) == 10
    shared = 0
    for a, b in itertools.combinations(records, 2):
        assert a.token_ids is not None and b.token_ids is not None
        tokens = _common_prefix(a.token_ids, b.token_ids)
        blocks = _common_prefix(a.block_hashes, b.block_hashes)
        assert blocks == min(tokens // 2, len(a.block_hashes), len(b.block_hashes))
        shared += blocks > 0
    assert shared > 0


def test_sharegpt_lengths_table():
    pairs = list(read_sharegpt_lengths(SHAREGPT_LENGTHS))
    assert len(pairs) == 30_731 and pairs[0] == (74, 918)
    assert 2_200 < sum(p for p, _ in pairs) / len(pairs) < 2_500
    assert 400 < sum(o for _, o in pairs) / len(pairs) < 480
    assert min(p for p, _ in pairs) >= 1


# ------------------------------------------------------------------------------- plain, gzip, stream
def test_plain_and_gzipped_files_read_alike(tmp_path):
    plain = tmp_path / "example.jsonl"
    shutil.copy(EXAMPLE_TOKENS, plain)
    zipped = tmp_path / "example.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    assert list(read_sharegpt_tokens(plain)) == list(read_sharegpt_tokens(zipped))
    csv_plain = tmp_path / "lengths.csv"
    csv_plain.write_bytes(gzip.decompress(SHAREGPT_LENGTHS.read_bytes()))
    assert list(read_sharegpt_lengths(csv_plain)) == list(read_sharegpt_lengths(SHAREGPT_LENGTHS))
    # compression is detected by content, not by name
    odd = tmp_path / "mooncake.jsonl"
    odd.write_bytes(MOONCAKE_SYNTHETIC.read_bytes())
    assert scan_trace("mooncake", odd).count == 3_993


def test_readers_stream_records_before_a_later_error(tmp_path):
    path = tmp_path / "t.jsonl"
    good = '{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}\n'
    path.write_text(good * 3 + "{broken\n")
    stream = read_mooncake(path)
    first = next(stream)
    assert first == TraceRecord(0.0, 600, 3, expand_coarse_hash_ids([1, 2], 600))
    assert len([next(stream), next(stream)]) == 2
    with pytest.raises(TraceError, match=r"t\.jsonl:4: invalid JSON"):
        next(stream)


# -------------------------------------------------------------------------------------- bad files
def _mc(ts: object = 0, n_in: object = 600, n_out: object = 3, ids: object = (1, 2)) -> str:
    import json

    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": list(ids)
                       if isinstance(ids, tuple) else ids})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([_mc(), "{not json"], r":2: invalid JSON"),
        ([_mc(), _mc(), '{"timestamp": 1, "output_length": 3, "hash_ids": []}'], r":3: missing field 'input_length'"),
        ([_mc(n_in="many")], r":1: field 'input_length' must be an integer"),
        ([_mc(n_in=12.5)], r":1: field 'input_length' must be an integer"),
        ([_mc(), _mc(n_out=-1)], r":2: field 'output_length' must be >= 0"),
        ([_mc(n_in=0)], r":1: field 'input_length' must be >= 1"),
        ([_mc(ts=5), _mc(ts=4)], r":2: timestamp 4 is earlier"),
        ([_mc(ts="noon")], r":1: field 'timestamp' must be a number"),
        ([_mc(ids=[1, "x"])], r":1: field 'hash_ids' must be a list of integers"),
        ([_mc(ids=[1, 2.5])], r":1: field 'hash_ids' must be a list of integers"),
        ([_mc(ids=[-1])], r":1: field 'hash_ids' must hold integers"),
        ([_mc(ids=7)], r":1: field 'hash_ids' must be a list"),
        (["[1, 2]"], r":1: expected a JSON object"),
        ([_mc(), "", _mc(), "{"], r":4: invalid JSON"),  # blank lines are skipped but counted
    ],
)
def test_malformed_mooncake_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"bad\.jsonl" + message):
        list(read_mooncake(path))
    with pytest.raises(TraceError, match=r"bad\.jsonl:\d+:"):
        scan_trace("mooncake", path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.1,5\n", r":1: missing column 'GeneratedTokens'"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5,3\nyesterday,5,3\n",
         r":3: invalid TIMESTAMP 'yesterday'"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5,3\n2023-11-16 18:15:46.0999999,5,3\n",
         r":3: TIMESTAMP .* is earlier"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,five,3\n",
         r":2: column 'ContextTokens' must be an integer"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5,-3\n",
         r":2: column 'GeneratedTokens' must be >= 0"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5\n", r":2: expected at least 3 columns"),
        ("", r":1: empty file"),
    ],
)
def test_malformed_azure_rows_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=r"bad\.csv" + message):
        list(read_azure(path))


def test_malformed_sharegpt_files(tmp_path):
    path = tmp_path / "tok.jsonl"
    path.write_text('{"input_toks": 3, "output_toks": 1, "arrival_time_ns": 5, "input_tok_ids": [1, 2]}\n')
    with pytest.raises(TraceError, match=r"tok\.jsonl:1: input_toks is 3 but input_tok_ids has 2"):
        list(read_sharegpt_tokens(path))
    path.write_text('{"input_toks": 2, "output_toks": 1, "arrival_time_ns": 5, "input_tok_ids": [1, 2]}\n'
                    '{"input_toks": 2, "output_toks": 1, "arrival_time_ns": 4, "input_tok_ids": [1, 2]}\n')
    with pytest.raises(TraceError, match=r"tok\.jsonl:2: arrival_time_ns 4 is earlier"):
        list(read_sharegpt_tokens(path))
    path.write_text('{"input_toks": 2, "output_toks": 1, "input_tok_ids": [1, 2]}\n')
    with pytest.raises(TraceError, match=r"tok\.jsonl:1: missing field 'arrival_time_ns'"):
        list(read_sharegpt_tokens(path))
    lengths = tmp_path / "len.csv"
    lengths.write_text("num_prefill_tokens,num_decode_tokens\n10,5\n0,5\n")
    with pytest.raises(TraceError, match=r"len\.csv:3: column 'num_prefill_tokens' must be >= 1"):
        list(read_sharegpt_lengths(lengths))


def test_missing_truncated_and_undecodable_files(tmp_path):
    missing = tmp_path / "nope.jsonl.gz"
    with pytest.raises(TraceError, match=r"nope\.jsonl\.gz: no such file"):
        list(read_mooncake(missing))
    with pytest.raises(TraceError, match=r"nope\.jsonl\.gz"):
        list(read_azure(missing))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(MOONCAKE_SYNTHETIC.read_bytes()[:50_000])
    with pytest.raises(TraceError, match=r"cut\.jsonl\.gz:\d+:"):
        list(read_mooncake(truncated))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5,3\n\xff\xfe,1,1\n")
    with pytest.raises(TraceError, match=r"latin\.csv:\d+: unreadable CSV"):
        list(read_azure(latin))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        scan_trace("mooncake", empty)
    single = tmp_path / "one.jsonl"
    single.write_text(_mc() + "\n")
    with pytest.raises(TraceError, match="cannot determine the request rate"):
        _ = scan_trace("mooncake", single).rate_rps
    assert math.isfinite(scan_trace("mooncake", single).first_s)
