"""The request path's fast paths: a stream's last chunk sent together with the end of the body, header values,
request ids."""

from __future__ import annotations

import http.client
import json
import re

import pytest
from router_harness import config, replica, running_router
from router_upstream import upstreams

from isthmus.router.app import _header_value


def _stream_twice(port: int, body: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Two streamed requests on one keep-alive connection (the second one needs a well-ended first body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for _ in range(2):
            c.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
            r = c.getresponse()
            out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
    finally:
        c.close()
    return out


@pytest.mark.parametrize("interval_s", [0.0, 0.01])
@pytest.mark.parametrize("chunks", [1, 5])
def test_streams_are_relayed_byte_for_byte_and_end_cleanly(chunks: int, interval_s: float) -> None:
    body = json.dumps({"model": "m", "prompt": "hello there", "max_tokens": chunks, "stream": True}).encode()
    with upstreams("a", chunks=chunks, chunk_interval_s=interval_s) as ups, \
            running_router(config([replica(u.url) for u in ups], policy="round_robin")) as rt:
        direct = _stream_twice(ups[0].port, body)
        routed = _stream_twice(rt.port, body)
    for (ds, _, db), (rs, rh, rb) in zip(direct, routed, strict=True):
        assert ds == rs == 200
        assert rh["content-type"].startswith("text/event-stream")
        assert rb.endswith(b"data: [DONE]\n\n")
        # the upstream's ids differ per request; everything else is the same bytes
        strip = re.compile(rb'"id": ?"[^"]*"')
        assert strip.sub(b"", rb) == strip.sub(b"", db)


def test_new_request_ids_are_distinct_hex() -> None:
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 1, "stream": True}).encode()
    with upstreams("a") as ups, running_router(config([replica(u.url) for u in ups], policy="round_robin")) as rt:
        ids = [h["x-request-id"] for _, h, _ in _stream_twice(rt.port, body)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]


def test_header_values_match_the_character_by_character_rule() -> None:
    for text in ["east-0", "", "x" * 300, "caf\u00e9", "tab\there", "a\u2028b", "~ !", "\x7f", "ok\n"]:
        expected = "".join(c if " " <= c <= "~" else "?" for c in text[:200]).encode("latin-1")
        assert _header_value(text) == expected
