"""Helpers the benchmark scripts share: free ports, waiting for a child to say where it listens,
versions of packages in other virtual environments."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

# what `isthmus emulate` prints once it listens
ENGINE_READY = re.compile(rb"serving .* on http://127\.0\.0\.1:(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_url(proc: subprocess.Popen[bytes], log: Path, pattern: re.Pattern[bytes] = ENGINE_READY,
                 timeout_s: float = 60.0, what: str = "engine") -> str:
    """``http://127.0.0.1:PORT`` once ``proc``'s ``log`` matches ``pattern`` (group 1: the port).

    Raises:
        RuntimeError: the process exited or said nothing within ``timeout_s`` (with the log's tail).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        m = pattern.search(log.read_bytes())
        if m:
            return f"http://127.0.0.1:{int(m.group(1))}"
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def package_version(python: Path, package: str) -> str:
    """The installed version of ``package`` for the interpreter ``python``, else ``"?"``."""
    done = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def write_json(path: Path, report: object) -> None:
    """Write a benchmark's report as indented JSON (directories created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
