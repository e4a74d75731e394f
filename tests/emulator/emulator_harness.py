"""Real engine doubles for the tests: ``isthmus emulate`` processes on loopback ports."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

ISTHMUS = Path(sys.executable).parent / "isthmus"
READY = re.compile(rb"serving .* on http://127\.0\.0\.1:(\d+)")
KV_BOUND = re.compile(rb"ZMQ PUB bound at (tcp://\S+)")


@dataclass
class Emulator:
    """One running ``isthmus emulate`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def conn(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, bytes]:
        """One request on a fresh connection; a dict/list body is sent as JSON."""
        c = self.conn(timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            c.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body, **kw)
        return status, json.loads(raw) if raw else None

    def metrics(self) -> dict[str, float]:
        """Every sample of ``/metrics`` keyed by name and sorted labels (``engine``/``model_name`` kept)."""
        status, raw = self.request("GET", "/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(raw.decode()):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("engine", "model_name"))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def fault(self, **spec: Any) -> dict[str, Any]:
        status, body = self.post("/admin/fault", spec)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_emulator(log_dir: Path, *args: str, wait_health: bool = True, timeout: float = 20.0) -> Emulator:
    """Start ``isthmus emulate --port 0 ARGS`` and wait until it says where it listens (and, with
    ``wait_health``, until ``/health`` answers)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "emulate.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(ISTHMUS), "emulate", "--port", "0", *args], stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    port = None
    while port is None:
        m = READY.search(log.read_bytes())
        if m:
            port = int(m.group(1))
        elif proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"emulator did not start:\n{log.read_text(errors='replace')}")
        else:
            time.sleep(0.02)
    emu = Emulator(proc, port, log)
    while wait_health:
        try:
            if emu.request("GET", "/health", timeout=1.0)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            emu.stop()
            raise RuntimeError(f"emulator never became healthy:\n{emu.log_text()}")
        time.sleep(0.02)
    return emu


@pytest.fixture(scope="module")
def emulator_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start emulators for a module; each is stopped (SIGTERM) at the module's end."""
    started: list[Emulator] = []

    def make(*args: str, **kw: Any) -> Emulator:
        emu = start_emulator(tmp_path_factory.mktemp("emulate"), *args, **kw)
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


def read_sse(resp: http.client.HTTPResponse) -> Iterator[bytes]:
    """The payloads of ``data:`` events, as they arrive."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data: "):
            yield line[len(b"data: "):]


def open_stream(emu: Emulator, path: str, body: dict[str, Any], timeout: float = 10.0
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    c = emu.conn(timeout)
    c.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
              headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    return c, r


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def make_tokenizer_file(path: Path) -> Path:
    """Train a small byte-level BPE vocabulary on local text and save it as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from isthmus.emulator.filler import FILLER_WORDS

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(FILLER_WORDS)] * 50 + ["Routing requests across regions by latency, queues and caches."] * 20
    tok.train_from_iterator(corpus, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
