"""KV events reach a ZMQ subscriber in both of vLLM's encodings, and agree with the router's hashing.

The server has a 64-block KV cache (1,024 tokens) so that a few prompts force evictions. The map
encoding runs with a real ``tokenizer.json`` (a small BPE vocabulary trained for the test), the array
encoding with the built-in tokenizer: either way a subscriber that tokenizes the prompt itself
computes the same block hashes as the events carry.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
import zmq
from emulator_harness import KV_BOUND, Emulator, make_tokenizer_file

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.tokenizer import ByteChunkTokenizer, Tokenizer
from isthmus.emulator.hf_tokenizer import load_tokenizer

BLOCK = 16


class Subscriber:
    """A SUB socket that decodes batches in either encoding into ``(kind, fields)`` events."""

    def __init__(self, endpoint: str, topic: bytes) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seqs: list[int] = []
        self.topics: set[bytes] = set()
        self.encodings: set[str] = set()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def _decode(self, payload: bytes) -> list[tuple[str, dict[str, Any]]]:
        batch = msgpack.unpackb(payload, raw=False)
        out: list[tuple[str, dict[str, Any]]] = []
        if isinstance(batch, list):  # [ts, events, dp_rank] of tagged arrays
            self.encodings.add("array")
            ts, events, rank = batch
            for e in events:
                kind, *fields = e
                if kind == "BlockStored":
                    keys = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"]
                elif kind == "BlockRemoved":
                    keys = ["block_hashes", "medium"]
                else:
                    keys = []
                assert len(fields) == len(keys), e
                out.append((kind, dict(zip(keys, fields, strict=True))))
        else:
            self.encodings.add("map")
            ts, events, rank = batch["ts"], batch["events"], batch["data_parallel_rank"]
            for e in events:
                fields = dict(e)
                out.append((fields.pop("type"), fields))
        assert rank == 0 and abs(ts - time.time()) < 60
        return out

    def collect(self, until: Any, timeout: float = 5.0) -> list[tuple[str, dict[str, Any]]]:
        """Events until ``until(events)`` holds (or the timeout)."""
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while not until(got) and time.monotonic() < deadline:
            if self.sock.poll(50):
                topic, seq, payload = self.sock.recv_multipart()
                self.topics.add(topic)
                assert len(seq) == 8
                self.seqs.append(int.from_bytes(seq, "big"))
                got.extend(self._decode(payload))
        return got


def _stored(events: list[tuple[str, dict[str, Any]]]) -> list[int]:
    return [h for kind, f in events if kind == "BlockStored" for h in f["block_hashes"]]


@pytest.fixture(scope="module", params=["array", "map"])
def setup(request: pytest.FixtureRequest, emulator_factory: Any,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Emulator, Subscriber, Tokenizer, str]:
    encoding = request.param
    args = ["--num-gpu-blocks", "64", "--block-size", str(BLOCK), "--max-model-len", "1024", "--time-scale", "0.01",
            "--kv-events-endpoint", "tcp://127.0.0.1:*", "--kv-events-encoding", encoding, "--kv-events-topic", "kv"]
    tokenizer: Tokenizer = ByteChunkTokenizer()
    if encoding == "map":
        path = make_tokenizer_file(tmp_path_factory.mktemp("tok") / "tokenizer.json")
        args += ["--tokenizer", str(path)]
        tokenizer = load_tokenizer(path)
    emu = emulator_factory(*args)
    m = KV_BOUND.search(emu.log.read_bytes())
    assert m, emu.log_text()
    sub = Subscriber(m.group(1).decode(), b"kv")
    time.sleep(0.3)  # a PUB socket drops what it sends before the subscription has arrived
    request.addfinalizer(sub.close)
    return emu, sub, tokenizer, encoding


def test_events_follow_stores_evictions_and_resets(setup: tuple[Emulator, Subscriber, Tokenizer, str]) -> None:
    emu, sub, tok, encoding = setup
    prompt = "The first prompt of the KV event test, long enough for a few blocks. " * 3
    ids = tok.encode(prompt)
    expected = list(hash_token_blocks(ids, BLOCK))
    assert len(expected) >= 3
    assert emu.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})[0] == 200
    events = sub.collect(lambda ev: set(expected) <= set(_stored(ev)))
    assert sub.encodings == {encoding} and sub.topics == {b"kv"}
    assert _stored(events) == expected
    first = next(f for kind, f in events if kind == "BlockStored")
    assert first["parent_block_hash"] is None and first["block_size"] == BLOCK and first["medium"] == "GPU"
    stored_tokens = [t for kind, f in events if kind == "BlockStored" for t in f["token_ids"]]
    assert stored_tokens == ids[:len(expected) * BLOCK]
    if encoding == "map":
        assert first["lora_name"] is None and first["lora_id"] is None

    # fill the 64-block cache with other prompts: the least recently used blocks are evicted
    seen = set(expected)
    removed: list[int] = []
    for i in range(4):
        other = f"Filler prompt number {i} that pushes older blocks out of the cache. " * 20
        assert emu.post("/v1/completions", {"prompt": other, "max_tokens": 2})[0] == 200
        more = sub.collect(lambda ev: bool(_stored(ev)))
        seen |= set(_stored(more))
        removed += [h for kind, f in more if kind == "BlockRemoved" for h in f["block_hashes"]]
    removed += [h for kind, f in sub.collect(lambda ev: False, timeout=0.2) if kind == "BlockRemoved"
                for h in f["block_hashes"]]
    assert removed and set(removed) <= seen and len(set(removed)) == len(removed)
    assert set(expected) & set(removed)  # the first prompt was the least recently used

    # a reset with nothing running clears everything
    assert emu.request("POST", "/reset_prefix_cache")[0] == 200
    assert ("AllBlocksCleared", {}) in sub.collect(lambda ev: ("AllBlocksCleared", {}) in ev)
    # sequence numbers count up from 0 without gaps
    assert sub.seqs == list(range(len(sub.seqs))) and sub.seqs[0] == 0
