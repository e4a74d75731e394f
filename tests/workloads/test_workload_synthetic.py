import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from isthmus.core import ROOT_HASH, hash_token_blocks
from isthmus.workloads import (
    fixed_lengths,
    gamma_arrivals,
    independent_requests,
    load_length_table,
    lognormal_lengths,
    poisson_arrivals,
    session_requests,
    shared_prefix_requests,
    table_lengths,
)

DATA = Path(__file__).resolve().parents[2] / "data"
SHAREGPT_LENGTHS = DATA / "sharegpt" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv.gz"


def _gaps(times: list[float]) -> np.ndarray:
    assert times[0] == 0.0
    return np.diff(np.asarray(times))


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 3.0])
def test_gamma_arrivals_have_the_requested_rate_and_cv(cv):
    # 40k gaps: the sample CV's standard error is below 4 % even at cv 3 (excess kurtosis 6 cv^2).
    times = list(itertools.islice(gamma_arrivals(8.0, cv, np.random.default_rng(1)), 40_000))
    gaps = _gaps(times)
    assert np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(8.0, rel=0.05)
    assert _cv(gaps) == pytest.approx(cv, rel=0.12)


def test_poisson_arrivals_are_exponential():
    times = list(itertools.islice(poisson_arrivals(20.0, np.random.default_rng(2)), 20_000))
    gaps = _gaps(times)
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.03)
    assert _cv(gaps) == pytest.approx(1.0, rel=0.05)
    # P(gap > mean) = 1/e for an exponential distribution
    assert float(np.mean(gaps > gaps.mean())) == pytest.approx(math.exp(-1), abs=0.02)


def test_arrival_streams_are_seeded():
    a = list(itertools.islice(gamma_arrivals(5.0, 2.0, np.random.default_rng(7)), 3000))
    b = list(itertools.islice(gamma_arrivals(5.0, 2.0, np.random.default_rng(7)), 3000))
    c = list(itertools.islice(gamma_arrivals(5.0, 2.0, np.random.default_rng(8)), 3000))
    assert a == b and a != c
    with pytest.raises(ValueError):
        next(gamma_arrivals(0.0, 1.0, np.random.default_rng(0)))
    with pytest.raises(ValueError):
        next(poisson_arrivals(-1.0, np.random.default_rng(0)))


def test_length_distributions():
    assert list(itertools.islice(fixed_lengths(100, 7), 3)) == [(100, 7)] * 3
    pairs = np.array(list(itertools.islice(lognormal_lengths(800, 200, 0.8, 0.5, np.random.default_rng(3)),
                                           30_000)))
    assert pairs.min() >= 1
    assert pairs[:, 0].mean() == pytest.approx(800, rel=0.03)
    assert pairs[:, 1].mean() == pytest.approx(200, rel=0.03)
    prompts, outputs = load_length_table(SHAREGPT_LENGTHS)
    assert len(prompts) == len(outputs) == 30_731
    table = set(zip(prompts.tolist(), outputs.tolist(), strict=True))
    drawn = list(itertools.islice(table_lengths(prompts, outputs, np.random.default_rng(4)), 5000))
    assert all(pair in table for pair in drawn)
    assert np.mean([p for p, _ in drawn]) == pytest.approx(prompts.mean(), rel=0.08)


def test_independent_requests_pair_arrivals_and_lengths():
    recs = list(independent_requests([0.5, 1.0, 2.0], fixed_lengths(10, 3)))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.block_hashes) for r in recs] == [
        (0.5, 10, 3, ()), (1.0, 10, 3, ()), (2.0, 10, 3, ())]


def _sessions(n: int, seed: int = 5, **kw: float) -> list:
    rng = np.random.default_rng(seed)
    starts = poisson_arrivals(2.0, rng)
    lengths = lognormal_lengths(40, 30, 0.7, 0.7, rng)
    params = {"turns_mean": 4.0, "think_time_s": 5.0, **kw}
    return list(itertools.islice(session_requests(starts, lengths, rng, **params), n))


def test_session_turns_extend_the_previous_prompt():
    records = _sessions(3000)
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(records))
    by_session: dict[str, list] = {}
    for r in records:
        by_session.setdefault(r.session, []).append(r)
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert len(multi) > 50
    for turns in by_session.values():
        assert len(turns[0].block_hashes) == turns[0].prompt_tokens // 16
        for prev, cur in itertools.pairwise(turns):
            # previous prompt + previous output + at least one new user token
            assert cur.prompt_tokens > prev.prompt_tokens + prev.output_tokens
            assert cur.block_hashes[: len(prev.block_hashes)] == prev.block_hashes
            assert len(cur.block_hashes) == cur.prompt_tokens // 16
    # different sessions share nothing
    firsts = [turns[0].block_hashes[0] for turns in by_session.values() if turns[0].block_hashes]
    assert len(set(firsts)) == len(firsts)
    # geometric turns with mean 4 (sessions still running at the cut bias this down a little)
    finished = [len(t) for k, t in by_session.items() if int(k[1:]) < len(by_session) - 40]
    assert np.mean(finished) == pytest.approx(4.0, rel=0.15)


def test_session_hashes_equal_hashing_the_whole_conversation():
    """The incremental chaining gives exactly hash_token_blocks over the full prompt."""
    rng = np.random.default_rng(11)
    records = list(itertools.islice(session_requests(iter([0.0]), fixed_lengths(37, 21), rng,
                                                     turns_mean=1e9, think_time_s=1.0), 6))
    # replay the draws: one geometric, then per turn tokens (output of the previous turn + 37) and a think time
    replay = np.random.default_rng(11)
    replay.geometric(1e-9)
    tokens: list[int] = []
    pending = 0
    for rec in records:
        tokens += replay.integers(0, 32_000, pending + 37).tolist()
        assert rec.prompt_tokens == len(tokens)
        assert rec.block_hashes == hash_token_blocks(tokens, 16, ROOT_HASH)
        pending = 21
        replay.exponential(1.0)


def test_sessions_are_seeded_and_single_turn_without_think_time():
    assert _sessions(500, seed=1) == _sessions(500, seed=1)
    assert _sessions(500, seed=1) != _sessions(500, seed=2)
    single = _sessions(200, turns_mean=1.0, think_time_s=0.0)
    assert len({r.session for r in single}) == 200


def test_shared_prefix_groups():
    rng = np.random.default_rng(9)
    records = list(itertools.islice(
        shared_prefix_requests(poisson_arrivals(10.0, rng), fixed_lengths(100, 5), rng, groups=5,
                               system_prompt_tokens=1000, block_size=16), 2000))
    system_blocks = 1000 // 16
    assert all(r.prompt_tokens == 1100 and len(r.block_hashes) == 1100 // 16 for r in records)
    groups: dict[tuple[int, ...], list] = {}
    for r in records:
        groups.setdefault(r.block_hashes[:system_blocks], []).append(r)
    assert len(groups) == 5
    assert all(abs(len(members) - 400) < 80 for members in groups.values())
    # within a group exactly the system prompt's full blocks are shared; across groups nothing
    for members in groups.values():
        a, b = members[0], members[1]
        assert a.block_hashes[system_blocks] != b.block_hashes[system_blocks]
    heads = [members[0].block_hashes[0] for members in groups.values()]
    assert len(set(heads)) == 5


def test_shared_prefix_skew_makes_group_zero_popular():
    rng = np.random.default_rng(10)
    records = list(itertools.islice(
        shared_prefix_requests(poisson_arrivals(10.0, rng), fixed_lengths(16, 5), rng, groups=10,
                               system_prompt_tokens=64, group_skew=1.5), 4000))
    counts: dict[int, int] = {}
    for r in records:
        counts[r.block_hashes[0]] = counts.get(r.block_hashes[0], 0) + 1
    top = sorted(counts.values(), reverse=True)
    p0 = 1 / sum(k ** -1.5 for k in range(1, 11))
    assert top[0] / 4000 == pytest.approx(p0, abs=0.03)
