"""The engine double's parts in process: settings, request validation, KV events, faults, the step loop."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import msgpack
import pytest
import zmq
from emulator_harness import ISTHMUS
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request as HttpRequest

from isthmus.core.errors import ConfigError
from isthmus.core.hashing import ROOT_HASH, hash_token_blocks
from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import builtin_perf_model
from isthmus.core.request import Request
from isthmus.core.tokenizer import ByteChunkTokenizer
from isthmus.emulator.app import EmulatorApp
from isthmus.emulator.config import EmulatorConfig, FaultSpec
from isthmus.emulator.engine import EngineDouble, Generation
from isthmus.emulator.faults import FaultState, fault_spec_from_json
from isthmus.emulator.filler import FillerText
from isthmus.emulator.kv_events import KvCacheWatcher, KvEventPublisher
from isthmus.emulator.openai_api import ApiError, parse_generation
from isthmus.engine.replica import Replica
from isthmus.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch

TOK = ByteChunkTokenizer()
PERF = builtin_perf_model("A100", "Mistral-7B")


# ----------------------------------------------------------------------------- settings
def test_resolve_defaults_follow_the_profiles() -> None:
    r = EmulatorConfig(model="Mistral-7B", gpu="A100").resolve()
    assert r.num_blocks == PERF.num_kv_blocks() and r.max_model_len == 32768
    assert r.spec.max_num_seqs == InstanceSpec.__dataclass_fields__["max_num_seqs"].default
    small = EmulatorConfig(num_gpu_blocks=10, block_size=16).resolve()
    assert small.max_model_len == 160  # the model's context capped to what the cache holds


@pytest.mark.parametrize("kw", [{"gpu": "nope"}, {"model": "nope"}, {"num_gpu_blocks": 10, "max_model_len": 500},
                                {"max_num_seqs": 0}, {"enable_chunked_prefill": False, "max_model_len": 4096}])
def test_resolve_rejects_bad_settings(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EmulatorConfig(**kw).resolve()


@pytest.mark.parametrize("kw", [{"time_scale": 0.0}, {"port": 70000}, {"kv_events_encoding": "json"}])
def test_config_rejects_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EmulatorConfig(**kw)


def test_bad_profile_is_a_one_line_error_with_exit_2() -> None:
    done = subprocess.run([str(ISTHMUS), "emulate", "--gpu", "B999", "--port", "0"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "unknown GPU 'B999'" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- requests
def _parse(data: Any, chat: bool = False, max_len: int = 1000) -> Any:
    return parse_generation(data, chat=chat, served_model="m", tokenizer=TOK, max_model_len=max_len)


def test_output_lengths_follow_vllm_defaults() -> None:
    assert _parse({"prompt": "abcd"}).max_tokens == 16
    assert _parse({"prompt": "abcd", "max_tokens": None}).max_tokens == 999
    msgs = [{"role": "user", "content": "hi"}]
    p = _parse({"messages": msgs}, chat=True)
    assert p.max_tokens == 1000 - len(p.prompt_ids)
    assert _parse({"messages": msgs, "max_tokens": 3, "max_completion_tokens": 5}, chat=True).max_tokens == 5
    assert _parse({"prompt": [[5, 6, 7]], "model": "m"}).prompt_ids == [5, 6, 7]
    s = _parse({"prompt": ["abcdefgh"], "stream": True, "stream_options": {"include_usage": True}})
    assert s.prompt_ids == TOK.encode("abcdefgh") and s.stream and s.include_usage and not s.continuous_usage


@pytest.mark.parametrize(("data", "status", "param"), [
    ({"prompt": "a", "model": "x"}, 404, "model"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "n": 3}, 400, "n"),
    ({"prompt": "a" * 4000}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 1000}, 400, "max_tokens"),
    ({"prompt": "a", "priority": "high"}, 400, "priority"),
    ({"prompt": "a", "priority": 1.5}, 400, "priority"),
    ({"prompt": "a", "priority": True}, 400, "priority"),
])
def test_bad_requests(data: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(ApiError) as err:
        _parse(data)
    assert (err.value.status, err.value.param) == (status, param)
    assert err.value.body()["error"]["code"] == status


def test_priority_is_vllms_integer_field_default_0() -> None:
    assert _parse({"prompt": "a"}).priority == 0
    assert _parse({"prompt": "a", "priority": None}).priority == 0
    assert _parse({"prompt": "a", "priority": 3}).priority == 3
    assert _parse({"messages": [{"role": "user", "content": "hi"}], "priority": -2}, chat=True).priority == -2


def test_filler_is_deterministic_per_prompt_and_seed() -> None:
    f = FillerText(TOK, seed=3)
    a = f.draw(20, [1, 2, 3])
    assert a == f.draw(20, [1, 2, 3]) and a != f.draw(20, [1, 2, 4]) and a != FillerText(TOK, 4).draw(20, [1, 2, 3])
    assert f.draw(20, [1, 2, 3], request_seed=9) == f.draw(20, [9], request_seed=9)
    text = "".join(f.text(t) for t in a)
    assert TOK.encode(text) == a


# ----------------------------------------------------------------------------- faults
def test_fault_specs_from_json() -> None:
    assert fault_spec_from_json({}) == FaultSpec()
    assert fault_spec_from_json({"stall_after": 2, "stall_s": 1, "die_exit": False}) == FaultSpec(stall_after=2,
                                                                                                 stall_s=1.0)
    for bad in ({"x": 1}, {"error_rate": "1"}, {"unhealthy": 1}, {"die_after": -1}, {"stall_s": 1e309}, []):
        with pytest.raises(ConfigError):
            fault_spec_from_json(bad)


def test_error_draws_are_seeded() -> None:
    a, b = FaultState(FaultSpec(error_rate=0.3), 5), FaultState(FaultSpec(error_rate=0.3), 5)
    seq = [a.draw_error() for _ in range(200)]
    assert seq == [b.draw_error() for _ in range(200)] and 30 < sum(seq) < 90
    assert not FaultState(FaultSpec(), 0).draw_error() and FaultState(FaultSpec(error_rate=1.0), 0).draw_error()


def test_admin_answers_loopback_clients_only() -> None:
    app = EmulatorApp(EmulatorConfig(num_gpu_blocks=64))

    def call(host: str) -> int:
        scope = {"type": "http", "method": "GET", "path": "/admin/fault", "headers": [], "query_string": b"",
                 "client": (host, 5555)}
        return asyncio.run(app.admin_fault(HttpRequest(scope))).status_code

    assert call("127.0.0.1") == 200 and call("::1") == 200 and call("::ffff:127.0.0.1") == 200
    assert call("10.1.2.3") == 403 and call("192.168.0.9") == 403


# ----------------------------------------------------------------------------- KV events
def test_batches_in_both_encodings() -> None:
    events = [BlockStored((11, 12), None, tuple(range(32)), 16), BlockRemoved((7,)), AllBlocksCleared()]
    arr = msgpack.unpackb(encode_batch(events, 1.5, "array"))
    assert arr == [1.5, [["BlockStored", [11, 12], None, list(range(32)), 16, None, "GPU"],
                         ["BlockRemoved", [7], "GPU"], ["AllBlocksCleared"]], 0]
    doc = msgpack.unpackb(encode_batch(events, 1.5, "map"))
    assert doc == {"ts": 1.5, "data_parallel_rank": 0, "events": [
        {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None, "token_ids": list(range(32)),
         "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None},
        {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"}, {"type": "AllBlocksCleared"}]}
    big = msgpack.unpackb(encode_batch([BlockRemoved((-(2**63), 2**63 - 1))], 0.0, "array"))
    assert big[1][0][1] == [-(2**63), 2**63 - 1]


def test_publisher_can_connect_to_a_binding_subscriber() -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind("tcp://127.0.0.1:*")
        endpoint = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
        pub = KvEventPublisher(endpoint, "map", topic="t", connect=True)
        assert pub.open() == endpoint
        try:
            got = None
            for _ in range(100):  # the first batches may go out before the connection is up
                pub.publish([AllBlocksCleared()], 2.0)
                if sub.poll(20):
                    got = sub.recv_multipart()
                    break
            assert got is not None
            topic, seq, payload = got
            assert topic == b"t" and len(seq) == 8
            assert msgpack.unpackb(payload) == {"ts": 2.0, "events": [{"type": "AllBlocksCleared"}],
                                                "data_parallel_rank": 0}
        finally:
            pub.close()
    finally:
        sub.close(linger=0)
        ctx.term()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 120), st.integers(1, 8)), min_size=1, max_size=12),
       st.integers(12, 40))
def test_watcher_events_replay_to_the_cache_state(reqs: list[tuple[int, int, int]], blocks: int) -> None:
    """Applying the events in order always gives exactly the pool's cached hashes, and every
    BlockStored run is a valid hash chain over its tokens."""
    spec = InstanceSpec("r", "a", "A100", "Mistral-7B", num_kv_blocks=blocks, max_num_batched_tokens=64)
    rep = Replica(spec, PERF, blocks, track_tokens=True)
    watcher = KvCacheWatcher(rep.pool)
    mirror: set[int] = set()

    def apply(events: list[Any]) -> None:
        for e in events:
            if isinstance(e, BlockStored):
                parent = ROOT_HASH if e.parent_block_hash is None else e.parent_block_hash
                assert hash_token_blocks(e.token_ids, 16, parent) == e.block_hashes
                assert e.parent_block_hash is None or e.parent_block_hash in mirror
                assert not mirror & set(e.block_hashes)
                mirror.update(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                assert set(e.block_hashes) <= mirror
                mirror.difference_update(e.block_hashes)
            else:
                mirror.clear()

    pending = list(enumerate(reqs))
    now = 0.0
    while pending or rep.has_work:
        if pending:
            i, (family, extra, out) = pending.pop(0)
            tokens = [1000 + family] * 40 + list(range(extra))  # families share a 40-token prefix
            tokens = tokens[: blocks * 16 - out]
            hashes = hash_token_blocks(tokens)
            rep.add_request(Request(f"q{i}", now, "a", len(tokens), hashes, out), now)
            watcher.register(f"q{i}", tokens, hashes)
        res = rep.step(now)
        if res is None:
            continue
        now += res.duration
        apply(watcher.events(prefill_step=res.prefill_tokens > 0))
        for fin in res.finished:
            watcher.unregister(fin.request.id)
        assert mirror == set(rep.pool._cached)
    rep.pool.reset_prefix_cache()
    apply(watcher.cleared())
    assert mirror == set() == set(rep.pool._cached)


# ----------------------------------------------------------------------------- the step loop
class _Recorder:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.done: list[int] = []

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        self.ttft.append(ttft_s)

    def next_token(self, itl_s: float) -> None:
        self.itl.append(itl_s)

    def finished(self, e2e_s: float, ttft_s: float, prompt_tokens: int, output_tokens: int,
                 reason: str = "length") -> None:
        self.done.append(output_tokens)


def test_loop_runs_in_scaled_wall_time_and_aborts() -> None:
    async def main() -> tuple[float, float, _Recorder, Generation, Generation]:
        spec = InstanceSpec("r", "a", "A100", "Mistral-7B", num_kv_blocks=500)
        rep = Replica(spec, PERF, 500, track_tokens=True)
        rec = _Recorder()
        engine = EngineDouble(rep, 0.5, rec)
        task = asyncio.create_task(engine.run())
        # modelled time of the same work, stepped alone
        twin = Replica(spec, PERF, 500, track_tokens=True)
        twin.add_request(Request("x", 0.0, "a", 100, (), 30), 0.0)
        model_s = 0.0
        while (res := twin.step(model_s)) is not None:
            model_s += res.duration
        t0 = time.monotonic()
        keep = Generation("keep", TOK.encode("p" * 400), [TOK.encode(" the")[0]] * 30, t0)
        drop = Generation("drop", TOK.encode("q" * 400), [TOK.encode(" the")[0]] * 1000, t0)
        engine.submit(keep)
        engine.submit(drop)
        while drop.produced < 3:
            await asyncio.sleep(0.001)
        assert engine.abort("drop") and not engine.abort("drop")
        while not keep.done:
            keep.changed.clear()
            await keep.changed.wait()
        wall = time.monotonic() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return wall, model_s, rec, keep, drop

    wall, model_s, rec, keep, drop = asyncio.run(main())
    assert keep.produced == 30 and keep.error is None and rec.done == [30]
    assert drop.done and drop.error == "aborted" and drop.produced < 1000
    assert len(rec.ttft) == 2 and len(rec.itl) == 29 + drop.produced - 1
    # two requests batch together, so the run takes about the modelled time of one, scaled by 0.5
    assert 0.5 * model_s * 0.9 < wall < 0.5 * model_s * 1.5 + 0.05, (wall, model_s)
