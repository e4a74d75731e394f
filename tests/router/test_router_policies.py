"""The simulator's policy objects deciding live: three local "regions" with RTTs from the config,
one central router (least_load, gorgo_proxy) and regional routers forwarding to each other (gorgo)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from router_harness import JSON, config, post, replica, running_router, wait_until
from router_upstream import upstreams

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.perf import builtin_perf_model
from isthmus.core.tokenizer import ByteChunkTokenizer
from isthmus.policies import GorgoPolicy, GorgoProxyPolicy, LeastLoadPolicy

REGIONS = {"measure": False, "rtt_ms": {"east": {"west": 80, "asia": 200}, "west": {"asia": 150}},
           "intra_region_rtt_ms": 2}
PROMPT = "lorem ipsum " * 1000  # 12,000 bytes: 3,000 tokens of the built-in tokenizer
T_P = builtin_perf_model("A100", "Mistral-7B").prefill_s_per_token()


def body(prompt: str = PROMPT, stream: bool = True) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt, "stream": stream, "max_tokens": 8}).encode()



def start(port: int, data: bytes) -> http.client.HTTPConnection:
    """Send a request and leave it in flight."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/v1/completions", body=data, headers=JSON)
    return c


def three_regions(**over: Any) -> dict[str, Any]:
    return {"regions": REGIONS, **over}


def test_least_load_follows_the_engines_metrics_and_breaks_ties_by_rtt() -> None:
    with upstreams("e", "w", "a") as ups, running_router(config(
            [replica(ups[0].url, "east"), replica(ups[1].url, "west"), replica(ups[2].url, "asia")],
            **three_regions(policy="least_load"))) as rt:
        assert isinstance(rt.router.policy, LeastLoadPolicy)  # the simulator's own class
        assert post(rt.port, body())[1]["x-isthmus-target"] == "east-0"  # all idle: nearest
        ups[0].running, ups[1].running = 5, 2
        assert wait_until(lambda: rt.router.state.snapshot(rt.router.clock()).instances["west-0"].running == 2)
        assert post(rt.port, body())[1]["x-isthmus-target"] == "asia-0"
        ups[2].waiting = 10
        assert wait_until(lambda: rt.router.state.snapshot(rt.router.clock()).instances["asia-0"].waiting == 10)
        _status, headers, _ = post(rt.port, body())
        assert (headers["x-isthmus-target"], headers["x-isthmus-region"]) == ("west-0", "west")
        assert float(headers["x-isthmus-cost-ms"]) != float(headers["x-isthmus-cost-ms"])  # least_load: no total


def test_gorgo_proxy_prices_queue_prefill_and_rtt_like_the_simulator() -> None:
    with upstreams("e", "w", "a", first_chunk_delay_s=0.8) as ups, running_router(config(
            [replica(ups[0].url, "east"), replica(ups[1].url, "west"), replica(ups[2].url, "asia")],
            **three_regions(policy="gorgo_proxy"))) as rt:
        assert isinstance(rt.router.policy, GorgoProxyPolicy)
        tokens = len(ByteChunkTokenizer().encode(PROMPT))
        prefill_ms = T_P * tokens * 1e3
        # idle: cost = prefill + RTT, nearest wins, and the header carries the policy's estimate
        busy_east = start(rt.port, body())
        assert wait_until(lambda: rt.router.state.replicas["east-0"].pending == 1)
        # east now has a queue of one prompt: queue + prefill + 2 ms vs prefill + 80 ms in the west
        other = "other " * 3000  # no cached prefix anywhere
        _, headers, _ = post(rt.port, body(other, stream=False))
        assert headers["x-isthmus-target"] == "west-0"
        other_tokens = len(ByteChunkTokenizer().encode(other))
        assert float(headers["x-isthmus-cost-ms"]) == pytest.approx(T_P * other_tokens * 1e3 + 80, rel=1e-6)
        # the same prompt as the one in flight on east: its prefix is in the mirror, prefill is ~free there
        mirror = rt.router.state
        assert mirror.matched_blocks(hash_token_blocks(ByteChunkTokenizer().encode(PROMPT), 16), "east-0") == tokens // 16
        _status, headers, _ = post(rt.port, body())
        cost = float(headers["x-isthmus-cost-ms"])
        assert headers["x-isthmus-target"] == "east-0" and cost < prefill_ms + 2 + T_P * tokens * 1e3
        assert busy_east.getresponse().status == 200
        busy_east.close()


def regional(region: str, upstream_url: str, peer_region: str, peer_port: int, port: int) -> dict[str, Any]:
    return config([replica(upstream_url, region)], region=region, mode="regional", listen={"host": "127.0.0.1",
                  "port": port}, peers=[{"region": peer_region, "url": f"http://127.0.0.1:{peer_port}"}],
                  regions={"measure": False, "rtt_ms": {"east": {"west": 20}}},
                  policy={"name": "gorgo", "params": {"sync_period_s": 0.05, "recheck_s": 0.01}})


def test_regional_gorgo_routers_forward_once_to_a_cheaper_peer() -> None:
    from router_harness import free_port

    pe, pw = free_port(), free_port()
    with upstreams("e", "w", first_chunk_delay_s=0.6) as ups, \
            running_router(regional("east", ups[0].url, "west", pw, pe)) as east, \
            running_router(regional("west", ups[1].url, "east", pe, pw)) as west:
        assert isinstance(east.router.policy, GorgoPolicy) and east.router.sync_period_s == 0.05
        assert wait_until(lambda: "west-0" in east.router.state.replicas and "east-0" in west.router.state.replicas)
        status, headers, _ = post(east.port, body(stream=False))
        assert headers["x-isthmus-target"] == "east-0" and "x-isthmus-forwarded-to" not in headers  # room at home
        busy = start(east.port, body())
        assert wait_until(lambda: east.router.state.replicas["east-0"].pending == 1)
        status, headers, data = post(east.port, body("fresh " * 2000))
        assert status == 200 and data.endswith(b"data: [DONE]\n\n")
        assert headers["x-isthmus-forwarded-to"] == "west" and headers["x-isthmus-target"] == "west-0"
        assert headers["x-isthmus-region"] == "west"
        seen = {k.lower(): v for k, v in ups[1].seen[-1].headers.items()}
        assert "x-isthmus-hops" not in seen  # the hop header stops at the peer router
        assert west.router.metrics.decisions.labels("west-0", "west", "false")._value.get() == 1
        assert east.router.metrics.forwards.labels("west")._value.get() == 1
        # a request that already made its hop is never forwarded again: the west router serves it or holds it
        status, headers, _ = post(west.port, body(stream=False), {"x-isthmus-hops": "1"})
        assert status == 200 and headers["x-isthmus-target"] == "west-0"
        assert busy.getresponse().status == 200
        busy.close()
        c = http.client.HTTPConnection("127.0.0.1", west.port, timeout=5)
        c.request("GET", "/isthmus/summary")
        summary = json.loads(c.getresponse().read())
        c.close()
        assert summary["region"] == "west" and [r["id"] for r in summary["replicas"]] == ["west-0"]
        assert summary["replicas"][0]["url"] == ups[1].url and summary["replicas"][0]["prefill_s_per_token"] > 0


def test_a_central_proxy_routes_by_the_clients_region_when_an_edge_says_it() -> None:
    with upstreams("e", "w", "a") as ups, running_router(config(
            [replica(ups[0].url, "east"), replica(ups[1].url, "west"), replica(ups[2].url, "asia")],
            **three_regions(policy="gorgo_proxy"))) as rt:
        _, headers, _ = post(rt.port, body(stream=False), {"x-isthmus-origin": "asia"})
        assert headers["x-isthmus-target"] == "asia-0"  # idle cluster: the client's own region is nearest
        _, headers, _ = post(rt.port, body("other prompt", stream=False), {"x-isthmus-origin": "mars"})
        assert headers["x-isthmus-target"] == "east-0"  # unknown region: the router's own


def test_a_learned_policy_fits_off_the_loop_and_swaps_its_model_in(tmp_path: Path) -> None:
    """lodestar in the router: outcomes feed it, fits run in a worker thread (training 'external'
    by default in the router), models are installed while requests keep flowing, /metrics counts them,
    and a restarted router takes up what the last one learned."""
    state = tmp_path / "lodestar.npz"
    params = {"warmup": 20, "refit_every": 10, "hidden_layers": 1, "hidden_units": 8, "epochs": 5, "batch_size": 8,
              "refit_epochs": 2}
    with upstreams("e", "w", "a") as ups, running_router(config(
            [replica(ups[0].url, "east"), replica(ups[1].url, "west"), replica(ups[2].url, "asia")],
            **three_regions(policy={"name": "lodestar", "params": params, "state_file": str(state)}))) as rt:
        policy: Any = rt.router.policy
        assert policy.params.training == "external"
        for k in range(45):
            status, _, _ = post(rt.port, body(f"prompt {k} " * 50, stream=False))
            assert status == 200
        learner = rt.router.learner
        assert learner is not None
        assert wait_until(lambda: learner.fits >= 2 and not learner.fitting, timeout=30)
        assert policy.samples_seen == 45
        c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        assert f"isthmus_router_learn_fits_total {float(learner.fits)}" in text
        assert "isthmus_router_learn_samples_total 45.0" in text
        status, headers, _ = post(rt.port, body("after the fits " * 50, stream=False))
        assert status == 200 and headers["x-isthmus-target"] in ("east-0", "west-0", "asia-0")
        assert wait_until(lambda: policy.samples_seen == 46)
    assert state.exists()
    with upstreams("e", "w", "a") as ups, running_router(config(
            [replica(ups[0].url, "east"), replica(ups[1].url, "west"), replica(ups[2].url, "asia")],
            **three_regions(policy={"name": "lodestar", "params": params, "state_file": str(state)}))) as rt:
        again: Any = rt.router.policy
        assert again.samples_seen == 46 and again is not policy and again.model is not None
        assert post(rt.port, body("after a restart " * 50, stream=False))[0] == 200
