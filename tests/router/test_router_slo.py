"""SLO classes in the live router: how a request gets its class, what an unattainable one gets (429),
priorities sent on to engines that schedule by them, output lengths learned from answers, and the
deadline-ordered hold queue."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from router_harness import config, post, replica, running_router, wait_until
from router_upstream import upstreams

from isthmus.core.errors import ConfigError
from isthmus.policies.slo import SLOPolicy
from isthmus.router.config import load_config
from isthmus.router.hold import HoldQueue

SLO = {
    "classes": [{"name": "interactive", "ttft_ms": 5000, "tpot_ms": 1000},
                {"name": "batch", "e2e_ms": 60000, "priority": 1},
                {"name": "impossible", "ttft_ms": 0.001}],
    "default": "batch",
    "by_model": {"m": "interactive"},
    "by_api_key": {"gold-key": "interactive", "cheap-key": "batch"},
}


def body(stream: bool = True, **extra: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hello there", "stream": stream, "max_tokens": 8, **extra}).encode()



def slo_router(url: str, **over: Any) -> dict[str, Any]:
    return config([replica(url, max_num_seqs=8)], slo=SLO,
                  policy={"name": "slo", "params": {"unattainable": "reject"}}, **over)


def test_the_class_comes_from_header_body_api_key_model_then_default() -> None:
    with upstreams("a") as ups, running_router(slo_router(ups[0].url)) as rt:
        def cls(data: bytes, headers: dict[str, str] | None = None) -> str:
            status, h, _ = post(rt.port, data, headers)
            assert status == 200
            return h["x-isthmus-slo-class"]

        assert cls(body(), {"x-slo-class": "batch"}) == "batch"  # header first
        assert cls(body(slo_class="batch"), {"x-slo-class": "interactive"}) == "interactive"
        assert cls(body(slo_class="batch")) == "batch"  # then the body field
        assert cls(body(), {"authorization": "Bearer cheap-key"}) == "batch"  # then the API key
        assert cls(body()) == "interactive"  # then the model


def test_an_unknown_or_malformed_class_is_a_400_naming_it() -> None:
    with upstreams("a") as ups, running_router(slo_router(ups[0].url)) as rt:
        status, _, raw = post(rt.port, body(), {"x-slo-class": "platinum"})
        err = json.loads(raw)["error"]
        assert status == 400 and err["code"] == "unknown_slo_class" and "platinum" in err["message"]
        status, _, raw = post(rt.port, body(slo_class=7))
        assert status == 400 and "slo_class" in json.loads(raw)["error"]["message"]
        assert ups[0].completions == 0


def test_an_unattainable_request_is_rejected_early_with_429_and_the_reason() -> None:
    with upstreams("a") as ups, running_router(slo_router(ups[0].url)) as rt:
        status, _, raw = post(rt.port, body(), {"x-slo-class": "impossible"})
        err = json.loads(raw)["error"]
        assert status == 429 and err["code"] == "slo_unattainable" and err["type"] == "rate_limit_error"
        assert "'impossible' cannot be met" in err["message"] and "TTFT" in err["message"]
        assert ups[0].completions == 0  # refused before any upstream work
        c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        c.request("GET", "/metrics")
        page = c.getresponse().read().decode()
        assert 'isthmus_router_rejections_total{reason="slo_unattainable"} 1.0' in page
        assert post(rt.port, body())[0] == 200  # an attainable one still goes through


@pytest.mark.parametrize("send_priority", [True, False])
def test_a_decisions_priority_reaches_engines_that_schedule_by_it(send_priority: bool) -> None:
    with upstreams("a") as ups, running_router(config(
            [replica(ups[0].url, priority=send_priority)], slo=SLO, policy="slo")) as rt:
        assert post(rt.port, body(), {"x-slo-class": "batch"})[0] == 200  # batch: priority 1
        assert post(rt.port, body(), {"x-slo-class": "interactive"})[0] == 200  # priority 0: body unchanged
        batch, interactive = ups[0].seen[0].body, ups[0].seen[1].body
        assert batch.get("priority") == (1 if send_priority else None)
        assert "priority" not in interactive
        assert batch["prompt"] == "hello there"  # the rest of the body as sent


def test_output_lengths_are_learned_from_streams_and_plain_answers() -> None:
    with upstreams("a", chunks=6) as ups, running_router(slo_router(ups[0].url)) as rt:
        assert post(rt.port, body(stream=True), {"x-slo-class": "interactive"})[0] == 200
        assert post(rt.port, body(stream=False), {"x-slo-class": "batch"})[0] == 200
        policy = rt.router.policy
        assert isinstance(policy, SLOPolicy)
        assert wait_until(lambda: policy.lengths.count("batch") == 1)
        assert policy.lengths.count("interactive") == 1
        h = policy.lengths
        assert h._classes["interactive"].mean == 6.0  # six data events, [DONE] not counted
        assert h._classes["batch"].mean == 6.0  # usage.completion_tokens


def test_the_hold_queue_serves_earliest_deadline_first_and_fifo_in_arrival_order() -> None:
    async def order(kind: str) -> list[str]:  # every request held at once, then released in one round
        now = [0.0]
        q: HoldQueue[str] = HoldQueue(0.01, lambda r: None, order=kind, max_hold_s=60.0,  # type: ignore[arg-type]
                                      clock=lambda: now[0])
        gate = {"open": False}
        served: list[str] = []

        def attempt(name: str) -> Any:
            def go() -> str | None:
                if not gate["open"]:
                    return None
                served.append(name)
                return name
            return go

        waits = [asyncio.create_task(q.wait(attempt(n), 5.0, deadline_s=d, priority=p))
                 for n, d, p in (("late", 9.0, 0), ("early", 2.0, 0), ("low-priority", 1.0, 1), ("mid", 5.0, 0))]
        await asyncio.sleep(0.05)
        gate["open"] = True
        await asyncio.gather(*waits)
        return served

    assert asyncio.run(order("edf")) == ["early", "mid", "late", "low-priority"]
    assert asyncio.run(order("fifo")) == ["late", "early", "low-priority", "mid"]


def test_the_queue_order_follows_the_policy_unless_the_file_sets_it() -> None:
    with upstreams("a") as ups:
        with running_router(slo_router(ups[0].url)) as rt:
            assert rt.router.hold.order == "edf"  # slo asks for edf
        with running_router(slo_router(ups[0].url, limits={"queue": "fifo"})) as rt:
            assert rt.router.hold.order == "fifo"
        with running_router(config([replica(ups[0].url)])) as rt:
            assert rt.router.hold.order == "fifo"


@pytest.mark.parametrize(("slo", "where"), [
    ({"classes": [{"name": "a", "ttft_ms": 1}], "default": "b"}, "slo.default"),
    ({"classes": [{"name": "a", "ttft_ms": 1}], "by_model": {"other": "a"}}, "slo.by_model.other"),
    ({"classes": [{"name": "a"}]}, "slo.classes.0"),
    ({"classes": [{"name": "a", "ttft_ms": 1}, {"name": "a", "e2e_ms": 1}]}, "slo.classes.1.name"),
    ({"classes": [{"name": "a", "ttft_ms": 1}], "header": "bad header"}, "slo.header"),
])
def test_bad_slo_config_names_the_field(tmp_path: Path, slo: dict[str, Any], where: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config([replica("http://127.0.0.1:9")], slo=slo)))
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(path)


def test_profile_time_scale_scales_the_profile_times_policies_see() -> None:
    # engines that run their profiles faster (engine doubles with --time-scale) must be estimated so
    with upstreams("a") as ups:
        with running_router(slo_router(ups[0].url)) as rt:
            full = rt.router.state.snapshot(rt.router.clock()).instances["east-0"]
        with running_router(slo_router(ups[0].url, profile_time_scale=0.25)) as rt:
            fast = rt.router.state.snapshot(rt.router.clock()).instances["east-0"]
    assert fast.prefill_s_per_token == pytest.approx(full.prefill_s_per_token * 0.25)
    assert fast.decode_step_s == pytest.approx(full.decode_step_s * 0.25)
