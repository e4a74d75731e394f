"""The time and memory model, the independent feasibility check, and REPETITA topologies."""

from __future__ import annotations

import numpy as np
import pytest
from place_cases import REPO, make_instance

from isthmus.place.model import ModelSpec, Placement, Route, blocks_used, route_cost, sessions_per_client
from isthmus.place.topology import GraphFormatError, all_pairs_shortest, parse_graph
from isthmus.place.verify import check_placement, check_routes, check_solution


def test_session_time_is_the_papers_formula() -> None:
    inst = make_instance([10.0, 10.0], [2.0, 3.0], [10.0, 20.0], [[40.0, 80.0]], blocks=5, cache_gb=0.1,
                         output_tokens=16, token_overhead_ms=5.0)
    placement = Placement(start=[1, 3], count=[3, 3], cache_slots=[10, 10])
    route = Route(0, (0, 1))
    assert blocks_used(placement, route.servers) == [3, 2]
    # T = sum (t^I + k tau^I) + (l - 1) sum (t + k tau); t = rtt + overhead (prompt overhead 0 here)
    prefill = (0.040 + 3 * 0.010) + (0.080 + 2 * 0.020)
    decode = (0.045 + 3 * 0.002) + (0.085 + 2 * 0.003)
    assert route_cost(inst.request_cost(), placement, route) == pytest.approx(prefill + 15 * decode)
    assert route_cost(inst.decode_cost(), placement, route) == pytest.approx(decode)
    assert route_cost(inst.prefill_cost(), placement, route) == pytest.approx(prefill)


def test_cache_size_and_slots() -> None:
    bloom = ModelSpec("BLOOM-176B", 70, 1.32336e9, 14336, 2)
    assert bloom.cache_bytes_per_block(148) == 2 * 14336 * 148 * 2
    inst = make_instance([10.0], [1.0], [1.0], [[0.0]], blocks=4, cache_gb=0.3)
    assert list(inst.cache_slots(np.array([4]))) == [20]  # (10 - 4) / 0.3
    assert list(inst.cache_slots(np.array([10]))) == [0]


def test_sessions_split_by_weight_with_largest_remainder() -> None:
    assert list(sessions_per_client(np.array([0.5, 0.25, 0.25]), 7)) == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert list(sessions_per_client(np.array([1.0]), 3)) == [3]
    assert sessions_per_client(np.array([0.3, 0.3, 0.4]), 10).sum() == 10


def test_instance_rejects_bad_shapes_and_values() -> None:
    good = make_instance([10.0], [1.0], [1.0], [[0.0]], blocks=4, cache_gb=0.3)
    import dataclasses

    with pytest.raises(ValueError, match="one entry per server"):
        dataclasses.replace(good, memory_bytes=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        dataclasses.replace(good, client_rtt_s=np.array([[-1.0]]))
    with pytest.raises(ValueError, match="sum to 1"):
        dataclasses.replace(good, client_weights=np.array([0.5]))


def test_checker_finds_every_kind_of_violation() -> None:
    inst = make_instance([7.0, 7.0, 5.0], [1, 1, 1], [1, 1, 1], [[0, 0, 0]], blocks=6, cache_gb=0.5,
                         max_blocks=[6, 6, 2])
    ok = Placement(start=[1, 4, 3], count=[3, 3, 2], cache_slots=[6, 6, 6])
    assert check_solution(inst, ok, [Route(0, (0, 1)), Route(0, (0, 2, 1))], 2) == []
    problems = check_placement(inst, Placement(start=[1, 5, 3], count=[3, 2, 3], cache_slots=[4, 4, 0]))
    assert problems == ["s2: holds 3 blocks, at most 2 allowed"]
    gap = check_placement(inst, Placement(start=[1, 5, 1], count=[3, 2, 1], cache_slots=[0, 0, 0]))
    assert gap == ["blocks held by no server: 4"]
    memory = check_placement(inst, Placement(start=[1, 4, 3], count=[3, 3, 2], cache_slots=[9, 6, 6]))
    assert memory == ["s0: needs 7.500 GB for 3 blocks and 9 caches, has 7.000 GB"]
    assert check_placement(inst, Placement(start=[1, 6, 3], count=[3, 3, 2], cache_slots=[0, 0, 0]))[0].endswith(
        "outside 1..6")
    # chain rules: start at block 1, no gap, go further, end at L, no repeats, known servers
    bad_routes = [Route(0, (1,)), Route(0, (0, 2)), Route(0, (0, 1, 0)), Route(0, (2, 1)), Route(0, ()),
                  Route(0, (0, 7)), Route(3, (0, 1))]
    msgs = check_routes(inst, ok, bad_routes)
    assert len(msgs) == len(bad_routes)
    assert "cannot continue after block 0" in msgs[0] and "ends at block 4" in msgs[1]
    assert "twice" in msgs[2] and "unknown server 7" in msgs[5] and "unknown client 3" in msgs[6]
    # capacity: 5 sessions through server 0's 3 blocks need 15 caches, it holds 4
    over = check_routes(inst, ok, [Route(0, (0, 1))] * 5)
    assert any("need 15 attention caches" in m for m in over)
    assert check_solution(inst, ok, [Route(0, (0, 1))], 2)[-1] == "1 routes for 2 sessions"


GRAPH = """NODES 4
label x y
0_A 0.0 0.0
1_B 1.0 0.0
2_C 2.0 0.0
3_D 0.0 5.0
EDGES 8
label src dest weight bw delay
edge_0 0 1 1 1000000 1000
edge_1 1 0 1 1000000 1000
edge_2 1 2 1 1000000 2000
edge_3 2 1 1 1000000 2000
edge_4 0 2 1 1000000 5000
edge_5 2 0 1 1000000 5000
edge_6 2 3 1 1000000 500
edge_7 3 2 1 1000000 500
"""


def test_repetita_rtt_is_twice_the_shortest_delay() -> None:
    net = parse_graph(GRAPH)
    assert net.labels == ("0_A", "1_B", "2_C", "3_D")
    # A -> C: via B 1 ms + 2 ms = 3 ms (the direct link is 5 ms); RTT doubles it
    assert net.rtt_s[0, 2] == pytest.approx(0.006)
    assert net.rtt_s[0, 3] == pytest.approx(0.007)
    assert np.allclose(net.rtt_s, net.rtt_s.T) and np.all(np.diag(net.rtt_s) == 0)
    assert net.index("C") == 2 and net.index("3_D") == 3 and net.index("1") == 1
    with pytest.raises(KeyError, match="unknown node 'Z'"):
        net.index("Z")


@pytest.mark.parametrize(("text", "message"), [
    ("", "no 'NODES' section"),
    ("NODES x\n", "expected 'NODES <count>'"),
    ("NODES 1\nlabel x y\n0_A 0\n", "expected 3 columns"),
    ("NODES 1\nlabel x y\n0_A 0 0\n", "no 'EDGES' section"),
    ("NODES 1\nlabel x y\n0_A 0 0\nEDGES 1\nlabel src dest weight bw delay\ne 0 4 1 1 10\n", "outside 0..0"),
    ("NODES 1\nlabel x y\n0_A 0 0\nEDGES 2\nlabel src dest weight bw delay\ne 0 0 1 1 10\n", "1 of 2 edges"),
])
def test_malformed_graphs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(GraphFormatError, match=message):
        parse_graph(text)


def test_bundled_topologies_parse_as_the_paper_reads_them() -> None:
    for name, nodes in (("Abvt", 23), ("Bellcanada", 48), ("GtsCe", 149)):
        net = parse_graph((REPO / "data" / "topology_zoo" / f"{name}.graph").read_text())
        assert len(net.labels) == nodes
        assert np.all(np.isfinite(net.rtt_s)) and np.allclose(net.rtt_s, net.rtt_s.T)
        # shortest paths: the triangle inequality holds everywhere
        assert np.all(net.rtt_s[:, None, :] <= net.rtt_s[:, :, None] + net.rtt_s[None, :, :] + 1e-12)
    abvt = parse_graph((REPO / "data" / "topology_zoo" / "Abvt.graph").read_text())
    # edge_0: Washington (0) - Atlanta (2), 1,457 µs one way; no shorter detour
    assert abvt.rtt_s[0, 2] == pytest.approx(2 * 1457e-6)


def test_floyd_warshall_on_a_line() -> None:
    inf = np.inf
    w = np.array([[0, 1, inf], [1, 0, 2], [inf, 2, 0]])
    assert all_pairs_shortest(w)[0, 2] == 3
