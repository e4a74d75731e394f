"""``isthmus bench SCENARIO.yaml (--testbed MANIFEST | --target URL)``: replay a workload over real HTTP.

Exit codes: 0 done (whatever share of requests failed: failures are results, reported as
``errors`` / ``timeouts``); 2 bad input (scenario, manifest, option, trace; one line on stderr);
1 an output file that cannot be written; 130 interrupted (Ctrl-C) before the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_ERROR = 2
EXIT_IO = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def bench_table(record: Mapping[str, Any]) -> Any:
    """The bench-only figures of a result: failures, rejections, SLO attainment per class, send lag,
    inter-token latency, where requests went."""
    from rich.table import Table

    def ms(v: Any) -> str:
        return "—" if v is None else f"{1000.0 * float(v):,.1f}"

    def pct(v: Any) -> str:
        return "—" if v is None else f"{100.0 * float(v):.1f} %"

    t = Table(title="[bold]bench[/bold]: client side", title_justify="left")
    t.add_column("figure", no_wrap=True)
    t.add_column("value", justify="right")
    t.add_row("errors", f"{record['errors']:,}")
    t.add_row("timeouts", f"{record['timeouts']:,}")
    for kind, n in record.get("error_kinds", {}).items():
        t.add_row(f"  {kind}", f"{n:,}")
    t.add_row("rejected", f"{record.get('rejected', 0):,}")
    for code, n in record.get("rejections", {}).items():
        t.add_row(f"  {code}", f"{n:,}")
    slo = record.get("slo")
    if isinstance(slo, Mapping):
        for name, c in [("all classes", slo), *slo.get("classes", {}).items()]:
            t.add_row(f"SLO {name}: attained of requests",
                      f"{pct(c.get('attainment'))} ({c['attained']:,} of {c['requests']:,}; "
                      f"{c['rejected']:,} rejected, {c['failed']:,} failed)")
            t.add_row(f"SLO {name}: goodput (req/s)", f"{float(c.get('goodput_rps') or 0.0):,.3f}")
    lag = record.get("send_lag_s") or {}
    t.add_row("send lag p50 / p99 / max (wall ms)",
              f"{ms(lag.get('p50'))} / {ms(lag.get('p99'))} / {ms(lag.get('max'))}")
    itl = record.get("itl_s") or {}
    t.add_row("inter-token p50 / p99 (ms)", f"{ms(itl.get('p50'))} / {ms(itl.get('p99'))}")
    t.add_row("output tokens/s", f"{record['output_tokens_per_s']:,.1f}")
    completed = max(int(record["completed"]), 1)
    for region, n in record.get("served_regions", {}).items():
        t.add_row(f"served in {region}", f"{n:,} ({100.0 * n / completed:.1f} %)")
    t.add_row("time scale (wall s per scenario s)", f"{record['time_scale']:g}")
    t.add_row("wall time (s)", f"{record['wall_s']:.2f}")
    return t


def bench(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML): the workload and its origins.",
                                             show_default=False)],
    testbed: Annotated[Path | None, typer.Option(
        metavar="MANIFEST", help="Testbed manifest (JSON, from 'isthmus testbed'): each origin region's entry URL, "
                                 "the model, the time scale.")] = None,
    target: Annotated[str | None, typer.Option(
        metavar="URL", help="Send every request here instead (a router or an engine, e.g. http://127.0.0.1:8000).")] = None,
    model: Annotated[str | None, typer.Option(
        help="The 'model' field (default: the manifest's; with --target, left out).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many requests.")] = None,
    rate: Annotated[float | None, typer.Option(
        help="Mean request rate, req/s (scenario time): replaces the workload's rate_rps.")] = None,
    time_scale: Annotated[float | None, typer.Option(
        help="Wall seconds per scenario second (0.1: replay 10x faster; latencies are reported in scenario "
             "seconds). Default: the manifest's, else 1.")] = None,
    timeout_s: Annotated[float, typer.Option(
        "--timeout-s", help="Per-request limit, scenario seconds, send to end of stream.")] = 600.0,
    seed: Annotated[int | None, typer.Option(min=0, help="Workload seed (default: the scenario's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(metavar="FILE.png", help="Write the TTFT CDF.")] = None,
) -> None:
    """Replay a scenario's workload over real HTTP against a testbed or one target, open loop.

    Each request is sent at its arrival time (times --time-scale) from its origin region to that
    region's entry point, streamed; TTFT, TPOT, end-to-end latency, errors and where it was served
    are measured. A request with an SLO class (the scenario's slo block) names it in the x-slo-class
    header; SLO attainment, goodput and rejections (429 slo_unattainable) are then reported per
    class. Prints tables like 'isthmus simulate' and writes the same JSON shape (one result,
    labelled with the testbed's policy), plus bench-only keys (errors, timeouts, rejections,
    send_lag_s, itl_s, served_by, served_regions).
    """
    from rich.console import Console

    from isthmus.core.errors import IsthmusError

    if (testbed is None) == (target is None):
        raise _fail("give exactly one of --testbed MANIFEST and --target URL")
    for name, value in (("--rate", rate), ("--time-scale", time_scale), ("--timeout-s", timeout_s)):
        if value is not None and not (value > 0 and value < float("inf")):
            raise _fail(f"{name} must be a number > 0, got {value}")
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        raise _fail(f"the load generator needs the 'serve' extra (pip install 'isthmus[serve]'): {exc}") from None

    from isthmus.bench.loadgen import Targets, count_requests, load_manifest, prepare_scenario, run_bench
    from isthmus.sim.report import policy_table, progress_bar, write_report

    out, err = Console(), Console(stderr=True)
    try:
        manifest = load_manifest(testbed) if testbed is not None else None
        targets = Targets.of_manifest(manifest) if manifest is not None else Targets.single(str(target))
        sc = prepare_scenario(scenario, limit=limit, rate=rate)
        run_seed = sc.config.seed if seed is None else seed
        weights = sc.config.workload.origins.weights
        targets.check(r for r in sc.config.topology.regions if weights is None or weights.get(r, 0) > 0)
        if plot is not None:
            from isthmus.sim.plot import require_matplotlib

            require_matplotlib()
        total, last = count_requests(sc, run_seed)
        scale = time_scale if time_scale is not None else (manifest.time_scale if manifest is not None else 1.0)
        label = manifest.policy if manifest is not None else "bench"
        err.print(f"{sc.name}: {total:,} requests over {last:,.1f} s of scenario time, "
                  f"{last * scale:,.1f} s of wall time at time scale {scale:g}", highlight=False)
        with progress_bar(err, label, total) as update:
            result = run_bench(sc, manifest, target=target, model=model, time_scale=scale, timeout_s=timeout_s,
                               seed=run_seed, progress=update)
    except IsthmusError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing written", EXIT_INTERRUPTED) from None
    rec = result.record()
    out.print(policy_table(rec))
    out.print(bench_table(rec))
    try:
        if json_out is not None:
            write_report(json_out, result.document())
            err.print(f"wrote {json_out}", highlight=False)
        if plot is not None:
            from isthmus.sim.plot import plot_ttft_cdf

            plot_ttft_cdf([(result.label, result.ttft_s)], plot,
                          title=f"{sc.name}: TTFT CDF over HTTP ({result.label})")
            err.print(f"wrote {plot}", highlight=False)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise _fail(f"cannot write{where}: {exc.strerror or exc}", EXIT_IO) from None
