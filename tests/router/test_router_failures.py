"""The reliability table of QUALITY.md, row by row, against real upstream servers and a real router."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import openai
import pytest
from router_harness import FAST_HEALTH, RouterThread, config, replica, running_router, wait_until
from router_upstream import upstreams

STREAM = json.dumps({"model": "m", "prompt": "hello", "stream": True}).encode()
PLAIN = json.dumps({"model": "m", "prompt": "hello"}).encode()
JSON = {"content-type": "application/json"}
SLOW_HEALTH = {**FAST_HEALTH, "probe_period_s": 30.0}  # probes out of the way: passive signals only


def post(rt: RouterThread, body: bytes = PLAIN, timeout: float = 10) -> tuple[int, dict[str, str], bytes, float]:
    t0 = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=timeout)
    try:
        c.request("POST", "/v1/completions", body=body, headers=JSON)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - t0
    finally:
        c.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose listen queue is full: connects to it hang until they time out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fill.append(c)
    try:
        yield port
    finally:
        for c in fill:
            c.close()
        srv.close()


def test_connection_refused_fails_over_or_answers_502_fast_and_the_others_are_unaffected() -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    with upstreams("live") as ups, running_router(config(
            [replica(ups[0].url), replica(dead)], policy="round_robin", health=SLOW_HEALTH,
            retries={"backoff_base_s": 0.0})) as rt:
        results = [post(rt) for _ in range(40)]
        assert all(status in (200, 502) for status, *_ in results)
        assert all(elapsed < 1.0 for *_, elapsed in results)
        failed = [r for r in results if r[0] == 502]
        assert failed and json.loads(failed[0][2])["error"]["code"] == "connect"
        ok = [r for r in results if r[0] == 200]
        assert all(h["x-isthmus-target"] == "east-0" for _, h, _, _ in ok)
        metrics = rt.router.metrics
        retried = metrics.retries._value.get()
        assert retried >= 1  # some of the requests sent to the dead replica went to the live one
        assert len(failed) + retried == 5  # the dead replica was ejected after 5 failures
        assert all(r[0] == 200 for r in results[-20:])
        assert ups[0].completions == len(ok)


def test_a_backend_that_never_accepts_gets_504_within_the_connect_timeout() -> None:
    with unanswered_port() as port, running_router(config(
            [replica(f"http://127.0.0.1:{port}")], health=SLOW_HEALTH, timeouts={"connect_s": 0.3})) as rt:
        status, _headers, body, elapsed = post(rt)
        assert status == 504 and json.loads(body)["error"]["code"] == "connect_timeout"
        assert 0.25 <= elapsed < 1.5


def test_a_stalled_stream_gets_an_error_event_and_is_closed_after_the_idle_timeout() -> None:
    with upstreams("a", mode="stall", fail_after=2) as ups, running_router(config(
            [replica(ups[0].url)], health=SLOW_HEALTH, timeouts={"idle_s": 0.3})) as rt:
        status, _, body, elapsed = post(rt, STREAM)
        assert status == 200 and 0.3 <= elapsed < 1.5
        events = [e for e in body.split(b"\n\n") if e]
        assert len(events) == 3 and b"[DONE]" not in body
        err = json.loads(events[-1].removeprefix(b"data: "))["error"]
        assert "stalled" in err["message"] and err["code"] == 502
        c = openai.OpenAI(base_url=f"{rt.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="stalled"):
            list(c.completions.create(model="m", prompt="x", stream=True))


def test_a_backend_dying_mid_stream_gives_an_error_event_never_a_done_and_no_retry() -> None:
    with upstreams("a", "b", mode="die", fail_after=2) as ups, running_router(config(
            [replica(u.url) for u in ups], health=SLOW_HEALTH, retries={"budget": 1.0})) as rt:
        status, _, body, _ = post(rt, STREAM)
        assert status == 200 and b"[DONE]" not in body
        events = [e for e in body.split(b"\n\n") if e]
        assert len(events) == 3 and b"broke off" in events[-1]
        assert sum(u.completions for u in ups) == 1  # bytes reached the client: no retry


def test_a_stream_that_breaks_before_its_first_chunk_is_retried_elsewhere() -> None:
    with upstreams("a", "b") as ups, running_router(config(
            [replica(u.url) for u in ups], health=SLOW_HEALTH, retries={"budget": 1.0, "backoff_base_s": 0.0})) as rt:
        ups[0].mode, ups[0].fail_after = "die", 0
        status, headers, body, _ = post(rt, STREAM)
        assert status == 200 and body.endswith(b"data: [DONE]\n\n") and headers["x-isthmus-target"] == "east-1"
        assert ups[0].completions == 1 and ups[1].completions == 1


def test_5xx_answers_are_retried_elsewhere_and_4xx_are_relayed_and_never_count() -> None:
    with upstreams("a", "b") as ups, running_router(config(
            [replica(u.url) for u in ups], policy="round_robin", health=SLOW_HEALTH,
            retries={"budget": 1.0, "backoff_base_s": 0.001})) as rt:
        ups[0].mode, ups[0].status = "status", 503
        assert all(post(rt)[0] == 200 for _ in range(4))
        assert ups[0].completions == ups[1].completions == 4  # each one retried on the other replica
        ups[0].status = 422
        statuses = [post(rt) for _ in range(30)]
        assert sorted({s for s, *_ in statuses}) == [200, 422]
        assert json.loads(next(b for s, _, b, _ in statuses if s == 422))["error"]["message"] == "a says 422"
        assert rt.router.metrics.ejections.labels("east-0")._value.get() == 0  # 15 client errors in a row


def test_the_retry_budget_bounds_upstream_attempts_when_everything_fails() -> None:
    with upstreams("a", "b", mode="status", status=500) as ups, running_router(config(
            [replica(u.url) for u in ups], health={**SLOW_HEALTH, "eject_after": 1000},
            retries={"max_attempts": 5, "backoff_base_s": 0.0})) as rt:
        n = 50
        results = [post(rt) for _ in range(n)]
        assert all(s == 500 for s, *_ in results)  # the last upstream answer, relayed
        attempts = sum(u.completions for u in ups)
        assert n < attempts <= 1.2 * n


def test_a_failing_replica_is_ejected_after_five_failures_and_back_after_the_cooldown() -> None:
    with upstreams("a", "b") as ups, running_router(config(
            [replica(u.url) for u in ups], policy="round_robin",
            health={**SLOW_HEALTH, "eject_cooldown_s": 0.5}, retries={"budget": 0.0})) as rt:
        ups[0].mode, ups[0].status = "status", 502
        results = [post(rt)[0] for _ in range(20)]
        assert results[:10:2] == [502] * 5 and ups[0].completions == 5  # then no more traffic
        assert results.count(200) == 15
        assert rt.router.metrics.ejections.labels("east-0")._value.get() == 1
        ups[0].mode = "ok"
        time.sleep(0.55)
        headers = [post(rt)[1]["x-isthmus-target"] for _ in range(4)]
        assert "east-0" in headers


def test_active_health_checks_take_a_replica_out_and_bring_it_back() -> None:
    with upstreams("a", "b") as ups, running_router(config(
            [replica(u.url) for u in ups], policy="round_robin")) as rt:
        state = rt.router.state.replicas["east-0"]
        ups[0].healthy = False
        assert wait_until(lambda: not state.health.up, 3)
        assert {post(rt)[1]["x-isthmus-target"] for _ in range(6)} == {"east-1"}
        ups[0].healthy = True
        assert wait_until(lambda: state.health.up, 3)
        assert "east-0" in {post(rt)[1]["x-isthmus-target"] for _ in range(4)}


def test_no_replica_available_gives_503_with_retry_after_in_under_50_ms() -> None:
    with upstreams("a") as ups, running_router(config([replica(ups[0].url)])) as rt:
        ups[0].healthy = False
        assert wait_until(lambda: not rt.router.state.replicas["east-0"].health.up, 3)
        results = [post(rt) for _ in range(7)]
        assert {s for s, *_ in results} == {503}
        assert all(h["retry-after"] == "1" for _, h, _, _ in results)
        assert statistics.median(e for *_, e in results) < 0.05
        assert ups[0].completions == 0


def test_held_requests_wait_for_room_then_get_503_when_the_wait_is_over() -> None:
    with upstreams("a", first_chunk_delay_s=0.6) as ups, running_router(config(
            [replica(ups[0].url)], policy={"name": "gorgo_proxy", "params": {"max_in_flight": 1}},
            limits={"queue_wait_s": 0.2})) as rt:
        first = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        first.request("POST", "/v1/completions", body=STREAM, headers=JSON)
        time.sleep(0.1)
        status, headers, body, elapsed = post(rt, STREAM)
        assert status == 503 and headers["retry-after"] == "1" and 0.15 <= elapsed < 1.5
        assert first.getresponse().status == 200
        first.close()
    with upstreams("a", first_chunk_delay_s=0.3) as ups, running_router(config(
            [replica(ups[0].url)], policy={"name": "gorgo_proxy", "params": {"max_in_flight": 1}},
            limits={"queue_wait_s": 5.0})) as rt:
        first = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        first.request("POST", "/v1/completions", body=STREAM, headers=JSON)
        time.sleep(0.05)
        status, _, body, elapsed = post(rt, STREAM)  # held until the first one is done
        assert status == 200 and body.endswith(b"[DONE]\n\n") and elapsed >= 0.5
        assert first.getresponse().status == 200
        first.close()
        assert len(ups[0].seen) == 2 and ups[0].seen[1].at - ups[0].seen[0].at >= 0.3


@pytest.mark.parametrize("server", ["front", "uvicorn"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_disconnect_cancels_the_upstream_request_within_a_second(stream: bool, server: str) -> None:
    # under the router's own server the disconnect arrives by callback; under another ASGI server
    # (uvicorn here) a task waits for http.disconnect
    with upstreams("a", chunks=100, chunk_interval_s=0.05, first_chunk_delay_s=0.0 if stream else 5.0) as ups, \
            running_router(config([replica(ups[0].url)], health=SLOW_HEALTH), server) as rt:
        s = socket.create_connection(("127.0.0.1", rt.port), timeout=5)
        body = STREAM if stream else PLAIN
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        if stream:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            assert wait_until(lambda: ups[0].completions == 1, 3)
        closed = time.monotonic()
        s.close()
        assert wait_until(lambda: bool(ups[0].cancelled_at), 2)
        assert ups[0].cancelled_at[0] - closed < 1.0
        assert wait_until(lambda: rt.router.state.replicas["east-0"].in_flight == 0, 2)


def test_a_slow_client_holds_back_the_upstream_instead_of_filling_the_router() -> None:
    # ~48 MB streamed as fast as the upstream can write: while the client reads nothing, the
    # upstream must be held back by the full buffers along the way (the router stops reading it),
    # not drained into the router's memory; then everything arrives
    n = 3000
    with upstreams("a", chunks=n, pad=16_000) as ups, \
            running_router(config([replica(ups[0].url)], health=SLOW_HEALTH)) as rt:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(10)
        s.connect(("127.0.0.1", rt.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(STREAM) + STREAM)
        got = s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        time.sleep(1.0)
        held = ups[0].written
        assert held < n // 2, f"the upstream wrote {held} of {n} chunks to a client that reads nothing"
        total = len(got)
        tail = got
        while not tail.endswith(b"0\r\n\r\n"):
            data = s.recv(1 << 20)
            assert data, "the stream ended early"
            total += len(data)
            tail = (tail + data)[-64:]
        s.close()
        assert ups[0].written == n and total > n * 16_000
        assert b"data: [DONE]" in tail


def test_requests_wait_while_every_replica_is_at_its_in_flight_cap() -> None:
    with upstreams("a", first_chunk_delay_s=0.3) as ups, running_router(config(
            [replica(ups[0].url, max_in_flight=1)], limits={"queue_wait_s": 5.0})) as rt:
        first = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        first.request("POST", "/v1/completions", body=STREAM, headers=JSON)
        time.sleep(0.05)
        status, _, body, elapsed = post(rt, STREAM)  # least_load holds: the replica is full, not down
        assert status == 200 and body.endswith(b"[DONE]\n\n") and elapsed >= 0.2
        assert first.getresponse().status == 200
        first.close()
