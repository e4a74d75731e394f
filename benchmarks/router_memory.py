"""The router's resident memory: with 1,000 concurrent streams and a prefix index of one million
blocks, and over a long soak under steady streaming load.

Targets: (a) the RSS of ``isthmus serve`` stays under ``--limit-mb`` (300 MB) while it holds
``--streams`` (1,000) open streams and a prefix index of ``--blocks`` (1,000,000) blocks; (b) its RSS
is flat over a ``--soak-s`` (600 s) soak: the least-squares slope of the samples of the soak's second
half is under ``--flat-mb-per-min`` (0.5 MB/min, i.e. < 2.5 MB over those five minutes).

Setup, all on loopback: ``--engines`` engine doubles (``isthmus emulate``, step times times
``--time-scale``, ``--max-num-seqs`` each) and one ``isthmus serve`` in front of them with a
prefix-aware policy (``--policy``, default ``gorgo_proxy``, so the router keeps its prefix mirror),
each replica with ``kv_events`` pointing at a ZMQ publisher of this benchmark and ``num_kv_blocks``
set so that the replicas' mirrors hold ``--blocks`` together. The benchmark binds one XPUB socket per
replica (half of them sending vLLM's ``array`` encoding, half ``map``; :mod:`isthmus.kv_events`
encodes) and waits until the router has subscribed to each.

Two routers, one after the other, in front of the same engines and publishers (the engines and
the sockets stay up; each router starts empty):

- router ``hold``: idle, fill, hold: target (a) on a freshly verified index;
- router ``soak``: idle, fill, soak, then hold again (``--no-hold-after-soak`` skips it): target (b)
  on a router whose RSS has not yet been raised by 1,000 streams (CPython keeps freed memory, so a
  soak after the hold would start from that high-water mark and hide tens of MB of growth), and (a)
  once more after the soak.

Phases:

1. idle: RSS once the router is up and subscribed.
2. fill: ``BlockStored`` events for ``--blocks`` distinct block hashes (exactly the mirrors'
   capacity, a quarter per replica with 4 engines), paced at ``--fill-rate`` blocks/s (faster than
   real engines would fill it; the batches have a real shape). Batches look like vLLM's: one per
   engine step, at most 128 blocks (a 2,048-token step budget), made of prompt runs of 4 to 256
   blocks chained by ``parent_block_hash`` (a long prompt spans several steps, as under chunked
   prefill), with their token ids (random, from a 128k vocabulary). With ``--engine-hashes vllm``
   (default: what a real vLLM sends) the blocks are named by the engine's own hashes (splitmix64 of a
   counter, distinct by construction, like vLLM's sha256 names unrelated to the router's hashing),
   so the router translates each run from its token ids and remembers engine name -> its own hash
   until the block is removed; with ``router`` they carry the router's own chained hashes of the
   token ids (what ``isthmus emulate`` sends), and no translation is kept. ``--probes`` prompts per
   replica, spread from the first batch to the last, are real prompt texts: their token ids are the
   router's tokenization of the text. The router exports the mirror's fill per replica
   (``isthmus_router_prefix_blocks``) but no KV-event counters (the subscribers' ``KvEventStats``
   are not exported), so ingestion is checked by behaviour once the router's CPU is back to idle: each
   probe prompt is sent through the router, one at a time, and must be routed to the replica whose
   events announced it (response header ``x-isthmus-target``; the policy's prefix term decides it),
   and the router's log must report no missed batches (sequence gaps) and no malformed messages.
   The first probe of each replica is the oldest entry of its LRU mirror: it is still there only if
   nothing was lost or evicted, i.e. the mirror holds its full capacity.
3. hold: ``--streams`` streamed ``/v1/completions`` requests (distinct prompts, ``--hold-max-tokens``
   output tokens) opened at once through the router by one aiohttp session; once every stream has
   received its first chunk, RSS is sampled every second for ``--hold-s`` while the router's
   ``isthmus_router_requests_in_progress`` gauge, the client's count of open streams and the engines'
   ``vllm:num_requests_running`` say how many are really in flight. Then the streams run to their
   end. Their prompts enter the full mirror, which evicts as many old blocks: it stays at capacity.
4. soak: ``--soak-s`` seconds of open-loop Poisson arrivals at ``--soak-rate`` req/s (prompts of
   200 to 3,000 characters: a quarter start with one of 8 shared system prompts, the rest are
   distinct; 16 to 96 output tokens) while the publishers keep sending ``--soak-kv-rate`` blocks/s of
   new ``BlockStored`` runs and as many ``BlockRemoved`` of their oldest blocks (a full engine
   evicting), so the mirror keeps turning over at its full size. RSS every ``--sample-s``.

The children import ``isthmus`` as this interpreter would: to measure a snapshot of the router
(e.g. a commit while the working tree is being edited), put its ``src`` first on ``PYTHONPATH``;
the JSON records which package directory was used.

Every child runs in a process group of its own and is stopped (SIGTERM, then SIGKILL) on exit,
including Ctrl-C and SIGTERM.

Usage::

    python benchmarks/router_memory.py [--soak-s 600] [--streams 1000] [--blocks 1000000]
        [--json out/router_memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np
import orjson
import psutil
import yaml
import zmq
from _common import free_port, wait_for_url, write_json

from isthmus.core.hashing import ROOT_HASH, hash_token_blocks
from isthmus.core.tokenizer import ByteChunkTokenizer
from isthmus.kv_events import BlockRemoved, BlockStored, KvEvent, encode_batch
from isthmus.router.prompt import parse_request

ISTHMUS = Path(sys.executable).parent / "isthmus"
BLOCK_SIZE = 16
STEP_BLOCKS = 2048 // BLOCK_SIZE  # vLLM's default token budget per step, in blocks
MODEL = "m"
VOCAB = 128_000  # token ids of the synthetic blocks (a Llama-3-sized vocabulary)
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
         "xray", "yankee", "zulu", "router", "memory", "prefix", "block")


# ------------------------------------------------------------------------------------ processes
class Children:
    """Child processes, each in a process group of its own; :meth:`stop_all` ends every group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
        """SIGTERM to ``proc``'s group, SIGKILL after ``timeout_s``."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every group, the latest started first (the router before its engines)."""
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def start_engine(children: Children, log: Path, args: argparse.Namespace) -> str:
    """One engine double on a free port; its base URL once it says where it listens."""
    proc = children.start([str(ISTHMUS), "emulate", "--port", "0", "--model", "Mistral-7B", "--gpu", "A100-80GB",
                           "--served-model-name", MODEL, "--time-scale", str(args.time_scale),
                           "--max-num-seqs", str(args.max_num_seqs), "--shutdown-timeout", "5",
                           "--log-level", "info"], log)
    return wait_for_url(proc, log)


def router_config(port: int, engines: list[str], endpoints: list[str], capacity: list[int],
                  args: argparse.Namespace) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port}, "region": "local", "models": [MODEL],
        "replicas": [{"id": f"r{k}", "url": u, "region": "local", "gpu": "A100-80GB", "model": "Mistral-7B",
                      "num_kv_blocks": capacity[k], "max_in_flight": args.max_num_seqs,
                      "kv_events": {"endpoint": endpoints[k], "encoding": "auto"}}
                     for k, u in enumerate(engines)],
        "policy": {"name": args.policy},
        "limits": {"max_concurrent": max(4096, 2 * args.streams)},
        "timeouts": {"idle_s": 120.0},
        "block_size": BLOCK_SIZE, "drain_s": 5.0, "log_level": "warning",
    }


def start_router(children: Children, workdir: Path, cfg: dict[str, Any]
                 ) -> tuple[subprocess.Popen[bytes], psutil.Process, str]:
    path = workdir / "router.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = workdir / "router.log"
    proc = children.start([str(ISTHMUS), "serve", str(path)], log)
    port = cfg["listen"]["port"]
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, psutil.Process(proc.pid), f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start:\n{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.05)


def rss_mb(proc: psutil.Process) -> float:
    """RSS of ``proc`` and its children, MB (``isthmus serve`` is one process; this is its RSS)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def idle_cpu(proc: psutil.Process, seconds: float = 3.0) -> float:
    """Share of a core ``proc`` uses over ``seconds`` (the router's collectors poll the engines even when idle)."""
    c0 = cpu_s(proc)
    time.sleep(seconds)
    return (cpu_s(proc) - c0) / seconds


def wait_quiet(proc: psutil.Process, timeout_s: float, below: float, window_s: float = 0.5) -> float:
    """Wait until ``proc`` uses less than ``below`` of a core over two consecutive windows; seconds waited."""
    t0 = time.monotonic()
    calm = 0
    while time.monotonic() - t0 < timeout_s and calm < 2:
        c0 = cpu_s(proc)
        time.sleep(window_s)
        calm = calm + 1 if (cpu_s(proc) - c0) / window_s < below else 0
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------ KV events
def splitmix64(counters: np.ndarray) -> list[int]:
    """splitmix64's finaliser of each counter, as signed 64-bit ints: a bijection, so distinct
    counters give distinct block hashes."""
    z = counters.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    out: list[int] = z.view(np.int64).tolist()
    return out


@dataclass
class Probe:
    """A prompt whose router-side block hashes are announced as stored on ``replica``."""

    replica: int
    position: float  # share of the replica's fill published before it
    body: bytes
    hashes: tuple[int, ...]  # the router's
    tokens: tuple[int, ...]
    routed_to: str = ""
    ok: bool = False


@dataclass
class ReplicaFeed:
    """What one replica's publisher announced: runs of block hashes still cached (oldest first)."""

    seq: int = 0
    stored: deque[tuple[int, ...]] = field(default_factory=deque)
    stored_blocks: int = 0
    sent_blocks: int = 0
    removed_blocks: int = 0
    batches: int = 0
    prompt_left: int = 0  # blocks left of the prompt being prefilled
    parent: int | None = None  # the engine's hash of the prompt's last announced block
    parent_router: int = ROOT_HASH  # the router's hash of that block


class KvPublisher:
    """One XPUB socket per replica, bound to 127.0.0.1 on a free port, speaking vLLM's KV-event format.

    ``hashes``: ``vllm`` announces blocks under engine names of their own (as vLLM's sha256 block
    hashes are: here splitmix64 of a counter, distinct by construction), with their token ids, so a
    router that names blocks by its own hashing of the token ids has to translate them; ``router``
    announces the router's own chained hashes of the token ids (as the engine double does). Token ids
    are drawn at random per block from a 128k vocabulary, so every prompt's first block differs.
    """

    def __init__(self, replicas: int, rng: random.Random, hashes: Literal["vllm", "router"]) -> None:
        self.ctx = zmq.Context()
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        self.hashes = hashes
        self.socks: list[zmq.Socket[bytes]] = []
        self.endpoints: list[str] = []
        self.encodings: list[Literal["array", "map"]] = []
        self.feeds = [ReplicaFeed() for _ in range(replicas)]
        self.counter = 0
        for k in range(replicas):
            sock = self.ctx.socket(zmq.XPUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1_000_000)
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, also a second router's
            sock.bind("tcp://127.0.0.1:*")
            self.socks.append(sock)
            self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            self.encodings.append("array" if k % 2 == 0 else "map")

    def wait_subscribed(self, timeout_s: float) -> None:
        """Block until each socket has seen a subscription (the router's SUB connected)."""
        waiting = set(range(len(self.socks)))
        deadline = time.monotonic() + timeout_s
        while waiting:
            for k in list(waiting):
                if self.socks[k].poll(50, zmq.POLLIN):
                    msg = self.socks[k].recv()
                    if msg[:1] == b"\x01":
                        waiting.discard(k)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not subscribe to the KV events of replicas {sorted(waiting)}")

    def reset_feeds(self) -> None:
        """Forget what was announced (for a new subscriber); sequence numbers and hashes go on."""
        for sock in self.socks:  # (un)subscriptions of an earlier router
            while sock.poll(0, zmq.POLLIN):
                sock.recv()
        for f in self.feeds:
            f.stored.clear()
            f.stored_blocks = f.sent_blocks = f.removed_blocks = f.batches = f.prompt_left = 0
            f.parent, f.parent_router = None, ROOT_HASH

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()

    def send(self, k: int, events: list[KvEvent]) -> None:
        feed = self.feeds[k]
        payload = encode_batch(events, time.time(), self.encodings[k])
        self.socks[k].send_multipart([b"", feed.seq.to_bytes(8, "big"), payload])
        feed.seq += 1
        feed.batches += 1

    def _names(self, n: int) -> tuple[int, ...]:
        first = self.counter
        self.counter += n
        return tuple(splitmix64(np.arange(first, first + n, dtype=np.uint64)))

    def synthetic_step(self, k: int, budget: int) -> list[KvEvent]:
        """One engine step's stored runs on replica ``k``: ``budget`` new blocks, continuing the prompt
        being prefilled and starting new ones (4 to 256 blocks each) as the budget allows."""
        feed = self.feeds[k]
        events: list[KvEvent] = []
        while budget > 0:
            if feed.prompt_left == 0:
                feed.prompt_left = min(256, max(4, int(self.rng.lognormvariate(math.log(40), 0.8))))
                feed.parent, feed.parent_router = None, ROOT_HASH
            n = min(budget, feed.prompt_left)
            tokens = tuple(self.np_rng.integers(0, VOCAB, size=n * BLOCK_SIZE).tolist())
            if self.hashes == "router":
                hashes = hash_token_blocks(tokens, BLOCK_SIZE, feed.parent_router)
                feed.parent_router = hashes[-1]
            else:
                hashes = self._names(n)
            events.append(BlockStored(hashes, feed.parent, tokens, BLOCK_SIZE))
            feed.parent = hashes[-1]
            feed.prompt_left -= n
            budget -= n
            feed.stored.append(hashes)
            feed.stored_blocks += n
            feed.sent_blocks += n
        return events

    def evict_oldest(self, k: int, n: int) -> list[KvEvent]:
        """``BlockRemoved`` for the ``n`` oldest blocks still stored on replica ``k``."""
        feed = self.feeds[k]
        out: list[int] = []
        while n > 0 and feed.stored:
            run = feed.stored[0]
            take = min(n, len(run))
            out.extend(run[:take])
            if take == len(run):
                feed.stored.popleft()
            else:
                feed.stored[0] = run[take:]
            n -= take
        feed.stored_blocks -= len(out)
        feed.removed_blocks += len(out)
        return [BlockRemoved(tuple(out))] if out else []

    def probe_event(self, k: int, probe: Probe) -> list[KvEvent]:
        self.feeds[k].sent_blocks += len(probe.hashes)
        names = probe.hashes if self.hashes == "router" else self._names(len(probe.hashes))
        return [BlockStored(names, None, probe.tokens, BLOCK_SIZE)]


def filler(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def make_probes(n_per_replica: int, replicas: int, rng: random.Random, blocks: int = 32) -> list[Probe]:
    """Probe prompts of ``blocks`` full blocks each, at fill positions evenly spread from 0 (the first
    batch) to 1 (the last) per replica."""
    tok = ByteChunkTokenizer()
    chars = blocks * BLOCK_SIZE * tok.chunk_bytes
    probes = []
    for k in range(replicas):
        for j in range(n_per_replica):
            prompt = (f"memory probe {k}.{j}: " + filler(rng, chars))[:chars]
            body = orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": False})
            info = parse_request(body, False, BLOCK_SIZE, tok)
            tokens = tuple(tok.encode(prompt))[:len(info.block_hashes) * BLOCK_SIZE]
            probes.append(Probe(k, j / max(1, n_per_replica - 1), body, info.block_hashes, tokens))
    return probes


def fill(pub: KvPublisher, capacity: list[int], probes: list[Probe], rate: float) -> dict[str, Any]:
    """Announce exactly ``capacity[k]`` distinct blocks on each replica, probes included, at ``rate``
    blocks/s over all replicas; returns what was sent and how long it took."""
    todo = {k: [p for p in probes if p.replica == k] for k in range(len(capacity))}
    synthetic = {k: capacity[k] - sum(len(p.hashes) for p in todo[k]) for k in todo}
    done = dict.fromkeys(todo, 0)
    t0 = time.monotonic()
    sent = 0
    active = [k for k in todo if synthetic[k] > 0 or todo[k]]
    while active:
        for k in list(active):
            events: list[KvEvent] = []
            # probes go out at their position in this replica's fill (the first one in its first batch)
            budget = pub.rng.randint(STEP_BLOCKS // 2, STEP_BLOCKS)
            while todo[k] and todo[k][0].position * synthetic[k] <= done[k]:
                events += pub.probe_event(k, todo[k].pop(0))
                budget -= len(events[-1].block_hashes)  # type: ignore[union-attr]
            n = min(max(1, budget), synthetic[k] - done[k])
            if n > 0:
                events += pub.synthetic_step(k, n)
                done[k] += n
            if events:
                pub.send(k, events)
                sent += sum(len(e.block_hashes) for e in events if isinstance(e, BlockStored))
            if done[k] >= synthetic[k] and not todo[k]:
                active.remove(k)
        ahead = sent / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    return {"blocks": sent, "seconds": time.monotonic() - t0, "batches": sum(f.batches for f in pub.feeds)}


async def soak_kv(pub: KvPublisher, rate: float, stop: asyncio.Event) -> None:
    """Steady KV traffic: per replica and step, new stored runs and as many removals of the oldest blocks."""
    replicas = len(pub.feeds)
    steps_per_s = 10.0  # batches per replica and second
    per_step = rate / replicas / steps_per_s
    t0 = time.monotonic()
    step = 0
    while not stop.is_set():
        for k in range(replicas):
            n = max(1, int(pub.rng.expovariate(1.0 / per_step))) if per_step > 0 else 0
            n = min(n, STEP_BLOCKS)
            if n:
                pub.send(k, pub.evict_oldest(k, n) + pub.synthetic_step(k, n))
        step += 1
        await asyncio.sleep(max(0.0, t0 + step / steps_per_s - time.monotonic()))


# ------------------------------------------------------------------------------------ HTTP side
_IN_PROGRESS = re.compile(rb"^isthmus_router_requests_in_progress (\S+)$", re.M)
_IN_FLIGHT = re.compile(rb"^isthmus_router_in_flight\{[^}]*\} (\S+)$", re.M)
_RUNNING = re.compile(rb"^vllm:num_requests_running(?:\{[^}]*\})? (\S+)$", re.M)
_WAITING = re.compile(rb"^vllm:num_requests_waiting(?:\{[^}]*\})? (\S+)$", re.M)
_REQUESTS = re.compile(rb'^isthmus_router_requests_total\{status="(\d+)"\} (\S+)$', re.M)


async def get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.read()


async def router_gauges(session: aiohttp.ClientSession, router: str) -> dict[str, Any]:
    text = await get(session, f"{router}/metrics")
    m = _IN_PROGRESS.search(text)
    return {"in_progress": float(m.group(1)) if m else math.nan,
            "in_flight": sum(float(v) for v in _IN_FLIGHT.findall(text)),
            "requests": {s.decode(): float(v) for s, v in _REQUESTS.findall(text)}}


async def engine_gauges(session: aiohttp.ClientSession, engines: list[str]) -> tuple[float, float]:
    texts = await asyncio.gather(*(get(session, f"{u}/metrics") for u in engines))
    running = sum(float(v) for t in texts for v in _RUNNING.findall(t))
    waiting = sum(float(v) for t in texts for v in _WAITING.findall(t))
    return running, waiting


async def wait_ready(session: aiohttp.ClientSession, router: str, timeout_s: float) -> None:
    """Until the router answers a small completion (prompt shorter than a block: nothing enters the mirror)."""
    body = {"model": MODEL, "prompt": "ready?", "max_tokens": 1}
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.post(f"{router}/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError("the router does not answer")
        await asyncio.sleep(0.2)


async def check_probes(router: str, probes: list[Probe]) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(p: Probe) -> None:
            async with session.post(f"{router}/v1/completions", data=p.body,
                                    headers={"content-type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=300)) as resp:
                await resp.read()
                p.routed_to = resp.headers.get("x-isthmus-target", f"status {resp.status}")
                p.ok = resp.status == 200 and p.routed_to == f"r{p.replica}"

        # one at a time: a probe still prefilling on its replica would add a queue term as large as
        # the next probe's prefix term there
        for p in probes:
            await one(p)


@dataclass
class Streams:
    """Client-side counts of streamed requests."""

    started: int = 0
    first: int = 0  # got their first chunk
    open: int = 0  # first chunk received, not ended
    done: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    chunks: int = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes, st: Streams) -> None:
    st.started += 1
    got_first = False
    tail = b""
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                st.error(f"status {resp.status}")
                await resp.read()
                return
            async for chunk in resp.content.iter_any():
                st.chunks += 1
                if not got_first:
                    got_first = True
                    st.first += 1
                    st.open += 1
                tail = (tail + chunk)[-64:]
            if b"data: [DONE]" in tail:
                st.ok += 1
            else:
                st.error("no [DONE]")
    except (aiohttp.ClientError, TimeoutError) as exc:
        st.error(type(exc).__name__)
    finally:
        if got_first:
            st.open -= 1
        st.done += 1


def sample_row(t: float, proc: psutil.Process, cpu0: float, **extra: Any) -> dict[str, Any]:
    return {"t_s": round(t, 2), "rss_mb": round(rss_mb(proc), 2), "cpu_s": round(cpu_s(proc) - cpu0, 2), **extra}


async def hold_phase(router: str, engines: list[str], proc: psutil.Process, args: argparse.Namespace,
                     rng: random.Random) -> dict[str, Any]:
    """Open ``--streams`` streams at once, sample while all are open, then let them finish."""
    st = Streams()
    url = f"{router}/v1/completions"
    bodies = [orjson.dumps({"model": MODEL, "prompt": (f"hold {k}: " + filler(rng, args.hold_prompt_chars))[
        :args.hold_prompt_chars], "max_tokens": args.hold_max_tokens, "stream": True}) for k in range(args.streams)]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    samples: list[dict[str, Any]] = []
    cpu0 = cpu_s(proc)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as control:
        tasks = [asyncio.create_task(stream_one(session, url, b, st)) for b in bodies]
        opened_s = math.nan
        window_start = math.inf
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic() - t0
            g = await router_gauges(control, router)
            running, waiting = await engine_gauges(control, engines)
            in_window = now >= window_start
            samples.append(sample_row(now, proc, cpu0, in_progress=g["in_progress"], router_in_flight=g["in_flight"],
                                      client_open=st.open, client_first=st.first, engines_running=running,
                                      engines_waiting=waiting, window=in_window))
            if math.isinf(window_start) and st.first >= args.streams:
                opened_s = now
                window_start = now
            if now >= window_start + args.hold_s:
                break
            if st.done >= args.streams or now > args.ramp_timeout_s + (0 if math.isinf(window_start) else args.hold_s):
                break
        window = [s for s in samples if s["window"]]
        rss_all = [s["rss_mb"] for s in samples]
        await asyncio.gather(*tasks)
    finished_s = time.monotonic() - t0
    await asyncio.sleep(2.0)
    rss_after = rss_mb(proc)
    return {
        "streams": args.streams, "all_open_after_s": opened_s, "finished_after_s": finished_s,
        "window_samples": len(window),
        "rss_mb_max_window": max((s["rss_mb"] for s in window), default=math.nan),
        "rss_mb_mean_window": sum(s["rss_mb"] for s in window) / len(window) if window else math.nan,
        "rss_mb_max_phase": max(rss_all, default=math.nan),
        "rss_mb_after": rss_after,
        "in_progress_min_window": min((s["in_progress"] for s in window), default=math.nan),
        "client_open_min_window": min((s["client_open"] for s in window), default=0),
        "engines_running_min_window": min((s["engines_running"] for s in window), default=math.nan),
        "chunks": st.chunks, "ok": st.ok, "errors": st.errors, "router_cpu_s": cpu_s(proc) - cpu0,
        "samples": samples,
    }


def soak_prompt(rng: random.Random, k: int, systems: list[str]) -> str:
    if rng.random() < 0.25:
        return systems[rng.randrange(len(systems))] + f" user {k}: " + filler(rng, rng.randint(100, 1500))
    return f"request {k}: " + filler(rng, rng.randint(200, 3000))


def slope_mb_per_min(samples: list[dict[str, Any]]) -> float:
    xs = [s["t_s"] / 60.0 for s in samples]
    ys = [s["rss_mb"] for s in samples]
    if len(xs) < 2:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else math.nan


async def soak_phase(router: str, engines: list[str], proc: psutil.Process, pub: KvPublisher,
                     args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    st = Streams()
    url = f"{router}/v1/completions"
    systems = [f"system prompt {j}: " + filler(rng, 1024) for j in range(8)]
    stop = asyncio.Event()
    samples: list[dict[str, Any]] = []
    cpu0 = cpu_s(proc)
    kv0 = sum(f.sent_blocks for f in pub.feeds), sum(f.removed_blocks for f in pub.feeds)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as control:
        tasks: set[asyncio.Task[None]] = set()

        async def arrivals() -> None:
            k = 0
            next_t = 0.0
            while not stop.is_set():
                next_t += rng.expovariate(args.soak_rate)
                delay = t0 + next_t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stop.is_set():
                    return
                body = orjson.dumps({"model": MODEL, "prompt": soak_prompt(rng, k, systems),
                                     "max_tokens": rng.randint(16, 96), "stream": True})
                task = asyncio.create_task(stream_one(session, url, body, st))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1

        workers = [asyncio.create_task(arrivals()), asyncio.create_task(soak_kv(pub, args.soak_kv_rate, stop))]
        next_sample = 0.0
        while True:
            now = time.monotonic() - t0
            if now >= next_sample:
                g = await router_gauges(control, router)
                samples.append(sample_row(now, proc, cpu0, in_progress=g["in_progress"], client_open=st.open,
                                          completed=st.done, errors=sum(st.errors.values()),
                                          kv_blocks_sent=sum(f.sent_blocks for f in pub.feeds) - kv0[0]))
                if args.verbose:
                    s = samples[-1]
                    print(f"  soak t={s['t_s']:7.1f}s rss={s['rss_mb']:7.1f}MB in_progress={s['in_progress']:.0f} "
                          f"done={s['completed']} errors={s['errors']}", flush=True)
                next_sample += args.sample_s
            if now >= args.soak_s:
                break
            await asyncio.sleep(max(0.0, min(next_sample, args.soak_s) - (time.monotonic() - t0)))
        stop.set()
        await asyncio.gather(*workers)
        if tasks:
            await asyncio.wait(set(tasks), timeout=120)
        g = await router_gauges(control, router)
    await asyncio.sleep(2.0)
    end_rss = rss_mb(proc)
    half = [s for s in samples if s["t_s"] >= args.soak_s / 2]
    rss = [s["rss_mb"] for s in samples]
    steps = [(b["rss_mb"] - a["rss_mb"], b["t_s"]) for a, b in itertools.pairwise(samples)]
    jump, jump_t = max(steps, default=(0.0, math.nan))
    return {
        "seconds": args.soak_s, "rate_rps": args.soak_rate, "kv_rate_blocks_s": args.soak_kv_rate,
        "requests": st.done, "ok": st.ok, "errors": st.errors, "chunks": st.chunks,
        "kv_blocks_stored": sum(f.sent_blocks for f in pub.feeds) - kv0[0],
        "kv_blocks_removed": sum(f.removed_blocks for f in pub.feeds) - kv0[1],
        "rss_mb_start": rss[0] if rss else math.nan, "rss_mb_end": rss[-1] if rss else math.nan,
        "rss_mb_max": max(rss, default=math.nan), "rss_mb_min": min(rss, default=math.nan),
        "rss_mb_after_drain": end_rss,
        "rise_mb": rss[-1] - rss[0] if rss else math.nan,
        "largest_step_mb": jump, "largest_step_at_s": jump_t,
        "slope_mb_per_min_second_half": slope_mb_per_min(half),
        "slope_mb_per_min_whole": slope_mb_per_min(samples),
        "router_cpu_s": cpu_s(proc) - cpu0, "router_requests_by_status": g["requests"],
        "samples": samples,
    }


# ------------------------------------------------------------------------------------ main
def router_log_findings(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return {
        "missed_batch_warnings": len(re.findall(r"batches missed", text)),
        "malformed_warnings": len(re.findall(r"malformed KV event|could not be applied", text)),
        "restart_warnings": len(re.findall(r"sequence went back", text)),
        "warnings": len(re.findall(r" WARNING ", text)), "errors": len(re.findall(r" ERROR ", text)),
        "tail": text[-1500:],
    }


def source_info() -> dict[str, Any]:
    """Which isthmus the children run (``PYTHONPATH`` may point at a snapshot) and this checkout's commit."""
    import isthmus

    repo = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(repo)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
    return {"package_dir": str(Path(isthmus.__file__).parent), "checkout_commit": commit,
            "checkout_src_changes": len(dirty.splitlines())}


def start_and_fill(children: Children, workdir: Path, name: str, engines: list[str], pub: KvPublisher,
                   capacity: list[int], args: argparse.Namespace, rng: random.Random
                   ) -> tuple[subprocess.Popen[bytes], psutil.Process, str, dict[str, Any]]:
    """A fresh router subscribed to ``pub``, its index filled to ``capacity`` and checked with probes."""
    workdir = workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    pub.reset_feeds()
    cfg = router_config(free_port(), engines, pub.endpoints, capacity, args)
    popen, proc, router = start_router(children, workdir, cfg)

    async def ready() -> None:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, router, 60)

    asyncio.run(ready())
    pub.wait_subscribed(30)
    time.sleep(1.0)
    idle = idle_cpu(proc)
    phases: dict[str, Any] = {"idle": {"rss_mb": rss_mb(proc), "cpu_share": idle}}
    print(f"[{name}] router up (pid {proc.pid}), subscribed to {args.engines} publishers; idle RSS "
          f"{phases['idle']['rss_mb']:.1f} MB", flush=True)

    probes = make_probes(args.probes, args.engines, rng)
    cpu0 = cpu_s(proc)
    sent = fill(pub, capacity, probes, args.fill_rate)
    sent["drain_wait_s"] = wait_quiet(proc, 120, idle + 0.1)
    sent["router_cpu_s"] = cpu_s(proc) - cpu0
    sent["rss_mb"] = rss_mb(proc)
    asyncio.run(check_probes(router, probes))
    sent["probes"] = [{"replica": f"r{p.replica}", "position": p.position, "blocks": len(p.hashes),
                       "routed_to": p.routed_to, "ok": p.ok} for p in probes]
    sent["probes_ok"] = sum(p.ok for p in probes)
    sent["per_replica_blocks"] = [f.sent_blocks for f in pub.feeds]
    sent["log"] = {k: v for k, v in router_log_findings(workdir / "router.log").items() if k != "tail"}
    sent["verified"] = sent["probes_ok"] == len(probes) and sent["log"]["missed_batch_warnings"] == 0 \
        and sent["log"]["malformed_warnings"] == 0
    time.sleep(1.0)
    sent["rss_mb_after_probes"] = rss_mb(proc)
    sent["bytes_per_block"] = (sent["rss_mb"] - phases["idle"]["rss_mb"]) * 2**20 / max(1, sent["blocks"])
    phases["fill"] = sent
    print(f"[{name}] fill: {sent['blocks']:,} blocks in {sent['batches']:,} batches, {sent['seconds']:.1f} s "
          f"(router CPU {sent['router_cpu_s']:.1f} s); probes routed to their replica: "
          f"{sent['probes_ok']}/{len(probes)}; RSS {sent['rss_mb']:.1f} MB", flush=True)
    return popen, proc, router, phases


def run_hold(router: str, engines: list[str], proc: psutil.Process, args: argparse.Namespace,
             rng: random.Random, name: str) -> dict[str, Any]:
    hold = asyncio.run(hold_phase(router, engines, proc, args, rng))
    print(f"[{name}] hold: {args.streams} streams all open after {hold['all_open_after_s']:.1f} s; over "
          f"{hold['window_samples']} samples: in progress >= {hold['in_progress_min_window']:.0f}, client open >= "
          f"{hold['client_open_min_window']}, engines running >= {hold['engines_running_min_window']:.0f}; "
          f"RSS max {hold['rss_mb_max_window']:.1f} MB; ok {hold['ok']}, errors {hold['errors']}", flush=True)
    return hold


def run(args: argparse.Namespace, workdir: Path, children: Children) -> dict[str, Any]:
    """Router 1: fill, then hold the streams. Router 2 (fresh, so that the soak does not start from
    the streams' high-water mark, which would hide growth): fill, soak, then hold the streams again."""
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "machine": {"cores": psutil.cpu_count(), "python": sys.version.split()[0],
                                          "platform": sys.platform}, "runs": {}}
    report["isthmus_source"] = source_info()
    engines = [start_engine(children, workdir / f"engine{k}.log", args) for k in range(args.engines)]
    capacity = [args.blocks // args.engines + (1 if k < args.blocks % args.engines else 0) for k in range(args.engines)]
    pub = KvPublisher(args.engines, rng, args.engine_hashes)
    try:
        if args.streams > 0:
            popen, proc, router, phases = start_and_fill(children, workdir, "hold", engines, pub, capacity, args, rng)
            phases["hold"] = run_hold(router, engines, proc, args, rng, "hold")
            report["runs"]["hold"] = {"phases": phases, "router_log": router_log_findings(workdir / "hold/router.log")}
            children.stop(popen)
        if args.soak_s > 0:
            popen, proc, router, phases = start_and_fill(children, workdir, "soak", engines, pub, capacity, args, rng)
            phases["soak"] = asyncio.run(soak_phase(router, engines, proc, pub, args, rng))
            s = phases["soak"]
            print(f"[soak] soak: RSS start {s['rss_mb_start']:.1f} MB, end {s['rss_mb_end']:.1f} MB, max "
                  f"{s['rss_mb_max']:.1f} MB, slope (second half) {s['slope_mb_per_min_second_half']:+.3f} MB/min",
                  flush=True)
            if args.streams > 0 and args.hold_after_soak:
                phases["hold"] = run_hold(router, engines, proc, args, rng, "soak")
            report["runs"]["soak"] = {"phases": phases, "router_log": router_log_findings(workdir / "soak/router.log")}
            children.stop(popen)
    finally:
        pub.close()
    return report


def verdicts(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, run in report["runs"].items():
        ph = run["phases"]
        if "hold" in ph:
            h = ph["hold"]
            held = h["in_progress_min_window"] >= args.streams and h["client_open_min_window"] >= args.streams
            key = "a_rss_under_limit" if name == "hold" else "a_rss_under_limit_after_soak"
            out[key] = {"limit_mb": args.limit_mb, "rss_mb": h["rss_mb_max_window"], "streams_held": held,
                        "index_verified": ph["fill"]["verified"],
                        "pass": bool(held and ph["fill"]["verified"] and h["rss_mb_max_window"] < args.limit_mb)}
        if "soak" in ph:
            s = ph["soak"]
            out["b_flat"] = {"limit_mb_per_min": args.flat_mb_per_min, "slope": s["slope_mb_per_min_second_half"],
                             "rise_mb": s["rise_mb"], "largest_step_mb": s["largest_step_mb"],
                             "largest_step_at_s": s["largest_step_at_s"],
                             "pass": bool(abs(s["slope_mb_per_min_second_half"]) < args.flat_mb_per_min)}
    return out


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.engines} engine doubles (time scale {args.time_scale}), policy {args.policy}, "
          f"{report['machine']['cores']} cores shared by everything, Python {report['machine']['python']}")
    for name, run in report["runs"].items():
        ph = run["phases"]
        print(f"\nrouter {name!r}: {'phase':50s} {'RSS':>9s}")
        rows = [("idle, subscribed to the KV events", ph["idle"]["rss_mb"])]
        f = ph["fill"]
        rows.append((f"{f['blocks']:,} blocks in the index ({f['bytes_per_block']:.0f} B/block)", f["rss_mb"]))
        if "soak" in ph:
            s = ph["soak"]
            rows += [(f"soak start ({args.soak_s:g} s at {args.soak_rate:g} req/s)", s["rss_mb_start"]),
                     ("soak max", s["rss_mb_max"]), ("soak end", s["rss_mb_end"])]
        if "hold" in ph:
            h = ph["hold"]
            rows += [(f"{args.streams:,} streams open + index (max of {h['window_samples']} samples)",
                      h["rss_mb_max_window"]), ("after the streams ended", h["rss_mb_after"])]
        for label, v in rows:
            print(f"{'':10s} {label:50s} {v:7.1f}MB")
        if "soak" in ph:
            s = ph["soak"]
            print(f"  soak: {s['requests']} requests, {s['ok']} ok, errors {s['errors']}; KV blocks stored "
                  f"{s['kv_blocks_stored']:,}, removed {s['kv_blocks_removed']:,}; slope over the second half "
                  f"{s['slope_mb_per_min_second_half']:+.3f} MB/min (whole soak {s['slope_mb_per_min_whole']:+.3f}); "
                  f"rise {s['rise_mb']:+.1f} MB, largest step between samples {s['largest_step_mb']:+.1f} MB "
                  f"at {s['largest_step_at_s']:.0f} s")
            step = max(1, len(s["samples"]) // 20)
            print("  RSS over time: " + "  ".join(f"{r['t_s']:.0f}s:{r['rss_mb']:.1f}" for r in s["samples"][::step]))
        lg = run["router_log"]
        print(f"  router log: {lg['missed_batch_warnings']} missed-batch, {lg['malformed_warnings']} malformed, "
              f"{lg['warnings']} warnings, {lg['errors']} errors")
    print()
    for name, v in report["verdicts"].items():
        print(f"{name}: {'PASS' if v['pass'] else 'FAIL'} {json.dumps({k: x for k, x in v.items() if k != 'pass'})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--time-scale", type=float, default=10.0,
                    help="engine step times x this (10: a 250-sequence decode step takes ~0.7 s)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="per engine; also each replica's max_in_flight")
    ap.add_argument("--policy", default="gorgo_proxy", help="a prefix-aware policy (the mirror is kept only then)")
    ap.add_argument("--blocks", type=int, default=1_000_000, help="prefix index size: distinct blocks announced")
    ap.add_argument("--fill-rate", type=float, default=25_000.0, help="blocks/s announced while filling")
    ap.add_argument("--probes", type=int, default=4, help="probe prompts per replica")
    ap.add_argument("--engine-hashes", choices=("vllm", "router"), default="vllm",
                    help="block names in the events: vLLM's own (the router translates them from the token ids) "
                         "or the router's (as the engine double sends)")
    ap.add_argument("--streams", type=int, default=1000, help="concurrent streams held (0: skip)")
    ap.add_argument("--hold-s", type=float, default=30.0, help="seconds of sampling with every stream open")
    ap.add_argument("--hold-max-tokens", type=int, default=120)
    ap.add_argument("--hold-prompt-chars", type=int, default=128)
    ap.add_argument("--ramp-timeout-s", type=float, default=180.0)
    ap.add_argument("--hold-after-soak", action=argparse.BooleanOptionalAction, default=True,
                    help="hold the streams again at the end of the soak (on the soaked router)")
    ap.add_argument("--soak-s", type=float, default=600.0, help="soak length (0: skip)")
    ap.add_argument("--soak-rate", type=float, default=4.0, help="soak arrivals, req/s (open loop)")
    ap.add_argument("--soak-kv-rate", type=float, default=2000.0, help="soak KV blocks stored (and removed) per s")
    ap.add_argument("--sample-s", type=float, default=5.0, help="soak RSS sampling period")
    ap.add_argument("--limit-mb", type=float, default=300.0)
    ap.add_argument("--flat-mb-per-min", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep configs and logs here (default: a temp dir)")
    ap.add_argument("--verbose", action="store_true", help="print every soak sample")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()

    # 1,000 streams need ~2,000 descriptors in the router and ~1,000 here; children inherit the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 16 * args.streams + 1024)) if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    children = Children()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="router-memory-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, workdir, children)
    except KeyboardInterrupt:
        print("interrupted: stopping every child process", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        children.stop_all()
        if tmp is not None:
            tmp.cleanup()
    report["verdicts"] = verdicts(report, args)
    print_report(report, args)
    if args.json is not None:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
