"""Sweeps: the grid, grid-order results whatever the backend, failures recorded, the Ray path."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from isthmus.core import RegistryError
from isthmus.core.policy import Decision, Outcome, PolicyRegistry
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot
from isthmus.policies import default_registry
from isthmus.sim.report import dumps_report
from isthmus.sim.scenario import Scenario, load_scenario
from isthmus.sim.sweep import (
    CELL_KEYS,
    SweepError,
    SweepGrid,
    aggregate,
    cell_scenario,
    network_aware_labels,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "scenarios" / "tiny.yaml"


@pytest.fixture(scope="module")
def small() -> Scenario:
    """tiny.yaml cut to 40 requests: a cell runs in a fraction of a second."""
    return load_scenario(TINY).with_workload(limit=40)


class BrokenPolicy:
    """Fails on its first decision, as a buggy policy would."""

    name = "broken"

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        raise RuntimeError("policy bug")

    def observe(self, outcome: Outcome) -> None:
        return None


def make_broken(params: Mapping[str, Any], rng: np.random.Generator) -> BrokenPolicy:
    return BrokenPolicy()


def registry_with_broken() -> PolicyRegistry:
    """The built-in policies plus ``broken`` (module level, so worker processes can unpickle it)."""
    reg = default_registry()
    reg.register("broken", make_broken)
    return reg


def test_grid_order_and_validation() -> None:
    grid = SweepGrid(policies=("a", "b"), rates_rps=(1.0, 2.0), rtt_scales=(0.5, 1.0), seeds=(0, 1))
    cells = grid.cells()
    assert len(cells) == 16 and [c.index for c in cells] == list(range(16))
    assert [(c.policy, c.rate_rps, c.rtt_scale, c.seed) for c in cells[:3]] == [
        ("a", 1.0, 0.5, 0), ("a", 1.0, 0.5, 1), ("a", 1.0, 1.0, 0)]
    assert cells[8].policy == "b"
    for bad, match in (({"policies": ()}, "at least one"), ({"policies": ("a", "a")}, "duplicate"),
                       ({"rates_rps": (0.0,)}, "rates"), ({"rates_rps": (None, 1.0)}, "mixed"),
                       ({"rtt_scales": (-1.0,)}, "RTT scales"), ({"rtt_scales": (math.inf,)}, "RTT scales"),
                       ({"seeds": (-1,)}, "seeds")):
        kwargs: dict[str, Any] = {"policies": ("a",), **bad}
        with pytest.raises(SweepError, match=match):
            SweepGrid(**kwargs)


def test_cell_scenario_sets_the_rate_and_scales_every_rtt(small: Scenario) -> None:
    (cell,) = SweepGrid(policies=("least_load",), rates_rps=(2.5,), rtt_scales=(2.0,)).cells()
    sc = cell_scenario(small, cell)
    assert sc.config.workload.rate_rps == 2.5 and sc.config.workload.time_scale == 1.0
    assert sc.offered_rate_rps() == pytest.approx(2.5)
    before, after = small.config.topology.build(), sc.config.topology.build()
    np.testing.assert_allclose(after.rtt_s, 2.0 * before.rtt_s)
    assert after.rtt("israel", "israel") == pytest.approx(0.004)  # inside a region too
    assert small.config.workload.rate_rps is None  # the original is untouched


def test_records_are_in_grid_order_and_identical_in_process_and_in_a_pool(small: Scenario) -> None:
    grid = SweepGrid(policies=("random", "least_load"), rates_rps=(5.0, 20.0), seeds=(3,))
    serial = run_sweep(small, grid, workers=1)
    pooled = run_sweep(small, grid, workers=2)
    assert dumps_report(serial.document()) == dumps_report(pooled.document())
    doc = serial.document()
    assert set(doc) == {"scenario", "grid", "failed", "cells"} and doc["failed"] == 0
    assert doc["grid"]["policies"] == ["random", "least_load"] and doc["grid"]["rates_rps"] == [5.0, 20.0]
    assert doc["grid"]["rtt_scales"] == [1.0] and doc["grid"]["seeds"] == [3]
    assert doc["grid"]["routers"]["least_load"]["mode"] == "proxy"
    assert [(c["policy"], c["rate_rps"]) for c in doc["cells"]] == [
        ("random", 5.0), ("random", 20.0), ("least_load", 5.0), ("least_load", 20.0)]
    for c in doc["cells"]:
        assert c["seed"] == 3 and c["rtt_scale"] == 1.0 and c["requests"] == c["completed"] == 40
        assert 0 < c["ttft_s"]["p50"] <= c["ttft_s"]["p99"]
    # a faster arrival rate packs the same 40 requests into less time
    assert doc["cells"][1]["throughput_rps"] > doc["cells"][0]["throughput_rps"]


def test_the_scenarios_own_rate_is_reported(small: Scenario) -> None:
    result = run_sweep(small, SweepGrid(policies=("least_load",)), workers=1)
    (cell,) = result.records
    assert cell["rate_rps"] == pytest.approx(small.offered_rate_rps())
    assert result.document()["grid"]["rates_rps"] == [cell["rate_rps"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_cell_is_recorded_and_the_others_run(small: Scenario, workers: int) -> None:
    seen: list[dict[str, Any]] = []
    grid = SweepGrid(policies=("broken", "least_load"), rates_rps=(5.0,), seeds=(0, 1))
    result = run_sweep(small, grid, workers=workers, make_registry=registry_with_broken, on_done=seen.append)
    assert result.failed == 2 and result.document()["failed"] == 2
    broken, ok = result.records[:2], result.records[2:]
    for rec in broken:
        assert set(rec) == {*CELL_KEYS, "error"} and rec["error"] == "RuntimeError: policy bug"
    assert all("error" not in r and r["completed"] == 40 for r in ok)
    assert sorted((r["policy"], r["seed"]) for r in seen) == sorted((r["policy"], r["seed"]) for r in result.records)
    stats = aggregate(result.records)
    assert [(s.policy, s.seeds, s.failed) for s in stats] == [("broken", 0, 2), ("least_load", 2, 0)]
    assert math.isnan(stats[0].ttft_mean_s) and stats[1].ttft_p99_s >= stats[1].ttft_p50_s > 0


def test_an_unknown_policy_fails_before_anything_runs(small: Scenario) -> None:
    with pytest.raises(RegistryError, match="unknown policy 'fastest'"):
        run_sweep(small, SweepGrid(policies=("least_load", "fastest")), workers=1)
    with pytest.raises(SweepError, match="workers"):
        run_sweep(small, SweepGrid(policies=("least_load",)), workers=0)


def test_ray_missing_is_a_clear_error(small: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(SweepError, match=r"pip install 'isthmus\[ray\]'"):
        run_sweep(small, SweepGrid(policies=("least_load",)), ray_address="auto")


def _fake_ray() -> types.ModuleType:
    """The slice of Ray's API a sweep uses, run in this process; tasks finish in reverse order and
    the task of the second cell dies, as a lost worker would."""
    ray = types.ModuleType("ray")
    state: dict[str, Any] = {"initialized": False, "address": None, "put": []}

    class Ref:
        def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> None:
            self.fn, self.args, self.n = fn, args, n

    def remote(**options: Any) -> Callable[[Callable[..., Any]], Any]:
        assert options == {"num_cpus": 1}

        def wrap(fn: Callable[..., Any]) -> Any:
            counter = iter(range(1_000_000))
            return types.SimpleNamespace(remote=lambda *args: Ref(fn, args, next(counter)))

        return wrap

    def put(value: Any) -> Any:
        state["put"].append(value)
        return ("ref", len(state["put"]) - 1)

    def get(ref: Ref) -> Any:
        if ref.n == 1:
            raise RuntimeError("worker died")
        args = tuple(state["put"][a[1]] if isinstance(a, tuple) and a[:1] == ("ref",) else a for a in ref.args)
        return ref.fn(*args)

    def wait(refs: list[Ref], num_returns: int) -> tuple[list[Ref], list[Ref]]:
        last = max(refs, key=lambda r: r.n)
        return [last], [r for r in refs if r is not last]

    def init(address: str, **kwargs: Any) -> None:
        state["initialized"], state["address"] = True, address

    def shutdown() -> None:
        state["initialized"] = False

    ray.__dict__.update(remote=remote, put=put, get=get, wait=wait, init=init, shutdown=shutdown,
                        is_initialized=lambda: state["initialized"], state=state)
    return ray


def test_the_ray_backend_keeps_grid_order_and_records_lost_tasks(small: Scenario,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ray = _fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    grid = SweepGrid(policies=("least_load",), rates_rps=(5.0, 10.0, 20.0))
    result = run_sweep(small, grid, ray_address="ray://head:10001")
    assert ray.state["address"] == "ray://head:10001" and not ray.state["initialized"]  # shut down after
    assert [r["rate_rps"] for r in result.records] == [5.0, 10.0, 20.0]
    assert result.failed == 1 and result.records[1]["error"] == "RuntimeError: worker died"
    local = run_sweep(small, SweepGrid(policies=("least_load",), rates_rps=(5.0,)), workers=1)
    assert result.records[0] == local.records[0]


def test_network_aware_labels(tmp_path: Path) -> None:
    text = TINY.read_text().replace("policies: [random, round_robin, least_load]",
                                    "policies: [least_load, gorgo_proxy, {name: gorgo_proxy, label: gp2}]")
    path = tmp_path / "t.yaml"
    path.write_text(text.replace("../data/", f"{REPO}/data/"))
    sc = load_scenario(path)
    assert network_aware_labels(sc, ["least_load", "gorgo_proxy", "gp2"]) == ["gorgo_proxy", "gp2"]
