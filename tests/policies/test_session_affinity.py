"""session_affinity: consistent hashing of the session over the replicas."""

from __future__ import annotations

from collections import Counter

from policy_fakes import req, snap, view

from isthmus.policies import HashRing, default_registry
from isthmus.policies.affinity import stable_hash64

SESSIONS = [f"conv-{i}" for i in range(2000)]


def make(**params: object):
    return default_registry().create("session_affinity", params)


def homes(policy, views) -> dict[str, str | None]:
    s = snap(views)
    return {sid: policy.choose(req(session=sid), s).target for sid in SESSIONS}


def test_stable_hash_and_ring_are_pinned_golden_values():
    # BLAKE2b of the UTF-8 bytes: the same in every process, whatever PYTHONHASHSEED is
    assert stable_hash64("conv-1") == 0x99E53292FBF53CB0
    assert HashRing(["a", "b", "c"], 160).owner(stable_hash64("conv-1")) == "b"
    assert HashRing([], 160).owner(1) is None


def test_same_session_same_replica_whatever_the_load():
    vs = [view(f"r{i}", running=i) for i in range(6)]
    pol = make()
    first = pol.choose(req(session="conv-7"), snap(vs)).target
    vs2 = [view(f"r{i}", running=50 - i) for i in range(6)]
    assert pol.choose(req(session="conv-7"), snap(vs2)).target == first
    assert make().choose(req(session="conv-7"), snap(vs2)).target == first  # a fresh object agrees


def test_removing_an_unrelated_replica_moves_only_its_sessions():
    vs = [view(f"r{i}") for i in range(10)]
    pol = make()
    before = homes(pol, vs)
    after = homes(pol, [v for v in vs if v.id != "r3"])
    moved = {sid for sid in SESSIONS if before[sid] != after[sid]}
    assert moved == {sid for sid in SESSIONS if before[sid] == "r3"}
    assert 0.05 * len(SESSIONS) < len(moved) < 0.15 * len(SESSIONS)
    # adding it back restores every session exactly
    assert homes(pol, vs) == before


def test_adding_a_replica_only_takes_sessions_for_itself():
    vs = [view(f"r{i}") for i in range(8)]
    pol = make()
    before = homes(pol, vs)
    after = homes(pol, [*vs, view("new")])
    for sid in SESSIONS:
        assert after[sid] in (before[sid], "new")


def test_unavailable_home_walks_the_ring_and_comes_back():
    vs = [view(f"r{i}") for i in range(5)]
    pol = make()
    home = pol.choose(req(session="conv-42"), snap(vs)).target
    down = [view(v.id, healthy=v.id != home) for v in vs]
    d = pol.choose(req(session="conv-42"), snap(down))
    assert d.target not in (None, home)
    assert "unavailable" in d.reason
    # the next replica on the ring, exactly
    ring = HashRing([v.id for v in vs], 160)
    nxt = next(m for m in ring.walk(stable_hash64("conv-42")) if m != home)
    assert d.target == nxt
    full = [view(v.id, full=v.id == home) for v in vs]
    assert pol.choose(req(session="conv-42"), snap(full)).target == nxt
    assert pol.choose(req(session="conv-42"), snap(vs)).target == home
    assert pol.choose(req(session="conv-42"), snap([view("x", healthy=False)])).target is None


def test_sessions_spread_evenly_and_no_session_means_least_load():
    vs = [view(f"r{i}", running=10 - i) for i in range(10)]
    counts = Counter(homes(make(), vs).values())
    assert len(counts) == 10
    assert all(0.05 * len(SESSIONS) < c < 0.16 * len(SESSIONS) for c in counts.values())
    assert make().choose(req(session=None), snap(vs)).target == "r9"
