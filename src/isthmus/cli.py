"""The ``isthmus`` command line. Thin: parsing and printing here, the work in the packages.

Exit codes: 0 success; 2 a usage error, an invalid scenario, an unknown policy or any other
:class:`~isthmus.core.errors.IsthmusError` (one line on stderr, no traceback); 1 an output file
that cannot be written; otherwise what the subcommand returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from isthmus.core.errors import IsthmusError

EXIT_ERROR = 2
EXIT_IO = 1


def build_app() -> typer.Typer:
    """The command tree: ``simulate`` and ``validate``."""
    app = typer.Typer(
        help="Route LLM inference across regions: simulate routing policies on real traces, validate the engine model.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.command()(simulate)
    app.command()(validate)
    return app


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn expected errors into one line on stderr and an exit code."""
    try:
        yield
    except IsthmusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(f"error: cannot write{where}: {exc.strerror or exc}", err=True)
        raise typer.Exit(EXIT_IO) from None


def simulate(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML).", show_default=False)],
    policy: Annotated[str | None, typer.Option(
        help="Comma-separated policies to run (default: the scenario's list).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed (default: the scenario's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(metavar="FILE.png", help="Write TTFT CDFs, one line per policy.")] = None,
    timing: Annotated[bool, typer.Option(
        help="Add wall-clock figures to the JSON under 'timing' (the file then differs between runs).")] = False,
) -> None:
    """Compare routing policies on a scenario.

    Replays the scenario's workload once per policy (same arrivals for each), prints a table per
    policy and a comparison, and optionally writes the JSON report and a TTFT CDF plot.
    """
    from isthmus.sim.report import (
        build_report,
        comparison_table,
        policy_table,
        progress_bar,
        result_record,
        write_report,
    )
    from isthmus.sim.scenario import load_scenario

    out, err = Console(), Console(stderr=True)
    with _clean_errors():
        sc = load_scenario(scenario)
        if policy is None:
            labels = [p.key for p in sc.config.policies]
        else:
            labels = [p.strip() for p in policy.split(",") if p.strip()]
        if not labels:
            raise typer.BadParameter("no policy named", param_hint="--policy")
        run_seed = sc.config.seed if seed is None else seed
        for label in labels:  # fail on an unknown policy before spending time on the others
            sc.make_policy(label, run_seed)
        if plot is not None:
            from isthmus.sim.plot import require_matplotlib

            require_matplotlib()

        records: list[dict[str, Any]] = []
        ttfts = []
        times: dict[str, dict[str, float]] = {}
        total: int | None = None
        for label in labels:
            with progress_bar(err, label, total) as update:
                result = sc.run(label, run_seed, progress=update)
            total = result.requests
            rec = result_record(label, result.summary())
            records.append(rec)
            ttfts.append((label, result.ttft_s))
            eps = result.events / result.wall_s if result.wall_s > 0 else float("nan")
            times[label] = {"wall_s": result.wall_s, "events": float(result.events), "events_per_s": eps}
            err.print(f"{label}: {result.requests:,} requests, {result.events:,} events in {result.wall_s:.2f} s "
                      f"({eps:,.0f} events/s)", highlight=False)
            out.print(policy_table(rec))
        if len(records) > 1:
            out.print(comparison_table(records))
        if json_out is not None:
            write_report(json_out, build_report(sc.name, run_seed, records, times if timing else None))
            err.print(f"wrote {json_out}", highlight=False)
        if plot is not None:
            from isthmus.sim.plot import plot_ttft_cdf

            plot_ttft_cdf(ttfts, plot, title=f"{sc.name}: TTFT CDF (seed {run_seed})")
            err.print(f"wrote {plot}", highlight=False)


def validate(
    ground_truth_dir: Annotated[Path, typer.Argument(
                                                     help="A real engine run (meta.json, requests.jsonl).")],
    workload: Annotated[Path | None, typer.Option(metavar="FILE", help="The workload it replayed.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the errors as JSON.")] = None,
) -> None:
    """Check the engine model against a real vLLM run.

    Replays the run's workload through the simulated engine and reports the error on TTFT, TPOT
    and end-to-end latency.
    """
    from isthmus.validate import main as validate_main

    with _clean_errors():
        code = validate_main(ground_truth_dir, workload, json_out)
    raise typer.Exit(code)


def main() -> None:
    """Console entry point (``isthmus``)."""
    build_app()()
