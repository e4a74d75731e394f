"""Sweeps: one scenario over a grid of policies x request rates x RTT scales x seeds.

Every cell of the grid is one ordinary, single-threaded and deterministic
:class:`~isthmus.sim.simulator.Simulation` run, so a cell's figures depend on its inputs alone, never
on where or when it ran. Cells run on a process pool (:class:`concurrent.futures.ProcessPoolExecutor`,
``spawn`` start method), in this process when one worker is asked for, or on a Ray cluster when an
address is given (``pip install 'isthmus[ray]'``; :mod:`ray` is imported only then). Results are put
back in grid order whatever order the cells finish in, so the same scenario and grid give a
byte-identical document with any number of workers.

A cell that fails (its policy raises, a worker process dies, ...) does not stop the sweep: its record
carries ``"error"`` instead of figures and the others go on; :attr:`SweepResult.failed` counts them.

The document (``isthmus sweep --json``; keys may be added, never renamed)::

    {"scenario": str,
     "grid": {"policies": [label, ...], "rates_rps": [float, ...], "rtt_scales": [float, ...],
              "seeds": [int, ...], "routers": {label: {"mode", "region", "sync_period_s", ...}}},
     "failed": int,
     "cells": [{"policy": label, "rate_rps": float, "rtt_scale": float, "seed": int,
                ...the run's summary, as one entry of ``isthmus simulate --json``'s results...}
               | {"policy", "rate_rps", "rtt_scale", "seed", "error": str}]}

``cells`` is in grid order: policies in the order given, then rates, RTT scales and seeds, each in the
order given. ``rate_rps`` is the mean offered request rate of the cell, req/s: a rate of the grid
replaces the workload's ``rate_rps`` and resets its ``time_scale`` to 1 (a trace is compressed or
stretched to that mean rate; ``limit`` still counts requests and ``duration_s`` still cuts by time);
with no rates given the workload runs as the scenario says and its offered rate is reported.
``rtt_scale`` multiplies every RTT of the topology, inside regions too (:meth:`Scenario.with_rtt_scale`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from isthmus.core.errors import IsthmusError
from isthmus.core.policy import PolicyRegistry
from isthmus.sim.report import result_record
from isthmus.sim.scenario import Scenario

RegistryFactory = Callable[[], PolicyRegistry]
"""Builds the policy registry a cell draws its policy from (a top-level function: it is pickled)."""

CELL_KEYS: tuple[str, ...] = ("policy", "rate_rps", "rtt_scale", "seed")
"""The coordinates every cell record carries."""

NETWORK_AWARE_POLICIES: frozenset[str] = frozenset({"gorgo", "gorgo_proxy"})
"""Registered policies whose choice weighs the RTT to each replica against its queue and cache
(GORGO's cost). The winner plot compares the best of them with the network-blind baseline."""


class SweepError(IsthmusError):
    """A sweep cannot start: a bad grid, or a backend that is not available."""


@dataclass(frozen=True, slots=True)
class SweepCell:
    """One cell of the grid.

    Attributes:
        index: position in grid order (what results are sorted by).
        policy: policy label, as in the scenario's ``policies`` (or any registered name).
        rate_rps: mean request rate to replay the workload at, req/s; ``None`` keeps the scenario's.
        rtt_scale: factor on every RTT, >= 0.
        seed: workload and policy seed, >= 0.
    """

    index: int
    policy: str
    rate_rps: float | None
    rtt_scale: float
    seed: int


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep; :meth:`cells` is their product in grid order.

    Attributes:
        policies: policy labels, in report order; unique, at least one.
        rates_rps: request rates, req/s, each > 0; ``(None,)`` keeps the scenario's own rate.
        rtt_scales: factors on every RTT, each finite and >= 0.
        seeds: seeds, each >= 0.
    """

    policies: tuple[str, ...]
    rates_rps: tuple[float | None, ...] = (None,)
    rtt_scales: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name, axis in (("policies", self.policies), ("rates", self.rates_rps),
                           ("RTT scales", self.rtt_scales), ("seeds", self.seeds)):
            if not axis:
                raise SweepError(f"a sweep needs at least one value of {name}")
            if len(set(axis)) != len(axis):
                raise SweepError(f"duplicate {name} in {list(axis)}")
        if None in self.rates_rps and len(self.rates_rps) > 1:
            raise SweepError("the scenario's own rate (None) cannot be mixed with explicit rates")
        for r in self.rates_rps:
            if r is not None and not (math.isfinite(r) and r > 0):
                raise SweepError(f"rates must be finite numbers > 0, got {r}")
        for s in self.rtt_scales:
            if not (math.isfinite(s) and s >= 0):
                raise SweepError(f"RTT scales must be finite numbers >= 0, got {s}")
        for seed in self.seeds:
            if seed < 0:
                raise SweepError(f"seeds must be >= 0, got {seed}")

    def cells(self) -> list[SweepCell]:
        """Every cell, in grid order (policy, then rate, RTT scale, seed)."""
        out: list[SweepCell] = []
        for p in self.policies:
            for r in self.rates_rps:
                for s in self.rtt_scales:
                    for seed in self.seeds:
                        out.append(SweepCell(len(out), p, r, s, seed))
        return out


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        scenario: the scenario's name.
        grid: the grid that ran.
        offered_rate_rps: the scenario's own offered rate, req/s (reported for cells with no rate).
        routers: label -> the router set-up that policy ran under (``RouterConfig.model_dump()``).
        records: one record per cell, in grid order (see the module docstring).
    """

    scenario: str
    grid: SweepGrid
    offered_rate_rps: float
    routers: Mapping[str, Mapping[str, Any]]
    records: tuple[dict[str, Any], ...]

    @property
    def failed(self) -> int:
        """Number of cells whose record carries an ``error``."""
        return sum(1 for r in self.records if "error" in r)

    def document(self) -> dict[str, Any]:
        """The JSON document (see the module docstring); write it with :func:`~isthmus.sim.report.write_report`."""
        rates = [self.offered_rate_rps if r is None else r for r in self.grid.rates_rps]
        return {
            "scenario": self.scenario,
            "grid": {
                "policies": list(self.grid.policies),
                "rates_rps": rates,
                "rtt_scales": list(self.grid.rtt_scales),
                "seeds": list(self.grid.seeds),
                "routers": {k: dict(v) for k, v in self.routers.items()},
            },
            "failed": self.failed,
            "cells": [dict(r) for r in self.records],
        }


# ----------------------------------------------------------------------------------------- one cell
def _coordinates(cell: SweepCell, offered_rate_rps: float) -> dict[str, Any]:
    rate = offered_rate_rps if cell.rate_rps is None else cell.rate_rps
    return {"policy": cell.policy, "rate_rps": float(rate), "rtt_scale": float(cell.rtt_scale), "seed": cell.seed}


def failed_record(cell: SweepCell, offered_rate_rps: float, exc: BaseException) -> dict[str, Any]:
    """The record of a cell that raised ``exc``: its coordinates and ``"error": "<Type>: <message>"``."""
    rec = _coordinates(cell, offered_rate_rps)
    rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def cell_scenario(scenario: Scenario, cell: SweepCell) -> Scenario:
    """The scenario one cell runs: the grid's rate (``rate_rps``, ``time_scale`` 1) and RTT scale applied."""
    sc = scenario
    if cell.rate_rps is not None:
        sc = sc.with_workload(rate_rps=cell.rate_rps, time_scale=1.0)
    if cell.rtt_scale != 1.0:
        sc = sc.with_rtt_scale(cell.rtt_scale)
    return sc


def run_cell(scenario: Scenario, cell: SweepCell, offered_rate_rps: float,
             make_registry: RegistryFactory | None = None) -> dict[str, Any]:
    """Run one cell and return its record; never raises an :class:`Exception` (a failure becomes the
    record's ``"error"``).

    Single-threaded and deterministic: the same arguments give the same record, value for value,
    in any process. ``make_registry`` builds the policy registry (default: every built-in policy).
    """
    try:
        registry = make_registry() if make_registry is not None else None
        result = cell_scenario(scenario, cell).run(cell.policy, cell.seed, registry=registry)
        rec = result_record(cell.policy, result.summary())
    except Exception as exc:
        return failed_record(cell, offered_rate_rps, exc)
    rec.update(_coordinates(cell, offered_rate_rps))
    return rec


# ----------------------------------------------------------------------------------------- backends
def default_workers() -> int:
    """Worker processes when none are asked for: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_local(scenario: Scenario, cells: Sequence[SweepCell], offered: float, workers: int,
               make_registry: RegistryFactory | None, on_done: Callable[[dict[str, Any]], None]) -> None:
    if workers <= 1 or len(cells) <= 1:
        for c in cells:
            on_done(run_cell(scenario, c, offered, make_registry))
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(cells)), mp_context=ctx) as pool:
        pending: dict[Future[dict[str, Any]], SweepCell] = {
            pool.submit(run_cell, scenario, c, offered, make_registry): c for c in cells
        }
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f].index):
                    cell = pending.pop(fut)
                    try:
                        rec = fut.result()
                    except Exception as exc:  # the worker died (BrokenProcessPool) or the result did not pickle
                        rec = failed_record(cell, offered, exc)
                    on_done(rec)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _run_ray(address: str, scenario: Scenario, cells: Sequence[SweepCell], offered: float,
             make_registry: RegistryFactory | None, on_done: Callable[[dict[str, Any]], None]) -> None:
    try:
        import ray
    except ImportError:
        raise SweepError("running on Ray needs the ray extra: pip install 'isthmus[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_cell)
        scenario_ref = ray.put(scenario)
        pending = {remote.remote(scenario_ref, c, offered, make_registry): c for c in cells}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cell = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # a worker or node died: the task's error, not the cell's
                    rec = failed_record(cell, offered, exc)
                on_done(rec)
    finally:
        if started:
            ray.shutdown()


def run_sweep(
    scenario: Scenario,
    grid: SweepGrid,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    make_registry: RegistryFactory | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Run every cell of ``grid`` on ``scenario`` and return the records in grid order.

    Args:
        scenario: a loaded scenario; its trace paths must be readable where the cells run.
        grid: the axes; every policy label must resolve to a policy (checked here, before anything
            runs: :class:`~isthmus.core.errors.RegistryError` otherwise).
        workers: local worker processes (default :func:`default_workers`); ``1`` runs the cells
            one after another in this process. Ignored with ``ray_address``.
        ray_address: run the cells as Ray tasks on this cluster (``"auto"``, ``"ray://host:10001"``,
            ``"local"`` for a cluster of this machine alone). Every node needs isthmus installed and
            the scenario's trace file at the same path.
        make_registry: builds the policy registry in the process running a cell (default: every
            built-in policy); must be picklable, i.e. a module-level function.
        on_done: called in this process with each cell's record as it completes (completion order),
            e.g. to advance a progress bar.

    Raises:
        SweepError: ``workers < 1``, or Ray asked for but not installed.
        RegistryError: a policy label that resolves to no policy.
    """
    if workers is not None and workers < 1:
        raise SweepError(f"workers must be >= 1, got {workers}")
    registry = make_registry() if make_registry is not None else None
    for label in grid.policies:  # an unknown policy fails now, not once per cell
        scenario.make_policy(label, scenario.config.seed, registry)
    offered = scenario.offered_rate_rps() if None in grid.rates_rps else math.nan
    cells = grid.cells()
    records: list[dict[str, Any] | None] = [None] * len(cells)

    def done(rec: dict[str, Any]) -> None:
        key = (rec["policy"], rec["rate_rps"], rec["rtt_scale"], rec["seed"])
        records[index[key]] = rec
        if on_done is not None:
            on_done(rec)

    index = {tuple(_coordinates(c, offered)[k] for k in CELL_KEYS): c.index for c in cells}
    if ray_address is not None:
        _run_ray(ray_address, scenario, cells, offered, make_registry, done)
    else:
        _run_local(scenario, cells, offered, workers or default_workers(), make_registry, done)
    missing = [c for c in cells if records[c.index] is None]
    if missing:  # a backend that lost cells without an error: record it rather than drop them
        for c in missing:
            records[c.index] = failed_record(c, offered, RuntimeError("no result came back"))
    routers = {label: scenario.router_setup(label, registry).model_dump() for label in grid.policies}
    return SweepResult(scenario=scenario.name, grid=grid, offered_rate_rps=offered, routers=routers,
                       records=tuple(r for r in records if r is not None))


# ----------------------------------------------------------------------------------------- summaries
@dataclass(frozen=True, slots=True)
class CellStats:
    """The seeds of one (policy, rate, RTT scale) point, averaged.

    Attributes:
        policy, rate_rps, rtt_scale: the point.
        seeds: seeds whose cell succeeded (the figures average over these); 0 means no data.
        failed: seeds whose cell failed.
        ttft_mean_s, ttft_p50_s, ttft_p90_s, ttft_p99_s: mean over seeds of each cell's TTFT
            statistic, seconds (``nan`` without data).
        regret_mean: mean over seeds of ``ttft mean / bound mean`` when the runs report it, else ``nan``.
        cross_region_share: mean over seeds of the share of requests served outside their origin region.
    """

    policy: str
    rate_rps: float
    rtt_scale: float
    seeds: int
    failed: int
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    regret_mean: float
    cross_region_share: float


def _mean(values: Sequence[Any]) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else math.nan


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[CellStats]:
    """Average the records over seeds, one :class:`CellStats` per (policy, rate, RTT scale), in the
    order the points first appear in ``records`` (grid order for a :class:`SweepResult`)."""
    groups: dict[tuple[str, float, float], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["policy"], r["rate_rps"], r["rtt_scale"]), []).append(r)
    out: list[CellStats] = []
    for (policy, rate, scale), recs in groups.items():
        ok = [r for r in recs if "error" not in r]

        def stat(key: str, s: str, ok: list[Mapping[str, Any]] = ok) -> float:
            return _mean([(r.get(key) or {}).get(s) for r in ok])

        out.append(CellStats(
            policy=policy, rate_rps=rate, rtt_scale=scale, seeds=len(ok), failed=len(recs) - len(ok),
            ttft_mean_s=stat("ttft_s", "mean"), ttft_p50_s=stat("ttft_s", "p50"),
            ttft_p90_s=stat("ttft_s", "p90"), ttft_p99_s=stat("ttft_s", "p99"),
            regret_mean=stat("regret", "mean"),
            cross_region_share=_mean([r.get("cross_region_share") for r in ok]),
        ))
    return out


def network_aware_labels(scenario: Scenario, labels: Sequence[str]) -> list[str]:
    """The labels among ``labels`` whose registered policy is in :data:`NETWORK_AWARE_POLICIES`."""
    return [label for label in labels if scenario.policy_config(label).name in NETWORK_AWARE_POLICIES]
