"""The router's KV-event subscriber: engine doubles publishing events (both encodings) correct the
router's prefix mirror, and bad messages from a publisher never end the subscription."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from router_harness import Emulator, config, emulators, free_port, replica, running_router, wait_until

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.tokenizer import ByteChunkTokenizer
from isthmus.kv_events import ClearedBlocks, MalformedBatch, RemovedBlocks, StoredBlocks, decode_batch

ENGINE = ("--model", "Mistral-7B", "--gpu", "A100", "--served-model-name", "m", "--time-scale", "0.01",
          "--num-gpu-blocks", "64")
RID = "east-0"


def hashes_of(prompt: str) -> tuple[int, ...]:
    return hash_token_blocks(ByteChunkTokenizer().encode(prompt), 16)


def complete(port: int, prompt: str) -> int:
    """One non-streamed completion of ``prompt`` at ``port``; returns the status."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        c.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": prompt, "max_tokens": 2}),
                  {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_decode_batch_accepts_both_encodings_and_extra_fields() -> None:
    arr = msgpack.packb([1.0, [["BlockStored", [1, 2], None, [5] * 32, 16, None, "GPU", "extra"],
                               ["BlockStored", [3], None, [5] * 16, 16, None, "CPU"],
                               ["BlockRemoved", [9], "GPU"], ["Unknown", 1], ["AllBlocksCleared"]], 0, "more"])
    changes, skipped = decode_batch(arr)
    assert changes == [StoredBlocks((1, 2), None, (5,) * 32, 16), RemovedBlocks((9,)), ClearedBlocks()]
    assert skipped == 2
    mp = msgpack.packb({"ts": 1.0, "events": [
        {"type": "BlockStored", "block_hashes": [4], "parent_block_hash": 2, "new_field": 1},
        {"type": "BlockRemoved", "block_hashes": [4], "medium": None}, {"type": "AllBlocksCleared"}],
        "data_parallel_rank": 0, "other": True})
    assert decode_batch(mp) == ([StoredBlocks((4,), 2), RemovedBlocks((4,)), ClearedBlocks()], 0)
    for bad in (b"\xc1", msgpack.packb(3), msgpack.packb([1.0, [["BlockStored", "x", None]]]),
                msgpack.packb({"events": [{"block_hashes": [1]}]})):
        with pytest.raises(MalformedBatch):
            decode_batch(bad)
    with pytest.raises(MalformedBatch):
        decode_batch(mp, "array")
    # vLLM 0.3x: an array batch whose events are tagged maps
    mixed = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None,
                                  "token_ids": [1] * 16, "block_size": 16, "medium": "GPU"},
                                 {"type": "AllBlocksCleared"}], 0])
    assert decode_batch(mixed) == ([StoredBlocks((7,), None, (1,) * 16, 16), ClearedBlocks()], 0)


def test_engine_hashes_of_another_kind_are_translated_to_the_routers() -> None:
    """A vLLM-like engine names blocks its own way (sha256) but sends their tokens: the mirror learns
    the router's names, chains children through their parent, and translates evictions."""
    from isthmus.router.config import RouterConfig
    from isthmus.router.state import ClusterState

    cfg = RouterConfig.model_validate({
        "region": "east", "models": ["m"], "policy": {"name": "prefix_trie"},
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B",
                      "num_kv_blocks": 64}]})
    st = ClusterState(cfg, keep_prefix=True, clock=lambda: 0.0)
    tokens = list(range(1000, 1064))  # 4 blocks
    ours = hash_token_blocks(tokens, 16)
    theirs = (11, 12, 13, 14)
    st.apply_kv_events(RID, [StoredBlocks(theirs[:2], None, tuple(tokens[:32]), 16)])
    st.apply_kv_events(RID, [StoredBlocks(theirs[2:], theirs[1], tuple(tokens[32:]), 16)])
    assert st.matched_blocks(ours, RID) == 4
    st.apply_kv_events(RID, [RemovedBlocks((theirs[3],))])
    assert st.matched_blocks(ours, RID) == 3
    st.apply_kv_events(RID, [StoredBlocks((99,), None, (1,) * 8, 8)])  # another block size: taken as is
    assert st.matched_blocks((99,), RID) == 1
    st.apply_kv_events(RID, [ClearedBlocks()])
    assert st.matched_blocks(ours, RID) == 0


def wait_joined(emu: Emulator, rt: Any, tag: str) -> None:
    """Send distinct prompts straight to the engine until the subscriber has received a batch
    (a ZMQ subscriber joins asynchronously and misses what was published before)."""
    subs = rt.router.kv_events.subscribers[RID]
    for k in range(50):
        assert complete(emu.port, f"warm-up {tag} {k} " * 8) == 200
        if wait_until(lambda: subs.stats.batches > 0, timeout=0.2):
            return
    raise AssertionError("the subscriber received no KV events")


@pytest.mark.parametrize("encoding", ["array", "map"])
def test_kv_events_keep_the_mirror_in_step_with_the_engine(tmp_path: Path, encoding: str) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with emulators(tmp_path, 1, *ENGINE, "--kv-events-endpoint", endpoint,
                   "--kv-events-encoding", encoding) as (emu,):
        # a huge fixed mirror capacity: only the engine's events can make the mirror forget a block
        rep = replica(emu.url, num_kv_blocks=100_000, kv_events={"endpoint": endpoint, "encoding": encoding})
        with running_router(config([rep], policy="gorgo_proxy", regions={"measure": False})) as rt:
            state = rt.router.state
            wait_joined(emu, rt, encoding)
            subs = rt.router.kv_events.subscribers[RID]

            # served through the router: recorded by the router and confirmed by the engine's events
            served = "A prompt the router serves and the engine later evicts. " * 12
            h_served = hashes_of(served)
            assert len(h_served) >= 10
            assert complete(rt.port, served) == 200
            assert state.matched_blocks(h_served, RID) == len(h_served)

            # sent straight to the engine: the mirror learns it from BlockStored only
            direct = "Another prompt the router never saw, sent to the engine directly. " * 6
            h_direct = hashes_of(direct)
            assert complete(emu.port, direct) == 200
            assert wait_until(lambda: state.matched_blocks(h_direct, RID) == len(h_direct), timeout=5)

            # fill the engine's 64 blocks with other prompts: the engine evicts the served prompt
            # (BlockRemoved); the router's own record alone would still claim it
            for k in range(4):
                assert complete(emu.port, f"Filler prompt number {k} to push the cache over. " * 30) == 200
            assert wait_until(lambda: state.matched_blocks(h_served, RID) == 0, timeout=5)

            # reset the engine's prefix cache: AllBlocksCleared empties the mirror of that replica
            assert complete(rt.port, served) == 200
            assert state.matched_blocks(h_served, RID) == len(h_served)
            assert state.mirror is not None
            held = state.mirror.blocks(RID)
            assert held >= len(h_served)
            assert f'isthmus_router_prefix_blocks{{region="east",replica="{RID}"}} {float(held)}' in \
                rt.router.metrics.render().decode()
            assert emu.call("POST", "/reset_prefix_cache")[0] == 200
            assert wait_until(lambda: state.mirror is not None and len(state.mirror) == 0, timeout=5)
            assert state.matched_blocks(h_served, RID) == 0
            assert subs.stats.malformed == 0 and subs.stats.events > 0


def test_malformed_messages_do_not_stop_the_subscriber() -> None:
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        dead = f"http://127.0.0.1:{free_port()}"  # no engine there: only the events matter
        rep = replica(dead, num_kv_blocks=1000, kv_events={"endpoint": f"tcp://127.0.0.1:{port}"})
        with running_router(config([rep], policy="gorgo_proxy", regions={"measure": False})) as rt:
            state = rt.router.state
            subs = rt.router.kv_events.subscribers[RID]

            def batch(seq: int, events: list[Any]) -> list[bytes]:
                return [b"", seq.to_bytes(8, "big"), msgpack.packb([time.time(), events, 0])]

            # the subscriber joins asynchronously: repeat the first batch until it lands
            deadline = time.monotonic() + 10
            while state.matched_blocks([1, 2, 3], RID) < 3:
                assert time.monotonic() < deadline, "the subscriber received nothing"
                pub.send_multipart(batch(0, [["BlockStored", [1, 2, 3], None, [], 16, None, "GPU"]]))
                time.sleep(0.05)
            received = subs.stats.batches
            pub.send_multipart([b"only two", b"frames"])
            pub.send_multipart([b"", b"short", b"x"])
            pub.send_multipart([b"", (1).to_bytes(8, "big"), b"\xc1 not msgpack"])
            pub.send_multipart([b"", (2).to_bytes(8, "big"), msgpack.packb({"events": "nope"})])
            pub.send_multipart(batch(5, [["BlockRemoved", [2, 3], "GPU"], ["BlockStored", [7, 8], None]]))
            assert wait_until(lambda: state.matched_blocks([7, 8], RID) == 2, timeout=5)
            assert state.matched_blocks([1, 2, 3], RID) == 1
            assert subs.stats.malformed == 4
            assert subs.stats.batches == received + 1
            assert subs.stats.missed == 4  # 1..4 never arrived as valid batches
    finally:
        pub.close()
        ctx.term()


def test_capacity_in_engine_blocks_of_another_size_is_converted() -> None:
    from isthmus.router.config import RouterConfig
    from isthmus.router.scrape import EngineLoad
    from isthmus.router.state import ClusterState

    cfg = RouterConfig.model_validate({
        "region": "east", "models": ["m"], "policy": {"name": "prefix_trie"},
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B"}]})
    st = ClusterState(cfg, keep_prefix=True, clock=lambda: 0.0)
    r = st.replicas[RID]
    load = EngineLoad(running=0, waiting=0, kv_usage=0.0, num_kv_blocks=100, block_size=128)
    assert r.apply_scrape(load, r.scrape_started(), 1.0, block_size=16)
    assert r.capacity_blocks == 800


def test_engine_names_stay_bounded_when_removals_are_missed() -> None:
    from isthmus.router.config import RouterConfig
    from isthmus.router.state import ClusterState

    cfg = RouterConfig.model_validate({
        "region": "east", "models": ["m"], "policy": {"name": "prefix_trie"},
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B",
                      "num_kv_blocks": 8}]})
    st = ClusterState(cfg, keep_prefix=True, clock=lambda: 0.0)
    for k in range(100):  # 100 distinct one-block prompts, never a BlockRemoved
        st.apply_kv_events(RID, [StoredBlocks((10_000 + k,), None, tuple(range(k, k + 16)), 16)])
    assert len(st._engine_names[RID]) <= 16
    assert st.matched_blocks(hash_token_blocks(list(range(99, 115)), 16), RID) == 1


class ReferenceKvMirror:
    """The router's handling of one replica's KV events, with dicts: engine names translated from the
    run's token ids (a dict of at most ``bound`` names, trimmed oldest first at the end of a batch),
    runs of a batch recorded last to first into an LRU of ``capacity`` blocks."""

    def __init__(self, capacity: int, bound: int) -> None:
        self.capacity, self.bound = capacity, bound
        self.lru: dict[int, None] = {}
        self.names: dict[int, int] = {}

    def record(self, hashes: tuple[int, ...]) -> None:
        for h in reversed(hashes):
            self.lru.pop(h, None)
            self.lru[h] = None
        while len(self.lru) > self.capacity:
            del self.lru[next(iter(self.lru))]

    def apply(self, changes: list[Any]) -> None:
        runs: list[tuple[int, ...]] = []
        for c in changes:
            if isinstance(c, StoredBlocks):
                if c.token_ids:
                    parent = 0x6973_7468_6D75_73 if c.parent_block_hash is None else \
                        self.names.get(c.parent_block_hash, c.parent_block_hash)
                    ours = hash_token_blocks(c.token_ids, 16, parent)
                    self.names.update(zip(c.block_hashes, ours, strict=True))
                    runs.append(ours)
                else:
                    runs.append(c.block_hashes)
                continue
            for run in reversed(runs):
                self.record(run)
            runs.clear()
            if isinstance(c, RemovedBlocks):
                for h in c.block_hashes:
                    self.lru.pop(self.names.pop(h, h), None)
            else:
                self.lru.clear()
                self.names.clear()
        for run in reversed(runs):
            self.record(run)
        for h in list(self.names)[:max(0, len(self.names) - self.bound)]:
            del self.names[h]

    def matched(self, hashes: tuple[int, ...]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.lru:
            n += 1
        return n


kv_call = st.lists(st.tuples(st.sampled_from(["store", "store", "store", "store_as_is", "remove", "remove", "clear"]),
                             st.integers(0, 2**16), st.lists(st.integers(0, 2), min_size=1, max_size=3)),
                   min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.lists(kv_call, max_size=12), st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=4))
def test_kv_events_apply_like_the_dict_reference(capacity: int, calls: list[Any], queries: list[list[int]]) -> None:
    from isthmus.router.config import RouterConfig
    from isthmus.router.state import ClusterState

    cfg = RouterConfig.model_validate({
        "region": "east", "models": ["m"], "policy": {"name": "prefix_trie"},
        "replicas": [{"url": "http://h:1", "region": "east", "gpu": "A100", "model": "Mistral-7B",
                      "num_kv_blocks": capacity}]})
    state, ref = ClusterState(cfg, keep_prefix=True, clock=lambda: 0.0), ReferenceKvMirror(capacity, 2 * capacity)
    prompts: dict[int, tuple[int, ...]] = {}  # engine name of a stored block -> the tokens up to its end
    counter = 0
    for call in calls:
        changes: list[Any] = []
        for kind, pick, toks in call:
            known = sorted(prompts)
            if kind in ("store", "store_as_is"):
                parent = known[pick % len(known)] if known and pick % 3 else None
                tokens = [*prompts.get(parent, ()), *(t for t in toks for _ in range(16))] if parent is not None \
                    else [t for t in toks for _ in range(16)]
                n = len(toks)
                names = tuple(range(1000 + counter, 1000 + counter + n))
                counter += n
                for j, name in enumerate(names):
                    prompts[name] = tuple(tokens[:len(tokens) - 16 * (n - 1 - j)])
                new_tokens = tuple(tokens[-16 * n:])
                changes.append(StoredBlocks(names, parent, new_tokens if kind == "store" else (), 16))
            elif kind == "remove":  # one to three names the engine stored (or stored and then removed)
                picked = [known[(pick >> 5 * t) % len(known)] for t in range(1 + pick % 3)] if known else [7]
                changes.append(RemovedBlocks(tuple(dict.fromkeys(picked))))
            else:
                changes.append(ClearedBlocks())
        state.apply_kv_events(RID, changes)
        ref.apply(changes)
        for q in queries:
            hs = hash_token_blocks([t for t in q for _ in range(16)], 16)
            assert state.matched_blocks(hs, RID) == ref.matched(hs)
        assert state.mirror is not None and len(state.mirror) == len(ref.lru)
        assert len(state._engine_names.get(RID, ())) == len(ref.names)
