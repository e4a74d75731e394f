import numpy as np
import pytest

from isthmus.core import (
    InstanceSpec,
    PolicyRegistry,
    PrefixIndex,
    RegistryError,
    Request,
    Topology,
    builtin_perf_model,
    expand_coarse_hash_ids,
    hash_token_blocks,
)


def test_hashes_are_chained_and_prefix_consistent():
    a = hash_token_blocks(list(range(40)))
    b = hash_token_blocks([*range(32), 99, 98, 97, 96, 95, 94, 93, 92])
    assert len(a) == 2 and a[:2] == b[:2]
    c = hash_token_blocks([7, *range(1, 40)])
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later hash


def test_coarse_ids_expand_to_full_blocks_only():
    hs = expand_coarse_hash_ids([5, 6], prompt_tokens=512 + 40)
    assert len(hs) == 32 + 2
    other = expand_coarse_hash_ids([5, 7], prompt_tokens=1024)
    assert hs[:32] == other[:32] and hs[32] != other[32]
    assert expand_coarse_hash_ids([5], 512, namespace=1)[0] != hs[0]


def test_topology_mirrors_pairs_and_rejects_missing():
    t = Topology.from_pairs(["a", "b"], {("a", "b"): 100.0}, intra_region_rtt_ms=2.0)
    assert t.rtt("b", "a") == pytest.approx(0.1) and t.one_way("a", "a") == pytest.approx(0.001)
    with pytest.raises(ValueError, match="no RTT"):
        Topology.from_pairs(["a", "b", "c"], {("a", "b"): 1.0})
    with pytest.raises(ValueError):
        Topology(("a",), np.array([[-1.0]]))


def test_request_and_instance_validation():
    with pytest.raises(ValueError, match="prompt_tokens"):
        Request("r", 0.0, "a", 0, (), 1)
    with pytest.raises(ValueError):
        InstanceSpec("i", "a", "A100", "Mistral-7B", max_num_seqs=0)


def test_kv_blocks_match_vllm_on_rtx4090():
    # vLLM 0.19 allocated 2,588 blocks for Llama-3.1-8B on an RTX 4090 at utilization 0.9.
    blocks = builtin_perf_model("RTX4090", "Llama-3.1-8B").num_kv_blocks()
    assert abs(blocks - 2588) / 2588 < 0.01


def test_step_time_grows_with_work():
    pm = builtin_perf_model("A100", "Mistral-7B")
    base = pm.step_time(0, 0.0, 0, 1, 100)
    assert pm.step_time(0, 0.0, 0, 64, 64 * 2000) > base
    assert pm.step_time(2048, 2048 * 1024.0, 1, 0, 0) > pm.step_time(512, 512 * 256.0, 1, 0, 0)


def test_registry_rejects_unknown_and_duplicate():
    reg = PolicyRegistry()
    reg.register("x", lambda params, rng: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(RegistryError, match="already"):
        reg.register("x", lambda params, rng: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(RegistryError, match="unknown policy"):
        reg.create("nope")


def test_prefix_index_lru_mirror():
    idx = PrefixIndex({"r1": 3, "r2": 10})
    idx.record("r1", [1, 2, 3])
    idx.record("r2", [1, 2])
    assert idx.match([1, 2, 3, 4]) == {"r1": 3, "r2": 2}
    idx.record("r1", [9])  # evicts least recently used block 1
    assert idx.match([1, 2]) == {"r2": 2}
