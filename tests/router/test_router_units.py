"""The router's pure parts: health, ejection, retry budget, backoff, metric parsing, prompts, hold queue,
and how the cluster state becomes a snapshot."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.tokenizer import ByteChunkTokenizer, render_chat
from isthmus.router.config import RouterConfig
from isthmus.router.hold import HoldQueue
from isthmus.router.prompt import BadRequest, parse_request
from isthmus.router.reliability import Ejector, Ewma, HealthTracker, RetryBudget, backoff_s
from isthmus.router.scrape import EngineLoad, parse_engine_metrics
from isthmus.router.state import ClusterState


# ---------------------------------------------------------------------------------------- state machines
def test_health_goes_down_after_three_failures_and_up_after_two_successes() -> None:
    h = HealthTracker(3, 2)
    assert h.up
    assert [h.record(False) for _ in range(2)] == [False, False] and h.up
    h.record(True)  # a success breaks the run
    assert not h.record(False) and not h.record(False) and h.up
    assert h.record(False) and not h.up
    assert not h.record(True) and not h.up
    h.record(False)  # a failure breaks the good run
    assert not h.record(True) and h.record(True) and h.up


def test_ejector_ejects_after_five_consecutive_failures_and_readmits_after_the_cooldown() -> None:
    e = Ejector(5, 10.0)
    for t in range(4):
        assert not e.failure(float(t))
    e.success()  # resets the run
    assert not any(e.failure(float(t)) for t in range(4))
    assert e.failure(4.0) and e.ejected(4.0) and e.ejected(13.9)
    assert not e.failure(5.0)  # failures while out do not extend it
    assert not e.ejected(14.0) and e.ejections == 1
    assert not e.failure(14.0)  # back with a fresh run


@given(st.floats(0.0, 1.0), st.integers(0, 2000), st.floats(0.0, 100.0))
def test_the_retry_budget_bounds_attempts_when_everything_fails(ratio: float, n: int, cap: float) -> None:
    budget = RetryBudget(ratio, cap)
    attempts = 0
    for _ in range(n):
        budget.deposit()
        attempts += 1
        while budget.withdraw():  # every attempt fails: retry as long as the budget allows
            attempts += 1
    assert attempts <= (1 + ratio) * n + 1e-6


def test_the_budget_allows_one_retry_per_five_requests_at_the_default_ratio() -> None:
    budget = RetryBudget()
    granted = []
    for _ in range(10):
        budget.deposit()
        granted.append(budget.withdraw())
    assert granted == [False, False, False, False, True] * 2


def test_backoff_is_full_jitter_capped() -> None:
    rng = np.random.default_rng(0)
    waits = [backoff_s(k, 0.1, 0.3, rng) for k in (1, 2, 3, 4, 5) for _ in range(200)]
    assert min(waits) >= 0 and max(waits) <= 0.3
    assert max(backoff_s(1, 0.1, 0.3, rng) for _ in range(200)) <= 0.1
    assert len(set(waits)) > 900  # jittered
    assert backoff_s(3, 0.0, 1.0, rng) == 0.0


def test_ewma_starts_at_the_first_sample() -> None:
    e = Ewma(0.3)
    assert math.isnan(e.value)
    assert e.add(0.1) == 0.1
    assert e.add(0.2) == pytest.approx(0.13)


# ---------------------------------------------------------------------------------------- metrics pages
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="2588",enable_prefix_caching="True"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{model_name="m"} 4.0
"""


def test_vllm_metrics_sum_ranks_and_read_the_cache_size() -> None:
    assert parse_engine_metrics(VLLM) == EngineLoad(running=5, waiting=7, kv_usage=0.375, num_kv_blocks=2588,
                                                    block_size=16)


def test_older_vllm_and_sglang_names() -> None:
    old = VLLM.replace("kv_cache_usage_perc", "gpu_cache_usage_perc")
    assert parse_engine_metrics(old).kv_usage == 0.375
    sglang = ('sglang:num_running_reqs{model_name="m"} 4\nsglang:num_queue_reqs{model_name="m"} 1\n'
              'sglang:token_usage{model_name="m"} 0.5\nsglang:cache_hit_rate{model_name="m"} 0.1\n')
    assert parse_engine_metrics(sglang, "sglang") == EngineLoad(running=4, waiting=1, kv_usage=0.5)
    assert parse_engine_metrics("something_else 1\n") == EngineLoad()


# ---------------------------------------------------------------------------------------- prompts
def test_prompts_are_tokenized_and_hashed_like_the_engine_double() -> None:
    tok = ByteChunkTokenizer()
    text = "x" * 200
    info = parse_request(b'{"model": "m", "prompt": "' + text.encode() + b'", "max_tokens": 7, "stream": true}',
                         chat=False, block_size=16)
    assert info.prompt_tokens == 50 and info.stream and info.max_output_tokens == 7
    assert info.block_hashes == hash_token_blocks(tok.encode(text), 16)
    msgs = [{"role": "user", "content": "hello " * 20}]
    chat = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "' + b"hello " * 20 + b'"}]}',
                         chat=True, block_size=16)
    ids = tok.encode(render_chat(msgs))
    assert chat.prompt_tokens == len(ids) and chat.block_hashes == hash_token_blocks(ids, 16)
    ids_prompt = parse_request(b'{"model": "m", "prompt": [' + b",".join(b"%d" % i for i in range(40)) + b"]}",
                               chat=False, block_size=16, hashes=False)
    assert ids_prompt.prompt_tokens == 40 and ids_prompt.block_hashes == ()


@pytest.mark.parametrize(("body", "chat", "what"), [
    (b"{not json", False, "malformed JSON"),
    (b"[1, 2]", False, "JSON object"),
    (b'{"prompt": "x"}', False, "'model'"),
    (b'{"model": "m"}', False, "'prompt'"),
    (b'{"model": "m", "prompt": "x", "max_tokens": 0}', False, "max_tokens"),
    (b'{"model": "m", "prompt": "x", "stream": "yes"}', False, "stream"),
    (b'{"model": "m", "messages": []}', True, "messages"),
    (b'{"model": "m", "messages": [{"content": "x"}]}', True, "role"),
])
def test_bad_bodies_are_bad_requests(body: bytes, chat: bool, what: str) -> None:
    with pytest.raises(BadRequest, match=what):
        parse_request(body, chat=chat, block_size=16)


# ---------------------------------------------------------------------------------------- hold queue
def test_held_requests_are_released_oldest_first_and_time_out() -> None:
    async def main() -> tuple[list[str], str | None]:
        capacity = {"n": 0}
        order: list[str] = []
        q: HoldQueue[str] = HoldQueue(0.01, release=lambda r: None)

        def attempt(name: str):  # type: ignore[no-untyped-def]
            def go() -> str | None:
                if capacity["n"] <= 0:
                    return None
                capacity["n"] -= 1
                order.append(name)
                return name
            return go

        waiters = [asyncio.create_task(q.wait(attempt(n), 2.0)) for n in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        assert len(q) == 3
        capacity["n"] = 2
        await asyncio.sleep(0.05)
        late = await q.wait(attempt("d"), 0.05)  # c is still ahead of it: d times out
        capacity["n"] = 1
        await asyncio.gather(*waiters)
        await q.close()
        return order, late

    order, late = asyncio.run(main())
    assert order == ["a", "b", "c"] and late is None


# ---------------------------------------------------------------------------------------- snapshots
def _state(**over: object) -> tuple[ClusterState, list[float]]:
    now = [100.0]
    cfg = RouterConfig.model_validate({
        "region": "east", "models": ["m"],
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B"},
                     {"url": "http://h:2", "region": "west", "gpu": "H100", "model": "Mistral-7B",
                      "num_kv_blocks": 64, "max_in_flight": 2}],
        "regions": {"rtt_ms": {"east": {"west": 80}}}, **over})
    return ClusterState(cfg, clock=lambda: now[0]), now


def test_views_count_in_transit_requests_as_waiting_like_the_simulator() -> None:
    st, now = _state()
    east = st.replicas["east-0"]
    d1 = east.dispatch(100)  # sent before the scrape: the engine's count includes it
    epoch = east.scrape_started()
    d2 = east.dispatch(50)  # sent while the scrape was in flight: not in its numbers
    east.apply_scrape(EngineLoad(running=1, waiting=4, kv_usage=0.5), epoch, now[0])
    d3 = east.dispatch(30)
    v = st.snapshot(now[0]).instances["east-0"]
    assert (v.running, v.waiting, v.kv_usage, v.in_flight) == (1, 4 + 2, 0.5, 3)
    assert v.queued_prefill_tokens == 180 and v.running_tokens == 0
    d3.first_byte()
    v = st.snapshot(now[0]).instances["east-0"]
    assert v.waiting == 5 and v.running_tokens == 30 and v.queued_prefill_tokens == 150
    for d in (d1, d2, d3, d3):
        d.finish()
    v = st.snapshot(now[0] + 0.5).instances["east-0"]
    assert (v.waiting, v.in_flight, v.running_tokens, v.queued_prefill_tokens) == (4, 0, 0, 0)
    assert v.age == pytest.approx(0.5)
    # no scrape for long: the router's own counts stand in
    v = st.snapshot(now[0] + 10).instances["east-0"]
    assert (v.running, v.waiting) == (0, 0)


def test_views_carry_profile_cap_health_and_rtts() -> None:
    st, now = _state()
    west = st.replicas["west-0"]
    assert west.capacity_blocks == 64 and st.replicas["east-0"].capacity_blocks > 1000
    a, b = west.dispatch(10), west.dispatch(10)
    snap = st.snapshot(now[0])
    v = snap.instances["west-0"]
    assert v.full and not v.available and v.prefill_s_per_token > 0
    assert snap.instances["east-0"].prefill_s_per_token > v.prefill_s_per_token  # A100 slower than H100
    a.finish()
    b.finish()
    assert st.rtt_s("east", "west") == pytest.approx(0.08)
    assert st.rtt_s("east", "east") == pytest.approx(0.002)
    west.rtt.add(0.01)  # measured beats configured
    assert st.rtt_s("east", "west") == pytest.approx(0.01)
    for _ in range(3):
        west.health.record(False)
    assert not st.snapshot(now[0]).instances["west-0"].healthy
    assert not st.snapshot(now[0], exclude=frozenset({"east-0"})).instances["east-0"].healthy
    assert st.any_available(now[0], local_only=False)
    for _ in range(3):
        st.replicas["east-0"].health.record(False)
    assert not st.any_available(now[0], local_only=False)


def test_the_prefix_mirror_records_what_was_sent_where() -> None:
    st, _ = _state()
    hashes = hash_token_blocks(list(range(160)), 16)
    st.record_sent("west-0", hashes)
    assert st.matched_blocks(hashes, "west-0") == 10 and st.matched_blocks(hashes, "east-0") == 0
    assert st.matched_blocks((*hashes[:4], 1, 2), "west-0") == 4


def test_a_peer_summary_becomes_aged_views_of_remote_replicas() -> None:
    now = [50.0]
    cfg = RouterConfig.model_validate({
        "region": "east", "mode": "regional", "models": ["m"],
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B"}],
        "peers": [{"region": "west", "url": "http://peer:1"}]})
    here = ClusterState(cfg, clock=lambda: now[0])
    there_cfg = cfg.model_copy(update={"region": "west", "replicas": (cfg.replicas[0].model_copy(
        update={"region": "west", "url": "http://h:9"}),), "peers": ()})
    there = ClusterState(there_cfg, clock=lambda: now[0])
    there.replicas["west-0"].dispatch(77)
    summary = there.summary(now[0])
    here.apply_summary(here.peers["west"], summary, now[0])
    now[0] += 0.4
    v = here.snapshot(now[0]).instances["west-0"]
    assert v.region == "west" and v.waiting == 1 and v.queued_prefill_tokens == 77 and v.healthy
    assert v.age == pytest.approx(0.4) and here.replicas["west-0"].url == "http://h:9"
    here.apply_summary(here.peers["west"], {"region": "west", "replicas": []}, now[0])
    assert "west-0" not in here.replicas
    with pytest.raises(ValueError):
        here.apply_summary(here.peers["west"], {"replicas": [{"id": "x"}]}, now[0])


def test_a_failed_forward_keeps_the_retry_away_from_that_whole_region() -> None:
    from isthmus.core.policy import Decision
    from isthmus.router.app import Routed, Router

    cfg = RouterConfig.model_validate({
        "region": "east", "mode": "regional", "models": ["m"],
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B"}],
        "peers": [{"region": "west", "url": "http://peer:1"}]})
    router = Router(cfg)  # no side effects until start()
    peer = router.state.peers["west"]
    router.state.apply_summary(peer, {"replicas": [
        {"id": f"west-{k}", "url": f"http://w:{k}", "running": 0, "waiting": 0} for k in range(2)]}, 0.0)
    assert router.failed_targets(Routed(Decision("west", forward=True), 0.0, peer=peer)) == {"west-0", "west-1"}
    local = Routed(Decision("east-0"), 0.0, replica=router.state.replicas["east-0"])
    assert router.failed_targets(local) == {"east-0"}
