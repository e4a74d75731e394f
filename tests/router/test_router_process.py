"""``isthmus serve`` as a process: bad configs, SIGTERM with streams in flight."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from router_harness import config, replica, router_process
from router_upstream import upstreams


def test_a_bad_config_exits_2_naming_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("region: east\nmodels: [m]\nreplicas:\n  - {url: 'http://h:1', region: east, gpu: B200, "
                    "model: Mistral-7B}\n")
    proc = subprocess.run([sys.executable, "-c", "from isthmus.cli import main; main()", "serve", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}:4: replicas.0.gpu: unknown GPU 'B200'")


def test_sigterm_drains_in_flight_streams_without_truncating_any(tmp_path: Path) -> None:
    with upstreams("a", chunks=10, chunk_interval_s=0.1) as ups, router_process(
            config([replica(ups[0].url)], drain_s=10, log_level="info"), tmp_path) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode()
        conns = []
        for _ in range(5):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
            conns.append(c)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            refused = False
        except OSError:
            refused = True
        bodies = []
        for c in conns:
            r = c.getresponse()
            bodies.append((r.status, r.read()))
            c.close()
        assert proc.wait(10) == 0
        assert refused
        assert all(status == 200 and data.endswith(b"data: [DONE]\n\n") and data.count(b"data: ") == 11
                   for status, data in bodies)
        assert ups[0].completions == 5
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        assert f"isthmus serve: routing on {url}" in log and log.count(" status=200 ") == 5
