"""The engine double's OpenAI API, metrics and errors, against one real server process.

The server models Llama-3.1-8B on an L4 at a tenth of real time: a decode step takes about 7 ms of
wall time, a 4,000-token prefill about 150 ms.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import openai
import pytest
from emulator_harness import Emulator, open_stream, read_sse, wait_until

from isthmus.core.tokenizer import ByteChunkTokenizer, render_chat

MODEL = "tiny-llama"
TOK = ByteChunkTokenizer()
LIMIT = 200_000


@pytest.fixture(scope="module")
def emu(emulator_factory: Any) -> Emulator:
    return emulator_factory("--gpu", "L4", "--model", "Llama-3.1-8B", "--served-model-name", MODEL,
                            "--time-scale", "0.1", "--max-num-seqs", "2", "--max-model-len", "8192",
                            "--max-body-bytes", str(LIMIT))


@pytest.fixture(scope="module")
def client(emu: Emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{emu.url}/v1", api_key="unused", max_retries=0, timeout=20.0)


def test_completion_usage_and_text(client: openai.OpenAI) -> None:
    prompt = "Routing requests across regions, test one."
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(TOK.encode(prompt)), 7, len(TOK.encode(prompt)) + 7)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert len(TOK.encode(choice.text)) == 7  # the filler text re-encodes to exactly the tokens generated
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
    assert again.choices[0].text == choice.text  # same prompt, same text
    seeded = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, seed=12345)
    assert seeded.choices[0].text != choice.text


def test_completion_default_max_tokens_and_token_id_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=[1000, 2000, 3000])
    assert r.usage is not None and r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 16


def test_chat_usage(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage is not None and r.usage.prompt_tokens == len(TOK.encode(render_chat(messages)))
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert len(TOK.encode(r.choices[0].message.content or "")) == 5
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)  # the older field
    assert r2.usage is not None and r2.usage.completion_tokens == 3


def test_streamed_completion_matches_the_whole_one(client: openai.OpenAI) -> None:
    prompt = "Streaming: the same prompt gives the same words."
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 6 and "".join(texts) == whole
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons == [None] * 5 + ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(TOK.encode(prompt)), 6)
    # without include_usage there is no usage chunk
    plain = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True))
    assert len(plain) == 2 and all(c.usage is None for c in plain)


def test_streamed_chat(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Stream me three words."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    words = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert len(words) == 3 and all(w for w in words)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_raw_stream_is_vllm_shaped_and_ends_with_done(emu: Emulator) -> None:
    conn, resp = open_stream(emu, "/v1/completions", {"prompt": "raw", "max_tokens": 3})
    try:
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        events = list(read_sse(resp))
    finally:
        conn.close()
    assert events[-1] == b"[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    assert [set(d) for d in docs] == [{"id", "object", "created", "model", "choices"}] * 3
    assert docs[-1]["choices"][0] == {"index": 0, "text": docs[-1]["choices"][0]["text"], "logprobs": None,
                                      "finish_reason": "length", "stop_reason": None}


def test_models_and_health(emu: Emulator) -> None:
    status, raw = emu.request("GET", "/v1/models")
    doc = json.loads(raw)
    assert status == 200 and doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == [MODEL] and doc["data"][0]["max_model_len"] == 8192
    assert emu.request("GET", "/health")[0] == 200


def _assert_error(status: int, body: Any, expected: int, err_type: str) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == expected and body["error"]["type"] == err_type and body["error"]["message"]


def test_client_errors_have_openai_bodies(emu: Emulator, client: openai.OpenAI) -> None:
    status, raw = emu.request("POST", "/v1/completions", b'{"prompt": "x",')
    _assert_error(status, json.loads(raw), 400, "BadRequestError")
    assert "Invalid JSON" in json.loads(raw)["error"]["message"]
    _assert_error(*emu.post("/v1/completions", {"model": "other", "prompt": "x"}), 404, "NotFoundError")
    _assert_error(*emu.post("/v1/completions", {"prompt": "x", "n": 2}), 400, "BadRequestError")
    _assert_error(*emu.post("/v1/completions", {"prompt": "x", "max_tokens": 0}), 400, "BadRequestError")
    _assert_error(*emu.post("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}), 400,
                  "BadRequestError")
    _assert_error(*emu.post("/v1/chat/completions", {"messages": []}), 400, "BadRequestError")
    _assert_error(*emu.post("/v1/completions", [1, 2]), 400, "BadRequestError")
    long_prompt = "x" * (4 * 8192)
    _assert_error(*emu.post("/v1/completions", {"prompt": long_prompt}), 400, "BadRequestError")
    status, body = emu.post("/v1/completions", {"prompt": "abcd" * 8000, "max_tokens": 500})
    _assert_error(status, body, 400, "BadRequestError")
    assert "maximum context length is 8192" in body["error"]["message"]
    _assert_error(*emu.post("/v1/nothing", {}), 404, "NotFoundError")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    # fields the engine does not know are ignored, as vLLM does
    status, body = emu.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": 0.2,
                                                "frobnicate": [1], "logprobs": None})
    assert status == 200 and body["usage"]["completion_tokens"] == 1


def _raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(head)
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break  # the server answered and closed before taking everything: that is the point
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
        return data
    finally:
        s.close()


def test_oversized_bodies_get_413_without_being_read(emu: Emulator) -> None:
    # declared too large: answered at once although not one byte of the body is sent
    t0 = time.monotonic()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    reply = _raw_exchange(emu.port, head, [])
    assert reply.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 2.0
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 413
    # chunked, no length: cut off once past the limit
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
    reply = _raw_exchange(emu.port, head, [piece] * 8)
    assert reply.startswith(b"HTTP/1.1 413")
    # a body just under the limit is read (and here rejected as bad JSON, not as too large)
    status, _ = emu.request("POST", "/v1/completions", b"a" * (LIMIT - 1))
    assert status == 400


def test_metrics_have_vllm_names_labels_and_values(emu: Emulator, client: openai.OpenAI) -> None:
    before = emu.metrics()
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=4)
    m = emu.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert name in m, name
    assert m["vllm:request_success_total{finished_reason=length}"] - before.get(
        "vllm:request_success_total{finished_reason=length}", 0) == 1
    assert m["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 4
    assert m["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == len(TOK.encode("metrics please"))
    assert m["vllm:inter_token_latency_seconds_count"] - before["vllm:inter_token_latency_seconds_count"] == 3
    assert m["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 1
    info = [k for k in m if k.startswith("vllm:cache_config_info")]
    assert len(info) == 1 and "block_size=16" in info[0] and "num_gpu_blocks=" in info[0]
    # the labels vLLM puts on every series
    _, raw = emu.request("GET", "/metrics")
    assert b'vllm:num_requests_running{engine="0",model_name="tiny-llama"}' in raw


def test_running_and_waiting_while_streams_are_open_and_abort_on_disconnect(emu: Emulator) -> None:
    # max_num_seqs is 2: of three long streams two run and one waits
    streams = [open_stream(emu, "/v1/completions", {"prompt": f"long stream {i}", "max_tokens": 2000})
               for i in range(3)]
    try:
        assert wait_until(lambda: (emu.metrics()["vllm:num_requests_running"],
                                   emu.metrics()["vllm:num_requests_waiting"]) == (2, 1))
        assert emu.metrics()["vllm:kv_cache_usage_perc"] > 0
        next(read_sse(streams[0][1]))
    finally:
        t0 = time.monotonic()
        for conn, _ in streams:
            conn.close()
    # the engine drops the requests of clients that went away, well within a second
    assert wait_until(lambda: (emu.metrics()["vllm:num_requests_running"],
                               emu.metrics()["vllm:num_requests_waiting"]) == (0, 0), timeout=1.0)
    assert time.monotonic() - t0 < 1.0


def _ttft(emu: Emulator, prompt: str) -> float:
    t0 = time.monotonic()
    conn, resp = open_stream(emu, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    try:
        next(read_sse(resp))
        return time.monotonic() - t0
    finally:
        conn.close()


def test_repeated_long_prompt_hits_the_prefix_cache_and_starts_sooner(emu: Emulator) -> None:
    prompt = "".join(f"<doc {i}: cached context> " for i in range(700))[:16000]  # 4,000 tokens
    before = emu.metrics()
    first = _ttft(emu, prompt)
    second = _ttft(emu, prompt)
    m = emu.metrics()
    queried = m["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits = m["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert queried == 8000 and hits == 3984  # the second request finds all but its last block
    assert second < first / 3, (first, second)


def test_priority_field_orders_the_waiting_queue(emu: Emulator) -> None:
    """vLLM's ``priority`` (lower first): of two waiting requests, the normal one sent second takes the
    first free slot; the one sent first at priority 1 waits for the next."""
    import threading

    t0 = time.monotonic()
    first_token: dict[str, float] = {}

    def read_all(name: str, conn: Any, resp: Any) -> None:  # to the end: closing early would abort it
        try:
            for k, _ in enumerate(read_sse(resp)):
                if k == 0:
                    first_token[name] = time.monotonic() - t0
        finally:
            conn.close()

    def start(name: str, body: dict[str, Any]) -> threading.Thread:
        t = threading.Thread(target=read_all, args=(name, *open_stream(emu, "/v1/completions", body)))
        t.start()
        return t

    # max_num_seqs is 2: a long and a short stream take both slots
    threads = [start("long", {"prompt": "priority: long", "max_tokens": 300}),
               start("short", {"prompt": "priority: short", "max_tokens": 20})]
    assert wait_until(lambda: emu.metrics()["vllm:num_requests_running"] == 2)
    threads.append(start("low", {"prompt": "priority: low", "max_tokens": 100, "priority": 1}))
    assert wait_until(lambda: emu.metrics()["vllm:num_requests_waiting"] == 1)
    threads.append(start("normal", {"prompt": "priority: normal", "max_tokens": 100}))
    for t in threads:
        t.join(timeout=20)
    assert set(first_token) == {"long", "short", "low", "normal"}
    # the short stream's slot went to the normal request; the low one waited for the normal one's
    # 100 decode steps (~0.7 s here)
    assert first_token["normal"] + 0.3 < first_token["low"], first_token


def test_bad_priority_is_a_400_naming_the_field(emu: Emulator) -> None:
    for bad in ("high", 1.5, True, [1]):
        status, body = emu.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "priority": bad})
        _assert_error(status, body, 400, "BadRequestError")
        assert body["error"]["param"] == "priority" and "priority" in body["error"]["message"]
    status, body = emu.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "priority": -1})
    assert status == 200 and body["usage"]["completion_tokens"] == 1
