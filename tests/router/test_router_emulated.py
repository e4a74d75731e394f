"""The router in front of real engine doubles (``isthmus emulate`` processes): the official openai
client, prefix-aware routing that matches the engines' own caches, and engine failures."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from router_harness import Emulator, RouterThread, config, emulators, replica, running_router, wait_until

from isthmus.core.tokenizer import ByteChunkTokenizer

ENGINE = ("--model", "Mistral-7B", "--gpu", "A100", "--served-model-name", "m", "--time-scale", "0.01",
          "--num-gpu-blocks", "4000")
REGIONS = {"measure": False, "rtt_ms": {"east": {"west": 80, "asia": 200}, "west": {"asia": 150}}}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Emulator]]:
    with emulators(tmp_path_factory.mktemp("engines"), 3, *ENGINE) as emus:
        yield emus


@pytest.fixture
def clean(engines: list[Emulator]) -> Iterator[list[Emulator]]:
    yield engines
    for e in engines:
        e.fault()


def stream_raw(rt: RouterThread, prompt: str = "hello", max_tokens: int = 8) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=20)
    try:
        c.request("POST", "/v1/completions", headers=JSON, body=json.dumps(
            {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": True}).encode())
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_openai_client_through_the_router_to_engine_doubles(clean: list[Emulator]) -> None:
    engines = clean
    with running_router(config([replica(e.url, r) for e, r in zip(engines, ("east", "west", "asia"), strict=True)],
                               policy="gorgo_proxy", regions=REGIONS)) as rt:
        c = openai.OpenAI(base_url=f"{rt.url}/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="m", prompt="The quick brown fox", max_tokens=6)
        assert r.usage is not None and r.usage.completion_tokens == 6 and r.choices[0].text
        chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True))
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == 5
        raw = c.completions.with_raw_response.create(model="m", prompt="x", max_tokens=2)
        assert raw.headers["x-isthmus-target"] == "east-0"  # idle everywhere: the nearest region wins
        # the router learned each engine's KV size from vllm:cache_config_info
        assert wait_until(lambda: rt.router.state.replicas["west-0"].capacity_blocks == 4000)


def test_prefix_routing_uses_the_blocks_the_engine_really_caches(clean: list[Emulator]) -> None:
    engines = clean
    with running_router(config([replica(e.url) for e in engines], policy="gorgo_proxy",
                               regions={"measure": False})) as rt:  # fixed RTTs: costs are exact
        prompt = "A long shared system prompt about routing. " * 200
        tokens = len(ByteChunkTokenizer().encode(prompt))
        middle = engines[1]
        # all idle, a tie would go to east-0: give east-0 and east-2 a queue of 50,000 prompt tokens
        # each in the router's books, so the first request lands on east-1
        busy = [rt.router.state.replicas[r].dispatch(50_000) for r in ("east-0", "east-2")]
        hits_before = middle.metric("vllm:prefix_cache_hits_total")
        first = stream_raw(rt, prompt)
        assert first[1]["x-isthmus-target"] == "east-1"
        for d in busy:
            d.finish()
        # now everything is idle again, but only east-1 holds the prefix: it wins on prefill cost
        second = stream_raw(rt, prompt + "And one more question?")
        assert second[1]["x-isthmus-target"] == "east-1"
        assert float(second[1]["x-isthmus-cost-ms"]) < 0.2 * float(first[1]["x-isthmus-cost-ms"])
        hits = middle.metric("vllm:prefix_cache_hits_total") - hits_before
        assert hits >= (tokens // 16 - 1) * 16  # the engine found what the router expected


def test_engine_errors_are_retried_on_another_engine(clean: list[Emulator]) -> None:
    engines = clean
    with running_router(config([replica(e.url) for e in engines], policy="round_robin",
                               retries={"budget": 1.0, "backoff_base_s": 0.0})) as rt:
        engines[0].fault(error_rate=1.0, error_status=503)
        results = [stream_raw(rt) for _ in range(6)]
        assert all(s == 200 and b.endswith(b"data: [DONE]\n\n") for s, _, b in results)
        assert {h["x-isthmus-target"] for _, h, _ in results} == {"east-1", "east-2"}


def test_engine_stall_and_mid_stream_death_end_in_an_error_event(clean: list[Emulator]) -> None:
    engines = clean
    with running_router(config([replica(engines[0].url)], timeouts={"idle_s": 0.3},
                               health={"probe_period_s": 30.0})) as rt:
        engines[0].fault(stall_after=2)
        status, _, body = stream_raw(rt, max_tokens=20)
        events = [e for e in body.split(b"\n\n") if e]
        assert status == 200 and len(events) == 3 and b"[DONE]" not in body and b"stalled" in events[-1]
        engines[0].fault(die_after=3)
        status, _, body = stream_raw(rt, max_tokens=20)
        events = [e for e in body.split(b"\n\n") if e]
        assert status == 200 and len(events) == 4 and b"[DONE]" not in body and b"broke off" in events[-1]


def test_an_unhealthy_engine_is_taken_out_by_health_checks(clean: list[Emulator]) -> None:
    engines = clean
    with running_router(config([replica(e.url) for e in engines[:2]], policy="round_robin")) as rt:
        engines[0].fault(unhealthy=True)
        assert wait_until(lambda: not rt.router.state.replicas["east-0"].health.up, 3)
        assert {stream_raw(rt)[1]["x-isthmus-target"] for _ in range(4)} == {"east-1"}
        engines[0].fault()
        assert wait_until(lambda: rt.router.state.replicas["east-0"].health.up, 3)


def test_a_client_disconnect_stops_the_engine_work(clean: list[Emulator]) -> None:
    engines = clean
    with running_router(config([replica(engines[2].url)])) as rt:
        s = socket.create_connection(("127.0.0.1", rt.port), timeout=5)
        body = json.dumps({"model": "m", "prompt": "tell me everything", "max_tokens": 30000, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert engines[2].metric("vllm:num_requests_running") == 1
        s.close()
        closed = time.monotonic()
        assert wait_until(lambda: engines[2].metric("vllm:num_requests_running") == 0, 2, 0.02)
        assert time.monotonic() - closed < 1.0


def test_an_engine_process_killed_mid_stream(tmp_path: Path) -> None:
    slow = (*ENGINE[:-4], "--time-scale", "1.0")
    with emulators(tmp_path, 2, *slow) as (doomed, spare), running_router(config(
            [replica(doomed.url), replica(spare.url)], health={"probe_period_s": 0.05, "probe_timeout_s": 0.5})) as rt:
        c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=20)
        c.request("POST", "/v1/completions", headers=JSON, body=json.dumps(
            {"model": "m", "prompt": "hi", "max_tokens": 2000, "stream": True}).encode())
        r = c.getresponse()
        assert r.getheader("x-isthmus-target") == "east-0"
        assert r.read1(65536).startswith(b"data: ")
        doomed.proc.kill()
        rest = r.read()
        c.close()
        assert b"[DONE]" not in rest and b'"error"' in rest
        assert wait_until(lambda: not rt.router.state.replicas["east-0"].health.up, 3)
        status, headers, body = stream_raw(rt)
        assert status == 200 and headers["x-isthmus-target"] == "east-1" and body.endswith(b"[DONE]\n\n")
