"""The sim-to-real check: one scenario, each policy simulated and then measured over real HTTP.

For every policy label, :func:`compare_policy`

1. simulates the scenario (:meth:`isthmus.sim.scenario.Scenario.run`: same seed, same requests,
   same ``limit`` as the measured run), and
2. starts a :class:`~isthmus.bench.testbed.Testbed` for the policy (engine doubles, delay relays,
   routers, all at ``time_scale``), replays the same requests through it with
   :func:`~isthmus.bench.loadgen.run_bench`, and stops it;

then puts the two records side by side (:class:`PolicyComparison`): mean and P99 TTFT, mean TPOT
and throughput, simulated and measured, and the relative error ``(measured - simulated) /
simulated`` of each; when the requests have SLO classes (the scenario's ``slo`` block), also SLO
attainment (overall and per class: the difference ``measured - simulated``, a fraction), goodput
(relative error) and rejected requests (:func:`slo_comparison`). Beside the exact simulation, :func:`simulated_band` reruns it with arrivals
moved by less than 5 ms: on a bursty trace near saturation that spread says how much of a gap the
timing noise of real processes alone can make.

Units. Every latency is in *scenario seconds* (the load generator divides wall times by the time
scale), throughput in completed requests per scenario second. ``time_scale`` is wall seconds per
scenario second (0.25 runs four times faster than real). Errors are fractions (0.05 = 5 %).

While a testbed runs, the CPU time of each of its processes (engines, routers, the relay process)
and of this process (the load generator) is sampled with ``psutil`` and reported as a share of one
core over the run (``cpu``): with several processes on few cores, a time scale too aggressive shows
there first, as engines that cannot keep up with their step deadlines inflate measured latencies.

The JSON document (:meth:`CompareResult.document`; keys may be added, never renamed)::

    {"scenario": str, "seed": int, "limit": int | null, "time_scale": float, "tolerance": float,
     "machine": {"cpus": int, "load_avg_start": [1, 5, 15 min], "load_avg_end": [...]},
     "wall_s": float,
     "policies": [{"policy": str, "mode": "proxy" | "regional",
                   "simulated": {"ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "throughput_rps"},
                   "measured": {same keys},
                   "rel_error": {same keys: float | null},
                   "within_tolerance": bool,    # |rel_error of mean TTFT| <= tolerance
                   "sim_band": {"mean", "sd", "min", "max", "runs", "jitter_s"} | null,   # simulated_band
                   "rel_error_vs_band": float | null,    # mean TTFT, measured against the band's mean
                   "cross_region_share": {"simulated", "measured"},   # served outside the origin region
                   "slo": {"all": SLO, "classes": {name: SLO}},      # only with SLO classes, where
                       # SLO = {"simulated": {"attainment", "goodput_rps", "rejected"}, "measured": {same},
                       #        "attainment_diff": float | null,   # measured - simulated attainment
                       #        "goodput_rel_error": float | null}
                   "requests": int, "completed": int, "errors": int, "timeouts": int,
                   "send_lag_p99_s": float | null (wall), "cpu": {role: share of one core},
                   "wall_s": float, "startup_s": float}],
     "simulated": [result records as in 'isthmus simulate --json'],
     "measured": [result records as in 'isthmus bench --json']}
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.core.errors import ConfigError
from isthmus.sim.report import result_record
from isthmus.sim.scenario import Scenario

DEFAULT_TOLERANCE = 0.10
"""Largest acceptable ``|relative error|`` of mean TTFT."""

FIGURES: tuple[tuple[str, str, str | None], ...] = (
    ("ttft_mean_s", "ttft_s", "mean"),
    ("ttft_p99_s", "ttft_s", "p99"),
    ("tpot_mean_s", "tpot_s", "mean"),
    ("throughput_rps", "throughput_rps", None),
)
"""The compared figures: ``(name, record key, statistic or None for a scalar)``."""

CPU_SAMPLE_S = 0.5
"""How often (wall seconds) the CPU sampler reads the testbed's processes."""

DEFAULT_BAND_RUNS = 8
"""Simulations with jittered arrivals behind the simulated band (0: no band)."""

DEFAULT_BAND_JITTER_S = 0.005
"""Largest arrival jitter of the band's simulations, scenario seconds (uniform in [0, this))."""


def figures(record: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared figures of a result record (``None`` where the record has no finite value)."""
    out: dict[str, float | None] = {}
    for name, key, stat in FIGURES:
        value = record.get(key)
        if stat is not None:
            value = value.get(stat) if isinstance(value, Mapping) else None
        out[name] = float(value) if isinstance(value, int | float) and math.isfinite(float(value)) else None
    return out


SLO_FIGURES: tuple[str, ...] = ("attainment", "goodput_rps", "rejected")
"""The compared SLO figures, keys of a result record's ``slo`` entry (overall and per class)."""


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(float(value)) else None


def _slo_figures(entry: Any) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for key in SLO_FIGURES:
        value = _finite(entry.get(key)) if isinstance(entry, Mapping) else None
        out[key] = int(value) if key == "rejected" and value is not None else value
    return out


def _slo_entry(sim: Any, real: Any) -> dict[str, Any]:
    sim_f, real_f = _slo_figures(sim), _slo_figures(real)
    a, b = real_f["attainment"], sim_f["attainment"]
    return {"simulated": sim_f, "measured": real_f, "attainment_diff": a - b if a is not None and b is not None else None,
            "goodput_rel_error": relative_error(real_f["goodput_rps"], sim_f["goodput_rps"])}


def slo_comparison(simulated: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any] | None:
    """SLO attainment, goodput and rejections of two result records side by side, over all classes
    (``all``) and per class (``classes``, the simulated record's order, then classes only the
    measured one has): ``{"simulated": {figure: value}, "measured": {...}, "attainment_diff":
    measured - simulated attainment (a fraction: 0.05 is 5 points), "goodput_rel_error"}``;
    ``None`` when neither record has an ``slo`` entry."""
    sim, real = simulated.get("slo"), measured.get("slo")
    if not isinstance(sim, Mapping) and not isinstance(real, Mapping):
        return None
    sim_classes = sim.get("classes", {}) if isinstance(sim, Mapping) else {}
    real_classes = real.get("classes", {}) if isinstance(real, Mapping) else {}
    names = [*sim_classes, *(n for n in real_classes if n not in sim_classes)]
    return {"all": _slo_entry(sim, real),
            "classes": {n: _slo_entry(sim_classes.get(n), real_classes.get(n)) for n in names}}


def relative_error(measured: float | None, simulated: float | None) -> float | None:
    """``(measured - simulated) / simulated``; ``None`` when either is missing or ``simulated`` is 0."""
    if measured is None or simulated is None or simulated == 0:
        return None
    return (measured - simulated) / simulated


@dataclass(frozen=True)
class PolicyComparison:
    """One policy, simulated and measured.

    Attributes:
        policy: the policy label.
        mode: ``"proxy"`` or ``"regional"`` (the router set-up both sides ran).
        simulated: the simulator's result record (``isthmus simulate --json`` entry).
        measured: the load generator's result record (``isthmus bench --json`` entry).
        cpu: share of one core used over the measured run, per role (``engine``, ``router``,
            ``relays``, ``loadgen``) and ``total``.
        wall_s: wall seconds of the measured replay (first due time to last answer).
        startup_s: wall seconds the testbed took to become healthy.
        tolerance: largest acceptable ``|relative error|`` of mean TTFT.
        band: :func:`simulated_band` of the policy (``None``: not computed).
    """

    policy: str
    mode: str
    simulated: dict[str, Any]
    measured: dict[str, Any]
    cpu: dict[str, float] = field(default_factory=dict)
    band: dict[str, float] | None = None
    wall_s: float = 0.0
    startup_s: float = 0.0
    tolerance: float = DEFAULT_TOLERANCE

    def errors(self) -> dict[str, float | None]:
        """Relative error of each compared figure (:data:`FIGURES`), measured against simulated."""
        sim, real = figures(self.simulated), figures(self.measured)
        return {k: relative_error(real[k], sim[k]) for k in sim}

    @property
    def within_tolerance(self) -> bool:
        """Mean TTFT within ``tolerance`` of the simulated one."""
        err = self.errors()["ttft_mean_s"]
        return err is not None and abs(err) <= self.tolerance

    def row(self) -> dict[str, Any]:
        """This comparison as an entry of the document's ``policies`` (module docstring)."""
        lag = self.measured.get("send_lag_s") or {}
        lag_p99 = lag.get("p99") if isinstance(lag, Mapping) else None
        row: dict[str, Any] = {
            "policy": self.policy,
            "mode": self.mode,
            "simulated": figures(self.simulated),
            "measured": figures(self.measured),
            "rel_error": self.errors(),
            "within_tolerance": self.within_tolerance,
            "sim_band": dict(self.band) if self.band is not None else None,
            "rel_error_vs_band": (relative_error(figures(self.measured)["ttft_mean_s"], self.band["mean"])
                                  if self.band is not None else None),
            "cross_region_share": {"simulated": self.simulated.get("cross_region_share"),
                                   "measured": self.measured.get("cross_region_share")},
            "requests": int(self.measured.get("requests", 0)),
            "completed": int(self.measured.get("completed", 0)),
            "errors": int(self.measured.get("errors", 0)),
            "timeouts": int(self.measured.get("timeouts", 0)),
            "send_lag_p99_s": lag_p99 if isinstance(lag_p99, int | float) else None,
            "cpu": dict(self.cpu),
            "wall_s": self.wall_s,
            "startup_s": self.startup_s,
        }
        slo = slo_comparison(self.simulated, self.measured)
        if slo is not None:
            row["slo"] = slo
        return row


@dataclass(frozen=True)
class CompareResult:
    """Every policy's comparison, in the order run.

    Attributes:
        scenario: scenario name.
        seed: the seed both sides used.
        limit: the request limit applied to the workload (``None``: the scenario's own).
        time_scale: wall seconds per scenario second of the testbeds and the replays.
        comparisons: one per policy.
        wall_s: wall seconds of the whole comparison (simulations, start-ups, replays, stops).
        load_avg_start, load_avg_end: the machine's 1/5/15-minute load averages before and after.
        tolerance: largest acceptable ``|relative error|`` of mean TTFT.
    """

    scenario: str
    seed: int
    limit: int | None
    time_scale: float
    comparisons: list[PolicyComparison]
    wall_s: float
    load_avg_start: tuple[float, float, float]
    load_avg_end: tuple[float, float, float]
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def all_within_tolerance(self) -> bool:
        return all(c.within_tolerance for c in self.comparisons)

    def document(self) -> dict[str, Any]:
        """The JSON document (module docstring)."""
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "limit": self.limit,
            "time_scale": self.time_scale,
            "tolerance": self.tolerance,
            "machine": {"cpus": os.cpu_count() or 0, "load_avg_start": list(self.load_avg_start),
                        "load_avg_end": list(self.load_avg_end)},
            "wall_s": self.wall_s,
            "policies": [c.row() for c in self.comparisons],
            "simulated": [c.simulated for c in self.comparisons],
            "measured": [c.measured for c in self.comparisons],
        }


# ----------------------------------------------------------------------------------------- simulated band
def simulated_band(sc: Scenario, label: str, seed: int, *, runs: int = DEFAULT_BAND_RUNS,
                   jitter_s: float = DEFAULT_BAND_JITTER_S) -> dict[str, float] | None:
    """How much the simulated mean TTFT moves when arrivals move by less than the testbed's timing noise.

    Trace workloads can be bursty (Mooncake's timestamps put a dozen requests at the same instant);
    the simulator serves a burst in one exact order, the testbed in whatever order its processes
    get them, and a near-saturated system can amplify that into a different mean. This runs the
    simulation ``runs`` times with every arrival delayed by an independent uniform draw in
    ``[0, jitter_s)`` scenario seconds (generator ``numpy.random.default_rng((seed, k))``, re-sorted;
    nothing else changes: the router set-up, held-request order and SLO classes are
    :meth:`~isthmus.sim.scenario.Scenario.simulation`'s) and returns ``{"mean", "sd", "min", "max", "runs", "jitter_s"}`` of the
    runs' mean TTFT, scenario seconds; ``None`` when ``runs`` is 0.
    """
    import numpy as np

    from isthmus.sim.simulator import Simulation

    if runs <= 0:
        return None
    means: list[float] = []
    for k in range(runs):
        inp = sc.build(label, seed)
        rng = np.random.default_rng((seed, k))
        reqs = sorted((dataclasses.replace(r, arrival=r.arrival + float(rng.uniform(0.0, jitter_s)))
                       for r in inp.requests), key=lambda r: r.arrival)
        rc = inp.router
        slo = sc.config.slo
        res = Simulation(inp.topology, inp.instances, inp.policy, iter(reqs), router_region=inp.router_region,
                         mode=rc.mode, policies_by_region=inp.policies_by_region, sync_period_s=rc.sync_period_s,
                         recheck_s=rc.recheck_s, prefix_source=rc.prefix_source,
                         queue_order="edf" if rc.queue == "edf" else "fifo", max_hold_s=rc.max_hold_s,
                         slo_classes=tuple(c.name for c in slo.classes) if slo is not None else ()).run()
        means.append(float(np.mean(res.ttft_s)) if len(res.ttft_s) else math.nan)
    arr = np.asarray(means)
    return {"mean": float(arr.mean()), "sd": float(arr.std()), "min": float(arr.min()), "max": float(arr.max()),
            "runs": float(runs), "jitter_s": float(jitter_s)}


# ----------------------------------------------------------------------------------------- CPU sampling
class _CpuSampler:
    """Samples the CPU seconds of a set of processes (by role) every :data:`CPU_SAMPLE_S` in a thread.

    A process's last reading is kept once it exits, so the totals cover the whole run. Processes are
    read by pid with ``psutil``; nothing is signalled.
    """

    def __init__(self, pids_by_role: Mapping[str, Sequence[int]]) -> None:
        import psutil

        self._procs: list[tuple[str, Any]] = []
        for role, pids in pids_by_role.items():
            for pid in pids:
                try:
                    self._procs.append((role, psutil.Process(pid)))
                except psutil.Error:
                    continue
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="isthmus-compare-cpu", daemon=True)
        self._t0 = time.monotonic()
        self._t1 = self._t0

    def _read(self) -> dict[int, float]:
        import psutil

        out: dict[int, float] = {}
        for _, p in self._procs:
            try:
                t = p.cpu_times()
                out[p.pid] = float(t.user + t.system)
            except psutil.Error:
                continue
        return out

    def _run(self) -> None:
        while not self._stop.wait(CPU_SAMPLE_S):
            self._last.update(self._read())

    def __enter__(self) -> _CpuSampler:
        self._start = self._read()
        self._last = dict(self._start)
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._read())
        self._t1 = time.monotonic()

    def shares(self) -> dict[str, float]:
        """CPU seconds per role over the sampled interval / its wall seconds (1.0 = one core busy)."""
        span = max(self._t1 - self._t0, 1e-9)
        by_role: dict[str, float] = {}
        for role, p in self._procs:
            used = self._last.get(p.pid, 0.0) - self._start.get(p.pid, 0.0)
            by_role[role] = by_role.get(role, 0.0) + max(used, 0.0)
        out = {role: round(used / span, 3) for role, used in by_role.items()}
        out["total"] = round(sum(by_role.values()) / span, 3)
        return out


# ----------------------------------------------------------------------------------------- running
ProgressFn = Callable[[str, int], None]
"""``progress(phase, completed)``: ``phase`` is ``"simulate"``, ``"start"``, ``"measure"`` or
``"stop"``; ``completed`` counts finished requests of that phase (0 for start and stop)."""


def prepare(scenario: Scenario | str | Path, policies: Sequence[str] | None, *, limit: int | None,
            time_scale: float, seed: int | None = None) -> tuple[Scenario, list[str], int]:
    """Load the scenario, apply ``limit``, check every option and policy before anything runs.

    Returns the scenario, the policy labels (default: the scenario's list) and the seed. Raises
    :class:`~isthmus.core.errors.ConfigError` (or ``RegistryError`` for an unknown policy), one line.
    """
    from isthmus.bench.loadgen import prepare_scenario

    if not (isinstance(time_scale, int | float) and math.isfinite(time_scale) and time_scale > 0):
        raise ConfigError(f"time scale must be a number > 0, got {time_scale}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    sc = prepare_scenario(scenario, limit=limit)
    labels = [p.key for p in sc.config.policies] if policies is None else [p for p in policies if p]
    if not labels:
        raise ConfigError("no policy named")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a policy is named twice: {labels}")
    run_seed = sc.config.seed if seed is None else seed
    if run_seed < 0:
        raise ConfigError(f"seed must be >= 0, got {run_seed}")
    for label in labels:
        sc.make_policy(label, run_seed)  # RegistryError for an unknown name or bad parameters
    return sc, labels, run_seed


def compare_policy(sc: Scenario, label: str, *, time_scale: float, seed: int,
                   log_dir: Path | None = None, timeout_s: float | None = None,
                   tolerance: float = DEFAULT_TOLERANCE, band_runs: int = DEFAULT_BAND_RUNS,
                   progress: ProgressFn | None = None) -> PolicyComparison:
    """Simulate ``label`` on ``sc`` (limit already applied), then measure it on a testbed.

    Args:
        sc: the scenario, its workload limit already applied (see :func:`prepare`).
        label: a policy label of the scenario (or a registered policy name).
        time_scale: wall seconds per scenario second for the testbed and the replay.
        seed: the seed of both sides (workload, policies, engines).
        log_dir: where the testbed's logs go (default: a temporary directory, removed afterwards).
        timeout_s: per-request timeout of the replay, scenario seconds (default: 3x the simulated
            makespan, at least 600 s).
        tolerance: largest acceptable ``|relative error|`` of mean TTFT.
        band_runs: simulations with jittered arrivals for :func:`simulated_band` (0: none).
        progress: see :data:`ProgressFn`.

    Raises:
        TestbedError: the testbed did not start (everything it started is stopped first).
    """
    from isthmus.bench.loadgen import run_bench
    from isthmus.bench.testbed import Testbed

    def tell(phase: str, n: int) -> None:
        if progress is not None:
            progress(phase, n)

    sim = sc.run(label, seed, progress=lambda n: tell("simulate", n))
    sim_rec = result_record(label, sim.summary())
    band = simulated_band(sc, label, seed, runs=band_runs)
    if timeout_s is None:
        span = sim_rec["requests"] / sim_rec["throughput_rps"] if sim_rec.get("throughput_rps") else 0.0
        timeout_s = max(600.0, 3.0 * span)
    own_dir = log_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix=f"isthmus-compare-{label}-")) if log_dir is None else log_dir / label
    try:
        tell("start", 0)
        tb = Testbed(sc, label, time_scale=time_scale, log_dir=run_dir, seed=seed)
        with tb:
            manifest = tb.manifest_or_fail()
            pids: dict[str, list[int]] = {"engine": [r["pid"] for r in manifest["replicas"]],
                                          "router": [r["pid"] for r in manifest["routers"]],
                                          "relays": [manifest["relay_pid"]] if manifest.get("relay_pid") else [],
                                          "loadgen": [os.getpid()]}
            from isthmus.bench.loadgen import Manifest

            with _CpuSampler(pids) as cpu:
                result = run_bench(sc, Manifest.from_dict(manifest), time_scale=time_scale, seed=seed, label=label,
                                   timeout_s=timeout_s, progress=lambda n: tell("measure", n))
            tell("stop", 0)
        measured = result.record()
        return PolicyComparison(policy=label, mode=tb.mode, simulated=sim_rec, measured=measured, cpu=cpu.shares(),
                                wall_s=result.wall_s, startup_s=float(manifest.get("startup_s", 0.0)),
                                tolerance=tolerance, band=band)
    finally:
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def run_compare(scenario: Scenario | str | Path, policies: Sequence[str] | None = None, *,
                time_scale: float, limit: int | None = None, seed: int | None = None,
                log_dir: Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
                band_runs: int = DEFAULT_BAND_RUNS, progress: Callable[[str, str, int], None] | None = None,
                on_result: Callable[[PolicyComparison], None] | None = None) -> CompareResult:
    """:func:`compare_policy` for each policy in turn (one testbed at a time).

    Args:
        scenario: a scenario or its YAML path.
        policies: labels to compare (default: the scenario's list).
        time_scale: wall seconds per scenario second (> 0).
        limit: at most this many requests (both sides); ``None`` keeps the scenario's.
        seed: both sides' seed (default: the scenario's).
        log_dir: keep each testbed's logs in ``log_dir/<policy>`` (default: temporary, removed).
        tolerance: largest acceptable ``|relative error|`` of mean TTFT.
        band_runs: simulations with jittered arrivals per policy (:func:`simulated_band`; 0: none).
        progress: ``progress(policy, phase, completed)`` (see :data:`ProgressFn`).
        on_result: called with each policy's comparison as soon as it is done.

    Raises:
        ConfigError, RegistryError: bad scenario, option or policy (before anything runs).
        TestbedError: a testbed did not start.
    """
    t0 = time.monotonic()
    load_start = os.getloadavg()
    sc, labels, run_seed = prepare(scenario, policies, limit=limit, time_scale=time_scale, seed=seed)
    out: list[PolicyComparison] = []
    for label in labels:
        def tell(phase: str, n: int, label: str = label) -> None:
            if progress is not None:
                progress(label, phase, n)

        comp = compare_policy(sc, label, time_scale=time_scale, seed=run_seed, log_dir=log_dir,
                              tolerance=tolerance, band_runs=band_runs, progress=tell)
        out.append(comp)
        if on_result is not None:
            on_result(comp)
    return CompareResult(scenario=sc.name, seed=run_seed, limit=limit, time_scale=float(time_scale), comparisons=out,
                         wall_s=time.monotonic() - t0, load_avg_start=load_start, load_avg_end=os.getloadavg(),
                         tolerance=tolerance)


__all__ = ["DEFAULT_BAND_JITTER_S", "DEFAULT_BAND_RUNS", "DEFAULT_TOLERANCE", "FIGURES", "SLO_FIGURES", "CompareResult",
           "PolicyComparison", "compare_policy", "figures", "prepare", "relative_error", "run_compare",
           "simulated_band", "slo_comparison"]
