"""Each injected fault behaves as documented, and SIGTERM stops the server cleanly."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from emulator_harness import Emulator, open_stream, read_sse, wait_until

from isthmus.emulator.config import FaultSpec


@pytest.fixture(scope="module")
def emu(emulator_factory: Any) -> Emulator:
    return emulator_factory("--gpu", "L4", "--time-scale", "0.1", "--max-model-len", "4096", "--seed", "7")


@pytest.fixture(autouse=True)
def _no_faults_after(emu: Emulator) -> Iterator[None]:
    yield
    emu.fault()


def _timed_events(resp: http.client.HTTPResponse, t0: float) -> list[tuple[float, bytes]]:
    """``(seconds since t0, payload)`` of every event until the stream ends, cleanly or not."""
    out: list[tuple[float, bytes]] = []
    try:
        for ev in read_sse(resp):
            out.append((time.monotonic() - t0, ev))
    except (http.client.IncompleteRead, ConnectionError):
        pass
    return out


def test_error_rate_one_answers_every_generation_with_the_status(emu: Emulator) -> None:
    assert emu.fault(error_rate=1.0, error_status=503)["error_rate"] == 1.0
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        status, doc = emu.post(path, body)
        assert status == 503 and doc["error"]["code"] == 503 and doc["error"]["type"] == "ServiceUnavailableError"
    assert emu.request("GET", "/health")[0] == 200  # only generation requests fail
    assert emu.request("GET", "/v1/models")[0] == 200


def test_error_rate_fraction(emu: Emulator) -> None:
    emu.fault(error_rate=0.5)
    statuses = [emu.post("/v1/completions", {"prompt": f"r{i}", "max_tokens": 1})[0] for i in range(40)]
    assert set(statuses) == {200, 500}
    assert 8 <= statuses.count(500) <= 32


def test_stall_for_a_while_then_resume(emu: Emulator) -> None:
    emu.fault(stall_after=2, stall_s=0.4)
    t0 = time.monotonic()
    conn, resp = open_stream(emu, "/v1/completions", {"prompt": "stall", "max_tokens": 5})
    try:
        events = _timed_events(resp, t0)
    finally:
        conn.close()
    assert [e for _, e in events][-1] == b"[DONE]" and len(events) == 6
    times = [t for t, _ in events]
    assert times[1] < 0.3 and times[2] - times[1] >= 0.35


def test_stall_forever_until_the_client_leaves(emu: Emulator) -> None:
    emu.fault(stall_after=1)
    conn, resp = open_stream(emu, "/v1/completions", {"prompt": "stall forever", "max_tokens": 500}, timeout=0.5)
    try:
        events = read_sse(resp)
        next(events)
        with pytest.raises(TimeoutError):
            next(events)
        assert emu.metrics()["vllm:num_requests_running"] == 1  # the engine still works on it
    finally:
        conn.close()
    assert wait_until(lambda: emu.metrics()["vllm:num_requests_running"] == 0, timeout=1.0)


def test_stall_holds_back_a_whole_reply(emu: Emulator) -> None:
    emu.fault(stall_after=0, stall_s=0.3)
    t0 = time.monotonic()
    status, doc = emu.post("/v1/completions", {"prompt": "held", "max_tokens": 2})
    assert status == 200 and doc["usage"]["completion_tokens"] == 2 and time.monotonic() - t0 >= 0.3


def test_die_mid_stream_closes_without_done(emu: Emulator) -> None:
    emu.fault(die_after=3)
    conn, resp = open_stream(emu, "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "die"}], "max_tokens": 10})
    try:
        events = [e for _, e in _timed_events(resp, 0.0)]
    finally:
        conn.close()
    assert len(events) == 3 and b"[DONE]" not in events
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


def test_die_on_a_whole_reply_sends_headers_only(emu: Emulator) -> None:
    emu.fault(die_after=0)
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        emu.request("POST", "/v1/completions", {"prompt": "die", "max_tokens": 2})
    emu.fault()
    assert emu.post("/v1/completions", {"prompt": "alive", "max_tokens": 2})[0] == 200


def test_unhealthy(emu: Emulator) -> None:
    emu.fault(unhealthy=True)
    status, raw = emu.request("GET", "/health")
    assert status == 503 and json.loads(raw)["error"]["code"] == 503
    assert emu.post("/v1/completions", {"prompt": "still serving", "max_tokens": 1})[0] == 200
    emu.fault()
    assert emu.request("GET", "/health")[0] == 200


def test_admin_endpoint_validates_and_reports(emu: Emulator) -> None:
    for bad in ({"nope": 1}, {"error_status": 200}, {"error_rate": 2}, {"stall_after": "x"}, [1]):
        status, body = emu.post("/admin/fault", bad)
        assert status == 400 and body["error"]["code"] == 400, bad
    emu.fault(stall_after=3, stall_s=1.5)
    status, raw = emu.request("GET", "/admin/fault")
    assert status == 200 and json.loads(raw) == _spec_json(stall_after=3, stall_s=1.5)


def _spec_json(**kw: Any) -> dict[str, Any]:
    spec = FaultSpec(**kw)
    return {f: getattr(spec, f) for f in FaultSpec.__dataclass_fields__}


def test_refuse_resets_every_connection(emulator_factory: Any) -> None:
    emu = emulator_factory("--fault-refuse", wait_health=False)
    for _ in range(3):
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            emu.request("GET", "/health", timeout=2.0)
    assert emu.stop() == 0


def test_startup_flags(emulator_factory: Any) -> None:
    emu = emulator_factory("--fault-error-rate", "1", "--fault-error-status", "502", "--no-admin", wait_health=False)
    assert emu.request("GET", "/health")[0] == 200
    assert emu.post("/v1/completions", {"prompt": "x"})[0] == 502
    assert emu.request("GET", "/admin/fault")[0] == 404


def test_die_exit_ends_the_process(emulator_factory: Any) -> None:
    emu = emulator_factory("--fault-die-after", "2", "--fault-die-exit", "--time-scale", "0.01")
    conn, resp = open_stream(emu, "/v1/completions", {"prompt": "exit", "max_tokens": 10})
    try:
        events = [e for _, e in _timed_events(resp, 0.0)]
    finally:
        conn.close()
    assert len(events) == 2
    assert emu.proc.wait(5) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", emu.port), timeout=1).close()


def test_sigterm_lets_open_streams_finish_then_exits_cleanly(emulator_factory: Any) -> None:
    # even a stream stalled for good is released to finish when the server is asked to stop
    emu = emulator_factory("--gpu", "L4", "--time-scale", "0.1", "--fault-stall-after", "1")
    conn, resp = open_stream(emu, "/v1/completions", {"prompt": "drain", "max_tokens": 40})
    try:
        events = read_sse(resp)
        next(events)
        t0 = time.monotonic()
        emu.proc.send_signal(15)
        rest = list(events)
    finally:
        conn.close()
    assert len(rest) == 40 and rest[-1] == b"[DONE]"  # 39 more tokens and [DONE]: nothing truncated
    assert emu.proc.wait(5) == 0 and time.monotonic() - t0 < 5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", emu.port), timeout=1).close()
