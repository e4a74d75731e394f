"""Scenario files: strict loading with located errors, and what a scenario builds."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest

from isthmus.core import ConfigError, RegistryError
from isthmus.policies import LeastLoadPolicy, default_registry
from isthmus.sim.scenario import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "scenarios"

GOOD = textwrap.dedent("""\
    name: two
    topology:
      regions: [us-west, germany, israel]
      rtt_ms:
        us-west: {germany: 281, israel: 183}
        germany: {israel: 60, germany: 5}
      intra_region_rtt_ms: 2
    replicas:
      - {region: germany, gpu: a100, model: llama-3.1-8b, count: 2}
      - {region: us-west, gpu: H100, model: Llama-3.1-8B, max_num_seqs: 64}
      - {region: germany, gpu: H100, model: Llama-3.1-8B, num_kv_blocks: 1000}
    workload:
      kind: poisson
      rate_rps: 5
      limit: 20
      lengths: {prompt_tokens: 64, output_tokens: 8}
    router: {region: germany}
    policies:
      - random
      - {name: least_load, label: ll}
    seed: 3
    """)


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_scenarios_load(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.base_dir == SCENARIOS
    assert sc.config.policies and sc.config.instance_specs()
    assert sc.config.topology.build().regions == sc.config.topology.regions


def test_good_file_builds_topology_instances_and_policies(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, GOOD))
    topo = sc.config.topology.build()
    assert topo.rtt("germany", "us-west") == pytest.approx(0.281)  # mirrored
    assert topo.rtt("israel", "germany") == pytest.approx(0.060)
    assert topo.rtt("germany", "germany") == pytest.approx(0.005)  # explicit diagonal wins
    assert topo.rtt("israel", "israel") == pytest.approx(0.002)  # intra-region default
    specs = sc.config.instance_specs()
    assert [s.id for s in specs] == ["germany-0", "germany-1", "us-west-0", "germany-2"]
    assert specs[0].gpu == "A100-80GB" and specs[0].model == "Llama-3.1-8B"  # canonical names
    assert specs[2].max_num_seqs == 64 and specs[0].max_num_seqs == 128  # InstanceSpec's default
    assert specs[3].num_kv_blocks == 1000
    assert sc.config.router_region == "germany"
    assert [p.key for p in sc.config.policies] == ["random", "ll"]

    inp = sc.build("ll")
    assert inp.seed == 3 and inp.router_region == "germany" and inp.policy.name == "least_load"
    reqs = list(inp.requests)
    assert len(reqs) == 20 and {r.origin for r in reqs} <= set(topo.regions)
    # The same seed gives the same requests; a policy the file does not list can still be built.
    again = sc.build("round_robin", seed=3)
    assert [(r.arrival, r.origin) for r in again.requests] == [(r.arrival, r.origin) for r in reqs]
    other = [(r.arrival, r.origin) for r in sc.build("ll", seed=4).requests]
    assert other != [(r.arrival, r.origin) for r in reqs]


def test_router_defaults_to_first_region(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, GOOD.replace("router: {region: germany}\n", "")))
    assert sc.config.router_region == "us-west" and sc.config.router.mode == "proxy"


def test_bad_gpu_names_the_field_and_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("gpu: a100", "gpu: B200"))
    assert "s.yaml:9: replicas.0.gpu: unknown GPU 'B200'" in msg


def test_unknown_region_of_a_replica(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("region: us-west, gpu: H100", "region: mars, gpu: H100"))
    assert "replicas.1.region: unknown region 'mars'" in msg and ":10:" in msg


def test_unknown_region_in_rtt_and_missing_pair(tmp_path: Path) -> None:
    assert "topology.rtt_ms.us-west.mars: unknown region" in error_of(
        tmp_path, GOOD.replace("israel: 183}", "israel: 183, mars: 3}"))
    msg = error_of(tmp_path, GOOD.replace("germany: {israel: 60, germany: 5}", "germany: {germany: 5}"))
    assert "topology.rtt_ms: no value between 'germany' and 'israel'" in msg


def test_contradicting_rtt_pair(tmp_path: Path) -> None:
    text = GOOD.replace("germany: {israel: 60, germany: 5}", "germany: {israel: 60, us-west: 200}")
    assert "topology.rtt_ms.germany.us-west" in error_of(tmp_path, text)


def test_type_errors_unknown_keys_and_missing_fields(tmp_path: Path) -> None:
    assert "replicas.1.max_num_seqs: Input should be a valid integer" in error_of(
        tmp_path, GOOD.replace("max_num_seqs: 64", "max_num_seqs: lots"))
    assert "replicas.2.colour: unknown field" in error_of(tmp_path, GOOD.replace("num_kv_blocks: 1000", "colour: red"))
    assert "replicas.0.count: Input should be greater than or equal to 1" in error_of(
        tmp_path, GOOD.replace("count: 2", "count: 0"))
    assert "name: Field required" in error_of(tmp_path, GOOD.replace("name: two\n", ""))


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("intra_region_rtt_ms: 2", "intra_region_rtt_ms: [2"))
    assert "s.yaml:" in msg and "YAML syntax error" in msg
    line = int(msg.split("s.yaml:")[1].split(":")[0])
    assert line in (7, 8)  # the unclosed list is reported where the parser gives up


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("seed: 3", "seed: 3\nseed: 4"))
    assert "s.yaml:22:1: YAML syntax error: duplicate key 'seed'" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "must be a YAML mapping" in error_of(tmp_path, "- a\n- b\n")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such scenario file"):
        load_scenario("/nonexistent/scenario.yaml")


def test_policy_errors_are_located(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("  - random\n", "  - fastest\n"))
    assert "policies.0: unknown policy 'fastest'" in msg
    msg = error_of(tmp_path, GOOD.replace("label: ll}", "params: {alpha: 1}}"))
    assert "policies.1: policy 'least_load': bad parameters" in msg
    msg = error_of(tmp_path, GOOD.replace("{name: least_load, label: ll}", "{name: least_load, label: random}"))
    assert "policies.1: duplicate policy 'random'" in msg


def test_unknown_policy_at_build_is_a_registry_error(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, GOOD))
    with pytest.raises(RegistryError, match="unknown policy"):
        sc.build("fastest")


def test_workload_errors(tmp_path: Path) -> None:
    trace = GOOD.replace("kind: poisson\n  rate_rps: 5\n  limit: 20\n  lengths: {prompt_tokens: 64, output_tokens: 8}",
                         "kind: mooncake\n  path: missing.jsonl")
    assert "workload.path: no such file" in error_of(tmp_path, trace)
    weights = GOOD.replace("lengths: {", "origins: {weights: {mars: 1}}\n  lengths: {")
    assert "workload.origins.weights.mars: unknown region" in error_of(tmp_path, weights)
    assert "workload: rate_rps: required" in error_of(tmp_path, GOOD.replace("  rate_rps: 5\n", ""))


def test_regional_mode_builds_one_seeded_policy_per_region(tmp_path: Path) -> None:
    text = GOOD.replace("router: {region: germany}", "router: {mode: regional, sync_period_s: 0.5, recheck_s: 0.05}")
    sc = load_scenario(write(tmp_path, text))
    assert sc.config.router_for("random").mode == "regional"
    inp = sc.build("random")
    assert inp.router_region is None and inp.router.mode == "regional"
    by_region = inp.policies_by_region
    assert by_region is not None and list(by_region) == ["us-west", "germany", "israel"]
    assert len({id(p) for p in by_region.values()}) == 3 and inp.policy is by_region["us-west"]

    class Probe(LeastLoadPolicy):
        def __init__(self, rng: np.random.Generator) -> None:
            self.first_draw = float(rng.random())

    registry = default_registry()
    registry.register("probe", lambda params, rng: Probe(rng))

    def draws(seed: int) -> list[float]:  # the first number of each region's generator
        policies = sc.build("probe", seed=seed, registry=registry).policies_by_region
        assert policies is not None
        return [p.first_draw for p in policies.values()]  # type: ignore[attr-defined]

    assert len(set(draws(3))) == 3  # independent streams
    assert draws(3) == draws(3) and draws(4) != draws(3)  # the same for the same seed only
    sim = sc.simulation("random")
    assert (sim.mode, sim.router_region, sim.sync_period_s, sim.recheck_s, sim.prefix_source) == (
        "regional", None, 0.5, 0.05, "mirror")
    result = sim.run()
    assert result.requests == result.completed == 20


def test_policy_router_override_merges_with_the_scenarios(tmp_path: Path) -> None:
    text = GOOD.replace("router: {region: germany}", "router: {region: germany, recheck_s: 0.05}").replace(
        "  - {name: least_load, label: ll}\n",
        "  - {name: least_load, label: ll}\n"
        "  - {name: least_load, label: ll_regional, router: {mode: regional, sync_period_s: 2}}\n"
        "  - {name: least_load, label: ll_exact, router: {prefix_source: exact}}\n")
    sc = load_scenario(write(tmp_path, text))
    plain, regional, exact = (sc.config.router_for(k) for k in ("ll", "ll_regional", "ll_exact"))
    assert (plain.mode, plain.region, plain.recheck_s, plain.prefix_source) == ("proxy", "germany", 0.05, "mirror")
    # switching to regional drops the proxy's region and keeps the timings given above
    assert (regional.mode, regional.region, regional.sync_period_s, regional.recheck_s) == (
        "regional", None, 2.0, 0.05)
    assert (exact.mode, exact.region, exact.prefix_source) == ("proxy", "germany", "exact")
    assert sc.build("ll_regional").policies_by_region is not None and sc.build("ll").policies_by_region is None
    assert sc.simulation("ll_exact").prefix_source == "exact"
    assert sc.config.router_for("round_robin") == sc.config.router  # not listed: the scenario's block


def test_router_fields_that_do_not_apply_to_the_mode(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("{region: germany}", "{mode: regional, region: germany}"))
    assert "s.yaml:17: router.region: applies to mode: proxy only" in msg
    assert "router.sync_period_s: applies to mode: regional only" in error_of(
        tmp_path, GOOD.replace("{region: germany}", "{region: germany, sync_period_s: 1}"))
    assert "router.recheck_s: Input should be greater than 0" in error_of(
        tmp_path, GOOD.replace("{region: germany}", "{recheck_s: 0}"))
    assert "router.prefix_source: Input should be 'mirror' or 'exact'" in error_of(
        tmp_path, GOOD.replace("{region: germany}", "{prefix_source: guess}"))
    override = GOOD.replace("label: ll}", "label: ll, router: {mode: regional, region: israel}}")
    assert "policies.1.router.region: applies to mode: proxy only" in error_of(tmp_path, override)
    override = GOOD.replace("label: ll}", "label: ll, router: {region: mars}}")
    assert "s.yaml:20: policies.1.router.region: unknown region 'mars'" in error_of(tmp_path, override)
    override = GOOD.replace("label: ll}", "label: ll, router: {colour: red}}")
    assert "policies.1.router.colour: unknown field" in error_of(tmp_path, override)


def test_policy_timings_apply_unless_the_file_gives_them(tmp_path: Path) -> None:
    text = GOOD.replace("router: {region: germany}", "router: {mode: regional}").replace(
        "  - {name: least_load, label: ll}\n",
        "  - {name: gorgo, params: {recheck_s: 0.04, sync_period_s: 3}}\n"
        "  - {name: gorgo, label: g2, params: {recheck_s: 0.04}, router: {recheck_s: 0.1}}\n")
    sc = load_scenario(write(tmp_path, text))
    own = sc.simulation("gorgo")
    assert (own.recheck_s, own.sync_period_s) == (0.04, 3.0)  # the policy's own
    given = sc.simulation("g2")
    assert (given.recheck_s, given.sync_period_s) == (0.1, 1.0)  # the file's, then the policy default
    assert sc.router_setup("gorgo").recheck_s == 0.04
    assert sc.simulation("random").recheck_s == sc.config.router.recheck_s  # a policy without timings


def test_rtt_scale(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, GOOD))
    topo = sc.with_rtt_scale(0.5).config.topology.build()
    assert topo.rtt("us-west", "germany") == pytest.approx(0.1405)
    assert topo.rtt("germany", "germany") == pytest.approx(0.0025) and topo.rtt("israel", "israel") == pytest.approx(0.001)
    assert sc.config.topology.build().rtt("us-west", "germany") == pytest.approx(0.281)
    assert sc.with_rtt_scale(0.0).config.topology.build().rtt_s.max() == 0.0
    with pytest.raises(ConfigError, match="RTT scale"):
        sc.with_rtt_scale(-1.0)


def test_model_that_does_not_fit(tmp_path: Path) -> None:
    text = GOOD.replace("gpu: a100, model: llama-3.1-8b", "gpu: L4, model: Llama-2-7B, gpu_memory_utilization: 0.5")
    assert "replicas.0.model: Llama-2-7B does not fit on L4" in error_of(tmp_path, text)


def test_with_workload_revalidates(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, GOOD))
    smaller = sc.with_workload(limit=5)
    assert isinstance(smaller, Scenario) and len(list(smaller.requests(0))) == 5
    assert sc.config.workload.limit == 20  # the original is untouched
    with pytest.raises(ConfigError, match=r"workload\.limit"):
        sc.with_workload(limit=0)


def test_scenario_config_is_frozen(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, GOOD))
    with pytest.raises(Exception, match="frozen"):
        sc.config.seed = 5
    assert list(itertools.islice(sc.requests(0), 1))


def test_replica_block_size_must_match_the_workload_hashes(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("max_num_seqs: 64", "max_num_seqs: 64, block_size: 32"))
    assert "replicas.1.block_size: 32 differs from workload.block_size (16)" in msg
    ok = GOOD.replace("max_num_seqs: 64", "max_num_seqs: 64, block_size: 32, enable_prefix_caching: false")
    assert load_scenario(write(tmp_path, ok)).config.replicas[1].block_size == 32
