"""``isthmus compare SCENARIO.yaml``: each policy simulated, then measured on a testbed over real HTTP.

Exit codes: 0 done (whatever the errors: a gap is a result, reported in the table and the JSON);
2 bad input (scenario, policy, option; one line on stderr, nothing started); 1 a testbed that did
not start or an output file that cannot be written; 130 interrupted (Ctrl-C; every child stopped).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

DEFAULT_TIME_SCALE = 0.5
"""Wall seconds per scenario second by default: twice as fast as real (see docs/results.md for why
not faster on a 2-core machine)."""


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100.0 * v:+.1f} %"


def _s(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


_ROWS: tuple[tuple[str, str, float, int], ...] = (
    ("ttft_mean_s", "TTFT mean s", 1.0, 2),
    ("ttft_p99_s", "TTFT p99 s", 1.0, 2),
    ("tpot_mean_s", "TPOT ms", 1000.0, 1),
    ("throughput_rps", "req/s", 1.0, 3),
)
"""Table rows: ``(figure, label, factor, decimals)``."""


def compare_table(rows: Sequence[dict[str, Any]], *, title: str, tolerance: float) -> Any:
    """Rich table of :meth:`~isthmus.bench.compare.PolicyComparison.row` entries: per policy, simulated
    against measured mean and P99 TTFT (s), mean TPOT (ms) and throughput (req/s) with the relative
    error; the mean-TTFT rows also give the simulated band (mean ± sd over jittered arrivals) and
    the error against its mean. The mean-TTFT error is green within ``tolerance``, red outside. With
    SLO classes, each policy also has its SLO attainment overall and per class (the error is the
    difference in percentage points), its goodput (req/s, relative error) and its rejected
    requests. The caption gives, per policy, the failed requests and the CPU the testbed used (cores)."""
    from rich import box
    from rich.table import Table

    caption = "; ".join(f"{r['policy']}: {r['errors'] + r['timeouts']} failed, CPU {r['cpu'].get('total', 0.0):.2f}"
                        for r in rows)
    t = Table(title=title, title_justify="left", caption=f"sim band: mean ± sd over jittered arrivals. {caption}",
              caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("policy", no_wrap=True)
    t.add_column("figure", no_wrap=True)
    for name in ("sim", "real", "error", "sim band", "vs band"):
        t.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        slo_rows = _slo_rows(r.get("slo"))
        for k, (key, label, factor, digits) in enumerate(_ROWS):
            sim, real, err = r["simulated"][key], r["measured"][key], r["rel_error"][key]
            sim_s = _s(None if sim is None else factor * sim, digits)
            real_s = _s(None if real is None else factor * real, digits)
            err_s = _pct(err)
            band_s = vs_s = ""
            if key == "ttft_mean_s":
                colour = "green" if err is not None and abs(err) <= tolerance else "red"
                err_s = f"[{colour}]{err_s}[/{colour}]"
                band = r.get("sim_band")
                if band:
                    band_s = f"{band['mean']:.2f} ± {band['sd']:.2f}"
                    vs_s = _pct(r.get("rel_error_vs_band"))
            t.add_row(r["policy"] if k == 0 else "", label, sim_s, real_s, err_s, band_s, vs_s,
                      end_section=k == len(_ROWS) - 1 and not slo_rows)
        for k, cells in enumerate(slo_rows):
            t.add_row("", *cells, "", "", end_section=k == len(slo_rows) - 1)
    return t


def _points(v: float | None) -> str:
    return "—" if v is None else f"{100.0 * v:+.1f} pt"


def _share(v: float | None) -> str:
    return "—" if v is None else f"{100.0 * v:.1f} %"


def _slo_rows(slo: Any) -> list[tuple[str, str, str, str]]:
    """``(figure, sim, real, error)`` rows of a comparison row's ``slo`` entry (none without one)."""
    if not isinstance(slo, dict):
        return []
    entries = [("SLO attained", slo["all"])] + [(f"  {name}", e) for name, e in slo.get("classes", {}).items()]
    out = [(label, _share(e["simulated"]["attainment"]), _share(e["measured"]["attainment"]),
            _points(e["attainment_diff"])) for label, e in entries]
    a = slo["all"]
    out.append(("goodput req/s", _s(a["simulated"]["goodput_rps"], 3), _s(a["measured"]["goodput_rps"], 3),
                _pct(a["goodput_rel_error"])))
    out.append(("rejected", _s(a["simulated"]["rejected"], 0), _s(a["measured"]["rejected"], 0), ""))
    return out


def compare(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML), as for 'isthmus simulate'.",
                                             show_default=False)],
    policy: Annotated[str | None, typer.Option(
        help="Comma-separated policy labels (default: the scenario's list).")] = None,
    time_scale: Annotated[float, typer.Option(
        help="Wall seconds per scenario second for the testbeds (0.5: twice as fast as real). Latencies "
             "are reported in scenario seconds.")] = DEFAULT_TIME_SCALE,
    limit: Annotated[int | None, typer.Option(
        min=1, help="At most this many requests, on both sides (default: the scenario's).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of both sides (default: the scenario's).")] = None,
    tolerance: Annotated[float, typer.Option(
        help="Largest acceptable |relative error| of mean TTFT (0.1 = 10 %).")] = 0.10,
    band_runs: Annotated[int, typer.Option(
        min=0, help="Extra simulations per policy with arrivals jittered by < 5 ms, for the simulated band "
                    "(0: none).")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the comparison as JSON.")] = None,
    logs: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Keep each testbed's logs in DIR/<policy> (default: temporary, removed).")] = None,
) -> None:
    """Check the simulator against real HTTP: simulate each policy, then run it on a testbed.

    For each policy: simulate the scenario (same seed, requests and limit), start a testbed for
    the policy ('isthmus testbed': engine doubles, delay relays, routers, at --time-scale), replay
    the same requests through it ('isthmus bench'), stop it. Prints simulated against measured
    mean and P99 TTFT, mean TPOT and throughput per policy with the relative error
    (measured - simulated) / simulated (with SLO classes also SLO attainment per class, goodput and
    rejected requests), and writes them as JSON. The simulated band is the mean
    TTFT's spread over --band-runs simulations whose arrivals moved by less than 5 ms: how much
    of a gap the timing noise of real processes can explain on a bursty trace.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from isthmus.core.errors import IsthmusError

    if not (0.0 < time_scale < float("inf")):
        raise _fail(f"--time-scale must be a number > 0, got {time_scale}")
    if not (0.0 <= tolerance < float("inf")):
        raise _fail(f"--tolerance must be a number >= 0, got {tolerance}")
    labels = None if policy is None else [p.strip() for p in policy.split(",") if p.strip()]
    if labels is not None and not labels:
        raise _fail("--policy: no policy named")
    try:
        import aiohttp  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as exc:
        raise _fail(f"compare needs the 'serve' extra (pip install 'isthmus[serve]'): {exc}") from None

    from isthmus.bench.compare import PolicyComparison, compare_policy, prepare
    from isthmus.bench.loadgen import count_requests
    from isthmus.bench.testbed import TestbedError, sigterm_raises
    from isthmus.sim.report import write_report

    out, err = Console(), Console(stderr=True)
    try:
        sc, names, run_seed = prepare(scenario, labels, limit=limit, time_scale=time_scale, seed=seed)
        total, last = count_requests(sc, run_seed)
    except IsthmusError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot read {exc.filename or scenario}: {exc.strerror or exc}") from None
    err.print(f"{sc.name}: {len(names)} polic{'y' if len(names) == 1 else 'ies'}, {total:,} requests over "
              f"{last:,.1f} s of scenario time ({last * time_scale:,.1f} s of wall time each at time scale "
              f"{time_scale:g})", highlight=False)

    import os
    import time

    t0 = time.monotonic()
    load_start = os.getloadavg()
    results: list[PolicyComparison] = []
    with sigterm_raises():
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=True, disable=not err.is_terminal) as bar:
                for name in names:
                    task = bar.add_task(f"{name}: simulate", total=total)

                    def tell(phase: str, n: int, name: str = name, task: Any = task) -> None:
                        bar.update(task, description=f"{name}: {phase}", completed=n)

                    comp = compare_policy(sc, name, time_scale=time_scale, seed=run_seed,
                                          log_dir=logs, tolerance=tolerance, band_runs=band_runs,
                                          progress=tell)
                    bar.remove_task(task)
                    results.append(comp)
                    e = comp.errors()["ttft_mean_s"]
                    err.print(f"{name}: mean TTFT simulated {_s(figure(comp.simulated))} s, measured "
                              f"{_s(figure(comp.measured))} s ({_pct(e)}); replay {comp.wall_s:.1f} s wall",
                              highlight=False)
        except KeyboardInterrupt:
            raise _fail("interrupted; every testbed stopped, nothing written", EXIT_INTERRUPTED) from None
        except TestbedError as exc:
            raise _fail(str(exc), EXIT_FAILED) from None
        except IsthmusError as exc:
            raise _fail(str(exc)) from None

    from isthmus.bench.compare import CompareResult

    result = CompareResult(scenario=sc.name, seed=run_seed, limit=limit, time_scale=time_scale, comparisons=results,
                           wall_s=time.monotonic() - t0, load_avg_start=load_start, load_avg_end=os.getloadavg(),
                           tolerance=tolerance)
    doc = result.document()
    title = (f"[bold]{sc.name}[/bold]: simulated vs measured over HTTP (scenario seconds; time scale "
             f"{time_scale:g}, {total:,} requests, seed {run_seed})")
    out.print(compare_table(doc["policies"], title=title, tolerance=tolerance))
    ok = sum(1 for c in results if c.within_tolerance)
    err.print(f"{ok} of {len(results)} within {100 * tolerance:g} % on mean TTFT; {result.wall_s:.0f} s wall; "
              f"load average {load_start[0]:.2f} -> {result.load_avg_end[0]:.2f} on {os.cpu_count()} CPUs",
              highlight=False)
    if json_out is not None:
        try:
            write_report(json_out, doc)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise _fail(f"cannot write{where}: {exc.strerror or exc}", EXIT_FAILED) from None
        err.print(f"wrote {json_out}", highlight=False)


def figure(record: dict[str, Any], name: str = "ttft_mean_s") -> float | None:
    """One compared figure of a result record (see :data:`isthmus.bench.compare.FIGURES`)."""
    from isthmus.bench.compare import figures

    return figures(record)[name]
