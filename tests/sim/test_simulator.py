import math

import numpy as np
import pytest

from isthmus.core import InstanceSpec, Request, Topology, builtin_perf_model, hash_token_blocks
from isthmus.policies import default_registry
from isthmus.sim import Simulation

TOPO = Topology.from_pairs(["east", "west"], {("east", "west"): 80.0}, intra_region_rtt_ms=2.0)


def _poisson_requests(n, rate, prompt, out, seed=0, regions=("east",), shared=0):
    rng = np.random.default_rng(seed)
    t = 0.0
    for i in range(n):
        t += rng.exponential(1.0 / rate)
        toks = list(range(shared)) + list(range(10_000 + i * prompt, 10_000 + i * prompt + prompt - shared))
        yield Request(f"r{i}", t, regions[i % len(regions)], prompt, hash_token_blocks(toks), out)


def test_md1_waiting_time_matches_closed_form():
    """One replica serving one request at a time with identical jobs is an M/D/1 queue."""
    spec = InstanceSpec("e0", "east", "A100", "Mistral-7B", max_num_seqs=1)
    service = builtin_perf_model("A100", "Mistral-7B").step_time(256, 256 * 128.0, 1, 0, 0)
    rho = 0.7
    reqs = _poisson_requests(20_000, rho / service, 256, 1, seed=11)
    res = Simulation(TOPO, [spec], default_registry().create("least_load"), reqs).run()
    assert res.completed == 20_000
    wq = rho * service / (2 * (1 - rho))  # Pollaczek-Khinchine for deterministic service
    assert res.queue_s.mean() == pytest.approx(wq, rel=0.08)
    # TTFT = queueing + service + one RTT inside the region
    assert res.ttft_s.mean() == pytest.approx(wq + service + 0.002, rel=0.08)


def _cluster():
    return [
        InstanceSpec("east-0", "east", "A100", "Mistral-7B"),
        InstanceSpec("east-1", "east", "H100", "Mistral-7B"),
        InstanceSpec("west-0", "west", "A100", "Mistral-7B"),
    ]


@pytest.mark.parametrize("policy", ["random", "round_robin", "least_load"])
def test_requests_are_conserved_and_runs_repeat_exactly(policy):
    def run():
        reqs = _poisson_requests(600, 12.0, 700, 40, seed=5, regions=("east", "west"), shared=320)
        pol = default_registry().create(policy, rng=np.random.default_rng(9))
        return Simulation(TOPO, _cluster(), pol, reqs).run()

    a, b = run(), run()
    assert a.requests == a.completed == 600
    assert a.summary() == b.summary()
    assert np.array_equal(a.ttft_s, b.ttft_s)
    s = a.summary()
    assert 0 < s["prefix_hit_rate"] < 1
    assert all(math.isfinite(s["ttft_s"][k]) for k in ("mean", "p50", "p90", "p99"))
    assert set(s["per_region"]) == {"east", "west"}


def test_network_delay_is_paid_both_ways():
    spec = [InstanceSpec("w", "west", "A100", "Mistral-7B")]
    reqs = [Request("a", 0.0, "east", 64, (), 1)]
    res = Simulation(TOPO, spec, default_registry().create("least_load"), reqs).run()
    prefill = builtin_perf_model("A100", "Mistral-7B").step_time(64, 64 * 32.0, 1, 0, 0)
    assert res.ttft_s[0] == pytest.approx(0.080 + prefill)
    assert res.summary()["cross_region_share"] == 1.0


def test_a_central_proxy_adds_its_hops():
    spec = [InstanceSpec("e", "east", "A100", "Mistral-7B")]
    reqs = [Request("a", 0.0, "east", 64, (), 1)]
    res = Simulation(TOPO, spec, default_registry().create("least_load"), reqs, router_region="west").run()
    prefill = builtin_perf_model("A100", "Mistral-7B").step_time(64, 64 * 32.0, 1, 0, 0)
    assert res.ttft_s[0] == pytest.approx(2 * 0.080 + prefill)  # east -> west -> east and back


def test_least_load_spreads_and_prefers_nearby_replicas():
    reqs = list(_poisson_requests(300, 30.0, 500, 30, seed=2, regions=("east",)))
    res = Simulation(TOPO, _cluster(), default_registry().create("least_load"), reqs).run()
    served = np.bincount(res.served, minlength=2)
    assert served[0] > served[1] > 0  # mostly east, west only when east is busier


def test_oversized_request_is_rejected_not_lost():
    spec = [InstanceSpec("e", "east", "A100", "Mistral-7B", num_kv_blocks=8)]
    reqs = [Request("big", 0.0, "east", 1000, (), 4), Request("ok", 0.1, "east", 32, (), 4)]
    res = Simulation(TOPO, spec, default_registry().create("least_load"), reqs).run()
    assert res.requests == 2 and res.completed == 1 and res.rejected == 1


def test_requests_from_far_origins_may_reach_the_proxy_out_of_send_order():
    topo = Topology.from_pairs(["near", "far"], {("near", "far"): 300.0}, intra_region_rtt_ms=1.0)
    spec = [InstanceSpec("n0", "near", "A100", "Mistral-7B")]
    reqs = [Request("a", 0.0, "far", 64, (), 2), Request("b", 0.01, "near", 64, (), 2)]
    res = Simulation(topo, spec, default_registry().create("least_load"), reqs, router_region="near").run()
    assert res.completed == 2
    # "b" was sent later but reached the proxy first, so it finished first
    assert res.arrival_s[0] == pytest.approx(0.01)


class ForwardEastToWest:
    """A real policy for tests: the east router forwards everything to the west router; west serves locally."""

    name = "forward_east"

    def __init__(self, forward_twice=False):
        self.seen = []
        self.forward_twice = forward_twice

    def choose(self, request, snapshot):
        from isthmus.core import Decision

        self.seen.append((snapshot.here, snapshot.hops, {k: v.age for k, v in snapshot.instances.items()},
                          dict(snapshot.prefix.match(request.block_hashes))))
        if snapshot.here == "east" and (snapshot.hops == 0 or self.forward_twice):
            return Decision("west", forward=True)
        if snapshot.here == "west" and self.forward_twice:
            return Decision("east", forward=True)
        local = [v for v in snapshot.instances.values() if v.region == snapshot.here]
        return Decision(local[0].id)

    def observe(self, outcome):
        return None


def test_regional_forwarding_pays_the_router_hop_and_counts_it():
    spec = [InstanceSpec("e0", "east", "A100", "Mistral-7B"), InstanceSpec("w0", "west", "A100", "Mistral-7B")]
    reqs = [Request("a", 0.0, "east", 64, (), 1)]
    pol = ForwardEastToWest()
    res = Simulation(TOPO, spec, pol, reqs, mode="regional").run()
    prefill = builtin_perf_model("A100", "Mistral-7B").step_time(64, 64 * 32.0, 1, 0, 0)
    # client -> east router (1 ms) -> west router (40 ms) -> west replica (1 ms), and the same way back
    assert res.ttft_s[0] == pytest.approx(2 * (0.001 + 0.040 + 0.001) + prefill)
    s = res.summary()
    assert s["forwards"] == 1 and s["forward_share"] == 1.0 and res.hops[0] == 1
    assert [(here, hops) for here, hops, _, _ in pol.seen] == [("east", 0), ("west", 1)]


def test_a_second_forward_is_refused():
    spec = [InstanceSpec("e0", "east", "A100", "Mistral-7B"), InstanceSpec("w0", "west", "A100", "Mistral-7B")]
    with pytest.raises(ValueError, match="second time"):
        Simulation(TOPO, spec, ForwardEastToWest(forward_twice=True), [Request("a", 0.0, "east", 64, (), 1)],
                   mode="regional").run()


def test_regional_views_of_peers_are_stale_by_at_most_the_sync_period():
    spec = [InstanceSpec("e0", "east", "A100", "Mistral-7B"), InstanceSpec("w0", "west", "A100", "Mistral-7B")]
    reqs = list(_poisson_requests(200, 20.0, 300, 5, seed=4, regions=("west",)))
    pol = ForwardEastToWest()
    res = Simulation(TOPO, spec, pol, reqs, mode="regional", sync_period_s=0.5).run()
    ages = [ages["e0"] for here, _, ages, _ in pol.seen if here == "west"]
    assert all(0.0 <= a <= 0.5 + 1e-9 for a in ages) and max(ages) > 0.1
    assert all(ages["w0"] == 0.0 for here, _, ages, _ in pol.seen if here == "west")
    assert 0 < res.summary()["mean_staleness_s"] <= 0.5


def test_mirror_prefix_view_knows_what_the_router_sent_and_exact_view_knows_the_cache():
    spec = [InstanceSpec("w0", "west", "A100", "Mistral-7B")]
    toks = list(range(160))
    reqs = [Request("a", 0.0, "west", 160, hash_token_blocks(toks), 1),
            Request("b", 0.0001, "west", 160, hash_token_blocks(toks), 1)]
    for source, expect_b in (("mirror", {"w0": 10}), ("exact", {})):
        pol = ForwardEastToWest()
        Simulation(TOPO, spec, pol, list(reqs), mode="regional", prefix_source=source).run()
        assert pol.seen[0][3] == {}
        # "b" is decided before "a" reached the engine: only the router's own record knows about it
        assert pol.seen[1][3] == expect_b


@pytest.mark.parametrize("policy", ["random", "least_load"])
def test_lower_bound_never_exceeds_the_achieved_ttft(policy):
    reqs = _poisson_requests(400, 15.0, 900, 20, seed=8, regions=("east", "west"), shared=480)
    res = Simulation(TOPO, _cluster(), default_registry().create(policy, rng=np.random.default_rng(1)), reqs).run()
    assert np.all(res.bound_ttft_s <= res.ttft_s + 1e-9)
    s = res.summary()
    assert s["regret"]["mean"] >= 1.0 and s["regret"]["p99"] >= 1.0
