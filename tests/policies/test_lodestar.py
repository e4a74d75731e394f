"""Lodestar: warm-up fallback, the KV-pressure guard, model swaps, determinism, persistence, features."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from policy_fakes import FakePrefixView, RttTable, req, snap, view

from isthmus.core.errors import RegistryError
from isthmus.core.policy import Outcome
from isthmus.core.request import Request
from isthmus.policies import default_registry
from isthmus.policies.lodestar import (
    FEATURES,
    N_FEATURES,
    LodestarPolicy,
    MlpModel,
    SampleStore,
    feature_matrix,
)

T_P = 1e-4
# a tiny MLP and small counts keep every fit in milliseconds
SMALL = {"warmup": 40, "refit_every": 20, "window": 50, "replay": 20, "hidden_layers": 1, "hidden_units": 8,
         "epochs": 5, "refit_epochs": 2, "batch_size": 16}
RTT = RttTable({("east", "west"): 0.1})


def lodestar(seed: int = 0, **params: object) -> LodestarPolicy:
    pol = default_registry().create("lodestar", {**SMALL, **params}, rng=np.random.default_rng(seed))
    assert isinstance(pol, LodestarPolicy)
    return pol


def world(seed: int, n: int):
    """``n`` (request, snapshot) pairs: 4 replicas in two regions with random load and cache."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        vs = [view(f"i{i}", "east" if i < 2 else "west", running=int(rng.integers(0, 6)),
                   waiting=int(rng.integers(0, 6)), queued_prefill_tokens=int(rng.integers(0, 8000)),
                   running_tokens=int(rng.integers(0, 8000)), kv_usage=float(rng.uniform(0, 0.6)),
                   prefill_s_per_token=T_P * (1 + i % 2))
              for i in range(4)]
        prefix = FakePrefixView({f"i{i}": int(rng.integers(0, 50)) for i in range(4)})
        r = req(f"r{k}", origin=("east", "west")[k % 2], prompt=int(rng.integers(200, 1600)))
        out.append((r, snap(vs, prefix=prefix, rtt=RTT, now=float(k))))
    return out


def true_ttft(r, s, target: str) -> float:
    """The synthetic world's TTFT: network + queued and uncached prefill on the chosen replica."""
    v = s.instances[target]
    hit = min(s.prefix.match(r.block_hashes).get(target, 0) * 16, r.prompt_tokens)
    return RTT(r.origin, v.region) + v.prefill_s_per_token * (v.queued_prefill_tokens + r.prompt_tokens - hit)


def drive(pol: LodestarPolicy, cases) -> list[str | None]:
    """Decide each case and feed its outcome straight back; the chosen targets."""
    targets = []
    for r, s in cases:
        d = pol.choose(r, s)
        targets.append(d.target)
        ttft = true_ttft(r, s, d.target)
        pol.observe(Outcome(r, d.target, s.now, ttft, ttft + 1.0, 0))
    return targets


# ------------------------------------------------------------------------------------------ params
def test_parameters_are_checked():
    with pytest.raises(RegistryError, match="lodestar"):
        default_registry().create("lodestar", {"training": "async"})
    with pytest.raises(RegistryError, match="lodestar"):
        default_registry().create("lodestar", {"epsilon": 1.5})
    with pytest.raises(RegistryError, match="lodestar"):
        default_registry().create("lodestar", {"warmup": 0})
    pol = default_registry().create("lodestar", {"fallback": {"exploit_threshold": 0.3}})
    assert pol.params.fallback.exploit_threshold == 0.3 and pol.params.warmup == 5000


# ---------------------------------------------------------------------------------------- features
def test_feature_vector_of_a_known_snapshot():
    a = view("a", "east", running=3, waiting=2, queued_prefill_tokens=1023, running_tokens=4095, kv_usage=0.25,
             prefill_s_per_token=2e-4, age=0.0)
    b = view("b", "west", running=0, waiting=1, queued_prefill_tokens=0, running_tokens=0, kv_usage=0.5,
             age=0.5)  # profile unknown: the fallback's default t_p
    s = snap([a, b], here="west", rtt=RttTable({("east", "west"): 0.1}, intra_s=0.002),
             prefix=FakePrefixView({"a": 10}))
    r = req(origin="east", prompt=1600)
    x = feature_matrix(r, s, [a, b], s.prefix.match(r.block_hashes), 1e-4)
    assert x.shape == (2, N_FEATURES) and len(FEATURES) == N_FEATURES
    got = dict(zip(FEATURES, x[0], strict=True))
    assert got == pytest.approx({
        "prompt_tokens_log2": math.log2(1601), "hit_ratio": 0.1, "running": 3, "waiting": 2,
        "queued_prefill_tokens_log2": 10.0, "running_tokens_log2": 12.0, "kv_usage": 0.25,
        "prefill_ms_per_token": 0.2, "uncached_prefill_s": 2e-4 * 1440, "queued_prefill_s": 2e-4 * 1023,
        "rtt_origin_s": 0.002, "rtt_router_s": 0.1, "same_region": 1.0, "view_age_s": 0.0})
    got = dict(zip(FEATURES, x[1], strict=True))
    assert got == pytest.approx({
        "prompt_tokens_log2": math.log2(1601), "hit_ratio": 0.0, "running": 0, "waiting": 1,
        "queued_prefill_tokens_log2": 0.0, "running_tokens_log2": 0.0, "kv_usage": 0.5,
        "prefill_ms_per_token": 0.1, "uncached_prefill_s": 1e-4 * 1600, "queued_prefill_s": 0.0,
        "rtt_origin_s": 0.1, "rtt_router_s": 0.002, "same_region": 0.0, "view_age_s": 0.5})


# ------------------------------------------------------------------------------------------ warm-up
def test_before_warmup_it_decides_as_preble_and_learns_from_those_decisions():
    pol = lodestar(warmup=10_000)
    preble = default_registry().create("preble")
    cases = world(1, 60)
    for r, s in cases:
        d = pol.choose(r, s)
        assert d.target == preble.choose(r, s).target
        assert d.reason.startswith("fallback (warmup)")
        pol.observe(Outcome(r, d.target, s.now, 0.5, 1.0, 0))
    assert pol.model is None and pol.samples_seen == 60
    assert pol.stats["warmup"] == 60 and pol.stats["model"] == 0


def test_inline_training_fits_at_warmup_then_every_refit_and_the_model_decides():
    pol = lodestar()
    drive(pol, world(2, 39))
    assert pol.model is None
    drive(pol, world(3, 1))
    assert pol.model is not None and pol.model.version == 1 and pol.model.trained_on == 40
    drive(pol, world(4, 45))
    assert pol.stats["fits"] == 3 and pol.model.version == 3  # at 40, 60 and 80 samples
    r, s = world(5, 1)[0]
    assert pol.choose(r, s).reason.startswith("model v3: predicted TTFT")


def test_swap_delay_stages_the_model_until_its_ready_time():
    pol = lodestar(swap_delay_s=100.0)
    cases = world(6, 40)
    drive(pol, cases)  # the 40th outcome is known at arrival (0) + e2e; model ready 100 s later
    assert pol.model is None
    r, _ = cases[0]
    ttft = true_ttft(*cases[-1], "i0")
    ready = cases[-1][0].arrival + ttft + 1.0 + 100.0
    _, s_early = world(7, 1)[0]
    assert pol.choose(r, s_early).reason.startswith("fallback (warmup)")  # now = 0 < ready
    late = snap(list(s_early.instances.values()), prefix=s_early.prefix, rtt=RTT, now=ready + 200.0)
    pol.choose(r, late)
    assert pol.model is not None and pol.model.version == 1


# --------------------------------------------------------------------------------------- KV guard
def test_kv_pressure_narrows_to_two_by_consistent_hashing_of_the_prefix():
    pol = lodestar(warmup=10_000)
    vs = [view(f"i{i}", kv_usage=0.9, waiting=i) for i in range(6)]
    r = req("x", prompt=1600)
    pair = {v.id for v in pol.narrow(r, vs)}
    assert len(pair) == 2
    d = pol.choose(r, snap(vs))
    assert d.target in pair and d.reason.startswith("KV pressure: narrowed to 2")
    assert pol.stats["narrowed"] == 1
    # the same prefix (first blocks) maps to the same pair, whatever follows it and whatever the loads
    r2 = req("y", prompt=3200)
    vs2 = [view(f"i{i}", kv_usage=0.95, waiting=10 - i) for i in range(6)]
    assert {v.id for v in pol.narrow(r2, vs2)} == pair
    # consistent: removing a replica outside the pair keeps the pair
    other = next(v for v in vs if v.id not in pair)
    assert {v.id for v in pol.narrow(r, [v for v in vs if v is not other])} == pair
    # prefixes spread over the replicas
    prompts = [Request(f"z{k}", 0.0, "east", 320, tuple(range(k * 100, k * 100 + 20)), 10) for k in range(40)]
    spread = {frozenset(v.id for v in pol.narrow(p, vs)) for p in prompts}
    assert len(spread) > 5


def test_no_narrowing_below_the_kv_threshold():
    pol = lodestar(warmup=10_000)
    vs = [view(f"i{i}", kv_usage=0.7) for i in range(6)]
    d = pol.choose(req(), snap(vs))
    assert not d.reason.startswith("KV pressure") and pol.stats["narrowed"] == 0


# ------------------------------------------------------------------------------------------ guards
def test_out_of_range_features_fall_back_to_preble():
    pol = lodestar()
    drive(pol, world(8, 40))
    assert pol.model is not None
    r, s = world(9, 1)[0]
    assert pol.choose(r, s).reason.startswith("model v1")
    huge = [view(v.id, v.region, waiting=500, prefill_s_per_token=T_P) for v in s.instances.values()]
    d = pol.choose(r, snap(huge, prefix=s.prefix, rtt=RTT, now=s.now))
    assert d.reason.startswith("fallback (out_of_range)") and pol.stats["out_of_range"] == 1


class _Broken(MlpModel):
    def predict(self, x: np.ndarray) -> np.ndarray:
        raise FloatingPointError("overflow")


def test_a_scoring_error_falls_back_to_preble():
    pol = lodestar()
    drive(pol, world(10, 40))
    m = pol.model
    assert m is not None
    pol.install(_Broken.from_arrays(m.to_arrays()))
    r, s = world(11, 1)[0]
    d = pol.choose(r, s)
    assert d.reason.startswith("fallback (error)") and d.target in s.instances


# -------------------------------------------------------------------------------------- model swap
def test_external_training_swaps_the_model_in_while_decisions_continue():
    pol = lodestar(training="external")
    drive(pol, world(12, 45))
    assert pol.model is None and pol.refit_due()  # external: observe never fits
    data = pol.training_data()
    assert not pol.refit_due() and data.x.shape == (45, N_FEATURES) and data.samples_seen == 45
    trainer = pol.new_trainer()
    box: dict[str, MlpModel] = {}
    started = threading.Event()

    def fit() -> None:
        started.set()
        box["m"] = trainer.fit(data)

    worker = threading.Thread(target=fit)
    worker.start()
    started.wait()
    reasons = [pol.choose(r, s).reason for r, s in world(13, 30)]  # decisions go on during the fit
    worker.join()
    assert all(x.startswith("fallback (warmup)") for x in reasons)
    model = box["m"]
    pol.install(model)
    r, s = world(14, 1)[0]
    assert pol.choose(r, s).reason.startswith("model v1")  # the next decision uses it
    # a second fit starts from the first's weights and gets the next version
    drive(pol, world(15, 20))
    assert pol.refit_due()
    pol.install(trainer.fit(pol.training_data()))
    assert pol.choose(r, s).reason.startswith("model v2")


def test_a_model_is_complete_and_frozen_before_anyone_can_install_it():
    pol = lodestar()
    drive(pol, world(16, 40))
    m = pol.model
    assert m is not None
    arrays = m.to_arrays()
    with pytest.raises(ValueError, match="read-only"):
        m.weights[0][0, 0] = 1.0
    half = dict(arrays)
    half["w0"] = np.full_like(arrays["w0"], np.nan)  # weights not yet written
    with pytest.raises(ValueError, match="non-finite"):
        MlpModel.from_arrays(half)
    short = dict(arrays)
    short["b0"] = arrays["b0"][:-1]
    with pytest.raises(ValueError, match="layer 0"):
        MlpModel.from_arrays(short)
    other = {**arrays, "w0": arrays["w0"][:-1], "x_mean": arrays["x_mean"][:-1], "x_scale": arrays["x_scale"][:-1],
             "x_lo": arrays["x_lo"][:-1], "x_hi": arrays["x_hi"][:-1]}
    with pytest.raises(ValueError, match="features"):
        pol.install(MlpModel.from_arrays(other))
    assert pol.model is m


# ------------------------------------------------------------------------------------- determinism
def test_same_seed_same_decisions_and_same_fitted_models():
    a, b = lodestar(seed=7, epsilon=0.2), lodestar(seed=7, epsilon=0.2)
    cases = world(17, 90)
    assert drive(a, cases) == drive(b, cases)
    assert a.model is not None and b.model is not None and a.stats == b.stats
    probe = np.random.default_rng(0).uniform(0, 1, (16, N_FEATURES))
    assert a.model.predict(probe).tobytes() == b.model.predict(probe).tobytes()
    assert a.state_bytes() == b.state_bytes()
    c = lodestar(seed=8, epsilon=0.2)
    drive(c, cases)
    assert c.model is not None and c.model.predict(probe).tobytes() != a.model.predict(probe).tobytes()


# ------------------------------------------------------------------------------------- persistence
def test_model_and_state_round_trip_through_bytes():
    pol = lodestar(seed=3)
    drive(pol, world(18, 75))
    m = pol.model
    assert m is not None
    back = MlpModel.from_bytes(m.to_bytes())
    probe = np.random.default_rng(1).uniform(0, 1, (8, N_FEATURES))
    assert back.predict(probe).tobytes() == m.predict(probe).tobytes()
    assert (back.version, back.trained_on, back.log_target) == (m.version, m.trained_on, m.log_target)

    clone = lodestar(seed=3)
    clone.load_state_bytes(pol.state_bytes())
    assert clone.samples_seen == pol.samples_seen and clone.refit_due() == pol.refit_due()
    xa, ya = pol._store.arrays()
    xb, yb = clone._store.arrays()
    assert xa.tobytes() == xb.tobytes() and ya.tobytes() == yb.tobytes()
    for r, s in world(19, 10):
        assert clone.choose(r, s).target == pol.choose(r, s).target


def test_sample_store_keeps_recent_window_and_a_diverse_replay_buffer():
    store = SampleStore(window=4, replay=3)
    rows = np.zeros((10, N_FEATURES))
    rows[:, 1] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0]  # one cache hit among misses
    for k in range(10):
        store.add(rows[k], 0.5)
    x, _ = store.arrays()
    assert len(store) == 7 and store.seen == 10
    assert x[:4, 1].tolist() == [0.0] * 4  # the window: samples 6..9
    assert 0.9 in x[4:, 1].tolist()  # the rare sample survives in the replay buffer
    back = SampleStore.from_arrays(store.to_arrays())
    assert back.arrays()[0].tobytes() == x.tobytes() and back.seen == 10


def test_isthmus_train_fits_offline_from_a_saved_state(tmp_path):
    """`isthmus train STATE`: a model fitted from the samples a router saved, written back."""
    from typer.testing import CliRunner

    from isthmus.cli import build_app

    pol = lodestar(seed=4, training="external")
    drive(pol, world(20, 60))
    assert pol.model is None  # external training: nothing fitted yet
    state = tmp_path / "state.npz"
    state.write_bytes(pol.state_bytes())
    small = '{"hidden_layers": 1, "hidden_units": 8, "epochs": 5, "batch_size": 16}'
    result = CliRunner().invoke(build_app(), ["train", str(state), "--params", small, "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    trained = lodestar(seed=4)
    trained.load_state_bytes((tmp_path / "t.npz").read_bytes())
    assert trained.model is not None and trained.samples_seen == 60
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a state")
    result = CliRunner().invoke(build_app(), ["train", str(bad)])
    assert result.exit_code == 2 and "not a lodestar state file" in result.output
