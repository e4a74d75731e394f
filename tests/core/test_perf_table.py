import csv
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from isthmus.core import InstanceSpec, Request, hash_token_blocks
from isthmus.core.perf_table import LLAMA_LAYER_OPS, LLAMA_ONCE_OPS, TabularPerfModel
from isthmus.engine import Replica

PROFILE = Path(__file__).resolve().parents[2] / "data/llmservingsim/profiles/RTX4090/Llama-3.1-8B/bf16/tp1"


def _curves(path, key):
    out = defaultdict(lambda: ([], []))
    with path.open() as fh:
        for row in csv.DictReader(fh):
            out[row["layer"]][0].append(float(row[key]))
            out[row["layer"]][1].append(float(row["time_us"]))
    return dict(out)


@pytest.fixture(scope="module")
def profile():
    dense = _curves(PROFILE / "dense.csv", "tokens")
    seqs = _curves(PROFILE / "per_sequence.csv", "sequences")
    attn = np.loadtxt(PROFILE / "attention.csv", delimiter=",", skiprows=1)
    return dense, seqs, attn


@pytest.fixture(scope="module")
def model(profile):
    dense, seqs, attn = profile
    return TabularPerfModel.from_profile(dense, seqs, attn, num_layers=32)


# A synthetic profile, monotone by construction, on a product grid like the profiler's.
C, H, N, K = [16, 32, 64, 128], [0, 16, 64, 256], [1, 2, 4, 8, 16], [16, 64, 256, 1024]


def _synthetic_rows(n_max_mixed=8):
    rows = [(c, h, 0, 0, 5.0 + 0.01 * c * (h + c / 2)) for c, h in itertools.product(C, H)]
    rows += [(0, 0, n, k, 4.0 + 0.02 * n * k) for n, k in itertools.product(N, K)]
    rows += [(c, h, n, k, 6.0 + 0.01 * c * (h + c / 2) + 0.02 * n * k)
             for c, h, n, k in itertools.product(C, H, N, K) if n <= n_max_mixed]
    return np.array(rows, dtype=float)


def _synthetic_model(rows=None):
    toks = np.array([1, 2, 4, 8, 16, 32])
    return TabularPerfModel(toks, 100.0 + 3.0 * toks, [1, 4, 16], [10.0, 11.0, 15.0],
                            _synthetic_rows() if rows is None else rows, num_layers=4)


def test_synthetic_grid_points_are_reproduced_exactly():
    rows = _synthetic_rows()
    m = _synthetic_model(rows)
    for c, h, n, k, us in rows:
        assert m.attention_us(c, h, n, k) == pytest.approx(us, rel=1e-12)
    assert m.dense_us(8) == pytest.approx(124.0) and m.dense_us(6) == pytest.approx(118.0)
    assert m.sequence_us(4) == pytest.approx(11.0)


def test_mixed_batches_beyond_the_mixed_grid_add_the_decode_only_increment():
    m = _synthetic_model()  # mixed rows only up to n = 8, decode-only up to 16
    expect = m.attention_us(64, 16, 8, 256) + m.attention_us(0, 0, 16, 256) - m.attention_us(0, 0, 8, 256)
    assert m.attention_us(64, 16, 16, 256) == pytest.approx(expect)


def test_real_profile_points_are_the_running_maximum_of_their_regime(profile, model):
    """Each grid point equals the largest measurement at or below it on every axis, within its kernel
    regime (decode-only, prefill-only, mixed): exact where the profile is already monotone."""
    attn = profile[2]
    c, h, n, k, t = attn.T
    regime = (c > 0).astype(int) * 2 + (n > 0)
    exact = 0
    for i, (ci, hi, ni, ki, ti) in enumerate(attn):
        below = (regime == regime[i]) & (c <= ci) & (h <= hi) & (n <= ni) & (k <= ki)
        expect = t[below].max()
        assert model.attention_us(ci, hi, ni, ki) == pytest.approx(expect, rel=1e-12)
        exact += expect == ti
    assert exact > 0.7 * len(attn)


def test_step_time_composes_layers_once_ops_and_sampling(profile, model):
    dense, seqs, _ = profile

    def op(name, x, table):
        xs, ys = table[name]
        return ys[xs.index(float(x))]

    per_layer = sum(mult * op(name, 2048, dense) for name, mult in LLAMA_LAYER_OPS.items())
    once = sum(op(name, 2048, dense) for name in LLAMA_ONCE_OPS)
    assert model.dense_us(2048) == pytest.approx(32 * per_layer + once)
    assert model.sequence_us(1) == pytest.approx(op("lm_head", 1, seqs) + op("sampler", 1, seqs))
    # One 2048-token prompt with no history: 32 layers of attention at (2048, 0), one sampled sequence.
    expect = (model.dense_us(2048) + 32 * model.attention_us(2048, 0, 0, 0) + model.sequence_us(1)) * 1e-6
    assert model.step_time(2048, 2048 * 1024.0, 1, 0, 0) == pytest.approx(expect)
    # A decode step: n tokens, n sequences, mean context.
    expect = (model.dense_us(40) + 32 * model.attention_us(0, 0, 40, 1000) + model.sequence_us(40)) * 1e-6
    assert model.step_time(0, 0.0, 0, 40, 40 * 1000) == pytest.approx(expect)
    # The history of a chunk after cached tokens is recovered from prefill_attn.
    assert model.step_time(512, 512 * (1024 + 256.0), 1, 0, 0) == pytest.approx(
        (model.dense_us(512) + 32 * model.attention_us(512, 1024, 0, 0) + model.sequence_us(1)) * 1e-6)


def test_monotone_in_tokens_and_kv(model):
    def nondecreasing(values):
        assert np.all(np.diff(values) >= -1e-9)

    nondecreasing([model.dense_us(t) for t in range(1, 5000, 7)])
    nondecreasing([model.sequence_us(s) for s in range(1, 400)])
    for n in (1, 3, 37, 128, 300):
        nondecreasing([model.step_time(0, 0.0, 0, n, n * k) for k in range(1, 40000, 97)])
    for k in (16, 900, 20000):
        nondecreasing([model.step_time(0, 0.0, 0, n, n * k) for n in range(1, 400)])
    for hist in (0, 300, 5000, 30000):
        nondecreasing([model.step_time(c, c * (hist + c / 2), 1, 0, 0) for c in range(16, 4096, 13)])
        nondecreasing([model.step_time(c, c * (hist + c / 2), 1, 20, 20 * 700) for c in range(16, 4096, 13)])
    for c in (16, 700, 2048):
        nondecreasing([model.step_time(c, c * (hist + c / 2), 1, 0, 0) for hist in range(0, 40000, 101)])
        nondecreasing([model.step_time(c, c * (hist + c / 2), 1, 8, 8 * 3000) for hist in range(0, 40000, 101)])


def test_linear_in_kv_beyond_the_grid(model):
    at = [model.attention_us(0, 0, 32, k) for k in (16384, 20000, 23616, 27232)]
    steps = np.diff(at)
    assert steps[0] > 0 and steps == pytest.approx([steps[0]] * 3)
    slope = (model.attention_us(0, 0, 32, 16384) - model.attention_us(0, 0, 32, 8192)) / 8192
    assert steps[0] / 3616 == pytest.approx(slope)


def test_several_prefills_cost_about_their_separate_kernels(model):
    # Two fresh 1024-token prompts in one step: less than one 2048-token prompt, about two 1024 ones.
    two = model.attention_us(2048, 2 * 1024 * 512 / 2048 - 1024, 0, 0)
    assert two < model.attention_us(2048, 0, 0, 0)
    assert two == pytest.approx(2 * model.attention_us(1024, 0, 0, 0), rel=0.05)
    many_tiny = model.attention_us(64, 4 * 16 * 8 / 64 - 32, 0, 0)  # four 16-token prompts
    assert many_tiny >= model.attention_us(16, 0, 0, 0)


def test_drives_a_replica_end_to_end(model):
    spec = InstanceSpec("r", "a", "RTX4090", "Llama-3.1-8B", num_kv_blocks=64)
    rep = Replica(spec, model, 64)
    for i in range(3):
        toks = list(range(i, i + 300))
        rep.add_request(Request(f"q{i}", 0.0, "a", len(toks), hash_token_blocks(toks), 20), 0.0)
    now, done = 0.0, []
    while rep.has_work:
        res = rep.step(now)
        assert res is not None and res.duration > 0.0
        now += res.duration
        done += res.finished
    assert len(done) == 3
    assert 0.3 < now < 1.5  # 900 prompt tokens and 19 decode steps of ~16 ms each


def test_rejects_bad_profiles(profile):
    dense, seqs, attn = profile
    with pytest.raises(ValueError, match="lacks ops"):
        TabularPerfModel.from_profile({k: v for k, v in dense.items() if k != "o_proj"}, seqs, attn, 32)
    with pytest.raises(ValueError, match="does not place"):
        TabularPerfModel.from_profile({**dense, "q_norm": dense["layernorm"]}, seqs, attn, 32)
    with pytest.raises(ValueError, match="decode-only"):
        TabularPerfModel.from_profile(dense, seqs, attn[attn[:, 0] > 0], 32)
    with pytest.raises(ValueError, match="num_layers"):
        TabularPerfModel.from_profile(dense, seqs, attn, 0)
    with pytest.raises(ValueError, match="negative"):
        _synthetic_model(np.vstack([_synthetic_rows(), [[16, 0, 0, 0, -1.0]]]))
    with pytest.raises(ValueError, match="rows of"):
        _synthetic_model(np.zeros((3, 4)))
