"""The router's HTTP face against real upstream servers: the official openai client, headers, admission errors."""

from __future__ import annotations

import gc
import http.client
import json
import socket
import time
from collections.abc import Iterator

import openai
import pytest
from router_harness import RouterThread, config, replica, running_router
from router_upstream import Upstream, upstreams

from isthmus.router.app import ProxyResponse, RequestContext


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[RouterThread, list[Upstream]]]:
    with upstreams("a", "b") as ups, running_router(config([replica(u.url) for u in ups], policy="round_robin",
                                                           limits={"max_body_bytes": 10_000})) as rt:
        yield rt, ups


def client(rt: RouterThread, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{rt.url}/v1", api_key=key, max_retries=0, timeout=10)


def raw(rt: RouterThread, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_openai_client_plain_and_streamed_through_the_router(two: tuple[RouterThread, list[Upstream]]) -> None:
    rt, ups = two
    c = client(rt)
    r = c.completions.create(model="m", prompt="hello there", max_tokens=5)
    assert r.choices[0].text == "tok0 tok1 tok2 tok3 tok4"
    chunks = list(c.completions.create(model="m", prompt="hello there", max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    deltas = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)]
    assert "".join(d or "" for d in deltas) == "tok0 tok1 tok2 tok3 tok4 "
    assert sorted(u.completions for u in ups)[0] >= 2  # round robin used both


def test_streams_are_relayed_byte_for_byte_with_routing_headers(two: tuple[RouterThread, list[Upstream]]) -> None:
    rt, ups = two
    body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
    direct = http.client.HTTPConnection("127.0.0.1", ups[0].port, timeout=10)
    direct.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    expected = direct.getresponse().read()
    direct.close()
    status, headers, got = raw(rt, "POST", "/v1/completions", body,
                               {"content-type": "application/json", "x-request-id": "req-42"})
    assert status == 200 and got == expected and got.endswith(b"data: [DONE]\n\n")
    assert headers["x-request-id"] == "req-42"
    assert headers["x-isthmus-target"] in ("east-0", "east-1") and headers["x-isthmus-region"] == "east"
    assert headers["x-isthmus-reason"] and "x-isthmus-cost-ms" in headers
    assert headers["content-type"] == "text/event-stream" and headers["x-upstream-name"] in ("a", "b")
    status, headers, _ = raw(rt, "POST", "/v1/completions", body, {"content-type": "application/json"})
    assert len(headers["x-request-id"]) == 32  # generated


def test_served_requests_leave_no_cycles_for_the_collector(two: tuple[RouterThread, list[Upstream]]) -> None:
    """A request's objects are freed by reference counting: ``isthmus serve`` runs the cycle
    collector on a timer, not on allocation counts, and relies on this."""
    rt, _ = two
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # whatever a collection finds unreachable is kept in gc.garbage
    try:
        for stream in (False, True, False, True):
            body = json.dumps({"model": "m", "prompt": "no cycles", "stream": stream}).encode()
            assert raw(rt, "POST", "/v1/completions", body, {"content-type": "application/json"})[0] == 200
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, ProxyResponse | RequestContext)
                or type(o).__name__ == "_Exchange"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_hop_by_hop_credentials_and_isthmus_headers_are_not_passed_on(two: tuple[RouterThread, list[Upstream]]) -> None:
    rt, ups = two
    body = json.dumps({"model": "m", "prompt": "x"}).encode()
    status, headers, _ = raw(rt, "POST", "/v1/completions", body, {
        "content-type": "application/json", "authorization": "Bearer client-secret", "cookie": "c=1",
        "connection": "keep-alive, x-drop-me", "x-drop-me": "1", "te": "trailers", "x-keep": "yes",
        "x-isthmus-target": "http://evil:1", "x-upstream-url": "http://evil:1"})
    assert status == 200
    seen = {k.lower(): v for k, v in max((s for u in ups for s in u.seen), key=lambda s: s.at).headers.items()}
    for h in ("authorization", "cookie", "x-drop-me", "te", "x-isthmus-target"):
        assert h not in seen, h
    assert seen["x-keep"] == "yes" and seen["host"].startswith("127.0.0.1:")
    assert headers["x-isthmus-target"] != "spoofed"  # the upstream cannot spoof routing headers
    assert "transfer-encoding" not in headers or headers["transfer-encoding"] == "chunked"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{oops", 400, None),
    (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "m"}', 400, None),
])
def test_bad_requests_get_openai_style_errors(two: tuple[RouterThread, list[Upstream]], body: bytes, status: int,
                                              code: str | None) -> None:
    rt, _ = two
    got, headers, data = raw(rt, "POST", "/v1/completions", body, {"content-type": "application/json"})
    err = json.loads(data)["error"]
    assert got == status and err["message"] and err["type"] == "invalid_request_error" and err["code"] == code
    assert headers["x-request-id"]


def test_the_openai_client_sees_404_for_an_unknown_model(two: tuple[RouterThread, list[Upstream]]) -> None:
    with pytest.raises(openai.NotFoundError):
        client(two[0]).completions.create(model="gpt-5", prompt="x")


def test_oversized_bodies_get_413_without_being_read(two: tuple[RouterThread, list[Upstream]]) -> None:
    rt, _ = two
    # declared too large: the answer comes before the body is sent
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n")
        s.settimeout(5)
        head = s.recv(4096)
        while chunk := s.recv(4096):  # and the connection is closed rather than drained
            head += chunk
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    # chunked, no length: cut off once past the limit
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            s.sendall(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        s.settimeout(5)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")


def test_models_health_and_metrics(two: tuple[RouterThread, list[Upstream]]) -> None:
    rt, _ = two
    assert [m.id for m in client(rt).models.list()] == ["m"]
    status, _, body = raw(rt, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = raw(rt, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("isthmus_router_requests_total", "isthmus_router_decisions_total", "isthmus_router_ttft_seconds_bucket",
                 "isthmus_router_scrape_staleness_seconds", "isthmus_router_replica_healthy"):
        assert name in text, name
    assert raw(rt, "GET", "/nope")[0] == 404 and raw(rt, "GET", "/v1/completions")[0] == 405


def test_the_view_reflects_scraped_engine_metrics(two: tuple[RouterThread, list[Upstream]]) -> None:
    rt, ups = two
    ups[1].running, ups[1].waiting, ups[1].kv_usage = 3, 4, 0.5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        v = rt.router.state.snapshot(rt.router.clock()).instances["east-1"]
        if v.waiting == 4:
            break
        time.sleep(0.02)
    assert (v.running, v.waiting, v.kv_usage) == (3, 4, 0.5) and v.age < 1.0
    ups[1].running = ups[1].waiting = 0
    ups[1].kv_usage = 0.0


def test_api_keys_are_required_when_configured() -> None:
    with upstreams("a") as ups, running_router(config([replica(ups[0].url)], api_keys=["k1", "k2"])) as rt:
        with pytest.raises(openai.AuthenticationError) as info:
            client(rt, "wrong").completions.create(model="m", prompt="x")
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert client(rt, "k2").completions.create(model="m", prompt="x").choices
        assert raw(rt, "GET", "/v1/models")[0] == 401
        assert raw(rt, "GET", "/health")[0] == 200  # probes need no key
        seen = ups[0].seen[-1].headers
        assert "Authorization" not in seen and "authorization" not in seen


def test_overload_gets_429() -> None:
    with upstreams("a", first_chunk_delay_s=0.5) as ups, running_router(
            config([replica(ups[0].url)], limits={"max_concurrent": 1})) as rt:
        body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
        slow = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        slow.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        time.sleep(0.1)
        status, headers, data = raw(rt, "POST", "/v1/completions", body, {"content-type": "application/json"})
        assert status == 429 and headers["retry-after"] == "1" and json.loads(data)["error"]["code"] == "rate_limit_exceeded"
        assert slow.getresponse().status == 200
        slow.close()
