"""A multi-region testbed on one machine, started from a simulator scenario file.

:class:`Testbed` starts, for one scenario and one of its policies:

- one ``isthmus emulate`` process per scenario replica (its GPU and model profiles and engine
  settings, ``--time-scale``, one served model name shared by all);
- the delay relays (:mod:`isthmus.bench.relay`): every connection from a client region to a router,
  from a router to a peer router and from a router to a replica crosses a relay that delays bytes
  by the one-way latency of that pair of regions (``Topology.one_way(a, b)``) times ``time_scale``;
- the routers: in ``proxy`` mode one ``isthmus serve`` in the proxy's region (the policy's router
  set-up, :meth:`~isthmus.sim.scenario.ScenarioConfig.router_for`) reaching every replica through the
  relay (proxy region -> replica region); in ``regional`` mode one router per region that has
  replicas, its own replicas through intra-region relays and every peer router through the relay
  (its region -> the peer's region). ``router="external"`` runs a command of the caller's in place
  of ``isthmus serve`` (proxy mode only), e.g. ``vllm-router``.

Clients in region ``R`` send to ``manifest["entry"][R]`` (through the relay R -> router region: the
region's own router in regional mode, the central proxy in proxy mode) with header
``x-isthmus-origin: R``. In regional mode a region without replicas has no router (a router needs a
replica of its own); its clients enter at the router of the nearest region that has one.

The routers' view matches the scaled network: each router config carries the scenario's RTTs times
``time_scale`` (``regions.rtt_ms``, probes off by default, so policies see exactly the network the
relays make; ``measure_rtt=True`` lets probes through the relays refine it). Router timings given
in modelled seconds (the policy's ``sync_period_s`` and ``recheck_s``) are multiplied by
``time_scale``; engine metrics are scraped every ``min(0.1, max(0.02, 0.1 x time_scale))`` s. The
routers' timeouts (idle, total, held-request wait) and concurrency limit are lifted, as the
simulator has none: a long queue shows as latency, not as 504 / 503 / 429 answers.

SLOs and money. The routers also get what the simulator's policies see of them
(:meth:`Testbed.router_config`): the scenario's SLO classes (``slo``: ``classes``, ``default``,
``by_model``; ``shares`` and ``per_session`` only shape the workload, whose requests name their
class in the ``x-slo-class`` header), each target in milliseconds times ``time_scale`` (the
routers measure wall time); the topology's prices (``regions.gpu_usd_per_hour``,
``egress_usd_per_gb``, ``bytes_per_token``) when it has any; the order of held requests and its
starvation limit (``limits.queue``: the policy's router set-up, resolved as the simulator resolves
it; ``limits.max_hold_s`` times ``time_scale``); and per replica the engine's ``max_num_seqs`` and
``priority: true``: the engine doubles order their waiting queues by the body's ``priority``, so a
decision's priority reaches them as it reaches the simulated engines.

Time: ``time_scale`` is wall seconds per modelled second, as for ``isthmus emulate``: 0.1 runs
engines and network 10x faster than real; a modelled 183 ms RTT becomes 18.3 ms.

Why the relays run in one child process (``python -m isthmus.bench.relay``) rather than in a thread
of the caller: the caller may be a load generator (``isthmus compare``, ``make demo``) whose Python
work would share the interpreter lock with the relays' timers and delay them; a separate process
keeps the injected latencies exact, costs one process, and exits by itself when its parent goes
(its stdin closes). Relays are created before the routers (their ports go into the routers'
configs) and pointed at a router once it has reported its port, so every child can bind port 0:
no port is guessed, so none can be taken by another process in between.

Stopping (:meth:`Testbed.stop`, also on leaving the ``with`` block, on an exception during start and
at interpreter exit): routers first (SIGTERM, they drain briefly), then engines, then relays; any
process group still alive after ``stop_timeout_s`` is killed. Every child runs in its own process
group (so a Ctrl-C at the terminal reaches only this process, which then stops them in order) and
logs to its own file in ``log_dir``. For SIGTERM to clean up too, the caller turns it into an
exception (see :func:`sigterm_raises`, which ``isthmus testbed`` uses).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import http.client
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

import yaml

from isthmus.bench.loadgen import SLO_HEADER
from isthmus.bench.relay import RelayHandle, RelayProcess
from isthmus.configfile import model_name
from isthmus.core.errors import IsthmusError
from isthmus.core.instance import InstanceSpec
from isthmus.sim.scenario import Scenario, load_scenario

ORIGIN_HEADER = "x-isthmus-origin"
"""The header a client sends with its region's name."""

_EMULATOR_READY = re.compile(rb"isthmus emulate: serving .* on http://[^\s:]+:(\d+)")
_ROUTER_READY = re.compile(rb"isthmus serve: routing on http://[^\s:]+:(\d+)")
_HEALTHY_GAUGE = re.compile(r'^isthmus_router_replica_healthy\{([^}]*)\}\s+(\S+)', re.M)

RouterKind = Literal["isthmus", "external"]

_NO_LIMIT_S = 86_400.0
"""Router timeouts (idle, total, held-request wait) on the testbed, wall seconds: none in practice."""


class TestbedError(IsthmusError):
    """The testbed could not start (a child exited, did not become healthy in time, a bad option)."""

    __test__ = False  # not a pytest test class


@dataclass
class _Child:
    """One child process of the testbed."""

    role: str  # "engine", "router", "relays"
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


@dataclass(frozen=True)
class _RouterPlan:
    region: str
    replicas: tuple[InstanceSpec, ...]
    peers: tuple[str, ...]


@dataclass
class _Started:
    children: list[_Child] = field(default_factory=list)
    relays: RelayProcess | None = None


def _python_cli(*args: str) -> list[str]:
    """``python -c 'from isthmus.cli import main; main()' ARGS``: the CLI of this very interpreter."""
    return [sys.executable, "-c", "from isthmus.cli import main; main()", *args]


def _http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Testbed:
    """Emulated engines, delay relays and routers for one scenario and policy (module docstring).

    Args:
        scenario: a loaded :class:`~isthmus.sim.scenario.Scenario` or the path of a scenario file.
        policy: a policy label of the scenario, or any registered policy name (which runs with no
            parameters under the scenario's ``router`` block); default: the scenario's first policy.
        time_scale: wall seconds per modelled second (> 0); scales engine step times, relay
            delays and the routers' modelled timings.
        log_dir: where every child's log, the router configs and the manifest go (created; default:
            a new temporary directory).
        served_model_name: the ``model`` clients send (default: the first replica's model profile).
        jitter_ms: mean exponential jitter added per chunk by every relay, modelled milliseconds.
        seed: seeds the policies, the engines' generated text and the relays' jitter (default: the
            scenario's seed).
        router: ``"isthmus"`` (``isthmus serve``) or ``"external"`` (``router_cmd``, proxy mode only).
        router_cmd: the external router's command line, a template with ``{host}``, ``{port}``
            and ``{workers}`` (space-separated URLs of the relays to the replicas), split with
            :func:`shlex.split` and run without a shell.
        measure_rtt: let the routers probe RTTs (through the relays) and prefer them to the
            configured, scaled topology.
        host: loopback address everything listens on.
        startup_timeout_s: longest wait for the whole testbed to be healthy, seconds.
        stop_timeout_s: longest wait for each group of children to exit on stop before they are
            killed, seconds.

    Raises (from the constructor): :class:`~isthmus.core.errors.ConfigError` for a bad scenario
    file, :class:`~isthmus.core.errors.RegistryError` for an unknown policy,
    :class:`TestbedError` for bad options; (from :meth:`start`) :class:`TestbedError` when a
    child fails to start or become healthy (everything started is stopped first).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, scenario: Scenario | str | Path, policy: str | None = None, *, time_scale: float = 1.0,
                 log_dir: str | Path | None = None, served_model_name: str | None = None, jitter_ms: float = 0.0,
                 seed: int | None = None, router: RouterKind = "isthmus", router_cmd: str | None = None,
                 measure_rtt: bool = False, host: str = "127.0.0.1", startup_timeout_s: float = 60.0,
                 stop_timeout_s: float = 10.0) -> None:
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        cfg = self.scenario.config
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise TestbedError(f"time scale must be a finite number > 0, got {time_scale}")
        if not (math.isfinite(jitter_ms) and jitter_ms >= 0):
            raise TestbedError(f"jitter must be a finite number >= 0, got {jitter_ms}")
        self.policy = policy if policy is not None else cfg.policies[0].key
        self.seed = cfg.seed if seed is None else seed
        self.scenario.make_policy(self.policy, self.seed)  # an unknown policy or bad params fail here
        self.router_setup = self.scenario.router_setup(self.policy)
        self.mode: Literal["proxy", "regional"] = self.router_setup.mode
        self.time_scale = float(time_scale)
        self.jitter_ms = float(jitter_ms)
        self.topology = cfg.topology.build()
        self.regions: tuple[str, ...] = cfg.topology.regions
        self.instances = cfg.instance_specs()
        self.served_model_name = served_model_name or self.instances[0].model
        if router not in ("isthmus", "external"):
            raise TestbedError(f"router must be 'isthmus' or 'external', got {router!r}")
        if router == "external":
            if not router_cmd:
                raise TestbedError("an external router needs its command (router_cmd)")
            if self.mode != "proxy":
                raise TestbedError(f"an external router replaces the central proxy; policy {self.policy!r} runs "
                                   "in regional mode")
            for name in re.findall(r"\{(\w*)\}", router_cmd):
                if name not in ("host", "port", "workers"):
                    raise TestbedError(f"unknown placeholder {{{name}}} in the router command; "
                                       "known: {host}, {port}, {workers}")
        self.router_kind: RouterKind = router
        self.router_cmd = router_cmd
        self.measure_rtt = measure_rtt
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="isthmus-testbed-"))
        self.manifest: dict[str, Any] | None = None
        self._started = _Started()
        self._relay_rows: list[dict[str, Any]] = []
        self._stopped = False
        self._plans = self._plan_routers()
        self._slo_block = self._router_slo()

    # ------------------------------------------------------------------ planning
    def _plan_routers(self) -> list[_RouterPlan]:
        if self.mode == "proxy":
            region = self.router_setup.proxy_region(self.regions)
            assert region is not None
            return [_RouterPlan(region, self.instances, ())]
        with_replicas = [r for r in self.regions if any(i.region == r for i in self.instances)]
        return [_RouterPlan(r, tuple(i for i in self.instances if i.region == r),
                            tuple(p for p in with_replicas if p != r)) for r in with_replicas]

    def _router_slo(self) -> dict[str, Any] | None:
        """The routers' ``slo`` block: the scenario's classes, targets scaled to wall milliseconds, and
        its ``by_model`` entries for the models this testbed serves (under the served model name)."""
        slo = self.scenario.config.slo
        if slo is None:
            return None
        ts = self.time_scale
        classes: list[dict[str, Any]] = []
        for c in slo.classes:
            entry: dict[str, Any] = {"name": c.name}
            for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
                value = getattr(c, key)
                if value is not None:
                    entry[key] = value * ts
            entry["priority"] = c.priority
            classes.append(entry)
        served = self.served_model_name
        models = {served, *(i.model for i in self.instances)}
        by_model: dict[str, str] = {}
        for model, name in slo.by_model.items():
            try:
                canonical = model_name(model)
            except ValueError:
                canonical = model
            if model not in models and canonical not in models:
                continue  # a model no replica of this testbed serves: no request can carry it
            if by_model.setdefault(served, name) != name:
                raise TestbedError(f"slo.by_model maps the models of this testbed to two classes "
                                   f"({by_model[served]!r} and {name!r}); its replicas all serve {served!r}")
        return {"classes": classes, "default": slo.default, "by_model": by_model}

    def entry_router_region(self, client_region: str) -> str:
        """The region of the router a client in ``client_region`` sends to."""
        routers = [p.region for p in self._plans]
        if client_region in routers:
            return client_region
        if self.mode == "proxy":
            return routers[0]
        return min(routers, key=lambda r: (self.topology.rtt(client_region, r), routers.index(r)))

    def one_way_s(self, a: str, b: str) -> float:
        """The relay delay from region ``a`` to region ``b``: scaled one-way latency, wall seconds."""
        return self.topology.one_way(a, b) * self.time_scale

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> dict[str, Any]:
        """Start everything, wait until it is healthy, write ``log_dir/manifest.json`` and return
        the manifest (see :meth:`build_manifest`). On any failure stops what was started and raises."""
        if self.manifest is not None:
            return self.manifest
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.manifest_or_fail()

    def manifest_or_fail(self) -> dict[str, Any]:
        if self.manifest is None:
            raise TestbedError("the testbed is not started")
        return self.manifest

    def _open_log(self, name: str) -> IO[bytes]:
        return (self.log_dir / f"{name}.log").open("wb")

    def _spawn(self, role: str, name: str, argv: Sequence[str]) -> _Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(list(argv), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        child = _Child(role, name, proc, log)
        self._started.children.append(child)
        return child

    def _deadline_left(self, deadline: float, what: str, child: _Child | None = None) -> None:
        if child is not None and not child.alive():
            raise TestbedError(f"{what}: {child.name} exited with status {child.proc.returncode}; "
                               f"its log ({child.log}) ends with:\n{child.tail()}")
        if time.monotonic() > deadline:
            extra = f"; its log ({child.log}) ends with:\n{child.tail()}" if child is not None else ""
            raise TestbedError(f"{what}: not ready after {self.startup_timeout_s} s{extra}")

    def _wait_ports(self, children: Sequence[_Child], pattern: re.Pattern[bytes], deadline: float) -> None:
        for c in children:
            while not c.port:
                m = pattern.search(c.log.read_bytes())
                if m:
                    c.port = int(m.group(1))
                    break
                self._deadline_left(deadline, f"{c.role} {c.name}", c)
                time.sleep(0.02)

    def _wait_health(self, c: _Child, deadline: float, path: str = "/health") -> None:
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = _http_get(self.host, c.port, path)
                if status == 200:
                    return
            self._deadline_left(deadline, f"{c.role} {c.name} ({path})", c)
            time.sleep(0.05)

    def _engine_argv(self, spec: InstanceSpec, k: int) -> list[str]:
        argv = ["emulate", "--host", self.host, "--port", "0", "--model", spec.model, "--gpu", spec.gpu,
                "--served-model-name", self.served_model_name, "--time-scale", repr(self.time_scale),
                "--seed", str(self.seed + k), "--block-size", str(spec.block_size),
                "--max-num-seqs", str(spec.max_num_seqs), "--max-num-batched-tokens", str(spec.max_num_batched_tokens),
                "--gpu-memory-utilization", repr(spec.gpu_memory_utilization), "--shutdown-timeout", "2",
                "--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching",
                "--enable-chunked-prefill" if spec.enable_chunked_prefill else "--no-enable-chunked-prefill"]
        if spec.num_kv_blocks is not None:
            argv += ["--num-gpu-blocks", str(spec.num_kv_blocks)]
        return _python_cli(*argv)

    def _add_relay(self, key: str, src: str, dst: str, upstream: tuple[str, int] | None, k: int) -> RelayHandle:
        relays = self._started.relays
        assert relays is not None
        delay = self.one_way_s(src, dst)
        handle = relays.add(key, delay, upstream=upstream, jitter_s=self.jitter_ms / 1000.0 * self.time_scale,
                            seed=self.seed * 1_000_003 + k, host=self.host)
        self._relay_rows.append({"from": src, "to": dst, "listen": f"{self.host}:{handle.port}",
                                 "upstream": f"{upstream[0]}:{upstream[1]}" if upstream else None,
                                 "one_way_ms": delay * 1000.0, "key": key})
        return handle

    def router_config(self, region: str, replica_urls: Mapping[str, str],
                      peer_urls: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The configuration (as YAML data) of the router in ``region``, as :meth:`start` writes it:
        its replicas reached at ``replica_urls`` (replica id -> URL; the relays in a running testbed)
        and, in regional mode, its peers at ``peer_urls`` (region -> URL). Modelled durations are
        scaled by ``time_scale`` (module docstring).

        Raises:
            TestbedError: ``region`` has no router, or a URL is missing.
        """
        plan = next((p for p in self._plans if p.region == region), None)
        if plan is None:
            raise TestbedError(f"no router in region {region!r}; routers: {[p.region for p in self._plans]}")
        peers = peer_urls or {}
        missing = [i.id for i in plan.replicas if i.id not in replica_urls] + [p for p in plan.peers if p not in peers]
        if missing:
            raise TestbedError(f"router {region}: no URL for {missing}")
        ts = self.time_scale
        rtt_ms: dict[str, dict[str, float]] = {}
        for i, a in enumerate(self.regions):
            for b in self.regions[i:]:
                rtt_ms.setdefault(a, {})[b] = self.topology.rtt(a, b) * 1000.0 * ts
        max_rtt = float(self.topology.rtt_s.max()) * ts
        rs = self.router_setup
        pc = self.scenario.policy_config(self.policy)
        topo = self.scenario.config.topology
        regions: dict[str, Any] = {"rtt_ms": rtt_ms, "intra_region_rtt_ms": topo.intra_region_rtt_ms * ts,
                                   "measure": self.measure_rtt}
        if topo.gpu_usd_per_hour or topo.egress_usd_per_gb:
            regions["gpu_usd_per_hour"] = dict(topo.gpu_usd_per_hour)
            regions["egress_usd_per_gb"] = {a: dict(row) for a, row in (topo.egress_usd_per_gb or {}).items()}
            regions["bytes_per_token"] = topo.bytes_per_token
        data: dict[str, Any] = {
            "listen": {"host": self.host, "port": 0},
            "region": plan.region,
            "mode": self.mode,
            "regions": regions,
            "replicas": [{"url": replica_urls[i.id], "region": i.region, "id": i.id, "gpu": i.gpu, "model": i.model,
                          **({"num_kv_blocks": i.num_kv_blocks} if i.num_kv_blocks else {}),
                          "max_num_seqs": i.max_num_seqs, "priority": True}
                         for i in plan.replicas],
            "policy": {"name": pc.name, "params": dict(pc.params),
                       "seed": self.seed + (self.regions.index(plan.region) if self.mode == "regional" else 0)},
            "models": [self.served_model_name],
            "health": {"probe_period_s": 0.1, "probe_timeout_s": max(1.0, 4.0 * max_rtt)},
            "scrape_period_s": min(0.1, max(0.02, 0.1 * ts)),
            "recheck_s": rs.recheck_s * ts,
            "block_size": plan.replicas[0].block_size,
            "profile_time_scale": ts,  # the engine doubles run their profiles ts times as fast
            "drain_s": 2.0,
            # the simulator has no timeouts or admission limits: a replica queue minutes long
            # (prefix_trie on gorgo_v1) must show as latency, not as 504s and 503s (wall seconds)
            "timeouts": {"idle_s": _NO_LIMIT_S, "total_s": _NO_LIMIT_S},
            "limits": {"queue_wait_s": _NO_LIMIT_S, "max_concurrent": 1 << 20, "queue": rs.queue,
                       "max_hold_s": rs.max_hold_s * ts},
            "log_level": "warning",  # a line per request costs router CPU the other routers do not pay
        }
        if self._slo_block is not None:
            data["slo"] = copy.deepcopy(self._slo_block)
        if self.mode == "regional":
            data["peers"] = [{"region": p, "url": peers[p]} for p in plan.peers]
            data["sync_period_s"] = rs.sync_period_s * ts
        return data

    def _start(self) -> None:
        t_start = time.monotonic()
        deadline = t_start + self.startup_timeout_s
        st = self._started
        relay_log = self._open_log("relays")
        try:
            st.relays = RelayProcess(stderr=relay_log)
        finally:
            relay_log.close()

        # 1. engines, all at once (each prints its port)
        engines = [self._spawn("engine", f"engine-{spec.id}", self._engine_argv(spec, k))
                   for k, spec in enumerate(self.instances)]
        self._wait_ports(engines, _EMULATOR_READY, deadline)
        engine_port = {spec.id: c.port for spec, c in zip(self.instances, engines, strict=True)}

        # 2. relays: router -> replica (upstream known), router -> peer and client -> router (bound later)
        k = 0
        replica_urls: dict[tuple[str, str], str] = {}
        for plan in self._plans:
            for inst in plan.replicas:
                h = self._add_relay(f"{plan.region}->{inst.id}", plan.region, inst.region,
                                    (self.host, engine_port[inst.id]), k)
                replica_urls[(plan.region, inst.id)] = h.url
                k += 1
        peer_urls: dict[tuple[str, str], str] = {}
        late: list[tuple[str, str]] = []  # (relay key, router region it leads to)
        for plan in self._plans:
            for peer in plan.peers:
                key = f"{plan.region}->router:{peer}"
                peer_urls[(plan.region, peer)] = self._add_relay(key, plan.region, peer, None, k).url
                late.append((key, peer))
                k += 1
        entry: dict[str, str] = {}
        for region in self.regions:
            target = self.entry_router_region(region)
            key = f"client:{region}->router:{target}"
            entry[region] = self._add_relay(key, region, target, None, k).url
            late.append((key, target))
            k += 1

        # 3. routers
        routers: dict[str, _Child] = {}
        if self.router_kind == "external":
            plan = self._plans[0]
            port = _free_port(self.host)
            assert self.router_cmd is not None
            cmd = self.router_cmd.format(host=self.host, port=port,
                                         workers=" ".join(replica_urls[(plan.region, i.id)] for i in plan.replicas))
            try:
                argv = shlex.split(cmd)
            except ValueError as exc:
                raise TestbedError(f"bad router command {cmd!r}: {exc}") from None
            try:
                child = self._spawn("router", f"router-{plan.region}", argv)
            except OSError as exc:
                raise TestbedError(f"cannot run the router command {argv[0]!r}: {exc.strerror or exc}") from None
            child.port = port
            routers[plan.region] = child
        else:
            for plan in self._plans:
                path = self.log_dir / f"router-{plan.region}.yaml"
                config = self.router_config(plan.region, {i.id: replica_urls[(plan.region, i.id)] for i in plan.replicas},
                                            {p: peer_urls[(plan.region, p)] for p in plan.peers})
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                routers[plan.region] = self._spawn("router", f"router-{plan.region}", _python_cli("serve", str(path)))
            self._wait_ports(list(routers.values()), _ROUTER_READY, deadline)
        assert st.relays is not None
        for key, region in late:
            st.relays.set_upstream(key, self.host, routers[region].port)
            for row in self._relay_rows:
                if row["key"] == key:
                    row["upstream"] = f"{self.host}:{routers[region].port}"

        # 4. health: engines, routers, then every router sees every replica it should see healthy
        for c in engines:
            self._wait_health(c, deadline)
        if self.router_kind == "external":
            self._wait_external(routers[self._plans[0].region], deadline)
        else:
            for c in routers.values():
                self._wait_health(c, deadline)
            for c in routers.values():
                self._wait_replicas_seen(c, len(self.instances), deadline)
        for region, url in entry.items():  # the client's path, relay included
            port = int(url.rsplit(":", 1)[1])
            probe = _Child("entry", f"entry {region}", routers[self.entry_router_region(region)].proc,
                           routers[self.entry_router_region(region)].log, port)
            if self.router_kind == "external":
                while not _port_open(self.host, port):
                    self._deadline_left(deadline, f"entry {region}", probe)
                    time.sleep(0.05)
            else:
                self._wait_health(probe, deadline)

        self.manifest = self.build_manifest(entry, routers, engines)
        self.manifest["startup_s"] = round(time.monotonic() - t_start, 3)
        self.write_manifest(self.log_dir / "manifest.json")

    def _wait_external(self, c: _Child, deadline: float) -> None:
        """The external router is ready when its port accepts and ``GET /health`` does not fail with
        a 5xx (a router without ``/health`` answers 404: its open port is all we can check)."""
        while True:
            if _port_open(self.host, c.port):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status, _ = _http_get(self.host, c.port, "/health")
                    if status < 500:
                        return
            self._deadline_left(deadline, f"router {c.name}", c)
            time.sleep(0.1)

    def _wait_replicas_seen(self, c: _Child, expected: int, deadline: float) -> None:
        """Until the router's ``isthmus_router_replica_healthy`` gauges show ``expected`` replicas, all
        up (in regional mode the peers' replicas appear once the peers have been polled)."""
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, body = _http_get(self.host, c.port, "/metrics")
                if status == 200:
                    values = [float(v) for _, v in _HEALTHY_GAUGE.findall(body.decode(errors="replace"))]
                    if len(values) >= expected and all(v == 1.0 for v in values):
                        return
            self._deadline_left(deadline, f"router {c.name} (sees every replica healthy)", c)
            time.sleep(0.05)

    def build_manifest(self, entry: dict[str, str], routers: dict[str, _Child],
                       engines: Sequence[_Child]) -> dict[str, Any]:
        """The manifest: ``{"scenario", "policy", "mode", "time_scale", "model", "entry": {region: url},
        "routers": [{"region", "url", "pid"}], "replicas": [{"id", "region", "gpu", "url", "pid"}],
        "relays": [{"from", "to", "listen", "upstream", "one_way_ms"}], "origin_header", "router",
        "slo": {"header", "classes": [name]} | null, "logs", "startup_s"}``; ``slo`` says which
        header names a request's SLO class and which classes the routers know. Replica URLs are the engines' own (no relay: for inspection); clients
        use ``entry``. ``one_way_ms`` is the wall-clock delay the relay adds each way."""
        return {
            "scenario": self.scenario.name,
            "policy": self.policy,
            "mode": self.mode,
            "time_scale": self.time_scale,
            "model": self.served_model_name,
            "entry": dict(entry),
            "origin_header": ORIGIN_HEADER,
            "router": self.router_kind,
            "slo": ({"header": SLO_HEADER, "classes": [c["name"] for c in self._slo_block["classes"]]}
                    if self._slo_block is not None else None),
            "routers": [{"region": r, "url": f"http://{self.host}:{c.port}", "pid": c.pid}
                        for r, c in routers.items()],
            "replicas": [{"id": s.id, "region": s.region, "gpu": s.gpu, "model": s.model,
                          "url": f"http://{self.host}:{c.port}", "pid": c.pid}
                         for s, c in zip(self.instances, engines, strict=True)],
            "relays": [{k: v for k, v in row.items() if k != "key"} for row in self._relay_rows],
            "relay_pid": self._started.relays.pid if self._started.relays is not None else None,
            "logs": str(self.log_dir),
        }

    def write_manifest(self, path: str | Path) -> Path:
        """Write the manifest as JSON to ``path`` (parents created; written whole, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.manifest_or_fail(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def pids(self) -> list[int]:
        """Process ids of every child still running (relay process included)."""
        out = [c.pid for c in self._started.children if c.alive()]
        relays = self._started.relays
        if relays is not None and relays.proc.poll() is None:
            out.append(relays.pid)
        return out

    def failed(self) -> list[str]:
        """Children that have exited while the testbed runs (name and status); empty when all is well."""
        return [f"{c.role} {c.name} (status {c.proc.returncode})" for c in self._started.children if not c.alive()]

    def stop(self) -> None:
        """Stop routers, then engines, then relays; kill what outlives ``stop_timeout_s``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for role in ("router", "engine"):
            group = [c for c in self._started.children if c.role == role]
            _terminate(group, self.stop_timeout_s)
        if self._started.relays is not None:
            self._started.relays.stop(self.stop_timeout_s)


def _signal_group(c: _Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(c.pid, sig)


def _terminate(children: Sequence[_Child], timeout_s: float) -> None:
    """SIGTERM each process group, wait up to ``timeout_s``, then SIGKILL the groups still alive."""
    for c in children:
        if c.alive():
            _signal_group(c, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(max(0.0, deadline - time.monotonic()))
    for c in children:
        _signal_group(c, signal.SIGKILL)  # also reaps grandchildren left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(5)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`KeyboardInterrupt` in the main thread (as Ctrl-C
    does), so ``with Testbed(...)`` blocks unwind and stop their children. Main thread only."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["ORIGIN_HEADER", "SLO_HEADER", "Testbed", "TestbedError", "sigterm_raises"]
